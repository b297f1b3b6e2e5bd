"""passes.qdq beyond Conv/MatMul/Gemm: the QDQ forms around Add, Mul, pools, Concat, Relu/Clip, and
opset-21 blocked / int4 weights feeding MatMul, each against onnxruntime.

Quantized outputs (read through the graph's last DequantizeLinear) must agree with onnxruntime's
within 1 LSB on >= 99 % of elements, against both its optimized session (its own QLinear kernels)
and its unoptimized one (the QDQ reference semantics); float outputs match the unoptimized session
to float rounding. Each test also checks the rewrite happened.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer.converters.onnx.reader import read_model
from jaxinfer.passes.qdq import rewrite_qdq

quantization = pytest.importorskip("onnxruntime.quantization")
RNG = np.random.default_rng(5)


def _f32(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, np.float32), name)


def _ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimized: bool) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    if not optimized:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def _within_lsb(got: np.ndarray, ref: np.ndarray, scale: float) -> float:
    return float(np.mean(np.abs(got.astype(np.float64) - ref.astype(np.float64)) <= 1.0001 * scale))


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], scale: float | None) -> dict[str, int]:
    """Run jaxinfer and onnxruntime (optimized, unoptimized); return the rewritten graph's op histogram."""
    got = np.asarray(next(iter(jaxinfer.load(model).run(feeds).values())))
    for optimized in (True, False):
        ref = _ort(model, feeds, optimized)
        assert got.shape == ref.shape and got.dtype == ref.dtype
        if scale is None and optimized:
            # onnxruntime's optimized session turns DQ(4-bit) -> MatMul into MatMulNBits, which
            # quantizes the float activation to int8 on the fly (measured: ~0.5 % of max |y| off)
            np.testing.assert_allclose(got, ref, rtol=0, atol=1e-2 * float(np.abs(ref).max()))
        elif scale is None:
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
        else:
            share = _within_lsb(got, ref, scale)
            assert share >= 0.99, f"{100 * share:.2f} % within 1 LSB (optimized={optimized})"
    return rewrite_qdq(read_model(model)).op_histogram()


# ------------------------------------------------------------ quantize_static around other ops


def _block_model() -> onnx.ModelProto:
    """Conv-Clip-MaxPool-Conv, residual Add, Relu, Mul by a constant, AveragePool, Concat, GlobalAveragePool."""
    inits = [_f32("w1", RNG.standard_normal((8, 3, 3, 3)) * 0.3), _f32("b1", RNG.standard_normal(8) * 0.1),
             _f32("w2", RNG.standard_normal((8, 8, 1, 1)) * 0.3), _f32("m", RNG.uniform(0.5, 1.5, (1, 8, 1, 1))),
             _f32("lo", np.array(0.0)), _f32("hi", np.array(6.0))]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Clip", ["c1", "lo", "hi"], ["r1"]),
             helper.make_node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p1", "w2"], ["c2"]),
             helper.make_node("Add", ["c2", "p1"], ["a"]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("Mul", ["ar", "m"], ["mm"]),
             helper.make_node("AveragePool", ["mm"], ["ap"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
             helper.make_node("Concat", ["ap", "p1"], ["cc"], axis=1),
             helper.make_node("GlobalAveragePool", ["cc"], ["y"])]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 1, 1])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


class _Reader(quantization.CalibrationDataReader):
    def __init__(self) -> None:
        rng = np.random.default_rng(3)
        self._it = iter([{"x": rng.standard_normal((2, 3, 16, 16)).astype(np.float32)} for _ in range(6)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _output_scale(model: onnx.ModelProto) -> float:
    prod = {o: n for n in model.graph.node for o in n.output}
    dq = prod[model.graph.output[0].name]
    assert dq.op_type == "DequantizeLinear"
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return float(inits[dq.input[1]].reshape(-1)[0])


@pytest.mark.parametrize("act", ["u8", "s8"])
def test_quantize_static_qdq_around_add_mul_pools_concat(tmp_path, act):
    q = quantization
    src, dst = tmp_path / "f.onnx", tmp_path / "qdq.onnx"
    onnx.save(_block_model(), str(src))
    q.quantize_static(str(src), str(dst), _Reader(), quant_format=q.QuantFormat.QDQ, reduce_range=True,
                      activation_type=q.QuantType.QUInt8 if act == "u8" else q.QuantType.QInt8,
                      weight_type=q.QuantType.QInt8)
    model = onnx.load(str(dst))
    x = np.random.default_rng(11).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ops = _check(model, {"x": x}, _output_scale(model))
    for float_op in ("Conv", "Add", "Mul", "AveragePool", "GlobalAveragePool", "Concat"):
        assert float_op not in ops, ops
    for quantized in ("QLinearAdd", "QLinearMul", "QLinearAveragePool", "QLinearGlobalAveragePool", "QLinearConcat"):
        assert ops.get(f"com.microsoft::{quantized}") == 1, ops
    assert ops["MaxPool"] == 1 and ops["jaxinfer::QLinearConvInt"] == 2, ops
    # left: the input's QuantizeLinear, the output's DequantizeLinear
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 1, ops


# ------------------------------------------------------------ hand-built QDQ: Relu / Clip


def _qdq_model(nodes: list, inits: list, out_shape: list, opset: int = 17) -> onnx.ModelProto:
    """x -Q(xs, xzp)-> DQ -> ``nodes`` (reading "xd", writing "yf") -Q(ys, yzp)-> DQ -> y."""
    pre = [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
           helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"])]
    post = [helper.make_node("QuantizeLinear", ["yf", "ys", "yzp"], ["yq"]),
            helper.make_node("DequantizeLinear", ["yq", "ys", "yzp"], ["y"])]
    g = helper.make_graph(pre + nodes + post, "qdq",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _qparams(xs: float, xzp: int, ys: float, yzp: int, dtype=np.uint8) -> list:
    return [_f32("xs", np.array(xs)), numpy_helper.from_array(np.array(xzp, dtype), "xzp"),
            _f32("ys", np.array(ys)), numpy_helper.from_array(np.array(yzp, dtype), "yzp")]


@pytest.mark.parametrize("same", [True, False])
def test_relu_between_qdq(same):
    params = _qparams(0.05, 128, 0.05, 128) if same else _qparams(0.05, 128, 0.03, 0)
    model = _qdq_model([helper.make_node("Relu", ["xd"], ["yf"])], params, ["N", 4, 6, 6])
    x = (np.random.default_rng(1).standard_normal((2, 4, 6, 6)) * 3).astype(np.float32)
    ops = _check(model, {"x": x}, 0.05 if same else 0.03)
    assert "Relu" not in ops and ops["com.microsoft::QLinearLeakyRelu"] == 1, ops


def test_clip_between_qdq_runs_on_integers():
    inits = _qparams(0.04, 10, 0.04, 10, np.int8) + [_f32("lo", np.array(-1.0)), _f32("hi", np.array(2.5))]
    model = _qdq_model([helper.make_node("Clip", ["xd", "lo", "hi"], ["yf"])], inits, ["N", 4, 6, 6])
    x = (np.random.default_rng(2).standard_normal((2, 4, 6, 6)) * 3).astype(np.float32)
    ops = _check(model, {"x": x}, 0.04)
    assert ops["Clip"] == 1 and "DequantizeLinear" in ops and ops["DequantizeLinear"] == 1, ops


@pytest.mark.parametrize("act", ["Relu", "Clip"])
def test_conv_relu_or_clip_fused_before_quantize(act):
    w = np.random.default_rng(4).integers(-60, 60, (8, 4, 3, 3)).astype(np.int8)
    inits = _qparams(0.05, 128, 0.02, 0) + [
        numpy_helper.from_array(w, "wq"), _f32("ws", np.full(8, 0.01)),
        numpy_helper.from_array(np.zeros(8, np.int8), "wzp"),
        _f32("lo", np.array(0.0)), _f32("hi", np.array(3.0))]
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], axis=0),
             helper.make_node("Conv", ["xd", "wd"], ["c"], pads=[1, 1, 1, 1])]
    nodes.append(helper.make_node("Relu", ["c"], ["yf"]) if act == "Relu"
                 else helper.make_node("Clip", ["c", "lo", "hi"], ["yf"]))
    model = _qdq_model(nodes, inits, ["N", 8, 6, 6])
    x = (np.random.default_rng(5).standard_normal((2, 4, 6, 6)) * 2).astype(np.float32)
    ops = _check(model, {"x": x}, 0.02)
    if act == "Clip":
        assert ops["Clip"] == 1, ops  # the Clip stays, on the integer output at the quantized bounds
    else:
        assert "Relu" not in ops, ops
    assert ops["jaxinfer::QLinearConvInt"] == 1 and "Conv" not in ops, ops


# ------------------------------------------------------------ opset 21: blocked and int4 weights

_WTYPES = {"int4": (TensorProto.INT4, -8, 8), "uint4": (TensorProto.UINT4, 0, 16),
           "int8": (TensorProto.INT8, -100, 100)}


def _matmul_model(wtype: str, block: int, quantized_act: bool, k: int = 40, n: int = 12) -> onnx.ModelProto:
    """x (N, 3, K) [-Q/DQ per tensor] @ DQ(w (K, N) per-K-block or per-column) [-Q/DQ] -> y, opset 21."""
    elem, lo, hi = _WTYPES[wtype]
    rng = np.random.default_rng(7)
    wq = rng.integers(lo, hi, (k, n))
    groups = -(-k // block) if block else None
    sshape = (groups, n) if block else (n,)
    mid = (lo + hi) // 2
    zp = rng.integers(mid - 2, mid + 2, sshape) if wtype != "int8" else np.zeros(sshape, np.int64)
    inits = [helper.make_tensor("wq", elem, (k, n), wq.ravel().tolist()),
             _f32("ws", rng.uniform(0.005, 0.02, sshape)),
             helper.make_tensor("wzp", elem, sshape, zp.ravel().tolist())]
    attrs = {"axis": 0, "block_size": block} if block else {"axis": 1}
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws", "wzp"], ["wd"], **attrs)]
    x_in = "x"
    if quantized_act:
        inits += [_f32("xs", np.array(0.03)), numpy_helper.from_array(np.array(120, np.uint8), "xzp"),
                  _f32("ys", np.array(0.04)), numpy_helper.from_array(np.array(128, np.uint8), "yzp")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "xs", "xzp"], ["xq"]),
                  helper.make_node("DequantizeLinear", ["xq", "xs", "xzp"], ["xd"])]
        x_in = "xd"
    out = "yf" if quantized_act else "y"
    nodes.append(helper.make_node("MatMul", [x_in, "wd"], [out]))
    if quantized_act:
        nodes += [helper.make_node("QuantizeLinear", ["yf", "ys", "yzp"], ["yq"]),
                  helper.make_node("DequantizeLinear", ["yq", "ys", "yzp"], ["y"])]
    g = helper.make_graph(nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3, n])], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("wtype,block", [("int4", 16), ("uint4", 16), ("int8", 16), ("int4", 0), ("uint4", 0)])
def test_blocked_and_int4_weights_with_quantized_activation(wtype, block):
    model = _matmul_model(wtype, block, quantized_act=True)
    x = np.random.default_rng(8).standard_normal((2, 3, 40)).astype(np.float32)
    ops = _check(model, {"x": x}, 0.04)
    assert ops["jaxinfer::QLinearMatMulInt"] == 1 and "MatMul" not in ops, ops


@pytest.mark.parametrize("wtype,block", [("int4", 16), ("uint4", 32), ("int8", 16), ("int4", 0)])
def test_blocked_and_int4_weights_with_float_activation_stay_packed(wtype, block):
    model = _matmul_model(wtype, block, quantized_act=False)
    x = np.random.default_rng(9).standard_normal((2, 3, 40)).astype(np.float32)
    ops = _check(model, {"x": x}, None)
    assert ops == {"jaxinfer::DequantMatMul": 1}, ops
    m = jaxinfer.load(model)
    assert str(np.dtype(m.params["wq"].dtype)) == wtype, "the weight stays packed in params"


@pytest.mark.parametrize("same", [True, False])
@pytest.mark.parametrize("op", ["Transpose", "Reshape", "Gather"])
def test_data_movement_between_equal_qdq_runs_on_integers(op, same):
    """onnxruntime's quantizer gives Reshape/Transpose/... the same parameters on both sides: then
    Q(op(DQ(q))) is op(q) exactly; with other parameters the requantization stays."""
    params = _qparams(0.05, 128, 0.05, 128) if same else _qparams(0.05, 128, 0.07, 120)
    extra, node, shape = [], None, ["N", 4, 6, 6]
    if op == "Transpose":
        node, shape = helper.make_node("Transpose", ["xd"], ["yf"], perm=[0, 2, 3, 1]), ["N", 6, 6, 4]
    elif op == "Reshape":
        extra = [numpy_helper.from_array(np.array([0, 4, 36], np.int64), "shape")]
        node, shape = helper.make_node("Reshape", ["xd", "shape"], ["yf"]), ["N", 4, 36]
    else:
        extra = [numpy_helper.from_array(np.array([3, 0, 0], np.int64), "idx")]
        node, shape = helper.make_node("Gather", ["xd", "idx"], ["yf"], axis=1), ["N", 3, 6, 6]
    model = _qdq_model([node], params + extra, shape)
    x = (np.random.default_rng(5).standard_normal((2, 4, 6, 6)) * 3).astype(np.float32)
    ops = _check(model, {"x": x}, 0.05 if same else 0.07)
    assert ops["DequantizeLinear"] == (1 if same else 2), ops  # y's (and the op's input's)
