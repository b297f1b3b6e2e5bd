"""Common-subexpression merging of identical initializers (weight sharing)."""

from __future__ import annotations

import hashlib

import numpy as np

from ..graph import Graph, Node
from .cleanup import subgraph_reads


def _digest(a: np.ndarray) -> tuple:
    a = np.asarray(a)
    payload = repr(a.tolist()).encode() if a.dtype == object else np.ascontiguousarray(a).tobytes()
    return (a.shape, str(a.dtype), hashlib.blake2b(payload, digest_size=16).hexdigest())


def merge_identical_initializers(graph: Graph) -> Graph:
    """Point every use of a duplicate initializer (same dtype, shape and bytes) at the first one."""
    seen: dict[tuple, str] = {}
    mapping: dict[str, str] = {}
    # Names read inside If/Loop/Scan bodies keep their own copy (bodies are not renamed).
    protected = set(graph.output_names) | set(graph.input_names) | subgraph_reads(graph)
    for name, value in graph.initializers.items():
        if name in protected:
            continue
        key = _digest(value)
        if key in seen:
            mapping[name] = seen[key]
        else:
            seen[key] = name
    if not mapping:
        return graph
    nodes = tuple(
        Node(n.op_type, tuple(mapping.get(i, i) for i in n.inputs), n.outputs, n.attrs, n.name, n.domain)
        if any(i in mapping for i in n.inputs) else n
        for n in graph.nodes
    )
    inits = {k: v for k, v in graph.initializers.items() if k not in mapping}
    return graph.replace(nodes=nodes, initializers=inits)
