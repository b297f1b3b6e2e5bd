"""Quantize/dequantize and integer ops (ai.onnx): QuantizeLinear, DequantizeLinear, QLinear*, ..."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
