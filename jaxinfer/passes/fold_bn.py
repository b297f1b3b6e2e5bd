"""Fold an inference-mode BatchNormalization into the Conv before it.

``BN(Conv(x, W, b))`` with constant W, b and BN parameters becomes
``Conv(x, W * s, (b - mean) * s + beta)`` where ``s = gamma / sqrt(var + eps)``
per output channel, when the conv's output feeds only that BN.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph, Node
from .cleanup import read_counts


def _fold(conv: Node, bn: Node, inits: dict[str, np.ndarray]) -> tuple[Node, dict[str, np.ndarray]] | None:
    if len(bn.inputs) < 5 or len(conv.inputs) < 2 or bn.attrs.get("training_mode", 0) or not bn.attrs.get("spatial", 1):
        return None
    names = [conv.inputs[1]] + list(bn.inputs[1:5]) + ([conv.inputs[2]] if len(conv.inputs) > 2 and conv.inputs[2] else [])
    if not all(n in inits for n in names):
        return None
    w = np.asarray(inits[conv.inputs[1]])
    if w.dtype.kind != "f":
        return None
    gamma, beta, mean, var = (np.asarray(inits[n]).astype(np.float64) for n in bn.inputs[1:5])
    eps = float(bn.attrs.get("epsilon", 1e-5))
    s = gamma / np.sqrt(var + eps)
    bias = np.asarray(inits[conv.inputs[2]]).astype(np.float64) if len(conv.inputs) > 2 and conv.inputs[2] else 0.0
    new_w = (w.astype(np.float64) * s.reshape((-1,) + (1,) * (w.ndim - 1))).astype(w.dtype)
    new_b = ((bias - mean) * s + beta).astype(w.dtype)
    w_name, b_name = f"{bn.outputs[0]}__folded_w", f"{bn.outputs[0]}__folded_b"
    folded = Node("Conv", (conv.inputs[0], w_name, b_name), (bn.outputs[0],), conv.attrs, conv.name, conv.domain)
    return folded, {w_name: new_w, b_name: new_b}


def fold_conv_batchnorm(graph: Graph) -> Graph:
    """See the module docstring."""
    if graph.fmt != "onnx":
        return graph
    users = read_counts(graph)
    outputs = set(graph.output_names)
    producers = {n.outputs[0]: n for n in graph.nodes if n.outputs}
    inits = dict(graph.initializers)
    replaced: dict[str, Node] = {}
    dropped: set[int] = set()
    for bn in graph.nodes:
        if bn.op_type != "BatchNormalization" or bn.domain not in ("", "ai.onnx") or len(bn.outputs) > 1 and any(bn.outputs[1:]):
            continue
        conv = producers.get(bn.inputs[0])
        if conv is None or conv.op_type != "Conv" or users.get(conv.outputs[0], 0) != 1 or conv.outputs[0] in outputs:
            continue
        result = _fold(conv, bn, inits)
        if result is None:
            continue
        folded, new_inits = result
        inits.update(new_inits)
        replaced[bn.outputs[0]] = folded
        dropped.add(id(conv))
    if not replaced:
        return graph
    nodes = []
    for n in graph.nodes:
        if id(n) in dropped:
            continue
        nodes.append(replaced.get(n.outputs[0], n) if n.op_type == "BatchNormalization" and n.outputs else n)
    from .cleanup import eliminate_dead_nodes

    return eliminate_dead_nodes(graph.replace(nodes=tuple(nodes), initializers=inits))
