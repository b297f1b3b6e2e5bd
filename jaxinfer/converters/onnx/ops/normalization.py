"""Normalization ops (ai.onnx): batch, layer, group, instance, RMS, LRN."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)


def _channel(v, ndim):
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@op("BatchNormalization", (1, 6, 7, 9, 14, 15))
def batch_normalization(x, scale, bias, mean, var, *, epsilon: float = 1e-5, momentum: float = 0.9,
                        training_mode: int = 0, spatial: int = 1, is_test: int = 0, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__BatchNormalization.html (inference form)."""
    inv = lax.rsqrt(_channel(var, x.ndim) + jnp.asarray(epsilon, x.dtype)) * _channel(scale, x.ndim)
    return (x - _channel(mean, x.ndim)) * inv + _channel(bias, x.ndim)


@op("LRN", (1, 13))
def lrn(x, *, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0, size: int):
    """https://onnx.ai/onnx/operators/onnx__LRN.html: across channels."""
    sq = x * x
    lo = (size - 1) // 2
    hi = size - 1 - lo
    window = (1, size) + (1,) * (x.ndim - 2)
    s = lax.reduce_window(sq, jnp.asarray(0, x.dtype), lax.add, window, (1,) * x.ndim,
                          [(0, 0), (lo, hi)] + [(0, 0)] * (x.ndim - 2))
    return x / (bias + (alpha / size) * s) ** beta
