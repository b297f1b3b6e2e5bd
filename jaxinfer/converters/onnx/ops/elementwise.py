"""Elementwise math, comparison, logic and type ops (ai.onnx)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from ....registry import OpDef, registrar
from ._util import dtype_of

OPS: list[OpDef] = []
op = registrar(OPS)


@op("Add", (1, 7, 14))
def add(a, b):
    """https://onnx.ai/onnx/operators/onnx__Add.html"""
    return jnp.add(a, b)


@op("Sub", (1, 7, 14))
def sub(a, b):
    """https://onnx.ai/onnx/operators/onnx__Sub.html"""
    return jnp.subtract(a, b)


@op("Mul", (1, 7, 14))
def mul(a, b):
    """https://onnx.ai/onnx/operators/onnx__Mul.html"""
    return jnp.multiply(a, b)


@op("Div", (1, 7, 14))
def div(a, b):
    """https://onnx.ai/onnx/operators/onnx__Div.html (integer division truncates toward zero)."""
    if jnp.issubdtype(jnp.result_type(a), jnp.integer):
        return _int_div(a, b)
    return jnp.divide(a, b)


def _int_div(a, b):
    q = jnp.floor_divide(a, b)
    fix = (jnp.remainder(a, b) != 0) & ((a < 0) != (b < 0))
    return jnp.where(fix, q + 1, q)


@op("Sqrt", (1, 6, 13))
def sqrt(x):
    return jnp.sqrt(x)


@op("Exp", (1, 6, 13))
def exp(x):
    return jnp.exp(x)


@op("Log", (1, 6, 13))
def log(x):
    return jnp.log(x)


@op("Neg", (1, 6, 13))
def neg(x):
    return jnp.negative(x)


@op("Abs", (1, 6, 13))
def abs_(x):
    return jnp.abs(x)


@op("Reciprocal", (1, 6, 13))
def reciprocal(x):
    return jnp.reciprocal(x)


@op("Pow", (1, 7, 12, 13, 15))
def pow_(x, y):
    """Result has the base's type."""
    return jnp.power(x, y.astype(jnp.result_type(x)) if jnp.result_type(x) != jnp.result_type(y) else y).astype(jnp.result_type(x))


@op("Sum", (1, 6, 8, 13))
def sum_(*xs):
    out = xs[0]
    for x in xs[1:]:
        out = out + x
    return out


@op("Identity", (1, 13, 14, 16, 19, 21, 23, 24, 25))
def identity(x):
    return x


@op("Constant", (1, 9, 11, 12, 13, 19, 21, 23, 24, 25))
def constant(*, value=None, sparse_value=None, value_float=None, value_floats=None, value_int=None,
             value_ints=None, value_string=None, value_strings=None) -> Any:
    """https://onnx.ai/onnx/operators/onnx__Constant.html: exactly one attribute carries the value."""
    for v, dt in ((value, None), (sparse_value, None), (value_float, np.float32), (value_floats, np.float32),
                  (value_int, np.int64), (value_ints, np.int64), (value_string, object), (value_strings, object)):
        if v is not None:
            return np.asarray(v if dt is None else (list(v) if isinstance(v, tuple) else v), dtype=dt)
    raise ValueError("Constant has no value attribute")


@op("Cast", (1, 6, 9, 13, 19, 21, 23, 24, 25))
def cast(x, *, to: int, saturate: int = 1, round_mode: str = "up"):
    """https://onnx.ai/onnx/operators/onnx__Cast.html"""
    return jnp.asarray(x).astype(dtype_of(to))
