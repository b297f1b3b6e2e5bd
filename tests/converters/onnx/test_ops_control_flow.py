"""Focused checks of control flow, sequence and recurrent ops where the backend suite is thin.

Graphs are built with ``onnx.helper`` and compared with onnxruntime: recurrent
ops over every direction, layout, sequence_lens, clip and activation attribute;
Scan's axes/directions (opset 9+) and batch/sequence_lens form (opset 8); Loop
as a while loop with a run-time condition and as a scan over traced values; If
with a run-time condition reading the outer scope; sequence ops.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from jaxinfer.converters.onnx import load_onnx

F = TensorProto.FLOAT
I64 = TensorProto.INT64
B = TensorProto.BOOL
RNG = np.random.default_rng(0)


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _info(name: str, arr: np.ndarray) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape)


def _model(nodes: Sequence[onnx.NodeProto], inputs: dict[str, np.ndarray], outputs: Sequence[str],
           opset: int = 21) -> onnx.ModelProto:
    outs = [helper.make_value_info(o, onnx.TypeProto()) for o in outputs]
    graph = helper.make_graph(list(nodes), "g", [_info(k, v) for k, v in inputs.items()], outs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return onnx.shape_inference.infer_shapes(model)


def _compare(model: onnx.ModelProto, inputs: dict[str, np.ndarray], rtol: float = 1e-4) -> None:
    m = load_onnx(model)
    ours = m.run(inputs)
    names = [o.name for o in model.graph.output]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = sess.run(names, inputs)
    for name, r in zip(names, ref):
        got = ours[name]
        if isinstance(r, list):
            assert len(got) == len(r), name
            pairs = list(zip(got, r))
        else:
            pairs = [(got, r)]
        for a, b in pairs:
            a = np.asarray(a)
            assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
            assert a.shape == b.shape, (name, a.shape, b.shape)
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-5, err_msg=name)


# ------------------------------------------------------------- recurrent ops

_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _recurrent_case(kind: str, direction: str, layout: int = 0, seq_lens: bool = False, initial: bool = True,
                    peepholes: bool = False, **attrs: Any) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    t, n, i, h = 5, 3, 4, 6
    d = 2 if direction == "bidirectional" else 1
    g = _GATES[kind]
    feeds = {
        "X": _randn(n, t, i) if layout else _randn(t, n, i),
        "W": _randn(d, g * h, i) * 0.5,
        "R": _randn(d, g * h, h) * 0.5,
        "B": _randn(d, 2 * g * h) * 0.5,
    }
    names = ["X", "W", "R", "B"]
    if seq_lens:
        feeds["seq"] = np.array([5, 2, 4], np.int32)
    names.append("seq" if seq_lens else "")
    if initial:
        feeds["h0"] = _randn(n, d, h) if layout else _randn(d, n, h)
        names.append("h0")
        if kind == "LSTM":
            feeds["c0"] = _randn(n, d, h) if layout else _randn(d, n, h)
            names.append("c0")
    if peepholes:
        if not initial:
            names += ["", ""]
        feeds["P"] = _randn(d, 3 * h)
        names.append("P")
    outs = ["Y", "Y_h", "Y_c"] if kind == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(kind, names, outs, hidden_size=h, direction=direction, layout=layout, **attrs)
    return _model([node], feeds, outs, opset=22), feeds


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("seq_lens", [False, True])
def test_recurrent_directions_and_lengths(kind: str, direction: str, seq_lens: bool) -> None:
    model, feeds = _recurrent_case(kind, direction, seq_lens=seq_lens)
    _compare(model, feeds)


@pytest.mark.parametrize("kind", ["RNN", "GRU", "LSTM"])
def test_recurrent_layout1(kind: str) -> None:
    """layout=1 (batch first; onnxruntime lacks it): ours on transposed data vs onnxruntime at layout 0."""
    model0, feeds0 = _recurrent_case(kind, "bidirectional", seq_lens=True)
    state_names = [n for n in feeds0 if n in ("h0", "c0")]
    feeds1 = dict(feeds0, X=np.swapaxes(feeds0["X"], 0, 1), **{k: np.swapaxes(feeds0[k], 0, 1) for k in state_names})
    model1 = _model([helper.make_node(**_node_kwargs(model0.graph.node[0], layout=1))], feeds1,
                    [o for o in model0.graph.node[0].output], opset=22)
    ours = load_onnx(model1).run(feeds1)
    names = list(model0.graph.node[0].output)
    sess = ort.InferenceSession(model0.SerializeToString(), providers=["CPUExecutionProvider"])
    ref = dict(zip(names, sess.run(names, feeds0)))
    np.testing.assert_allclose(ours["Y"], np.transpose(ref["Y"], (2, 0, 1, 3)), rtol=1e-4, atol=1e-5)
    for name in names[1:]:
        np.testing.assert_allclose(ours[name], np.swapaxes(ref[name], 0, 1), rtol=1e-4, atol=1e-5)


def _node_kwargs(node: onnx.NodeProto, **changes: Any) -> dict[str, Any]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs.update(changes)
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    return dict(op_type=node.op_type, inputs=list(node.input), outputs=list(node.output), **attrs)


def test_gru_linear_before_reset_and_clip() -> None:
    model, feeds = _recurrent_case("GRU", "bidirectional", seq_lens=True, linear_before_reset=1, clip=0.7)
    _compare(model, feeds)


def test_lstm_peepholes_clip_and_activations() -> None:
    model, feeds = _recurrent_case(
        "LSTM", "bidirectional", seq_lens=True, peepholes=True, clip=1.5,
        activations=["HardSigmoid", "LeakyRelu", "Tanh", "Sigmoid", "ScaledTanh", "Softsign"],
        activation_alpha=[0.3, 0.05, 0.8], activation_beta=[0.4, 1.2])
    _compare(model, feeds)


def test_lstm_input_forget() -> None:
    model, feeds = _recurrent_case("LSTM", "reverse", seq_lens=True, input_forget=1)
    _compare(model, feeds)


def test_rnn_activation_with_alpha() -> None:
    model, feeds = _recurrent_case("RNN", "forward", activations=["LeakyRelu"], activation_alpha=[0.2])
    _compare(model, feeds)


# ---------------------------------------------------------------------- Scan

def _scan_body(n_states: int = 1) -> onnx.GraphProto:
    """sum_out = sum_in + x; prod_out = prod_in * x; scan output = sum_out * 2."""
    nodes = [helper.make_node("Add", ["s_in", "x"], ["s_out"]),
             helper.make_node("Mul", ["s_out", "two"], ["y"])]
    ins = [helper.make_tensor_value_info("s_in", F, [2])]
    outs = [helper.make_tensor_value_info("s_out", F, [2])]
    if n_states == 2:
        nodes.append(helper.make_node("Mul", ["p_in", "x"], ["p_out"]))
        ins.append(helper.make_tensor_value_info("p_in", F, [2]))
        outs.append(helper.make_tensor_value_info("p_out", F, [2]))
    ins.append(helper.make_tensor_value_info("x", F, [2]))
    outs.append(helper.make_tensor_value_info("y", F, [2]))
    two = helper.make_tensor("two", F, [], [2.0])
    return helper.make_graph(nodes, "body", ins, outs, initializer=[two])


def test_scan9_axes_and_directions() -> None:
    feeds = {"s0": _randn(2), "p0": _randn(2), "xs": _randn(2, 4)}  # scan over axis 1
    node = helper.make_node("Scan", ["s0", "p0", "xs"], ["s", "p", "ys"], body=_scan_body(2), num_scan_inputs=1,
                            scan_input_axes=[1], scan_input_directions=[1], scan_output_axes=[1],
                            scan_output_directions=[1])
    _compare(_model([node], feeds, ["s", "p", "ys"], opset=16), feeds)


def test_scan8_sequence_lens_and_direction() -> None:
    feeds = {"lens": np.array([4, 2, 3], np.int64), "s0": _randn(3, 2), "xs": _randn(3, 4, 2)}
    node = helper.make_node("Scan", ["lens", "s0", "xs"], ["s", "ys"], body=_scan_body(), num_scan_inputs=1,
                            directions=[1])
    _compare(_model([node], feeds, ["s", "ys"], opset=8), feeds)


# ---------------------------------------------------------------------- Loop

@pytest.mark.parametrize("with_trip_count", [True, False])
def test_loop_while_with_runtime_condition(with_trip_count: bool) -> None:
    """x doubles until its sum passes a run-time limit: a lax.while_loop."""
    body = helper.make_graph(
        [helper.make_node("Mul", ["x_in", "two"], ["x_out"]),
         helper.make_node("ReduceSum", ["x_out"], ["s"], keepdims=0),
         helper.make_node("Less", ["s", "limit"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c_in", B, []),
         helper.make_tensor_value_info("x_in", F, [3])],
        [helper.make_tensor_value_info("c_out", B, []), helper.make_tensor_value_info("x_out", F, [3])],
        initializer=[helper.make_tensor("two", F, [], [2.0])])
    feeds = {"x": np.abs(_randn(3)) + 0.1, "limit": np.array(50.0, np.float32)}
    nodes = [helper.make_node("Constant", [], ["M"], value=helper.make_tensor("M", I64, [], [100])),
             helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", B, [], [True])),
             helper.make_node("Loop", ["M" if with_trip_count else "", "c", "x"], ["y"], body=body)]
    _compare(_model(nodes, feeds, ["y"], opset=13), feeds)


@pytest.mark.parametrize("trips", [6, 0])
def test_loop_scan_outputs_over_traced_values(trips: int) -> None:
    """acc += x * i for a fixed trip count, with every step's acc as a scan output: a lax.scan."""
    body = helper.make_graph(
        [helper.make_node("Cast", ["i"], ["fi"], to=F),
         helper.make_node("Mul", ["x", "fi"], ["xi"]),
         helper.make_node("Add", ["a_in", "xi"], ["a_out"]),
         helper.make_node("Identity", ["c_in"], ["c_out"]),
         helper.make_node("Identity", ["a_out"], ["scan"])],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c_in", B, []),
         helper.make_tensor_value_info("a_in", F, [2, 3])],
        [helper.make_tensor_value_info("c_out", B, []), helper.make_tensor_value_info("a_out", F, [2, 3]),
         helper.make_tensor_value_info("scan", F, [2, 3])])
    feeds = {"x": _randn(2, 3), "a": _randn(2, 3)}
    nodes = [helper.make_node("Constant", [], ["M"], value=helper.make_tensor("M", I64, [], [trips])),
             helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", B, [], [True])),
             helper.make_node("Loop", ["M", "c", "a"], ["acc", "steps"], body=body)]
    _compare(_model(nodes, feeds, ["acc", "steps"], opset=13), feeds)


# ------------------------------------------------------------------------ If

def test_if_runtime_condition_reads_outer_scope() -> None:
    then = helper.make_graph([helper.make_node("Add", ["x", "y"], ["t"])], "then", [],
                             [helper.make_tensor_value_info("t", F, [4])])
    other = helper.make_graph([helper.make_node("Sub", ["x", "y"], ["e"])], "else", [],
                              [helper.make_tensor_value_info("e", F, [4])])
    nodes = [helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("If", ["c"], ["out"], then_branch=then, else_branch=other)]
    for x in (np.abs(_randn(4)), -np.abs(_randn(4))):
        feeds = {"x": x, "y": _randn(4), "zero": np.array(0.0, np.float32)}
        _compare(_model(nodes, feeds, ["out"], opset=13), feeds)


# ------------------------------------------------------------------ sequences

def test_split_concat_erase_insert() -> None:
    feeds = {"x": _randn(7, 3)}
    nodes = [helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", I64, [], [3])),
             helper.make_node("SplitToSequence", ["x", "k"], ["parts"], axis=0),
             helper.make_node("Constant", [], ["p"], value=helper.make_tensor("p", I64, [], [-2])),
             helper.make_node("SequenceErase", ["parts", "p"], ["kept"]),
             helper.make_node("SequenceInsert", ["kept", "x", "p"], ["more"]),
             helper.make_node("ConcatFromSequence", ["more"], ["cat"], axis=0),
             helper.make_node("SequenceLength", ["more"], ["n"]),
             helper.make_node("SplitToSequence", ["x"], ["rows"], axis=1, keepdims=0),
             helper.make_node("ConcatFromSequence", ["rows"], ["stacked"], axis=-1, new_axis=1)]
    _compare(_model(nodes, feeds, ["cat", "n", "stacked"], opset=13), feeds)


def test_loop_growing_state_unrolls() -> None:
    """A carried tensor that grows each iteration cannot be a lax carry; with a known M it unrolls."""
    body = helper.make_graph(
        [helper.make_node("Concat", ["a_in", "x"], ["a_out"], axis=0),
         helper.make_node("Identity", ["c_in"], ["c_out"])],
        "body",
        [helper.make_tensor_value_info("i", I64, []), helper.make_tensor_value_info("c_in", B, []),
         helper.make_tensor_value_info("a_in", F, None)],
        [helper.make_tensor_value_info("c_out", B, []), helper.make_tensor_value_info("a_out", F, None)])
    feeds = {"x": _randn(2, 3), "a": _randn(1, 3)}
    nodes = [helper.make_node("Constant", [], ["M"], value=helper.make_tensor("M", I64, [], [3])),
             helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", B, [], [True])),
             helper.make_node("Loop", ["M", "c", "a"], ["acc"], body=body)]
    _compare(_model(nodes, feeds, ["acc"], opset=13), feeds)
