"""Which graph inputs/outputs of an exported decoder are the tokens, mask, positions, past and present KV.

Recognises the Hugging Face / optimum layout (``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.{i}.key/value`` -> ``logits``, ``present.{i}.key/value``) from a Model's signature, or
takes an explicit :class:`DecoderLayout` for graphs that name things differently.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from ..model import Model, Signature

#: ``past_key_values.3.key``, ``past.3.value``, ``past_key_values_3_key`` ...
PAST_RE = re.compile(r"^past(?:_key_values)?[._](\d+)[._](key|value)$")
PRESENT_RE = re.compile(r"^present(?:_key_values)?[._](\d+)[._](key|value)$")

#: Where a step's new K/V rows land in ``present``: after the whole past ("append": HF's concat), or at the
#: slot's own length, overwriting the past rows there ("inplace": GroupQueryAttention's seqlens_k cache).
KV_WRITES = ("append", "inplace")

#: Attention ops that place new KV rows at the valid length rather than after the whole past.
INPLACE_KV_OPS = ("GroupQueryAttention",)


@dataclass(frozen=True)
class DecoderLayout:
    """Names and KV geometry of a decoder graph with past key/values.

    Example:
        >>> DecoderLayout(past_keys=("pk0",), past_values=("pv0",), present_keys=("k0",),
        ...               present_values=("v0",), kv_heads=2, head_dim=16)   # doctest: +SKIP
    """

    past_keys: tuple[str, ...]
    past_values: tuple[str, ...]
    present_keys: tuple[str, ...]
    present_values: tuple[str, ...]
    kv_heads: int
    head_dim: int
    kv_dtype: np.dtype = np.dtype(np.float32)
    input_ids: str = "input_ids"
    attention_mask: str | None = "attention_mask"
    position_ids: str | None = "position_ids"
    logits: str = "logits"
    kv_write: str = "append"

    def __post_init__(self) -> None:
        n = len(self.past_keys)
        lengths = {len(self.past_values), len(self.present_keys), len(self.present_values)}
        if n == 0 or lengths != {n}:
            raise InputError(
                f"DecoderLayout: past_keys/past_values/present_keys/present_values must be non-empty and of one "
                f"length (one per layer), got {n}/{len(self.past_values)}/{len(self.present_keys)}/"
                f"{len(self.present_values)}")
        if self.kv_write not in KV_WRITES:
            raise InputError(f"DecoderLayout.kv_write must be one of {KV_WRITES}, got {self.kv_write!r}")
        if self.kv_heads <= 0 or self.head_dim <= 0:
            raise InputError(f"DecoderLayout: kv_heads and head_dim must be positive, got {self.kv_heads}, "
                             f"{self.head_dim}")
        object.__setattr__(self, "kv_dtype", np.dtype(self.kv_dtype))

    @property
    def n_layers(self) -> int:
        return len(self.past_keys)

    def input_names(self) -> tuple[str, ...]:
        """Every graph input this layout feeds."""
        extra = tuple(n for n in (self.attention_mask, self.position_ids) if n is not None)
        return (self.input_ids, *extra, *self.past_keys, *self.past_values)

    def check(self, model: Model) -> None:
        """Raise :class:`InputError` when ``model`` lacks a name this layout uses or has inputs it leaves unfed."""
        ins = {s.name for s in model.inputs}
        outs = {s.name for s in model.outputs}
        fed = set(self.input_names())
        missing_in = sorted(fed - ins)
        missing_out = sorted({self.logits, *self.present_keys, *self.present_values} - outs)
        unfed = sorted(ins - fed)
        if missing_in or missing_out or unfed:
            raise InputError(
                f"decoder layout does not fit the model: inputs not in the graph {missing_in}, outputs not in the "
                f"graph {missing_out}, graph inputs the layout does not feed {unfed}; the graph has inputs "
                f"{sorted(ins)} and outputs {sorted(outs)}")


def _by_layer(sigs: Sequence[Signature], pattern: re.Pattern[str]) -> dict[str, list[Signature | None]]:
    found: dict[tuple[int, str], Signature] = {}
    for s in sigs:
        m = pattern.match(s.name)
        if m:
            found[(int(m.group(1)), m.group(2))] = s
    n = 1 + max((i for i, _ in found), default=-1)
    return {kv: [found.get((i, kv)) for i in range(n)] for kv in ("key", "value")}


def _geometry(sig: Signature) -> tuple[int, int]:
    shape = sig.shape
    if shape is None or len(shape) != 4 or not all(isinstance(shape[a], int) and shape[a] > 0 for a in (1, 3)):
        raise InputError(
            f"past input '{sig.name}' has shape {shape}; expected [batch, kv_heads, past, head_dim] with fixed "
            f"kv_heads and head_dim; pass an explicit DecoderLayout(kv_heads=..., head_dim=...)")
    return int(shape[1]), int(shape[3])


def recognise_layout(model: Model) -> DecoderLayout:
    """The :class:`DecoderLayout` of an HF/optimum-style decoder export, read from ``model``'s signature."""
    ins = {s.name: s for s in model.inputs}
    outs = {s.name: s for s in model.outputs}
    past = _by_layer(model.inputs, PAST_RE)
    present = _by_layer(model.outputs, PRESENT_RE)
    n = len(past["key"])
    problems = []
    if "input_ids" not in ins:
        problems.append("no 'input_ids' input")
    if "logits" not in outs:
        problems.append("no 'logits' output")
    if n == 0:
        problems.append("no 'past_key_values.{i}.key/value' inputs")
    elif any(s is None for s in past["key"] + past["value"]):
        problems.append(f"past inputs are not one key and one value for each of layers 0..{n - 1}")
    if len(present["key"]) != n or any(s is None for s in present["key"] + present["value"]):
        problems.append(f"'present.{{i}}.key/value' outputs do not match the {n} past layers")
    if problems:
        raise InputError(
            "not a recognised decoder layout (" + "; ".join(problems) + f"); inputs {sorted(ins)}, outputs "
            f"{sorted(outs)}. Expected the HF/optimum layout or pass layout=DecoderLayout(...)")
    heads, head_dim = _geometry(past["key"][0])  # type: ignore[arg-type]
    dtype = past["key"][0].dtype or np.dtype(np.float32)  # type: ignore[union-attr]
    ops = model.graph.op_histogram()
    layout = DecoderLayout(
        past_keys=tuple(s.name for s in past["key"]),  # type: ignore[union-attr]
        past_values=tuple(s.name for s in past["value"]),  # type: ignore[union-attr]
        present_keys=tuple(s.name for s in present["key"]),  # type: ignore[union-attr]
        present_values=tuple(s.name for s in present["value"]),  # type: ignore[union-attr]
        kv_heads=heads, head_dim=head_dim, kv_dtype=dtype,
        attention_mask="attention_mask" if "attention_mask" in ins else None,
        position_ids="position_ids" if "position_ids" in ins else None,
        kv_write="inplace" if any(op.split("::")[-1] in INPLACE_KV_OPS for op in ops) else "append",
    )
    layout.check(model)
    return layout
