"""Classic ML ops (ai.onnx.ml domain)."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
