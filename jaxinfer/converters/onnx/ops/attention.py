"""Attention-family ops (ai.onnx opset 23+): Attention, RotaryEmbedding, ..."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
