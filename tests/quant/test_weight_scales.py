"""int8 weight scales searched per channel for the least squared error (calibrate.weight_int8)."""

from __future__ import annotations

import numpy as np
import pytest

import jaxinfer
from jaxinfer.quant import calibrate as cal


def _sq_err(w: np.ndarray, q, axis: int) -> np.ndarray:
    back = np.asarray(q.qvalue, np.float32) * np.asarray(q.scale)
    return ((back - w) ** 2).sum(axis=tuple(a for a in range(w.ndim) if a != axis))


def _at_max(w: np.ndarray, axis: int) -> np.ndarray:
    """The squared error per channel with the scale at the channel's largest value (the old rule)."""
    red = tuple(a for a in range(w.ndim) if a != axis)
    s = np.abs(w).max(axis=red, keepdims=True) / np.float32(127)
    back = np.clip(np.rint(w / s), -127, 127) * s
    return ((back - w) ** 2).sum(axis=red)


def test_never_worse_than_the_largest_value_and_clips_where_it_pays():
    """Every channel's error is at most the old rule's (its scale at the largest value); a channel of many
    values with two a little past the rest is clipped to the rest (finer steps for all the others)."""
    rng = np.random.default_rng(0)
    w = np.concatenate([rng.standard_normal((8, 3, 3, 512)), rng.laplace(size=(8, 3, 3, 512))]).astype(np.float32)
    q = cal.weight_int8(w, (0,))
    assert q.qvalue.dtype == np.int8 and q.scale.shape == (16, 1, 1, 1)
    assert np.abs(np.asarray(q.qvalue)).max() <= 127
    got, old = _sq_err(w, q, 0), _at_max(w, 0)
    assert np.all(got <= old * (1 + 1e-6))
    bulk = rng.uniform(-1, 1, (1, 100_000)).astype(np.float32)
    bulk[0, :2] = [1.05, -1.05]
    one = cal.weight_int8(bulk, (0,))
    assert float(one.scale[0, 0]) * 127 < 1.02 and _sq_err(bulk, one, 0)[0] < 0.95 * _at_max(bulk, 0)[0]


def test_zero_channels_per_tensor_and_empty_weights():
    w = np.zeros((4, 6), np.float32)
    w[1] = np.linspace(-1, 1, 6)
    q = cal.weight_int8(w, (0,))
    np.testing.assert_array_equal(np.asarray(q.scale)[[0, 2, 3], 0], 1.0)
    np.testing.assert_array_equal(np.asarray(q.qvalue)[[0, 2, 3]], 0)
    whole = cal.weight_int8(w, ())
    assert whole.scale.shape == (1, 1)
    last = cal.weight_int8(np.ones((3, 5), np.float32), (-1,))
    assert last.scale.shape == (1, 5)
    np.testing.assert_array_equal(np.asarray(last.qvalue), 127)
    empty = cal.weight_int8(np.zeros((4, 0), np.float32), (0,))
    assert empty.qvalue.shape == (4, 0) and empty.scale.shape == (4, 1)


@pytest.mark.parametrize("method", ["int8-weight", "int8-dynamic"])
def test_quantized_models_carry_the_searched_scales(method):
    from onnx import TensorProto as TP, helper, numpy_helper as nh

    rng = np.random.default_rng(1)
    w = rng.laplace(size=(512, 8)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TP.FLOAT, [2, 512])],
                          [helper.make_tensor_value_info("y", TP.FLOAT, [2, 8])], [nh.from_array(w, "w")])
    m = jaxinfer.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    q = jaxinfer.quantize(m, method)
    p = q.params["w"]
    qa = p if method == "int8-weight" else p.w
    scale = np.asarray(qa.scale).reshape(-1)
    want = cal.weight_int8(w, (1,))
    np.testing.assert_array_equal(scale, np.asarray(want.scale).reshape(-1))


def test_several_channel_axes_in_any_order():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 5, 6)).astype(np.float32) * rng.uniform(0.1, 3, (4, 1, 6)).astype(np.float32)
    a, b = cal.weight_int8(w, (2, 0)), cal.weight_int8(w, (0, -1))
    assert a.scale.shape == (4, 1, 6)
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    for i in range(4):
        for j in range(6):
            one = cal.weight_int8(w[i, :, j][None, :], (0,))
            np.testing.assert_array_equal(np.asarray(a.scale)[i, 0, j], np.asarray(one.scale)[0, 0])
