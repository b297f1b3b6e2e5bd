"""Sparse constant tensors (traversal order, block map, DENSE/SPARSE_CSR levels) densified at load vs LiteRT."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.converters.tflite.sparse import densify_levels

from .builder import ModelBuilder
from .harness import compare

RNG = np.random.default_rng(5)
F = np.float32


def encode(dense: np.ndarray, order: list[int], block_map: list[int], block_sizes: list[int],
           sparse_levels: set[int], index_dtype=np.int32):
    """Sparse encoding of ``dense`` (the test's own encoder): values in walk order and the level metadata.

    Expanded dims: dim d (< n) has size shape[d] / block (if blocked); block dim n+i has block_sizes[i].
    Levels in ``sparse_levels`` are SPARSE_CSR (a position is kept when its sub-block has any non-zero).
    """
    n = dense.ndim
    exp_shape = list(dense.shape)
    for i, d in enumerate(block_map):
        exp_shape[d] //= block_sizes[i]
    exp_shape += list(block_sizes)
    # expanded tensor E[o_0..o_{n-1}, b_0..b_{k-1}] = dense[o_d * B_d + b_i]
    idx = np.indices(exp_shape)
    full = []
    for d in range(n):
        c = idx[d]
        if d in block_map:
            i = block_map.index(d)
            c = c * block_sizes[i] + idx[n + i]
        full.append(c)
    expanded = dense[tuple(full)].transpose(order)  # axes in traversal order

    levels, values = [], []
    segs: list[list[int]] = [[0] for _ in order]
    idxs: list[list[int]] = [[] for _ in order]

    def walk(level: int, sub: np.ndarray):
        if level == len(order):
            values.append(sub[()])
            return
        size = sub.shape[0]
        for i in range(size):
            if level in sparse_levels and not np.any(sub[i]):
                continue
            if level in sparse_levels:
                idxs[level].append(i)
            walk(level + 1, sub[i])
        if level in sparse_levels:
            segs[level].append(len(idxs[level]))

    walk(0, expanded)
    for lvl, d in enumerate(order):
        if lvl in sparse_levels:
            levels.append((1, 0, np.array(segs[lvl], np.int32), np.array(idxs[lvl], index_dtype)))
        else:
            levels.append((0, expanded.shape[lvl], None, None))
    return np.array(values, dense.dtype), (order, block_map, levels)


def sparse_matrix(shape, density=0.3, dtype=F, block=(1, 1)):
    r, c = shape[0] // block[0], shape[1] // block[1]
    mask = RNG.random((r, c)) < density
    mask = np.kron(mask, np.ones(block, bool))
    if dtype == np.int8:
        vals = RNG.integers(-127, 128, shape).astype(np.int8)
    else:
        vals = RNG.standard_normal(shape).astype(dtype)
    return np.where(mask, vals, 0).astype(dtype)


CASES = {
    "csr": dict(order=[0, 1], block_map=[], blocks=[], sparse={1}),
    "csc_uint8_indices": dict(order=[1, 0], block_map=[], blocks=[], sparse={1}, index_dtype=np.uint8),
    "block_2x2": dict(order=[0, 1, 2, 3], block_map=[0, 1], blocks=[2, 2], sparse={1}, block=(2, 2)),
    "block_1x4_uint16": dict(order=[0, 1, 2], block_map=[1], blocks=[4], sparse={1}, block=(1, 4),
                             index_dtype=np.uint16),
    "both_sparse": dict(order=[0, 1], block_map=[], blocks=[], sparse={0, 1}, density=0.15),
}


def _encode_case(case, shape=(8, 12), dtype=F):
    cfg = CASES[case]
    dense = sparse_matrix(shape, cfg.get("density", 0.3), dtype, cfg.get("block", (1, 1)))
    values, sp = encode(dense, cfg["order"], cfg["block_map"], cfg["blocks"], cfg["sparse"],
                        cfg.get("index_dtype", np.int32))
    return dense, values, sp


@pytest.mark.parametrize("case", sorted(CASES))
def test_densify_levels_roundtrip(case):
    dense, values, (order, block_map, levels) = _encode_case(case)
    assert values.size < dense.size
    levels = [(f, s, np.zeros(0, np.int64) if g is None else g.astype(np.int64),
               np.zeros(0, np.int64) if i is None else i.astype(np.int64)) for f, s, g, i in levels]
    np.testing.assert_array_equal(densify_levels(values, dense.shape, order, block_map, levels), dense)


@pytest.mark.parametrize("case", sorted(CASES))
def test_densify_op(case):
    """DENSIFY of a sparse constant, added to a runtime input (LiteRT's DENSIFY kernel is the oracle)."""
    dense, values, sp = _encode_case(case)
    b = ModelBuilder()
    x = b.input("x", dense.shape)
    s = b.sparse_const("w_sparse", dense.shape, values, sp)
    d = b.tensor("w", dense.shape)
    y = b.tensor("y", dense.shape)
    b.op("DENSIFY", [s], [d])
    b.op("ADD", [x, d], [y], "AddOptions", fused_activation_function=0)
    b.outputs(y)
    compare(b.finish(), {"x": RNG.standard_normal(dense.shape).astype(F)})


@pytest.mark.parametrize("case", ["block_1x4_uint16", "csr"])
def test_sparse_fully_connected_weights(case):
    """FULLY_CONNECTED reading a sparse weight tensor directly (LiteRT's sparse FC kernel)."""
    dense, values, sp = _encode_case(case, shape=(8, 16))
    b = ModelBuilder()
    x = b.input("x", (3, 16))
    w = b.sparse_const("w", dense.shape, values, sp)
    y = b.tensor("y", (3, 8))
    b.op("FULLY_CONNECTED", [x, w, -1], [y], "FullyConnectedOptions", fused_activation_function=0)
    b.outputs(y)
    compare(b.finish(), {"x": RNG.standard_normal((3, 16)).astype(F)}, kernels="builtin")
