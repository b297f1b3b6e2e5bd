"""Data-movement builtins: reshape, transpose, concat, slice, gather, pad, tile, space/depth, ...

Quantized tensors pass through these unchanged (TFLite requires equal input and
output quantization for them), except CONCATENATION, which rescales inputs
whose quantization differs from the output's.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from .. import quant as Q
from ._util import QList, same_q

OPS: list[OpDef] = []
op = registrar(OPS, domain="tflite")


def _axis(axis: int, rank: int) -> int:
    return int(axis) + rank if int(axis) < 0 else int(axis)


@op("RESHAPE", static=(1,))
def reshape(x, shape=None, *, new_shape: tuple[int, ...] = (), out_shape=None, in_q: QList = None, out_q: QList = None):
    """Reshape to the shape input (or the new_shape option); one -1 is inferred."""
    if shape is not None and np.size(shape) > 0 or (shape is not None and not new_shape):
        target = [int(v) for v in np.ravel(shape)]
    elif new_shape:
        target = list(new_shape)
    else:
        target = [(-1 if d is None else d) for d in out_shape]
    return jnp.reshape(x, target)


@op("SQUEEZE")
def squeeze(x, *, squeeze_dims: tuple[int, ...] = (), in_q: QList = None, out_q: QList = None):
    """Drop size-1 dims (all of them when squeeze_dims is empty)."""
    if not squeeze_dims:
        return jnp.squeeze(x)
    return jnp.squeeze(x, tuple(_axis(a, x.ndim) for a in squeeze_dims))


@op("EXPAND_DIMS", static=(1,))
def expand_dims(x, axis, *, in_q: QList = None, out_q: QList = None):
    """Insert a size-1 dim at ``axis``."""
    a = int(np.ravel(axis)[0])
    return jnp.expand_dims(x, a if a >= 0 else a + x.ndim + 1)


@op("TRANSPOSE", static=(1,))
def transpose(x, perm, *, in_q: QList = None, out_q: QList = None):
    """Permute axes."""
    return jnp.transpose(x, tuple(int(p) for p in perm))


@op("CONCATENATION")
def concatenation(*xs, axis: int = 0, fused_activation_function: str = "NONE", in_q: QList = None,
                  out_q: QList = None):
    """Concatenate along ``axis``; 8-bit inputs with other params are rescaled in float32 like TFLite.

    LiteRT's kernels do not apply CONCATENATION's fused activation (the
    converter never sets one); we follow LiteRT, the oracle, and ignore it.
    """
    axis = _axis(axis, xs[0].ndim)
    if out_q and out_q[0] is not None:
        qo = out_q[0]
        inv = np.float32(1.0) / np.float32(qo.s)
        parts = []
        for x, qi in zip(xs, in_q):
            if same_q(qi, qo):
                parts.append(x)
                continue
            scale = np.float32(np.float32(qi.s) * inv)
            bias = np.float32(-np.float32(qi.zp) * scale)
            v = jnp.asarray(x, jnp.float32) * scale + bias
            r = jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)
            parts.append(jnp.clip(r.astype(jnp.int32) + qo.zp, qo.qmin, qo.qmax).astype(qo.dtype))
        return jnp.concatenate(parts, axis)
    return jnp.concatenate(xs, axis)


@op("PACK")
def pack(*xs, values_count: int = 0, axis: int = 0, in_q: QList = None, out_q: QList = None):
    """Stack along a new ``axis``."""
    return jnp.stack(xs, _axis(axis, xs[0].ndim + 1))


@op("UNPACK")
def unpack(x, *, num: int = 0, axis: int = 0, in_q: QList = None, out_q: QList = None):
    """Unstack along ``axis`` into ``num`` outputs."""
    axis = _axis(axis, x.ndim)
    return tuple(jnp.take(x, i, axis=axis) for i in range(x.shape[axis]))


@op("SPLIT", static=(0,))
def split(axis, x, *, num_splits: int = 1, in_q: QList = None, out_q: QList = None):
    """Split into ``num_splits`` equal parts along ``axis`` (the first input)."""
    return tuple(jnp.split(x, int(num_splits), axis=_axis(int(np.ravel(axis)[0]), x.ndim)))


@op("SPLIT_V", static=(1, 2))
def split_v(x, size_splits, axis, *, num_splits: int = 1, in_q: QList = None, out_q: QList = None):
    """Split into parts of ``size_splits`` (one -1 inferred) along ``axis``."""
    ax = _axis(int(np.ravel(axis)[0]), x.ndim)
    sizes = [int(s) for s in np.ravel(size_splits)]
    if -1 in sizes:
        sizes[sizes.index(-1)] = x.shape[ax] - (sum(sizes) + 1)
    return tuple(jnp.split(x, np.cumsum(sizes)[:-1].tolist(), axis=ax))


@op("SLICE", static=(1, 2))
def slice_(x, begin, size, *, in_q: QList = None, out_q: QList = None):
    """x[begin : begin + size] per axis (size -1: to the end)."""
    b = [int(v) for v in begin]
    s = [x.shape[i] - b[i] if int(v) == -1 else int(v) for i, v in enumerate(size)]
    return lax.slice(x, b, [bi + si for bi, si in zip(b, s)])


@op("STRIDED_SLICE", static=(1, 2, 3))
def strided_slice(x, begin, end, strides=None, *, begin_mask: int = 0, end_mask: int = 0, ellipsis_mask: int = 0,
                  new_axis_mask: int = 0, shrink_axis_mask: int = 0, offset: bool = False,
                  in_q: QList = None, out_q: QList = None):
    """Python-style strided slicing with TensorFlow's begin/end/ellipsis/new-axis/shrink masks."""
    n = len(begin)
    strides = np.ones(n, np.int64) if strides is None else np.ravel(strides)
    index: list = []
    for i in range(n):
        if ellipsis_mask >> i & 1:
            index.append(Ellipsis)
        elif new_axis_mask >> i & 1:
            index.append(None)
        elif shrink_axis_mask >> i & 1:
            index.append(int(begin[i]))
        else:
            b = None if begin_mask >> i & 1 else int(begin[i])
            e = None if end_mask >> i & 1 else int(end[i])
            if offset and b is not None and e is not None:
                e = b + e
            index.append(slice(b, e, int(strides[i])))
    return x[tuple(index)]


@op("GATHER")
def gather(x, indices, *, axis: int = 0, batch_dims: int = 0, in_q: QList = None, out_q: QList = None):
    """x.take(indices, axis) with leading batch dims."""
    axis = _axis(axis, x.ndim)
    if batch_dims:
        bd = batch_dims if batch_dims >= 0 else batch_dims + jnp.ndim(indices)
        fn = lambda a, i: jnp.take(a, i, axis=axis - bd)  # noqa: E731
        import jax

        for _ in range(bd):
            fn = jax.vmap(fn)
        return fn(x, indices)
    return jnp.take(x, indices, axis=axis)


@op("GATHER_ND")
def gather_nd(x, indices, *, in_q: QList = None, out_q: QList = None):
    """x[indices[..., 0], indices[..., 1], ...]."""
    k = indices.shape[-1]
    return x[tuple(jnp.moveaxis(indices, -1, 0)[i] for i in range(k))]


@op("SCATTER_ND", static=(2,))
def scatter_nd(indices, updates, shape):
    """zeros(shape) with updates added at indices."""
    out = jnp.zeros(tuple(int(s) for s in shape), updates.dtype)
    k = indices.shape[-1]
    return out.at[tuple(jnp.moveaxis(indices, -1, 0)[i] for i in range(k))].add(updates)


@op("EMBEDDING_LOOKUP")
def embedding_lookup(ids, table, *, in_q: QList = None, out_q: QList = None):
    """Rows of ``table`` at ``ids``; int8 tables under a float output are dequantized."""
    rows = jnp.take(table, ids, axis=0)
    qt = in_q[1] if in_q and len(in_q) > 1 else None
    if qt is not None and (not out_q or out_q[0] is None):
        return Q.dequantize(rows, qt)
    return rows


@op(("PAD", "PADV2"), static=(1,))
def pad(x, paddings, constant=None, *, in_q: QList = None, out_q: QList = None):
    """Constant padding (0, or the quantized zero point, or PADV2's value)."""
    if constant is not None:
        value = jnp.asarray(constant).reshape(())
    elif out_q and out_q[0] is not None:
        value = out_q[0].zp
    else:
        value = 0
    return jnp.pad(x, [(int(a), int(b)) for a, b in np.asarray(paddings)], constant_values=value)


@op("MIRROR_PAD", static=(1,))
def mirror_pad(x, paddings, *, mode: int = 0, in_q: QList = None, out_q: QList = None):
    """Reflect (mode 0, edge excluded) or symmetric (mode 1) padding."""
    return jnp.pad(x, [(int(a), int(b)) for a, b in np.asarray(paddings)],
                   mode="reflect" if mode == 0 else "symmetric")


@op("TILE", static=(1,))
def tile(x, multiples, *, in_q: QList = None, out_q: QList = None):
    """Repeat ``x`` along each axis."""
    return jnp.tile(x, tuple(int(m) for m in multiples))


@op("BROADCAST_TO", static=(1,))
def broadcast_to(x, shape, *, in_q: QList = None, out_q: QList = None):
    """Broadcast to ``shape``."""
    return jnp.broadcast_to(x, tuple(int(s) for s in shape))


@op("SHAPE", value_free=(0,))
def shape(x, *, out_type: int = 2, out_dtype=None, in_q: QList = None, out_q: QList = None):
    """The input's shape as a vector (int32 or int64)."""
    return np.asarray(jnp.shape(x), out_dtype or np.int32)


@op("RANK", value_free=(0,))
def rank(x, *, in_q: QList = None, out_q: QList = None):
    """The input's rank as an int32 scalar."""
    return np.asarray(jnp.ndim(x), np.int32)


@op("FILL", static=(0,))
def fill(dims, value, *, out_dtype=None):
    """A tensor of ``dims`` filled with ``value``."""
    return jnp.full(tuple(int(d) for d in dims), jnp.asarray(value).reshape(()))


@op("ZEROS_LIKE")
def zeros_like(x, *, out_dtype=None):
    """Zeros of x's shape and dtype."""
    return jnp.zeros_like(x)


@op("RANGE", static=(0, 1, 2))
def range_(start, limit, delta, *, out_dtype=None):
    """[start, limit) by delta."""
    return jnp.arange(start.reshape(()), limit.reshape(()), delta.reshape(()), dtype=out_dtype or start.dtype)


@op("DEPTH_TO_SPACE")
def depth_to_space(x, *, block_size: int = 2, in_q: QList = None, out_q: QList = None):
    """[N, H, W, C*b*b] -> [N, H*b, W*b, C] (DCR order, as TensorFlow)."""
    n, h, w, c = x.shape
    b = block_size
    y = jnp.reshape(x, (n, h, w, b, b, c // (b * b)))
    return jnp.reshape(jnp.transpose(y, (0, 1, 3, 2, 4, 5)), (n, h * b, w * b, c // (b * b)))


@op("SPACE_TO_DEPTH")
def space_to_depth(x, *, block_size: int = 2, in_q: QList = None, out_q: QList = None):
    """[N, H*b, W*b, C] -> [N, H, W, C*b*b]."""
    n, h, w, c = x.shape
    b = block_size
    y = jnp.reshape(x, (n, h // b, b, w // b, b, c))
    return jnp.reshape(jnp.transpose(y, (0, 1, 3, 2, 4, 5)), (n, h // b, w // b, b * b * c))


@op("SPACE_TO_BATCH_ND", static=(1, 2))
def space_to_batch_nd(x, block_shape, paddings, *, in_q: QList = None, out_q: QList = None):
    """Pad the spatial dims, then move blocks of them into the batch."""
    bs = [int(b) for b in block_shape]
    m = len(bs)
    value = out_q[0].zp if out_q and out_q[0] is not None else 0
    pads = [(0, 0)] + [(int(a), int(b)) for a, b in np.asarray(paddings)] + [(0, 0)] * (x.ndim - 1 - m)
    x = jnp.pad(x, pads, constant_values=value)
    n = x.shape[0]
    spatial = x.shape[1: 1 + m]
    rest = x.shape[1 + m:]
    shape = [n]
    for s, b in zip(spatial, bs):
        shape += [s // b, b]
    y = jnp.reshape(x, shape + list(rest))
    perm = [2 * i + 2 for i in range(m)] + [0] + [2 * i + 1 for i in range(m)] + list(range(2 * m + 1, y.ndim))
    y = jnp.transpose(y, perm)
    return jnp.reshape(y, [n * int(np.prod(bs))] + [s // b for s, b in zip(spatial, bs)] + list(rest))


@op("BATCH_TO_SPACE_ND", static=(1, 2))
def batch_to_space_nd(x, block_shape, crops, *, in_q: QList = None, out_q: QList = None):
    """Move batch blocks back into the spatial dims, then crop."""
    bs = [int(b) for b in block_shape]
    m = len(bs)
    n = x.shape[0] // int(np.prod(bs))
    spatial = x.shape[1: 1 + m]
    rest = x.shape[1 + m:]
    y = jnp.reshape(x, bs + [n] + list(spatial) + list(rest))
    perm = [m]
    for i in range(m):
        perm += [m + 1 + i, i]
    perm += list(range(2 * m + 1, y.ndim))
    y = jnp.reshape(jnp.transpose(y, perm), [n] + [s * b for s, b in zip(spatial, bs)] + list(rest))
    c = np.asarray(crops)
    idx = [slice(None)] + [slice(int(c[i, 0]), y.shape[1 + i] - int(c[i, 1])) for i in range(m)]
    return y[tuple(idx)]


@op("REVERSE_V2", static=(1,))
def reverse_v2(x, axes, *, in_q: QList = None, out_q: QList = None):
    """Reverse along ``axes``."""
    return jnp.flip(x, tuple(_axis(int(a), x.ndim) for a in np.ravel(axes)))


@op("ONE_HOT", static=(1,))
def one_hot(indices, depth, on_value, off_value, *, axis: int = -1):
    """One-hot of ``indices`` with ``depth`` classes inserted at ``axis``."""
    d = int(np.ravel(depth)[0])
    ax = axis if axis >= 0 else indices.ndim + 1 + axis
    hot = jnp.expand_dims(indices, ax) == lax.broadcasted_iota(indices.dtype, _oh_shape(indices.shape, d, ax), ax)
    return jnp.where(hot, on_value.reshape(()), off_value.reshape(()))


def _oh_shape(shape, depth, axis):
    s = list(shape)
    s.insert(axis, depth)
    return tuple(s)


@op("CUMSUM", static=(1,))
def cumsum(x, axis, *, exclusive: bool = False, reverse: bool = False):
    """Cumulative sum along ``axis`` (exclusive/reverse as TensorFlow)."""
    ax = _axis(int(np.ravel(axis)[0]), x.ndim)
    y = jnp.flip(x, ax) if reverse else x
    c = jnp.cumsum(y, axis=ax, dtype=x.dtype)
    if exclusive:
        c = c - y
    return jnp.flip(c, ax) if reverse else c


@op("MATRIX_DIAG")
def matrix_diag(diagonal):
    """A batch of square matrices with ``diagonal`` on their main diagonals."""
    n = diagonal.shape[-1]
    return diagonal[..., None] * jnp.eye(n, dtype=diagonal.dtype)


@op("TOPK_V2", static=(1,))
def topk_v2(x, k):
    """The k largest values along the last axis and their int32 indices."""
    values, idx = lax.top_k(x, int(np.ravel(k)[0]))
    return values, idx.astype(jnp.int32)


@op("WHERE", host=True)
def where(cond):
    """Coordinates of the true elements, int64 [n, rank]."""
    return np.argwhere(np.asarray(cond)).astype(np.int64)


def _resize_coords(in_size: int, out_size: int, align_corners: bool, half_pixel: bool) -> np.ndarray:
    if align_corners and out_size > 1:
        scale = (in_size - 1) / (out_size - 1)
    else:
        scale = in_size / out_size
    pos = np.arange(out_size, dtype=np.float32)
    if half_pixel:
        return (pos + 0.5) * np.float32(scale) - 0.5
    return pos * np.float32(scale)


@op("RESIZE_BILINEAR", static=(1,))
def resize_bilinear(x, size, *, align_corners: bool = False, half_pixel_centers: bool = False,
                    in_q: QList = None, out_q: QList = None):
    """Bilinear resize of NHWC ``x`` to ``size`` (TensorFlow's coordinate conventions, float)."""
    oh, ow = (int(s) for s in size)
    out = x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.integer) else x
    for axis, (n_in, n_out) in ((1, (x.shape[1], oh)), (2, (x.shape[2], ow))):
        c = _resize_coords(n_in, n_out, align_corners, half_pixel_centers)
        lo = np.floor(c)
        frac = (c - lo).astype(np.float32)
        lo_i = np.clip(lo, 0, n_in - 1).astype(np.int32)
        hi_i = np.clip(lo + 1, 0, n_in - 1).astype(np.int32)
        if half_pixel_centers:
            frac = np.where(c < 0, 0, frac).astype(np.float32)
            lo_i = np.where(c < 0, 0, lo_i)
        shape = [1] * x.ndim
        shape[axis] = n_out
        a, b = jnp.take(out, lo_i, axis=axis), jnp.take(out, hi_i, axis=axis)
        f = jnp.asarray(frac.reshape(shape), out.dtype)
        out = a + (b - a) * f
    if jnp.issubdtype(x.dtype, jnp.integer):
        out = jnp.clip(jnp.round(out), np.iinfo(x.dtype).min, np.iinfo(x.dtype).max).astype(x.dtype)
    return out


@op("RESIZE_NEAREST_NEIGHBOR", static=(1,))
def resize_nearest_neighbor(x, size, *, align_corners: bool = False, half_pixel_centers: bool = False,
                            in_q: QList = None, out_q: QList = None):
    """Nearest-neighbour resize with TensorFlow's rounding (align_corners, half_pixel_centers)."""
    oh, ow = (int(s) for s in size)
    out = x
    for axis, (n_in, n_out) in ((1, (x.shape[1], oh)), (2, (x.shape[2], ow))):
        scale = (n_in - 1) / (n_out - 1) if align_corners and n_out > 1 else n_in / n_out
        pos = np.arange(n_out, dtype=np.float32)
        offset = np.float32(0.5) if half_pixel_centers else np.float32(0.0)
        src = (pos + offset) * np.float32(scale)
        idx = np.floor(src + np.float32(0.5)) if align_corners else np.floor(src)
        idx = np.clip(idx, 0, n_in - 1).astype(np.int32)
        out = jnp.take(out, idx, axis=axis)
    return out
