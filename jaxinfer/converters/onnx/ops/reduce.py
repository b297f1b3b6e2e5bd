"""Reductions, arg-reductions and cumulative ops (ai.onnx)."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
