"""Random ops (ai.onnx): RandomNormal/Uniform(Like), Bernoulli, Multinomial."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
