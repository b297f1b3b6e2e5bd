"""Elementwise TFLite builtins: arithmetic (float and int8/uint8), math, comparison, logic."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ....registry import OpDef, registrar
from .. import quant as Q
from ._util import QList, fused, is_quantized, qat, require_float

OPS: list[OpDef] = []
op = registrar(OPS, domain="tflite")

_ADD_LEFT_SHIFT = {np.dtype(np.int8): 20, np.dtype(np.uint8): 20, np.dtype(np.int16): 15}


def _quantized_add_sub(x, y, in_q, out_q, act: str, sign: int, simd=None):
    """TFLite's integer ADD/SUB: both inputs rescaled to 2*max(scale) with a 20-bit headroom shift.

    Each input is shifted left, multiplied by its fixed-point multiplier and shifted right with
    rounding (MultiplyByQuantizedMultiplierSmallerThanOneExp); ``simd`` (see :func:`_add_simd_lanes`)
    marks output elements whose inputs LiteRT's optimized ADD rescales otherwise.
    """
    qa, qb, qo = in_q[0], in_q[1], out_q[0]
    left = _ADD_LEFT_SHIFT[np.dtype(qo.dtype)]
    twice_max = 2.0 * max(float(qa.s), float(qb.s))
    m1, s1 = Q.quantize_multiplier(float(qa.s) / twice_max)
    m2, s2 = Q.quantize_multiplier(float(qb.s) / twice_max)
    mo, so = Q.quantize_multiplier(twice_max / ((1 << left) * float(qo.s)))
    a = jnp.asarray(x, jnp.int64) - qa.zp
    b = jnp.asarray(y, jnp.int64) - qb.zp
    sa = Q.multiply_by_quantized_multiplier(a << left, m1, s1)
    sb = Q.multiply_by_quantized_multiplier(b << left, m2, s2)
    if simd is not None:
        sa = _simd_rescale(a, sa, m1, s1, left, simd)
        sb = _simd_rescale(b, sb, m2, s2, left, simd)
    raw = Q.multiply_by_quantized_multiplier(sa + sign * sb, mo, so) + qo.zp
    lo, hi = Q.activation_range(act, qo)
    return jnp.clip(raw, lo, hi).astype(qo.dtype)


#: LiteRT's optimized 8-bit ADD (x86-64 builds run its NEON code through an SSE translation):
#: vector lanes per loop iteration of the elementwise and of the scalar-broadcast inner loops.
_ADD_LANES = {np.dtype(np.uint8): (8, 8), np.dtype(np.int8): (16, 8)}


def _fivefold(shape_a, shape_b):
    """TFLite's broadcast categories for a binary op (ProcessBroadcastShapes), as the run its inner loop covers.

    Returns ``("elementwise", n)`` when the optimized kernel walks the output in contiguous runs of
    ``n`` elements with its elementwise loop (``n`` = everything without broadcasting), ``("scalar", n)``
    when runs of ``n`` outputs pair one element of one input with ``n`` of the other, or None for
    the generic broadcast (the reference loop).
    """
    n = max(len(shape_a), len(shape_b))
    ea = (1,) * (n - len(shape_a)) + tuple(shape_a)
    eb = (1,) * (n - len(shape_b)) + tuple(shape_b)
    if ea == eb:
        return "elementwise", int(np.prod(ea, dtype=np.int64))
    swap = None
    for i in range(n - 1, -1, -1):
        if ea[i] == eb[i]:
            continue
        if ea[i] != 1 and eb[i] != 1:
            return None
        swap = eb[i] == 1
        break
    a, b = (eb, ea) if swap else (ea, eb)  # a: the input broadcast along the fastest differing dim
    # From the last dim: y4 shared dims, y3 dims where a broadcasts, y2 shared, y1 where b broadcasts,
    # y0 shared; anything left over is the generic case.
    y = [1] * 5
    i = n - 1
    for k, a_is_one, b_is_one in ((4, False, False), (3, True, False), (2, False, False), (1, False, True),
                                  (0, False, False)):
        while i >= 0 and ((a[i] == 1) if a_is_one else (b[i] == 1) if b_is_one else (a[i] == b[i])):
            y[k] *= max(a[i], b[i])
            i -= 1
    if i >= 0:
        return None
    return ("elementwise", y[4]) if y[4] > 1 else ("scalar", y[3])


def _add_simd_lanes(shape_a, shape_b, dtype) -> tuple[jnp.ndarray, str] | None:
    """Which ADD outputs LiteRT's optimized 8-bit kernel computes in vector lanes, and how.

    Returns a bool mask over the output (True: a vector lane; built from an iota, not stored)
    and the lanes' input rescale: ``"pre_shift"`` (int8 elementwise: shift left by
    ``20 + shift``, then one rounding doubling high multiply) or ``"floor"`` (uint8, and int8
    scalar broadcast: the high multiply of the ``<< 20`` value, then a truncating right shift).
    The tail of every run and the generic broadcast round as the reference kernel does (None:
    no vector lanes at all).
    """
    runs = _fivefold(shape_a, shape_b)
    if runs is None:
        return None
    kind, run = runs
    elementwise_lanes, scalar_lanes = _ADD_LANES[np.dtype(dtype)]
    lanes = elementwise_lanes if kind == "elementwise" else scalar_lanes
    vector_end = run - run % lanes
    if vector_end == 0:
        return None
    out_shape = np.broadcast_shapes(tuple(shape_a), tuple(shape_b))
    col = jnp.arange(int(np.prod(out_shape, dtype=np.int64)), dtype=jnp.int64) % run
    how = "pre_shift" if np.dtype(dtype) == np.int8 and kind == "elementwise" else "floor"
    return jnp.reshape(col < vector_end, out_shape), how


def _simd_rescale(v, scalar, mult: int, shift: int, left: int, simd):
    """An ADD input's rescale in LiteRT's vector lanes (``simd`` from :func:`_add_simd_lanes`), ``scalar`` elsewhere."""
    mask, how = simd
    if how == "pre_shift":
        n = left + shift
        shifted = v << n if n >= 0 else v >> -n
        lanes = Q.srdhm(Q.wrap32(shifted), mult)
    else:
        lanes = Q.srdhm(Q.wrap32(v << left), mult) >> max(-shift, 0)
    return jnp.where(mask, lanes, scalar)


def _pot_shifts(in_q, out_q) -> tuple[int, int] | None:
    """int16 ADD's power-of-two path: (input1 shift, input2 shift) when every scale is a power of two."""
    from ..int16 import _checked_log2

    logs = [_checked_log2(q.s) for q in (in_q[0], in_q[1], out_q[0])]
    if not all(pot for _, pot in logs) or any(q.zp != 0 for q in (in_q[0], in_q[1], out_q[0])):
        return None
    s1, s2 = logs[0][0] - logs[2][0], logs[1][0] - logs[2][0]
    if not (s1 == 0 or s2 == 0) or s1 > 0 or s2 > 0:
        raise ValueError(f"int16 ADD with power-of-two scales needs one input at the output scale and the other "
                         f"finer (got input shifts {s1} and {s2})")
    return s1, s2


def _add_int16_pot(x, y, shifts: tuple[int, int], qo: Q.QParams, act: str):
    """TFLite's int16 ADD for power-of-two scales: the finer input is shifted down (rounding), then a saturating add."""
    a, b = jnp.asarray(x, jnp.int64), jnp.asarray(y, jnp.int64)
    a = Q.rounding_divide_by_pot(a, -shifts[0]) if shifts[0] else a
    b = Q.rounding_divide_by_pot(b, -shifts[1]) if shifts[1] else b
    lo, hi = Q.activation_range(act, qo)
    return jnp.clip(jnp.clip(a + b, -32768, 32767), lo, hi).astype(qo.dtype)


@op("ADD")
def add(x, y, *, fused_activation_function: str = "NONE", pot_scale_int16: bool = True,
        quant_kernel: str = "reference", in_q: QList = None, out_q: QList = None):
    """https://ai.google.dev/edge/litert/models/ops_compatibility (ADD).

    int16 tensors whose scales are all powers of two (and ``pot_scale_int16``, the schema's
    default) take TFLite's shift-and-saturate path; other quantized tensors the general rescale.
    ``quant_kernel="builtin"``: 8-bit ADD rescales its inputs in vector lanes as LiteRT's
    optimized kernel does (:func:`_add_simd_lanes`); other kernel sets as the reference kernel.
    """
    if is_quantized(in_q, out_q):
        if pot_scale_int16 and np.dtype(out_q[0].dtype) == np.int16:
            shifts = _pot_shifts(in_q, out_q)
            if shifts is not None:
                return _add_int16_pot(x, y, shifts, out_q[0], fused_activation_function)
        simd = None
        if quant_kernel == "builtin" and np.dtype(out_q[0].dtype) in _ADD_LANES:
            simd = _add_simd_lanes(jnp.shape(x), jnp.shape(y), out_q[0].dtype)
        return _quantized_add_sub(x, y, in_q, out_q, fused_activation_function, 1, simd)
    return fused(jnp.add(x, y), fused_activation_function)


@op("SUB")
def sub(x, y, *, fused_activation_function: str = "NONE", pot_scale_int16: bool = True,
        in_q: QList = None, out_q: QList = None):
    """SUB: x - y with a fused activation."""
    if is_quantized(in_q, out_q):
        return _quantized_add_sub(x, y, in_q, out_q, fused_activation_function, -1)
    return fused(jnp.subtract(x, y), fused_activation_function)


@op("MUL")
def mul(x, y, *, fused_activation_function: str = "NONE", in_q: QList = None, out_q: QList = None):
    """MUL: integer product rescaled by s_x*s_y/s_out when quantized."""
    if is_quantized(in_q, out_q):
        qa, qb, qo = in_q[0], in_q[1], out_q[0]
        prod = (jnp.asarray(x, jnp.int64) - qa.zp) * (jnp.asarray(y, jnp.int64) - qb.zp)
        return Q.requantize(prod, float(qa.s) * float(qb.s) / float(qo.s), qo,
                            Q.activation_range(fused_activation_function, qo))
    return fused(jnp.multiply(x, y), fused_activation_function)


@op("DIV")
def div(x, y, *, fused_activation_function: str = "NONE"):
    """DIV: float division; int32 division truncates toward zero like TFLite."""
    if jnp.issubdtype(jnp.result_type(x), jnp.integer):
        q = jnp.floor_divide(x, y)
        fix = (jnp.remainder(x, y) != 0) & ((x < 0) != (y < 0))
        return fused(jnp.where(fix, q + 1, q), fused_activation_function)
    return fused(jnp.divide(x, y), fused_activation_function)


@op("SQUARED_DIFFERENCE")
def squared_difference(x, y):
    """(x - y)**2."""
    d = jnp.subtract(x, y)
    return d * d


@op("POW")
def pow_(x, y):
    """x ** y (same dtype)."""
    return jnp.power(x, y).astype(jnp.result_type(x))


@op("MAXIMUM")
def maximum(x, y, *, in_q: QList = None, out_q: QList = None):
    """Elementwise max (quantized inputs share the output's params)."""
    return jnp.maximum(x, y)


@op("MINIMUM")
def minimum(x, y, *, in_q: QList = None, out_q: QList = None):
    """Elementwise min (quantized inputs share the output's params)."""
    return jnp.minimum(x, y)


@op("FLOOR_DIV")
def floor_div(x, y):
    """Floor division (floats floor the quotient)."""
    if jnp.issubdtype(jnp.result_type(x), jnp.integer):
        return jnp.floor_divide(x, y)
    return jnp.floor(jnp.divide(x, y))


@op("FLOOR_MOD")
def floor_mod(x, y):
    """Remainder with the divisor's sign."""
    return jnp.mod(x, y)


def _unary(name: str, fn, doc: str) -> None:
    def unary(x):
        return fn(x)

    unary.__doc__ = doc
    unary.__name__ = name.lower()
    op(name)(unary)


for _name, _fn in {
    "ABS": jnp.abs, "NEG": jnp.negative, "SQRT": jnp.sqrt, "RSQRT": lambda x: 1 / jnp.sqrt(x), "EXP": jnp.exp,
    "LOG": jnp.log, "SIN": jnp.sin, "COS": jnp.cos, "SQUARE": jnp.square, "CEIL": jnp.ceil, "FLOOR": jnp.floor,
    "ROUND": jnp.round, "SIGN": jnp.sign, "LOGICAL_NOT": jnp.logical_not,
}.items():
    _unary(_name, _fn, f"{_name}: elementwise (float).")


def _compare(name: str, fn) -> None:
    def compare(x, y, *, in_q: QList = None, out_q: QList = None):
        qa, qb = qat(in_q, 0), qat(in_q, 1)
        if qa is not None and qb is not None and (qa.s != qb.s or qa.zp != qb.zp):
            return fn(Q.dequantize(x, qa), Q.dequantize(y, qb))
        return fn(x, y)

    compare.__doc__ = f"{name}: elementwise comparison -> bool."
    op(name)(compare)


for _name, _fn in {"LESS": jnp.less, "LESS_EQUAL": jnp.less_equal, "GREATER": jnp.greater,
                   "GREATER_EQUAL": jnp.greater_equal, "EQUAL": jnp.equal, "NOT_EQUAL": jnp.not_equal}.items():
    _compare(_name, _fn)


@op("LOGICAL_AND")
def logical_and(x, y):
    """Elementwise and of bools."""
    return jnp.logical_and(x, y)


@op("LOGICAL_OR")
def logical_or(x, y):
    """Elementwise or of bools."""
    return jnp.logical_or(x, y)


@op(("SELECT", "SELECT_V2"))
def select(cond, x, y, *, in_q: QList = None, out_q: QList = None):
    """where(cond, x, y) with broadcasting."""
    return jnp.where(cond, x, y)


@op("ADD_N")
def add_n(*xs):
    """Sum of all inputs."""
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


@op("CAST")
def cast(x, *, in_data_type: int = 0, out_data_type: int = 0, out_dtype=None):
    """Convert to the output tensor's dtype (float->int truncates toward zero)."""
    if out_dtype is None:
        raise ValueError("CAST needs the output tensor's dtype (out_dtype)")
    return jnp.asarray(x).astype(out_dtype)


__all__ = ["OPS", "require_float"]
