"""Training ops (ai.onnx.preview.training): Momentum, Adagrad, Adam."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
