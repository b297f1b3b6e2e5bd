"""passes.layout.int8_conv_weights_ohwi: constant 8-bit 2-D weights of ungrouped QLinearConv and of the QDQ
rewrite's QLinearConvInt stored OHWI at load (no transpose copy per call), outputs unchanged: bit for bit
against the graph without the pass, and within 1 LSB of onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
import jaxinfer.passes
from jaxinfer.passes import DEFAULT_PASSES, int8_conv_weights_ohwi
from jaxinfer.passes.layout import OHWI_SUFFIX, source_weight_name

from .test_qdq import _ort, _within_lsb

RNG = np.random.default_rng(23)
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "onnx"


def _qlinear_conv(wtype, per_channel: bool, group: int = 1, strides=(1, 1), pads=(1, 1, 1, 1)) -> onnx.ModelProto:
    cin, cout, k = 4, 6, 3
    w = RNG.integers(np.iinfo(wtype).min, np.iinfo(wtype).max + 1, (cout, cin // group, k, k)).astype(wtype)
    w_scale = (RNG.uniform(0.002, 0.01, cout) if per_channel else np.array(0.005)).astype(np.float32)
    w_zp = np.zeros(cout if per_channel else (), wtype) if wtype == np.int8 else \
        np.full(cout if per_channel else (), 120, wtype)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(w_zp, "w_zp"),
             numpy_helper.from_array(np.array(0.04, np.float32), "x_scale"),
             numpy_helper.from_array(np.array(128, np.uint8), "x_zp"),
             numpy_helper.from_array(np.array(0.2, np.float32), "y_scale"),
             numpy_helper.from_array(np.array(100, np.uint8), "y_zp"),
             numpy_helper.from_array(RNG.integers(-2000, 2000, cout).astype(np.int32), "b")]
    node = helper.make_node("QLinearConv", ["x", "x_scale", "x_zp", "w", "w_scale", "w_zp", "y_scale", "y_zp", "b"],
                            ["y"], group=group, strides=list(strides), pads=list(pads), kernel_shape=[k, k])
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["n", cin, 9, 9])],
                          [helper.make_tensor_value_info("y", TensorProto.UINT8, None)], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])


def _without_pass(monkeypatch, model) -> jaxinfer.Model:
    with monkeypatch.context() as mp:
        mp.setattr(jaxinfer.passes, "DEFAULT_PASSES",
                   tuple(p for p in DEFAULT_PASSES if p is not int8_conv_weights_ohwi))
        return jaxinfer.load(model)


@pytest.mark.parametrize("wtype", [np.int8, np.uint8])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("strides,pads", [((1, 1), (1, 1, 1, 1)), ((2, 2), (0, 1, 0, 1))])
def test_qlinear_conv_weight_stored_ohwi(monkeypatch, wtype, per_channel, strides, pads):
    model = _qlinear_conv(wtype, per_channel, strides=strides, pads=pads)
    m = jaxinfer.load(model)
    node = next(nd for nd in m.graph.nodes if nd.op_type == "QLinearConv")
    assert node.domain == "jaxinfer" and node.attrs["w_layout"] == "OHWI"
    assert node.inputs[3].endswith(OHWI_SUFFIX) and source_weight_name(node.inputs[3]) == "w"
    assert m.graph.initializers[node.inputs[3]].shape == (6, 3, 3, 4)
    plain = _without_pass(monkeypatch, model)
    assert next(nd for nd in plain.graph.nodes if nd.op_type == "QLinearConv").domain in ("", "ai.onnx")
    for batch in (1, 3):
        x = RNG.integers(0, 256, (batch, 4, 9, 9)).astype(np.uint8)
        got = m.run({"x": x})["y"]
        np.testing.assert_array_equal(got, plain.run({"x": x})["y"])
        assert _within_lsb(got, _ort(model, {"x": x}, optimized=False), 1.0) >= 0.99


def test_grouped_conv_is_left_alone():
    m = jaxinfer.load(_qlinear_conv(np.int8, True, group=2))
    node = next(nd for nd in m.graph.nodes if nd.op_type == "QLinearConv")
    assert node.domain in ("", "ai.onnx") and "w_layout" not in node.attrs


@pytest.mark.parametrize("name", ["cnn_qdq", "cnn_qoperator"])
def test_quantized_cnn_fixtures_unchanged(monkeypatch, name):
    """The committed quantize_static CNNs (QDQ: QLinearConvInt; QOperator: QLinearConv) answer bit for bit as
    without the pass, with every conv weight OHWI."""
    model = onnx.load(FIXTURES / f"{name}.onnx")
    m, plain = jaxinfer.load(model), _without_pass(monkeypatch, model)
    convs = [nd for nd in m.graph.nodes if nd.op_type in ("QLinearConv", "QLinearConvInt")]
    assert convs and all(nd.attrs.get("w_layout") == "OHWI" for nd in convs)
    for batch in (1, 4):
        x = RNG.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got, want = m.run({"x": x}), plain.run({"x": x})
        for k in want:
            np.testing.assert_array_equal(got[k], want[k])
