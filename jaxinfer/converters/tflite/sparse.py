"""Sparse constant tensors (TFLite ``SparsityParameters``), densified at load.

A sparse tensor of dense shape ``[d0 .. dn-1]`` is stored as a walk over ``n + k``
levels: ``traversal_order`` lists the levels' dimensions (the first ``n`` a
permutation of the tensor's dims, then ``k`` block dims numbered ``n..n+k-1``);
``block_map[i]`` names the tensor dim that block dim ``n+i`` splits. Each level's
``DimensionMetadata`` is DENSE (``dense_size`` positions) or SPARSE_CSR
(``array_segments``/``array_indices``: the children of parent position ``p`` are
``array_indices[segments[p]:segments[p+1]]``). The walk's leaves are the stored
values, in order. A blocked dim of size ``D`` with block size ``B`` has ``D / B``
outer positions; element coordinate = outer * B + inner.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ModelLoadError

_DENSE, _SPARSE_CSR = 0, 1
_INDEX_VECTORS = {1: "Int32Vector", 2: "Uint16Vector", 3: "Uint8Vector"}


def _index_vector(kind: int, table: Any, what: str) -> np.ndarray:
    if kind not in _INDEX_VECTORS or table is None:
        raise ModelLoadError(f"sparse tensor: {what} is missing or of unknown type {kind} (expected Int32/Uint16/Uint8Vector)")
    name = _INDEX_VECTORS[kind]
    mod = __import__(f"tflite.{name}", fromlist=[name])
    vec = getattr(mod, name)()
    vec.Init(table.Bytes, table.Pos)
    if vec.ValuesLength() == 0:
        return np.zeros(0, np.int64)
    return np.asarray(vec.ValuesAsNumpy(), np.int64)


def read_sparsity(sparsity: Any) -> tuple[list[int], list[int], list[tuple[int, int, np.ndarray, np.ndarray]]]:
    """(traversal_order, block_map, [(format, dense_size, segments, indices)] per level) of a SparsityParameters table."""
    order = [int(v) for v in sparsity.TraversalOrderAsNumpy()] if sparsity.TraversalOrderLength() else []
    block_map = [int(v) for v in sparsity.BlockMapAsNumpy()] if sparsity.BlockMapLength() else []
    levels = []
    for i in range(sparsity.DimMetadataLength()):
        dm = sparsity.DimMetadata(i)
        fmt = int(dm.Format())
        if fmt == _DENSE:
            levels.append((fmt, int(dm.DenseSize()), np.zeros(0, np.int64), np.zeros(0, np.int64)))
        elif fmt == _SPARSE_CSR:
            seg = _index_vector(dm.ArraySegmentsType(), dm.ArraySegments(), f"array_segments of level {i}")
            idx = _index_vector(dm.ArrayIndicesType(), dm.ArrayIndices(), f"array_indices of level {i}")
            levels.append((fmt, 0, seg, idx))
        else:
            raise ModelLoadError(f"sparse tensor: level {i} has format {fmt} (expected DENSE 0 or SPARSE_CSR 1)")
    return order, block_map, levels


def densify_levels(values: np.ndarray, shape: tuple[int, ...], order: list[int], block_map: list[int],
                   levels: list[tuple[int, int, np.ndarray, np.ndarray]]) -> np.ndarray:
    """The dense array of ``shape`` whose sparse encoding is (order, block_map, levels) over ``values``."""
    n = len(shape)
    if len(order) != len(levels) or len(order) != n + len(block_map) or sorted(order) != list(range(len(order))):
        raise ModelLoadError(f"sparse tensor of shape {shape}: traversal_order {order}, block_map {block_map} and "
                             f"{len(levels)} dim_metadata levels do not describe one walk over {n} dims")
    pos = np.zeros(1, np.int64)  # flat position of each path at the current level
    coords: list[np.ndarray] = []  # per level, the coordinate of each path
    for lvl, (fmt, size, seg, idx) in enumerate(levels):
        if fmt == _DENSE:
            inner = np.arange(size, dtype=np.int64)
            coords = [np.repeat(c, size) for c in coords]
            coords.append(np.tile(inner, pos.size))
            pos = (pos[:, None] * size + inner[None, :]).ravel()
        else:
            if pos.size and (pos.max() + 1 >= seg.size):
                raise ModelLoadError(f"sparse tensor of shape {shape}: level {lvl} has {seg.size} segments, "
                                     f"needs more than {int(pos.max()) + 1}")
            starts, ends = seg[pos], seg[pos + 1]
            counts = ends - starts
            coords = [np.repeat(c, counts) for c in coords]
            child = np.concatenate([np.arange(s, e, dtype=np.int64) for s, e in zip(starts, ends)]) if pos.size \
                else np.zeros(0, np.int64)
            if child.size and child.max() >= idx.size:
                raise ModelLoadError(f"sparse tensor of shape {shape}: level {lvl} indexes past its array_indices")
            coords.append(idx[child])
            pos = child
    if pos.size != values.size:
        raise ModelLoadError(f"sparse tensor of shape {shape}: the sparsity walk reaches {pos.size} values, the "
                             f"buffer holds {values.size}")
    by_dim = {d: coords[lvl] for lvl, d in enumerate(order)}
    block_size = {block_map[i]: levels[order.index(n + i)][1] for i in range(len(block_map))}
    full = []
    for d in range(n):
        c = by_dim[d]
        if d in block_size:
            c = c * block_size[d] + by_dim[n + block_map.index(d)]
        full.append(c)
    out = np.zeros(shape, values.dtype)
    if values.size:
        if any(c.size and (c.max() >= s) for c, s in zip(full, shape)):
            raise ModelLoadError(f"sparse tensor of shape {shape}: an index lies outside the dense shape")
        out[tuple(full)] = values[pos]
    return out


def densify(values: np.ndarray, shape: tuple[int, ...], sparsity: Any) -> np.ndarray:
    """Dense array of a sparse constant tensor (``values`` are its stored elements, in walk order)."""
    order, block_map, levels = read_sparsity(sparsity)
    return densify_levels(values, tuple(shape), order, block_map, levels)
