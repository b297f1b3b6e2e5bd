"""The fixed-point rescale (MultiplyByQuantizedMultiplier and its parts) against a plain-integer reference.

The reference follows gemmlowp's definitions literally, with Python integers: the nudge of
2**30 (or 1 - 2**30), C's truncating division by 2**31, and RoundingDivideByPOT's mask and
threshold. The engine computes the same thing with one int64 product and int32 shifts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.converters.tflite import quant as Q

I32_MIN, I32_MAX = -(2**31), 2**31 - 1


def _wrap32(v: int) -> int:
    return ((v + 2**31) % 2**32) - 2**31


def _srdhm(a: int, b: int) -> int:
    if a == b == I32_MIN:
        return I32_MAX
    ab = a * b
    nudge = 2**30 if ab >= 0 else 1 - 2**30
    v = ab + nudge
    return v // 2**31 if v >= 0 else -((-v) // 2**31)  # C: truncate toward zero


def _rdbp(x: int, exponent: int, ties_away: bool) -> int:
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (1 if (x < 0 and ties_away) else 0)
    return (x >> exponent) + (1 if (x & mask) > threshold else 0)


def _mbqm(x: int, mult: int, shift: int, ties_away: bool = True) -> int:
    left, right = max(shift, 0), max(-shift, 0)
    return _rdbp(_srdhm(_wrap32(_wrap32(x) << left), mult), right, ties_away)


def _inputs(rng: np.random.Generator) -> np.ndarray:
    edge = [0, 1, -1, I32_MAX, I32_MIN, 2**30, -(2**30), 2**30 - 1, -(2**30) - 1, 2**15, -(2**15)]
    return np.concatenate([np.array(edge, np.int64), rng.integers(I32_MIN, I32_MAX, 400, endpoint=True),
                           rng.integers(-(2**22), 2**22, 400)])


@pytest.mark.parametrize("real", [1.0, 0.75, 0.5, 3.0e-3, 1.7e-7, 2.5e-10, 1234.5, -0.3])
@pytest.mark.parametrize("ties_away", [True, False])
def test_multiply_by_quantized_multiplier_matches_reference(real: float, ties_away: bool) -> None:
    rng = np.random.default_rng(11)
    x = _inputs(rng)
    mult, shift = Q.quantize_multiplier(real)
    want = np.array([_mbqm(int(v), mult, shift, ties_away) for v in x], np.int64)
    got64 = Q.multiply_by_quantized_multiplier(jnp.asarray(x), mult, shift, ties_away=ties_away)
    got32 = jax.jit(lambda v: Q.multiply_by_quantized_multiplier(v, mult, shift, ties_away=ties_away))(
        jnp.asarray(x.astype(np.int32)))
    assert got64.dtype == jnp.int64 and got32.dtype == jnp.int32  # int64 in, int64 out
    np.testing.assert_array_equal(np.asarray(got64), want)
    np.testing.assert_array_equal(np.asarray(got32), want)


def test_out_of_int32_values_wrap_first() -> None:
    x = np.array([2**31, 2**32 + 5, -(2**33) - 7, 3 * 2**31 - 1], np.int64)
    mult, shift = Q.quantize_multiplier(0.37)
    want = [_mbqm(int(v), mult, shift) for v in x]
    np.testing.assert_array_equal(np.asarray(Q.multiply_by_quantized_multiplier(jnp.asarray(x), mult, shift)), want)


def test_per_channel_host_and_traced_multipliers_agree() -> None:
    rng = np.random.default_rng(3)
    mult, shift = Q.quantize_multipliers(np.exp(rng.uniform(np.log(1e-6), np.log(40.0), 16)))
    away = rng.integers(0, 2, 16).astype(bool)
    x = rng.integers(I32_MIN, I32_MAX, (50, 16), endpoint=True)
    want = np.array([[_mbqm(int(x[i, c]), int(mult[c]), int(shift[c]), bool(away[c])) for c in range(16)]
                     for i in range(50)], np.int64)
    host = Q.multiply_by_quantized_multiplier(jnp.asarray(x), mult, shift, ties_away=away)
    traced = jax.jit(lambda v, m, s: Q.multiply_by_quantized_multiplier(v, m, s, ties_away=away))(
        jnp.asarray(x.astype(np.int32)), jnp.asarray(mult), jnp.asarray(shift))
    np.testing.assert_array_equal(np.asarray(host), want)
    np.testing.assert_array_equal(np.asarray(traced), want)


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_rounding_divide_by_pot_matches_reference(dtype) -> None:
    x = _inputs(np.random.default_rng(5)).astype(dtype)
    for exponent in (0, 1, 7, 30, 31):
        for ties_away in (True, False):
            want = [_rdbp(int(v), exponent, ties_away) for v in x]
            got = Q.rounding_divide_by_pot(jnp.asarray(x), exponent, ties_away)
            assert got.dtype == dtype
            np.testing.assert_array_equal(np.asarray(got), want)


def test_srdhm_saturates_only_at_int32_min_squared() -> None:
    a = jnp.asarray(np.array([I32_MIN, I32_MIN, I32_MAX, -5], np.int64))
    got = jax.jit(lambda v, b: Q.srdhm(v, b))(a, jnp.asarray(np.array([I32_MIN, I32_MAX, I32_MIN, 7], np.int64)))
    want = [_srdhm(I32_MIN, I32_MIN), _srdhm(I32_MIN, I32_MAX), _srdhm(I32_MAX, I32_MIN), _srdhm(-5, 7)]
    np.testing.assert_array_equal(np.asarray(got), want)
