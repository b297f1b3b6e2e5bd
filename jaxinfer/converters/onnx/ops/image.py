"""Image resampling and layout ops (ai.onnx): Resize, GridSample, RoiAlign, DepthToSpace, ..."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
