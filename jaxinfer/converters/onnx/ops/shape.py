"""Shape ops (ai.onnx): reshape, transpose, concat, split, slice, pad, expand, ..."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ....registry import OpDef, registrar
from ._util import axes as norm_axes
from ._util import axis as norm_axis
from ._util import ints

OPS: list[OpDef] = []
op = registrar(OPS)


@op("Shape", (1, 13, 15, 19, 21, 23, 24, 25), value_free=(0,))
def shape(data, *, start: int = 0, end: int | None = None):
    """https://onnx.ai/onnx/operators/onnx__Shape.html: a concrete int64 vector."""
    dims = np.shape(data)
    r = len(dims)
    s = max(0, min(r, start + r if start < 0 else start))
    e = r if end is None else max(0, min(r, end + r if end < 0 else end))
    return np.asarray(dims[s:e], dtype=np.int64)


@op("Size", (1, 13, 19, 21, 23, 24, 25), value_free=(0,))
def size(data):
    return np.asarray(int(np.prod(np.shape(data))), dtype=np.int64)


def _target_shape(in_shape, shape, allowzero: int):
    out = []
    for i, d in enumerate(ints(shape)):
        if d == 0 and not allowzero:
            out.append(in_shape[i])
        else:
            out.append(d)
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        total = int(np.prod(in_shape))
        out[out.index(-1)] = total // known if known else 0
    return tuple(out)


@op("Reshape", (5, 13, 14, 19, 21, 23, 24, 25), static=(1,))
def reshape(data, shape, *, allowzero: int = 0):
    """https://onnx.ai/onnx/operators/onnx__Reshape.html"""
    return jnp.reshape(data, _target_shape(jnp.shape(data), shape, allowzero))


@op("Reshape", 1)
def reshape_v1(data, *, shape=(), consumed_inputs=None):
    return jnp.reshape(data, _target_shape(jnp.shape(data), np.asarray(shape), 0))


@op("Flatten", (1, 9, 11, 13, 21, 23, 24, 25))
def flatten(x, *, axis: int = 1):
    a = norm_axis(axis, x.ndim + 1) if axis != x.ndim else axis
    lead = int(np.prod(x.shape[:a]))
    return jnp.reshape(x, (lead, -1) if lead else (0, int(np.prod(x.shape[a:]))))


@op("Transpose", (1, 13, 21, 23, 24, 25))
def transpose(data, *, perm=None):
    return jnp.transpose(data, None if perm is None else tuple(perm))


@op("Concat", (1, 4, 11, 13))
def concat(*inputs, axis: int = 1):
    return jnp.concatenate(inputs, axis=axis)


@op("Unsqueeze", (1, 11))
def unsqueeze_v1(data, *, axes):
    out_rank = jnp.ndim(data) + len(axes)
    return jnp.expand_dims(data, norm_axes(axes, out_rank))


@op("Unsqueeze", (13, 21, 23, 24, 25), static=(1,))
def unsqueeze(data, axes):
    out_rank = jnp.ndim(data) + np.size(axes)
    return jnp.expand_dims(data, norm_axes(axes, out_rank))


@op("Squeeze", (1, 11))
def squeeze_v1(data, *, axes=None):
    return jnp.squeeze(data, None if axes is None else norm_axes(axes, jnp.ndim(data)))


@op("Squeeze", (13, 21, 23, 24, 25), static=(1,))
def squeeze(data, axes=None):
    return jnp.squeeze(data, None if axes is None else norm_axes(axes, jnp.ndim(data)))


@op("Gather", (1, 11, 13))
def gather(data, indices, *, axis: int = 0):
    """https://onnx.ai/onnx/operators/onnx__Gather.html (negative indices wrap)."""
    a = norm_axis(axis, jnp.ndim(data))
    idx = jnp.where(indices < 0, indices + jnp.shape(data)[a], indices) if jnp.size(indices) else indices
    return jnp.take(data, idx, axis=a)


@op("ConstantOfShape", (9, 20, 21, 23, 24, 25), static=(0,))
def constant_of_shape(shape, *, value=None):
    """https://onnx.ai/onnx/operators/onnx__ConstantOfShape.html (default: float32 zeros)."""
    fill = np.zeros((1,), np.float32) if value is None else np.asarray(value).reshape(-1)
    return jnp.full(ints(shape), fill[0], dtype=fill.dtype)
