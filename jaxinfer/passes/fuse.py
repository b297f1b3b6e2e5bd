"""MatMul + Add -> Gemm when both are 2-D with a constant weight and a 1-D constant bias."""

from __future__ import annotations

import numpy as np

from ..graph import Graph, Node
from .cleanup import read_counts


def fuse_matmul_add(graph: Graph) -> Graph:
    """``Add(MatMul(A, W), b)`` -> ``Gemm(A, W, b)`` where A is known 2-D, W 2-D and b 1-D constants."""
    if graph.fmt != "onnx" or graph.opsets.get("", 1) < 7:  # Gemm broadcasts C unidirectionally since 7
        return graph
    ranks = {v.name: v.rank for v in graph.inputs}
    ranks.update({k: v.rank for k, v in graph.value_info.items()})
    inits = graph.initializers
    users = read_counts(graph)
    producers = {n.outputs[0]: n for n in graph.nodes if n.outputs}
    outputs = set(graph.output_names)
    fused: dict[int, Node] = {}
    dropped: set[int] = set()
    for add in graph.nodes:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
            continue
        for mm_out, bias in (add.inputs, add.inputs[::-1]):
            mm = producers.get(mm_out)
            if (mm is None or mm.op_type != "MatMul" or users.get(mm_out, 0) != 1 or mm_out in outputs
                    or bias not in inits or mm.inputs[1] not in inits):
                continue
            w, b = np.asarray(inits[mm.inputs[1]]), np.asarray(inits[bias])
            if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[1] or ranks.get(mm.inputs[0]) != 2:
                continue
            fused[id(add)] = Node("Gemm", (mm.inputs[0], mm.inputs[1], bias), add.outputs, {}, add.name, "")
            dropped.add(id(mm))
            break
    if not fused:
        return graph
    nodes = tuple(fused.get(id(n), n) for n in graph.nodes if id(n) not in dropped)
    return graph.replace(nodes=nodes)
