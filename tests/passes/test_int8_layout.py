"""passes.layout.int8_weights_rows_first: 8-bit [K, N] matmul weights stored [N, K] at load, outputs
unchanged: bit for bit against the graph without the pass and against int64 numpy.

(Not against onnxruntime for MatMulInteger with full-range weights: its AVX2 u8 x s8 kernel saturates
pairs of products in int16 -- on this machine it answered -3180 where the exact sum is 8167.)"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
import jaxinfer.passes
from jaxinfer.converters.onnx.reader import read_model
from jaxinfer.passes import DEFAULT_PASSES, int8_weights_rows_first, optimize
from jaxinfer.passes.layout import NK_SUFFIX, source_weight_name

from .test_qdq import _ort, _output_scale, _within_lsb

RNG = np.random.default_rng(11)


def _matmul_integer(k: int, n: int, wtype: np.dtype, bzp: np.ndarray | None, b_const: bool = True) -> onnx.ModelProto:
    w = RNG.integers(np.iinfo(wtype).min, np.iinfo(wtype).max + 1, (k, n)).astype(wtype)
    elem = TensorProto.INT8 if wtype == np.int8 else TensorProto.UINT8
    ins = [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k]),
           helper.make_tensor_value_info("a_zp", TensorProto.UINT8, [])]
    inits = []
    if b_const:
        inits.append(numpy_helper.from_array(w, "w"))
    else:
        ins.append(helper.make_tensor_value_info("w", elem, [k, n]))
    node_ins = ["a", "w", "a_zp"]
    if bzp is not None:
        inits.append(numpy_helper.from_array(bzp.astype(wtype), "w_zp"))
        node_ins.append("w_zp")
    g = helper.make_graph([helper.make_node("MatMulInteger", node_ins, ["y"], name="mm")], "g", ins,
                          [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _without_pass(monkeypatch, model: onnx.ModelProto) -> jaxinfer.Model:
    with monkeypatch.context() as mp:
        mp.setattr(jaxinfer.passes, "DEFAULT_PASSES",
                   tuple(p for p in DEFAULT_PASSES if p is not int8_weights_rows_first))
        return jaxinfer.load(model)


@pytest.mark.parametrize("wtype", [np.int8, np.uint8])
@pytest.mark.parametrize("zp", ["none", "tensor", "column"])
@pytest.mark.parametrize("rows", [1, 8, 100])
def test_matmul_integer_weights_stored_nk(monkeypatch, wtype, zp, rows):
    k, n = 70, 24
    bzp = {"none": None, "tensor": np.array(3), "column": RNG.integers(0, 9, n)}[zp]
    model = _matmul_integer(k, n, wtype, bzp)
    m = jaxinfer.load(model)
    node = next(nd for nd in m.graph.nodes if "MatMulInteger" in nd.op_type)
    assert (node.op_type, node.domain) == ("MatMulIntegerNK", "jaxinfer")
    w_name = node.inputs[1]
    assert w_name.endswith(NK_SUFFIX) and source_weight_name(w_name) == "w"
    assert m.graph.initializers[w_name].shape == (n, k) and "w" not in m.graph.initializers
    feeds = {"a": RNG.integers(0, 256, (rows, k)).astype(np.uint8), "a_zp": np.array(128, np.uint8)}
    got = m.run(feeds)["y"]
    w = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == "w")).astype(np.int64)
    wz = 0 if bzp is None else bzp.astype(np.int64)
    np.testing.assert_array_equal(got, (feeds["a"].astype(np.int64) - 128) @ (w - wz))
    plain = _without_pass(monkeypatch, model)
    assert any(nd.op_type == "MatMulInteger" for nd in plain.graph.nodes)
    np.testing.assert_array_equal(got, plain.run(feeds)["y"])


def test_weight_fed_at_run_time_is_left_alone():
    model = _matmul_integer(16, 4, np.int8, None, b_const=False)
    g = optimize(read_model(model))
    assert [nd.op_type for nd in g.nodes] == ["MatMulInteger"]


def test_qdq_matmul_takes_trans_b(monkeypatch):
    quantization = pytest.importorskip("onnxruntime.quantization")
    k, n = 48, 20
    w = RNG.standard_normal((k, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])],
                          [numpy_helper.from_array(w, "w")])
    f32 = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    class Reader(quantization.CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": RNG.standard_normal((4, k)).astype(np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.items, None)

    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d) / "f.onnx", Path(d) / "q.onnx"
        onnx.save(f32, src)
        quantization.quantize_static(str(src), str(dst), Reader(), quant_format=quantization.QuantFormat.QDQ,
                                     weight_type=quantization.QuantType.QInt8, per_channel=True)
        q = onnx.load(dst)
    m = jaxinfer.load(q)
    node = next(nd for nd in m.graph.nodes if nd.op_type == "QLinearMatMulInt")
    assert node.attrs["trans_b"] == 1 and node.inputs[3].endswith(NK_SUFFIX)
    x = RNG.standard_normal((4, k)).astype(np.float32)
    plain = _without_pass(monkeypatch, q)
    assert next(nd for nd in plain.graph.nodes if nd.op_type == "QLinearMatMulInt").attrs["trans_b"] == 0
    np.testing.assert_array_equal(m.run({"x": x})["y"], plain.run({"x": x})["y"])
    # onnxruntime's unoptimized session: the QDQ reference semantics (its fused u8 x s8 kernel saturates)
    ref = _ort(q, {"x": x}, optimized=False)
    assert _within_lsb(m.run({"x": x})["y"], ref, _output_scale(q)) >= 0.99


def _qlinear_matmul(k: int, n: int, wtype: np.dtype, per_column: bool, a_scale_shape: tuple[int, ...] = ()) -> onnx.ModelProto:
    info = np.iinfo(wtype)
    w = RNG.integers(info.min, info.max + 1, (k, n)).astype(wtype)
    shape = (n,) if per_column else ()
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.full(a_scale_shape, 0.02, np.float32), "a_s"),
             numpy_helper.from_array(np.full(a_scale_shape, 131, np.uint8), "a_zp"),
             numpy_helper.from_array((RNG.random(shape) * 0.01 + 0.001).astype(np.float32), "w_s"),
             numpy_helper.from_array(RNG.integers(0, 9, shape).astype(wtype), "w_zp"),
             numpy_helper.from_array(np.array(0.35, np.float32), "y_s"),
             numpy_helper.from_array(np.array(120, np.uint8), "y_zp")]
    node = helper.make_node("QLinearMatMul", ["a", "a_s", "a_zp", "w", "w_s", "w_zp", "y_s", "y_zp"], ["y"], name="qmm")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.UINT8, ["m", k])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, ["m", n])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 21)])


@pytest.mark.parametrize("wtype", [np.int8, np.uint8])
@pytest.mark.parametrize("per_column", [False, True])
@pytest.mark.parametrize("rows", [1, 100])
def test_qlinear_matmul_with_a_constant_weight_becomes_the_nk_integer_matmul(monkeypatch, wtype, per_column, rows):
    k, n = 70, 24
    model = _qlinear_matmul(k, n, wtype, per_column)
    m = jaxinfer.load(model)
    node = next(nd for nd in m.graph.nodes if "QLinearMatMul" in nd.op_type)
    assert (node.op_type, node.domain, node.attrs["trans_b"]) == ("QLinearMatMulInt", "jaxinfer", 1)
    assert node.inputs[3].endswith(NK_SUFFIX) and m.graph.initializers[node.inputs[3]].shape == (n, k)
    feeds = {"a": RNG.integers(0, 256, (rows, k)).astype(np.uint8)}
    got = m.run(feeds)["y"]
    plain = _without_pass(monkeypatch, model)
    assert any(nd.op_type == "QLinearMatMul" for nd in plain.graph.nodes)
    np.testing.assert_array_equal(got, plain.run(feeds)["y"])
    ref = _ort(model, feeds, optimized=False)
    assert np.abs(got.astype(np.int32) - ref.astype(np.int32)).max() <= 1


def test_qlinear_matmul_with_a_per_row_scale_is_left_alone():
    g = optimize(read_model(_qlinear_matmul(16, 4, np.int8, False, a_scale_shape=(3,))))
    assert [(nd.op_type, nd.domain) for nd in g.nodes] == [("QLinearMatMul", "")]
