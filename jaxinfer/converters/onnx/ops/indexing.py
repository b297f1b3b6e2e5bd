"""Indexing ops (ai.onnx): gather/scatter families, TopK, NonZero, Unique, NonMaxSuppression, ...

Negative indices wrap (``i + dim``) everywhere the spec allows them. Ops whose
output shape depends on input values (NonZero, Unique, NonMaxSuppression) are
host ops; Compress only needs its condition at trace time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from ._util import axis as norm_axis

OPS: list[OpDef] = []
op = registrar(OPS)


def _wrap(indices, dim: int):
    """Negative indices count from the end of an axis of size ``dim``."""
    idx = jnp.asarray(indices)
    return jnp.where(idx < 0, idx + dim, idx)


# --- Gather --------------------------------------------------------------------------------------


@op("Gather", (1, 11, 13))
def gather(data, indices, *, axis: int = 0):
    """https://onnx.ai/onnx/operators/onnx__Gather.html"""
    a = norm_axis(axis, jnp.ndim(data))
    return jnp.take(data, _wrap(indices, jnp.shape(data)[a]), axis=a, mode="clip")


@op("GatherElements", (11, 13))
def gather_elements(data, indices, *, axis: int = 0):
    """https://onnx.ai/onnx/operators/onnx__GatherElements.html"""
    a = norm_axis(axis, jnp.ndim(data))
    return jnp.take_along_axis(jnp.asarray(data), _wrap(indices, jnp.shape(data)[a]), axis=a, mode="clip")


def _nd_index(data_shape, indices, batch_dims: int) -> tuple:
    """Index tuple for ``data[...]``: batch grids, then one array per indexed axis."""
    idx = jnp.asarray(indices)
    k = idx.shape[-1]
    if batch_dims + k > len(data_shape):
        raise ValueError(f"GatherND/ScatterND: batch_dims {batch_dims} + index depth {k} exceeds data rank "
                         f"{len(data_shape)}")
    lead = idx.shape[:-1]
    grids = tuple(lax.broadcasted_iota(jnp.int64, lead, j) for j in range(batch_dims))
    cols = tuple(_wrap(idx[..., i], data_shape[batch_dims + i]) for i in range(k))
    return grids + cols


def _gather_nd(data, indices, batch_dims: int):
    x = jnp.asarray(data)
    index = _nd_index(x.shape, indices, batch_dims)
    if not index:  # zero-depth indices: every index row selects the whole tensor
        return jnp.broadcast_to(x, jnp.shape(indices)[:-1] + x.shape)
    return x[index]


@op("GatherND", 11)
def gather_nd_v11(data, indices):
    """GatherND-11: no batch dims."""
    return _gather_nd(data, indices, 0)


@op("GatherND", (12, 13))
def gather_nd(data, indices, *, batch_dims: int = 0):
    """https://onnx.ai/onnx/operators/onnx__GatherND.html"""
    return _gather_nd(data, indices, batch_dims)


# --- Scatter -------------------------------------------------------------------------------------

_REDUCTIONS = ("none", "add", "mul", "max", "min")


def _scatter(ref, updates, reduction: str):
    if reduction == "none":
        return ref.set(updates)
    if reduction == "add":
        return ref.add(updates)
    if reduction == "mul":
        return ref.multiply(updates)
    if reduction == "max":
        return ref.max(updates)
    if reduction == "min":
        return ref.min(updates)
    raise ValueError(f"scatter reduction '{reduction}' not supported; expected one of {_REDUCTIONS}")


def _scatter_elements(data, indices, updates, axis: int, reduction: str):
    x = jnp.asarray(data)
    a = norm_axis(axis, x.ndim)
    idx = _wrap(indices, x.shape[a])
    grids = list(jnp.indices(idx.shape, sparse=True))
    grids[a] = idx
    return _scatter(x.at[tuple(grids)], jnp.asarray(updates, x.dtype), reduction)


@op("Scatter", 9)
def scatter(data, indices, updates, *, axis: int = 0):
    """https://onnx.ai/onnx/operators/onnx__Scatter.html (deprecated alias of ScatterElements)."""
    return _scatter_elements(data, indices, updates, axis, "none")


@op("ScatterElements", (11, 13))
def scatter_elements_v11(data, indices, updates, *, axis: int = 0):
    """ScatterElements-11/13: no reduction."""
    return _scatter_elements(data, indices, updates, axis, "none")


@op("ScatterElements", (16, 18))
def scatter_elements(data, indices, updates, *, axis: int = 0, reduction: str = "none"):
    """https://onnx.ai/onnx/operators/onnx__ScatterElements.html"""
    return _scatter_elements(data, indices, updates, axis, reduction)


def _scatter_nd(data, indices, updates, reduction: str):
    x = jnp.asarray(data)
    return _scatter(x.at[_nd_index(x.shape, indices, 0)], jnp.asarray(updates, x.dtype), reduction)


@op("ScatterND", (11, 13))
def scatter_nd_v11(data, indices, updates):
    """ScatterND-11/13: no reduction."""
    return _scatter_nd(data, indices, updates, "none")


@op("ScatterND", (16, 18))
def scatter_nd(data, indices, updates, *, reduction: str = "none"):
    """https://onnx.ai/onnx/operators/onnx__ScatterND.html"""
    return _scatter_nd(data, indices, updates, reduction)


@op("TensorScatter", 24)
def tensor_scatter(past_cache, update, write_indices=None, *, axis: int = -2, mode: str = "linear"):
    """https://onnx.ai/onnx/operators/onnx__TensorScatter.html: write ``update`` into the cache per batch row."""
    past = jnp.asarray(past_cache)
    upd = jnp.asarray(update, past.dtype)
    a = norm_axis(axis, past.ndim)
    if a == 0:
        raise ValueError("TensorScatter: axis must not be the batch axis 0")
    if mode not in ("linear", "circular"):
        raise ValueError(f"TensorScatter: mode '{mode}' not supported; expected 'linear' or 'circular'")
    batch, max_len, seq = past.shape[0], past.shape[a], upd.shape[a]
    if seq > max_len:
        raise ValueError(f"TensorScatter: update length {seq} exceeds the cache length {max_len} on axis {a}")
    w = jnp.zeros((batch,), jnp.int64) if write_indices is None else jnp.asarray(write_indices).astype(jnp.int64)
    if seq == 0:
        return past
    if mode == "linear":  # one contiguous window per batch row
        def write(p, u, start):
            return lax.dynamic_update_slice_in_dim(p, u, start, a - 1)

        return jax.vmap(write)(past, upd, w)
    rel = jnp.mod(jnp.arange(max_len, dtype=jnp.int64)[None, :] - w[:, None], max_len)  # position in update
    shape = [1] * past.ndim
    shape[0], shape[a] = batch, max_len
    src = jnp.broadcast_to(jnp.minimum(rel, seq - 1).reshape(shape), past.shape)
    written = jnp.take_along_axis(upd, src, axis=a, mode="clip")
    return jnp.where((rel < seq).reshape(shape), written, past)


# --- Data-dependent shapes -----------------------------------------------------------------------


@op("Compress", (9, 11, 28), static=(1,))
def compress(x, condition, *, axis: int | None = None):
    """https://onnx.ai/onnx/operators/onnx__Compress.html (condition must be known at trace time)."""
    keep = np.nonzero(np.asarray(condition).reshape(-1))[0]
    data = jnp.asarray(x)
    if axis is None:
        data, a = data.reshape(-1), 0
    else:
        a = norm_axis(axis, data.ndim)
    if keep.size and keep[-1] >= data.shape[a]:
        raise ValueError(f"Compress: condition selects index {keep[-1]} but the axis has size {data.shape[a]}")
    return jnp.take(data, jnp.asarray(keep, jnp.int64), axis=a)


@op("NonZero", (9, 13), host=True)
def non_zero(x):
    """https://onnx.ai/onnx/operators/onnx__NonZero.html: int64 [rank, count], row-major order."""
    arr = np.asarray(x)
    if arr.ndim == 0:
        return np.zeros((0, int(arr != 0)), np.int64)
    return np.stack(np.nonzero(arr)).astype(np.int64).reshape(arr.ndim, -1)


@op("Unique", (11, 28), host=True)
def unique(x, *, axis: int | None = None, sorted: int = 1):  # noqa: A002 - the spec's name
    """https://onnx.ai/onnx/operators/onnx__Unique.html: (Y, indices, inverse_indices, counts)."""
    arr = np.asarray(x)
    a = None if axis is None else norm_axis(axis, arr.ndim)
    y, first, inverse, counts = np.unique(arr, return_index=True, return_inverse=True, return_counts=True, axis=a)
    inverse = inverse.reshape(-1)
    if not sorted:
        order = np.argsort(first, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        y = np.take(y, order, axis=0 if a is None else a)
        first, counts, inverse = first[order], counts[order], rank[inverse]
    return y, first.astype(np.int64), inverse.astype(np.int64), counts.astype(np.int64)


def _iou_suppress(box, others, iou_threshold: float) -> np.ndarray:
    """Mask over ``others``: IoU with ``box`` strictly above the threshold."""
    lo = np.maximum(box[:2], others[:, :2])
    hi = np.minimum(box[2:], others[:, 2:])
    inter = np.prod(np.clip(hi - lo, 0, None), axis=1)
    area = np.prod(box[2:] - box[:2])
    areas = np.prod(others[:, 2:] - others[:, :2], axis=1)
    union = area + areas - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where((inter > 0) & (union > 0), inter / np.where(union > 0, union, 1), 0.0)
    return iou > iou_threshold


def _corners(boxes: np.ndarray, center_point_box: int) -> np.ndarray:
    """[..., 4] boxes as (min0, min1, max0, max1) corners."""
    b = boxes.astype(np.float64)
    if center_point_box:
        c, half = b[..., :2], b[..., 2:] / 2
        return np.concatenate([c - half, c + half], axis=-1)
    return np.concatenate([np.minimum(b[..., :2], b[..., 2:]), np.maximum(b[..., :2], b[..., 2:])], axis=-1)


def _scalar(value, default):
    """An optional one-element input as a Python number (``default`` when absent or empty)."""
    if value is None or not np.size(value):
        return default
    return np.asarray(value).reshape(-1)[0].item()


@op("NonMaxSuppression", (10, 11), host=True)
def non_max_suppression(boxes, scores, max_output_boxes_per_class=None, iou_threshold=None,
                        score_threshold=None, *, center_point_box: int = 0):
    """https://onnx.ai/onnx/operators/onnx__NonMaxSuppression.html: int64 [n, 3] (batch, class, box)."""
    corners = _corners(np.asarray(boxes), center_point_box)
    sc = np.asarray(scores)
    limit = int(_scalar(max_output_boxes_per_class, 0))
    iou_t = float(_scalar(iou_threshold, 0.0))
    score_t = _scalar(score_threshold, None)
    selected: list[tuple[int, int, int]] = []
    for b in range(sc.shape[0]):
        for c in range(sc.shape[1]):
            s = sc[b, c]
            cand = np.argsort(-s.astype(np.float64), kind="stable")
            if score_t is not None:
                cand = cand[s[cand] > float(score_t)]
            kept: list[int] = []
            alive = np.ones(cand.size, bool)
            for i, box in enumerate(cand):
                if len(kept) >= limit:
                    break
                if not alive[i]:
                    continue
                kept.append(int(box))
                alive[i + 1:] &= ~_iou_suppress(corners[b, box], corners[b, cand[i + 1:]], iou_t)
            selected.extend((b, c, k) for k in kept)
    return np.asarray(selected, np.int64).reshape(-1, 3)


# --- Sorting and reordering ----------------------------------------------------------------------


def _top_k(x, k: int, axis: int, largest: int):
    data = jnp.asarray(x)
    a = norm_axis(axis, data.ndim)
    if not 0 <= k <= data.shape[a]:
        raise ValueError(f"TopK: k={k} out of range for axis {a} of size {data.shape[a]}")
    moved = jnp.moveaxis(data, a, -1)
    if largest:
        vals, idx = lax.top_k(moved, k)
    else:
        idx = jnp.argsort(moved, axis=-1, stable=True)[..., :k]
        vals = jnp.take_along_axis(moved, idx, axis=-1)
    return jnp.moveaxis(vals, -1, a), jnp.moveaxis(idx.astype(jnp.int64), -1, a)


@op("TopK", 1)
def top_k_v1(x, *, k: int, axis: int = -1):
    """TopK-1: ``k`` attribute, largest first."""
    return _top_k(x, k, axis, 1)


@op("TopK", 10, static=(1,))
def top_k_v10(x, k, *, axis: int = -1):
    """TopK-10: ``k`` input, largest first."""
    return _top_k(x, int(np.asarray(k).reshape(-1)[0]), axis, 1)


@op("TopK", (11, 24), static=(1,))
def top_k(x, k, *, axis: int = -1, largest: int = 1, sorted: int = 1):  # noqa: A002 - the spec's name
    """https://onnx.ai/onnx/operators/onnx__TopK.html (ties: lower index first; output always sorted)."""
    return _top_k(x, int(np.asarray(k).reshape(-1)[0]), axis, largest)


@op("ReverseSequence", (10, 28))
def reverse_sequence(x, sequence_lens, *, batch_axis: int = 1, time_axis: int = 0):
    """https://onnx.ai/onnx/operators/onnx__ReverseSequence.html"""
    data = jnp.asarray(x)
    if {batch_axis, time_axis} != {0, 1}:
        raise ValueError(f"ReverseSequence: batch_axis/time_axis must be 0 and 1, got {batch_axis}/{time_axis}")
    steps = data.shape[time_axis]
    t = jnp.arange(steps, dtype=jnp.int64)
    lens = jnp.asarray(sequence_lens).astype(jnp.int64)
    if time_axis == 0:
        t2, lens2 = t[:, None], lens[None, :]
    else:
        t2, lens2 = t[None, :], lens[:, None]
    src = jnp.where(t2 < lens2, lens2 - 1 - t2, t2)  # [time, batch] or [batch, time]
    src = jnp.broadcast_to(src.reshape(src.shape + (1,) * (data.ndim - 2)), data.shape)
    return jnp.take_along_axis(data, src, axis=time_axis, mode="clip")
