"""QDQ -> integer arithmetic: the QuantizeLinear/DequantizeLinear pairs onnxruntime's
``quantize_static`` (QDQ format) writes around ops become ops that take the quantized tensors.

Linear ops: ``DequantizeLinear(x_q) -> Conv/MatMul/Gemm <- DequantizeLinear(w_q) [-> Relu/Clip]
[-> QuantizeLinear]`` becomes one ``jaxinfer::QLinearConvInt`` / ``QLinearMatMulInt`` node
(int8/uint8 x int8/uint8/int4/uint4 -> int32 conv/dot, int32 bias, one float32 requantization).
Matched when the weight is an integer initializer quantized per tensor, per output channel or (MatMul,
opset 21) in blocks along K (or, for MatMul, a computed operand quantized per tensor: attention's
Q x K^T and P x V), the activation's scale/zero point are per-tensor constants, and (for a
fused output) the QuantizeLinear's are too. An int32 bias DequantizeLinear whose scale is
``x_scale * w_scale`` is used as is; any other constant bias is requantized to that scale here.
Without a trailing QuantizeLinear the node outputs float (the int32 accumulator rescaled) and takes a
float bias. A Relu before the QuantizeLinear clamps at the output zero point; a Clip with constant
bounds becomes an integer Clip at the quantized bounds (quantization is monotonic, so
``quantize(clip(v, lo, hi)) == clip(quantize(v), quantize(lo), quantize(hi))``).
A float activation times a blocked or int4/uint4 weight DequantizeLinear becomes
``jaxinfer::DequantMatMul``: the weight stays packed in params and is dequantized in the kernel.

Around other ops, ``DequantizeLinear -> op -> QuantizeLinear`` (every input dequantized per tensor,
the op's only reader the QuantizeLinear) becomes the quantized op onnxruntime runs for it:
Add/Mul -> com.microsoft QLinearAdd/QLinearMul, AveragePool/GlobalAveragePool ->
QLinearAveragePool/QLinearGlobalAveragePool (int32 window sums), Concat -> QLinearConcat,
Relu -> QLinearLeakyRelu(alpha=0); MaxPool, Clip and the ops that only move values (Reshape, Transpose,
Gather, Slice, ...) with equal input and output parameters run directly on the integers (max and clip
commute with a monotonic dequantization, and ``Q(DQ(q)) == q``).

Run before constant folding, which would otherwise fold the weights' DequantizeLinear to float.
The rewritten nodes' domains (``jaxinfer``, ``com.microsoft``) are added to the graph's opsets.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ..graph import Graph, Node
from .cleanup import eliminate_dead_nodes, read_counts
from .fuse import activation_bounds

_ONNX = ("", "ai.onnx")
_INT8 = (np.dtype(np.int8), np.dtype(np.uint8))
_INT4 = (np.dtype(jnp.int4), np.dtype(jnp.uint4))
_MS = "com.microsoft"
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


def _weight(graph: Graph, dq: Node, channel_axis: int, blocked: bool = False
            ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, int] | None:
    """(w_q, scale, zero point, block size) of a weight DequantizeLinear: per tensor, per
    ``channel_axis``, or (``blocked``: a 2-D MatMul weight) in blocks along axis 0. A computed
    (not constant) operand, e.g. attention's keys, comes back as ``w_q = None`` when it is quantized
    per tensor with a zero point."""
    w = _const(graph, dq.inputs[0])
    scale = _const(graph, dq.inputs[1])
    zp = _const(graph, dq.inputs[2]) if len(dq.inputs) > 2 and dq.inputs[2] else None
    if w is None and scale is not None and zp is not None and not dq.attrs.get("block_size", 0):
        return (None, scale, zp, 0) if scale.size == 1 and zp.size == 1 and zp.dtype in _INT8 else None
    if w is None or scale is None or w.dtype not in _INT8 + _INT4:
        return None
    block = int(dq.attrs.get("block_size", 0))
    if zp is None:
        zp = np.zeros(scale.shape if block else (), w.dtype)
    if block:
        groups = -(-w.shape[0] // block) if w.ndim == 2 else 0
        if (not blocked or w.ndim != 2 or int(dq.attrs.get("axis", 1)) % 2 != 0
                or scale.shape != (groups, w.shape[1]) or zp.shape != scale.shape):
            return None
        return w, scale, zp, block
    if scale.size > 1:
        axis = int(dq.attrs.get("axis", 1)) % w.ndim
        if axis != channel_axis % w.ndim or scale.ndim != 1 or scale.shape[0] != w.shape[axis]:
            return None
    if zp.size not in (1, scale.size):
        return None
    return w, scale, zp, 0


class _Names:
    def __init__(self, graph: Graph):
        self.used = set(graph.initializers) | {o for n, _ in graph.walk() for o in n.outputs} | set(graph.input_names)
        self.new: dict[str, np.ndarray] = {}

    def fresh(self, base: str) -> str:
        name, i = f"{base}_qdq", 0
        while name in self.used:
            i += 1
            name = f"{base}_qdq{i}"
        self.used.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.new[name] = value
        return name


def _quantize_bound(v: float, scale: np.ndarray, zp: np.ndarray) -> np.ndarray:
    """A float Clip bound on the integer grid of (scale, zp), saturated to zp's type."""
    info = np.iinfo(zp.dtype)
    q = np.round(np.float32(v) / np.float32(scale.reshape(()))) + int(zp.reshape(()))
    return np.asarray(np.clip(q, info.min, info.max), zp.dtype)


def _clip_bounds(graph: Graph, clip: Node) -> tuple[float, float] | None:
    """Constant (min, max) of an opset-11+ Clip (bounds as inputs; omitted = unbounded), else None (the
    rewrite writes opset-11 Clips)."""
    if graph.opsets.get("", graph.opsets.get("ai.onnx", 0)) < 11:
        return None
    return activation_bounds(graph, clip)


class _Rewriter:
    """Shared state of one rewrite: producers/readers of the input graph, new constants, edits."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producers = graph.producers()
        self.consumers = graph.consumers()
        self.counts = read_counts(graph)
        self.outputs = set(graph.output_names)
        self.names = _Names(graph)
        self.replaced: dict[int, list[Node]] = {}
        self.dropped: set[int] = set()
        self.domains: set[str] = set()

    def sole_reader(self, name: str) -> Node | None:
        """The one node reading ``name`` when nothing else (graph output, subgraph) does."""
        users = self.consumers.get(name, [])
        if name in self.outputs or self.counts.get(name, 0) != 1 or len(users) != 1:
            return None
        return users[0]

    def dq(self, name: str) -> tuple[Node, np.ndarray, np.ndarray | None] | None:
        """(DequantizeLinear, scale, zp) producing ``name`` with per-tensor constant parameters."""
        node = self.producers.get(name)
        if not _is(node, "DequantizeLinear"):
            return None
        qp = _scalar_qparams(self.graph, node)
        return None if qp is None else (node, qp[0], qp[1])

    def q_after(self, node: Node) -> tuple[Node, np.ndarray, np.ndarray] | None:
        """(QuantizeLinear, scale, zp) that is the only reader of ``node``'s output, with a zero point."""
        nxt = self.sole_reader(node.outputs[0])
        if not _is(nxt, "QuantizeLinear") or nxt.attrs.get("output_dtype", 0):
            return None
        qp = _scalar_qparams(self.graph, nxt)
        if qp is None or qp[1] is None:
            return None
        return nxt, qp[0], qp[1]

    def result(self) -> Graph:
        if not self.replaced:
            return self.graph
        # a fused node sits where its QuantizeLinear was: after every producer of its inputs
        nodes = tuple(m for n in self.graph.nodes if id(n) not in self.dropped
                      for m in self.replaced.get(id(n), [n]))
        opsets = dict(self.graph.opsets)
        for d in self.domains:
            opsets.setdefault(d, 1)
        inits = dict(self.graph.initializers)
        inits.update(self.names.new)
        return eliminate_dead_nodes(self.graph.replace(nodes=nodes, initializers=inits, opsets=opsets))


def _linear(rw: _Rewriter, node: Node) -> None:
    """``DQ -> Conv/MatMul/Gemm [-> Relu/Clip] [-> Q]``, or a float activation times a blocked/int4 weight."""
    graph, names = rw.graph, rw.names
    if node.op_type == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("beta", 1.0) != 1.0):
        return
    x_dq, w_dq = rw.producers.get(node.inputs[0]), rw.producers.get(node.inputs[1])
    if not _is(w_dq, "DequantizeLinear"):
        return
    trans_b = int(node.attrs.get("transB", 0)) if node.op_type == "Gemm" else 0
    channel_axis = 0 if node.op_type == "Conv" or trans_b else -1
    wq = _weight(graph, w_dq, channel_axis, blocked=node.op_type == "MatMul")
    if wq is None:
        return
    w, w_scale, w_zp, block = wq
    if w is None and node.op_type != "MatMul":
        return
    if not _is(x_dq, "DequantizeLinear"):
        # float activation: only the packed forms are worth keeping packed (int8 per channel folds to float)
        if node.op_type == "MatMul" and w is not None and (block or w.dtype in _INT4) and w.ndim == 2:
            zp_name = w_dq.inputs[2] if len(w_dq.inputs) > 2 and w_dq.inputs[2] else ""
            ins = (node.inputs[0], w_dq.inputs[0], w_dq.inputs[1]) + ((zp_name,) if zp_name else ())
            attrs = {"axis": int(w_dq.attrs.get("axis", 1)), "block_size": block}
            rw.replaced[id(node)] = [Node("DequantMatMul", ins, node.outputs, attrs, node.name, "jaxinfer")]
            rw.domains.add("jaxinfer")
        return
    xq = _scalar_qparams(graph, x_dq)
    if xq is None:
        return
    if node.op_type != "Conv" and w is not None and w.ndim != 2 and (w_scale.size > 1 or block):
        return
    x_scale, x_zp = xq
    acc_scale = (x_scale.astype(np.float64).reshape(()) * w_scale.astype(np.float64)).reshape(-1)

    # the output side: [Relu | Clip ->] QuantizeLinear with constant per-tensor parameters
    act: Node | None = None
    q_node: Node | None = None
    nxt = rw.sole_reader(node.outputs[0])
    if nxt is not None and (_is(nxt, "Relu") or _is(nxt, "Clip")):
        after = rw.q_after(nxt)
        if after is not None and (_is(nxt, "Relu") or _clip_bounds(graph, nxt) is not None):
            act, q_node = nxt, after[0]
    elif nxt is not None and _is(nxt, "QuantizeLinear"):
        q_node = nxt
    yq = None
    if q_node is not None:
        yq = _scalar_qparams(graph, q_node)
        if yq is None or yq[1] is None or q_node.attrs.get("output_dtype", 0):
            q_node, act, yq = None, None, None

    # the bias: int32 at the accumulator's scale, or float when the output stays float
    bias_q = bias_f = ""
    if len(node.inputs) > 2 and node.inputs[2]:
        if block:
            return
        b_node = rw.producers.get(node.inputs[2])
        b_val: np.ndarray | None = None
        if _is(b_node, "DequantizeLinear"):
            bq, bs = _const(graph, b_node.inputs[0]), _const(graph, b_node.inputs[1])
            bz = _const(graph, b_node.inputs[2]) if len(b_node.inputs) > 2 and b_node.inputs[2] else None
            if bq is None or bs is None or (len(b_node.inputs) > 2 and b_node.inputs[2] and bz is None):
                return
            if (bq.dtype == np.int32 and (bz is None or not np.any(bz)) and bs.size in (1, acc_scale.size)
                    and np.allclose(bs.astype(np.float64).reshape(-1), acc_scale, rtol=1e-6, atol=0)):
                bias_q = b_node.inputs[0]
            else:
                b_val = (bq.astype(np.float64) - (0 if bz is None else bz.astype(np.float64))) * bs
        else:
            b_val = _const(graph, node.inputs[2])
            if b_val is None:
                return
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
    relu = int(act is not None and act.op_type == "Relu")
    clip_node: Node | None = None
    if q_node is not None:
        ins += [q_node.inputs[1], q_node.inputs[2]]
        outs = q_node.outputs
        if act is not None and act.op_type == "Clip":
            lo, hi = _clip_bounds(graph, act)  # type: ignore[misc]
            y_scale, y_zp = yq  # type: ignore[misc]
            fused = names.fresh(q_node.outputs[0])
            bounds = (names.const(act.name or "clip_lo", _quantize_bound(lo, y_scale, y_zp)) if lo > -np.inf else "",
                      names.const(act.name or "clip_hi", _quantize_bound(hi, y_scale, y_zp)) if hi < np.inf else "")
            clip_node = Node("Clip", (fused,) + bounds, q_node.outputs, {}, act.name, "")
            outs = (fused,)
    else:
        outs = node.outputs
    while ins and not ins[-1]:
        ins.pop()
    if node.op_type == "Conv":
        attrs = {**node.attrs, "float_type": float_code, "relu": relu}
        new = Node("QLinearConvInt", tuple(ins), outs, attrs, node.name, "jaxinfer")
    else:
        attrs = {"trans_b": trans_b, "alpha": float(node.attrs.get("alpha", 1.0)), "float_type": float_code,
                 "relu": relu}
        if block:
            attrs["block_size"] = block
        new = Node("QLinearMatMulInt", tuple(ins), outs, attrs, node.name, "jaxinfer")
    rw.domains.add("jaxinfer")
    if q_node is not None:
        rw.replaced[id(q_node)] = [new] if clip_node is None else [new, clip_node]
        rw.dropped.add(id(node))
        if act is not None:
            rw.dropped.add(id(act))
    else:
        rw.replaced[id(node)] = [new]


_QLINEAR = {"Add": "QLinearAdd", "Mul": "QLinearMul", "AveragePool": "QLinearAveragePool",
            "GlobalAveragePool": "QLinearGlobalAveragePool", "Concat": "QLinearConcat", "Relu": "QLinearLeakyRelu"}
#: ops that only move or pick values (their first input): between a DequantizeLinear and a QuantizeLinear with
#: the same parameters they run on the integers, as MaxPool does
_MOVES = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Slice", "Gather", "Expand",
                    "DepthToSpace", "SpaceToDepth", "Tile", "Identity"})
_POOL_ATTRS = ("auto_pad", "ceil_mode", "count_include_pad", "kernel_shape", "pads", "strides")


def _around(rw: _Rewriter, node: Node) -> None:
    """``DQ -> Add/Mul/pool/Concat/Relu/Clip/data movement -> Q``: the quantized op onnxruntime runs for it."""
    data = [i for i in node.inputs[: 1 if node.op_type in ("Clip", "MaxPool") or node.op_type in _MOVES else None]
            if i]
    dqs = [rw.dq(i) for i in data]
    after = rw.q_after(node)
    if not data or after is None or any(d is None or d[2] is None for d in dqs):
        return
    q_node, y_scale, y_zp = after
    if node.op_type != "Concat" and any(d[2].dtype != y_zp.dtype for d in dqs):  # type: ignore[index]
        return
    zp = lambda d: d[0].inputs[2]  # noqa: E731
    # Q(DQ(q)) == q for equal parameters: (q - zp) * s / s is within 2 ulp of q - zp, which rounds back (a
    # subnormal scale could lose q's bits in the product)
    same = (all(np.array_equal(d[1], y_scale) and np.array_equal(d[2], y_zp) for d in dqs)  # type: ignore[index]
            and bool(np.all(np.isfinite(y_scale) & (np.abs(y_scale) >= np.finfo(np.float32).tiny))))
    op = node.op_type
    if op == "MaxPool" or op in _MOVES:
        if not same or (len(node.outputs) > 1 and node.outputs[1]):
            return
        ins = (dqs[0][0].inputs[0],) + tuple(node.inputs[1:])
        new = Node(op, ins, q_node.outputs, dict(node.attrs), node.name, node.domain)
    elif op == "Clip":
        bounds = _clip_bounds(rw.graph, node)
        if not same or bounds is None:
            return
        lo, hi = bounds
        ins = (dqs[0][0].inputs[0],
               rw.names.const(node.name or "clip_lo", _quantize_bound(lo, y_scale, y_zp)) if lo > -np.inf else "",
               rw.names.const(node.name or "clip_hi", _quantize_bound(hi, y_scale, y_zp)) if hi < np.inf else "")
        new = Node("Clip", ins, q_node.outputs, {}, node.name, "")
    elif op == "Concat":
        ins = [q_node.inputs[1], q_node.inputs[2]]
        for d in dqs:
            ins += [d[0].inputs[0], d[0].inputs[1], zp(d)]  # type: ignore[index]
        new = Node("QLinearConcat", tuple(ins), q_node.outputs, {"axis": node.attrs["axis"]}, node.name, _MS)
    else:
        if op == "AveragePool" and any(int(d) != 1 for d in node.attrs.get("dilations", ())):
            return
        ins = []
        for d in dqs:
            ins += [d[0].inputs[0], d[0].inputs[1], zp(d)]  # type: ignore[index]
        ins += [q_node.inputs[1], q_node.inputs[2]]
        attrs = {"alpha": 0.0} if op == "Relu" else {k: v for k, v in node.attrs.items() if k in _POOL_ATTRS}
        new = Node(_QLINEAR[op], tuple(ins), q_node.outputs, attrs, node.name, _MS)
        rw.domains.add(_MS)
    rw.replaced[id(q_node)] = [new]
    rw.dropped.add(id(node))


def rewrite_qdq(graph: Graph) -> Graph:
    """See the module docstring."""
    if graph.fmt != "onnx":
        return graph
    rw = _Rewriter(graph)
    for node in graph.nodes:
        if node.domain in _ONNX and node.op_type in ("Conv", "MatMul", "Gemm") and len(node.inputs) >= 2:
            _linear(rw, node)
    graph = rw.result()
    rw = _Rewriter(graph)
    for node in graph.nodes:
        if node.domain in _ONNX and (node.op_type in _QLINEAR or node.op_type in _MOVES
                                     or node.op_type in ("MaxPool", "Clip")):
            _around(rw, node)
    return rw.result()
