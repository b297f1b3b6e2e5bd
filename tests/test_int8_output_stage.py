"""Our int8 kernels that finish a layer in the same call (cpu_kernels.int8_conv_requant, int8_depthwise):
the output stage's fixed-point rescale, rounding and clamp give exactly the numbers of a plain numpy
reference of TFLite's MultiplyByQuantizedMultiplier for every geometry, zero point, shift and rounding;
the `otherwise` route (other platforms, vmap of weights) gives the same; bad operands are refused by name;
TFLite int8 conv/depthwise layers take the kernels and answer as before."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import cpu_kernels

VNNI = cpu_kernels.available() and cpu_kernels.isa() == 2
needs_kernels = pytest.mark.skipif(not VNNI, reason="the output-stage kernels need AVX-512 VNNI")


def _wrap32(v: np.ndarray) -> np.ndarray:
    return ((v.astype(np.int64) + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def _stage_ref(acc: np.ndarray, bias: np.ndarray, st: cpu_kernels.OutputStage) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier + zero point + clamp, in int64 numpy (channels last)."""
    shift = np.asarray(st.shift, np.int64)
    v = _wrap32(_wrap32(acc.astype(np.int64) + bias) << np.maximum(shift, 0))
    h = (v * np.asarray(st.multiplier, np.int64) + (1 << 30)) >> 31
    right = np.maximum(-shift, 0)
    mask = (np.int64(1) << right) - 1
    threshold = (mask >> 1) + ((h < 0) & np.asarray(st.ties_away, bool))
    q = (h >> right) + ((h & mask) > threshold)
    return np.clip(_wrap32(q + st.zero_point), st.lo, st.hi).astype(np.int8)


def _pad_image(x: np.ndarray, zp: int, pads) -> np.ndarray:
    (pt, pb), (pl, pr) = pads
    return np.pad(x.astype(np.int64), ((0, 0), (pt, pb), (pl, pr), (0, 0)), constant_values=zp)


def _windows(x: np.ndarray, kh: int, kw: int, strides, dilation, oh: int, ow: int) -> np.ndarray:
    """[B, OH, OW, KH, KW, C] window values of an already padded image."""
    (sh, sw), (dh, dw) = strides, dilation
    out = np.empty((x.shape[0], oh, ow, kh, kw, x.shape[3]), x.dtype)
    for i in range(kh):
        for k in range(kw):
            out[:, :, :, i, k] = x[:, i * dh: i * dh + (oh - 1) * sh + 1: sh, k * dw: k * dw + (ow - 1) * sw + 1: sw]
    return out


def _out_size(size: int, k: int, s: int, d: int, lo: int, hi: int) -> int:
    return (size + lo + hi - (k - 1) * d - 1) // s + 1


def _random_stage(rng: np.random.Generator, n: int, shifts=(-12, -1), zero_point: int = 0, lo: int = -128,
                  hi: int = 127) -> cpu_kernels.OutputStage:
    mult = rng.integers(1 << 30, (1 << 31) - 1, n).astype(np.int32)
    shift = rng.integers(shifts[0], shifts[1] + 1, n).astype(np.int32)
    return cpu_kernels.OutputStage(mult, shift, rng.random(n) < 0.5, zero_point, lo, hi)


# (B, H, W, C, KH, KW, strides, dilation, pads)
DEPTHWISE = [
    (1, 16, 16, 32, 3, 3, (1, 1), (1, 1), ((1, 1), (1, 1))),
    (2, 9, 7, 19, 3, 3, (2, 2), (1, 1), ((0, 1), (1, 1))),
    (1, 12, 12, 5, 5, 5, (1, 2), (2, 1), ((4, 4), (2, 2))),
    (3, 4, 6, 48, 3, 1, (1, 1), (1, 1), ((0, 0), (0, 0))),
    (1, 2, 2, 16, 7, 7, (1, 1), (1, 1), ((3, 3), (3, 3))),   # every window mostly outside the image
    (1, 5, 5, 33, 3, 3, (3, 3), (1, 1), ((2, 0), (0, 2))),
    (1, 6, 6, 8, 1, 1, (1, 1), (1, 1), ((0, 0), (0, 0))),
]


def _depthwise_ref(x, zp, taps, bias, st, kh, kw, strides, dilation, pads):
    oh = _out_size(x.shape[1], kh, strides[0], dilation[0], *pads[0])
    ow = _out_size(x.shape[2], kw, strides[1], dilation[1], *pads[1])
    win = _windows(_pad_image(x, zp, pads), kh, kw, strides, dilation, oh, ow) - zp
    acc = np.einsum("bhwijc,ijc->bhwc", win, taps.astype(np.int64).reshape(kh, kw, -1))
    return _stage_ref(acc, bias, st)


@needs_kernels
@pytest.mark.parametrize("case", range(len(DEPTHWISE)))
@pytest.mark.parametrize("zp,clamp", [(0, (-128, 127)), (-128, (-128, 127)), (37, (-5, 90))])
def test_depthwise_matches_the_reference(case, zp, clamp):
    b, h, w, c, kh, kw, strides, dilation, pads = DEPTHWISE[case]
    rng = np.random.default_rng(case)
    x = rng.integers(-128, 128, (b, h, w, c), dtype=np.int8)
    taps = rng.integers(-128, 128, (kh * kw, c), dtype=np.int8)
    bias = rng.integers(-3000, 3000, c).astype(np.int32)
    st = _random_stage(rng, c, zero_point=clamp[0] // 2 + clamp[1] // 2, lo=clamp[0], hi=clamp[1])
    want = _depthwise_ref(x, zp, taps, bias, st, kh, kw, strides, dilation, pads)

    def call(x, taps, bias, otherwise=None):
        return cpu_kernels.int8_depthwise(x, jnp.int32(zp), taps, bias, st, (kh, kw), strides, dilation, pads,
                                          otherwise)

    got = np.asarray(jax.jit(call)(x, taps, bias))
    np.testing.assert_array_equal(got, want)


# (B, H, W, C, N, KH, KW, strides, dilation, pads)
CONVS = [
    (1, 32, 32, 3, 32, 3, 3, (1, 1), (1, 1), ((1, 1), (1, 1))),
    (2, 9, 11, 32, 40, 3, 3, (2, 2), (1, 1), ((0, 1), (1, 1))),
    (1, 6, 6, 17, 5, 1, 1, (1, 1), (1, 1), ((0, 0), (0, 0))),
    (1, 10, 8, 8, 70, 3, 2, (1, 1), (2, 2), ((2, 2), (1, 1))),
    (3, 2, 3, 4, 16, 1, 1, (1, 1), (1, 1), ((0, 0), (0, 0))),   # few rows: the row path, not the panels
]


def _conv_ref(x, zp, w, bias, st, strides, dilation, pads):
    n, kh, kw, _ = w.shape
    oh = _out_size(x.shape[1], kh, strides[0], dilation[0], *pads[0])
    ow = _out_size(x.shape[2], kw, strides[1], dilation[1], *pads[1])
    win = _windows(_pad_image(x, zp, pads), kh, kw, strides, dilation, oh, ow) - zp
    acc = np.einsum("bhwijc,nijc->bhwn", win, w.astype(np.int64))
    return _stage_ref(_wrap32(acc), bias, st)


@needs_kernels
@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize("zp,shifts", [(0, (-12, -1)), (-128, (-31, -20)), (5, (0, 3))])
def test_conv_requant_matches_the_reference(case, zp, shifts):
    b, h, w_, c, n, kh, kw, strides, dilation, pads = CONVS[case]
    rng = np.random.default_rng(10 + case)
    x = rng.integers(-128, 128, (b, h, w_, c), dtype=np.int8)
    w = rng.integers(-127, 128, (n, kh, kw, c), dtype=np.int8)
    bias = rng.integers(-20000, 20000, n).astype(np.int32)
    st = _random_stage(rng, n, shifts, zero_point=-3)
    want = _conv_ref(x, zp, w, bias, st, strides, dilation, pads)
    got = np.asarray(jax.jit(lambda x, w, bias: cpu_kernels.int8_conv_requant(
        x, jnp.int32(zp), w, bias, st, strides, dilation, pads, None))(x, w, bias))
    np.testing.assert_array_equal(got, want)


@needs_kernels
def test_rounding_ties_follow_each_channel():
    """Sums that land exactly halfway: ties up where ties_away is false, away from zero where true."""
    n = 4
    st = cpu_kernels.OutputStage(np.full(n, 1 << 30, np.int32), np.full(n, -1, np.int32),
                                 np.array([False, True, False, True]), 0, -128, 127)
    # h = acc / 2 (mult 2^30 halves, with its own rounding); right shift 1 then halves again: acc = +-6 gives
    # h = +-3, and 3 / 2 = 1.5 -> 2 (both), -3 / 2 = -1.5 -> -1 (ties up) or -2 (away).
    x = np.zeros((1, 1, 1, 1), np.int8)
    w = np.zeros((n, 1, 1, 1), np.int8)
    for acc, want in ((6, [2, 2, 2, 2]), (-6, [-1, -2, -1, -2])):
        bias = np.full(n, acc, np.int32)
        got = cpu_kernels.int8_conv_requant(x, jnp.int32(0), w, bias, st, (1, 1), (1, 1), ((0, 0), (0, 0)), None)
        np.testing.assert_array_equal(np.asarray(got).reshape(-1), want)
        np.testing.assert_array_equal(_stage_ref(np.zeros(n, np.int64), bias, st), want)


@needs_kernels
def test_otherwise_runs_under_vmap_of_the_weights():
    """A batch of filters is not more rows for one call: `otherwise` (XLA) runs per member, same values."""
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, (1, 6, 6, 16), dtype=np.int8)
    taps = rng.integers(-128, 128, (2, 9, 16), dtype=np.int8)
    st = _random_stage(rng, 16)
    pads = ((1, 1), (1, 1))

    def otherwise(x, zp, t, bias):
        win = jnp.stack([jnp.pad(x.astype(jnp.int32) - zp, ((0, 0), (1, 1), (1, 1), (0, 0)))
                         [:, i:i + 6, k:k + 6] for i in range(3) for k in range(3)])
        acc = jnp.einsum("tbhwc,tc->bhwc", win, t.astype(jnp.int32))
        return jax.pure_callback(lambda a, b: _stage_ref(np.asarray(a), np.asarray(b), st),
                                 jax.ShapeDtypeStruct(acc.shape, jnp.int8), acc, bias,
                                 vmap_method="sequential")

    f = jax.vmap(lambda t: cpu_kernels.int8_depthwise(x, jnp.int32(0), t, None, st, (3, 3), (1, 1), (1, 1), pads,
                                                      otherwise))
    got = np.asarray(f(taps))
    for i in range(2):
        want = _depthwise_ref(x, 0, taps[i], np.zeros(16, np.int32), st, 3, 3, (1, 1), (1, 1), pads)
        np.testing.assert_array_equal(got[i], want)


@needs_kernels
def test_a_batch_of_images_is_one_call():
    rng = np.random.default_rng(4)
    xs = rng.integers(-128, 128, (3, 1, 5, 5, 16), dtype=np.int8)
    taps = rng.integers(-128, 128, (9, 16), dtype=np.int8)
    st = _random_stage(rng, 16)
    pads = ((1, 1), (1, 1))
    f = jax.jit(jax.vmap(lambda x: cpu_kernels.int8_depthwise(x, jnp.int32(0), taps, None, st, (3, 3), (1, 1),
                                                              (1, 1), pads, None)))
    assert f.lower(xs).as_text().count(cpu_kernels.TARGET_DEPTHWISE) == 1
    got = np.asarray(f(xs))
    for i in range(3):
        np.testing.assert_array_equal(got[i], _depthwise_ref(xs[i], 0, taps, np.zeros(16, np.int32), st, 3, 3,
                                                             (1, 1), (1, 1), pads))


@pytest.mark.parametrize("bad,what", [
    (dict(multiplier=np.array([np.iinfo(np.int32).min] * 4)), "stage"),
    (dict(shift=np.array([31, 0, 0, 0])), "stage"),
    (dict(zero_point=200), "stage"),
    (dict(lo=10, hi=-10), "stage"),
    (dict(multiplier=np.ones(3, np.int32)), "stage"),
])
def test_stages_the_kernels_cannot_take_are_refused(bad, what):
    good = dict(multiplier=np.full(4, 1 << 30, np.int32), shift=np.zeros(4, np.int32), ties_away=np.ones(4, bool),
                zero_point=0, lo=-128, hi=127)
    st = cpu_kernels.OutputStage(**{**good, **bad})
    assert not st.fits(4)
    with pytest.raises(ValueError, match=what):
        cpu_kernels.int8_depthwise(np.zeros((1, 3, 3, 4), np.int8), jnp.int32(0), np.zeros((9, 4), np.int8), None,
                                   st, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), None)


def test_wrong_operands_named():
    st = cpu_kernels.OutputStage(np.full(4, 1 << 30, np.int32), np.zeros(4, np.int32), np.ones(4, bool), 0, -128, 127)
    with pytest.raises(ValueError, match="int8 x"):
        cpu_kernels.int8_conv_requant(np.zeros((1, 3, 3, 2), np.float32), jnp.int32(0), np.zeros((4, 1, 1, 2), np.int8),
                                      None, st, (1, 1), (1, 1), ((0, 0), (0, 0)), None)
    with pytest.raises(ValueError, match="taps"):
        cpu_kernels.int8_depthwise(np.zeros((1, 3, 3, 4), np.int8), jnp.int32(0), np.zeros((8, 4), np.int8), None,
                                   st, (3, 3), (1, 1), (1, 1), ((1, 1), (1, 1)), None)


@needs_kernels
@pytest.mark.parametrize("requant", ["reference", "builtin"])
def test_tflite_int8_layers_take_the_kernels_and_answer_as_xla_does(requant, tmp_path):
    """The int8 conv + depthwise fixture: one kernel call per layer (no XLA fusion left), and the same int8
    output as the XLA route of a process without our kernels."""
    from jaxinfer.converters.tflite import load_tflite
    from tests.fixtures.tflite.make_fixtures import build_conv_int8

    data = build_conv_int8(2)
    model = load_tflite(data, requant=requant)
    x = np.random.default_rng(1).integers(-128, 128, (2, 32, 32, 3)).astype(np.int8)
    feeds = {model.inputs[0].name: x}
    hlo = jax.jit(model.fn).lower(model.params, feeds).as_text()
    assert hlo.count(cpu_kernels.TARGET_CONV_RQ) == 4 and hlo.count(cpu_kernels.TARGET_DEPTHWISE) == 4
    got = np.asarray(list(model.run(feeds).values())[0])
    (tmp_path / "m.tflite").write_bytes(data)
    np.save(tmp_path / "x.npy", x)
    script = (f"import numpy as np; from jaxinfer.converters.tflite import load_tflite; "
              f"m = load_tflite(open(r'{tmp_path / 'm.tflite'}', 'rb').read(), requant='{requant}'); "
              f"y = m.run({{m.inputs[0].name: np.load(r'{tmp_path / 'x.npy'}')}}); "
              f"np.save(r'{tmp_path / 'y.npy'}', np.asarray(list(y.values())[0]))")
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "JAXINFER_CPU_KERNELS": "0"},
                   timeout=300)
    np.testing.assert_array_equal(got, np.load(tmp_path / "y.npy"))


def _float_stage_ref(acc: np.ndarray, bias: np.ndarray, scale: np.ndarray, zp: int, dtype, relu: bool) -> np.ndarray:
    """ONNX's requantization as jaxinfer's XLA route takes it: float32(acc + bias) * scale in float32, rounded
    half to even, plus the zero point, clipped (at the zero point from below too with relu)."""
    v = (_wrap32(acc + bias).astype(np.float32) * scale.astype(np.float32)).astype(np.float64)
    info = np.iinfo(dtype)
    return np.clip(np.round(v) + zp, zp if relu else info.min, info.max).astype(dtype)


@needs_kernels
@pytest.mark.parametrize("case", range(len(CONVS)))
@pytest.mark.parametrize("dtype,out_zp,relu", [(np.uint8, 128, False), (np.uint8, 0, True), (np.int8, -5, False),
                                                (np.int8, 3, True)])
@pytest.mark.parametrize("x_dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("route", ["int8 kernel", "float32 direct"])
def test_conv_requant_f32_matches_the_reference(case, dtype, out_zp, relu, x_dtype, route, monkeypatch):
    """Both kernels: the VNNI/AVX2 int8 product, and (few channels; here every case undilated along W) exact
    float32 sums on the float kernel's direct path."""
    b, h, w_, c, n, kh, kw, strides, dilation, pads = CONVS[case]
    monkeypatch.setattr(cpu_kernels, "INT8_DIRECT_MAX_CHANNELS", 0 if route == "int8 kernel" else 1 << 20)
    rng = np.random.default_rng(40 + case)
    x = rng.integers(np.iinfo(x_dtype).min, np.iinfo(x_dtype).max + 1, (b, h, w_, c)).astype(x_dtype)
    w = rng.integers(-127, 128, (n, kh, kw, c), dtype=np.int8)
    bias = rng.integers(-20000, 20000, n).astype(np.int32)
    scale = (rng.random(n) * 3e-3 + 1e-4).astype(np.float32)
    zp = -7 if x_dtype == np.int8 else 131
    oh = _out_size(h, kh, strides[0], dilation[0], *pads[0])
    ow = _out_size(w_, kw, strides[1], dilation[1], *pads[1])
    win = _windows(_pad_image(x, zp, pads), kh, kw, strides, dilation, oh, ow) - zp
    acc = _wrap32(np.einsum("bhwijc,nijc->bhwn", win, w.astype(np.int64)))
    want = _float_stage_ref(acc, bias, scale, out_zp, dtype, relu)

    def otherwise(x, zp, w, bias, scale, out_zp):  # traced alongside the kernel, not run on CPU
        return jnp.zeros(want.shape, dtype)

    def call(x, w, bias, scale, out_zp):
        return cpu_kernels.int8_conv_requant_f32(x, jnp.int32(zp), w, bias, scale, out_zp, dtype, relu, strides,
                                                 dilation, pads, otherwise)

    got = np.asarray(jax.jit(call)(x, w, bias, scale, np.asarray(out_zp, dtype)))  # a traced zero point
    assert got.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(got, want)
    direct = route == "float32 direct" and dilation[1] == 1
    assert (cpu_kernels.TARGET_CONV_DIRECT in jax.jit(call).lower(x, w, bias, scale, np.asarray(out_zp, dtype)).as_text()
            ) == direct
    assert np.mean(got == (out_zp if relu else np.iinfo(dtype).min)) < 0.9  # not all clipped


@needs_kernels
@pytest.mark.parametrize("unsigned_x", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_zp_conv_requant_equals_zp_conv_then_requantize(unsigned_x, relu):
    """intmath.zp_conv_requant (the kernel) and the XLA route (zp_conv, bias, round_saturate) agree bit for bit,
    NCHW as ONNX lays it out, an unsigned activation shifted to int8 on the way."""
    from jaxinfer import intmath

    rng = np.random.default_rng(7)
    xdt = np.uint8 if unsigned_x else np.int8
    x = rng.integers(np.iinfo(xdt).min, np.iinfo(xdt).max + 1, (2, 5, 12, 12)).astype(xdt)
    w = rng.integers(-127, 128, (9, 5, 3, 3)).astype(np.int8)
    bias = rng.integers(-3000, 3000, 9).astype(np.int32)
    mult = (rng.random(9) * 2e-3 + 1e-4).astype(np.float32).reshape(1, 9, 1, 1)
    x_zp, y_zp = np.asarray(131 if unsigned_x else -4, xdt), np.asarray(120, np.uint8)
    strides, padding = (2, 1), ((1, 1), (0, 1))

    def fused(x, x_zp, bias, mult, y_zp):
        return intmath.zp_conv_requant(x, x_zp, w, None, bias, mult, y_zp, np.uint8, relu, strides, padding)

    def plain(x, x_zp, bias, mult, y_zp):
        acc = intmath.zp_conv(x, x_zp, w, None, strides, padding, bound=255 * 128) + bias.reshape(1, -1, 1, 1)
        q = intmath.round_saturate(acc.astype(jnp.float32) * mult, np.uint8, y_zp)
        return jnp.maximum(q, y_zp) if relu else q

    args = (x, x_zp, bias, mult, y_zp)
    assert cpu_kernels.TARGET_CONV_RQF in jax.jit(fused).lower(*args).as_text()
    np.testing.assert_array_equal(np.asarray(jax.jit(fused)(*args)), np.asarray(jax.jit(plain)(*args)))
    assert intmath.zp_conv_requant(x, x_zp, w, np.int8(1), bias, mult, y_zp, np.uint8, relu, strides,
                                   padding) is None  # a weight zero point: the caller's route
