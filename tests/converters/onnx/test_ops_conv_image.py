"""Focused checks of the convolution, pooling and image ops where the backend suite is thin.

Each graph is one node built with ``onnx.helper``; inputs named in ``consts`` become
initializers (shapes, scales, sizes). Results are compared with onnxruntime.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from jaxinfer.converters.onnx import load_onnx

RNG = np.random.default_rng(0)


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _model(op: str, feeds: dict[str, np.ndarray], consts: dict[str, np.ndarray] | None = None, n_out: int = 1,
           opset: int = 22, input_order: list[str] | None = None, **attrs: Any) -> onnx.ModelProto:
    consts = consts or {}
    names = input_order or [*feeds, *consts]
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, **attrs)
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in feeds.items()]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
    graph = helper.make_graph([node], op.lower(), ins, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _check(model: onnx.ModelProto, feeds: dict[str, np.ndarray], n_out: int = 1, rtol: float = 1e-4,
           atol: float = 1e-5) -> None:
    m = load_onnx(model)
    got = m.run(feeds)
    ours = [np.asarray(got[s.name]) for s in m.outputs]
    sess = ort.InferenceSession(onnx.shape_inference.infer_shapes(model).SerializeToString(),
                                providers=["CPUExecutionProvider"])
    ref = sess.run([f"y{i}" for i in range(n_out)], feeds)
    for a, b in zip(ours, ref, strict=True):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        assert a.shape == b.shape, (a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------ convolutions


@pytest.mark.parametrize("auto_pad", ["NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"])
def test_conv_3d_groups_strides_dilations(auto_pad):
    x, w, b = _randn(2, 4, 7, 8, 9), _randn(6, 2, 3, 2, 3), _randn(6)
    pads = {"pads": [1, 0, 2, 0, 1, 1]} if auto_pad == "NOTSET" else {}
    dil = [1, 2, 1] if auto_pad in ("NOTSET", "VALID") else [1, 1, 1]  # ort: no dilation with SAME_*
    _check(_model("Conv", {"x": x}, {"w": w, "b": b}, group=2, strides=[2, 1, 2], dilations=dil,
                  auto_pad=auto_pad, **pads), {"x": x})


@pytest.mark.parametrize("attrs", [{"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 2, 1]},
                                   {"strides": [1, 1], "pads": [1, 1, 1, 1]}])
def test_conv_2d_depthwise_with_multiplier(attrs):
    """2-D depthwise convs run as shifted taps (channels-last), not XLA's grouped convolution."""
    x, w, b = _randn(2, 3, 9, 10), _randn(6, 1, 3, 3), _randn(6)
    _check(_model("Conv", {"x": x}, {"w": w, "b": b}, group=3, **attrs), {"x": x})


def test_conv_1d_depthwise():
    x, w = _randn(1, 3, 20), _randn(3, 1, 5)
    _check(_model("Conv", {"x": x}, {"w": w}, group=3, pads=[2, 1], strides=[3]), {"x": x})


@pytest.mark.parametrize("attrs", [
    {"group": 2, "strides": [2, 3], "dilations": [2, 1], "output_padding": [1, 2], "pads": [1, 0, 2, 1]},
    {"strides": [2, 2], "auto_pad": "SAME_UPPER"},
    {"strides": [2, 2], "output_shape": [9, 10]},
    {"group": 4, "strides": [1, 2]},
])
def test_conv_transpose(attrs):
    x, w, b = _randn(2, 4, 5, 6), _randn(4, 3, 3, 3), _randn(3 * attrs.get("group", 1))
    _check(_model("ConvTranspose", {"x": x}, {"w": w, "b": b}, **attrs), {"x": x})


def test_conv_transpose_3d():
    x, w = _randn(1, 2, 3, 4, 5), _randn(2, 3, 2, 3, 2)
    _check(_model("ConvTranspose", {"x": x}, {"w": w}, strides=[2, 1, 3], pads=[0, 1, 1, 1, 0, 0]), {"x": x})


def test_conv_integer_zero_points():
    x = RNG.integers(0, 255, (1, 2, 6, 7), dtype=np.uint8)
    w = RNG.integers(0, 255, (4, 2, 3, 3), dtype=np.uint8)
    _check(_model("ConvInteger", {"x": x}, {"w": w, "xz": np.array(7, np.uint8), "wz": np.array(130, np.uint8)},
                  pads=[1, 1, 1, 1], strides=[2, 1], opset=10), {"x": x})


def test_deform_conv_groups():
    x, w, b = _randn(2, 4, 7, 8), _randn(6, 2, 3, 2), _randn(6)
    offset = _randn(2, 2 * 2 * 6, 3, 4) * 1.5
    mask = RNG.uniform(size=(2, 2 * 6, 3, 4)).astype(np.float32)
    feeds = {"x": x, "offset": offset, "mask": mask}
    model = _model("DeformConv", feeds, {"w": w, "b": b}, input_order=["x", "w", "offset", "b", "mask"], group=2,
                   offset_group=2, strides=[2, 2], pads=[1, 0, 0, 1], dilations=[1, 2], opset=19)
    _check(model, feeds)


def test_causal_conv_with_state_matches_concat_conv():
    x, w, b, past = _randn(2, 3, 6), _randn(3, 1, 4), _randn(3), _randn(2, 3, 3)
    m = load_onnx(_model("CausalConvWithState", {"x": x, "past": past}, {"w": w, "b": b},
                         input_order=["x", "w", "b", "past"], n_out=2, opset=27, activation="silu"))
    out = m.run({"x": x, "past": past})
    y, state = (np.asarray(out[s.name]) for s in m.outputs)
    padded = np.concatenate([past, x], axis=2)
    conv = np.stack([np.stack([np.convolve(padded[n, c], w[c, 0, ::-1], "valid") for c in range(3)])
                     for n in range(2)]) + b[None, :, None]
    np.testing.assert_allclose(y, conv / (1 + np.exp(-conv)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(state, padded[:, :, -3:])


# ------------------------------------------------------------------------------------------ pooling


@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_indices(storage_order):
    x = _randn(2, 3, 9, 7)
    _check(_model("MaxPool", {"x": x}, n_out=2, kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1],
                  storage_order=storage_order, opset=12), {"x": x}, n_out=2)


@pytest.mark.parametrize("count_include_pad", [0, 1])
@pytest.mark.parametrize("ceil_mode", [0, 1])
def test_average_pool_pads_ceil(count_include_pad, ceil_mode):
    x = _randn(1, 2, 10, 11)
    _check(_model("AveragePool", {"x": x}, kernel_shape=[3, 4], strides=[3, 2], pads=[1, 2, 1, 1],
                  ceil_mode=ceil_mode, count_include_pad=count_include_pad), {"x": x})


def test_max_pool_int8_same_lower():
    x = RNG.integers(-128, 127, (1, 2, 8, 9), dtype=np.int8)
    _check(_model("MaxPool", {"x": x}, kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_LOWER"), {"x": x})


@pytest.mark.parametrize("p", [1, 3])
def test_lp_pool(p):
    x = _randn(1, 2, 8, 9)
    _check(_model("LpPool", {"x": x}, kernel_shape=[2, 3], strides=[2, 2], pads=[0, 1, 1, 0], p=p, opset=18),
           {"x": x})


def test_global_lp_pool():
    x = _randn(2, 3, 5, 4)
    _check(_model("GlobalLpPool", {"x": x}, p=3, opset=2), {"x": x})


def test_max_roi_pool():
    x = _randn(2, 3, 12, 10)
    rois = np.array([[0, 1, 1, 8, 6], [1, 0, 2, 9, 11], [0, 3.6, 2.2, 3.9, 2.4]], np.float32)
    _check(_model("MaxRoiPool", {"x": x, "rois": rois}, pooled_shape=[3, 2], spatial_scale=0.8, opset=1),
           {"x": x, "rois": rois})


def test_max_unpool_roundtrip():
    x = _randn(1, 2, 6, 6)
    pooled = load_onnx(_model("MaxPool", {"x": x}, n_out=2, kernel_shape=[2, 2], strides=[2, 2])).run({"x": x})
    y, idx = (np.asarray(v) for v in pooled.values())
    _check(_model("MaxUnpool", {"y": y, "i": idx}, kernel_shape=[2, 2], strides=[2, 2]), {"y": y, "i": idx})


# ------------------------------------------------------------------------------------------ image


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_v10_and_upsample(mode):
    x = _randn(1, 2, 4, 5)
    scales = np.array([1, 1, 2.0, 1.5], np.float32)
    _check(_model("Resize", {"x": x}, {"scales": scales}, mode=mode, opset=10), {"x": x})
    _check(_model("Upsample", {"x": x}, {"scales": scales}, mode=mode, opset=9), {"x": x})


@pytest.mark.parametrize("attrs", [
    {"mode": "cubic", "coordinate_transformation_mode": "align_corners", "cubic_coeff_a": -0.5},
    {"mode": "linear", "coordinate_transformation_mode": "pytorch_half_pixel"},
    {"mode": "linear", "antialias": 1},
    {"mode": "cubic", "antialias": 1, "exclude_outside": 1},
    {"mode": "nearest", "nearest_mode": "ceil", "coordinate_transformation_mode": "asymmetric"},
])
def test_resize_sizes_axes(attrs):
    x = _randn(2, 3, 9, 13)
    sizes = np.array([13, 5], np.int64)
    model = _model("Resize", {"x": x}, {"roi": np.array([], np.float32), "scales": np.array([], np.float32),
                                        "sizes": sizes}, axes=[3, 2], opset=19, **attrs)
    _check(model, {"x": x})


def test_resize_uint8_nearest():
    x = RNG.integers(0, 255, (1, 1, 5, 6), dtype=np.uint8)
    scales = np.array([1, 1, 0.6, 1.7], np.float32)
    _check(_model("Resize", {"x": x}, {"roi": np.array([], np.float32), "scales": scales}, opset=13), {"x": x})


@pytest.mark.parametrize("mode", ["linear", "nearest", "cubic"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align_corners", [0, 1])
def test_grid_sample(mode, padding_mode, align_corners):
    x = _randn(2, 3, 6, 7)
    grid = RNG.uniform(-1.4, 1.4, (2, 4, 5, 2)).astype(np.float32)
    _check(_model("GridSample", {"x": x, "grid": grid}, mode=mode, padding_mode=padding_mode,
                  align_corners=align_corners, opset=20), {"x": x, "grid": grid}, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("opset", [10, 16])
@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_roi_align(opset, mode, sampling_ratio):
    x = _randn(2, 3, 10, 12)
    rois = np.array([[0, 0, 9, 9], [1.5, 2.2, 11.0, 6.3], [3, 3, 3.5, 20], [-2, -1, 4, 5]], np.float32)
    bi = np.array([0, 1, 1, 0], np.int64)
    feeds = {"x": x, "rois": rois, "bi": bi}
    _check(_model("RoiAlign", feeds, mode=mode, output_height=3, output_width=4, sampling_ratio=sampling_ratio,
                  spatial_scale=0.7, opset=opset), feeds)


@pytest.mark.parametrize("mode", ["DCR", "CRD"])
def test_depth_space_roundtrip(mode):
    x = _randn(2, 12, 3, 4)
    _check(_model("DepthToSpace", {"x": x}, blocksize=2, mode=mode, opset=13), {"x": x})
    y = _randn(2, 3, 6, 8)
    _check(_model("SpaceToDepth", {"x": y}, blocksize=2), {"x": y})


def test_center_crop_pad_mixed():
    x = _randn(5, 6, 3)
    _check(_model("CenterCropPad", {"x": x}, {"shape": np.array([4, 9], np.int64)}, axes=[1, 0], opset=18),
           {"x": x})


def _conv_pool_lrn_model() -> onnx.ModelProto:
    """Conv -> LRN -> pools (3x3 ceil, 2x2 padded average, 2x2 dilated), a 2-group conv, a channel Concat."""
    n = helper.make_node
    nodes = [n("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), n("Relu", ["c"], ["r"]),
             n("LRN", ["r"], ["l"], size=3), n("MaxPool", ["l"], ["m"], kernel_shape=[3, 3], strides=[2, 2],
                                                   ceil_mode=1),
             n("AveragePool", ["m"], ["a"], kernel_shape=[2, 2], pads=[0, 0, 1, 1], count_include_pad=0),
             n("MaxPool", ["a"], ["d"], kernel_shape=[2, 2], dilations=[2, 1], pads=[1, 0, 1, 1]),
             n("Conv", ["a", "wg"], ["g"], group=2, pads=[1, 1, 1, 1]),
             n("Concat", ["g", "a", "g"], ["y1"], axis=1), n("Identity", ["d"], ["y0"])]
    g = helper.make_graph(nodes, "conv_pool", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 8, 15, 13])],
                          [helper.make_value_info("y0", onnx.TypeProto()), helper.make_value_info("y1", onnx.TypeProto())],
                          [numpy_helper.from_array(_randn(6, 8, 3, 3), "w"), numpy_helper.from_array(_randn(4, 3, 3, 3), "wg")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 22)])


@pytest.mark.parametrize(("channels_last", "taps"), [(True, True), (True, False), (False, False)])
def test_pools_and_lrn_channels_last_or_not(monkeypatch, channels_last, taps):
    """Pools (and LRN, grouped convs, channel Concat) run channels-last by default so XLA keeps the conv
    layout, max/sum pools as shifted slices; every form matches onnxruntime."""
    from jaxinfer import conv_lowering
    from jaxinfer.converters.onnx.ops import pool, shape

    monkeypatch.setattr(pool, "CHANNELS_LAST", channels_last)
    monkeypatch.setattr(conv_lowering, "WINDOW_TAPS", taps)
    monkeypatch.setattr(shape, "CONCAT_CHANNELS_LAST", channels_last)
    # atol 1e-4: the grouped conv sums terms of magnitude ~1 after conv, LRN and pools, and outputs near 0
    # differ from onnxruntime's by ~2e-5 for some draws (two of 40 seeds at 1e-5), float32 summation order
    _check(_conv_pool_lrn_model(), {"x": _randn(2, 8, 15, 13)}, n_out=2, atol=1e-4)


@pytest.mark.parametrize("dtype", [np.int32, np.float32])
def test_tap_windows_equal_reduce_window(dtype):
    """conv_lowering.reduce_window's taps give lax.reduce_window's answer: strides, dilations, uneven pads."""
    import jax.numpy as jnp
    from jax import lax

    from jaxinfer.conv_lowering import reduce_window

    x = (RNG.integers(-50, 50, (2, 11, 9, 3)) if dtype == np.int32 else _randn(2, 11, 9, 3)).astype(dtype)
    for kernel, strides, dil, pads in [((3, 3), (2, 2), (1, 1), [(0, 1), (1, 2)]), ((2, 3), (1, 2), (2, 1), [(1, 1), (0, 0)]),
                                       ((1, 1), (3, 1), (1, 1), [(0, 0), (0, 0)])]:
        args = ((1, *kernel, 1), (1, *strides, 1), [(0, 0), *pads, (0, 0)])
        for init, reducer in [(jnp.iinfo(dtype).min if dtype == np.int32 else -np.inf, lax.max), (0, lax.add)]:
            want = lax.reduce_window(x, jnp.asarray(init, dtype), reducer, *args, window_dilation=(1, *dil, 1))
            got = reduce_window(x, init, reducer, *args, (1, *dil, 1))
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    channel_sum = lax.reduce_window(x, jnp.asarray(0, dtype), lax.add, (1, 1, 1, 3), (1, 1, 1, 1),
                                    [(0, 0)] * 3 + [(1, 1)])  # a window along the channels
    np.testing.assert_allclose(np.asarray(reduce_window(x, 0, lax.add, (1, 1, 1, 3), (1, 1, 1, 1),
                                                        [(0, 0)] * 3 + [(1, 1)])), np.asarray(channel_sum), rtol=1e-6)
