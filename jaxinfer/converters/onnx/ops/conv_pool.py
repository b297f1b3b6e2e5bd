"""Convolutions and pooling (ai.onnx), NCHW as ONNX defines them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from ._util import auto_pads

OPS: list[OpDef] = []
op = registrar(OPS)


def _dims(n: int) -> tuple[str, str, str]:
    sp = "DHW"[-n:] if n <= 3 else "".join(chr(ord("a") + i) for i in range(n))
    return ("NC" + sp, "OI" + sp, "NC" + sp)


@op("Conv", (1, 11, 22))
def conv(x, w, b=None, *, auto_pad: str = "NOTSET", dilations=None, group: int = 1, kernel_shape=None,
         pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__Conv.html"""
    n = x.ndim - 2
    kernel = tuple(kernel_shape) if kernel_shape else w.shape[2:]
    strides = tuple(strides) if strides else (1,) * n
    dilations = tuple(dilations) if dilations else (1,) * n
    padding = auto_pads(auto_pad, x.shape[2:], kernel, strides, dilations, pads)
    y = lax.conv_general_dilated(x, w, strides, padding, rhs_dilation=dilations,
                                 dimension_numbers=_dims(n), feature_group_count=group)
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * n)
    return y


def _pool(x, init, reducer, kernel_shape, strides, pads, auto_pad, dilations, ceil_mode):
    n = x.ndim - 2
    kernel = tuple(kernel_shape)
    strides = tuple(strides) if strides else (1,) * n
    dilations = tuple(dilations) if dilations else (1,) * n
    padding = auto_pads(auto_pad, x.shape[2:], kernel, strides, dilations, pads)
    if ceil_mode:
        padding = _ceil_pads(x.shape[2:], kernel, strides, dilations, padding)
    return lax.reduce_window(x, init, reducer, (1, 1) + kernel, (1, 1) + strides,
                             [(0, 0), (0, 0)] + padding, window_dilation=(1, 1) + dilations), padding


def _ceil_pads(in_shape, kernel, strides, dilations, padding):
    out = []
    for i, (lo, hi) in enumerate(padding):
        eff = (kernel[i] - 1) * dilations[i] + 1
        span = in_shape[i] + lo + hi - eff
        n_out = -(-span // strides[i]) + 1
        if (n_out - 1) * strides[i] >= in_shape[i] + lo:  # last window must start inside input or left pad
            n_out -= 1
        need = (n_out - 1) * strides[i] + eff - (in_shape[i] + lo + hi)
        out.append((lo, hi + max(need, 0)))
    return out


@op("MaxPool", (1, 8, 10, 11, 12, 22))
def max_pool(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations=None, kernel_shape, pads=None,
             storage_order: int = 0, strides=None, _num_outputs: int = 1):
    """https://onnx.ai/onnx/operators/onnx__MaxPool.html"""
    init = -jnp.inf if jnp.issubdtype(x.dtype, jnp.floating) else jnp.iinfo(x.dtype).min
    y, _ = _pool(x, jnp.asarray(init, x.dtype), lax.max, kernel_shape, strides, pads, auto_pad, dilations, ceil_mode)
    return y


@op("AveragePool", (1, 7, 10, 11, 19, 22))
def average_pool(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, count_include_pad: int = 0, dilations=None,
                 kernel_shape, pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__AveragePool.html"""
    zero = jnp.asarray(0, x.dtype)
    total, padding = _pool(x, zero, lax.add, kernel_shape, strides, pads, auto_pad, dilations, ceil_mode)
    if count_include_pad:
        ones = jnp.pad(jnp.ones(x.shape[2:], x.dtype), [(lo, hi) for lo, hi in
                       auto_pads(auto_pad, x.shape[2:], kernel_shape, strides or (1,) * (x.ndim - 2),
                                 dilations or (1,) * (x.ndim - 2), pads)], constant_values=1)
        base = [(0, hi2 - hi1) for (lo1, hi1), (lo2, hi2) in zip(
            auto_pads(auto_pad, x.shape[2:], kernel_shape, strides or (1,) * (x.ndim - 2),
                      dilations or (1,) * (x.ndim - 2), pads), padding)]
        counts = lax.reduce_window(ones, zero, lax.add, tuple(kernel_shape), tuple(strides or (1,) * (x.ndim - 2)),
                                   base, window_dilation=tuple(dilations or (1,) * (x.ndim - 2)))
    else:
        counts = lax.reduce_window(jnp.ones(x.shape[2:], x.dtype), zero, lax.add, tuple(kernel_shape),
                                   tuple(strides or (1,) * (x.ndim - 2)), padding,
                                   window_dilation=tuple(dilations or (1,) * (x.ndim - 2)))
    return total / counts


@op("GlobalAveragePool", (1, 22))
def global_average_pool(x):
    return jnp.mean(x, axis=tuple(range(2, x.ndim)), keepdims=True)


@op("GlobalMaxPool", (1, 22))
def global_max_pool(x):
    return jnp.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)
