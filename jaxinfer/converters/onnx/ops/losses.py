"""Loss ops (ai.onnx): NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
