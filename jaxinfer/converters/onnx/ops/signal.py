"""Signal ops (ai.onnx): DFT, STFT, window functions, MelWeightMatrix."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
