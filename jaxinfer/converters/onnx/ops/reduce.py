"""Reductions, arg-reductions and cumulative ops (ai.onnx).

The ten ``Reduce*`` ops share one shape: ``axes`` is an attribute up to a
version (ReduceSum 13, the others 18) and a static input from then on, with
``keepdims`` and ``noop_with_empty_axes``. Each op is defined once as an
elementwise-plus-reduce kernel and registered in both forms by ``_reduce_op``.
Reductions over an empty set return the reduction's identity (0 for sums,
1 for products, -inf/+inf for max/min, -inf for the log forms).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from ._util import axis as norm_axis
from ._util import ints

OPS: list[OpDef] = []
op = registrar(OPS)

Kernel = Callable[[jax.Array, tuple[int, ...], bool], jax.Array]


def _reduce_axes(axes, rank: int, noop_with_empty_axes: int) -> tuple[int, ...]:
    """The axes to reduce: all of them when ``axes`` is empty, none when it is empty and noop is set."""
    values = () if axes is None else ints(axes)
    if not values:
        return () if noop_with_empty_axes else tuple(range(rank))
    normalized = tuple(sorted({norm_axis(a, rank) for a in values}))
    if len(normalized) != len(values):
        raise ValueError(f"axes {values} name the same axis twice (rank {rank})")
    return normalized


def _reduce_op(op_type: str, attr_since: tuple[int, ...], input_since: tuple[int, ...], kernel: Kernel) -> None:
    """Register ``op_type`` with ``axes`` as an attribute (``attr_since``) and as a static input (``input_since``)."""
    spec = f"https://onnx.ai/onnx/operators/onnx__{op_type}.html"

    def with_attr(data, *, axes=None, keepdims: int = 1, noop_with_empty_axes: int = 0):
        data = jnp.asarray(data)
        return kernel(data, _reduce_axes(axes, data.ndim, noop_with_empty_axes), bool(keepdims))

    def with_input(data, axes=None, *, keepdims: int = 1, noop_with_empty_axes: int = 0):
        data = jnp.asarray(data)
        return kernel(data, _reduce_axes(axes, data.ndim, noop_with_empty_axes), bool(keepdims))

    for fn, form in ((with_attr, "axes attribute"), (with_input, "axes input")):
        fn.__name__ = fn.__qualname__ = f"{op_type.lower()}_{form.split()[1]}"
        fn.__doc__ = f"{spec} ({form})."
    op(op_type, attr_since)(with_attr)
    op(op_type, input_since, static=(1,))(with_input)


def _float_of(x: jax.Array) -> jax.Array:
    """``x`` itself when floating, else as float64 (ops defined by float math on integer tensors)."""
    return x if jnp.issubdtype(x.dtype, jnp.inexact) else x.astype(jnp.float64)


def _extreme(dtype, largest: bool):
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.asarray(jnp.inf if largest else -jnp.inf, dtype)
    info = jnp.iinfo(dtype)
    return jnp.asarray(info.max if largest else info.min, dtype)


def _sum(x, axes, keepdims):
    return jnp.sum(x, axis=axes, keepdims=keepdims, dtype=x.dtype)


def _mean(x, axes, keepdims):
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.mean(x, axis=axes, keepdims=keepdims)
    return jnp.mean(x.astype(jnp.float64), axis=axes, keepdims=keepdims).astype(x.dtype)


def _max(x, axes, keepdims):
    if x.dtype == jnp.bool_:
        return jnp.any(x, axis=axes, keepdims=keepdims)
    return jnp.max(x, axis=axes, keepdims=keepdims, initial=_extreme(x.dtype, largest=False))


def _min(x, axes, keepdims):
    if x.dtype == jnp.bool_:
        return jnp.all(x, axis=axes, keepdims=keepdims)
    return jnp.min(x, axis=axes, keepdims=keepdims, initial=_extreme(x.dtype, largest=True))


def _prod(x, axes, keepdims):
    return jnp.prod(x, axis=axes, keepdims=keepdims, dtype=x.dtype)


def _l1(x, axes, keepdims):
    return jnp.sum(jnp.abs(x), axis=axes, keepdims=keepdims, dtype=x.dtype)


def _l2(x, axes, keepdims):
    f = _float_of(x)
    return jnp.sqrt(jnp.sum(f * f, axis=axes, keepdims=keepdims)).astype(x.dtype)


def _log_sum(x, axes, keepdims):
    return jnp.log(jnp.sum(_float_of(x), axis=axes, keepdims=keepdims)).astype(x.dtype)


def _log_sum_exp(x, axes, keepdims):
    f = _float_of(x)
    peak = lax.stop_gradient(jnp.max(f, axis=axes, keepdims=True, initial=-jnp.inf))
    peak = jnp.where(jnp.isfinite(peak), peak, jnp.zeros_like(peak))
    out = jnp.log(jnp.sum(jnp.exp(f - peak), axis=axes, keepdims=True)) + peak
    if not keepdims:
        out = jnp.squeeze(out, axis=axes)
    return out.astype(x.dtype)


def _sum_square(x, axes, keepdims):
    return jnp.sum(x * x, axis=axes, keepdims=keepdims, dtype=x.dtype)


_reduce_op("ReduceSum", (1, 11), (13,), _sum)
_reduce_op("ReduceMean", (1, 11, 13), (18,), _mean)
_reduce_op("ReduceMax", (1, 11, 12, 13), (18, 20), _max)
_reduce_op("ReduceMin", (1, 11, 12, 13), (18, 20), _min)
_reduce_op("ReduceProd", (1, 11, 13), (18,), _prod)
_reduce_op("ReduceL1", (1, 11, 13), (18,), _l1)
_reduce_op("ReduceL2", (1, 11, 13), (18,), _l2)
_reduce_op("ReduceLogSum", (1, 11, 13), (18, 28), _log_sum)
_reduce_op("ReduceLogSumExp", (1, 11, 13), (18, 28), _log_sum_exp)
_reduce_op("ReduceSumSquare", (1, 11, 13), (18,), _sum_square)


# --- arg-reductions -----------------------------------------------------------------------------


def _arg_reduce(pick: Callable[..., jax.Array], data, axis: int, keepdims: int, select_last_index: int):
    data = jnp.asarray(data)
    ax = norm_axis(axis, data.ndim)
    if select_last_index:
        flipped = jnp.flip(data, axis=ax)
        idx = (data.shape[ax] - 1) - pick(flipped, axis=ax, keepdims=bool(keepdims))
    else:
        idx = pick(data, axis=ax, keepdims=bool(keepdims))
    return idx.astype(jnp.int64)


@op("ArgMax", (1, 11, 12, 13))
def arg_max(data, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0):
    """https://onnx.ai/onnx/operators/onnx__ArgMax.html (int64 indices)."""
    return _arg_reduce(jnp.argmax, data, axis, keepdims, select_last_index)


@op("ArgMin", (1, 11, 12, 13))
def arg_min(data, *, axis: int = 0, keepdims: int = 1, select_last_index: int = 0):
    """https://onnx.ai/onnx/operators/onnx__ArgMin.html (int64 indices)."""
    return _arg_reduce(jnp.argmin, data, axis, keepdims, select_last_index)


# --- cumulative ops -----------------------------------------------------------------------------


def _scalar_axis(axis, rank: int, op_type: str) -> int:
    values = ints(axis)
    if len(values) != 1:
        raise ValueError(f"{op_type}: axis input must hold one integer, got {values}")
    return norm_axis(values[0], rank)


def _cumulative(scan: Callable[..., jax.Array], identity: int, x, ax: int, exclusive: int, reverse: int):
    if reverse:
        x = jnp.flip(x, axis=ax)
    y = scan(x, axis=ax, dtype=x.dtype)
    if exclusive:
        pad = [(0, 0)] * x.ndim
        pad[ax] = (1, 0)
        y = lax.slice_in_dim(jnp.pad(y, pad, constant_values=np.asarray(identity, x.dtype)), 0, x.shape[ax], axis=ax)
    return jnp.flip(y, axis=ax) if reverse else y


@op("CumSum", (11, 14), static=(1,))
def cum_sum(x, axis, *, exclusive: int = 0, reverse: int = 0):
    """https://onnx.ai/onnx/operators/onnx__CumSum.html"""
    x = jnp.asarray(x)
    return _cumulative(jnp.cumsum, 0, x, _scalar_axis(axis, x.ndim, "CumSum"), exclusive, reverse)


@op("CumProd", (26,), static=(1,))
def cum_prod(x, axis, *, exclusive: int = 0, reverse: int = 0):
    """https://onnx.ai/onnx/operators/onnx__CumProd.html"""
    x = jnp.asarray(x)
    return _cumulative(jnp.cumprod, 1, x, _scalar_axis(axis, x.ndim, "CumProd"), exclusive, reverse)
