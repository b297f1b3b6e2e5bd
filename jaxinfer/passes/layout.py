"""Layout and lowering choices made on the graph: conv weights stored the way XLA reads them,
8-bit matmul weights stored the way our int8 kernel reads them, pools after costly ops marked
to run as one reduce-window, and the values a convolution shares with other readers named
(:func:`shared_conv_inputs`, which ``Model`` writes once, channels-last).

An ONNX Conv weight is OIHW. XLA CPU convolves with the kernel spatial-first
(HWIO), so an OIHW param is transposed and copied on every call (measured: one
copy per conv in ResNet-50's compiled program). This pass transposes constant
conv weights once at load and switches the node to ``jaxinfer::Conv``, which
takes HWIO weights; outputs are unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ..graph import Graph, Node
from .cleanup import eliminate_dead_nodes


#: Suffix of the spatial-first copy of a Conv weight (``w`` -> ``w__hwio``).
HWIO_SUFFIX = "__hwio"
#: Suffix of the ``[N, K]`` copy of an 8-bit ``[K, N]`` matmul weight (``w`` -> ``w__nk``).
NK_SUFFIX = "__nk"
#: Suffix of the OHWI copy of an 8-bit 2-D conv weight (``w`` -> ``w__ohwi``).
OHWI_SUFFIX = "__ohwi"


def source_weight_name(name: str) -> str:
    """The model's own name of a weight these passes renamed (``w__hwio``, ``w__nk`` -> ``w``); others as they are."""
    for suffix in (HWIO_SUFFIX, NK_SUFFIX, OHWI_SUFFIX):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _rewrite_nodes(graph: Graph, rewrite: Callable[[Node, dict[str, Any]], Node | None]) -> Graph:
    """An ONNX graph with each node that ``rewrite(node, initializers)`` answers replaced by its answer;
    ``rewrite`` may add initializers (the re-laid-out weights), and the ones no node reads are dropped."""
    if graph.fmt != "onnx":
        return graph
    inits = dict(graph.initializers)
    nodes = []
    changed = False
    for node in graph.nodes:
        new = rewrite(node, inits)
        nodes.append(node if new is None else new)
        changed = changed or new is not None
    if not changed:
        return graph
    return eliminate_dead_nodes(graph.replace(nodes=tuple(nodes), initializers=inits))


def _conv_hwio(node: Node, inits: dict[str, Any]) -> Node | None:
    w_name = node.inputs[1] if len(node.inputs) > 1 else ""
    w = inits.get(w_name)
    if not (node.op_type == "Conv" and node.domain in ("", "ai.onnx") and w is not None
            and np.asarray(w).ndim >= 3 and np.asarray(w).dtype.kind == "f"):
        return None
    w = np.asarray(w)
    n = w.ndim - 2
    new_name = f"{w_name}{HWIO_SUFFIX}"
    if new_name not in inits:
        inits[new_name] = np.ascontiguousarray(np.transpose(w, tuple(range(2, 2 + n)) + (1, 0)))
    inputs = (node.inputs[0], new_name) + tuple(node.inputs[2:])
    return Node("Conv", inputs, node.outputs, node.attrs, node.name, "jaxinfer")


def conv_weights_spatial_first(graph: Graph) -> Graph:
    """See the module docstring."""
    return _rewrite_nodes(graph, _conv_hwio)


def _nk_weight(inits: dict, name: str) -> str | None:
    """The ``[N, K]`` copy of the 2-D 8-bit initializer ``name`` (made once), or None for anything else."""
    w = inits.get(name)
    if w is None or np.ndim(w) != 2 or np.asarray(w).dtype not in (np.int8, np.uint8):
        return None
    new_name = f"{name}{NK_SUFFIX}"
    if new_name not in inits:
        inits[new_name] = np.ascontiguousarray(np.asarray(w).T)
    return new_name


def _matmul_nk(node: Node, inits: dict[str, Any]) -> Node | None:
    if node.op_type == "MatMulInteger" and node.domain in ("", "ai.onnx") and len(node.inputs) > 1:
        w = _nk_weight(inits, node.inputs[1])
        if w is not None:
            inputs = (node.inputs[0], w) + tuple(node.inputs[2:])
            return Node("MatMulIntegerNK", inputs, node.outputs, dict(node.attrs), node.name, "jaxinfer")
    elif (node.op_type == "QLinearMatMul" and node.domain in ("", "ai.onnx") and len(node.inputs) == 8
          and all(np.size(inits.get(name, ())) == 1 for name in node.inputs[1:3])):  # not per-row a
        w = _nk_weight(inits, node.inputs[3])
        if w is not None:
            a, a_scale, a_zp, _, b_scale, b_zp, y_scale, y_zp = node.inputs
            inputs = (a, a_scale, a_zp, w, b_scale, b_zp, "", "", y_scale, y_zp)
            return Node("QLinearMatMulInt", inputs, node.outputs, {"trans_b": 1}, node.name, "jaxinfer")
    elif (node.op_type == "QLinearMatMulInt" and node.domain == "jaxinfer" and len(node.inputs) > 3
          and not int(node.attrs.get("trans_b", 0)) and not int(node.attrs.get("block_size", 0))):
        w = _nk_weight(inits, node.inputs[3])
        if w is not None:
            inputs = tuple(node.inputs[:3]) + (w,) + tuple(node.inputs[4:])
            return Node(node.op_type, inputs, node.outputs, {**node.attrs, "trans_b": 1}, node.name, node.domain)
    return None


def int8_weights_rows_first(graph: Graph) -> Graph:
    """8-bit ``[K, N]`` matmul weights stored ``[N, K]``: each output's K values contiguous.

    Our CPU int8 kernel (:mod:`jaxinfer.cpu_kernels`) takes the weight that way, and XLA's int8 dot
    streams it faster at few rows; an ONNX ``[K, N]`` weight would otherwise be transposed per call
    or left to XLA's slower dot. ``MatMulInteger`` with a constant 2-D B becomes
    ``jaxinfer::MatMulIntegerNK``; the QDQ rewrite's ``jaxinfer::QLinearMatMulInt`` takes ``trans_b=1``
    (not its K-blocked form), and so does ONNX ``QLinearMatMul`` with a constant 2-D B and a per-tensor A
    (it becomes that op: the same int32 sums and the same requantization). Outputs are unchanged, bit for
    bit.
    """
    return _rewrite_nodes(graph, _matmul_nk)


def _int8_conv_ohwi(node: Node, inits: dict[str, Any]) -> Node | None:
    onnx_op = node.op_type == "QLinearConv" and node.domain in ("", "ai.onnx")
    qdq_op = node.op_type == "QLinearConvInt" and node.domain == "jaxinfer"
    if not (onnx_op or qdq_op) or len(node.inputs) < 4 or int(node.attrs.get("group", 1)) != 1:
        return None
    if node.attrs.get("w_layout", "OIHW") != "OIHW":
        return None
    w_name = node.inputs[3]
    w = inits.get(w_name)
    if w is None or np.ndim(w) != 4 or np.asarray(w).dtype not in (np.int8, np.uint8):
        return None
    new_name = f"{w_name}{OHWI_SUFFIX}"
    if new_name not in inits:
        inits[new_name] = np.ascontiguousarray(np.transpose(np.asarray(w), (0, 2, 3, 1)))
    inputs = tuple(node.inputs[:3]) + (new_name,) + tuple(node.inputs[4:])
    return Node(node.op_type, inputs, node.outputs, {**node.attrs, "w_layout": "OHWI"}, node.name, "jaxinfer")


def int8_conv_weights_ohwi(graph: Graph) -> Graph:
    """Constant 8-bit 2-D weights of ungrouped ``QLinearConv`` (-> ``jaxinfer::QLinearConv``) and
    ``jaxinfer::QLinearConvInt`` (the QDQ rewrite's) stored OHWI, with ``w_layout="OHWI"``: our int8 kernel reads
    a convolution's filter as ``[N, KH KW C]``, and an OIHW param was transposed and copied on every call (three
    copy thunks in the quantized CNN fixtures' programs). Outputs are unchanged, bit for bit."""
    return _rewrite_nodes(graph, _int8_conv_ohwi)


#: Ops whose output XLA CPU would recompute in every tap of a following pool (a power, an
#: exponential, ...): ZFNet's LRN -> 3x3 MaxPool ran 0.81-0.87x with the pool as taps. Requantizing
#: convolutions too: their int32 -> 8-bit rescale (float multiply, round, clamp) was fused into each of a
#: 2x2 pool's four taps (the quantized CNN fixtures at batch 1: one 93 us fusion of ~300 us).
COSTLY_PRODUCERS = frozenset({"LRN", "Pow", "Exp", "Log", "Tanh", "Sigmoid", "Erf", "Softplus", "Mish", "Gelu",
                              "Elu", "Selu", "Celu", "QLinearConv", "jaxinfer::QLinearConv",
                              "jaxinfer::QLinearConvInt"})


def pools_after_costly_ops(graph: Graph) -> Graph:
    """MaxPool/AveragePool nodes fed by a :data:`COSTLY_PRODUCERS` op become ``jaxinfer::`` pools.

    Those run as one ``lax.reduce_window`` instead of conv_lowering.reduce_window's shifted slices,
    so that XLA stores the producer's output once instead of fusing it into every tap.
    """
    if graph.fmt != "onnx":
        return graph
    producer = {out: n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
                for n in graph.nodes for out in n.outputs}
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


#: Convolutions whose input :func:`shared_conv_inputs` looks at: ONNX's (channels-first) and ``jaxinfer::Conv``.
_CONVS = frozenset({("Conv", ""), ("Conv", "ai.onnx"), ("Conv", "jaxinfer")})


def shared_conv_inputs(graph: Graph) -> frozenset[str]:
    """The values of an ONNX graph that a convolution reads as its input and at least one other node reads
    too, produced by a node of the graph: those the model writes once, channels-last, for all their readers
    (:func:`jaxinfer.conv_lowering.kept_channels_last`; a residual sum was otherwise recomputed in each
    reader). Empty for other formats (TFLite's convolutions read channels-last values already)."""
    if graph.fmt != "onnx":
        return frozenset()
    produced = {o for n in graph.nodes for o in n.outputs if o}
    readers: dict[str, int] = {}
    for n in graph.nodes:
        for name in set(n.inputs):
            if name:
                readers[name] = readers.get(name, 0) + 1
    return frozenset(n.inputs[0] for n in graph.nodes
                     if (n.op_type, n.domain) in _CONVS and n.inputs and n.inputs[0] in produced
                     and readers.get(n.inputs[0], 0) > 1)
