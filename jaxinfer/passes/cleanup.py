"""Dead-node removal and identity elimination."""

from __future__ import annotations

from ..graph import Graph, Node, outer_names

#: Ops kept even when nothing reads their outputs (they have effects or state).
_EFFECTFUL = frozenset({"ASSIGN_VARIABLE", "CALL_ONCE"})


def _used_by(node: Node) -> set[str]:
    used = {i for i in node.inputs if i}
    for sub in node.subgraphs():
        used |= outer_names(sub)
    return used


def read_counts(graph: Graph) -> dict[str, int]:
    """How many times each name is read, subgraph bodies (outer-scope reads) included."""
    counts: dict[str, int] = {}
    for node in graph.nodes:
        for name in node.inputs:
            if name:
                counts[name] = counts.get(name, 0) + 1
        for sub in node.subgraphs():
            for name in outer_names(sub):
                counts[name] = counts.get(name, 0) + 1
    for name in graph.output_names:
        counts[name] = counts.get(name, 0) + 1
    return counts


def subgraph_reads(graph: Graph) -> set[str]:
    """Names read from the outer scope by any subgraph of ``graph``."""
    reads: set[str] = set()
    for node in graph.nodes:
        for sub in node.subgraphs():
            reads |= outer_names(sub)
    return reads


def eliminate_dead_nodes(graph: Graph) -> Graph:
    """Drop nodes (and initializers) that no graph output or state depends on."""
    live = set(graph.output_names) | set(graph.state_vars.values())
    kept: list[Node] = []
    for node in reversed(graph.nodes):
        if node.op_type in _EFFECTFUL or any(o in live for o in node.outputs if o):
            kept.append(node)
            live |= _used_by(node)
    kept.reverse()
    inits = {k: v for k, v in graph.initializers.items() if k in live}
    if len(kept) == len(graph.nodes) and len(inits) == len(graph.initializers):
        return graph
    return graph.replace(nodes=tuple(kept), initializers=inits)


def _rename_inputs(node: Node, mapping: dict[str, str]) -> Node:
    if not any(i in mapping for i in node.inputs):
        return node
    return Node(node.op_type, tuple(mapping.get(i, i) for i in node.inputs), node.outputs, node.attrs,
                node.name, node.domain)


def eliminate_identities(graph: Graph) -> Graph:
    """Bypass ``Identity`` nodes (ONNX) whose output is not a graph output and not read by a subgraph."""
    outputs = set(graph.output_names) | set(graph.state_vars.values())
    sub_reads = subgraph_reads(graph)
    mapping: dict[str, str] = {}
    nodes: list[Node] = []
    for node in graph.nodes:
        node = _rename_inputs(node, mapping)
        if (graph.fmt == "onnx" and node.op_type == "Identity" and node.domain in ("", "ai.onnx")
                and len(node.inputs) == 1 and node.inputs[0] and node.outputs[0] not in outputs
                and node.outputs[0] not in sub_reads):
            mapping[node.outputs[0]] = node.inputs[0]
            continue
        nodes.append(node)
    if not mapping:
        return graph
    return graph.replace(nodes=tuple(nodes))
