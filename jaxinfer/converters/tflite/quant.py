"""TFLite's affine quantization and its fixed-point integer arithmetic.

A real value is ``scale * (q - zero_point)``. Integer kernels accumulate in
int32 and requantize with a fixed-point multiplier (an int32 in Q31) and a
power-of-two shift, rounding as TFLite's reference kernels do: a saturating
rounding doubling high multiply, then a rounding right shift (ties away from
zero). LiteRT's kernel sets differ in places (see :func:`requantize`'s
roundings): ruy rounds the final shift's ties up, the reference
FULLY_CONNECTED rounds ``double(acc) * real`` instead. Multipliers are derived
on the host in float64 from the float32 scales, as TFLite does at prepare
time; the per-element math runs in int64 in JAX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp
import numpy as np

from ...intmath import divide, quotient

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1


@dataclass(frozen=True, eq=False)
class QParams:
    """Affine quantization of one tensor: per tensor (one scale) or per ``axis``."""

    scale: np.ndarray  # float32, shape (1,) or (channels,)
    zero_point: np.ndarray  # int64, same shape
    axis: int
    dtype: np.dtype

    @property
    def per_axis(self) -> bool:
        return self.scale.size > 1

    @property
    def s(self) -> float:
        """The per-tensor scale (raises for per-axis params)."""
        if self.per_axis:
            raise ValueError(f"expected per-tensor quantization, got {self.scale.size} scales on axis {self.axis}")
        return float(self.scale[0])

    @property
    def zp(self) -> int:
        if self.zero_point.size > 1 and np.any(self.zero_point != self.zero_point[0]):
            raise ValueError("expected one zero point, got a per-axis vector")
        return int(self.zero_point[0])

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def __repr__(self) -> str:
        sc = self.scale[0] if self.scale.size == 1 else f"{self.scale.size} scales@axis{self.axis}"
        return f"QParams({self.dtype.name}, scale={sc}, zp={self.zero_point[:1].tolist()})"


def quantize_multiplier(m: float) -> tuple[int, int]:
    """A real multiplier as (Q31 int32 multiplier, shift): ``m ~= q * 2**(shift - 31)``."""
    if m == 0.0:
        return 0, 0
    frac, shift = math.frexp(m)
    q = int(math.floor(abs(frac) * (1 << 31) + 0.5)) * (1 if frac >= 0 else -1)  # TfLiteRound: ties away from zero
    if q == (1 << 31):
        q //= 2
        shift += 1
    if shift < -31:
        return 0, 0
    if shift > 30:
        raise ValueError(f"requantization multiplier {m} is too large (expected < 2**30)")
    return q, shift


def quantize_multipliers(ms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pairs = [quantize_multiplier(float(m)) for m in np.ravel(ms)]
    return np.array([p[0] for p in pairs], np.int64), np.array([p[1] for p in pairs], np.int64)


#: The LiteRT CPU kernel sets whose integer arithmetic the quantized ops can follow, picked by
#: ``load_tflite(requant=...)`` and passed to the ops that differ as ``quant_kernel``.
QUANT_KERNELS = ("reference", "builtin", "xnnpack")


def check_kernel(kernel: str, what: str = "quant_kernel") -> None:
    """Raise unless ``kernel`` names one of :data:`QUANT_KERNELS`."""
    if kernel not in QUANT_KERNELS:
        raise ValueError(f"{what}={kernel!r}: expected one of {QUANT_KERNELS}")


def _host_int(v: Any) -> np.ndarray | None:
    """``v`` as a host int64 array when it is known at trace time (a Python or numpy integer), else None."""
    if isinstance(v, (int, np.integer, np.ndarray)):
        return np.asarray(v, np.int64)
    return None


def srdhm(a: jnp.ndarray, b: jnp.ndarray) -> jnp.ndarray:
    """SaturatingRoundingDoublingHighMul of int32 values held in int64.

    gemmlowp adds a nudge of 2**30 (or 1 - 2**30 below zero) and divides by 2**31 truncating;
    for either sign that equals ``floor((a*b + 2**30) / 2**31)``: one add and one arithmetic
    shift. The one saturating case, INT32_MIN * INT32_MIN, is only checked when ``b`` may be it.
    """
    hb = _host_int(b)
    a, b = jnp.asarray(a, jnp.int64), jnp.asarray(b, jnp.int64)
    res = (a * b + (1 << 30)) >> 31
    if hb is not None and not np.any(hb == INT32_MIN):
        return res
    return jnp.where((a == INT32_MIN) & (b == INT32_MIN), INT32_MAX, res)


def rounding_divide_by_pot(x: jnp.ndarray, exponent: jnp.ndarray, ties_away=True) -> jnp.ndarray:
    """Arithmetic right shift by ``exponent`` rounding to nearest, in ``x``'s integer dtype.

    Ties go away from zero (gemmlowp's RoundingDivideByPOT) where ``ties_away`` is true, up
    (toward +inf, ``(x + 2**(exponent-1)) >> exponent``: ruy's and the SIMD output stages)
    where it is false; ``ties_away`` may be an array broadcasting against ``x``. An int32 ``x``
    needs ``exponent`` <= 31.
    """
    x = jnp.asarray(x)
    dt = x.dtype if jnp.issubdtype(x.dtype, jnp.signedinteger) else jnp.int64
    x = x.astype(dt)
    he = _host_int(exponent)
    if he is not None:  # mask and threshold folded on the host
        exponent, mask = he.astype(dt), ((np.int64(1) << he) - 1).astype(dt)
        half = mask >> 1
    else:
        exponent = jnp.asarray(exponent, dt)
        mask = (jnp.asarray(1, dt) << exponent) - 1
        half = mask >> 1
    threshold = half + ((x < 0) & jnp.asarray(ties_away, bool)).astype(dt)
    return (x >> exponent) + (x & mask > threshold).astype(dt)


def multiply_by_quantized_multiplier(x: jnp.ndarray, mult: np.ndarray | int, shift: np.ndarray | int,
                                     ties_away=True) -> jnp.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier on int32 values (held in int32 or int64), broadcasting mult/shift.

    Two roundings: SaturatingRoundingDoublingHighMul (ties up), then a rounding right shift
    whose ties go as ``ties_away`` says (see :func:`rounding_divide_by_pot`). ``x`` and
    ``x * 2**left`` wrap to int32 as in the C++ code. Only the product is formed in int64;
    the shifts run in int32 (XLA CPU vectorizes those, and not int64 ones). The result has
    ``x``'s dtype (int64 in, int64 out).
    """
    x = jnp.asarray(x)
    out = jnp.int64 if x.dtype == jnp.int64 else jnp.int32
    host = _host_int(shift)
    if host is None:
        shift = jnp.asarray(shift, jnp.int32)
        left, right = jnp.maximum(shift, 0), jnp.maximum(-shift, 0)
    else:
        left, right = np.maximum(host, 0).astype(np.int32), np.maximum(-host, 0).astype(np.int32)
        left = left if np.any(left) else None
    shifted = x.astype(jnp.int32) if left is None else x.astype(jnp.int32) << left
    high = srdhm(shifted, mult).astype(jnp.int32)
    return rounding_divide_by_pot(high, right, ties_away).astype(out)


def multiply_by_quantized_multiplier_64(x: jnp.ndarray, mult: np.ndarray | int, shift: np.ndarray | int) -> jnp.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier for int64 accumulators (16x8 kernels with int64 bias).

    The Q31 multiplier is first rounded to Q15, then one rounding right shift (ties up) by
    ``15 - shift``: a single rounding, unlike the int32 version's two.
    """
    x = jnp.asarray(x, jnp.int64)
    mult = jnp.asarray(mult, jnp.int64)
    shift = jnp.asarray(shift, jnp.int64)
    reduced = jnp.where(mult < 0x7FFF0000, (mult + (1 << 15)) >> 16, 0x7FFF)
    total_shift = 15 - shift
    return (x * reduced + (jnp.int64(1) << (total_shift - 1))) >> total_shift


def multiply_by_quantized_multiplier_single(x: jnp.ndarray, mult: np.ndarray | int,
                                            shift: np.ndarray | int) -> jnp.ndarray:
    """``x * mult / 2**(31 - shift)`` with one rounding (ties up), on int64 values.

    LiteRT's int16 FULLY_CONNECTED rescales its int64 accumulator this way (measured
    against its reference and builtin kernels: the full Q31 multiplier, a single round).
    """
    x = jnp.asarray(x, jnp.int64)
    mult = jnp.asarray(mult, jnp.int64)
    total_shift = 31 - jnp.asarray(shift, jnp.int64)
    return (x * mult + (jnp.int64(1) << (total_shift - 1))) >> total_shift


def multiply_by_quantized_multiplier_ties_up(x: jnp.ndarray, mult: np.ndarray | int,
                                             shift: np.ndarray | int) -> jnp.ndarray:
    """MultiplyByQuantizedMultiplier whose final right shift rounds ties up (toward +inf).

    LiteRT's ruy GEMM (its builtin FULLY_CONNECTED, uint8 CONV_2D and int8 CONV_2D) requantizes
    this way on x86-64; the reference kernels round ties away from zero.
    """
    return multiply_by_quantized_multiplier(x, mult, shift, ties_away=False)


def multiply_by_real_float64(x: jnp.ndarray, real: np.ndarray | float) -> jnp.ndarray:
    """``round(double(x) * real)`` with C's ``round`` (ties away from zero), on int64-held values.

    LiteRT's reference FULLY_CONNECTED (8-bit and 16x8) rescales its accumulator this way, with
    ``real = double(input_scale) * double(filter_scale) / double(output_scale)``: no fixed-point
    multiplier at all. The product is rounded to float64 first, as C does; the tie test compares
    it with ``floor + 0.5`` (exact below 2**52) rather than subtracting, so nothing can fuse the
    multiply into an FMA.
    """
    p = jnp.asarray(x, jnp.int64).astype(jnp.float64) * jnp.asarray(real, jnp.float64)
    f = jnp.floor(p)
    half = f + 0.5
    up = (p > half) | ((p == half) & (p > 0))
    return f.astype(jnp.int64) + up.astype(jnp.int64)


def simd_ties_away(channels: int, block: int) -> np.ndarray:
    """Per channel: False for channels in whole blocks of ``block`` (a SIMD output stage, ties up), True for the tail."""
    return np.arange(channels) >= channels - channels % block


#: Requantization variants by name (see :func:`requantize`).
RESCALES = {
    "double": multiply_by_quantized_multiplier,
    "ties_up": multiply_by_quantized_multiplier_ties_up,
    "int64": multiply_by_quantized_multiplier_64,
    "single": multiply_by_quantized_multiplier_single,
}
#: Rescales that take the real multiplier itself rather than a Q31 multiplier and shift.
REAL_RESCALES = {"float64": multiply_by_real_float64}


def wrap32(x: jnp.ndarray) -> jnp.ndarray:
    """Two's-complement int32 wrap-around of an int64-held value (C int32 addition)."""
    return ((x + (1 << 31)) & 0xFFFFFFFF) - (1 << 31)


def requantize(acc: jnp.ndarray, real_multiplier: np.ndarray | float, out: QParams,
               act_range: tuple[int, int], channel_axis: int = -1, rounding: str = "double",
               simd_block: int = 0) -> jnp.ndarray:
    """Accumulator -> output dtype: rescale, add zero point, clamp.

    ``rounding`` names the rescale: one of :data:`RESCALES`, which use the Q31 multiplier and
    shift of ``real_multiplier`` -- ``"double"`` (TFLite's int32 MultiplyByQuantizedMultiplier),
    ``"ties_up"`` (its final shift rounding ties up, as ruy does), ``"int64"`` (the int64
    version, 16x8 conv kernels with an int64 bias) or ``"single"`` -- or ``"float64"``
    (:func:`multiply_by_real_float64`, the reference FULLY_CONNECTED). With ``"double"`` and a
    ``simd_block``, channels in whole blocks of that many round ties up and the tail ties away
    (a SIMD output stage followed by a scalar loop).
    """
    real = np.atleast_1d(np.asarray(real_multiplier, np.float64))
    axis = channel_axis % acc.ndim
    shape = [1] * acc.ndim
    shape[axis] = real.size
    if rounding in REAL_RESCALES:
        y = REAL_RESCALES[rounding](acc, real.reshape(shape) if real.size > 1 else real[0])
    else:
        mult, shift = quantize_multipliers(real)
        if mult.size > 1:
            mult, shift = mult.reshape(shape), shift.reshape(shape)
        else:
            mult, shift = mult[0], shift[0]
        if simd_block and rounding == "double":
            channels = acc.shape[axis]
            away = simd_ties_away(channels, simd_block).reshape([channels if i == axis else 1 for i in range(acc.ndim)])
            y = multiply_by_quantized_multiplier(acc, mult, shift, ties_away=away)
        else:
            y = RESCALES[rounding](acc, mult, shift)
    y = y + out.zp
    return jnp.clip(y, act_range[0], act_range[1]).astype(out.dtype)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """C's ``round`` (ties away from zero), on host arrays."""
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def quantize_value(f: float, q: QParams) -> int:
    """A real value in ``q``'s integer domain, rounded like TFLite (float32 division)."""
    return q.zp + int(round_half_away(np.float32(f) / np.float32(q.s)))


def activation_range(act: str, out: QParams | None) -> tuple[int, int]:
    """The fused activation's clamp in the quantized domain of ``out``."""
    lo, hi = out.qmin, out.qmax
    if act == "NONE":
        return lo, hi
    if act == "RELU":
        return max(lo, quantize_value(0.0, out)), hi
    if act == "RELU6":
        return max(lo, quantize_value(0.0, out)), min(hi, quantize_value(6.0, out))
    if act == "RELU_N1_TO_1":
        return max(lo, quantize_value(-1.0, out)), min(hi, quantize_value(1.0, out))
    raise ValueError(f"fused activation {act} has no quantized form (expected NONE, RELU, RELU6 or RELU_N1_TO_1)")


def _broadcast_params(q: QParams, ndim: int) -> tuple:
    """(scale, zero_point) shaped to broadcast against a rank-``ndim`` tensor (per-axis aware)."""
    if q.per_axis:
        shape = [1] * ndim
        shape[q.axis] = q.scale.size
        return q.scale.reshape(shape), q.zero_point.reshape(shape)
    return q.scale[0], q.zero_point[0]


def dequantize(x: jnp.ndarray, q: QParams) -> jnp.ndarray:
    """Integer tensor -> float32 ``scale * (x - zero_point)`` (per-axis aware)."""
    scale, zp = _broadcast_params(q, x.ndim)
    diff = jnp.asarray(x, jnp.int32) - jnp.asarray(zp, jnp.int32)
    return (diff.astype(jnp.float32) * jnp.asarray(scale, jnp.float32)).astype(jnp.float32)


def quantize(x: jnp.ndarray, q: QParams) -> jnp.ndarray:
    """float -> integer: ``round(x / scale) + zero_point`` (ties away from zero), saturated."""
    scale, zp = _broadcast_params(q, x.ndim)
    v = divide(jnp.asarray(x, jnp.float32), jnp.asarray(scale, jnp.float32))
    r = jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)
    y = r.astype(jnp.int64) + jnp.asarray(zp, jnp.int64)
    return jnp.clip(y, q.qmin, q.qmax).astype(q.dtype)


def table_lookup(x: jnp.ndarray, table: np.ndarray, q_in: QParams) -> jnp.ndarray:
    """Elementwise map of an 8-bit tensor through a 256-entry table indexed by ``x - qmin``."""
    idx = jnp.asarray(x, jnp.int32) - q_in.qmin
    return jnp.take(jnp.asarray(table), idx, axis=0)


def lut_8bit(fn, q_in: QParams, q_out: QParams) -> np.ndarray:
    """A 256-entry table of ``fn`` from ``q_in``'s domain to ``q_out``'s, built in float32 like TFLite's LUTs."""
    vals = np.arange(q_in.qmin, q_in.qmax + 1, dtype=np.int32)
    deq = np.float32(q_in.s) * (vals - q_in.zp).astype(np.float32)
    out = fn(deq).astype(np.float32)
    r = round_half_away(out / np.float32(q_out.s))
    return np.clip(r.astype(np.int64) + q_out.zp, q_out.qmin, q_out.qmax).astype(q_out.dtype)


def _round_half_away_j(x: jnp.ndarray) -> jnp.ndarray:
    return jnp.sign(x) * jnp.floor(jnp.abs(x) + 0.5)


def dynamic_quantize_rows(rows: jnp.ndarray, asymmetric: bool) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Hybrid kernels' on-the-fly int8 quantization of float32 ``rows`` [B, N], one scale per row.

    Returns the int8 values ``q``, the float32 scaling factor per row and the int32 offset
    per row (the integer dot product sees ``q - offset``). Symmetric: scale ``max|x| / 127``,
    values in [-127, 127], offset 0. Asymmetric: the range [min(x, 0), max(x, 0)] over 255
    steps with a nudged zero point, values in [-128, 127]. An all-zero row gets scale 1.
    """
    rows = jnp.asarray(rows, jnp.float32)
    lo = jnp.min(rows, axis=1, keepdims=True)
    hi = jnp.max(rows, axis=1, keepdims=True)
    if not asymmetric:
        rng = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        zero = rng == 0
        safe = jnp.where(zero, jnp.float32(1), rng)
        scale = jnp.where(zero, jnp.float32(1), quotient(safe, jnp.float32(127)))
        inv = quotient(jnp.float32(127), safe)
        q = jnp.clip(_round_half_away_j(rows * inv), -127, 127)
        q = jnp.where(zero, 0, q).astype(jnp.int8)
        return q, scale[:, 0], jnp.zeros(rows.shape[:1], jnp.int32)
    rmin = jnp.minimum(lo, 0).astype(jnp.float64)
    rmax = jnp.maximum(hi, 0).astype(jnp.float64)
    zero = rmin == rmax
    scale_d = jnp.where(zero, 1.0, (rmax - rmin) / 255.0)
    zp_min = -128.0 - rmin / scale_d
    zp_max = 127.0 - rmax / scale_d
    err_min = 128.0 + jnp.abs(rmin / scale_d)
    err_max = 127.0 + jnp.abs(rmax / scale_d)
    zpd = jnp.where(err_min < err_max, zp_min, zp_max)
    nudged = jnp.where(zpd <= -128.0, -128.0, jnp.where(zpd >= 127.0, 127.0, _round_half_away_j(zpd)))
    offset = jnp.where(zero, 0.0, nudged).astype(jnp.int32)
    scale = jnp.where(zero, 1.0, scale_d).astype(jnp.float32)
    inv = quotient(jnp.float32(1), scale)
    q = jnp.clip(_round_half_away_j(offset.astype(jnp.float32) + rows * inv), -128, 127)
    q = jnp.where(zero, 0, q).astype(jnp.int8)
    return q, scale[:, 0], offset[:, 0]
