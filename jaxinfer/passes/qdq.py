"""QDQ -> integer arithmetic: ``DequantizeLinear(x_q) -> Conv/MatMul/Gemm <- DequantizeLinear(w_q)
[-> Relu] [-> QuantizeLinear]`` becomes one ``jaxinfer::QLinearConvInt`` / ``QLinearMatMulInt`` node
(int8/uint8 x int8/uint8 -> int32 conv/dot, int32 bias, one float32 requantization).

Matched when the weight is an int8/uint8 initializer quantized per tensor or per output channel,
the activation's scale/zero point are per-tensor constants, and (for a fused output) the
QuantizeLinear's are too. An int32 bias DequantizeLinear whose scale is ``x_scale * w_scale`` is used
as is; any other constant bias is requantized to that scale here. Without a trailing
QuantizeLinear the node outputs float (the int32 accumulator rescaled) and takes a float bias.
Run before constant folding, which would otherwise fold the weights' DequantizeLinear to float.
The rewritten nodes' domain, ``jaxinfer``, is added to the graph's opsets.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph, Node
from .cleanup import eliminate_dead_nodes, read_counts

_ONNX = ("", "ai.onnx")
_INT8 = (np.dtype(np.int8), np.dtype(np.uint8))
_FLOAT_CODES = {np.dtype(np.float32): 1, np.dtype(np.float16): 10, np.dtype(np.float64): 11}


def _is(node: Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in _ONNX


def _const(graph: Graph, name: str) -> np.ndarray | None:
    if not name:
        return None
    v = graph.initializers.get(name)
    return None if v is None else np.asarray(v)


def _scalar_qparams(graph: Graph, dq: Node) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(scale, zero point) of a per-tensor Q/DQ node whose parameters are constants, else None."""
    scale = _const(graph, dq.inputs[1])
    zp = _const(graph, dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
    if scale is None or scale.size != 1 or (len(dq.inputs) > 2 and dq.inputs[2] and zp is None):
        return None
    if zp is not None and (zp.size != 1 or zp.dtype not in _INT8):
        return None
    if dq.attrs.get("block_size", 0):
        return None
    return scale, zp


def _weight(graph: Graph, dq: Node, channel_axis: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(w_q, scale, zero point) of a weight DequantizeLinear: per tensor or per ``channel_axis``."""
    w = _const(graph, dq.inputs[0])
    scale = _const(graph, dq.inputs[1])
    zp = _const(graph, dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
    if w is None or scale is None or w.dtype not in _INT8 or dq.attrs.get("block_size", 0):
        return None
    if zp is None:
        zp = np.zeros((), w.dtype)
    if scale.size > 1:
        axis = int(dq.attrs.get("axis", 1)) % w.ndim
        if axis != channel_axis % w.ndim or scale.ndim != 1 or scale.shape[0] != w.shape[axis]:
            return None
    if zp.size not in (1, scale.size):
        return None
    return w, scale, zp


class _Names:
    def __init__(self, graph: Graph):
        self.used = set(graph.initializers) | {o for n, _ in graph.walk() for o in n.outputs} | set(graph.input_names)
        self.new: dict[str, np.ndarray] = {}

    def const(self, base: str, value: np.ndarray) -> str:
        name, i = f"{base}_qdq", 0
        while name in self.used:
            i += 1
            name = f"{base}_qdq{i}"
        self.used.add(name)
        self.new[name] = value
        return name


def rewrite_qdq(graph: Graph) -> Graph:
    """See the module docstring."""
    if graph.fmt != "onnx":
        return graph
    producers = graph.producers()
    consumers = graph.consumers()
    counts = read_counts(graph)
    outputs = set(graph.output_names)
    names = _Names(graph)
    replaced: dict[int, Node] = {}
    dropped: set[int] = set()
    for node in graph.nodes:
        if node.domain not in _ONNX or node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        if node.op_type == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("beta", 1.0) != 1.0):
            continue
        x_dq, w_dq = producers.get(node.inputs[0]), producers.get(node.inputs[1])
        if not (_is(x_dq, "DequantizeLinear") and _is(w_dq, "DequantizeLinear")):
            continue
        xq = _scalar_qparams(graph, x_dq)
        if xq is None:
            continue
        trans_b = int(node.attrs.get("transB", 0)) if node.op_type == "Gemm" else 0
        channel_axis = 0 if node.op_type == "Conv" or trans_b else -1
        wq = _weight(graph, w_dq, channel_axis)
        if wq is None:
            continue
        w, w_scale, w_zp = wq
        if node.op_type != "Conv" and w.ndim != 2 and w_scale.size > 1:
            continue
        x_scale, x_zp = xq
        acc_scale = (x_scale.astype(np.float64).reshape(()) * w_scale.astype(np.float64)).reshape(-1)

        # the output side: [Relu ->] QuantizeLinear with constant per-tensor parameters
        out_name = node.outputs[0]
        relu: Node | None = None
        q_node: Node | None = None
        users = consumers.get(out_name, [])
        if out_name not in outputs and counts.get(out_name, 0) == 1 and len(users) == 1:
            nxt = users[0]
            if _is(nxt, "Relu") and nxt.outputs[0] not in outputs and counts.get(nxt.outputs[0], 0) == 1:
                after = consumers.get(nxt.outputs[0], [])
                if len(after) == 1 and _is(after[0], "QuantizeLinear"):
                    relu, q_node = nxt, after[0]
            elif _is(nxt, "QuantizeLinear"):
                q_node = nxt
        yq = None
        if q_node is not None:
            yq = _scalar_qparams(graph, q_node)
            if yq is None or yq[1] is None or q_node.attrs.get("output_dtype", 0):
                q_node, relu, yq = None, None, None

        # the bias: int32 at the accumulator's scale, or float when the output stays float
        bias_q = bias_f = ""
        if len(node.inputs) > 2 and node.inputs[2]:
            b_node = producers.get(node.inputs[2])
            b_val: np.ndarray | None = None
            if _is(b_node, "DequantizeLinear"):
                bq, bs = _const(graph, b_node.inputs[0]), _const(graph, b_node.inputs[1])
                bz = _const(graph, b_node.inputs[2]) if len(b_node.inputs) > 2 and b_node.inputs[2] else None
                if bq is None or bs is None or (len(b_node.inputs) > 2 and b_node.inputs[2] and bz is None):
                    continue
                if (bq.dtype == np.int32 and (bz is None or not np.any(bz)) and bs.size in (1, acc_scale.size)
                        and np.allclose(bs.astype(np.float64).reshape(-1), acc_scale, rtol=1e-6, atol=0)):
                    bias_q = b_node.inputs[0]
                else:
                    b_val = (bq.astype(np.float64) - (0 if bz is None else bz.astype(np.float64))) * bs
            else:
                b_val = _const(graph, node.inputs[2])
                if b_val is None:
                    continue
            if b_val is not None:
                b_val = np.asarray(b_val, np.float64).reshape(-1)
                if yq is not None:
                    bias_q = names.const(node.inputs[2], np.round(b_val / acc_scale).astype(np.int32))
                else:
                    bias_f = names.const(node.inputs[2], b_val.astype(np.float32))

        float_code = _FLOAT_CODES.get(np.dtype(x_scale.dtype), 1)
        w_zp_name = w_dq.inputs[2] if len(w_dq.inputs) > 2 and w_dq.inputs[2] else names.const(
            w_dq.inputs[0] + "_zp", w_zp)
        x_zp_name = x_dq.inputs[2] if len(x_dq.inputs) > 2 and x_dq.inputs[2] else ""
        ins = [x_dq.inputs[0], x_dq.inputs[1], x_zp_name, w_dq.inputs[0], w_dq.inputs[1], w_zp_name, bias_q, bias_f]
        if q_node is not None:
            ins += [q_node.inputs[1], q_node.inputs[2]]
            outs = q_node.outputs
        else:
            outs = node.outputs
        while ins and not ins[-1]:
            ins.pop()
        if node.op_type == "Conv":
            attrs = {**node.attrs, "float_type": float_code, "relu": int(relu is not None)}
            new = Node("QLinearConvInt", tuple(ins), outs, attrs, node.name, "jaxinfer")
        else:
            attrs = {"trans_b": trans_b, "alpha": float(node.attrs.get("alpha", 1.0)), "float_type": float_code,
                     "relu": int(relu is not None)}
            new = Node("QLinearMatMulInt", tuple(ins), outs, attrs, node.name, "jaxinfer")
        if q_node is not None:
            replaced[id(q_node)] = new
            dropped.add(id(node))
            if relu is not None:
                dropped.add(id(relu))
        else:
            replaced[id(node)] = new
    if not replaced:
        return graph
    # a fused node sits where its QuantizeLinear was: after every producer of its inputs
    nodes = tuple(replaced.get(id(n), n) for n in graph.nodes if id(n) not in dropped)
    opsets = dict(graph.opsets)
    opsets.setdefault("jaxinfer", 1)
    inits = dict(graph.initializers)
    inits.update(names.new)
    return eliminate_dead_nodes(graph.replace(nodes=nodes, initializers=inits, opsets=opsets))
