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


def _opset(graph: Graph) -> int:
    return graph.opsets.get("", graph.opsets.get("ai.onnx", 0))


def activation_bounds(graph: Graph, node: Node) -> tuple[float, float] | None:
    """The clamp (lo, hi) a Relu or a Clip with constant bounds applies (Clip-6's attributes, or from opset 11
    its bound inputs, omitted = unbounded), as float32 values; None for any other node."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip":
        return None
    if _opset(graph) < 11:
        bounds = [float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))]
    else:
        bounds = []
        for i, default in ((1, -np.inf), (2, np.inf)):
            if len(node.inputs) > i and node.inputs[i]:
                v = graph.initializers.get(node.inputs[i])
                if v is None or np.asarray(v).size != 1:
                    return None
                bounds.append(float(np.asarray(v).reshape(())))
            else:
                bounds.append(default)
    return float(np.float32(bounds[0])), float(np.float32(bounds[1]))


def _block_pool(node: Node) -> tuple[int, int] | None:
    """(PH, PW) of a 2-D MaxPool whose strides equal its window, unpadded, undilated, floor, one output."""
    a = node.attrs
    kernel = tuple(int(k) for k in a.get("kernel_shape", ()))
    if (node.op_type != "MaxPool" or node.domain not in ("", "ai.onnx") or len(kernel) != 2
            or (len(node.outputs) > 1 and node.outputs[1]) or a.get("ceil_mode", 0)
            or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") or any(int(p) for p in a.get("pads", ()))
            or any(int(d) != 1 for d in a.get("dilations", ()))
            or tuple(int(s) for s in a.get("strides", (1, 1))) != kernel):
        return None
    return kernel


def fuse_conv_epilogue(graph: Graph) -> Graph:
    """``jaxinfer::Conv`` (2-D, ungrouped, float32 HWIO weight: after :func:`conv_weights_spatial_first`) [-> Relu
    or Clip with constant bounds lo <= hi] [-> MaxPool whose strides are its window, unpadded] ->
    the ``jaxinfer::Conv`` with attributes ``activation`` (lo, hi) and ``pool`` (PH, PW), each absorbed node the
    sole reader of the one before. Our CPU kernel then adds the bias, clamps and pools in the convolution's own
    call (conv_lowering.conv_epilogue) instead of XLA reading the convolution's output back in another loop. The
    node stays a Conv, so what reads graphs for convolutions (quantize, prune, sharding rules) still finds it;
    a quantized weight takes the ops' route (``ops/conv_pool.py`` conv_hwio)."""
    if graph.fmt != "onnx":
        return graph
    users = read_counts(graph)
    readers = graph.consumers()
    outputs = set(graph.output_names)

    def sole_reader(name: str) -> Node | None:
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and users.get(name, 0) == 1 and name not in outputs else None

    fused: dict[int, Node] = {}
    dropped: set[int] = set()
    for conv in graph.nodes:
        w = graph.initializers.get(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if (conv.op_type != "Conv" or conv.domain != "jaxinfer" or w is None or np.asarray(w).ndim != 4
                or np.asarray(w).dtype != np.float32 or int(conv.attrs.get("group", 1)) != 1
                or "activation" in conv.attrs or "pool" in conv.attrs):
            continue
        attrs, last = dict(conv.attrs), conv
        act = sole_reader(conv.outputs[0])
        bounds = activation_bounds(graph, act) if act is not None else None
        if bounds is not None and bounds[0] <= bounds[1]:
            attrs["activation"] = list(bounds)
            dropped.add(id(act))
            last = act
        pool = sole_reader(last.outputs[0])
        window = _block_pool(pool) if pool is not None else None
        if window is not None:
            attrs["pool"] = list(window)
            dropped.add(id(pool))
            last = pool
        if last is not conv:
            fused[id(conv)] = Node("Conv", conv.inputs, (last.outputs[0],), attrs, conv.name, "jaxinfer")
    if not fused:
        return graph
    return graph.replace(nodes=tuple(fused.get(id(n), n) for n in graph.nodes if id(n) not in dropped))
