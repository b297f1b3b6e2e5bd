"""Sequence and optional ops (ai.onnx); a sequence is a Python list of arrays."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
