"""passes.fuse_conv_epilogue: a float Conv's Relu/Clip and block MaxPool folded into its jaxinfer::Conv node,
which our CPU kernel runs as one call (conv_lowering.conv_epilogue) and other routes as the ops they were.
Outputs match onnxruntime and the unfused graph; what the pass must leave alone, it leaves."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from jaxinfer import conv_lowering, cpu_kernels
from jaxinfer.converters.onnx import REGISTRY, read_model
from jaxinfer.model import Model
from jaxinfer.passes import fuse_conv_epilogue, optimize, pipeline

RNG = np.random.default_rng(3)


def _model(nodes, inits, opset=17, out_shape=None, group=1) -> onnx.ModelProto:
    inits = {"w": RNG.standard_normal((8, 4 // group, 3, 3)).astype(np.float32),
             "b": RNG.standard_normal(8).astype(np.float32), **inits}
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], group=group), *nodes], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 10, 9])],
        [helper.make_tensor_value_info(name, TensorProto.INT64 if name == "i" else TensorProto.FLOAT, None)
         for name in out_shape or ["y"]],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _optimized(proto: onnx.ModelProto, fuse: bool = True):
    passes = pipeline(REGISTRY)
    return optimize(read_model(proto), passes if fuse else tuple(p for p in passes if p is not fuse_conv_epilogue))


def _ops(graph) -> list[str]:
    """Op names, a Conv with a folded epilogue as ``jaxinfer::FusedConv``."""
    return ["jaxinfer::FusedConv" if n.op_type == "Conv" and ("activation" in n.attrs or "pool" in n.attrs)
            else f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in graph.nodes]


def _run(graph, x):
    return Model(graph, REGISTRY).run({"x": x})


def _ort(proto, x):
    ort.set_default_logger_severity(3)
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


RELU_POOL = [helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]


@pytest.mark.parametrize("nodes, inits, opset, attrs", [
    (RELU_POOL, {}, 17, {"activation": [0.0, float("inf")], "pool": [2, 2]}),
    ([helper.make_node("Clip", ["c", "lo", "hi"], ["y"])],
     {"lo": np.array(-0.5, np.float32), "hi": np.array(0.75, np.float32)}, 13, {"activation": [-0.5, 0.75]}),
    ([helper.make_node("Clip", ["c", "", "hi"], ["r"]),
      helper.make_node("MaxPool", ["r"], ["y"], kernel_shape=[3, 2], strides=[3, 2], pads=[0, 0, 0, 0])],
     {"hi": np.array(6.0, np.float32)}, 13, {"activation": [-float("inf"), 6.0], "pool": [3, 2]}),
    ([helper.make_node("Clip", ["c"], ["y"], min=0.0, max=6.0)], {}, 10, {"activation": [0.0, 6.0]}),
    ([helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2], auto_pad="VALID")], {}, 17,
     {"pool": [2, 2]}),
])
def test_fused_conv_matches_onnxruntime_and_the_ops(nodes, inits, opset, attrs):
    proto = _model(nodes, inits, opset)
    fused, plain = _optimized(proto), _optimized(proto, fuse=False)
    assert _ops(fused) == ["jaxinfer::FusedConv"]
    assert {k: v for k, v in fused.nodes[0].attrs.items() if k in ("activation", "pool")} == attrs
    x = RNG.standard_normal((3, 4, 10, 9)).astype(np.float32)
    got = _run(fused, x)["y"]
    np.testing.assert_allclose(got, _ort(proto, x)["y"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _run(plain, x)["y"], rtol=1e-6, atol=1e-6)


def test_without_our_kernel_the_fused_conv_runs_as_its_ops(monkeypatch):
    proto = _model(RELU_POOL, {})
    x = RNG.standard_normal((2, 4, 10, 9)).astype(np.float32)
    x[0, 1, 3, 3] = np.nan
    monkeypatch.setattr(conv_lowering, "F32_KERNEL", False)
    want = _run(_optimized(proto, fuse=False), x)["y"]
    got = _run(_optimized(proto), x)["y"]
    np.testing.assert_array_equal(got, want)  # the same ops: bit for bit, the NaN kept by both


@pytest.mark.skipif(not (cpu_kernels.available() and cpu_kernels.isa() == 2), reason="our kernel needs AVX-512")
def test_the_fused_conv_is_one_kernel_call():
    proto = _model(RELU_POOL, {})
    model = Model(_optimized(proto), REGISTRY)
    hlo = model.compiled({"x": np.zeros((2, 4, 10, 9), np.float32)}).as_text()
    entry = hlo.split("ENTRY")[1]
    assert entry.count(cpu_kernels.TARGET_F32_CONV) == 1 and "maximum" not in entry


@pytest.mark.parametrize("nodes, inits, outputs, group, left", [
    # the Relu's output read twice, or a graph output: the Relu joins, the pool reading it does not
    (RELU_POOL + [helper.make_node("Neg", ["r"], ["z"])], {}, ["y", "z"], 1, ["jaxinfer::FusedConv", "MaxPool", "Neg"]),
    # the convolution's output read twice: nothing joins
    (RELU_POOL + [helper.make_node("Neg", ["c"], ["z"])], {}, ["y", "z"], 1,
     ["jaxinfer::Conv", "Relu", "MaxPool", "Neg"]),
    (RELU_POOL, {}, ["y", "r"], 1, ["jaxinfer::FusedConv", "MaxPool"]),
    # pools that are not blocks: overlapping, padded, ceil mode, with indices
    ([helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[3, 3], strides=[2, 2])], {}, None, 1,
     ["jaxinfer::Conv", "MaxPool"]),
    ([helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2], pads=[1, 1, 0, 0])], {}, None,
     1, ["jaxinfer::Conv", "MaxPool"]),
    ([helper.make_node("MaxPool", ["c"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)], {}, None, 1,
     ["jaxinfer::Conv", "MaxPool"]),
    ([helper.make_node("MaxPool", ["c"], ["y", "i"], kernel_shape=[2, 2], strides=[2, 2])], {}, ["y", "i"], 1,
     ["jaxinfer::Conv", "MaxPool"]),
    # a Clip whose bounds are not constants, or cross (min > max gives max: left to the ops)
    ([helper.make_node("ReduceMin", ["x"], ["x_min"], keepdims=0), helper.make_node("Clip", ["c", "x_min"], ["y"])],
     {}, None, 1, ["jaxinfer::Conv", "ReduceMin", "Clip"]),
    ([helper.make_node("Clip", ["c", "lo", "hi"], ["y"])],
     {"lo": np.array(1.0, np.float32), "hi": np.array(-1.0, np.float32)}, None, 1, ["jaxinfer::Conv", "Clip"]),
    # grouped convolutions keep their own lowering
    (RELU_POOL, {}, None, 2, ["jaxinfer::Conv", "Relu", "MaxPool"]),
])
def test_what_the_pass_leaves_alone(nodes, inits, outputs, group, left):
    proto = _model(nodes, inits, out_shape=outputs, group=group)
    fused = _optimized(proto)
    assert _ops(fused) == left
    x = RNG.standard_normal((2, 4, 10, 9)).astype(np.float32)
    got, want = _run(fused, x), _ort(proto, x)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_the_exported_cnn_fuses_each_layer():
    from pathlib import Path

    proto = onnx.load(Path(__file__).parents[1] / "fixtures" / "onnx" / "cnn.onnx")
    ops = _ops(_optimized(proto))
    assert ops.count("jaxinfer::FusedConv") == 3 and "Relu" not in ops and "MaxPool" not in ops
