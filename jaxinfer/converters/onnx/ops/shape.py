"""Shape ops (ai.onnx): reshape, transpose, concat, split, slice, pad, tile, expand, range, ..."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from ._util import axes as norm_axes
from ._util import axis as norm_axis
from ._util import dtype_of, ints

OPS: list[OpDef] = []
op = registrar(OPS)


def _clamp_axis_bound(v: int, rank: int) -> int:
    """Shape's start/end: negative counts from the back, then clamped to [0, rank]."""
    return max(0, min(rank, v + rank if v < 0 else v))


@op("Shape", (1, 13, 15, 19, 21, 23, 24, 25), value_free=(0,))
def shape(data, *, start: int = 0, end: int | None = None):
    """https://onnx.ai/onnx/operators/onnx__Shape.html: a concrete int64 vector."""
    dims = np.shape(data)
    r = len(dims)
    s = _clamp_axis_bound(start, r)
    e = r if end is None else _clamp_axis_bound(end, r)
    return np.asarray(dims[s:e], dtype=np.int64)


@op("Size", (1, 13, 19, 21, 23, 24, 25), value_free=(0,))
def size(data):
    """https://onnx.ai/onnx/operators/onnx__Size.html"""
    return np.asarray(int(np.prod(np.shape(data))), dtype=np.int64)


def _target_shape(in_shape: Sequence[int], shape, allowzero: int) -> tuple[int, ...]:
    out = [in_shape[i] if d == 0 and not allowzero else d for i, d in enumerate(ints(shape))]
    if out.count(-1) > 1:
        raise ValueError(f"Reshape: at most one -1 allowed in shape, got {out}")
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
    """Reshape-1: the shape is an attribute."""
    return jnp.reshape(data, _target_shape(jnp.shape(data), np.asarray(shape), 0))


@op("Flatten", (1, 9, 11, 13, 21, 23, 24, 25))
def flatten(x, *, axis: int = 1):
    """https://onnx.ai/onnx/operators/onnx__Flatten.html (axis in [-r, r])."""
    r = jnp.ndim(x)
    if not -r <= axis <= r:
        raise ValueError(f"Flatten: axis {axis} out of range [-{r}, {r}]")
    a = axis + r if axis < 0 else axis
    shp = jnp.shape(x)
    return jnp.reshape(x, (math.prod(shp[:a]), math.prod(shp[a:])))


@op("Transpose", (1, 13, 21, 23, 24, 25))
def transpose(data, *, perm=None):
    """https://onnx.ai/onnx/operators/onnx__Transpose.html (default: reverse the axes)."""
    return jnp.transpose(data, None if perm is None else tuple(perm))


#: Concat over the channels of NCHW activations joins them channels-last (see :func:`concat`).
#: A/B with the tap pools (ops/pool.py), batch 1 / 8: SqueezeNet 1.17 / 1.31x, Inception v2
#: 1.29 / 1.01x, DenseNet 1.07 / 1.10x, ShuffleNet 0.98 / 1.09x, ResNet-50 (no Concat) 1.04 / 0.99x.
CONCAT_CHANNELS_LAST = True


@op("Concat", (1, 4, 11, 13))
def concat(*inputs, axis: int = 1):
    """https://onnx.ai/onnx/operators/onnx__Concat.html"""
    rank = jnp.ndim(inputs[0])
    axis = norm_axis(axis, rank)
    if CONCAT_CHANNELS_LAST and axis == 1 and rank == 4:
        # channels-last, as XLA CPU keeps convolution activations (and ops/pool.py its pools):
        # joined over NCHW, XLA copied every branch to NCHW and back (DenseNet's concatenations)
        y = jnp.concatenate([jnp.transpose(v, (0, 2, 3, 1)) for v in inputs], axis=-1)
        return jnp.transpose(y, (0, 3, 1, 2))
    return jnp.concatenate(inputs, axis=axis)


@op("Unsqueeze", (1, 11))
def unsqueeze_v1(data, *, axes):
    """Unsqueeze-1/11: axes is an attribute."""
    out_rank = jnp.ndim(data) + len(axes)
    return jnp.expand_dims(data, norm_axes(axes, out_rank))


@op("Unsqueeze", (13, 21, 23, 24, 25), static=(1,))
def unsqueeze(data, axes):
    """https://onnx.ai/onnx/operators/onnx__Unsqueeze.html"""
    out_rank = jnp.ndim(data) + np.size(axes)
    return jnp.expand_dims(data, norm_axes(axes, out_rank))


def _squeeze(data, axes):
    if axes is None:
        return jnp.squeeze(data, tuple(i for i, d in enumerate(jnp.shape(data)) if d == 1))
    ax = norm_axes(axes, jnp.ndim(data))
    bad = [a for a in ax if jnp.shape(data)[a] != 1]
    if bad:
        raise ValueError(f"Squeeze: axes {bad} have sizes {[jnp.shape(data)[a] for a in bad]}, expected 1")
    return jnp.squeeze(data, ax)


@op("Squeeze", (1, 11))
def squeeze_v1(data, *, axes=None):
    """Squeeze-1/11: axes is an attribute."""
    return _squeeze(data, axes)


@op("Squeeze", (13, 21, 23, 24, 25), static=(1,))
def squeeze(data, axes=None):
    """https://onnx.ai/onnx/operators/onnx__Squeeze.html"""
    return _squeeze(data, axes)


@op("ConstantOfShape", (9, 20, 21, 23, 24, 25), static=(0,))
def constant_of_shape(shape, *, value=None, _at_load: bool = False):
    """https://onnx.ai/onnx/operators/onnx__ConstantOfShape.html (default: float32 zeros).

    Folded at load (exporters build weights this way: the onnx wheel's ResNet-50 has 239), numpy
    fills it; one eager ``jnp.full`` program per distinct shape cost ~25 ms each.
    """
    fill = np.zeros((1,), np.float32) if value is None else np.asarray(value).reshape(-1)
    if _at_load:
        return np.full(ints(shape), fill[0], dtype=fill.dtype)
    return jnp.full(ints(shape), fill[0], dtype=fill.dtype)


# --- Split ---------------------------------------------------------------------------------------


def _split_sizes(dim: int, split, n: int, uneven: bool) -> list[int]:
    if split is not None and np.size(split):
        sizes = list(ints(split))
        if sum(sizes) != dim or any(s < 0 for s in sizes):
            raise ValueError(f"Split: sizes {sizes} must be non-negative and sum to the axis size {dim}")
        return sizes
    if n <= 0:
        raise ValueError(f"Split: cannot split into {n} outputs")
    if uneven:
        chunk = -(-dim // n)
        return [min(chunk, max(dim - i * chunk, 0)) for i in range(n)]
    if dim % n:
        raise ValueError(f"Split: axis size {dim} is not divisible into {n} equal outputs; pass 'split'")
    return [dim // n] * n


def _split(x, sizes: list[int], axis: int) -> tuple:
    a = norm_axis(axis, jnp.ndim(x))
    cuts = np.cumsum(sizes)[:-1].tolist()
    return tuple(jnp.split(x, cuts, axis=a))


@op("Split", 1, static=(1,))
def split_v1(x, split=None, *, axis: int = 0, _num_outputs: int = 1):
    """Split-1: sizes from the second input or (same keyword) the ``split`` attribute."""
    dim = jnp.shape(x)[norm_axis(axis, jnp.ndim(x))]
    return _split(x, _split_sizes(dim, split, _num_outputs, False), axis)


@op("Split", (2, 11))
def split_v2(x, *, axis: int = 0, split=None, _num_outputs: int = 1):
    """Split-2/11: sizes from the ``split`` attribute (equal parts when absent)."""
    dim = jnp.shape(x)[norm_axis(axis, jnp.ndim(x))]
    return _split(x, _split_sizes(dim, split, _num_outputs, False), axis)


@op("Split", 13, static=(1,))
def split_v13(x, split=None, *, axis: int = 0, _num_outputs: int = 1):
    """Split-13: sizes from the optional ``split`` input."""
    dim = jnp.shape(x)[norm_axis(axis, jnp.ndim(x))]
    return _split(x, _split_sizes(dim, split, _num_outputs, False), axis)


@op("Split", 18, static=(1,))
def split_v18(x, split=None, *, axis: int = 0, num_outputs: int | None = None, _num_outputs: int = 1):
    """https://onnx.ai/onnx/operators/onnx__Split.html: ``split`` input or ``num_outputs`` (last chunk smaller)."""
    if split is not None and num_outputs is not None:
        raise ValueError("Split: give either the 'split' input or the 'num_outputs' attribute, not both")
    dim = jnp.shape(x)[norm_axis(axis, jnp.ndim(x))]
    n = num_outputs if num_outputs is not None else _num_outputs
    return _split(x, _split_sizes(dim, split, n, True), axis)


# --- Slice ---------------------------------------------------------------------------------------


def _slice_bounds(dim: int, start: int, end: int, step: int) -> slice:
    """One axis of ONNX Slice as a Python slice: negative bounds wrap once, then clamp as the spec says
    (for negative steps start clamps to [0, dim-1], as onnxruntime does; numpy would give an empty slice)."""
    if step == 0:
        raise ValueError("Slice: steps must be non-zero")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = max(0, min(dim, start)), max(0, min(dim, end))
        return slice(start, end, step)
    if dim == 0:
        return slice(0, 0, 1)
    start, end = max(0, min(dim - 1, start)), max(-1, min(dim - 1, end))  # the spec's clamps
    return slice(start, None if end < 0 else end, step)


def _slice(data, starts, ends, axes, steps):
    r = jnp.ndim(data)
    starts, ends = ints(starts), ints(ends)
    if len(starts) != len(ends):
        raise ValueError(f"Slice: starts ({len(starts)}) and ends ({len(ends)}) differ in length")
    ax = tuple(range(len(starts))) if axes is None or not np.size(axes) else norm_axes(axes, r)
    st = (1,) * len(starts) if steps is None or not np.size(steps) else ints(steps)
    if not len(ax) == len(st) == len(starts) or len(set(ax)) != len(ax):
        raise ValueError(f"Slice: expected distinct axes and one start/end/step per axis; got axes {ax}, "
                         f"{len(starts)} starts/ends, {len(st)} steps")
    index = [slice(None)] * r
    for a, s, e, k in zip(ax, starts, ends, st):
        index[a] = _slice_bounds(jnp.shape(data)[a], s, e, k)
    return jnp.asarray(data)[tuple(index)]


@op("Slice", 1)
def slice_v1(data, *, starts, ends, axes=None):
    """Slice-1: starts/ends/axes are attributes."""
    return _slice(data, starts, ends, axes, None)


@op("Slice", (10, 11, 13), static=(1, 2, 3, 4))
def slice_(data, starts, ends, axes=None, steps=None):
    """https://onnx.ai/onnx/operators/onnx__Slice.html"""
    return _slice(data, starts, ends, axes, steps)


# --- Pad -----------------------------------------------------------------------------------------

_PAD_MODES = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def _pad(data, pads: Sequence[int], mode: str, value, axes=None):
    x = jnp.asarray(data)
    r = x.ndim
    if mode not in _PAD_MODES:
        raise ValueError(f"Pad: mode '{mode}' not supported; expected one of {sorted(_PAD_MODES)}")
    ax = tuple(range(r)) if axes is None or not np.size(axes) else norm_axes(axes, r)
    pads = [int(p) for p in pads]
    if len(pads) != 2 * len(ax):
        raise ValueError(f"Pad: {len(pads)} pads for {len(ax)} axes; expected {2 * len(ax)}")
    widths = [(0, 0)] * r
    for i, a in enumerate(ax):
        widths[a] = (pads[i], pads[i + len(ax)])
    # Negative pads crop first; the rest pads.
    crop = tuple(slice(max(0, -b), x.shape[a] - max(0, -e)) for a, (b, e) in enumerate(widths))
    x = x[crop]
    widths = [(max(0, b), max(0, e)) for b, e in widths]
    if mode == "constant":
        empty = value is None or not np.size(value)
        fill = jnp.zeros((), x.dtype) if empty else jnp.asarray(value, x.dtype).reshape(())
        return lax.pad(x, fill, [(b, e, 0) for b, e in widths])
    if any(b or e for b, e in widths) and 0 in x.shape:
        raise ValueError(f"Pad: mode '{mode}' cannot pad an empty tensor of shape {x.shape}")
    return jnp.pad(x, widths, mode=_PAD_MODES[mode])


@op("Pad", 1)
def pad_v1(data, *, paddings, mode: str = "constant", value: float = 0.0):
    """Pad-1: ``paddings`` attribute."""
    return _pad(data, paddings, mode, value)


@op("Pad", 2)
def pad_v2(data, *, pads, mode: str = "constant", value: float = 0.0):
    """Pad-2: ``pads`` and ``value`` attributes."""
    return _pad(data, pads, mode, value)


@op("Pad", (11, 13, 18, 19, 21, 23, 24, 25), static=(1, 3))
def pad(data, pads, constant_value=None, axes=None, *, mode: str = "constant"):
    """https://onnx.ai/onnx/operators/onnx__Pad.html (negative pads crop)."""
    return _pad(data, ints(pads), mode, constant_value, axes)


# --- Tile / Expand -------------------------------------------------------------------------------


@op("Tile", (6, 13), static=(1,))
def tile(x, repeats):
    """https://onnx.ai/onnx/operators/onnx__Tile.html"""
    reps = ints(repeats)
    if len(reps) != jnp.ndim(x):
        raise ValueError(f"Tile: repeats has {len(reps)} entries, expected one per input axis ({jnp.ndim(x)})")
    return jnp.tile(x, reps)


@op("Expand", (8, 13), static=(1,))
def expand(x, shape):
    """https://onnx.ai/onnx/operators/onnx__Expand.html (bidirectional broadcast)."""
    out = np.broadcast_shapes(jnp.shape(x), ints(shape))
    return jnp.broadcast_to(x, out)


# --- Generators ----------------------------------------------------------------------------------

_STASH = {1: np.float32, 11: np.float64}


def _range(start, limit, delta, compute: np.dtype | None) -> np.ndarray:
    """``start + i * delta`` for ``i < max(ceil((limit - start) / delta), 0)``, in the input dtype."""
    dtype = np.asarray(start).dtype
    s, lim, d = (np.asarray(v).reshape(()) for v in (start, limit, delta))
    if np.issubdtype(dtype, np.integer):
        s, lim, d = int(s), int(lim), int(d)
        if d == 0:
            raise ValueError("Range: delta must be non-zero")
        n = max(-(-(lim - s) // d), 0)
        return (s + np.arange(n, dtype=np.int64) * d).astype(dtype)
    cd = compute or np.dtype(np.float64)  # exact enough for every float type; cast at the end
    s, lim, d = s.astype(cd), lim.astype(cd), d.astype(cd)
    if float(d) == 0.0:
        raise ValueError("Range: delta must be non-zero")
    n = max(int(np.ceil((float(lim) - float(s)) / float(d))), 0)
    return (s + np.arange(n).astype(cd) * d).astype(dtype)


@op("Range", 11, static="all")
def range_v11(start, limit, delta):
    """Range-11: no ``stash_type``."""
    return _range(start, limit, delta, None)


@op("Range", 27, static="all")
def range_(start, limit, delta, *, stash_type: int = 1):
    """https://onnx.ai/onnx/operators/onnx__Range.html (float16/bfloat16 computed in ``stash_type``)."""
    dtype = np.asarray(start).dtype
    low = dtype in (np.dtype(np.float16), np.dtype(jnp.bfloat16))
    if low and stash_type not in _STASH:
        raise ValueError(f"Range: stash_type {stash_type} not supported; expected 1 (float) or 11 (double)")
    return _range(start, limit, delta, np.dtype(_STASH[stash_type]) if low else None)


@op("EyeLike", (9, 22), value_free=(0,))
def eye_like(x, *, dtype: int | None = None, k: int = 0):
    """https://onnx.ai/onnx/operators/onnx__EyeLike.html"""
    shp = jnp.shape(x)
    if len(shp) != 2:
        raise ValueError(f"EyeLike: input must be 2-D, got shape {shp}")
    dt = jnp.result_type(x) if dtype is None else dtype_of(dtype)
    return jnp.eye(shp[0], shp[1], k, dtype=dt)


@op("Trilu", 14)
def trilu(x, k=None, *, upper: int = 1):
    """https://onnx.ai/onnx/operators/onnx__Trilu.html (k may be a runtime value)."""
    rows, cols = jnp.shape(x)[-2:]
    diag = jnp.arange(cols)[None, :] - jnp.arange(rows)[:, None]
    kk = 0 if k is None else jnp.asarray(k).reshape(()).astype(jnp.int64)
    keep = diag >= kk if upper else diag <= kk
    return jnp.where(keep, x, jnp.zeros((), jnp.result_type(x)))


@op("OneHot", (9, 11, 28), static=(1,))
def one_hot(indices, depth, values, *, axis: int = -1):
    """https://onnx.ai/onnx/operators/onnx__OneHot.html (negative indices wrap; out of range: all off)."""
    n = int(np.asarray(depth).reshape(-1)[0])
    idx = jnp.asarray(indices)
    if jnp.issubdtype(idx.dtype, jnp.floating):
        idx = idx.astype(jnp.int64)
    idx = jnp.where(idx < 0, idx + n, idx)
    a = norm_axis(axis, idx.ndim + 1)
    classes = lax.broadcasted_iota(idx.dtype, (n,), 0).reshape((n,) + (1,) * (idx.ndim - a))
    hot = jnp.expand_dims(idx, a) == classes
    off, on = jnp.asarray(values)[0], jnp.asarray(values)[1]
    return jnp.where(hot, on, off)
