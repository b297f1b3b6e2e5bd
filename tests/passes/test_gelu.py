"""passes.fuse_gelu: an exporter's erf GELU chain after a product (and the bias Add between them) becomes one
jaxinfer::Gelu; every operand order and both spellings of the 1/sqrt(2) scale; what it must leave alone, it
leaves; outputs match onnxruntime's."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from jaxinfer import cpu_kernels
from jaxinfer.converters.onnx import REGISTRY, read_model
from jaxinfer.model import Model
from jaxinfer.passes import optimize, pipeline

RNG = np.random.default_rng(11)
F = np.float32


def _proto(gelu_nodes, extra_inits=None, outputs=("y",), bias=True) -> onnx.ModelProto:
    """x [n, 4, 16] @ w [16, 32] (+ b) -> h, then ``gelu_nodes`` reading h and writing y."""
    inits = {"w": RNG.standard_normal((16, 32)).astype(F), "b": RNG.standard_normal(32).astype(F),
             "sqrt2": np.array(math.sqrt(2), F), "inv": np.array(1 / math.sqrt(2), F), "one": np.array(1, F),
             "half": np.array(0.5, F), **(extra_inits or {})}
    head = [helper.make_node("MatMul", ["x", "w"], ["t" if bias else "h"])]
    if bias:
        head.append(helper.make_node("Add", ["t", "b"], ["h"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 16])
    graph = helper.make_graph(head + gelu_nodes, "g", [x],
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _chain(scale="Div", half_first=False, swap=False) -> list:
    n = helper.make_node
    s = n("Div", ["h", "sqrt2"], ["d"]) if scale == "Div" else n("Mul", ["inv", "h"] if swap else ["h", "inv"], ["d"])
    nodes = [s, n("Erf", ["d"], ["e"]), n("Add", ["one", "e"] if swap else ["e", "one"], ["a"])]
    if half_first:
        return nodes + [n("Mul", ["h", "half"], ["hh"]), n("Mul", ["a", "hh"] if swap else ["hh", "a"], ["y"])]
    return nodes + [n("Mul", ["a", "h"] if swap else ["h", "a"], ["m"]),
                    n("Mul", ["half", "m"] if swap else ["m", "half"], ["y"])]


def _tanh_chain(half_first=False, swap=False) -> list:
    """0.5 h (1 + Tanh(sqrt(2 / pi) (h + 0.044715 h^3))) as the dynamo exporter writes it (GPT-2's gelu_new)."""
    n = helper.make_node
    nodes = [n("Pow", ["h", "three"], ["p"]), n("Mul", ["c", "p"] if swap else ["p", "c"], ["q"]),
             n("Add", ["q", "h"] if swap else ["h", "q"], ["s"]), n("Mul", ["k", "s"] if swap else ["s", "k"], ["z"]),
             n("Tanh", ["z"], ["th"]), n("Add", ["one", "th"] if swap else ["th", "one"], ["a"])]
    if half_first:
        return [n("Mul", ["h", "half"], ["hh"])] + nodes + [n("Mul", ["a", "hh"] if swap else ["hh", "a"], ["y"])]
    return nodes + [n("Mul", ["h", "a"], ["m"]), n("Mul", ["m", "half"], ["y"])]


TANH_INITS = {"three": np.array(3, F), "c": np.array(0.044715, F), "k": np.array(math.sqrt(2 / math.pi), F)}


def _ops(proto):
    g = optimize(read_model(proto), pipeline(REGISTRY))
    return g, [f"{n.domain}::{n.op_type}" if n.domain else n.op_type for n in g.nodes]


def _check(proto, graph):
    x = (RNG.standard_normal((3, 4, 16)) * 2).astype(F)
    ort.set_default_logger_severity(3)
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = Model(graph, REGISTRY).run({"x": x})
    for name, w in zip([o.name for o in proto.graph.output], want):
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", ["Div", "Mul"])
@pytest.mark.parametrize("half_first", [False, True])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_the_chain_becomes_one_gelu(scale, half_first, swap, bias):
    proto = _proto(_chain(scale, half_first, swap), bias=bias)
    graph, ops = _ops(proto)
    assert ops == ["MatMul", "jaxinfer::Gelu"]
    assert len(graph.nodes[1].inputs) == (2 if bias else 1)  # the bias Add joins
    _check(proto, graph)


@pytest.mark.skipif(not (cpu_kernels.available() and cpu_kernels.isa() == 2), reason="the kernel needs AVX-512")
def test_the_fused_gelu_is_one_kernel_call():
    graph, _ = _ops(_proto(_chain()))
    hlo = Model(graph, REGISTRY).compiled({"x": np.zeros((2, 4, 16), F)}).as_text()
    entry = hlo.split("ENTRY")[1]
    assert entry.count(cpu_kernels.TARGET_GELU) == 1 and "erf" not in hlo


@pytest.mark.parametrize("nodes, inits, outputs, left", [
    # a scale that is not 1/sqrt(2), an Add of 2, a final 0.25: not a GELU
    ([helper.make_node("Div", ["h", "two"], ["d"])] + _chain()[1:], {"two": np.array(2, F)}, ("y",), None),
    (_chain()[:2] + [helper.make_node("Add", ["e", "two"], ["a"])] + _chain()[3:], {"two": np.array(2, F)}, ("y",),
     None),
    (_chain()[:4] + [helper.make_node("Mul", ["m", "q"], ["y"])], {"q": np.array(0.25, F)}, ("y",), None),
    # an inner value read elsewhere (a graph output): the chain stays
    (_chain(), {}, ("y", "e"), None),
])
def test_what_the_pass_leaves_alone(nodes, inits, outputs, left):
    proto = _proto(nodes, inits, outputs)
    graph, ops = _ops(proto)
    assert "jaxinfer::Gelu" not in ops and "Erf" in ops
    _check(proto, graph)


def test_x_read_elsewhere_keeps_its_bias_add():
    proto = _proto(_chain() + [helper.make_node("Neg", ["h"], ["z"])], outputs=("y", "z"))
    graph, ops = _ops(proto)
    assert ops == ["MatMul", "Add", "jaxinfer::Gelu", "Neg"] and len(graph.nodes[2].inputs) == 1
    _check(proto, graph)


def test_after_an_elementwise_op_xla_keeps_the_chain():
    """The GELU's input made by a Mul (a dynamic-quantized product's dequantization): XLA's one loop takes both."""
    n = helper.make_node
    nodes = [n("Mul", ["t", "half"], ["h"])] + _chain()
    proto = _proto(nodes, bias=False)
    proto.graph.node[0].output[0] = "t"
    graph, ops = _ops(proto)
    assert "jaxinfer::Gelu" not in ops
    _check(proto, graph)


def test_split_gelu_gives_the_chain_back():
    """passes.fuse.split_gelu (what sharding.moe_pattern reads): ONNX ops again, the same outputs."""
    from jaxinfer.passes.fuse import split_gelu

    proto = _proto(_chain())
    graph, _ = _ops(proto)
    split = split_gelu(graph)
    assert [n.op_type for n in split.nodes] == ["MatMul", "Add", "Div", "Erf", "Add", "Mul", "Mul"]
    assert split_gelu(split) is split
    _check(proto, split)


@pytest.mark.parametrize("half_first", [False, True])
@pytest.mark.parametrize("swap", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_the_tanh_chain_becomes_one_gelu(half_first, swap, bias):
    proto = _proto(_tanh_chain(half_first, swap), TANH_INITS, bias=bias)
    graph, ops = _ops(proto)
    assert ops == ["MatMul", "jaxinfer::Gelu"] and graph.nodes[1].attrs["approximate"] == "tanh"
    _check(proto, graph)
    from jaxinfer.passes.fuse import split_gelu
    split = split_gelu(graph)
    assert "Tanh" in [n.op_type for n in split.nodes]
    _check(proto, split)


def test_a_tanh_that_is_not_a_gelu_stays():
    nodes = _tanh_chain()
    nodes[1] = helper.make_node("Mul", ["p", "c2"], ["q"])  # 0.05 x^3: another function
    proto = _proto(nodes, {**TANH_INITS, "c2": np.array(0.05, F)})
    graph, ops = _ops(proto)
    assert "jaxinfer::Gelu" not in ops and "Tanh" in ops
    _check(proto, graph)
