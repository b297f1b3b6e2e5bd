"""Errors jaxinfer raises: every one names what was wrong and what was expected."""

from __future__ import annotations

from dataclasses import dataclass


class JaxinferError(Exception):
    """Base class of every error jaxinfer raises on purpose."""


class ModelLoadError(JaxinferError):
    """A model file could not be read: corrupt, truncated, unsafe external data, unknown format."""


class InputError(JaxinferError, ValueError):
    """An input given to a model does not fit its signature (name, dtype, rank or dim)."""


class OpError(JaxinferError):
    """An op failed while tracing; names the node, its op type and what went wrong."""


@dataclass(frozen=True)
class UnsupportedOp:
    """One op the registry has no implementation for."""

    op_type: str
    domain: str
    opset: int
    nodes: tuple[str, ...]

    def __str__(self) -> str:
        domain = self.domain or "ai.onnx"
        shown = ", ".join(self.nodes[:5]) + (", ..." if len(self.nodes) > 5 else "")
        return f"{domain}::{self.op_type} (opset {self.opset}; nodes: {shown})"


class UnsupportedOpsError(JaxinferError):
    """Raised once per model, listing *all* unsupported ops, not only the first."""

    def __init__(self, ops: tuple[UnsupportedOp, ...]):
        self.ops = ops
        lines = "\n  ".join(str(o) for o in ops)
        super().__init__(f"{len(ops)} unsupported op(s):\n  {lines}")
