"""Quantize/dequantize and integer ops (ai.onnx): QuantizeLinear, DequantizeLinear, QLinear*, ...

Integer targets round half to even and saturate to the type's range; quantized
arithmetic (QLinearMatMul, QLinearConv) accumulates ``(a - a_zp) * (b - b_zp)``
in int32 and rescales once in float32, as the spec computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np
from jax import lax

from .... import cpu_kernels, intmath
from ....intmath import (abs_bound, divide, quotient, round_saturate, zero_point, zp_conv, zp_conv_requant,
                         zp_matmul)
from ....registry import OpDef, registrar
from ._util import auto_pads, axis as norm_axis, dtype_of

OPS: list[OpDef] = []
op = registrar(OPS)

#: The float types without an integer range: cast (optionally saturating) rather than clip.
_FLOAT_TARGETS = frozenset(
    np.dtype(n) for n in (jnp.float8_e4m3fn, jnp.float8_e4m3fnuz, jnp.float8_e5m2, jnp.float8_e5m2fnuz,
                          jnp.float4_e2m1fn)
)
#: Float targets with no inf/NaN encoding: their cast always saturates.
_ALWAYS_SATURATING = frozenset({np.dtype(jnp.float4_e2m1fn)})


def _int_range(dtype: np.dtype) -> tuple[int, int]:
    info = jnp.iinfo(dtype)
    return int(info.min), int(info.max)


def _is_int_target(dtype: np.dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.integer) and np.dtype(dtype) != np.dtype(np.int32)


def _per_axis(param: Any, shape: Sequence[int], axis: int, block_size: int) -> Any:
    """Scale/zero point broadcastable to ``shape``: per-tensor, per-axis or blocked along ``axis``."""
    param = jnp.asarray(param)
    if param.ndim == 0 or (param.ndim == 1 and param.shape[0] == 1 and not block_size):
        return param.reshape(())
    rank = len(shape)
    ax = norm_axis(axis, rank)
    if block_size > 0:
        if param.ndim != rank:
            raise ValueError(f"blocked quantization: scale rank {param.ndim} must equal input rank {rank}")
        expected = tuple(-(-d // block_size) if i == ax else d for i, d in enumerate(shape))
        if tuple(param.shape) != expected:
            raise ValueError(f"blocked quantization: scale shape {tuple(param.shape)}, expected {expected} "
                             f"for input {tuple(shape)}, axis {ax}, block_size {block_size}")
        full = jnp.repeat(param, block_size, axis=ax, total_repeat_length=param.shape[ax] * block_size)
        return lax.slice_in_dim(full, 0, shape[ax], axis=ax)
    if block_size < 0:
        raise ValueError(f"block_size must be >= 0, got {block_size}")
    if param.ndim != 1 or param.shape[0] != shape[ax]:
        raise ValueError(f"per-axis quantization: scale shape {tuple(param.shape)} must be ({shape[ax]},) "
                         f"(input {tuple(shape)}, axis {ax}) or a scalar")
    dims = [1] * rank
    dims[ax] = shape[ax]
    return param.reshape(dims)


def _quantize(x: Any, y_scale: Any, zero_point: Any, *, axis: int, saturate: int, block_size: int,
              target: np.dtype, precision: int) -> Any:
    shape = jnp.shape(x)
    scale = _per_axis(y_scale, shape, axis, block_size)
    if scale.dtype == jnp.float8_e8m0fnu:  # a power-of-two scale: exact in float32
        scale = scale.astype(jnp.float32)
    if precision:
        compute = dtype_of(precision)
    elif jnp.issubdtype(jnp.result_type(x), jnp.integer):
        compute = scale.dtype  # the scale's type sets the division's precision
    else:
        compute = jnp.result_type(x, scale)
    v = divide(jnp.asarray(x).astype(compute), scale.astype(compute))
    zp = None if zero_point is None else _per_axis(zero_point, shape, axis, block_size)
    if _is_int_target(target):
        if v.dtype == jnp.float32:
            return round_saturate(v, target, zp)
        # Round in the compute type, then add the zero point in integers (no float rounding of zp).
        lo, hi = _int_range(target)
        q = jnp.clip(jnp.round(v).astype(jnp.float32), -(2.0 ** 31), 2.0 ** 31 - 256).astype(jnp.int32)
        if zp is not None:
            q = q + zp.astype(jnp.int32)
        return jnp.clip(q, lo, hi).astype(target)
    if target in _FLOAT_TARGETS:
        if zp is not None:
            v = v + zp.astype(compute)
        if saturate or target in _ALWAYS_SATURATING:
            big = float(jnp.finfo(target).max)
            v = jnp.where(jnp.isnan(v), v, jnp.clip(v, -big, big))
        return v.astype(target)
    raise ValueError(f"QuantizeLinear: unsupported quantized type {target}; expected (u)int2/4/8/16, "
                     "float8 (e4m3fn, e4m3fnuz, e5m2, e5m2fnuz) or float4e2m1")


def _target_type(zero_point: Any, output_dtype: int) -> np.dtype:
    if zero_point is not None:
        zdt = np.dtype(jnp.result_type(zero_point))
        if output_dtype and dtype_of(output_dtype) != zdt:
            raise ValueError(f"output_dtype {dtype_of(output_dtype)} does not match y_zero_point type {zdt}")
        return zdt
    return dtype_of(output_dtype) if output_dtype else np.dtype(np.uint8)


@op("QuantizeLinear", (10, 13, 19, 21, 23, 25))
def quantize_linear(x, y_scale, y_zero_point=None, *, axis: int = 1, saturate: int = 1, block_size: int = 0,
                    output_dtype: int = 0, precision: int = 0):
    """https://onnx.ai/onnx/operators/onnx__QuantizeLinear.html"""
    target = _target_type(y_zero_point, output_dtype)
    return _quantize(x, y_scale, y_zero_point, axis=axis, saturate=saturate, block_size=block_size,
                     target=target, precision=precision)


@op("DequantizeLinear", (10, 13, 19, 21, 23, 25))
def dequantize_linear(x, x_scale, x_zero_point=None, *, axis: int = 1, block_size: int = 0, output_dtype: int = 0):
    """https://onnx.ai/onnx/operators/onnx__DequantizeLinear.html (computed in float32, cast to the output type)."""
    shape = jnp.shape(x)
    out = dtype_of(output_dtype) if output_dtype else np.dtype(jnp.result_type(x_scale))
    compute = jnp.float64 if out == np.dtype(np.float64) else jnp.float32
    v = jnp.asarray(x).astype(compute)
    if x_zero_point is not None:
        v = v - _per_axis(x_zero_point, shape, axis, block_size).astype(compute)
    v = v * _per_axis(x_scale, shape, axis, block_size).astype(compute)
    return v.astype(out)


@op("DynamicQuantizeLinear", 11)
def dynamic_quantize_linear(x):
    """https://onnx.ai/onnx/operators/onnx__DynamicQuantizeLinear.html (uint8, range always includes 0); a
    float32 tensor of moderate size in one call of our CPU kernel, with the same numbers."""
    x = jnp.asarray(x)
    if x.dtype == jnp.float32 and intmath.ieee_division():  # the kernel divides as written, like XLA CPU
        return cpu_kernels.dynamic_quantize_u8(x, _dynamic_quantize)
    return _dynamic_quantize(x)


def _dynamic_quantize(x):
    x = jnp.asarray(x)
    hi = jnp.maximum(jnp.max(x), 0.0).astype(jnp.float32)
    lo = jnp.minimum(jnp.min(x), 0.0).astype(jnp.float32)
    scale = quotient(jnp.where(hi == lo, jnp.float32(1.0), hi - lo), jnp.float32(255.0))
    zp = round_saturate(quotient(-lo, scale), jnp.uint8)
    y = round_saturate(divide(x.astype(jnp.float32), scale), jnp.uint8, zp)
    return y, scale.astype(x.dtype), zp


def _row_param(p: Any, rank: int) -> Any:
    """A per-row (``[M]``) scale/zero point of a matmul's left operand, as ``[M, 1]`` (numpy stays numpy)."""
    if np.ndim(p) == 1 and np.shape(p)[0] != 1 and rank >= 2:
        return p.reshape(np.shape(p)[0], 1)
    return p


def _requantize(acc: Any, multiplier: Any, y_zero_point: Any, out: np.dtype) -> Any:
    """int32 accumulator -> ``out``: scale, round half to even, add the zero point, saturate."""
    return round_saturate(acc.astype(jnp.float32) * multiplier, out, y_zero_point)


@op("QLinearMatMul", (10, 21))
def qlinear_matmul(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point):
    """https://onnx.ai/onnx/operators/onnx__QLinearMatMul.html (int32 accumulation, float32 rescale)."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    acc = zp_matmul(a, _row_param(zero_point(a_zero_point), a.ndim), b, zero_point(b_zero_point))
    f32 = jnp.float32
    multiplier = quotient(_row_param(a_scale, a.ndim).astype(f32) * jnp.asarray(b_scale).astype(f32),
                          jnp.asarray(y_scale).astype(f32))
    out = np.dtype(jnp.result_type(y_zero_point)) if y_zero_point is not None else np.dtype(a.dtype)
    return _requantize(acc, multiplier, y_zero_point, out)


@op("QLinearConv", 10)
def qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B=None, *,
                 auto_pad: str = "NOTSET", dilations: Sequence[int] = (), group: int = 1,
                 kernel_shape: Sequence[int] = (), pads: Sequence[int] = (), strides: Sequence[int] = ()):
    """https://onnx.ai/onnx/operators/onnx__QLinearConv.html (int32 accumulation, per-output-channel w scale)."""
    return qlinear_conv_laid_out(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B,
                                 auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape,
                                 pads=pads, strides=strides)


def conv_weight_layout(w: Any, w_layout: str) -> tuple[tuple[int, ...], tuple[str, str, str] | None]:
    """(the window's shape, ``zp_conv``'s dimension numbers) of a conv weight stored ``w_layout``: "OIHW" (ONNX's,
    any rank) or "OHWI" (2-D, as ``passes.layout.int8_conv_weights_ohwi`` stores it)."""
    if w_layout == "OIHW":
        return tuple(w.shape[2:]), None
    if w_layout == "OHWI" and w.ndim == 4:
        return tuple(w.shape[1:3]), ("NCHW", "OHWI", "NCHW")
    raise ValueError(f"a conv weight stored {w_layout!r} with shape {list(w.shape)}: expected OIHW, or OHWI of rank 4")


def qlinear_conv_laid_out(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B=None, *,
                          auto_pad: str = "NOTSET", dilations: Sequence[int] = (), group: int = 1,
                          kernel_shape: Sequence[int] = (), pads: Sequence[int] = (), strides: Sequence[int] = (),
                          w_layout: str = "OIHW"):
    """:func:`qlinear_conv` with the 2-D weight stored ``w_layout`` ("OIHW", ONNX's, or "OHWI": how our int8 kernel
    reads it, stored so at load by ``passes.layout.int8_conv_weights_ohwi``)."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    n = x.ndim - 2
    spatial, dims = conv_weight_layout(w, w_layout)
    if kernel_shape and tuple(kernel_shape) != spatial:
        raise ValueError(f"kernel_shape {tuple(kernel_shape)} does not match the weight's {spatial}")
    strides = tuple(strides) or (1,) * n
    dilations = tuple(dilations) or (1,) * n
    padding = auto_pads(auto_pad, x.shape[2:], spatial, strides, dilations, pads)
    f32 = jnp.float32
    ws = jnp.asarray(w_scale).astype(f32)
    ws = ws.reshape((1, -1) + (1,) * n) if ws.size > 1 else ws.reshape(())
    multiplier = quotient(jnp.asarray(x_scale).astype(f32).reshape(()) * ws, jnp.asarray(y_scale).astype(f32).reshape(()))
    out = np.dtype(jnp.result_type(y_zero_point)) if y_zero_point is not None else np.dtype(x.dtype)
    zp = None if y_zero_point is None else jnp.asarray(y_zero_point).reshape(())
    if group == 1:  # the requantization in the conv kernel's call, where it takes the conv
        y = zp_conv_requant(x, x_zero_point, w, w_zero_point, B, multiplier, jnp.int32(0) if zp is None else zp, out,
                            False, strides, padding, dimension_numbers=dims, rhs_dilation=dilations)
        if y is not None:
            return y
    acc = zp_conv(x, x_zero_point, w, w_zero_point, strides, padding, rhs_dilation=dilations, dimension_numbers=dims,
                  feature_group_count=group, bound=abs_bound(x.dtype, True) * abs_bound(w.dtype, True))
    if B is not None:
        acc = acc + jnp.asarray(B).astype(jnp.int32).reshape((1, -1) + (1,) * n)
    return _requantize(acc, multiplier, zp, out)
