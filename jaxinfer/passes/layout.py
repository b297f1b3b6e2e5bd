"""Layout and lowering choices made on the graph: conv weights stored the way XLA reads them,
and pools after costly ops marked to run as one reduce-window.

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


#: Suffix of the spatial-first copy of a Conv weight (``w`` -> ``w__hwio``).
HWIO_SUFFIX = "__hwio"


def source_weight_name(name: str) -> str:
    """The model's own name of a weight this pass renamed (``w__hwio`` -> ``w``); others as they are."""
    return name[: -len(HWIO_SUFFIX)] if name.endswith(HWIO_SUFFIX) else name


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
            new_name = f"{w_name}{HWIO_SUFFIX}"
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


#: Ops whose output XLA CPU would recompute in every tap of a following pool (a power, an
#: exponential, ...): ZFNet's LRN -> 3x3 MaxPool ran 0.81-0.87x with the pool as taps.
COSTLY_PRODUCERS = frozenset({"LRN", "Pow", "Exp", "Log", "Tanh", "Sigmoid", "Erf", "Softplus", "Mish", "Gelu",
                              "Elu", "Selu", "Celu"})


def pools_after_costly_ops(graph: Graph) -> Graph:
    """MaxPool/AveragePool nodes fed by a :data:`COSTLY_PRODUCERS` op become ``jaxinfer::`` pools.

    Those run as one ``lax.reduce_window`` instead of conv_lowering.reduce_window's shifted slices,
    so that XLA stores the producer's output once instead of fusing it into every tap.
    """
    if graph.fmt != "onnx":
        return graph
    producer = {out: n.op_type for n in graph.nodes if n.domain in ("", "ai.onnx") for out in n.outputs}
    nodes = []
    changed = False
    for node in graph.nodes:
        if (node.op_type in ("MaxPool", "AveragePool") and node.domain in ("", "ai.onnx")
                and producer.get(node.inputs[0]) in COSTLY_PRODUCERS):
            nodes.append(Node(node.op_type, node.inputs, node.outputs, node.attrs, node.name, "jaxinfer"))
            changed = True
        else:
            nodes.append(node)
    return graph.replace(nodes=tuple(nodes)) if changed else graph
