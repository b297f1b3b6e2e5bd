"""The ai.onnx (and com.microsoft) op registry, built explicitly from the family modules."""

from __future__ import annotations

from ....registry import Registry
from . import activation, conv_pool, elementwise, linalg, normalization, shape

FAMILIES = (activation, conv_pool, elementwise, linalg, normalization, shape)

REGISTRY = Registry.merge(*(m.OPS for m in FAMILIES))
