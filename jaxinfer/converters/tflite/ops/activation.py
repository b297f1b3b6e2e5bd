"""Activation and normalization builtins (float, and int8/uint8 where TFLite has them)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from ....registry import OpDef, registrar
from .. import fixedpoint as FP
from .. import int16 as I16
from .. import quant as Q
from ._util import QList, is_quantized

OPS: list[OpDef] = []
op = registrar(OPS, domain="tflite")


def _requantize_clamp(x, qi: Q.QParams, qo: Q.QParams, lo: float | None, hi: float | None):
    """Rescale ``x`` from ``qi`` to ``qo`` with a fixed-point multiplier, then clamp to [lo, hi] (real values)."""
    y = Q.requantize(jnp.asarray(x, jnp.int64) - qi.zp, float(qi.s) / float(qo.s), qo, (qo.qmin, qo.qmax))
    qlo = qo.qmin if lo is None else max(qo.qmin, Q.quantize_value(lo, qo))
    qhi = qo.qmax if hi is None else min(qo.qmax, Q.quantize_value(hi, qo))
    return jnp.clip(y, qlo, qhi).astype(qo.dtype)


def _clamp_op(name: str, lo: float | None, hi: float | None) -> None:
    def clamp(x, *, in_q: QList = None, out_q: QList = None):
        if is_quantized(in_q, out_q):
            return _requantize_clamp(x, in_q[0], out_q[0], lo, hi)
        return jnp.clip(x, lo, hi)

    clamp.__doc__ = f"{name}: clamp to [{lo}, {hi}]."
    op(name)(clamp)


_clamp_op("RELU", 0.0, None)
_clamp_op("RELU6", 0.0, 6.0)
_clamp_op("RELU_N1_TO_1", -1.0, 1.0)
_clamp_op("RELU_0_TO_1", 0.0, 1.0)


def _lut_or_float(x, in_q: QList, out_q: QList, fn_np, fn_jnp):
    if is_quantized(in_q, out_q):
        if np.dtype(in_q[0].dtype).itemsize != 1:
            raise ValueError("quantized activation supports int8/uint8 inputs (got int16)")
        return Q.table_lookup(x, Q.lut_8bit(fn_np, in_q[0], out_q[0]), in_q[0])
    return fn_jnp(x)


def _sigmoid_np(v):
    return (1.0 / (1.0 + np.exp(-v.astype(np.float32)))).astype(np.float32)


def _is_int16(in_q: QList, out_q: QList) -> bool:
    return is_quantized(in_q, out_q) and np.dtype(in_q[0].dtype) == np.int16


@op("LOGISTIC")
def logistic(x, *, in_q: QList = None, out_q: QList = None):
    """Sigmoid; 8-bit tensors through a 256-entry table, int16 through TFLite's interpolated LUT."""
    if _is_int16(in_q, out_q):
        return I16.logistic16(x, in_q[0], out_q[0])
    return _lut_or_float(x, in_q, out_q, _sigmoid_np, jax.nn.sigmoid)


@op("TANH")
def tanh(x, *, in_q: QList = None, out_q: QList = None):
    """tanh; 8-bit tensors through a 256-entry table, int16 through TFLite's interpolated LUT."""
    if _is_int16(in_q, out_q):
        return I16.tanh16(x, in_q[0], out_q[0])
    return _lut_or_float(x, in_q, out_q, lambda v: np.tanh(v).astype(np.float32), jnp.tanh)


def _hard_swish_np(v):
    return (v * np.clip(v + 3.0, 0.0, 6.0) / 6.0).astype(np.float32)


def _srdhm16(a: np.ndarray, b: int) -> np.ndarray:
    """int16 SaturatingRoundingDoublingHighMul (values held in int64)."""
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
    r = np.trunc((ab + nudge) / (1 << 15)).astype(np.int64)
    return np.where((a == -32768) & (b == -32768), 32767, r)


def _sat_shift16(x: np.ndarray, exponent: int) -> np.ndarray:
    return np.clip(x * (1 << exponent), -32768, 32767)


def _rdbp16(x: np.ndarray, exponent: int) -> np.ndarray:
    """Rounding (half away from zero) arithmetic right shift."""
    if exponent == 0:
        return x
    mask = (1 << exponent) - 1
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + ((x & mask) > threshold)


def _int16_multiplier(real: np.float32) -> tuple[int, int]:
    """QuantizeMultiplier, then the Q31 multiplier rounded down to Q15 (TFLite's DownScaleInt32ToInt16Multiplier)."""
    m32, exponent = Q.quantize_multiplier(float(real))
    m16 = 32767 if m32 >= (1 << 31) - 1 - (1 << 15) else (m32 + (1 << 15)) >> 16
    return m16, exponent


def hard_swish_table(qi: Q.QParams, qo: Q.QParams) -> np.ndarray:
    """The 8-bit HARD_SWISH of TFLite's fixed-point kernel, as a 256-entry table.

    The input offset is moved to a 2**-7 finer scale; a "reluish" factor relu6(x + 3) / 6 is
    formed in Q15 (a 3/32768-scaled value shifted and halved onto [0, 1)), multiplied with the
    input rescaled to the output scale, then shifted down and offset by the output zero point.
    """
    hires = np.float32(1.0 / 128.0) * np.float32(qi.s)
    out_m, out_e = _int16_multiplier(np.float32(hires / np.float32(qo.s)))
    rel_m, rel_e = _int16_multiplier(np.float32(hires / np.float32(3.0 / 32768.0)))
    if out_e > 0:
        raise ValueError(f"HARD_SWISH: output scale {qo.s} too small for input scale {qi.s} (TFLite requires <= 1/128 ratio)")
    v = np.arange(qi.qmin, qi.qmax + 1, dtype=np.int64) - qi.zp
    hires_v = v * 128
    pre_out = _srdhm16(hires_v, out_m)
    rel = hires_v
    if rel_e > 0:
        rel = _sat_shift16(rel, rel_e - 1)
    rel = _srdhm16(rel, rel_m)
    if rel_e > 0:
        rel = _sat_shift16(rel, 1)
    if rel_e < 0:
        rel = _rdbp16(rel, -rel_e)
    rel = (rel + (1 << 15)) >> 1
    prod = rel * pre_out
    prod = np.trunc(prod / (1 << 15)).astype(np.int64)  # SaturatingDoublingHighMul (truncating)
    out = _rdbp16(prod, -out_e) + qo.zp
    return np.clip(out, qo.qmin, qo.qmax).astype(qo.dtype)


@op("HARD_SWISH")
def hard_swish(x, *, in_q: QList = None, out_q: QList = None):
    """x * relu6(x + 3) / 6; 8-bit tensors follow TFLite's fixed-point kernel (a 256-entry table)."""
    if is_quantized(in_q, out_q) and np.dtype(in_q[0].dtype).itemsize == 1:
        return Q.table_lookup(x, hard_swish_table(in_q[0], out_q[0]), in_q[0])
    return _lut_or_float(x, in_q, out_q, _hard_swish_np, lambda v: v * jnp.clip(v + 3.0, 0.0, 6.0) / 6.0)


@op("ELU")
def elu(x, *, in_q: QList = None, out_q: QList = None):
    """x if x > 0 else exp(x) - 1."""
    return _lut_or_float(x, in_q, out_q, lambda v: np.where(v > 0, v, np.expm1(v)).astype(np.float32), jax.nn.elu)


@op("GELU")
def gelu(x, *, approximate: bool = False, in_q: QList = None, out_q: QList = None):
    """GELU, exact (erf) or tanh-approximated."""
    def np_fn(v):
        v = v.astype(np.float64)
        if approximate:
            y = 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
        else:
            from math import erf

            y = 0.5 * v * (1 + np.vectorize(erf)(v / np.sqrt(2)))
        return y.astype(np.float32)

    return _lut_or_float(x, in_q, out_q, np_fn, lambda v: jax.nn.gelu(v, approximate=bool(approximate)))


@op("LEAKY_RELU")
def leaky_relu(x, *, alpha: float = 0.2, in_q: QList = None, out_q: QList = None):
    """x if x >= 0 else alpha * x."""
    a = float(np.float32(alpha))
    if is_quantized(in_q, out_q):
        qi, qo = in_q[0], out_q[0]
        v = jnp.asarray(x, jnp.int64) - qi.zp
        ident = Q.multiply_by_quantized_multiplier(v, *Q.quantize_multiplier(float(qi.s) / float(qo.s)))
        neg = Q.multiply_by_quantized_multiplier(v, *Q.quantize_multiplier(float(qi.s) * a / float(qo.s)))
        return jnp.clip(jnp.where(v >= 0, ident, neg) + qo.zp, qo.qmin, qo.qmax).astype(qo.dtype)
    return _lut_or_float(x, in_q, out_q, lambda v: np.where(v >= 0, v, np.float32(a) * v).astype(np.float32),
                         lambda v: jnp.where(v >= 0, v, a * v))


@op("PRELU")
def prelu(x, alpha):
    """x if x >= 0 else alpha * x (alpha broadcast)."""
    return jnp.where(x >= 0, x, alpha * x)


def _softmax_8bit(x, beta: float, qi: Q.QParams, qo: Q.QParams):
    """TFLite's 8-bit softmax: exp of (x - max) from a float table, normalized in float32, rounded."""
    scale = np.float32(-np.float32(qi.s) * np.float32(beta))
    table = np.exp(scale * np.arange(256, dtype=np.float32)).astype(np.float32)  # table[d] = exp(-s*beta*d)
    xi = jnp.asarray(x, jnp.int32)
    diff = jnp.max(xi, axis=-1, keepdims=True) - xi
    e = jnp.take(jnp.asarray(table), diff, axis=0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    inv = jnp.float32(1.0) / (total * jnp.float32(qo.s))
    p = e * inv
    r = jnp.sign(p) * jnp.floor(jnp.abs(p) + 0.5)
    return jnp.clip(r.astype(jnp.int32) + qo.zp, qo.qmin, qo.qmax).astype(qo.dtype)


@op("SOFTMAX")
def softmax(x, *, beta: float = 1.0, in_q: QList = None, out_q: QList = None):
    """softmax(beta * x) over the last axis."""
    if is_quantized(in_q, out_q):
        return _softmax_8bit(x, beta, in_q[0], out_q[0])
    return jax.nn.softmax(x * float(np.float32(beta)), axis=-1)


def log_softmax_params(input_scale: float) -> tuple[int, int, int, int, int]:
    """Prepare-time constants of TFLite's integer LOG_SOFTMAX (beta 1, inputs rescaled to Q5.26).

    Returns ``(input_multiplier, input_shift, reverse_multiplier, reverse_shift, diff_min)``:
    the input difference's rescale to Q5.26, its approximate inverse (used to bound the
    differences whose output is not the minimum) and the most negative difference whose
    rescale cannot overflow.
    """
    real = min(float(input_scale) * (1 << (31 - _LOG_SOFTMAX_INPUT_BITS)), (1 << 31) - 1.0)
    mult, shift = Q.quantize_multiplier(real)
    if shift < 0:
        raise ValueError(f"LOG_SOFTMAX: input scale {input_scale} too small (the Q5.26 rescale must be > 1)")
    rev_mult, rev_shift = Q.quantize_multiplier((1 << (31 - shift)) / float(mult))
    radius = math.floor(((1 << _LOG_SOFTMAX_INPUT_BITS) - 1) * float(1 << (31 - _LOG_SOFTMAX_INPUT_BITS))
                        / float(1 << shift))
    return mult, shift, rev_mult, rev_shift, -radius


_LOG_SOFTMAX_INPUT_BITS = 5  # differences in Q5.26: exp(-16) and below are negligible
_LOG_SOFTMAX_SUM_BITS = 12  # the sum of exps accumulates in Q12.19
_LOG_SOFTMAX_OUTPUT_BITS = 4  # the output is log-probability in [-16, 0] with scale 16/256


def _log_softmax_8bit(x, qi: Q.QParams, qo: Q.QParams):
    """TFLite's reference integer LOG_SOFTMAX (8-bit in and out, output scale 16/256, zero point qmax).

    Per row: differences to the row max are rescaled to Q5.26, exponentiated in fixed point
    and summed in Q12.19; the log of the sum (Q5.26) is subtracted from each difference and
    the result rounded down to the output's 1/16 steps. Differences too negative to matter
    (below ``diff_min``, or whose result would underflow) give the minimum output.
    """
    if qo.zp != qo.qmax or abs(float(qo.s) - 16.0 / 256) > 1e-9:
        raise ValueError(f"quantized LOG_SOFTMAX needs output scale 16/256 and zero point {qo.qmax} "
                         f"(got {qo.s}, {qo.zp})")
    mult, shift, rev_mult, rev_shift, diff_min = log_softmax_params(qi.s)
    xi = jnp.asarray(x, jnp.int64)
    diff = xi - jnp.max(xi, axis=-1, keepdims=True)
    diff_q5 = Q.multiply_by_quantized_multiplier(diff, mult, shift)
    exps = FP.rescale(FP.exp_on_negative_values(diff_q5, _LOG_SOFTMAX_INPUT_BITS), 0, _LOG_SOFTMAX_SUM_BITS)
    total = FP.wrap32(jnp.sum(jnp.where(diff >= diff_min, exps, 0), axis=-1, keepdims=True))
    log_sum = FP.log_x_for_x_ge_1(total, _LOG_SOFTMAX_SUM_BITS, _LOG_SOFTMAX_INPUT_BITS)
    bound = Q.multiply_by_quantized_multiplier(log_sum + Q.INT32_MIN, rev_mult, rev_shift)
    adjusted_min = jnp.maximum(diff_min - 1, bound)
    out_shift = 31 - _LOG_SOFTMAX_INPUT_BITS - _LOG_SOFTMAX_OUTPUT_BITS
    y = Q.rounding_divide_by_pot(diff_q5 - log_sum, out_shift) + qo.zp
    y = jnp.where(diff > adjusted_min, jnp.clip(y, qo.qmin, qo.qmax), qo.qmin)
    return y.astype(qo.dtype)


@op("LOG_SOFTMAX")
def log_softmax(x, *, in_q: QList = None, out_q: QList = None):
    """log(softmax(x)) over the last axis; 8-bit tensors follow TFLite's fixed-point reference kernel."""
    if is_quantized(in_q, out_q):
        if np.dtype(in_q[0].dtype).itemsize != 1:
            raise ValueError(f"quantized LOG_SOFTMAX supports int8/uint8 (got {np.dtype(in_q[0].dtype).name})")
        return _log_softmax_8bit(x, in_q[0], out_q[0])
    return jax.nn.log_softmax(x, axis=-1)


@op("L2_NORMALIZATION")
def l2_normalization(x, *, fused_activation_function: str = "NONE"):
    """x / sqrt(max(sum(x**2, last axis), 1e-6))."""
    from ._util import fused

    ss = jnp.sum(x * x, axis=-1, keepdims=True)
    return fused(x / jnp.sqrt(jnp.maximum(ss, 1e-6)), fused_activation_function)


@op("LOCAL_RESPONSE_NORMALIZATION")
def lrn(x, *, radius: int = 5, bias: float = 1.0, alpha: float = 1.0, beta: float = 0.5):
    """x / (bias + alpha * sum of squares over a channel window of 2*radius+1) ** beta (NHWC)."""
    sq = x * x
    c = x.shape[-1]
    padded = jnp.pad(sq, [(0, 0)] * (x.ndim - 1) + [(radius, radius)])
    window = sum(padded[..., i: i + c] for i in range(2 * radius + 1))
    return x / jnp.power(bias + alpha * window, beta)
