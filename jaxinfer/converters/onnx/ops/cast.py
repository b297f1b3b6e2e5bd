"""Type conversion ops (ai.onnx): Cast, CastLike, BitCast.

Float8 targets saturate by default (out-of-range and infinite values clamp to
the largest finite value; NaN stays NaN). Casts into sub-byte integers
(int4/uint4/int2/uint2) keep the low bits, as casts between fixed-point types
do. Strings are always concrete, so casts to and from STRING run on the host
with numpy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from ....registry import OpDef, registrar
from ._util import dtype_of

OPS: list[OpDef] = []
op = registrar(OPS)

_SATURATING_FLOAT8 = frozenset(np.dtype(t) for t in (
    ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2, ml_dtypes.float8_e5m2fnuz))
_E8M0 = np.dtype(ml_dtypes.float8_e8m0fnu)
_SUB_BYTE_INTS = {np.dtype(t): (bits, signed) for t, bits, signed in (
    (ml_dtypes.int4, 4, True), (ml_dtypes.uint4, 4, False), (ml_dtypes.int2, 2, True), (ml_dtypes.uint2, 2, False))}
_ROUND_MODES = ("up", "down", "nearest")


def _is_string(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind in ("O", "U", "S")


def _to_string(x: Any) -> np.ndarray:
    """Numbers to their plain text form, as an object array of ``str`` (host only)."""
    if isinstance(x, jax.core.Tracer):
        raise ValueError("Cast to STRING needs its input's value at trace time (strings live on the host), "
                         "but the input depends on runtime values; feed it from constants or initializers")
    return np.asarray(x).astype(np.str_).astype(object)


def _from_string(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Text to numbers: plain/scientific literals and case-insensitive [+-]INF / NaN."""
    flat = [str(s.decode() if isinstance(s, bytes) else s).strip() for s in x.reshape(-1)]
    vals = np.array([float(s) for s in flat], dtype=np.float64).reshape(x.shape)
    if np.issubdtype(dtype, np.integer) and all(_is_int_literal(s) for s in flat):
        vals = np.array([int(s) for s in flat], dtype=object).reshape(x.shape)
    return np.asarray(vals).astype(dtype)


def _is_int_literal(s: str) -> bool:
    return s.lstrip("+-").isdigit()


def _wrap_sub_byte(x: Any, bits: int, signed: bool) -> jax.Array:
    """Keep the low ``bits`` bits of an integer value (two's complement when signed)."""
    mask = (1 << bits) - 1
    low = jnp.bitwise_and(jnp.asarray(x).astype(jnp.int32), mask)
    if signed:
        sign = 1 << (bits - 1)
        low = jnp.bitwise_xor(low, sign) - sign
    return low


def _to_e8m0(x: Any, saturate: int, round_mode: str) -> jax.Array:
    """float -> float8e8m0 (an 8-bit power-of-two exponent), rounding per ``round_mode``."""
    if round_mode not in _ROUND_MODES:
        raise ValueError(f"Cast round_mode must be one of {_ROUND_MODES}, got {round_mode!r}")
    bits = jax.lax.bitcast_convert_type(jnp.asarray(x).astype(jnp.float32), jnp.uint32)
    exponent = jnp.right_shift(bits, 23) & 0xFF
    special = exponent == 0xFF  # NaN and Inf keep the all-ones exponent (NaN)
    if round_mode == "up":
        round_up = (bits & 0x7FFFFF) != 0
    elif round_mode == "nearest":
        guard = (bits & 0x400000) != 0
        rest = (bits & 0x3FFFFF) != 0
        round_up = guard & (rest | (exponent > 0))
    else:
        round_up = jnp.zeros(bits.shape, bool)
    round_up = round_up & ~special
    if saturate:
        round_up = round_up & (exponent != 0xFE)
    out = jnp.where(special, 0xFF, exponent + round_up.astype(jnp.uint32)).astype(jnp.uint8)
    return jax.lax.bitcast_convert_type(out, jnp.float8_e8m0fnu)


def _wide_enough(x: jax.Array) -> jax.Array:
    """``x`` in a float type that holds every float8 bound exactly, converting losslessly where possible
    (16-bit and wider floats as they are, smaller floats via float32, integers and bool via float64)."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x if x.dtype.itemsize >= 2 else x.astype(jnp.float32)
    return x.astype(jnp.float64)


def convert(x: Any, dtype: np.dtype, *, saturate: int = 1, round_mode: str = "up") -> Any:
    """Cast ``x`` to ``dtype`` with ONNX semantics (shared by Cast and CastLike)."""
    dtype = np.dtype(dtype)
    if dtype == np.dtype(object):
        return _to_string(x)
    if _is_string(x):
        return _from_string(np.asarray(x), dtype)
    x = jnp.asarray(x)
    if dtype == _E8M0:
        return _to_e8m0(x, saturate, round_mode)
    if dtype in _SATURATING_FLOAT8 and saturate:
        info = ml_dtypes.finfo(dtype)
        return jnp.clip(_wide_enough(x), float(info.min), float(info.max)).astype(dtype)
    if dtype in _SUB_BYTE_INTS and x.dtype != jnp.bool_:
        bits, signed = _SUB_BYTE_INTS[dtype]
        return _wrap_sub_byte(x, bits, signed).astype(dtype)
    return x.astype(dtype)


@op("Cast", (1, 6, 9, 13, 19, 21, 23, 24, 25))
def cast(x, *, to: int, saturate: int = 1, round_mode: str = "up"):
    """https://onnx.ai/onnx/operators/onnx__Cast.html"""
    return convert(x, dtype_of(to), saturate=saturate, round_mode=round_mode)


@op("CastLike", (15, 19, 21, 23, 24, 25), value_free=(1,))
def cast_like(x, target_type, *, saturate: int = 1, round_mode: str = "up"):
    """https://onnx.ai/onnx/operators/onnx__CastLike.html: cast to the element type of ``target_type``."""
    target = np.asarray(target_type).dtype if _is_string(target_type) else np.dtype(jnp.result_type(target_type))
    return convert(x, target, saturate=saturate, round_mode=round_mode)


@op("BitCast", 26)
def bit_cast(x, *, to: int):
    """https://onnx.ai/onnx/operators/onnx__BitCast.html: reinterpret the bits; widths must match."""
    src = np.dtype(jnp.result_type(x)) if not _is_string(x) else np.dtype(object)
    dst = dtype_of(to)
    if src == np.dtype(object) or dst == np.dtype(object):
        raise ValueError("BitCast from or to STRING is not defined; expected numeric types of equal bit width")
    if src.itemsize != dst.itemsize:
        raise ValueError(f"BitCast needs equal bit widths, got {src} ({src.itemsize * 8} bits) -> {dst} "
                         f"({dst.itemsize * 8} bits)")
    x = jnp.asarray(x)
    if src == np.dtype(bool):
        x = x.astype(jnp.uint8)
    if dst == np.dtype(bool):
        return jax.lax.bitcast_convert_type(x, jnp.uint8) != 0
    return jax.lax.bitcast_convert_type(x, dst)
