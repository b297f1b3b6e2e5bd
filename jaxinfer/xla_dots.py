"""The dots of a lowered program, read from its StableHLO text, and whether XLA's own loops suit them.

XLA CPU runs a float32 dot either through its kernel library (YNNPACK) or in loops it emits
itself. Measured here: when every dot of a program has few rows and one of them streams a
large weight, XLA's loops are faster (a 512-2048-2048-512 MLP: batch 8 4.5 -> 2.1 ms, batch 32
9.5 -> 6.0 ms; the d1024 encoder at 1x8 tokens 36 -> 22 ms); from ~64 rows the two tie or the
library wins, integer dots need it (XLA's own s8 dot is ~10x slower), so do the dots XLA makes of
convolutions, and tiny dots do not care. :func:`prefers_xla_loops` encodes that rule;
``Model.compile_lowered`` applies it (through ``options_for``) to the default options of a Model's and a
Decoder's programs.

Convolutions are the other way round: XLA's own convolution is faster than the library's from a few
million multiply-adds up (ResNet-50, the TFLite conv fixtures: the library 0.5-0.8x), but it splits
even small ones across its thread pool, whose wake-ups on a 2-core machine cost more than the work.
A program whose convolutions total at most :data:`SMALL_CONV_MACS` runs them in the library
(:func:`prefers_library_convs`), on the calling thread.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass

#: Rows (the product of the left operand's free dims) at or under which XLA's loops win. Measured
#: loops / library on the MLP and the encoder: 16 rows 1.89x / 1.95x, 48 rows 1.29x / 1.45x,
#: 64 rows 0.91x / 0.96x, 96 rows 0.89x / 1.05x.
FEW_ROWS = 48
#: Weight elements (the right operand's contracting x free dims) from which the loops' way of
#: streaming the weight pays; under it both ways cost the same few microseconds.
BIG_WEIGHT = 1 << 20

#: Total multiply-adds of a program's convolutions at or under which the library's convolutions win.
#: Measured library / XLA, same process: the fixture CNN at batch 1 (0.9 M) 1.58-1.72x, its dynamic-axes
#: twin 1.14-1.40x; at 7 M (the TFLite conv fixture, batch 1) f32 1.05x but int8-valued 0.77x; at 10 M
#: (the fixture CNN at batch 8) 0.95-1.09x; at 28 M 0.55-0.74x.
SMALL_CONV_MACS = 2_000_000

_FLOATS = frozenset({"f16", "bf16", "f32", "f64"})
_DOT = re.compile(r"stablehlo\.dot(?:_general)? (?P<attrs>[^\n]*?): \(tensor<(?P<lhs>[^<>]*)>, "
                  r"tensor<(?P<rhs>[^<>]*)>\) ->")
_CONV = re.compile(r"stablehlo\.convolution\([^\n]*?dim_numbers = \[[^\]]*\]x\[(?P<kernel>[^\]]*)\]->[^\n]*?: "
                   r"\(tensor<[^<>]*>, tensor<(?P<rhs>[^<>]*)>\) -> tensor<(?P<out>[^<>]*)>")
_DIMS = re.compile(r"(batching|contracting)_dims = \[([\d, ]*)\] x \[([\d, ]*)\]")


@dataclass(frozen=True)
class DotShape:
    """One dot: its element type, rows (left free dims), and weight elements (right non-batch dims)."""

    dtype: str
    rows: int
    weight: int


def _tensor(t: str) -> tuple[list[int], str] | None:
    """``1x512xf32`` -> ([1, 512], 'f32'); None for a dynamic or unreadable type."""
    *dims, dtype = t.split("x")
    try:
        return [int(d) for d in dims], dtype
    except ValueError:
        return None


def _axes(s: str) -> set[int]:
    return {int(a) for a in s.replace(" ", "").split(",") if a}


def dot_shapes(text: str) -> Iterator[DotShape | None]:
    """Each ``stablehlo.dot``/``dot_general`` in ``text``; None for one whose types it cannot read."""
    for m in _DOT.finditer(text):
        lhs, rhs = _tensor(m["lhs"]), _tensor(m["rhs"])
        if lhs is None or rhs is None:
            yield None
            continue
        (ld, lt), (rd, _) = lhs, rhs
        dims = {kind: (_axes(a), _axes(b)) for kind, a, b in _DIMS.findall(m["attrs"])}
        lb, rb = dims.get("batching", (set(), set()))
        lc, _rc = dims.get("contracting", ({len(ld) - 1}, {0}))  # plain dot: lhs last x rhs first
        rows = math.prod(d for i, d in enumerate(ld) if i not in lb and i not in lc)
        weight = math.prod(d for i, d in enumerate(rd) if i not in rb)
        yield DotShape(lt, rows, weight)


def prefers_xla_loops(text: str) -> bool:
    """Whether every dot is floating with at most :data:`FEW_ROWS` rows and one streams a big weight,
    in a program without convolutions (XLA rewrites some into dots, which need the library: with
    the loops ResNet-50 at batch 8 ran 613 -> 920 ms, AlexNet 125 -> 228 ms)."""
    if "stablehlo.convolution" in text:
        return False
    dots = list(dot_shapes(text))
    if len(dots) != text.count("stablehlo.dot"):  # a dot whose types the pattern does not read
        return False
    big = False
    for d in dots:
        if d is None or d.dtype not in _FLOATS or d.rows > FEW_ROWS:
            return False
        big = big or d.weight >= BIG_WEIGHT
    return big


def conv_macs(text: str) -> int | None:
    """Multiply-adds of every ``stablehlo.convolution`` in ``text`` (output elements x kernel taps per
    output); None when one of them cannot be read."""
    total = read = 0
    for m in _CONV.finditer(text):
        read += 1
        kernel, out = _tensor(m["rhs"]), _tensor(m["out"])
        letters = [d.strip() for d in m["kernel"].split(",")]
        if kernel is None or out is None or "o" not in letters or len(letters) != len(kernel[0]):
            return None
        total += math.prod(out[0]) * math.prod(kernel[0]) // max(kernel[0][letters.index("o")], 1)
    return total if read == text.count("stablehlo.convolution") else None


def prefers_library_convs(text: str) -> bool:
    """Whether ``text`` has convolutions, all readable, totalling at most :data:`SMALL_CONV_MACS`."""
    if "stablehlo.convolution" not in text:
        return False
    macs = conv_macs(text)
    return macs is not None and macs <= SMALL_CONV_MACS
