"""Exact integer dots and convolutions, computed through float sums that cannot round.

Quantized kernels (ONNX QLinearConv/ConvInteger/MatMulInteger and the QDQ-fused ops, TFLite's
int8/int16 CONV_2D/FULLY_CONNECTED) need the int32 sum of products of small integers. XLA
CPU's integer convolution is a slow generic loop (a 3x3 64->64 conv on 8x56x56: ~370 ms in
int32, ~32 ms in float32 on the development machine), and its int32 dots are slower than
float ones. A float32 sum of integers stays exact while every partial sum is below 2**24, in
any order and with FMAs, so when ``terms * bound < 2**24`` (``bound`` = the largest |product|)
the float32 result *is* the integer result. Longer reductions are split into chunks that each
stay exact, and the chunks' int32 results are added; when even a one-item chunk is too long
(int16 x int8 products) float64 is used, exact below 2**53.

Every float product here asks for ``Precision.HIGHEST``, so no backend swaps in a reduced
precision (TF32, bf16 passes) that would break exactness.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

#: float32 holds every integer of magnitude below this exactly.
F32_EXACT = 1 << 24
#: Products above this bound (int16 x int8) leave float32 chunks too short to pay off: use float64.
CHUNK_BOUND_MAX = 1 << 16
_HIGHEST = lax.Precision.HIGHEST


def abs_bound(dtype: Any, shifted: bool) -> int:
    """Largest |v| of an integer tensor of ``dtype``; ``shifted``: of ``v - zero_point`` (zp in range)."""
    info = ml_dtypes.iinfo(np.dtype(dtype))  # numpy's iinfo does not know int4/uint4
    return int(info.max) - int(info.min) if shifted else max(int(info.max), -int(info.min))


def exact_float(terms: int, bound: int) -> Any:
    """A float dtype whose sums of ``terms`` products (each |p| <= bound) are exact integers."""
    return jnp.float32 if terms * bound < F32_EXACT else jnp.float64


def float_chunks(total: int, per_item: int, bound: int) -> list[tuple[int, int]] | None:
    """Split ``total`` reduction items (``per_item`` products each) into float32-exact chunks; None: use float64."""
    step = (F32_EXACT - 1) // (per_item * bound)
    if step < 1 or (bound > CHUNK_BOUND_MAX and step < total):
        return None
    return [(i, min(i + step, total)) for i in range(0, total, step)]


def exact_dot(a: Any, b: Any, dims: Any, k_axis_a: int, k_axis_b: int, bound: int,
              acc_dtype: Any = jnp.int32) -> jax.Array:
    """Integer ``lax.dot_general`` (``acc_dtype`` result) of integer-valued ``a``, ``b``; |a*b| <= ``bound``.

    ``dims`` must contract one axis: ``k_axis_a`` of ``a`` with ``k_axis_b`` of ``b``.
    """
    k = a.shape[k_axis_a]
    parts = float_chunks(k, 1, bound)
    if parts is None:
        return lax.dot_general(a.astype(jnp.float64), b.astype(jnp.float64), dims,
                               precision=_HIGHEST).astype(acc_dtype)
    acc = None
    for lo, hi in parts:
        pa = lax.slice_in_dim(a, lo, hi, axis=k_axis_a).astype(jnp.float32)
        pb = lax.slice_in_dim(b, lo, hi, axis=k_axis_b).astype(jnp.float32)
        part = lax.dot_general(pa, pb, dims, precision=_HIGHEST).astype(jnp.int32).astype(acc_dtype)
        acc = part if acc is None else acc + part
    return acc


def exact_matmul(a: Any, b: Any, bound: int, acc_dtype: Any = jnp.int32) -> jax.Array:
    """``jnp.matmul`` semantics (batch broadcasting, 1-D operands) for integer-valued operands, exactly."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    k_b = 0 if b.ndim == 1 else b.ndim - 2
    parts = float_chunks(a.shape[-1], 1, bound)
    if parts is None:
        return jnp.matmul(a.astype(jnp.float64), b.astype(jnp.float64), precision=_HIGHEST).astype(acc_dtype)
    acc = None
    for lo, hi in parts:
        pa = lax.slice_in_dim(a, lo, hi, axis=a.ndim - 1).astype(jnp.float32)
        pb = lax.slice_in_dim(b, lo, hi, axis=k_b).astype(jnp.float32)
        part = jnp.matmul(pa, pb, precision=_HIGHEST).astype(jnp.int32).astype(acc_dtype)
        acc = part if acc is None else acc + part
    return acc


def exact_conv(x: Any, w: Any, window_strides: Sequence[int], padding: Any, *, bound: int,
               dimension_numbers: Any = None, rhs_dilation: Sequence[int] | None = None,
               feature_group_count: int = 1, acc_dtype: Any = jnp.int32) -> jax.Array:
    """Integer ``lax.conv_general_dilated`` of integer-valued ``x``, ``w`` (|x*w| <= ``bound``), exactly.

    Zero padding adds nothing, so ``x`` must already be zero-point shifted. A reduction too long
    for one exact float32 convolution is split over input channels (ungrouped convs only).
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
    in_x, in_w = dn.lhs_spec[1], dn.rhs_spec[1]
    window = int(np.prod([w.shape[i] for i in dn.rhs_spec[2:]]))
    cin = w.shape[in_w]

    def conv(a: Any, b: Any, ft: Any) -> jax.Array:
        return lax.conv_general_dilated(a.astype(ft), b.astype(ft), window_strides, padding, rhs_dilation=rhs_dilation,
                                        dimension_numbers=dn, feature_group_count=feature_group_count,
                                        precision=_HIGHEST)

    if feature_group_count == 1:
        parts = float_chunks(cin, window, bound)
    else:
        parts = [(0, cin)] if window * cin * bound < F32_EXACT else None
    if parts is None:
        return conv(x, w, jnp.float64).astype(acc_dtype)
    acc = None
    for lo, hi in parts:
        xs = x if len(parts) == 1 else lax.slice_in_dim(x, lo, hi, axis=in_x)
        ws = w if len(parts) == 1 else lax.slice_in_dim(w, lo, hi, axis=in_w)
        part = conv(xs, ws, jnp.float32).astype(jnp.int32).astype(acc_dtype)
        acc = part if acc is None else acc + part
    return acc
