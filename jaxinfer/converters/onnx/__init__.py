"""ONNX -> Graph -> pure JAX function."""

from __future__ import annotations

import os

from onnx import ModelProto

from ... import passes
from ...model import Model
from .ops import REGISTRY
from .reader import read_model


def load_onnx(source: str | os.PathLike[str] | bytes | ModelProto, *, optimize: bool = True) -> Model:
    """Read an ONNX model (path, bytes or proto) into a :class:`Model`.

    ``optimize`` runs the default graph passes (identity elimination, constant folding, weight
    dedupe, Conv+BatchNorm folding, MatMul+Add fusion, dead-node removal).
    """
    graph = read_model(source)
    if optimize:
        graph = passes.optimize(graph, passes.pipeline(REGISTRY))
    label = str(source) if isinstance(source, (str, os.PathLike)) else graph.name
    return Model(graph, REGISTRY, source=label)


__all__ = ["REGISTRY", "load_onnx", "read_model"]
