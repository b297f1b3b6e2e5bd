"""intmath: integer products through float sums equal XLA's int32 products exactly."""

from __future__ import annotations

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
    want = lax.conv_general_dilated(x, w, (2, 1), [(1, 2), (0, 1)], preferred_element_type=jnp.int32, **kw)
    got = intmath.exact_conv(x, w, (2, 1), [(1, 2), (0, 1)], bound=255 * 128, **kw)
    assert got.dtype == jnp.int32 and np.array_equal(np.asarray(got), np.asarray(want))


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
        want = qwix.conv_general_dilated(xq, wq, (1, 1), "SAME", preferred_element_type=jnp.float32)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
