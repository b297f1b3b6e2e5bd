"""tabulate_8bit_chains: elementwise chains over one 8-bit value become jaxinfer::Lookup8 table reads,
bit-identical to the chain computed per element, and as close to onnxruntime as the chain was."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer.converters.onnx.reader import read_model
from jaxinfer.passes import lookup, optimize, rewrite_qdq, tabulate_8bit_chains

_TYPES = {np.uint8: TensorProto.UINT8, np.int8: TensorProto.INT8}


def _const(name: str, value, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def _gelu_model(code=np.uint8, shape=("N", 16), const_rank: int = 0, extra_outputs=()) -> onnx.ModelProto:
    """onnxruntime's QDQ GELU on an 8-bit input: x -> DQ -> Div -> Q/DQ -> Erf -> Q/DQ -> Add 1 -> Q/DQ
    -> Mul x -> Q/DQ -> Mul 0.5 -> Q -> y (8-bit)."""
    zp = 128 if code == np.uint8 else 0
    one = (1,) * const_rank

    def qdq(src: str, name: str, scale: float) -> list:
        return [helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
                helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_d"])]

    scales = {"div": 0.02, "erf": 0.008, "add": 0.008, "mul": 0.03, "y": 0.02}
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "x_z"], ["xd"]),
             helper.make_node("Div", ["xd", "sqrt2"], ["div"]), *qdq("div", "div", 0),
             helper.make_node("Erf", ["div_d"], ["erf"]), *qdq("erf", "erf", 0),
             helper.make_node("Add", ["erf_d", "one"], ["add"]), *qdq("add", "add", 0),
             helper.make_node("Mul", ["xd", "add_d"], ["mul"]), *qdq("mul", "mul", 0),
             helper.make_node("Mul", ["mul_d", "half"], ["half_x"]),
             helper.make_node("QuantizeLinear", ["half_x", "y_s", "y_z"], ["y"])]
    inits = [_const("x_s", 0.03), _const("x_z", zp, code), _const("sqrt2", np.full(one, np.sqrt(2.0))),
             _const("one", np.full(one, 1.0)), _const("half", 0.5)]
    for name, s in scales.items():
        inits += [_const(f"{name}_s", s), _const(f"{name}_z", zp if name != "add" else 0, code)]
    outs = [helper.make_tensor_value_info("y", _TYPES[code], None)]
    outs += [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in extra_outputs]
    g = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", _TYPES[code], list(shape))], outs,
                          initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])


def _top(graph) -> dict[str, int]:
    """The graph's own ops (op_histogram counts the Lookup8 bodies' too)."""
    hist: dict[str, int] = {}
    for n in graph.nodes:
        key = f"{n.domain}::{n.op_type}" if n.domain else n.op_type
        hist[key] = hist.get(key, 0) + 1
    return hist


def _codes(code, shape, seed=0) -> np.ndarray:
    info = np.iinfo(code)
    return np.random.default_rng(seed).integers(info.min, info.max + 1, shape).astype(code)


def _untabulated(model, feeds, monkeypatch) -> dict:
    with monkeypatch.context() as m:
        m.setattr(lookup, "MIN_COST", 10**9)
        loaded = jaxinfer.load(model)
        assert "jaxinfer::Lookup8" not in _top(loaded.graph)
        return {k: np.asarray(v) for k, v in loaded.run(feeds).items()}


def _ort(model, feeds) -> list:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


@pytest.mark.parametrize("code", [np.uint8, np.int8])
def test_qdq_gelu_becomes_one_table_read(code, monkeypatch):
    model = _gelu_model(code)
    m = jaxinfer.load(model)
    hist = _top(m.graph)
    assert hist == {"jaxinfer::Lookup8": 1}, hist
    body = {n.op_type for n in m.graph.nodes[0].attrs["body"].nodes}
    assert {"Erf", "Div", "QuantizeLinear", "DequantizeLinear"} <= body, body
    # every code, twice, in a batch of 2 x 16 x 16
    x = np.concatenate([np.arange(256), np.arange(256)[::-1]]).astype(np.int64)
    x = (x + np.iinfo(code).min).astype(code).reshape(32, 16)
    got = np.asarray(m.run({"x": x})["y"])
    assert got.dtype == code and got.shape == x.shape
    np.testing.assert_array_equal(got, _untabulated(model, {"x": x}, monkeypatch)["y"])
    ref = _ort(model, {"x": x})[0]
    assert np.mean(np.abs(got.astype(int) - ref.astype(int)) <= 1) >= 0.99


def test_one_element_constants_of_higher_rank_broadcast_the_shape(monkeypatch):
    model = _gelu_model(np.uint8, shape=("N", 5), const_rank=3)
    x = _codes(np.uint8, (4, 5))
    got = jaxinfer.load(model).run({"x": x})["y"]
    want = _untabulated(model, {"x": x}, monkeypatch)["y"]
    assert got.shape == want.shape == (1, 4, 5)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_values_read_outside_the_chain_stay(monkeypatch):
    """A float value in the middle of the chain is also a graph output: it is tabulated too (an
    exit of its own), and every output matches the chain computed per element."""
    model = _gelu_model(np.uint8, extra_outputs=("erf_d", "xd"))
    m = jaxinfer.load(model)
    assert _top(m.graph).get("jaxinfer::Lookup8") == 2  # y and erf_d; xd is one step (cost 1)
    x = _codes(np.uint8, (3, 16), seed=1)
    got, want = m.run({"x": x}), _untabulated(model, {"x": x}, monkeypatch)
    for k in ("y", "erf_d", "xd"):
        np.testing.assert_array_equal(np.asarray(got[k]), want[k])


def test_short_chains_vector_constants_and_two_roots_are_left_alone():
    x_s, z = _const("x_s", 0.05), _const("z", 128, np.uint8)
    nodes = [helper.make_node("DequantizeLinear", ["x", "x_s", "z"], ["xd"]),
             helper.make_node("QuantizeLinear", ["xd", "y_s", "z"], ["requant"]),  # cost 4: left
             helper.make_node("Tanh", ["xd"], ["t"]),
             helper.make_node("Add", ["t", "bias"], ["tb"]),  # a per-channel constant ends the chain
             helper.make_node("QuantizeLinear", ["tb", "y_s", "z"], ["vec"]),
             helper.make_node("DequantizeLinear", ["w", "x_s", "z"], ["wd"]),
             helper.make_node("Mul", ["xd", "wd"], ["xw"]),  # two roots
             helper.make_node("Sigmoid", ["xw"], ["sig"]),
             helper.make_node("QuantizeLinear", ["sig", "y_s", "z"], ["two"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.UINT8, [2, 4]) for n in "xw"],
                          [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in ("requant", "vec", "two")],
                          initializer=[x_s, z, _const("y_s", 0.01), _const("bias", np.arange(4) / 4)])
    graph = read_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)]))
    assert tabulate_8bit_chains(graph) is graph


def test_a_16bit_root_runs_the_chain_directly(monkeypatch):
    """QuantizeLinear's declared zero point says 8-bit, but this graph's root is the int16 graph input:
    the pass does not take it (not 8-bit by its declaration), and a Lookup8 handed one runs its body."""
    nodes = [helper.make_node("DequantizeLinear", ["x", "s", "z"], ["xd"]),
             helper.make_node("Erf", ["xd"], ["e"]),
             helper.make_node("QuantizeLinear", ["e", "s2", "z"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.INT16, [3, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.INT16, None)],
                          initializer=[_const("s", 0.001), _const("z", 0, np.int16), _const("s2", 0.0001)])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])
    assert "jaxinfer::Lookup8" not in _top(jaxinfer.load(model).graph)
    from jaxinfer.converters.onnx.ops.contrib_quant import lookup8

    def body(v):
        return (jax.numpy.tanh(v.astype(np.float32)),)

    x = np.arange(-5, 5, dtype=np.int16)
    np.testing.assert_array_equal(np.asarray(lookup8(x, body=body)), np.asarray(body(x)[0]))


def test_bert_qdq_fixture_gelu_is_tabulated_and_identical(monkeypatch):
    from pathlib import Path
    path = Path(__file__).parents[1] / "fixtures" / "onnx" / "bert_qdq.onnx"
    m = jaxinfer.load(path)
    assert _top(m.graph).get("jaxinfer::Lookup8") == 2  # one GELU per layer
    feeds = {k: np.random.default_rng(3).integers(0, 100, (2, 8)).astype(np.int64)
             for k in ("input_ids",)}
    feeds["attention_mask"] = np.ones((2, 8), np.int64)
    feeds["token_type_ids"] = np.zeros((2, 8), np.int64)
    got = m.run(feeds)
    want = _untabulated(path, feeds, monkeypatch)
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k])


def test_the_pass_is_in_the_default_pipeline():
    graph = rewrite_qdq(read_model(_gelu_model()))
    assert "jaxinfer::Lookup8" in _top(optimize(graph))
