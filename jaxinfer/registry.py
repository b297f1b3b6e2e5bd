"""Op registries: explicit tables keyed by ``(domain, op_type, since_version)``.

Each op family module keeps its own list of :class:`OpDef` filled by its own
``op`` decorator; a format's ``ops/__init__.py`` builds one :class:`Registry`
from those lists explicitly (no registration by import side effect). Dispatch
picks the highest ``since`` not above the model's opset for that domain.
"""

from __future__ import annotations

import bisect
import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

#: Keyword-only parameters an op may declare to receive tracing context.
#: Keywords an op may declare to learn its context: its node's output count, the opset, the node's
#: name, and ``_at_load`` (True when the node is evaluated once at load by constant folding, so the
#: op may build its result with numpy instead of running a JAX program for it).
CONTEXT_PARAMS = ("_num_outputs", "_opset", "_node_name", "_at_load")

StaticSlots = tuple[int, ...] | Literal["all"]


@dataclass(frozen=True)
class OpDef:
    """One version of one op: the function and what the tracer must know about it.

    Attributes:
      op_type: the op's name in its format (``"Conv"``, ``"CONV_2D"``).
      domain: ``""`` for the default ONNX domain.
      since: first opset version this function implements.
      fn: inputs positional in spec order, attributes as keyword arguments.
      static: input slots whose *values* must be known at trace time (shapes,
        axes, pads, ...); ``"all"`` when every input is.
      host: output shape depends on input values (NonZero, Unique): when the
        inputs are concrete the op runs on the host, else it cannot be jitted.
      random: never constant-folded, even on concrete inputs.
      context: the tracing-context keywords ``fn`` declares (see CONTEXT_PARAMS).
      value_free: input slots of which only the shape/dtype is read (Shape,
        Size, CastLike's second input): static-ness does not flow through them.
    """

    op_type: str
    domain: str
    since: int
    fn: Callable[..., Any]
    static: StaticSlots = ()
    host: bool = False
    random: bool = False
    context: frozenset[str] = field(default_factory=frozenset)
    value_free: tuple[int, ...] = ()

    def is_static_slot(self, index: int) -> bool:
        return self.static == "all" or index in self.static


def _context_of(fn: Callable[..., Any]) -> frozenset[str]:
    params = inspect.signature(fn).parameters
    return frozenset(p for p in CONTEXT_PARAMS if p in params)


def registrar(table: list[OpDef], *, domain: str = "") -> Callable[..., Callable[[Callable], Callable]]:
    """Make an ``op`` decorator that appends to ``table``.

    Usage::

        OPS: list[OpDef] = []
        op = registrar(OPS)

        @op("Reshape", since=5, static=(1,))
        def reshape(data, shape, *, allowzero=0): ...
    """

    def op(
        op_type: str | Sequence[str],
        since: int | Sequence[int] = 1,
        *,
        static: StaticSlots = (),
        host: bool = False,
        random: bool = False,
        value_free: tuple[int, ...] = (),
        domain: str = domain,
    ) -> Callable[[Callable], Callable]:
        names = (op_type,) if isinstance(op_type, str) else tuple(op_type)
        versions = (since,) if isinstance(since, int) else tuple(since)

        def deco(fn: Callable) -> Callable:
            ctx = _context_of(fn)
            for name in names:
                for v in versions:
                    table.append(OpDef(name, domain, v, fn, static, host, random, ctx, value_free))
            return fn

        return deco

    return op


def _norm_domain(domain: str) -> str:
    return "" if domain in ("", "ai.onnx") else domain


class Registry:
    """An immutable op table with opset-aware dispatch."""

    def __init__(self, defs: Iterable[OpDef]):
        table: dict[tuple[str, str], dict[int, OpDef]] = {}
        for d in defs:
            key = (_norm_domain(d.domain), d.op_type)
            versions = table.setdefault(key, {})
            if d.since in versions and versions[d.since].fn is not d.fn:
                raise ValueError(f"op {key} since {d.since} registered twice")
            versions[d.since] = d
        self._table = {k: (sorted(v), [v[s] for s in sorted(v)]) for k, v in table.items()}
        newest: dict[str, int] = {}
        for (domain, _), versions in table.items():
            newest[domain] = max(newest.get(domain, 0), *versions)
        self._newest = newest

    def resolve(self, domain: str, op_type: str, opset: int) -> OpDef | None:
        """The op def with the highest ``since`` not above ``opset``, or None."""
        entry = self._table.get((_norm_domain(domain), op_type))
        if entry is None:
            return None
        sinces, defs = entry
        i = bisect.bisect_right(sinces, opset)
        return defs[i - 1] if i else None

    def newest_opset(self, domain: str) -> int | None:
        """The newest opset of ``domain`` this registry implements (its ops' highest ``since``); None
        for a domain it has no ops of."""
        return self._newest.get(_norm_domain(domain))

    def newer_opsets(self, opsets: Mapping[str, int]) -> list[tuple[str, int, int]]:
        """``(domain, declared, newest implemented)`` for each domain of ``opsets`` declared newer than
        :meth:`newest_opset` (its ops then resolve to their newest definition here, which that opset
        may have changed); domains this registry has no ops of are left out."""
        found = []
        for domain, declared in sorted(opsets.items()):
            newest = self.newest_opset(domain)
            if newest is not None and int(declared) > newest:
                found.append((domain, int(declared), newest))
        return found

    def __contains__(self, key: tuple[str, str]) -> bool:
        return (_norm_domain(key[0]), key[1]) in self._table

    def keys(self) -> list[tuple[str, str]]:
        return sorted(self._table)

    def __len__(self) -> int:
        return len(self._table)

    @classmethod
    def merge(cls, *tables: Iterable[OpDef]) -> Registry:
        return cls(d for t in tables for d in t)
