"""Errors jaxinfer raises: every one names what was wrong and what was expected."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass


class JaxinferError(Exception):
    """Base class of every error jaxinfer raises on purpose."""


class ModelLoadError(JaxinferError):
    """A model file could not be read: corrupt, truncated, unsafe external data, unknown format."""


class InputError(JaxinferError, ValueError):
    """An input given to a model does not fit its signature (name, dtype, rank or dim)."""


class OpError(JaxinferError):
    """An op failed while tracing; names the node, its op type and what went wrong."""


class OutOfMemoryError(JaxinferError, MemoryError):
    """The model needs more memory than this machine has.

    Raised at trace time for one value larger than any memory here holds (naming the node, op, shape,
    dtype and bytes against the limit), and when XLA runs out of memory compiling or running the
    model (naming the inputs whose shapes asked for it). The process stays usable: smaller inputs run.
    """


class NewerOpsetWarning(UserWarning):
    """A model declares an opset newer than the newest jaxinfer implements for that domain."""


class UnmatchedExcludeWarning(UserWarning):
    """An ``exclude`` glob given to quantize/prune matched no node, op type or initializer of the model."""


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


def warn(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` pointing at the first caller outside the jaxinfer package (the user's line), or at
    the outermost frame when every caller is inside it (the ``jaxinfer`` command)."""
    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    frame, level = sys._getframe(0), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def newer_opset_message(domain: str, declared: int, newest: int) -> str:
    """What :class:`NewerOpsetWarning` and ``jaxinfer info`` say about one domain's opset."""
    return (f"the model declares opset {declared} of domain '{domain or 'ai.onnx'}', newer than the newest "
            f"jaxinfer implements ({newest}): its ops run as their newest definitions jaxinfer knows (opset "
            f"{newest} or older), which opset {declared} may have changed (onnxruntime refuses such a model)")
