"""gemmlowp-style fixed-point arithmetic on int32 values held in int64 JAX arrays.

TFLite's integer LOG_SOFTMAX (and other transcendental kernels) evaluate exp and
log in Qm.n fixed point with gemmlowp's primitives: a saturating rounding
doubling high multiply for products, rounding shifts for rescaling, wrapping
int32 adds. Written from gemmlowp's documented semantics so the results match
the reference kernels bit for bit. A value in ``Q(m).(31-m)`` is called "Fm".
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .quant import INT32_MAX, INT32_MIN, rounding_divide_by_pot, srdhm, wrap32

#: gemmlowp's fixed-point constants (raw int32 values).
_EXP_MINUS_ONE_EIGHTH = 1895147668  # exp(-1/8) in F0
_ONE_THIRD = 715827883  # 1/3 in F0
#: exp(-2**k) in F0 for the barrel shifter, k = -2 .. 4.
_EXP_BARREL = {-2: 1672461947, -1: 1302514674, 0: 790015084, 1: 290630308, 2: 39332535, 3: 720401, 4: 242}
_F2_48_OVER_17 = 1515870810
_F2_NEG_32_OVER_17 = -1010580540
_LOG_2 = 1488522236
_SQRT_SQRT_HALF = 1805811301
_SQRT_HALF = 1518500250
_ONE_QUARTER = 536870912
_ALPHA_N = 117049297
_ALPHA_D = 127690142
_ALPHA_I = 1057819769
_ALPHA_F = 638450708


def sat32(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.clip(x, INT32_MIN, INT32_MAX)


def mul(a: jnp.ndarray, b) -> jnp.ndarray:
    """Fixed-point product (Fm * Fn -> F(m+n)): SaturatingRoundingDoublingHighMul."""
    return srdhm(jnp.asarray(a, jnp.int64), jnp.asarray(b, jnp.int64))


def shift_left_sat(x: jnp.ndarray, exponent: int) -> jnp.ndarray:
    """SaturatingRoundingMultiplyByPOT with a positive exponent: a left shift saturating at int32."""
    if exponent == 0:
        return x
    threshold = (1 << (31 - exponent)) - 1
    y = x << exponent
    return jnp.where(x > threshold, INT32_MAX, jnp.where(x < -threshold, INT32_MIN, y))


def mul_pot(x: jnp.ndarray, exponent: int) -> jnp.ndarray:
    """SaturatingRoundingMultiplyByPOT: saturating left shift or rounding right shift."""
    if exponent >= 0:
        return shift_left_sat(x, exponent)
    return rounding_divide_by_pot(x, -exponent)


def rescale(x: jnp.ndarray, bits_src: int, bits_dst: int) -> jnp.ndarray:
    """gemmlowp ``Rescale``: change the integer bits of a fixed-point value."""
    return mul_pot(x, bits_src - bits_dst)


def rounding_half_sum(a: jnp.ndarray, b) -> jnp.ndarray:
    """(a + b) / 2 rounded to nearest (ties away from zero), as gemmlowp's RoundingHalfSum."""
    s = a + b
    t = s + jnp.where(s >= 0, 1, -1)
    return jnp.where(t >= 0, t // 2, -((-t) // 2))


def clz32(x: jnp.ndarray) -> jnp.ndarray:
    """Count of leading zero bits of the value as a uint32."""
    return lax.clz((x & 0xFFFFFFFF).astype(jnp.uint32)).astype(jnp.int64)


def _exp_quarter_interval(a: jnp.ndarray) -> jnp.ndarray:
    """exp(a) for F0 ``a`` in [-1/4, 0): a Taylor expansion around -1/8."""
    x = wrap32(a + (1 << 28))
    x2 = mul(x, x)
    x3 = mul(x2, x)
    x4 = mul(x2, x2)
    x4_over_4 = rounding_divide_by_pot(x4, 2)
    poly = rounding_divide_by_pot(wrap32(mul(wrap32(x4_over_4 + x3), _ONE_THIRD) + x2), 1)
    return wrap32(_EXP_MINUS_ONE_EIGHTH + mul(_EXP_MINUS_ONE_EIGHTH, wrap32(x + poly)))


def exp_on_negative_values(a: jnp.ndarray, integer_bits: int) -> jnp.ndarray:
    """exp(a) in F0 for a value ``a <= 0`` in F(integer_bits)."""
    frac = 31 - integer_bits
    quarter = 1 << (frac - 2)
    a_mod = wrap32((a & (quarter - 1)) - quarter)
    result = _exp_quarter_interval(rescale(a_mod, integer_bits, 0))
    remainder = wrap32(a_mod - a)
    for exponent, multiplier in _EXP_BARREL.items():
        if integer_bits > exponent:
            bit = 1 << (frac + exponent)
            result = jnp.where((remainder & bit) != 0, mul(result, multiplier), result)
    if integer_bits > 5:
        clamp = -(1 << (36 - integer_bits))
        result = jnp.where(a < clamp, 0, result)
    return jnp.where(a == 0, INT32_MAX, result)


def one_over_one_plus_x_for_x_in_0_1(a: jnp.ndarray) -> jnp.ndarray:
    """1 / (1 + a) for F0 ``a`` in [0, 1): three Newton-Raphson steps in F2."""
    half_denominator = rounding_half_sum(a, INT32_MAX)
    x = wrap32(_F2_48_OVER_17 + mul(half_denominator, _F2_NEG_32_OVER_17))
    one_f2 = 1 << 29
    for _ in range(3):
        one_minus = wrap32(one_f2 - mul(half_denominator, x))
        x = wrap32(x + rescale(mul(x, one_minus), 4, 2))
    return rescale(x, 1, 0)  # ExactMulByPot<-1> turns F2 into F1, then Rescale<0>


def _shift_param(x: jnp.ndarray, exponent) -> jnp.ndarray:
    """SaturatingRoundingMultiplyByPOTParam for a non-negative runtime exponent (per element)."""
    exponent = jnp.asarray(exponent, jnp.int64)
    threshold = (jnp.int64(1) << (31 - exponent)) - 1
    y = x << exponent
    y = jnp.where(x > threshold, INT32_MAX, jnp.where(x < -threshold, INT32_MIN, y))
    return jnp.where(exponent == 0, x, y)


def log_x_for_x_ge_1(x: jnp.ndarray, input_bits: int, output_bits: int) -> jnp.ndarray:
    """log(x) in F(output_bits) for F(input_bits) ``x >= 1`` (TFLite's log_x_for_x_greater_than_or_equal_to_1)."""
    accum_bits = output_bits + 1
    shifted_quarter = rescale(jnp.int64(_ONE_QUARTER), 0, accum_bits)
    z_a = x
    z_a_headroom_plus_1 = clz32(z_a)
    r_a_tmp = _shift_param(z_a, z_a_headroom_plus_1 - 1)
    r_a_raw = _shift_param(mul(r_a_tmp, _SQRT_HALF), 1)
    z_a_pow_2_adj = sat32(_shift_param(input_bits - z_a_headroom_plus_1, 31 - accum_bits) + shifted_quarter)
    z_b = mul(z_a, _SQRT_HALF)
    z_b_headroom = clz32(z_b) - 1
    r_b_raw = _shift_param(z_a, z_b_headroom)
    z_b_pow_2_adj = sat32(_shift_param(input_bits - z_b_headroom, 31 - accum_bits) - shifted_quarter)
    r = jnp.minimum(r_a_raw, r_b_raw)
    z_pow_2_adj = jnp.maximum(z_a_pow_2_adj, z_b_pow_2_adj)
    p = rounding_half_sum(r, _SQRT_SQRT_HALF)
    q = wrap32(r - _SQRT_SQRT_HALF)
    q = wrap32(q + q)
    common_sq = mul(q, q)
    num = wrap32(mul(q, r) + mul(mul(q, common_sq), _ALPHA_N))
    denom_minus_one = wrap32(mul(p, wrap32(wrap32(_ALPHA_I + q) + mul(_ALPHA_D, common_sq))) + mul(_ALPHA_F, q))
    recip_denom = one_over_one_plus_x_for_x_in_0_1(denom_minus_one)
    num_scaled = rescale(num, 0, accum_bits)
    total = wrap32(mul(z_pow_2_adj, _LOG_2) + mul(num_scaled, recip_denom))
    return rescale(total, accum_bits, output_bits)
