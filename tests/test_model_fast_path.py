"""Model.run's validated-layout fast path: same answers, same checks, same compile accounting."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from onnx import TensorProto, helper

import jaxinfer
from jaxinfer import InputError


def add_model():
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])], "add",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n", 3])],
    )
    return jaxinfer.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_repeat_calls_hit_the_cache_without_recompiling():
    m = add_model()
    a, b = np.ones((2, 3), np.float32), np.full((2, 3), 2, np.float32)
    for i in range(3):
        np.testing.assert_array_equal(m.run({"a": a + i, "b": b})["c"], a + i + b)
    np.testing.assert_array_equal(m.run({"b": b, "a": a})["c"], a + b)  # another key order, same executable
    assert m.stats.compiles == 1 and m.stats.traces == 1
    assert m.stats.cache_hits >= 2


@pytest.mark.parametrize("feeds, message", [
    ({"a": np.ones((2, 3), np.float64), "b": np.ones((2, 3), np.float32)}, "expected dtype float32"),
    ({"a": np.ones((2, 3), np.float32), "b": np.ones((4, 3), np.float32)}, "symbolic dims"),
    ({"a": np.ones((2, 3), np.float32)}, "missing input"),
    ({"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32), "z": np.ones(1)}, "unknown input"),
])
def test_checks_still_apply_after_a_layout_was_cached(feeds, message):
    m = add_model()
    m.run({"a": np.ones((2, 3), np.float32), "b": np.ones((2, 3), np.float32)})
    with pytest.raises(InputError, match=message):
        m.run(feeds)


def test_other_value_types_take_the_checked_path():
    m = add_model()
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    want = a + a
    np.testing.assert_array_equal(m.run({"a": a, "b": a})["c"], want)
    np.testing.assert_array_equal(m.run({"a": a.tolist(), "b": a})["c"], want)
    np.testing.assert_array_equal(m.run({"a": jax.numpy.asarray(a), "b": a})["c"], want)
    assert m.stats.compiles == 1
    assert isinstance(m.run_device({"a": a, "b": a})["c"], jax.Array)
