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

    ``requant`` picks which LiteRT kernel set's integer arithmetic to follow where they differ:
    ``"reference"`` (its reference kernels: fixed-point requantization rounding ties away from
    zero; FULLY_CONNECTED rescales ``double(acc) * real`` and rounds half away), ``"builtin"``
    (its builtin kernels as built for x86-64: FULLY_CONNECTED and CONV_2D run on ruy, whose
    requantization rounds ties up; int8 DEPTHWISE_CONV_2D and 8-bit ADD round differently in
    their SIMD lanes; quantized MEAN over H, W and SUM take the optimized kernels' arithmetic;
    see ``ops/nn.py`` ``requant_rule``) or ``"xnnpack"`` (LiteRT's default delegate: 8-bit MEAN
    and SUM rescale in float32 and round half to even; other integer ops as ``"reference"``,
    XNNPACK's own float32 requantization of convolutions and adds is not modelled).

    Example:
      >>> m = load_tflite("mobilenet_v2.tflite")                      # doctest: +SKIP
      >>> m.run({"input": np.zeros((1, 224, 224, 3), np.float32)})    # doctest: +SKIP
    """
    graph = read_model(source, hybrid=hybrid, requant=requant)
    label = str(source) if isinstance(source, (str, os.PathLike)) else graph.name
    return Model(graph, REGISTRY, source=label)


__all__ = ["REGISTRY", "load_tflite", "read_model"]
