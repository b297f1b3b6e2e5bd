"""Activations and softmax-family ops (ai.onnx)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ....registry import OpDef, registrar
from ._util import axis as norm_axis

OPS: list[OpDef] = []
op = registrar(OPS)


@op("Relu", (1, 6, 13, 14))
def relu(x):
    """https://onnx.ai/onnx/operators/onnx__Relu.html"""
    return jnp.maximum(x, jnp.zeros((), jnp.result_type(x)))


@op("Sigmoid", (1, 6, 13))
def sigmoid(x):
    return jax.nn.sigmoid(x)


@op("Tanh", (1, 6, 13))
def tanh(x):
    return jnp.tanh(x)


def _flatten_softmax(fn, x, axis):
    """Opset < 13 softmax: coerce to 2-D at ``axis``, apply over the second dim."""
    shape = x.shape
    a = norm_axis(axis, x.ndim)
    rows = 1
    for d in shape[:a]:
        rows *= d
    return fn(x.reshape(rows, -1), axis=1).reshape(shape)


@op("Softmax", (1, 11))
def softmax_v1(x, *, axis: int = 1):
    return _flatten_softmax(jax.nn.softmax, x, axis)


@op("Softmax", 13)
def softmax(x, *, axis: int = -1):
    """https://onnx.ai/onnx/operators/onnx__Softmax.html"""
    return jax.nn.softmax(x, axis=axis)


@op("Dropout", (1, 6, 7, 10, 12, 13, 22))
def dropout(x, ratio=None, training_mode=None, *, seed: int | None = None, is_test: int = 0, _num_outputs: int = 1):
    """Inference: identity; the optional mask output is all True."""
    if _num_outputs > 1:
        return x, jnp.ones(jnp.shape(x), dtype=bool)
    return x
