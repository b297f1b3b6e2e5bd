"""Sequence and optional ops (ai.onnx).

A sequence value is a Python list of arrays; its length is always known at
trace time, so positions are static and loops over elements unroll. An empty
optional is ``None``; a non-empty one is its element (a tensor or a list).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax import lax
import numpy as np

from ....registry import OpDef, registrar
from ._util import axis as norm_axis
from ._util import ints

OPS: list[OpDef] = []
op = registrar(OPS)


def _check_sequence(seq: Any, op_type: str) -> list[Any]:
    if not isinstance(seq, (list, tuple)):
        raise ValueError(f"{op_type}: input must be a sequence (list of tensors), got {type(seq).__name__}")
    return list(seq)


def _position(position: Any, length: int, op_type: str, *, inserting: bool = False) -> int:
    """A static position, negative counting from the back; inserting allows ``length``."""
    p = int(np.asarray(position).reshape(-1)[0]) if np.size(position) == 1 else None
    if p is None:
        raise ValueError(f"{op_type}: position must be a scalar, got shape {np.shape(position)}")
    hi = length if inserting else length - 1
    if not -length <= p <= hi:
        raise ValueError(f"{op_type}: position {p} out of range [{-length}, {hi}] for a sequence of length {length}")
    return p + length if p < 0 else p


@op("SequenceEmpty", (11,))
def sequence_empty(*, dtype: int = 1):
    """https://onnx.ai/onnx/operators/onnx__SequenceEmpty.html"""
    return []


@op("SequenceConstruct", (11,))
def sequence_construct(*inputs):
    """https://onnx.ai/onnx/operators/onnx__SequenceConstruct.html"""
    return list(inputs)


@op("SequenceInsert", (11,), static=(2,))
def sequence_insert(input_sequence, tensor, position=None):
    """https://onnx.ai/onnx/operators/onnx__SequenceInsert.html (default: append)."""
    seq = _check_sequence(input_sequence, "SequenceInsert")
    p = len(seq) if position is None else _position(position, len(seq), "SequenceInsert", inserting=True)
    return seq[:p] + [tensor] + seq[p:]


@op("SequenceAt", (11,), static=(1,))
def sequence_at(input_sequence, position):
    """https://onnx.ai/onnx/operators/onnx__SequenceAt.html"""
    seq = _check_sequence(input_sequence, "SequenceAt")
    return seq[_position(position, len(seq), "SequenceAt")]


@op("SequenceErase", (11,), static=(1,))
def sequence_erase(input_sequence, position=None):
    """https://onnx.ai/onnx/operators/onnx__SequenceErase.html (default: the last element)."""
    seq = _check_sequence(input_sequence, "SequenceErase")
    p = len(seq) - 1 if position is None else _position(position, len(seq), "SequenceErase")
    if not seq:
        raise ValueError("SequenceErase: cannot erase from an empty sequence")
    return seq[:p] + seq[p + 1:]


@op("SequenceLength", (11,), value_free=(0,))
def sequence_length(input_sequence):
    """https://onnx.ai/onnx/operators/onnx__SequenceLength.html: an int64 scalar known at trace time."""
    return np.asarray(len(_check_sequence(input_sequence, "SequenceLength")), dtype=np.int64)


@op("ConcatFromSequence", (11,))
def concat_from_sequence(input_sequence, *, axis: int, new_axis: int = 0):
    """https://onnx.ai/onnx/operators/onnx__ConcatFromSequence.html (new_axis=1 stacks)."""
    seq = _check_sequence(input_sequence, "ConcatFromSequence")
    if not seq:
        raise ValueError("ConcatFromSequence: the sequence is empty; its element shape is unknown")
    rank = jnp.ndim(seq[0])
    if new_axis:
        return jnp.stack(seq, axis=norm_axis(axis, rank + 1))
    return jnp.concatenate(seq, axis=norm_axis(axis, rank))


@op("SplitToSequence", (11, 24), static=(1,))
def split_to_sequence(input, split=None, *, axis: int = 0, keepdims: int = 1):
    """https://onnx.ai/onnx/operators/onnx__SplitToSequence.html"""
    a = norm_axis(axis, jnp.ndim(input))
    n = jnp.shape(input)[a]
    if split is None:
        parts = [jnp.take(input, i, axis=a) for i in range(n)]
        return parts if not keepdims else [jnp.expand_dims(p, a) for p in parts]
    if np.ndim(split) == 0:
        size = int(split)
        if size <= 0:
            raise ValueError(f"SplitToSequence: a scalar split must be positive, got {size}")
        sizes = [size] * (n // size) + ([n % size] if n % size else [])
    else:
        sizes = list(ints(split))
        if sum(sizes) != n:
            raise ValueError(f"SplitToSequence: split sizes {sizes} sum to {sum(sizes)}, expected dim {a} = {n}")
    bounds = np.cumsum([0] + sizes)
    return [lax.slice_in_dim(input, int(s), int(e), axis=a) for s, e in zip(bounds[:-1], bounds[1:])]


@op("SequenceMap", (17,))
def sequence_map(input_sequence, *additional_inputs, body):
    """https://onnx.ai/onnx/operators/onnx__SequenceMap.html: the body per element (unrolled)."""
    seq = _check_sequence(input_sequence, "SequenceMap")
    for j, extra in enumerate(additional_inputs):
        if isinstance(extra, (list, tuple)) and len(extra) != len(seq):
            raise ValueError(
                f"SequenceMap: additional input #{j + 1} is a sequence of length {len(extra)}, "
                f"expected the input sequence's length {len(seq)}")
    outs: list[list[Any]] = [[] for _ in range(body.n_outputs)]
    for i, element in enumerate(seq):
        args = [extra[i] if isinstance(extra, (list, tuple)) else extra for extra in additional_inputs]
        for k, value in enumerate(body(element, *args)):
            outs[k].append(value)
    return tuple(outs)


@op("Optional", (15,))
def optional(input=None, *, type=None):
    """https://onnx.ai/onnx/operators/onnx__Optional.html: empty (None) without an input."""
    return input


@op("OptionalHasElement", (15, 18), value_free=(0,))
def optional_has_element(input=None):
    """https://onnx.ai/onnx/operators/onnx__OptionalHasElement.html"""
    return np.asarray(input is not None)


@op("OptionalGetElement", (15, 18))
def optional_get_element(input):
    """https://onnx.ai/onnx/operators/onnx__OptionalGetElement.html (18+: plain tensors/sequences pass)."""
    if input is None:
        raise ValueError("OptionalGetElement: the optional is empty; expected it to hold a value")
    return input
