"""Each graph pass on its own: what it changes, and that outputs stay the same."""

from __future__ import annotations

import jax
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jaxinfer.converters.onnx import REGISTRY, read_model
from jaxinfer.model import Model
from jaxinfer.passes import (
    counts,
    eliminate_dead_nodes,
    eliminate_identities,
    fold_conv_batchnorm,
    fuse_matmul_add,
    merge_identical_initializers,
    optimize,
    pipeline,
)

RNG = np.random.default_rng(0)


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _same_outputs(graph_a, graph_b, feeds, rtol=1e-5, atol=1e-5):
    a = Model(graph_a, REGISTRY).run(feeds)
    b = Model(graph_b, REGISTRY).run(feeds)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol)


def conv_bn_graph():
    w = RNG.standard_normal((8, 3, 3, 3)).astype(np.float32)
    inits = {
        "w": w, "b": RNG.standard_normal(8).astype(np.float32),
        "gamma": RNG.random(8).astype(np.float32) + 0.5, "beta": RNG.standard_normal(8).astype(np.float32),
        "mean": RNG.standard_normal(8).astype(np.float32), "var": RNG.random(8).astype(np.float32) + 0.1,
    }
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["bn"], epsilon=1e-3),
        helper.make_node("Relu", ["bn"], ["y"]),
    ]
    return read_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
                             [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits))


def test_conv_batchnorm_folds_into_conv_weights():
    g = conv_bn_graph()
    folded = fold_conv_batchnorm(g)
    assert [n.op_type for n in folded.nodes] == ["Conv", "Relu"]
    assert "gamma" not in folded.initializers
    _same_outputs(g, folded, {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}, rtol=1e-4, atol=1e-4)


def test_conv_feeding_two_consumers_is_not_folded():
    g = conv_bn_graph()
    extra = helper.make_node("Neg", ["c"], ["z"])
    from jaxinfer.converters.onnx.reader import read_graph  # noqa: F401
    from jaxinfer.graph import Node, ValueInfo

    g2 = g.replace(nodes=g.nodes + (Node("Neg", ("c",), ("z",)),), outputs=g.outputs + (ValueInfo("z"),))
    assert extra is not None
    assert [n.op_type for n in fold_conv_batchnorm(g2).nodes] == [n.op_type for n in g2.nodes]


def test_matmul_add_becomes_gemm():
    inits = {"w": RNG.standard_normal((4, 5)).astype(np.float32), "b": RNG.standard_normal(5).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    g = read_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits))
    fused = fuse_matmul_add(g)
    assert [n.op_type for n in fused.nodes] == ["Gemm"]
    _same_outputs(g, fused, {"x": RNG.standard_normal((3, 4)).astype(np.float32)})


def test_matmul_add_on_3d_input_is_left_alone():
    inits = {"w": RNG.standard_normal((4, 5)).astype(np.float32), "b": RNG.standard_normal(5).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    g = read_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits))
    assert [n.op_type for n in fuse_matmul_add(g).nodes] == ["MatMul", "Add"]


def test_identities_and_dead_nodes_are_removed():
    nodes = [
        helper.make_node("Identity", ["x"], ["i1"]),
        helper.make_node("Relu", ["i1"], ["r"]),
        helper.make_node("Neg", ["x"], ["unused"]),
        helper.make_node("Identity", ["r"], ["y"]),
    ]
    g = read_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])], {}))
    g2 = eliminate_dead_nodes(eliminate_identities(g))
    assert [n.op_type for n in g2.nodes] == ["Relu", "Identity"]  # the output-producing Identity stays
    _same_outputs(g, g2, {"x": np.array([-1.0, 0.0, 2.0], np.float32)})


def test_identical_initializers_are_shared():
    w = RNG.standard_normal((3, 3)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["y"])]
    g = read_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], {"w1": w, "w2": w.copy()}))
    g2 = merge_identical_initializers(g)
    assert list(g2.initializers) == ["w1"]
    assert counts(g2)["params_bytes"] == w.nbytes
    _same_outputs(g, g2, {"x": RNG.standard_normal((1, 3)).astype(np.float32)})


def test_optimize_keeps_light_resnet_outputs():
    """The optimized ResNet-50 matches onnxruntime on its logits (r174, ~1e19 with the stand-in weights)."""
    import onnxruntime as ort

    from jaxinfer.bench import dummy_inputs, light_models
    from jaxinfer.graph import ValueInfo

    path = next(p for p in light_models() if "resnet50" in p.name)
    g = read_model(path)
    g = g.replace(outputs=g.outputs + (ValueInfo("r174"),))
    g2 = optimize(g, pipeline(REGISTRY))
    assert counts(g2)["nodes"] < 140  # 53 BatchNormalizations and 239 ConstantOfShapes folded away
    m2 = Model(g2, REGISTRY)
    feeds = dummy_inputs(m2.inputs)
    proto = onnx.load(path)
    proto.graph.output.append(helper.make_empty_tensor_value_info("r174"))
    ort.set_default_logger_severity(3)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(["r174"], feeds)[0]
    np.testing.assert_allclose(m2.run(feeds)["r174"], want, rtol=1e-4)


def test_conv_weights_are_stored_spatial_first(monkeypatch):
    from jaxinfer import conv_lowering, cpu_kernels
    from jaxinfer.passes import conv_weights_spatial_first

    g = conv_bn_graph()
    g2 = conv_weights_spatial_first(g)
    conv = next(n for n in g2.nodes if n.op_type == "Conv")
    assert conv.domain == "jaxinfer" and g2.initializers[conv.inputs[1]].shape == (3, 3, 3, 8)
    assert "w" not in g2.initializers
    _same_outputs(g, g2, {"x": RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)}, rtol=1e-4, atol=1e-4)
    feeds = {"x": np.zeros((2, 3, 8, 8), np.float32)}

    def program(graph) -> str:
        model = Model(graph, REGISTRY)
        return model.compiled(model._check_inputs(feeds)).as_text()

    def weight_relayouts(graph):  # transposes producing an OIHW->HWIO [3,3,3,8] kernel on every call
        return program(graph).count("f32[3,3,3,8]{1,0,2,3} transpose(")

    if jax.default_backend() == "cpu":  # the transposes XLA CPU leaves in the program
        if cpu_kernels.isa() == 2:  # our float32 kernel reads the HWIO weight as it is
            text = program(g2)
            assert cpu_kernels.TARGET_F32_CONV in text and "f32[8,3,3,3]" not in text and "f32[8,27]" not in text
        monkeypatch.setattr(conv_lowering, "F32_KERNEL", False)  # XLA's convolution
        assert weight_relayouts(g) == 1 and weight_relayouts(g2) == 0


def test_constant_of_shape_weights_fold_to_numpy_at_load():
    """Exporters build weights with ConstantOfShape; folding fills them with numpy (no JAX program per shape)."""
    from jaxinfer.passes.constant_fold import fold_constants

    fill = numpy_helper.from_array(np.array([0.25], np.float32), "value")
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["w"], value=fill),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    g = read_model(_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          {"shape": np.array([3, 4], np.int64)}))
    folded = fold_constants(g, REGISTRY)
    assert [n.op_type for n in folded.nodes] == ["MatMul"]
    w = folded.initializers["w"]
    assert type(w) is np.ndarray and w.dtype == np.float32 and w.shape == (3, 4) and np.all(w == 0.25)
    x = RNG.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(Model(folded, REGISTRY).run({"x": x})["y"], x @ w, rtol=1e-6)
    _same_outputs(g, folded, {"x": x})


def test_pools_after_costly_ops_run_as_one_reduce_window():
    """LRN -> MaxPool / AveragePool become jaxinfer:: pools (one reduce-window); Relu -> MaxPool stays taps."""
    from jaxinfer.passes import pools_after_costly_ops

    nodes = [helper.make_node("LRN", ["x"], ["l"], size=3),
             helper.make_node("MaxPool", ["l"], ["m"], kernel_shape=[3, 3], strides=[2, 2]),
             helper.make_node("AveragePool", ["l"], ["a"], kernel_shape=[2, 2], pads=[0, 0, 1, 1]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[3, 3], strides=[2, 2])]
    vi = helper.make_tensor_value_info
    proto = _model(nodes, [vi("x", TensorProto.FLOAT, [2, 4, 9, 9])],
                   [vi(o, TensorProto.FLOAT, None) for o in ("m", "a", "p")], {})
    g = read_model(proto)
    g2 = pools_after_costly_ops(g)
    domains = {n.outputs[0]: n.domain for n in g2.nodes}
    assert domains["m"] == domains["a"] == "jaxinfer" and domains["p"] == ""
    feeds = {"x": RNG.standard_normal((2, 4, 9, 9)).astype(np.float32)}
    _same_outputs(g, g2, feeds)

    def reduce_windows(graph):
        model = Model(graph, REGISTRY)
        return model.compiled(model._check_inputs(feeds)).as_text().count("reduce-window(")

    assert reduce_windows(g2) == reduce_windows(g) + 2  # the two marked pools; unmarked pools are slices


def test_pools_after_requantizing_convolutions_run_as_one_reduce_window():
    """QLinearConv -> MaxPool (QOperator) and the QDQ rewrite's QLinearConvInt -> MaxPool: the rescale is
    stored once, not recomputed in every tap; same uint8 outputs."""
    from jaxinfer import load
    from jaxinfer.passes import pools_after_costly_ops

    rng = np.random.default_rng(4)
    init = {"xs": np.float32(0.05), "xz": np.uint8(120), "w": rng.integers(0, 256, (8, 3, 3, 3)).astype(np.uint8),
            "ws": np.float32(0.01), "wz": np.uint8(128), "ys": np.float32(0.2), "yz": np.uint8(3)}
    nodes = [helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2])]
    vi = helper.make_tensor_value_info
    proto = _model(nodes, [vi("x", TensorProto.UINT8, [1, 3, 8, 8])], [vi("p", TensorProto.UINT8, None)], init)
    g = read_model(proto)
    g2 = pools_after_costly_ops(g)
    assert {n.outputs[0]: n.domain for n in g2.nodes}["p"] == "jaxinfer"
    _same_outputs(g, g2, {"x": rng.integers(0, 256, (1, 3, 8, 8)).astype(np.uint8)}, rtol=0, atol=0)
    assert load(proto).graph.nodes[-1].domain == "jaxinfer"  # in the default passes, after the QDQ rewrite
