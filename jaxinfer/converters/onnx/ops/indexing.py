"""Indexing ops (ai.onnx): gather/scatter families, TopK, NonZero, Unique, NonMaxSuppression, ..."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
