"""Quantization and precision: bf16/fp16/mixed, int8 weight-only, w8a8 dynamic and static, auto.

The policy lives in the params pytree (qwix ``QArray`` / :class:`jaxinfer.arith.W8A8` /
low-precision arrays); the ops call :mod:`jaxinfer.arith`, which dispatches on them.
"""

from __future__ import annotations

from .api import ALIASES, METHODS, QuantizedModel, canonical, quantize
from .facade import InferenceRequest, InferenceResult, ManagedModel, ModelManager
from .layers import Layer, find_layers
from .prune import prune
from .report import QuantReport

__all__ = ["ALIASES", "METHODS", "InferenceRequest", "InferenceResult", "Layer", "ManagedModel", "ModelManager",
           "QuantReport", "QuantizedModel", "canonical", "find_layers", "prune", "quantize"]
