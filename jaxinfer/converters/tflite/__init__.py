"""TFLite -> Graph -> pure JAX function (NHWC ops, affine int8/uint8 integer kernels, resource-variable state)."""

from __future__ import annotations

import os

from ...model import Model
from .ops import REGISTRY
from .reader import read_model


def load_tflite(source: str | os.PathLike[str] | bytes, *, hybrid: str = "xnnpack",
                requant: str = "reference") -> Model:
    """Read a ``.tflite`` model (path or bytes) into a :class:`~jaxinfer.Model`.

    ``hybrid`` picks how dynamic-range layers (int8 weights, float inputs) quantize their
    inputs, as the two LiteRT CPU paths do: ``"xnnpack"`` (LiteRT's default delegate:
    asymmetric int8 per batch row for FULLY_CONNECTED/CONV_2D/DEPTHWISE_CONV_2D) or
    ``"builtin"`` (LiteRT's builtin kernels: symmetric unless the op's
    ``asymmetric_quantize_inputs`` is set or the conv weights are per-channel).

    ``requant`` picks the integer requantization rounding: ``"reference"`` (LiteRT's reference
    kernels: ties away from zero), ``"builtin"`` (its builtin kernels, where int8 per-channel
    CONV_2D runs on ruy and rounds ties up, and quantized MEAN over H, W and SUM take the
    optimized kernels' arithmetic) or ``"xnnpack"`` (LiteRT's default delegate: 8-bit MEAN and
    SUM rescale in float32 and round half to even; other integer ops round as ``"reference"``,
    XNNPACK's own float32 requantization of convolutions and adds is not modelled).

    Example:
      >>> m = load_tflite("mobilenet_v2.tflite")                      # doctest: +SKIP
      >>> m.run({"input": np.zeros((1, 224, 224, 3), np.float32)})    # doctest: +SKIP
    """
    graph = read_model(source, hybrid=hybrid, requant=requant)
    label = str(source) if isinstance(source, (str, os.PathLike)) else graph.name
    return Model(graph, REGISTRY, source=label)


__all__ = ["REGISTRY", "load_tflite", "read_model"]
