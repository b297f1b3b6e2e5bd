"""String ops (ai.onnx), evaluated on the host: strings never enter XLA."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
