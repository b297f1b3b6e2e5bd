"""ONNX -> Graph -> pure JAX function."""

from __future__ import annotations

import os

from onnx import ModelProto

from ... import passes
from ...errors import NewerOpsetWarning, newer_opset_message, warn
from ...model import Model
from .ops import REGISTRY
from .reader import read_model


def load_onnx(source: str | os.PathLike[str] | bytes | ModelProto, *, optimize: bool = True) -> Model:
    """Read an ONNX model (path, bytes or proto) into a :class:`Model`.

    ``optimize`` runs the default graph passes (identity elimination, constant folding, weight
    dedupe, Conv+BatchNorm folding, MatMul+Add fusion, dead-node removal).

    Warns (:class:`~jaxinfer.errors.NewerOpsetWarning`) for each domain whose declared opset is
    newer than the newest jaxinfer implements: its ops run as their newest known definitions.
    """
    graph = read_model(source)
    for domain, declared, newest in REGISTRY.newer_opsets(graph.opsets):
        warn(newer_opset_message(domain, declared, newest), NewerOpsetWarning)
    if optimize:
        graph = passes.optimize(graph, passes.pipeline(REGISTRY))
    label = str(source) if isinstance(source, (str, os.PathLike)) else graph.name
    return Model(graph, REGISTRY, source=label)


__all__ = ["REGISTRY", "load_onnx", "read_model"]
