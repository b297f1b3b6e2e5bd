"""Fusions on the ONNX graph: MatMul + Add -> Gemm (2-D, constant weight and 1-D bias); a float Conv's Relu/Clip
and block MaxPool into the Conv (:func:`fuse_conv_epilogue`); an exporter's erf or tanh GELU chain (and its bias
Add) into one ``jaxinfer::Gelu`` (:func:`fuse_gelu`)."""

from __future__ import annotations

import math
from typing import Any

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


def _scalar(graph: Graph, name: str) -> float | None:
    v = graph.initializers.get(name)
    if v is None or np.asarray(v).size != 1 or np.asarray(v).dtype.kind != "f":
        return None
    return float(np.asarray(v).reshape(()))


def _other(node: Node, name: str) -> str | None:
    """The input of two-input ``node`` that is not ``name`` (None when ``name`` is not one of them)."""
    if len(node.inputs) != 2 or name not in node.inputs:
        return None
    return node.inputs[1] if node.inputs[0] == name else node.inputs[0]


def _is_op(node: Node | None, op: str) -> bool:
    return node is not None and node.op_type == op and node.domain in ("", "ai.onnx")


#: Producers of a GELU's input after which the GELU is worth its own kernel call: XLA ends its loops at a product.
_PRODUCTS = frozenset({"MatMul", "Gemm", "FusedMatMul", "Conv", "Einsum"})


def _after_product(graph: Graph, producers: dict[str, Node], x: str) -> bool:
    """Whether ``x`` is a product's output, through a bias Add and reshapes."""
    source = producers.get(x)
    while source is not None and (source.op_type in ("Reshape", "Squeeze", "Unsqueeze", "Flatten")
                                  or (_is_op(source, "Add") and any(i in graph.initializers for i in source.inputs))):
        source = producers.get(next((i for i in source.inputs if i not in graph.initializers), ""))
    return source is not None and source.op_type in _PRODUCTS


def _half_x_times(graph: Graph, add: Node, x: str, only: Any, producers: dict[str, Node], users: dict[str, int],
                  close: Any) -> list[Node] | None:
    """The two Muls making ``0.5 x a`` of ``a`` = ``add``'s output, its output node last: ``Mul(Mul(x, a), 0.5)``
    or ``Mul(Mul(x, 0.5), a)``, operands either way round; None when they are not there."""
    first = only(add.outputs[0])
    if not _is_op(first, "Mul"):
        return None
    if _other(first, add.outputs[0]) == x:
        last = only(first.outputs[0])
        ok = _is_op(last, "Mul") and close(_scalar(graph, _other(last, first.outputs[0]) or ""), 0.5)
        return [first, last] if ok else None
    half = producers.get(_other(first, add.outputs[0]) or "")
    if (_is_op(half, "Mul") and users.get(half.outputs[0], 0) == 1 and _other(half, x) is not None
            and close(_scalar(graph, _other(half, x) or ""), 0.5)):
        return [half, first]
    return None


def _tanh_gelu(graph: Graph, tanh: Node, only: Any, producers: dict[str, Node], users: dict[str, int],
               close: Any) -> tuple[str, list[Node]] | None:
    """(x, the chain's nodes, its output node last) of ``0.5 x (1 + Tanh(sqrt(2 / pi) (x + 0.044715 x^3)))`` around
    ``tanh`` as exporters write it (Pow(x, 3); the 0.5 first or last; operands either way round), else None."""
    z = producers.get(tanh.inputs[0])
    if not _is_op(z, "Mul") or users.get(z.outputs[0], 0) != 1:
        return None
    s_name = _other(z, next((i for i in z.inputs if close(_scalar(graph, i), 0.7978845608028654)), ""))
    if s_name is None:
        return None
    s = producers.get(s_name)
    if not _is_op(s, "Add") or users.get(s.outputs[0], 0) != 1:
        return None
    for x, q_name in (s.inputs, s.inputs[::-1]):
        q = producers.get(q_name)
        if not _is_op(q, "Mul") or users.get(q_name, 0) != 1 or not any(close(_scalar(graph, i), 0.044715)
                                                                        for i in q.inputs):
            continue
        p = producers.get(next((i for i in q.inputs if _scalar(graph, i) is None), ""))
        if (_is_op(p, "Pow") and p.inputs[0] == x and close(_scalar(graph, p.inputs[1]), 3.0)
                and users.get(p.outputs[0], 0) == 1):
            break
    else:
        return None
    add = only(tanh.outputs[0])
    if not _is_op(add, "Add") or not close(_scalar(graph, _other(add, tanh.outputs[0]) or ""), 1.0):
        return None
    ends = _half_x_times(graph, add, x, only, producers, users, close)
    return None if ends is None else (x, [p, q, s, z, tanh, add, *ends])


def _erf_gelu(graph: Graph, erf: Node, only: Any, producers: dict[str, Node], users: dict[str, int],
              close: Any) -> tuple[str, list[Node]] | None:
    """(x, the chain's nodes, its output node last) of ``x * (1 + Erf(x / sqrt 2)) * 0.5`` around ``erf`` (Div by
    sqrt 2 or Mul by its inverse; the 0.5 first or last; operands either way round), else None."""
    sqrt2 = math.sqrt(2.0)
    scale = producers.get(erf.inputs[0])
    if not (_is_op(scale, "Div") or _is_op(scale, "Mul")) or users.get(scale.outputs[0], 0) != 1:
        return None
    x, c = scale.inputs[0], _scalar(graph, scale.inputs[1])
    if scale.op_type == "Mul" and c is None:  # Mul(c, x)
        x, c = scale.inputs[1], _scalar(graph, scale.inputs[0])
    if not close(c, sqrt2 if scale.op_type == "Div" else 1 / sqrt2):
        return None
    add = only(erf.outputs[0])
    if not _is_op(add, "Add") or not close(_scalar(graph, _other(add, erf.outputs[0]) or ""), 1.0):
        return None
    ends = _half_x_times(graph, add, x, only, producers, users, close)
    return None if ends is None else (x, [scale, erf, add, *ends])


def fuse_gelu(graph: Graph) -> Graph:
    """The GELU chains exporters write, ``x * (1 + Erf(x / sqrt 2)) * 0.5`` and ``0.5 x (1 + Tanh(sqrt(2 / pi) (x +
    0.044715 x^3)))`` (either order, operands either way round), with ``x = Add(t, b)`` folded in when ``b`` is a
    1-D float constant and the chain reads ``x`` alone -> one ``jaxinfer::Gelu(t[, b])`` (attribute
    ``approximate``), which float32 runs as our CPU kernel's one call (:func:`jaxinfer.cpu_kernels.gelu`) where XLA
    ran the bias and the chain as a loop split over its pool. Only after a product (:data:`_PRODUCTS`, through
    reshapes): after elementwise ops XLA's one loop would also take those (the dynamic-quantized BERT's dequantizing
    Mul: 4 % slower with the kernel). Runs after the 8-bit chains became tables (``passes.lookup``), which take
    their GELUs whole."""
    if graph.fmt != "onnx":
        return graph
    readers = graph.consumers()
    users = read_counts(graph)
    producers = graph.producers()
    outputs = set(graph.output_names)
    order = {id(n): i for i, n in enumerate(graph.nodes)}

    def only(name: str) -> Node | None:
        found = readers.get(name, [])
        return found[0] if len(found) == 1 and users.get(name, 0) == 1 and name not in outputs else None

    def close(v: float | None, want: float) -> bool:
        return v is not None and abs(v - want) <= 1e-6 * abs(want)

    fused: dict[int, Node] = {}
    dropped: set[int] = set()
    for node in graph.nodes:
        if id(node) in dropped:
            continue
        if _is_op(node, "Erf"):
            found, approximate = _erf_gelu(graph, node, only, producers, users, close), "none"
        elif _is_op(node, "Tanh"):
            found, approximate = _tanh_gelu(graph, node, only, producers, users, close), "tanh"
        else:
            continue
        if found is None or not _after_product(graph, producers, found[0]):
            continue
        x, chain = found
        if any(id(n) in dropped or (n is not chain[-1] and n.outputs[0] in outputs) for n in chain):
            continue
        # x read by the chain alone, and an Add of a 1-D float constant: the bias joins
        inputs: tuple[str, ...] = (x,)
        bias_add = producers.get(x)
        reads = sum(i == x for n in chain for i in n.inputs)
        if _is_op(bias_add, "Add") and users.get(x, 0) == reads and x not in outputs:
            for t, b in (bias_add.inputs, bias_add.inputs[::-1]):
                bv = graph.initializers.get(b)
                if (bv is not None and np.asarray(bv).ndim == 1 and np.asarray(bv).dtype == np.float32
                        and t not in graph.initializers):
                    inputs = (t, b)
                    chain = [bias_add, *chain]
                    break
        at = min(chain, key=lambda n: order[id(n)])
        fused[id(at)] = Node("Gelu", inputs, (chain[-1].outputs[0],), {"approximate": approximate}, node.name,
                             "jaxinfer")
        dropped.update(id(n) for n in chain)
    if not fused:
        return graph
    nodes = tuple(fused[id(n)] if id(n) in fused else n for n in graph.nodes if id(n) in fused or id(n) not in dropped)
    return graph.replace(nodes=nodes)


def split_gelu(graph: Graph) -> Graph:
    """:func:`fuse_gelu` undone: each ``jaxinfer::Gelu(t[, b])`` back as ``Add(t, b)``, then ``Div`` by sqrt 2 and
    ``Erf`` (or the tanh form's Pow, Mul, Add, Mul, Tanh), ``Add`` 1, ``Mul`` by its input and by 0.5 (ONNX ops of
    every opset), for analyses that read the chain's ops (``sharding.moe_pattern`` finds an expert's bias and
    activation so)."""
    if graph.fmt != "onnx" or not any((n.domain, n.op_type) == ("jaxinfer", "Gelu") for n in graph.nodes):
        return graph
    inits = dict(graph.initializers)
    nodes: list[Node] = []
    for n in graph.nodes:
        if (n.domain, n.op_type) != ("jaxinfer", "Gelu"):
            nodes.append(n)
            continue
        y = n.outputs[0]
        names = {k: f"{y}__gelu_{k}" for k in ("x", "sqrt2", "d", "e", "one", "a", "m", "half")}
        for k, v in (("sqrt2", math.sqrt(2.0)), ("one", 1.0), ("half", 0.5)):
            inits[names[k]] = np.asarray(v, np.float32)
        x = n.inputs[0]
        if len(n.inputs) > 1 and n.inputs[1]:
            nodes.append(Node("Add", (n.inputs[0], n.inputs[1]), (names["x"],), {}, n.name, ""))
            x = names["x"]
        if n.attrs.get("approximate", "none") == "tanh":  # z = sqrt(2 / pi) (x + 0.044715 x^3), a = 1 + tanh(z)
            for k, v in (("three", 3.0), ("c", 0.044715), ("k", math.sqrt(2 / math.pi))):
                names[k] = f"{y}__gelu_{k}"
                inits[names[k]] = np.asarray(v, np.float32)
            for k in ("p", "q", "s", "z"):
                names[k] = f"{y}__gelu_{k}"
            nodes += [Node("Pow", (x, names["three"]), (names["p"],), {}, n.name, ""),
                      Node("Mul", (names["p"], names["c"]), (names["q"],), {}, n.name, ""),
                      Node("Add", (x, names["q"]), (names["s"],), {}, n.name, ""),
                      Node("Mul", (names["s"], names["k"]), (names["z"],), {}, n.name, ""),
                      Node("Tanh", (names["z"],), (names["e"],), {}, n.name, "")]
        else:
            nodes += [Node("Div", (x, names["sqrt2"]), (names["d"],), {}, n.name, ""),
                      Node("Erf", (names["d"],), (names["e"],), {}, n.name, "")]
        nodes += [Node("Add", (names["e"], names["one"]), (names["a"],), {}, n.name, ""),
                  Node("Mul", (x, names["a"]), (names["m"],), {}, n.name, ""),
                  Node("Mul", (names["m"], names["half"]), (y,), {}, n.name, "")]
    return graph.replace(nodes=tuple(nodes), initializers=inits)
