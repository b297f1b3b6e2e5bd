"""Sparse constant tensors (TFLite SparsityParameters).

Not implemented yet: a sparse constant is reported as a load error naming the
tensor rather than read wrongly.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...errors import ModelLoadError


def densify(values: np.ndarray, shape: tuple[int, ...], sparsity: Any) -> np.ndarray:
    """Dense array of a sparse constant (raises: the traversal/block formats are not implemented yet)."""
    raise ModelLoadError(
        f"sparse constant tensor of shape {shape} ({values.size} stored values): TFLite sparsity "
        "(traversal order / block map / CSR dim metadata) is not supported yet; expected dense constants")
