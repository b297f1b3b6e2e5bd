"""Recurrent ops (ai.onnx): RNN, GRU, LSTM via lax.scan."""

from __future__ import annotations

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)
