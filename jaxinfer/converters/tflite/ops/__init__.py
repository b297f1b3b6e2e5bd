"""The TFLite op registry (domain "tflite"), built explicitly from the family modules."""

from __future__ import annotations

from ....registry import Registry
from . import activation, control, elementwise, nn, recurrent, reduce, shape

FAMILIES = (activation, control, elementwise, nn, recurrent, reduce, shape)

REGISTRY = Registry.merge(*(m.OPS for m in FAMILIES))
