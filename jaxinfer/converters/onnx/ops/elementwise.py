"""Elementwise math, comparison, logic and bitwise ops, Where, Clip, Identity, Constant (ai.onnx).

Type conversion ops (Cast, CastLike, BitCast) live in ``cast.py``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)


def _dtype(x: Any) -> np.dtype:
    return np.dtype(jnp.result_type(x)) if not _is_object(x) else np.dtype(object)


def _is_object(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == np.dtype(object)


def _is_int(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.integer)


def _legacy_broadcast(a, b, broadcast: int, axis: int | None):
    """Opset < 7 binary ops: with ``broadcast=1`` ``b`` is aligned to ``a`` starting at ``axis``."""
    if not broadcast or jnp.ndim(b) == jnp.ndim(a):
        return b
    start = jnp.ndim(a) - jnp.ndim(b) if axis is None else (axis + jnp.ndim(a) if axis < 0 else axis)
    trailing = jnp.ndim(a) - start - jnp.ndim(b)
    if trailing < 0:
        raise ValueError(f"broadcast axis {axis}: B of rank {jnp.ndim(b)} does not fit A of rank {jnp.ndim(a)}")
    return jnp.reshape(b, jnp.shape(b) + (1,) * trailing)


def _binary(fn: Callable[[Any, Any], Any]) -> Callable[..., Any]:
    """A binary op that also accepts the opset<7 ``broadcast``/``axis`` attributes."""

    @functools.wraps(fn)
    def wrapped(a, b, *, broadcast: int = 0, axis: int | None = None, consumed_inputs=None):
        return fn(a, _legacy_broadcast(a, b, broadcast, axis))

    return wrapped


# ---------------------------------------------------------------- arithmetic


@op("Add", (1, 6, 7, 13, 14))
@_binary
def add(a, b):
    """https://onnx.ai/onnx/operators/onnx__Add.html"""
    return jnp.add(a, b)


@op("Sub", (1, 6, 7, 13, 14))
@_binary
def sub(a, b):
    """https://onnx.ai/onnx/operators/onnx__Sub.html"""
    return jnp.subtract(a, b)


@op("Mul", (1, 6, 7, 13, 14))
@_binary
def mul(a, b):
    """https://onnx.ai/onnx/operators/onnx__Mul.html"""
    return jnp.multiply(a, b)


@op("Div", (1, 6, 7, 13, 14))
@_binary
def div(a, b):
    """https://onnx.ai/onnx/operators/onnx__Div.html (integer division truncates toward zero)."""
    if _is_int(a):
        return _trunc_div(a, b)
    return jnp.divide(a, b)


def _trunc_div(a, b):
    q = jnp.floor_divide(a, b)
    fix = (jnp.remainder(a, b) != 0) & ((a < 0) != (b < 0))
    return jnp.where(fix, q + 1, q)


@op("Mod", (10, 13, 28))
def mod(a, b, *, fmod: int = 0):
    """https://onnx.ai/onnx/operators/onnx__Mod.html: fmod=0 takes the divisor's sign, fmod=1 the dividend's."""
    if fmod not in (0, 1):
        raise ValueError(f"Mod fmod must be 0 or 1, got {fmod}")
    if fmod:
        return jnp.fmod(a, b)
    if _is_int(a):
        return jnp.remainder(a, b)
    return _float_floor_mod(a, b)


def _float_floor_mod(a, b):
    """a - floor(a / b) * b with the spec's special cases (zero results carry b's sign)."""
    r = jnp.fmod(a, b)
    r = jnp.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)
    return jnp.where(r == 0, jnp.copysign(jnp.zeros_like(r), b), r)


@op("Pow", (1, 7, 12, 13, 15))
@_binary
def pow_(x, y):
    """https://onnx.ai/onnx/operators/onnx__Pow.html: the result has the base's type."""
    xt, yt = _dtype(x), _dtype(y)
    if xt == yt:
        return jnp.power(x, y)
    if _is_int(x) and not _is_int(y):
        return jnp.power(jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.float64)).astype(xt)
    return jnp.power(x, jnp.asarray(y).astype(xt))


# ---------------------------------------------------------------- unary math


def _unary(name: str, versions: tuple[int, ...], fn: Callable[[Any], Any]) -> None:
    def unary(x, *, consumed_inputs=None):
        return fn(x)

    unary.__name__ = unary.__qualname__ = name.lower()
    unary.__doc__ = f"https://onnx.ai/onnx/operators/onnx__{name}.html"
    op(name, versions)(unary)


for _name, _fn in (("Neg", jnp.negative), ("Abs", jnp.abs), ("Reciprocal", jnp.reciprocal),
                   ("Sqrt", jnp.sqrt), ("Exp", jnp.exp), ("Log", jnp.log),
                   ("Ceil", jnp.ceil), ("Floor", jnp.floor)):
    _unary(_name, (1, 6, 13), _fn)

for _name, _fn in (("Sin", jnp.sin), ("Cos", jnp.cos), ("Tan", jnp.tan), ("Asin", jnp.arcsin),
                   ("Acos", jnp.arccos), ("Atan", jnp.arctan)):
    _unary(_name, (7, 22), _fn)

for _name, _fn in (("Sinh", jnp.sinh), ("Cosh", jnp.cosh), ("Asinh", jnp.arcsinh), ("Acosh", jnp.arccosh),
                   ("Atanh", jnp.arctanh)):
    _unary(_name, (9, 22), _fn)

_unary("Round", (11, 22), jnp.round)  # half to even, like the spec
_unary("Sign", (9, 13), jnp.sign)
_unary("Erf", (9, 13), jax.lax.erf)


@op("IsNaN", (9, 13, 20))
def isnan(x):
    """https://onnx.ai/onnx/operators/onnx__IsNaN.html"""
    return jnp.isnan(x)


@op("IsInf", (10, 20))
def isinf(x, *, detect_negative: int = 1, detect_positive: int = 1):
    """https://onnx.ai/onnx/operators/onnx__IsInf.html"""
    pos = jnp.isposinf(x) if detect_positive else jnp.zeros(jnp.shape(x), bool)
    neg = jnp.isneginf(x) if detect_negative else jnp.zeros(jnp.shape(x), bool)
    return pos | neg


# ---------------------------------------------------------------- variadic


def _fold(fn: Callable[[Any, Any], Any], xs: tuple[Any, ...], name: str) -> Any:
    if not xs:
        raise ValueError(f"{name} needs at least one input")
    out = xs[0]
    for x in xs[1:]:
        out = fn(out, x)
    return jnp.asarray(out)


@op("Max", (1, 6, 8, 12, 13))
def max_(*xs, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__Max.html (NaN propagates)."""
    return _fold(jnp.maximum, xs, "Max")


@op("Min", (1, 6, 8, 12, 13))
def min_(*xs, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__Min.html (NaN propagates)."""
    return _fold(jnp.minimum, xs, "Min")


@op("Sum", (1, 6, 8, 13))
def sum_(*xs, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__Sum.html"""
    return _fold(jnp.add, xs, "Sum")


@op("Mean", (1, 6, 8, 13))
def mean(*xs, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__Mean.html"""
    total = _fold(jnp.add, xs, "Mean")
    return (total / len(xs)).astype(total.dtype)


# ---------------------------------------------------------------- comparison and logic


def _compare(jfn: Callable[[Any, Any], Any], nfn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    def cmp(a, b):
        if _is_object(a) or _is_object(b):  # strings: always concrete, compared on the host
            return nfn(np.asarray(a), np.asarray(b))
        return jfn(a, b)

    return cmp


@op("Equal", (1, 7, 11, 13, 19))
@_binary
def equal(a, b):
    """https://onnx.ai/onnx/operators/onnx__Equal.html (strings compared on the host)."""
    return _compare(jnp.equal, np.equal)(a, b)


@op("Less", (1, 7, 9, 13))
@_binary
def less(a, b):
    """https://onnx.ai/onnx/operators/onnx__Less.html"""
    return jnp.less(a, b)


@op("Greater", (1, 7, 9, 13))
@_binary
def greater(a, b):
    """https://onnx.ai/onnx/operators/onnx__Greater.html"""
    return jnp.greater(a, b)


@op("LessOrEqual", (12, 16))
def less_equal(a, b):
    """https://onnx.ai/onnx/operators/onnx__LessOrEqual.html"""
    return jnp.less_equal(a, b)


@op("GreaterOrEqual", (12, 16))
def greater_equal(a, b):
    """https://onnx.ai/onnx/operators/onnx__GreaterOrEqual.html"""
    return jnp.greater_equal(a, b)


@op("And", (1, 7))
@_binary
def and_(a, b):
    """https://onnx.ai/onnx/operators/onnx__And.html"""
    return jnp.logical_and(a, b)


@op("Or", (1, 7))
@_binary
def or_(a, b):
    """https://onnx.ai/onnx/operators/onnx__Or.html"""
    return jnp.logical_or(a, b)


@op("Xor", (1, 7))
@_binary
def xor(a, b):
    """https://onnx.ai/onnx/operators/onnx__Xor.html"""
    return jnp.logical_xor(a, b)


@op("Not", 1)
def not_(x):
    """https://onnx.ai/onnx/operators/onnx__Not.html"""
    return jnp.logical_not(x)


# ---------------------------------------------------------------- bitwise


@op("BitwiseAnd", 18)
def bitwise_and(a, b):
    """https://onnx.ai/onnx/operators/onnx__BitwiseAnd.html"""
    return jnp.bitwise_and(a, b)


@op("BitwiseOr", 18)
def bitwise_or(a, b):
    """https://onnx.ai/onnx/operators/onnx__BitwiseOr.html"""
    return jnp.bitwise_or(a, b)


@op("BitwiseXor", 18)
def bitwise_xor(a, b):
    """https://onnx.ai/onnx/operators/onnx__BitwiseXor.html"""
    return jnp.bitwise_xor(a, b)


@op("BitwiseNot", 18)
def bitwise_not(x):
    """https://onnx.ai/onnx/operators/onnx__BitwiseNot.html"""
    return jnp.invert(x)


@op("BitShift", (11, 28))
def bit_shift(x, y, *, direction: str):
    """https://onnx.ai/onnx/operators/onnx__BitShift.html

    Right shifts of signed types are arithmetic; a shift amount that is negative
    or not below the bit width yields the sign fill alone (-1 for a negative X
    shifted right, else 0).
    """
    if direction not in ("LEFT", "RIGHT"):
        raise ValueError(f"BitShift direction must be 'LEFT' or 'RIGHT', got {direction!r}")
    dt = _dtype(x)
    bits = dt.itemsize * 8
    y = jnp.asarray(y)
    valid = (y >= 0) & (y < bits) if jnp.issubdtype(y.dtype, jnp.signedinteger) else (y < bits)
    amount = jnp.where(valid, y, 0).astype(dt)
    zero = jnp.zeros((), dt)
    if direction == "LEFT":
        return jnp.where(valid, jnp.left_shift(x, amount), zero)
    fill = jnp.where(x < 0, jnp.asarray(-1).astype(dt), zero) if jnp.issubdtype(dt, jnp.signedinteger) else zero
    return jnp.where(valid, jnp.right_shift(x, amount), fill)


# ---------------------------------------------------------------- selection


@op("Where", (9, 16))
def where(condition, x, y):
    """https://onnx.ai/onnx/operators/onnx__Where.html (string branches selected on the host)."""
    if _is_object(x) or _is_object(y):
        if isinstance(condition, jax.core.Tracer):
            raise ValueError("Where over STRING tensors needs the condition's value at trace time (strings live "
                             "on the host), but it depends on runtime values; feed it from constants")
        return np.where(np.asarray(condition), np.asarray(x), np.asarray(y))
    return jnp.where(condition, x, y)


@op("Clip", (1, 6))
def clip_v1(x, *, min: float = float("-inf"), max: float = float("inf"), consumed_inputs=None):  # noqa: A002
    """https://onnx.ai/onnx/operators/onnx__Clip.html#clip-6 (bounds as attributes)."""
    return jnp.minimum(jnp.maximum(x, min), max).astype(_dtype(x))


@op("Clip", (11, 12, 13))
def clip(x, min=None, max=None):  # noqa: A002
    """https://onnx.ai/onnx/operators/onnx__Clip.html: omitted bounds do not clip; min > max gives max."""
    dt = _dtype(x)
    out = jnp.asarray(x)
    if min is not None:
        out = jnp.maximum(out, jnp.asarray(min).astype(dt))
    if max is not None:
        out = jnp.minimum(out, jnp.asarray(max).astype(dt))
    return out


# ---------------------------------------------------------------- pass-through and constants


@op("Identity", (1, 13, 14, 16, 19, 21, 23, 24, 25))
def identity(x):
    """https://onnx.ai/onnx/operators/onnx__Identity.html (tensors, sequences and optionals)."""
    return x


@op("Constant", (1, 9, 11, 12, 13, 19, 21, 23, 24, 25))
def constant(*, value=None, sparse_value=None, value_float=None, value_floats=None, value_int=None,
             value_ints=None, value_string=None, value_strings=None) -> Any:
    """https://onnx.ai/onnx/operators/onnx__Constant.html: exactly one attribute carries the value."""
    given = [(v, dt) for v, dt in ((value, None), (sparse_value, None), (value_float, np.float32),
                                   (value_floats, np.float32), (value_int, np.int64), (value_ints, np.int64),
                                   (value_string, object), (value_strings, object)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"Constant needs exactly one value attribute, got {len(given)}")
    v, dt = given[0]
    return np.asarray(list(v) if isinstance(v, tuple) else v, dtype=dt)
