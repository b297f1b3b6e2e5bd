"""Collectives read from compiled HLO text: count and bytes per kind."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
                "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1}
_LINE = re.compile(r"=\s*(?P<type>.+?)\s+(?P<kind>" + "|".join(KINDS) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"(?P<dt>[a-z]+\d*[a-z0-9]*)\[(?P<dims>[0-9,]*)\]")


@dataclass
class Collectives:
    """``counts[kind]`` and ``bytes[kind]`` (result bytes per device) of one executable."""

    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    bytes: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def total_bytes(self) -> int:
        return sum(self.bytes.values())

    def __str__(self) -> str:
        parts = [f"{k}×{n} ({self.bytes[k]} B)" for k, n in self.counts.items() if n]
        return ", ".join(parts) or "none"


def _type_bytes(text: str) -> int:
    total = 0
    for m in _ARRAY.finditer(text):
        size = _DTYPE_BYTES.get(m.group("dt"))
        if size is None:
            continue
        n = 1
        for d in filter(None, m.group("dims").split(",")):
            n *= int(d)
        total += n * size
    return total


def collectives(compiled_or_text: Any) -> Collectives:
    """Count collectives in a ``jax.stages.Compiled`` (or its ``as_text()``)."""
    text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
    out = Collectives()
    for line in text.splitlines():
        if "-done" in line.split("(")[0]:
            continue
        m = _LINE.search(line)
        if not m:
            continue
        kind = m.group("kind")
        out.counts[kind] += 1
        typ = m.group("type")
        if m.group("start") and typ.startswith("("):  # async start: (operands, results, ...) -- take the last half
            arrays = _ARRAY.findall(typ)
            typ = " ".join(f"{dt}[{dims}]" for dt, dims in arrays[len(arrays) // 2:])
        out.bytes[kind] += _type_bytes(typ)
    return out
