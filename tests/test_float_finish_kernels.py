"""Our float32 kernels that finish a layer in the same call: cpu_kernels.f32_conv with a bias, a fused
activation's clamp and a block max pool, and cpu_kernels.f32_depthwise. Their sums match a float64 reference to float32
rounding for every geometry; the finish is XLA's (NaN stays NaN, the clamp's bounds hold); the XLA route
(`otherwise`) runs under vmap of the weights; TFLite float conv/depthwise layers take them."""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import cpu_kernels

from .test_int8_output_stage import DEPTHWISE, _out_size, _windows

AVX512 = cpu_kernels.available() and cpu_kernels.isa() == 2
needs_kernels = pytest.mark.skipif(not AVX512, reason="the float kernels need AVX-512")
CLAMPS = [None, (0.0, np.inf), (0.0, 6.0), (-1.0, 1.0)]


def _finish(acc: np.ndarray, bias: np.ndarray | None, clamp) -> np.ndarray:
    y = acc if bias is None else acc + bias
    return y if clamp is None else np.clip(y, clamp[0], clamp[1])


def _pad64(x: np.ndarray, pads) -> np.ndarray:
    (pt, pb), (pl, pr) = pads
    return np.pad(x.astype(np.float64), ((0, 0), (pt, pb), (pl, pr), (0, 0)))


def _depthwise64(x, taps, kh, kw, strides, dilation, pads):
    oh = _out_size(x.shape[1], kh, strides[0], dilation[0], *pads[0])
    ow = _out_size(x.shape[2], kw, strides[1], dilation[1], *pads[1])
    win = _windows(_pad64(x, pads), kh, kw, strides, dilation, oh, ow)
    return np.einsum("bhwijc,ijc->bhwc", win, taps.astype(np.float64).reshape(kh, kw, -1))


def _conv64(x, w, strides, dilation, pads):
    n, kh, kw, _ = w.shape
    oh = _out_size(x.shape[1], kh, strides[0], dilation[0], *pads[0])
    ow = _out_size(x.shape[2], kw, strides[1], dilation[1], *pads[1])
    win = _windows(_pad64(x, pads), kh, kw, strides, dilation, oh, ow)
    return np.einsum("bhwijc,nijc->bhwn", win, w.astype(np.float64))



@needs_kernels
@pytest.mark.parametrize("case", range(len(DEPTHWISE)))
@pytest.mark.parametrize("clamp", CLAMPS)
def test_depthwise_matches_float64(case, clamp):
    b, h, w, c, kh, kw, strides, dilation, pads = DEPTHWISE[case]
    rng = np.random.default_rng(case)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    taps = rng.standard_normal((kh * kw, c)).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    got = np.asarray(jax.jit(lambda x, t, bb: cpu_kernels.f32_depthwise(x, t, bb, clamp, (kh, kw), strides, dilation,
                                                                         pads, None))(x, taps, bias))
    want = _finish(_depthwise64(x, taps, kh, kw, strides, dilation, pads), bias, clamp)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(kh * kw))


# (B, H, W, C, N, KH, KW, strides, dilation, pads): few output channels (8-row blocks) and many (4-row blocks)
CONVS = [
    (1, 32, 32, 3, 16, 3, 3, (1, 1), (1, 1), ((1, 1), (1, 1))),
    (2, 9, 11, 16, 32, 3, 3, (2, 2), (1, 1), ((0, 1), (1, 1))),
    (1, 7, 5, 8, 70, 3, 2, (1, 1), (2, 2), ((2, 2), (1, 1))),
    (3, 4, 4, 5, 17, 1, 1, (1, 1), (1, 1), ((0, 0), (0, 0))),
    (2, 23, 21, 3, 20, 7, 7, (2, 2), (1, 1), ((3, 3), (3, 3))),  # a 7x7 stem, odd sizes
    (1, 6, 13, 4, 130, 2, 3, (2, 1), (3, 1), ((0, 2), (2, 0))),  # dilated rows only; 3 panel groups
    (2, 5, 3, 32, 32, 3, 3, (1, 1), (1, 1), ((1, 1), (1, 1))),  # rows narrower than a block
]


@contextlib.contextmanager
def direct(on: bool):
    """f32_conv's kernel reading images directly (on) or packing patch rows, inside the block."""
    was = cpu_kernels.f32_conv_direct()
    cpu_kernels.f32_conv_direct(on)
    try:
        yield
    finally:
        cpu_kernels.f32_conv_direct(was)


@needs_kernels
@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize("clamp", CLAMPS)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("reads", ["image", "patch rows"])
def test_conv_finish_matches_float64(case, clamp, with_bias, reads):
    b, h, w_, c, n, kh, kw, strides, dilation, pads = CONVS[case]
    rng = np.random.default_rng(20 + case)
    x = rng.standard_normal((b, h, w_, c)).astype(np.float32)
    w = rng.standard_normal((n, kh, kw, c)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    with direct(reads == "image"):
        got = np.asarray(cpu_kernels.f32_conv(x, w, strides, dilation, pads, bias=bias, clamp=clamp))
    want = _finish(_conv64(x, w, strides, dilation, pads), bias, clamp)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(kh * kw * c))


@needs_kernels
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_reading_the_image_sums_as_the_patch_rows_do(case):
    """Both ways take the window's values in the same order into the same FMAs: bit-identical."""
    b, h, w_, c, n, kh, kw, strides, dilation, pads = CONVS[case]
    rng = np.random.default_rng(40 + case)
    x = rng.standard_normal((b, h, w_, c)).astype(np.float32)
    w = rng.standard_normal((n, kh, kw, c)).astype(np.float32)
    fn = jax.jit(lambda x, w: cpu_kernels.f32_conv(x, w, strides, dilation, pads))
    with direct(True):
        a = np.asarray(fn(x, w))
    with direct(False):
        p = np.asarray(fn(x, w))
    np.testing.assert_array_equal(a, p)


@needs_kernels
def test_the_finish_is_xlas_after_the_kernels_sums():
    """Bias then clamp on the kernel's own sums: bit-identical to the unfinished kernel plus XLA's add and clip."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 12, 12, 8)).astype(np.float32)
    w = rng.standard_normal((24, 3, 3, 8)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    args = ((1, 1), (1, 1), ((1, 1), (1, 1)))
    plain = cpu_kernels.f32_conv(x, w, *args)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.f32_conv(x, w, *args, bias=bias, clamp=(0.0, 6.0))),
                                  np.asarray(jnp.clip(plain + bias, 0.0, 6.0)))


@needs_kernels
def test_nan_stays_nan_through_the_clamp():
    x = np.zeros((1, 4, 4, 16), np.float32)
    x[0, 1, 1, 3] = np.nan
    taps = np.ones((9, 16), np.float32)
    y = np.asarray(cpu_kernels.f32_depthwise(x, taps, None, (0.0, 6.0), (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)),
                                             None))
    assert np.isnan(y[0, :3, :3, 3]).all() and not np.isnan(np.delete(y, 3, axis=-1)).any()
    w = np.ones((16, 3, 3, 16), np.float32)
    yc = np.asarray(cpu_kernels.f32_conv(x, w, (1, 1), (1, 1), ((1, 1), (1, 1)), clamp=(0.0, np.inf)))
    assert np.isnan(yc[0, :3, :3]).all() and not np.isnan(yc[0, 3, 3]).any()


@needs_kernels
def test_depthwise_otherwise_under_vmap_of_the_taps():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1, 6, 6, 16)).astype(np.float32)
    taps = rng.standard_normal((2, 9, 16)).astype(np.float32)
    pads = ((1, 1), (1, 1))

    def otherwise(x, t, b):
        xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        return sum(xp[:, i:i + 6, k:k + 6] * t[i * 3 + k] for i in range(3) for k in range(3)) + b

    got = np.asarray(jax.vmap(lambda t: cpu_kernels.f32_depthwise(x, t, None, None, (3, 3), (1, 1), (1, 1), pads,
                                                                  otherwise))(taps))
    for i in range(2):
        np.testing.assert_allclose(got[i], _depthwise64(x, taps[i], 3, 3, (1, 1), (1, 1), pads), rtol=1e-5, atol=1e-5)


def test_bad_operands_named():
    with pytest.raises(ValueError, match="taps"):
        cpu_kernels.f32_depthwise(np.zeros((1, 3, 3, 4), np.float32), np.zeros((8, 4), np.float32), None, None,
                                  (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), None)
    with pytest.raises(ValueError, match="lo <= hi"):
        cpu_kernels.f32_conv(np.zeros((1, 3, 3, 4), np.float32), np.zeros((2, 1, 1, 4), np.float32), (1, 1), (1, 1),
                             ((0, 0), (0, 0)), clamp=(1.0, 0.0))


@needs_kernels
def test_tflite_float_layers_take_the_kernels():
    from jaxinfer.converters.tflite import load_tflite
    from tests.fixtures.tflite.make_fixtures import build_conv_f32

    model = load_tflite(build_conv_f32(2))
    feeds = {model.inputs[0].name: np.zeros((2, 32, 32, 3), np.float32)}
    hlo = jax.jit(model.fn).lower(model.params, feeds).as_text()
    assert hlo.count(cpu_kernels.TARGET_F32_CONV) == 4 and hlo.count(cpu_kernels.TARGET_F32_DEPTHWISE) == 4


@needs_kernels
@pytest.mark.parametrize("case", range(len(CONVS)))
def test_an_nchw_image_is_transposed_as_it_is_padded(case):
    """x_layout="NCHW" (a model's input image): the same sums as the NHWC image, bit for bit; dilation
    along W is refused (the kernel reads W-runs of the padded copy)."""
    b, h, w_, c, n, kh, kw, strides, dilation, pads = CONVS[case]
    rng = np.random.default_rng(60 + case)
    x = rng.standard_normal((b, h, w_, c)).astype(np.float32)
    w = rng.standard_normal((n, kh, kw, c)).astype(np.float32)
    if dilation[1] != 1:
        with pytest.raises(ValueError, match="NCHW one undilated along W"):
            cpu_kernels.f32_conv(np.transpose(x, (0, 3, 1, 2)), w, strides, dilation, pads, x_layout="NCHW")
        return
    want = np.asarray(cpu_kernels.f32_conv(x, w, strides, dilation, pads))
    got = np.asarray(jax.jit(lambda x: cpu_kernels.f32_conv(x, w, strides, dilation, pads, x_layout="NCHW"))(
        np.transpose(x, (0, 3, 1, 2))))
    np.testing.assert_array_equal(got, want)


@needs_kernels
def test_onnx_models_stem_reads_the_nchw_input():
    from pathlib import Path

    import jaxinfer
    m = jaxinfer.load(Path(__file__).parent / "fixtures" / "onnx" / "cnn.onnx")
    x = np.random.default_rng(7).standard_normal((2, 3, 32, 32)).astype(np.float32)
    hlo = m.compiled({"x": x}).as_text()
    assert "transpose" not in hlo.split("ENTRY")[1].split("jaxinfer_f32_conv")[0]  # nothing before the stem


def _block_max64(y: np.ndarray, ph: int, pw: int) -> np.ndarray:
    oh, ow = y.shape[1] // ph, y.shape[2] // pw
    return y[:, :oh * ph, :ow * pw].reshape(y.shape[0], oh, ph, ow, pw, -1).max(axis=(2, 4))


# (B, H, W, C, N, KH, KW, strides, dilation, pads, pool); dilation along W is 1: pooling reads the image directly
POOLED = [
    (2, 32, 32, 3, 16, 3, 3, (1, 1), (1, 1), ((1, 1), (1, 1)), (2, 2)),   # an exported CNN's stem
    (3, 17, 15, 5, 40, 3, 3, (1, 1), (1, 1), ((1, 1), (1, 1)), (2, 2)),   # odd sizes: the last row/column dropped
    (1, 16, 16, 16, 72, 3, 3, (2, 2), (2, 1), ((2, 1), (1, 1)), (3, 2)),  # N past 64: two panel groups
    (2, 9, 9, 8, 70, 1, 1, (1, 1), (1, 1), ((0, 0), (0, 0)), (2, 3)),
    (1, 8, 8, 4, 16, 3, 3, (1, 1), (1, 1), ((1, 1), (1, 1)), (1, 1)),     # no pool
    (1, 8, 8, 4, 16, 3, 3, (1, 1), (1, 1), ((1, 1), (1, 1)), (8, 4)),     # one block per image
]


@needs_kernels
@pytest.mark.parametrize("case", range(len(POOLED)))
@pytest.mark.parametrize("clamp", [None, (0.0, np.inf), (-0.5, 0.5)])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("reads", ["image", "patch rows"])
def test_pooled_conv_matches_float64(case, clamp, layout, reads):
    """pool (PH, PW): the max over each block of the finished outputs; pooled calls read the image directly
    even with the direct path switched off."""
    b, h, w_, c, n, kh, kw, strides, dilation, pads, pool = POOLED[case]
    rng = np.random.default_rng(80 + case)
    x = rng.standard_normal((b, h, w_, c)).astype(np.float32)
    w = rng.standard_normal((n, kh, kw, c)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    xin = np.transpose(x, (0, 3, 1, 2)) if layout == "NCHW" else x
    with direct(reads == "image"):
        got = np.asarray(jax.jit(lambda x: cpu_kernels.f32_conv(x, w, strides, dilation, pads, bias=bias, clamp=clamp,
                                                                 x_layout=layout, pool=pool))(xin))
    want = _block_max64(_finish(_conv64(x, w, strides, dilation, pads), bias, clamp), *pool)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(kh * kw * c))


@needs_kernels
def test_the_pool_is_the_max_of_the_unpooled_kernels_outputs():
    """Bit for bit the unpooled call's outputs, maxed per block as jnp.maximum does; a NaN anywhere in a block
    gives NaN (XLA CPU's reduce-window max dropped it); the XLA route under vmap of the filter agrees."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 12, 10, 8)).astype(np.float32)
    x[0, 4, 4, 2] = np.nan
    w = rng.standard_normal((24, 3, 3, 8)).astype(np.float32)
    bias = rng.standard_normal(24).astype(np.float32)
    args = ((1, 1), (1, 1), ((1, 1), (1, 1)))
    plain = np.asarray(cpu_kernels.f32_conv(x, w, *args, bias=bias, clamp=(0.0, np.inf)))
    pooled = np.asarray(cpu_kernels.f32_conv(x, w, *args, bias=bias, clamp=(0.0, np.inf), pool=(2, 2)))
    blocks = [plain[:, i::2, t::2] for i in range(2) for t in range(2)]
    np.testing.assert_array_equal(pooled, np.asarray(functools.reduce(jnp.maximum, blocks)))
    assert np.isnan(pooled[0, 1:3, 1:3]).all() and np.isnan(pooled).sum() == 4 * 24
    both = np.asarray(jax.vmap(lambda w: cpu_kernels.f32_conv(x, w, *args, bias=bias, clamp=(0.0, np.inf),
                                                              pool=(2, 2)))(np.stack([w, w])))
    np.testing.assert_allclose(np.nan_to_num(both[1]), np.nan_to_num(pooled), rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.isnan(both[0]), np.isnan(pooled))


def test_bad_pools_named():
    x, w = np.zeros((1, 6, 6, 4), np.float32), np.zeros((2, 3, 3, 4), np.float32)
    for pool, dilation in (((0, 2), (1, 1)), ((2, 2), (1, 2))):
        with pytest.raises(ValueError, match="pools windows of at least 1 x 1, undilated along W"):
            cpu_kernels.f32_conv(x, w, (1, 1), dilation, ((1, 1), (1, 1)), pool=pool)


@needs_kernels
def test_a_pool_wider_than_the_output_is_empty():
    y = cpu_kernels.f32_conv(np.ones((1, 3, 3, 4), np.float32), np.ones((2, 1, 1, 4), np.float32), (1, 1), (1, 1),
                             ((0, 0), (0, 0)), pool=(4, 4))
    assert y.shape == (1, 0, 0, 2)
