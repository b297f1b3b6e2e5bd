"""TFLite -> Graph -> pure JAX function (NHWC ops, affine int8/uint8 integer kernels, resource-variable state)."""

from __future__ import annotations

import os

from ...model import Model
from .ops import REGISTRY
from .reader import read_model


def load_tflite(source: str | os.PathLike[str] | bytes) -> Model:
    """Read a ``.tflite`` model (path or bytes) into a :class:`~jaxinfer.Model`.

    Example:
      >>> m = load_tflite("mobilenet_v2.tflite")                      # doctest: +SKIP
      >>> m.run({"input": np.zeros((1, 224, 224, 3), np.float32)})    # doctest: +SKIP
    """
    graph = read_model(source)
    label = str(source) if isinstance(source, (str, os.PathLike)) else graph.name
    return Model(graph, REGISTRY, source=label)


__all__ = ["REGISTRY", "load_tflite", "read_model"]
