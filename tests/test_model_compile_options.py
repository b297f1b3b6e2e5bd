"""Model's XLA CPU options: a dense chain feeding a softmax must not become one YNNPACK fusion.

XLA CPU's default YNNPACK fusion merged AlexNet's fc6 -> fc7 -> fc8 -> softmax into
one library fusion that ran ~200x slower than the dots one by one. Model compiles
with each dot offloaded on its own and convolutions left to XLA (jaxinfer.model.YNN_FUSION_TYPES);
this checks the optimized HLO of a chain large enough to trigger the merge.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer.model import YNN_FUSION_FLAG

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA CPU fusion options")


def dense_chain(dims=(1024, 1024, 1024, 1000)):
    return jaxinfer.load(_chain_proto(dims))


def _chain_proto(dims):
    rng = np.random.default_rng(0)
    inits, nodes, x = [], [], "x"
    for i in range(len(dims) - 1):
        inits += [numpy_helper.from_array((rng.standard_normal((dims[i + 1], dims[i])) * 0.03).astype(np.float32),
                                          f"w{i}"),
                  numpy_helper.from_array(rng.standard_normal(dims[i + 1]).astype(np.float32), f"b{i}")]
        nodes.append(helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
        nodes.append(helper.make_node("Relu", [f"g{i}"], [f"r{i}"]))
        x = f"r{i}"
    nodes.append(helper.make_node("Softmax", [x], ["y"], axis=-1))
    graph = helper.make_graph(nodes, "fc", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dims[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", dims[-1]])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def dots_per_library_fusion(hlo: str) -> list[int]:
    """For each YNNPACK fusion in an optimized HLO module, how many dots its computation holds."""
    bodies: dict[str, list[str]] = {}
    name = None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if head:
            name = head.group(1)
            bodies[name] = []
        elif line.startswith("}"):
            name = None
        elif name:
            bodies[name].append(line)
    calls = [re.search(r"calls=%([\w.\-]+)", ln).group(1)
             for body in bodies.values() for ln in body if "__ynn_fusion" in ln]
    return [sum(" dot(" in ln for ln in bodies[c]) for c in calls]


def test_each_dense_layer_is_its_own_library_call():
    m = dense_chain()
    assert YNN_FUSION_FLAG in m.compiler_options
    feeds = {"x": np.ones((128, 1024), np.float32)}  # many rows: the library's dots (jaxinfer.xla_dots)
    counts = dots_per_library_fusion(m.compiled(m._check_inputs(feeds)).as_text())
    assert counts and max(counts) <= 1, counts
    out = m.run(feeds)["y"]
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, rtol=1e-5)


def test_compiler_options_can_be_cleared_before_the_first_run():
    m = dense_chain((16, 8, 4))
    m.compiler_options = {}
    assert m.run({"x": np.ones((2, 16), np.float32)})["y"].shape == (2, 4)


def test_tune_keeps_the_fastest_option_set_per_shape_and_answers_the_same():
    from jaxinfer.model import TUNE_CANDIDATES

    plain = dense_chain((256, 256, 10))
    tuned = jaxinfer.load(_chain_proto((256, 256, 10)), tune=True)
    assert tuned.tune and not plain.tune
    for rows in (1, 8):
        x = {"x": np.random.default_rng(rows).standard_normal((rows, 256)).astype(np.float32)}
        np.testing.assert_allclose(tuned.run(x)["y"], plain.run(x)["y"], rtol=1e-5, atol=1e-6)
    assert len(tuned.stats.tuned) == 2 and set(tuned.stats.tuned.values()) <= set(TUNE_CANDIDATES)
    assert tuned.stats.compiles == 2  # one executable kept per shape


@pytest.mark.parametrize("candidate", ["none", "dot+conv", "dot+eltwise"])
def test_each_tune_candidate_compiles_and_answers_like_the_default(candidate):
    """Every option set Model.tune may keep compiles on this XLA build and gives the default's answers
    (``dot+eltwise`` moves the Gemm's bias, Relu and the softmax's exp into the library)."""
    from jaxinfer.model import TUNE_CANDIDATES

    default = dense_chain((64, 256, 10))
    other = dense_chain((64, 256, 10))
    other.compiler_options = dict(TUNE_CANDIDATES[candidate])
    x = {"x": np.random.default_rng(3).standard_normal((32, 64)).astype(np.float32)}
    np.testing.assert_allclose(other.run(x)["y"], default.run(x)["y"], rtol=1e-5, atol=1e-6)
    if candidate == "dot+eltwise":
        assert "__ynn_fusion" in other.compiled(other._check_inputs(x)).as_text()
