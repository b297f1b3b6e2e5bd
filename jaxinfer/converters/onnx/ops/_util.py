"""Small helpers shared by the ONNX op modules."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..reader import onnx_dtype


def axis(a: int, rank: int) -> int:
    """Normalize a possibly negative axis against ``rank``."""
    if not -rank <= a < max(rank, 1):
        raise ValueError(f"axis {a} out of range for rank {rank}")
    return a + rank if a < 0 else a


def axes(values: Sequence[int] | np.ndarray | None, rank: int) -> tuple[int, ...]:
    if values is None:
        return tuple(range(rank))
    return tuple(axis(int(a), rank) for a in np.asarray(values).reshape(-1))


def ints(value: Any) -> tuple[int, ...]:
    """A static 1-D int input (numpy) as a tuple of Python ints."""
    return tuple(int(v) for v in np.asarray(value).reshape(-1))


def dtype_of(to: int) -> np.dtype:
    """numpy dtype of an ONNX element type code (``to=`` attributes)."""
    return onnx_dtype(int(to))


def is_float(x: Any) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def spatial_pads(pads: Sequence[int] | None, n: int) -> list[tuple[int, int]]:
    """ONNX ``pads`` [x1_begin, x2_begin, ..., x1_end, x2_end] -> [(begin, end)] per axis."""
    if not pads:
        return [(0, 0)] * n
    return [(int(pads[i]), int(pads[i + n])) for i in range(n)]


def auto_pads(auto_pad: str, in_shape: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int], pads: Sequence[int] | None, ceil_mode: int = 0) -> list[tuple[int, int]]:
    """Explicit (begin, end) pads per spatial axis for every ``auto_pad`` mode."""
    n = len(kernel)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        out = []
        for i in range(n):
            eff = (kernel[i] - 1) * dilations[i] + 1
            target = -(-in_shape[i] // strides[i])
            total = max((target - 1) * strides[i] + eff - in_shape[i], 0)
            small, big = total // 2, total - total // 2
            out.append((small, big) if auto_pad == "SAME_UPPER" else (big, small))
        return out
    if auto_pad == "VALID":
        return [(0, 0)] * n
    return spatial_pads(pads, n)
