"""The neutral graph between file formats and everything after them.

Frozen dataclasses only: passes return new graphs, nothing is mutated in place.
A ``Graph`` holds nodes in topological order, named inputs/outputs with their
(possibly symbolic) shapes, and initializers (weights and constants) as numpy
arrays. Subgraphs (``If``/``Loop``/``Scan`` bodies, TFLite ``WHILE``) are
``Graph`` values inside a node's attributes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np

Dim = int | str | None
"""A dimension: a concrete size, a symbolic name (``"batch"``), or unknown."""


@dataclass(frozen=True)
class ValueInfo:
    """A named value's declared type: ``kind`` is tensor, sequence, optional or map."""

    name: str
    shape: tuple[Dim, ...] | None = None
    dtype: np.dtype | None = None
    kind: str = "tensor"
    elem: ValueInfo | None = None  # element type of a sequence/optional

    @property
    def rank(self) -> int | None:
        return None if self.shape is None else len(self.shape)


def _frozen(mapping: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping or {}))


@dataclass(frozen=True)
class Node:
    """One op application. ``inputs`` holds ``""`` for an omitted optional input."""

    op_type: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: Mapping[str, Any] = field(default_factory=dict)
    name: str = ""
    domain: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "attrs", _frozen(self.attrs))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))

    @property
    def label(self) -> str:
        return self.name or f"{self.op_type}->{','.join(self.outputs)}"

    def subgraphs(self) -> Iterator[Graph]:
        for v in self.attrs.values():
            if isinstance(v, Graph):
                yield v
            elif isinstance(v, (list, tuple)):
                yield from (g for g in v if isinstance(g, Graph))


@dataclass(frozen=True)
class Graph:
    """A computation: nodes in topological order over named values.

    ``initializers`` are the graph's stored tensors; which of them become the
    params pytree and which stay trace-time constants is decided by the Model.
    ``opsets`` maps domain (``""`` for ai.onnx) to version; subgraphs inherit
    their parent's. ``fmt`` names the source format ("onnx", "tflite").
    ``state_vars`` maps each state value (read like an input) to the value that
    holds its next contents; ``state_init`` holds their initial values. A graph
    with state traces to ``fn(params, state, inputs) -> (outputs, state)``.
    """

    nodes: tuple[Node, ...]
    inputs: tuple[ValueInfo, ...]
    outputs: tuple[ValueInfo, ...]
    initializers: Mapping[str, np.ndarray] = field(default_factory=dict)
    opsets: Mapping[str, int] = field(default_factory=dict)
    name: str = "graph"
    value_info: Mapping[str, ValueInfo] = field(default_factory=dict)
    fmt: str = "onnx"
    metadata: Mapping[str, str] = field(default_factory=dict)
    state_vars: Mapping[str, str] = field(default_factory=dict)
    state_init: Mapping[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nodes", tuple(self.nodes))
        object.__setattr__(self, "inputs", tuple(self.inputs))
        object.__setattr__(self, "outputs", tuple(self.outputs))
        for name in ("initializers", "opsets", "value_info", "metadata", "state_vars", "state_init"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    def replace(self, **changes: Any) -> Graph:
        return replace(self, **changes)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.outputs)

    def walk(self) -> Iterator[tuple[Node, Graph]]:
        """Every node, subgraphs included, with the graph that holds it."""
        for node in self.nodes:
            yield node, self
            for sub in node.subgraphs():
                yield from sub.walk()

    def producers(self) -> dict[str, Node]:
        return {out: n for n in self.nodes for out in n.outputs if out}

    def consumers(self) -> dict[str, list[Node]]:
        users: dict[str, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                if i:
                    users.setdefault(i, []).append(n)
        return users

    def op_histogram(self) -> dict[str, int]:
        hist: dict[str, int] = {}
        for node, _ in self.walk():
            key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            hist[key] = hist.get(key, 0) + 1
        return dict(sorted(hist.items(), key=lambda kv: (-kv[1], kv[0])))

    def params_bytes(self) -> int:
        return int(sum(np.asarray(v).nbytes for v in self.initializers.values()))


def outer_names(graph: Graph) -> set[str]:
    """Names a (sub)graph reads that it neither defines nor takes as input."""
    defined = set(graph.input_names) | set(graph.initializers)
    used: set[str] = set()
    for node in graph.nodes:
        used.update(i for i in node.inputs if i)
        for sub in node.subgraphs():
            used.update(outer_names(sub))
        defined.update(o for o in node.outputs if o)
    used.update(graph.output_names)
    return used - defined


def values_flowing_from(sources: set[str], steps: Iterator[tuple[str, tuple[str, ...], tuple[str, ...]]] | list) -> set[str]:
    """Names computed from ``sources`` by ``(op_type, inputs, outputs)`` steps in order,
    not counting flow through ``Shape``/``Size`` (which read only shapes)."""
    flowing = set(sources)
    for op_type, inputs, outputs in steps:
        if op_type in ("Shape", "Size"):
            continue
        if any(i in flowing for i in inputs if i):
            flowing.update(o for o in outputs if o)
    return flowing


def topological_order(nodes: tuple[Node, ...], available: set[str]) -> tuple[Node, ...]:
    """Nodes sorted so every input is produced before use (stable; cycles raise)."""
    ready = set(available)
    pending = list(nodes)
    ordered: list[Node] = []
    while pending:
        rest = []
        for node in pending:
            needs = {i for i in node.inputs if i}
            for sub in node.subgraphs():
                needs |= outer_names(sub)
            producible = {o for n in pending for o in n.outputs}
            if all(i in ready or i not in producible for i in needs):
                ordered.append(node)
                ready.update(node.outputs)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            names = ", ".join(n.label for n in rest[:5])
            raise ValueError(f"graph has a cycle or dangling inputs among nodes: {names}")
        pending = rest
    return tuple(ordered)


def structure_problems(graph: Graph, *, outputs_required: bool = True) -> list[str]:
    """What breaks single assignment in ``graph`` and its subgraphs: a value written twice (by two
    nodes, or by a node and as a graph input or initializer), an input named twice, and, when
    ``outputs_required`` (ONNX: every op has an output), a node without outputs. Empty when sound."""
    problems: list[str] = []
    for g in _graphs(graph):
        where = f"graph '{g.name}'"
        seen: dict[str, str] = {}
        for v in g.inputs:
            if v.name in seen:
                problems.append(f"{where}: input '{v.name}' is declared twice")
            seen[v.name] = "a graph input"
        for name in g.initializers:
            seen.setdefault(name, "an initializer")
        for node in g.nodes:
            if outputs_required and not any(node.outputs):
                problems.append(f"{where}: {node.op_type} node '{node.label}' has no outputs")
            for out in node.outputs:
                if not out:
                    continue
                if out in seen:
                    problems.append(f"{where}: value '{out}' is written by {node.op_type} node '{node.label}' "
                                    f"and already by {seen[out]}; each value must have one producer")
                seen[out] = f"{node.op_type} node '{node.label}'"
    return problems


def _graphs(graph: Graph) -> Iterator[Graph]:
    yield graph
    for node in graph.nodes:
        for sub in node.subgraphs():
            yield from _graphs(sub)

