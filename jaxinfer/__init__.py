"""jaxinfer: ONNX and TFLite models as pure, jitted JAX functions.

Example:
    >>> import jaxinfer                                      # doctest: +SKIP
    >>> m = jaxinfer.load("model.onnx")                      # doctest: +SKIP
    >>> out = m.run({"x": x})                                # doctest: +SKIP
"""

from __future__ import annotations

from . import _config  # noqa: F401  (enables 64-bit types before anything traces)
from .errors import InputError, JaxinferError, ModelLoadError, OpError, OutOfMemoryError, UnsupportedOpsError
from .generation import Decoder, SamplingParams, generate, generate_stream
from .graph import Graph, Node, ValueInfo
from .loading import load
from .model import Model, Signature
from .serve import Server, serve
from .sharding import distributed, plan
from .quant import QuantizedModel, QuantReport, quantize
from .quant import InferenceRequest, ModelManager, prune
from .saving import save

__version__ = "0.1.0"

__all__ = [
    "Decoder",
    "Graph",
    "InferenceRequest",
    "InputError",
    "JaxinferError",
    "Model",
    "ModelLoadError",
    "ModelManager",
    "Node",
    "OpError",
    "OutOfMemoryError",
    "QuantReport",
    "QuantizedModel",
    "SamplingParams",
    "Server",
    "Signature",
    "UnsupportedOpsError",
    "ValueInfo",
    "distributed",
    "generate",
    "generate_stream",
    "load",
    "plan",
    "prune",
    "quantize",
    "save",
    "serve",
]
