"""Control flow (ai.onnx): If, Loop, Scan as lax.cond / while_loop / scan."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
