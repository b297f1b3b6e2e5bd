"""Constant folding: nodes whose inputs are all initializers become initializers.

Exporters often build weights and shapes from ``Constant``/``ConstantOfShape``
chains, transposes or casts of weights; folding them once at load turns them
into ordinary params (weights as arguments) instead of work repeated per call.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..errors import JaxinferError
from ..graph import Graph, Node
from ..registry import Registry
from ..tracer import resolve, run_node

#: Never materialize a folded tensor larger than this many elements.
MAX_FOLDED_ELEMENTS = 1 << 28


def fold_constants(graph: Graph, registry: Registry) -> Graph:
    """Evaluate every deterministic node whose inputs are all constants; see the module docstring."""
    consts: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in graph.initializers.items()}
    kept: list[Node] = []
    protected = set(graph.input_names)
    changed = False
    for node in graph.nodes:
        opdef = resolve(node, registry, graph.opsets)
        foldable = (
            opdef is not None and not opdef.random and not any(True for _ in node.subgraphs())
            and all(i in consts for i in node.inputs if i) and not any(o in protected for o in node.outputs)
            and node.op_type not in ("ASSIGN_VARIABLE", "READ_VARIABLE")
        )
        if foldable:
            env = {i: consts[i] for i in node.inputs if i}
            try:
                run_node(node, env, registry, graph.opsets, set(node.outputs), at_load=True)
            except (JaxinferError, Exception):  # noqa: BLE001 - leave the node for the tracer to report
                kept.append(node)
                continue
            values = {o: env[o] for o in node.outputs if o}
            if all(_is_tensor(v) and np.size(v) <= MAX_FOLDED_ELEMENTS for v in values.values()):
                consts.update({k: np.asarray(v) for k, v in values.items()})
                changed = True
                continue
        kept.append(node)
    if not changed:
        return graph
    live = {i for n in kept for i in n.inputs} | set(graph.output_names)
    for n in kept:
        for sub in n.subgraphs():
            from ..graph import outer_names

            live |= outer_names(sub)
    inits = {k: v for k, v in consts.items() if k in live}
    return graph.replace(nodes=tuple(kept), initializers=inits)


def _is_tensor(v: object) -> bool:
    return v is not None and not isinstance(v, (list, tuple))


def constant_folder(registry: Registry) -> Callable[[Graph], Graph]:
    """``fold_constants`` bound to a registry, usable as a ``Graph -> Graph`` pass."""

    def fold(graph: Graph) -> Graph:
        return fold_constants(graph, registry)

    fold.__name__ = "fold_constants"
    return fold
