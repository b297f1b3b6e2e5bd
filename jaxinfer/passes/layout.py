"""Store conv weights the way XLA's convolution reads them.

An ONNX Conv weight is OIHW. XLA CPU convolves with the kernel spatial-first
(HWIO), so an OIHW param is transposed and copied on every call (measured: one
copy per conv in ResNet-50's compiled program). This pass transposes constant
conv weights once at load and switches the node to ``jaxinfer::Conv``, which
takes HWIO weights; outputs are unchanged.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph, Node
from .cleanup import eliminate_dead_nodes


def conv_weights_spatial_first(graph: Graph) -> Graph:
    """See the module docstring."""
    if graph.fmt != "onnx":
        return graph
    inits = dict(graph.initializers)
    nodes = []
    changed = False
    for node in graph.nodes:
        w_name = node.inputs[1] if len(node.inputs) > 1 else ""
        w = inits.get(w_name)
        if (node.op_type == "Conv" and node.domain in ("", "ai.onnx") and w is not None
                and np.asarray(w).ndim >= 3 and np.asarray(w).dtype.kind == "f"):
            w = np.asarray(w)
            n = w.ndim - 2
            new_name = f"{w_name}__hwio"
            if new_name not in inits:
                inits[new_name] = np.ascontiguousarray(np.transpose(w, tuple(range(2, 2 + n)) + (1, 0)))
            inputs = (node.inputs[0], new_name) + tuple(node.inputs[2:])
            nodes.append(Node("Conv", inputs, node.outputs, node.attrs, node.name, "jaxinfer"))
            changed = True
        else:
            nodes.append(node)
    if not changed:
        return graph
    return eliminate_dead_nodes(graph.replace(nodes=tuple(nodes), initializers=inits))
