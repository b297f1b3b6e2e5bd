"""intmath: integer products through float sums equal XLA's int32 products exactly."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
from jax import lax

from jaxinfer import arith, intmath

RNG = np.random.default_rng(5)


def ints(shape, lo, hi):
    return RNG.integers(lo, hi + 1, shape).astype(np.int32)


@pytest.mark.parametrize("lo,hi,bound", [(-128, 127, 128 * 128), (-255, 255, 255 * 255), (-32768, 32767, 32768 * 128)])
@pytest.mark.parametrize("k", [7, 600, 2100])
def test_exact_matmul_and_dot_equal_int32(lo, hi, bound, k):
    a = ints((3, 5, k), lo, hi)
    b = ints((k, 4), -128, 127)
    want = np.matmul(a.astype(np.int64), b.astype(np.int64))
    assert np.array_equal(np.asarray(intmath.exact_matmul(a, b, bound, jnp.int64)), want)
    dims = (((2,), (0,)), ((), ()))
    assert np.array_equal(np.asarray(intmath.exact_dot(a, b, dims, 2, 0, bound, jnp.int64)), want)


def test_float_chunks_split_long_reductions_and_fall_back_to_float64():
    assert intmath.float_chunks(100, 9, 255 * 255) == [(0, 28), (28, 56), (56, 84), (84, 100)]
    assert intmath.float_chunks(100, 1, 32768 * 128) is None  # int16 x int8: chunks of 3 do not pay
    assert intmath.exact_float(256, 255 * 255) == jnp.float32 and intmath.exact_float(300, 255 * 255) == jnp.float64


@pytest.mark.parametrize("dn,groups,cin", [(None, 1, 70), (("NHWC", "HWIO", "NHWC"), 1, 300), (None, 2, 8)])
def test_exact_conv_equals_int32_conv(dn, groups, cin):
    nchw = dn is None
    x = ints((2, cin, 9, 9) if nchw else (2, 9, 9, cin), -255, 255)
    w = ints((6, cin // groups, 3, 3) if nchw else (3, 3, cin // groups, 6), -128, 127)
    kw = dict(dimension_numbers=dn, feature_group_count=groups, rhs_dilation=(2, 1))
    with jax.default_device(jax.devices("cpu")[0]):  # the reference is an integer convolution, which XLA GPU does not have
        want = lax.conv_general_dilated(x, w, (2, 1), [(1, 2), (0, 1)], preferred_element_type=jnp.int32, **kw)
    got = intmath.exact_conv(x, w, (2, 1), [(1, 2), (0, 1)], bound=255 * 128, **kw)
    assert got.dtype == jnp.int32 and np.array_equal(np.asarray(got), np.asarray(want))


_EDGES = np.array([np.inf, -np.inf, 1e30, -1e30, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 127.5, 128.5, -128.5,
                   255.5, 4194303.5, 8388609.0, 16777217.0], np.float32)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, ml_dtypes.int4, ml_dtypes.uint4])
@pytest.mark.parametrize("zp_kind", ["none", "low", "high", "traced"])
def test_round_saturate_equals_round_half_even_plus_zero_point_then_clip(dtype, zp_kind):
    info = ml_dtypes.iinfo(dtype)
    zp = {"none": None, "low": int(info.min) + 1, "high": int(info.max) - 1, "traced": (int(info.max) + int(info.min)) // 2}[zp_kind]
    v = np.concatenate([np.arange(-70000, 70000, 0.25, dtype=np.float32), _EDGES,
                        RNG.standard_normal(4096).astype(np.float32) * 300])
    want = np.clip(np.round(v.astype(np.float64)) + (zp or 0), info.min, info.max).astype(np.int64)
    if zp_kind == "traced":
        got = jax.jit(lambda x, z: intmath.round_saturate(x, dtype, z))(v, np.asarray(zp, dtype))
    else:
        got = jax.jit(lambda x: intmath.round_saturate(x, dtype, None if zp is None else np.asarray(zp, dtype)))(v)
    assert got.dtype == np.dtype(dtype)
    assert np.array_equal(np.asarray(got).astype(np.int64), want)


def test_round_saturate_takes_the_plain_route_for_wide_types_and_non_float32():
    v = np.array([2.5, -3.5, 1e12, np.nan], np.float64)
    got = np.asarray(intmath.round_saturate(jnp.asarray(v, jnp.float32), np.int32))
    assert got[:2].tolist() == [2, -4] and got[2] == np.iinfo(np.int32).max
    half = jnp.asarray([2.5, -3.5, 300.0], jnp.bfloat16)
    assert np.asarray(intmath.round_saturate(half, np.int8, np.int8(1))).tolist() == [3, -3, 127]


def test_abs_bound_knows_narrow_and_4_bit_types():
    assert intmath.abs_bound(np.int8, shifted=False) == 128
    assert intmath.abs_bound(np.uint8, shifted=True) == 255
    assert intmath.abs_bound(ml_dtypes.int4, shifted=True) == 15


def test_w8a8_conv_matches_qwix():
    x = jnp.asarray(RNG.standard_normal((2, 5, 7, 7)), jnp.float32)
    w = jnp.asarray(RNG.standard_normal((4, 5, 3, 3)), jnp.float32)
    wq = qwix.quantize(w, jnp.int8, channelwise_axes=(0,))
    for act_scale in (None, jnp.float32(0.03)):
        got = arith.conv(x, arith.W8A8(wq, act_scale), (1, 1), "SAME")
        xq = (qwix.quantize(x, jnp.int8, channelwise_axes=(0,)) if act_scale is None
              else arith.quantize_static(x, act_scale))
        with jax.default_device(jax.devices("cpu")[0]):  # qwix's int8 convolution: XLA GPU has no integer convolutions
            want = qwix.conv_general_dilated(xq, wq, (1, 1), "SAME", preferred_element_type=jnp.float32)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def _zp_reference(a, za, b, zb, trans_b):
    ai = a.astype(np.int64) - (0 if za is None else np.asarray(za, np.int64))
    bi = b.astype(np.int64) - (0 if zb is None else np.asarray(zb, np.int64))
    return np.matmul(ai, np.swapaxes(bi, -1, -2) if trans_b else bi)


ZP_CASES = [  # a dtype, b dtype, lead dims, batched b, trans_b, a zero point, b zero point
    (np.uint8, np.int8, (), False, False, "scalar", None),      # onnxruntime quantize_dynamic (MatMulInteger)
    (np.int8, np.int8, (2,), False, True, "scalar", "column"),  # TFLite FC, per-channel weight zero points
    (np.int8, np.int8, (3,), False, True, "row", None),         # hybrid rows quantized asymmetrically
    (np.uint8, np.uint8, (2, 2), True, False, "row", "scalar"),  # batched QLinearMatMul
    (np.int8, np.uint8, (2,), True, True, None, "column"),
    (np.int8, np.int8, (), False, False, "zero", None),          # a zero point known to be 0: no correction
    (np.int16, np.int8, (2,), False, True, "scalar", None),      # not 8-bit: the exact float route
]


@pytest.mark.parametrize("da,db,lead,batched,trans_b,za_kind,zb_kind", ZP_CASES)
@pytest.mark.parametrize("traced", [False, True])
def test_zp_matmul_equals_int64_reference(da, db, lead, batched, trans_b, za_kind, zb_kind, traced):
    import jax

    rng = np.random.default_rng(11)
    m, k, n = 5, 300, 7

    def draw(dt, shape):
        info = np.iinfo(dt)
        return rng.integers(info.min, info.max + 1, shape).astype(dt)

    a = draw(da, lead + (m, k))
    bshape = (n, k) if trans_b else (k, n)
    b = draw(db, (lead if batched else ()) + bshape)
    za = {None: None, "zero": np.array(0, da), "scalar": draw(da, ()), "row": draw(da, lead + (m, 1))}[za_kind]
    zb = {None: None, "scalar": draw(db, ()), "column": draw(db, (n, 1) if trans_b else (1, n))}[zb_kind]
    f = (lambda *v: intmath.zp_matmul(*v, trans_b=trans_b))
    got = jax.jit(f)(a, za, b, zb) if traced and za is not None and zb is not None else f(a, za, b, zb)
    assert np.array_equal(np.asarray(got), _zp_reference(a, za, b, zb, trans_b))


@pytest.mark.cpu_program
def test_zp_matmul_takes_an_int8_dot_and_folds_column_sums_into_it():
    import jax

    a = np.zeros((4, 64), np.uint8)
    b = np.zeros((64, 32), np.int8)
    hlo = jax.jit(lambda a, b: intmath.zp_matmul(a, np.uint8(3), b, None)).lower(a, b).as_text()
    assert "tensor<5x64xi8>" in hlo and "i32" in hlo  # the ones row rides along in one int8 x int8 dot
    assert hlo.count("dot_general") == 1


@pytest.mark.parametrize("trans_b", [False, True])
def test_small_batched_products_run_as_exact_float32_dots(trans_b):
    import jax

    rng = np.random.default_rng(12)
    a = rng.integers(0, 256, (2, 4, 16, 16)).astype(np.uint8)  # attention scores x values, [B, H, S, S]
    b = rng.integers(0, 256, (2, 4, 16, 16)).astype(np.uint8)
    za, zb = np.uint8(128), np.uint8(7)
    f = jax.jit(lambda a, b: intmath.zp_matmul(a, za, b, zb, trans_b=trans_b))
    assert np.array_equal(np.asarray(f(a, b)), _zp_reference(a, za, b, zb, trans_b))
    hlo = f.lower(a, b).as_text()
    assert "xf32>" in hlo and "xi8>" not in hlo
    long_k = np.zeros((2, 4, 16, 300), np.uint8), np.zeros((2, 4, 300, 16), np.uint8)  # sums past 2**24: int8
    assert "xi8>" in jax.jit(lambda a, b: intmath.zp_matmul(a, za, b, zb)).lower(*long_k).as_text()
