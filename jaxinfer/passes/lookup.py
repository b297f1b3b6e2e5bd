"""8-bit lookup tables: an elementwise chain that reads one 8-bit tensor becomes one table read.

An 8-bit tensor has 256 codes, so whatever a chain of elementwise ops with scalar constants computes
from it (dequantize, divide, erf, quantize, QLinearAdd with a scalar, ...) is a function of the code.
Quantized models are full of such chains: onnxruntime's QDQ GELU is ``DQ -> Div -> Q -> DQ -> Erf ->
Q -> DQ -> Add -> Q -> DQ -> Mul -> Q -> DQ -> Mul -> Q``, five divisions, an erf and five roundings
per element. ``jaxinfer::Lookup8`` runs the chain's own nodes (its ``body``) once on the 256 codes
and then reads each element's entry, so the results are the chain's, bit for bit.

A chain starts at a *root*: a value a quantizing op writes (QuantizeLinear, the QLinear ops, the
integer matmul/conv rewrites) or a graph input declared 8-bit. It grows through the elementwise ops
of :data:`_ELEMENTWISE` whose other inputs are constants of one element (scalar scales, zero points,
``sqrt(2)``, ...). Each value of a chain read outside it becomes a ``Lookup8`` node when the ops
between the root and it cost at least :data:`MIN_COST` (a table read costs about one quantize
step, so short requantizations stay as they are). At run time a root that is not 8-bit after all
runs the body directly, as the graph had it.
"""

from __future__ import annotations

import numpy as np

from ..graph import Graph, Node, ValueInfo, outer_names
from .cleanup import eliminate_dead_nodes

_ONNX = ("", "ai.onnx")
_MS = "com.microsoft"

#: elementwise ops a chain may pass through: (domain, op) -> (data input slots, cost per element).
#: Every other input must be an initializer of one element (or omitted). Costs count a division or
#: a transcendental as 4, a quantize step (divide, round, clip) as 3, the rest as 1.
_ELEMENTWISE: dict[tuple[str, str], tuple[tuple[int, ...], int]] = {
    **{("", op): ((0,), 1) for op in (
        "Abs", "Neg", "Relu", "LeakyRelu", "Floor", "Ceil", "Round", "Sign", "Identity", "Cast",
        "HardSigmoid", "HardSwish", "Shrink", "ThresholdedRelu", "Clip")},
    **{("", op): ((0,), 4) for op in (
        "Erf", "Tanh", "Sigmoid", "Exp", "Log", "Sqrt", "Reciprocal", "Softplus", "Softsign", "Elu",
        "Selu", "Celu", "Mish", "Gelu", "Sin", "Cos", "Tan", "Atan", "Asin", "Acos", "Sinh", "Cosh",
        "Asinh", "Acosh", "Atanh")},
    **{("", op): ((0, 1), 1) for op in ("Add", "Sub", "Mul", "Max", "Min", "PRelu")},
    **{("", op): ((0, 1), 4) for op in ("Div", "Pow", "Mod")},
    ("", "DequantizeLinear"): ((0,), 1),
    ("", "QuantizeLinear"): ((0,), 3),
    (_MS, "QLinearAdd"): ((0, 3), 3),
    (_MS, "QLinearMul"): ((0, 3), 3),
    (_MS, "QLinearLeakyRelu"): ((0,), 4),
    (_MS, "QLinearSigmoid"): ((0,), 8),
    (_MS, "Gelu"): ((0,), 5),
    (_MS, "FastGelu"): ((0,), 5),
    (_MS, "QuickGelu"): ((0,), 5),
}

#: ops whose outputs are quantized -> the slot of their output zero point (None: always uint8)
_QUANTIZING: dict[tuple[str, str], int | None] = {
    ("", "QuantizeLinear"): 2, ("", "QLinearConv"): 7, ("", "QLinearMatMul"): 7,
    ("", "DynamicQuantizeLinear"): None,
    (_MS, "QLinearAdd"): 7, (_MS, "QLinearMul"): 7, (_MS, "QLinearLeakyRelu"): 4,
    (_MS, "QLinearSigmoid"): 4, (_MS, "QLinearAveragePool"): 4, (_MS, "QLinearGlobalAveragePool"): 4,
    (_MS, "QLinearSoftmax"): 4, (_MS, "QLinearConcat"): 1,
    ("jaxinfer", "QLinearMatMulInt"): 9, ("jaxinfer", "QLinearConvInt"): 9, ("jaxinfer", "QLinearConv"): 7,
}

#: the least chain cost (per element, :data:`_ELEMENTWISE`) worth a table read
MIN_COST = 8

_8BIT = (np.dtype(np.int8), np.dtype(np.uint8))


def _key(node: Node) -> tuple[str, str]:
    return ("" if node.domain in _ONNX else node.domain, node.op_type)


def _one_element_constants(graph: Graph) -> set[str]:
    return {k for k, v in graph.initializers.items() if np.asarray(v).size == 1}


def _quantized_outputs(graph: Graph) -> set[str]:
    """Values written 8-bit: graph inputs and values declared so, and quantizing ops' outputs whose
    zero point is an 8-bit initializer (or, for QuantizeLinear, absent with no ``output_dtype``: uint8)."""
    declared = [*graph.inputs, *graph.value_info.values()]
    found = {v.name for v in declared if v.dtype is not None and np.dtype(v.dtype) in _8BIT}
    for node in graph.nodes:
        key = _key(node)
        if key not in _QUANTIZING or not node.outputs or not node.outputs[0]:
            continue
        slot = _QUANTIZING[key]
        zp_name = node.inputs[slot] if slot is not None and slot < len(node.inputs) else ""
        zp = graph.initializers.get(zp_name) if zp_name else None
        if (slot is None or zp is not None and np.asarray(zp).dtype in _8BIT
                or not zp_name and key == ("", "QuantizeLinear") and "output_dtype" not in node.attrs):
            found.add(node.outputs[0])
    return found


def _chain_roots(graph: Graph) -> dict[str, str]:
    """Each value computed elementwise from exactly one root (and one-element constants) -> that root."""
    scalars = _one_element_constants(graph)
    quantized = _quantized_outputs(graph)
    root_of: dict[str, str] = {}
    for node in graph.nodes:
        spec = _ELEMENTWISE.get(_key(node))
        if spec is None:  # (a blocked Q/DQ's scales are not one element: it stops at its scale input below)
            continue
        data_slots, _ = spec
        roots: set[str] = set()
        for slot, name in enumerate(node.inputs):
            if not name or name in scalars:
                continue
            root = root_of.get(name, name if name in quantized else None)
            if slot not in data_slots or root is None:
                roots = set()
                break
            roots.add(root)
        if len(roots) == 1:
            root = roots.pop()
            root_of.update((o, root) for o in node.outputs if o)
    return root_of


def _chain(producers: dict[str, Node], root_of: dict[str, str], exit_name: str) -> list[Node]:
    """The nodes between ``exit_name``'s root and it, in graph order."""
    root = root_of[exit_name]
    seen: dict[int, Node] = {}
    stack = [exit_name]
    while stack:
        name = stack.pop()
        node = producers[name]
        if id(node) in seen:
            continue
        seen[id(node)] = node
        stack.extend(i for i in node.inputs if i and i != root and root_of.get(i) == root)
    return list(seen.values())


def tabulate_8bit_chains(graph: Graph) -> Graph:
    """Elementwise chains over one 8-bit value, read outside the chain, become ``jaxinfer::Lookup8``."""
    if graph.fmt != "onnx":
        return graph
    root_of = _chain_roots(graph)
    if not root_of:
        return graph
    producers = graph.producers()
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    scalars = _one_element_constants(graph)
    outputs = set(graph.output_names) | set(graph.state_vars.values())
    read_outside = set(outputs)
    for node in graph.nodes:
        inside = {root_of.get(o) for o in node.outputs if o}
        for name in node.inputs:
            if name in root_of and root_of[name] not in inside:
                read_outside.add(name)
        for sub in node.subgraphs():
            read_outside |= outer_names(sub) & set(root_of)
    replaced: dict[int, Node] = {}
    for name in sorted(read_outside & set(root_of)):
        chain = sorted(_chain(producers, root_of, name), key=lambda n: order[id(n)])
        if sum(_ELEMENTWISE[_key(n)][1] for n in chain) < MIN_COST:
            continue
        root = root_of[name]
        rank = max((np.asarray(graph.initializers[i]).ndim for n in chain for i in n.inputs if i in scalars),
                   default=0)
        body = Graph(tuple(chain), (ValueInfo(root),), (ValueInfo(name),), opsets=graph.opsets,
                     name=f"lookup8_{name}")
        last = producers[name]
        replaced[id(last)] = Node("Lookup8", (root,), tuple(o if o == name else "" for o in last.outputs),
                                  {"body": body, "rank": rank}, f"lookup8_{last.label}", "jaxinfer")
    if not replaced:
        return graph
    nodes = tuple(replaced.get(id(n), n) for n in graph.nodes)
    opsets = dict(graph.opsets)
    opsets.setdefault("jaxinfer", 1)
    return eliminate_dead_nodes(graph.replace(nodes=nodes, opsets=opsets))
