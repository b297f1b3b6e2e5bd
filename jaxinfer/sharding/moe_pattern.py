"""Recognise an exported mixture of experts and rewrite it into one ``jaxinfer::StackedMoE`` node.

Exporters write an MoE layer as plain ops: a router (MatMul/Gemm on the hidden
states ``x``) -> Softmax -> TopK -> (renormalise) -> gates, one FFN per expert
(linear -> elementwise activation -> linear, each expert its own initializers),
and a combine that weights each expert's output by its gate and sums them. The
gates and the combine come in many idioms (``Equal``/``OneHot`` masks,
``ScatterElements`` into a gate matrix and ``Slice``/``Gather`` of its columns,
``Unsqueeze``/``Concat`` then ``ReduceSum``, ``Add`` chains or ``Sum``).

:func:`fuse_moe` finds them in two halves:

1. **Structure.** Linears are ``MatMul(a, W)``, ``MatMul`` + ``Add(b)`` or
   ``Gemm`` with initializer weights. An expert is a linear ``fc2`` whose input
   comes from one or two linears of ``x`` (``fc1`` and, for gated units, ``fc3``)
   through elementwise ops with scalar constants only (the activation). Experts
   of one layer read the same ``x`` and have the same shapes and the same
   activation, op for op. The router is another linear of ``x`` with as many
   outputs as there are experts.
2. **Semantics.** Everything computed from the router logits and the experts'
   outputs (plus constants and ``Shape(x)``) up to the first value that depends
   on every expert is the routing-and-combine region. Rather than matching each
   idiom, the region is *run* on probe inputs: logits that make every expert
   somebody's top choice, and expert outputs set to ones one expert at a time
   (which column of the gate matrix weights which expert), then random (the
   whole combine). It must equal ``sum_e gate[:, e] * y_e`` with
   ``gate = renormalise?(top_k(softmax(logits)))`` for one ``k`` and one
   normalisation, else nothing is rewritten.

The rewrite stacks the experts' weights in onnxruntime's MoE layout (fc1/fc3
``[E, inter, hidden]``, fc2 ``[E, hidden, inter]``), keeps the router (its logits
feed the new node), carries the activation as a subgraph, and drops the experts
and the region. A graph that matches only in part -- an expert's intermediate
read elsewhere, a gate that is not a top-k softmax, experts of different shapes
or activations -- comes back unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from ..graph import Graph, Node, ValueInfo, outer_names
from ..passes.fuse import split_gelu
from ..registry import Registry
from ..tracer import resolve, run_node
from .moe_op import DOMAIN, OP_TYPE

_ONNX = ("", "ai.onnx")
#: Ops an expert's activation may use (elementwise; side inputs scalar constants).
ELEMENTWISE = frozenset({
    "Abs", "Add", "Cast", "Celu", "Clip", "Div", "Elu", "Erf", "Exp", "Gelu", "HardSigmoid", "HardSwish",
    "Identity", "LeakyRelu", "Log", "Max", "Min", "Mish", "Mul", "Neg", "Pow", "Reciprocal", "Relu", "Selu",
    "Sigmoid", "Softplus", "Softsign", "Sqrt", "Sub", "Tanh", "ThresholdedRelu",
})
MAX_BODY = 32
#: Values tried as the combine's output, in graph order (the first depending on every expert first).
MAX_CANDIDATES = 6
#: What symbolic dims become when the probes need concrete shapes.
PROBE_DIM = 4
_RTOL = 1e-4


@dataclass(frozen=True)
class Linear:
    """``output = input @ W (+ bias)`` with ``W`` an initializer (``trans``: stored ``[out, in]``)."""

    input: str
    output: str
    weight: str
    bias: str | None
    trans: bool
    nodes: tuple[Node, ...]

    def matrix(self, inits: Mapping[str, Any]) -> np.ndarray:
        """The weight as ``[in, out]``."""
        w = np.asarray(inits[self.weight])
        return w.T if self.trans else w

    def dims(self, inits: Mapping[str, Any]) -> tuple[int, int]:
        s = np.shape(inits[self.weight])
        return (s[1], s[0]) if self.trans else (s[0], s[1])


@dataclass(frozen=True)
class Expert:
    """One expert FFN: ``fc2(activation(fc1(x)[, fc3(x)]))``; ``entries`` = (fc1[, fc3])."""

    entries: tuple[Linear, ...]
    body: tuple[Node, ...]
    fc2: Linear
    key: tuple

    @property
    def x(self) -> str:
        return self.entries[0].input

    @property
    def output(self) -> str:
        return self.fc2.output

    @property
    def nodes(self) -> tuple[Node, ...]:
        return tuple(n for part in (*self.entries, self.fc2) for n in part.nodes) + self.body


@dataclass(frozen=True)
class MoeMatch:
    """A recognised MoE layer: ``out = MoE(x, logits)`` with ``experts`` in router-column order."""

    x: str
    logits: str
    out: str
    router: Linear
    experts: tuple[Expert, ...]
    k: int
    normalize: bool
    region: tuple[Node, ...]


# ------------------------------------------------------------------ structure
class _Consts:
    """Names whose values are known without inputs (initializers, Constant chains), evaluated on demand."""

    def __init__(self, graph: Graph, registry: Registry):
        self._graph, self._registry = graph, registry
        self._values: dict[str, Any] = {k: np.asarray(v) for k, v in graph.initializers.items()}
        self._producer: dict[str, Node] = {}
        names = set(self._values)
        for node in graph.nodes:
            opdef = resolve(node, registry, graph.opsets)
            if (opdef is None or opdef.random or opdef.host or any(True for _ in node.subgraphs())
                    or not all(i in names for i in node.inputs if i)):
                continue
            for o in node.outputs:
                if o:
                    names.add(o)
                    self._producer[o] = node
        self.names = frozenset(names)

    def value(self, name: str) -> np.ndarray:
        if name not in self._values:
            node = self._producer[name]
            env = {i: self.value(i) for i in node.inputs if i}
            run_node(node, env, self._registry, self._graph.opsets, set(node.outputs))
            for o in node.outputs:
                if o:
                    self._values[o] = np.asarray(env[o])
        return self._values[name]


def _is_matrix(inits: Mapping[str, Any], name: str) -> bool:
    return name in inits and np.ndim(inits[name]) == 2 and np.asarray(inits[name]).dtype.kind == "f"


def _bias(inits: Mapping[str, Any], name: str, size: int) -> bool:
    return name in inits and np.size(inits[name]) == size and np.ndim(inits[name]) <= 2 \
        and np.asarray(inits[name]).dtype.kind == "f"


def find_linears(graph: Graph) -> list[Linear]:
    """Every ``MatMul(a, W)``, ``Add(MatMul(a, W), b)`` and plain ``Gemm(a, W[, b])`` with initializer W/b."""
    inits = graph.initializers
    users = graph.consumers()
    outputs = set(graph.output_names)
    found: list[Linear] = []
    for n in graph.nodes:
        if n.domain not in _ONNX or len(n.inputs) < 2 or not _is_matrix(inits, n.inputs[1]):
            continue
        if n.op_type == "MatMul":
            out, nodes, bias = n.outputs[0], (n,), None
            after = users.get(out, [])
            if len(after) == 1 and out not in outputs and after[0].op_type == "Add" and after[0].domain in _ONNX:
                add = after[0]
                other = add.inputs[1] if add.inputs[0] == out else add.inputs[0]
                if np.ndim(inits.get(other)) == 1 and _bias(inits, other, np.shape(inits[n.inputs[1]])[1]):
                    out, nodes, bias = add.outputs[0], (n, add), other
            found.append(Linear(n.inputs[0], out, n.inputs[1], bias, False, nodes))
        elif n.op_type == "Gemm":
            a = n.attrs
            trans = bool(a.get("transB", 0))
            size = np.shape(inits[n.inputs[1]])[0 if trans else 1]
            bias = n.inputs[2] if len(n.inputs) > 2 and n.inputs[2] else None
            if a.get("transA", 0) or float(a.get("alpha", 1.0)) != 1.0:
                continue
            if bias is not None and (float(a.get("beta", 1.0)) != 1.0 or not _bias(inits, bias, size)):
                continue
            found.append(Linear(n.inputs[0], n.outputs[0], n.inputs[1], bias, trans, (n,)))
    return found


def _attr_key(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return ("array", value.dtype.str, value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return tuple(_attr_key(v) for v in value)
    return value if isinstance(value, (int, float, str, bytes, type(None))) else repr(value)


def _elementwise(node: Node) -> bool:
    if node.domain not in _ONNX or node.op_type not in ELEMENTWISE or len(node.outputs) != 1:
        return False
    if node.op_type == "Cast":
        return np.dtype(_onnx_dtype(node.attrs.get("to", 1))).kind == "f"
    return True


def _onnx_dtype(code: int) -> Any:
    try:
        import onnx

        return onnx.helper.tensor_dtype_to_np_dtype(int(code))
    except Exception:  # noqa: BLE001 - unknown code: not a float
        return np.dtype(object)


def find_expert(fc2: Linear, linears_by_out: Mapping[str, Linear], producers: Mapping[str, Node],
                consts: _Consts, order: Mapping[int, int], inits: Mapping[str, Any]) -> Expert | None:
    """The expert ending in ``fc2``, or None when its input is not ``act(fc1(x)[, fc3(x)])``."""
    body: dict[int, Node] = {}
    entries: dict[str, Linear] = {}
    stack, seen = [fc2.input], set()
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in linears_by_out:
            entries[v] = linears_by_out[v]
            continue
        if v in consts.names:
            if np.size(consts.value(v)) != 1:
                return None
            continue
        node = producers.get(v)
        if node is None or not _elementwise(node):
            return None
        body[id(node)] = node
        stack.extend(i for i in node.inputs if i)
        if len(body) > MAX_BODY:
            return None
    if not 1 <= len(entries) <= 2 or len({e.input for e in entries.values()}) != 1:
        return None
    x = next(iter(entries.values())).input
    nodes = sorted(body.values(), key=lambda n: order[id(n)])
    if any(x in n.outputs for n in nodes):
        return None
    ordered: list[str] = []  # body inputs in order of first use: (fc1[, fc3])
    for n in nodes:
        for i in n.inputs:
            if i in entries and i not in ordered:
                ordered.append(i)
    if not nodes:
        ordered = [fc2.input]
    names: dict[str, tuple] = {v: ("in", i) for i, v in enumerate(ordered)}
    sig = []
    for j, n in enumerate(nodes):
        ins = []
        for i in n.inputs:
            if not i:
                ins.append(None)
            elif i in names:
                ins.append(names[i])
            else:
                c = consts.value(i)
                ins.append(("const", c.dtype.str, c.shape, c.tobytes()))
        sig.append((n.op_type, n.domain, tuple(sorted((k, _attr_key(v)) for k, v in n.attrs.items())), tuple(ins)))
        names.update({o: ("node", j, s) for s, o in enumerate(n.outputs)})
    lins = tuple(entries[v] for v in ordered)
    inter = fc2.dims(inits)[0]
    if any(lin.dims(inits)[1] != inter for lin in lins) or len({lin.dims(inits)[0] for lin in lins}) != 1:
        return None
    key = (x, tuple(sig), names[fc2.input], tuple((lin.dims(inits), lin.bias is not None) for lin in lins),
           (fc2.dims(inits), fc2.bias is not None))
    return Expert(lins, tuple(nodes), fc2, key)


# ------------------------------------------------------------------ semantics
def _probe_logits(tokens: int, experts: int, rounds: int, rs: np.random.RandomState) -> list[np.ndarray]:
    """Logits where token t ranks experts ``s_t, s_t+1, ...`` with ``s_t`` covering every expert over the rounds."""
    out = []
    for r in range(rounds):
        shift = (np.arange(tokens) + r * tokens) % experts
        rank = (np.arange(experts)[None, :] - shift[:, None]) % experts
        out.append(-0.7 * rank + 0.05 * rs.rand(tokens, experts))
    return out


def _gates(logits: np.ndarray, k: int, normalize: bool) -> np.ndarray:
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    idx = np.argsort(-p, axis=-1, kind="stable")[..., :k]
    vals = np.take_along_axis(p, idx, -1)
    if normalize:
        vals = vals / vals.sum(-1, keepdims=True)
    g = np.zeros_like(p)
    np.put_along_axis(g, idx, vals, -1)
    return g


def _close(a: np.ndarray, b: np.ndarray, tol: float = _RTOL) -> bool:
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= tol * max(1.0, float(np.abs(b).max(initial=0)))))


def _run(nodes: tuple[Node, ...], env: dict[str, Any], registry: Registry, opsets: Mapping[str, int],
         out: str) -> np.ndarray:
    env = dict(env)
    keep = {o for n in nodes for o in n.outputs}
    with jax.ensure_compile_time_eval():
        for n in nodes:
            run_node(n, env, registry, opsets, keep)
    return np.asarray(env[out], dtype=np.float64)


def verify_combine(region: tuple[Node, ...], out: str, x: str, logits: str, ys: tuple[str, ...],
                   x_shape: tuple[int, ...], dtype: Any, ks: list[int], consts: _Consts, registry: Registry,
                   opsets: Mapping[str, int]) -> tuple[int, bool, tuple[int, ...]] | None:
    """``(k, normalize, expert of each router column)`` for which ``region`` computes the MoE combine, or None."""
    n_exp = len(ys)
    lead = x_shape[:-1]
    tokens = math.prod(lead)
    if tokens == 0:
        return None
    rs = np.random.RandomState(0)
    tol = max(_RTOL, 20 * float(np.finfo(dtype).eps))
    env0 = {i: consts.value(i) for n in region for i in n.inputs if i in consts.names}
    env0[x] = rs.rand(*x_shape).astype(dtype)
    rounds = _probe_logits(tokens, n_exp, -(-n_exp // tokens), rs)
    zeros = np.zeros(x_shape, dtype)
    try:
        response = []  # [round][expert j] -> output with y_j = 1, others 0
        for lg in rounds:
            env = {**env0, logits: lg.reshape(*lead, n_exp).astype(dtype)}
            row = []
            for j in range(n_exp):
                got = _run(region, {**env, **{y: (np.ones(x_shape, dtype) if i == j else zeros)
                                             for i, y in enumerate(ys)}}, registry, opsets, out)
                if got.shape != tuple(x_shape) or not _close(got, np.repeat(got[..., :1], x_shape[-1], -1), tol):
                    return None
                row.append(got[..., 0].reshape(tokens))
            response.append(row)
        for k in ks:
            for normalize in (False, True):
                gates = [_gates(lg, k, normalize) for lg in rounds]
                owner = []
                for e in range(n_exp):
                    js = [j for j in range(n_exp) if all(_close(response[r][j], g[:, e], tol) for r, g in enumerate(gates))]
                    if len(js) != 1:
                        break
                    owner.append(js[0])
                if len(owner) != n_exp or len(set(owner)) != n_exp:
                    continue
                lg = rounds[0]
                vals = [rs.randn(*x_shape).astype(dtype) for _ in ys]
                got = _run(region, {**env0, logits: lg.reshape(*lead, n_exp).astype(dtype), **dict(zip(ys, vals))},
                           registry, opsets, out)
                g = gates[0].reshape(*lead, n_exp)
                want = sum(g[..., e:e + 1] * vals[owner[e]].astype(np.float64) for e in range(n_exp))
                if _close(got, want, tol):
                    return k, normalize, tuple(owner)
    except Exception:  # noqa: BLE001 - a region that cannot run on the probes is not an MoE combine
        return None
    return None


# ------------------------------------------------------------------ matching
def _region(graph: Graph, x: str, logits: str, ys: tuple[str, ...], skip: set[int],
            consts: _Consts) -> tuple[list[Node], dict[str, int]]:
    """Nodes computed from ``logits``/``ys`` (constants and ``Shape(x)`` aside), and each value's expert mask."""
    full = (1 << len(ys)) - 1
    mask: dict[str, int] = {logits: 0, **{y: 1 << i for i, y in enumerate(ys)}}
    region: list[Node] = []
    for node in graph.nodes:
        if id(node) in skip or any(True for _ in node.subgraphs()):
            continue
        ins = [i for i in node.inputs if i]
        shape_of_x = node.op_type in ("Shape", "Size") and ins == [x]
        if not ins or not (shape_of_x or all(i in mask or i in consts.names for i in ins)):
            continue
        if not shape_of_x and not any(i in mask for i in ins):
            continue
        m = 0
        for i in ins:
            m |= mask.get(i, 0)
        region.append(node)
        mask.update({o: m for o in node.outputs if o})
    return region, {k: v for k, v in mask.items() if v == full}


def _ancestors(region: list[Node], out: str) -> tuple[Node, ...]:
    producers = {o: n for n in region for o in n.outputs if o}
    need, keep = [out], {}
    while need:
        n = producers.get(need.pop())
        if n is not None and id(n) not in keep:
            keep[id(n)] = n
            need.extend(i for i in n.inputs if i)
    return tuple(n for n in region if id(n) in keep)


def _topk_ks(region: tuple[Node, ...], consts: _Consts, experts: int) -> list[int]:
    ks: list[int] = []
    for n in region:
        if n.op_type == "TopK" and len(n.inputs) > 1 and n.inputs[1] in consts.names:
            ks.append(int(np.asarray(consts.value(n.inputs[1])).reshape(-1)[0]))
        elif n.op_type == "TopK" and "k" in n.attrs:
            ks.append(int(n.attrs["k"]))
        elif n.op_type in ("ArgMax", "ReduceMax"):
            ks.append(1)
    return sorted({k for k in ks if 1 <= k <= experts}) or [experts]


class _Shapes:
    """Concrete shapes/dtypes of values for the probes (symbolic dims -> ``PROBE_DIM``), computed on demand."""

    def __init__(self, graph: Graph, registry: Registry):
        self._graph, self._registry = graph, registry
        self._all: dict[str, Any] | None = None

    def __call__(self, name: str) -> tuple[tuple[int, ...], np.dtype] | None:
        info = {v.name: v for v in self._graph.inputs}
        info.update(self._graph.value_info)
        v = info.get(name)
        if v is not None and v.shape is not None and v.dtype is not None:
            return tuple(d if isinstance(d, int) and d > 0 else PROBE_DIM for d in v.shape), np.dtype(v.dtype)
        if self._all is None:
            from .values import graph_shapes

            try:
                self._all = graph_shapes(self._graph, self._registry, PROBE_DIM)
            except Exception:  # noqa: BLE001 - unknown shapes: nothing is rewritten
                self._all = {}
        s = self._all.get(name)
        return None if s is None else (tuple(s.shape), np.dtype(s.dtype))


def find_moe(graph: Graph, registry: Registry | None = None) -> list[MoeMatch]:
    """Every MoE layer of ``graph`` (top level) that :func:`fuse_moe` would rewrite (GELUs the load passes fused
    read as their ops: :func:`~jaxinfer.passes.fuse.split_gelu`)."""
    graph = split_gelu(graph)
    if graph.fmt != "onnx" or not any(n.op_type in ("TopK", "ArgMax", "Softmax") for n in graph.nodes):
        return []
    registry = registry if registry is not None else _onnx_registry()
    inits = graph.initializers
    linears = find_linears(graph)
    by_out = {lin.output: lin for lin in linears}
    producers = graph.producers()
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    consts = _Consts(graph, registry)
    groups: dict[tuple, list[Expert]] = {}
    for lin in linears:
        expert = find_expert(lin, by_out, producers, consts, order, inits)
        if expert is not None and expert.fc2.dims(inits)[1] == expert.entries[0].dims(inits)[0]:
            groups.setdefault(expert.key, []).append(expert)
    shapes = _Shapes(graph, registry)
    matches: list[MoeMatch] = []
    used: set[int] = set()
    for key, experts in groups.items():
        x = key[0]
        entry_ids = {id(n) for e in experts for n in e.nodes}
        hidden = experts[0].entries[0].dims(inits)[0]
        routers = [r for r in linears if r.input == x and id(r.nodes[0]) not in entry_ids
                   and r.dims(inits) == (hidden, len(experts)) and len(experts) >= 2]
        for router in routers:
            match = _match(graph, x, router, tuple(experts), consts, shapes, registry)
            if match is None:
                continue
            claimed = {id(n) for n in match.region} | entry_ids
            stand_in = Node(OP_TYPE, (x, router.output), (match.out,), {}, "", DOMAIN)
            if not claimed & used and _survivors(graph, match, stand_in) is not None:
                matches.append(match)
                used |= claimed
                break
    return matches


def _match(graph: Graph, x: str, router: Linear, experts: tuple[Expert, ...], consts: _Consts, shapes: _Shapes,
           registry: Registry) -> MoeMatch | None:
    ys = tuple(e.output for e in experts)
    skip = {id(n) for e in experts for n in e.nodes} | {id(n) for n in router.nodes}
    region, full = _region(graph, x, router.output, ys, skip, consts)
    x_info = shapes(x)
    if x_info is None:
        return None
    x_shape, dtype = x_info
    if dtype.kind != "f":
        return None
    tried = 0
    for node in region:
        out = next((o for o in node.outputs if o in full), None)
        if out is None:
            continue
        tried += 1
        if tried > MAX_CANDIDATES:
            break
        cone = _ancestors(region, out)
        if not any(router.output in n.inputs for n in cone):
            continue
        found = verify_combine(cone, out, x, router.output, ys, x_shape, dtype,
                               _topk_ks(cone, consts, len(experts)), consts, registry, graph.opsets)
        if found is not None:
            k, normalize, owner = found
            return MoeMatch(x, router.output, out, router, tuple(experts[j] for j in owner), k, normalize, cone)
    return None


# ------------------------------------------------------------------ rewrite
def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def _activation_body(expert: Expert, consts: _Consts, opsets: Mapping[str, int], prefix: str) -> Graph | None:
    """The expert's activation as a self-contained subgraph ``(h[, h3]) -> a`` (None: identity)."""
    if not expert.body:
        return None
    rename = lambda v: f"{prefix}/{v}" if v else ""
    ins = tuple(lin.output for lin in expert.entries)
    nodes = tuple(Node(n.op_type, tuple(rename(i) for i in n.inputs), tuple(rename(o) for o in n.outputs),
                       dict(n.attrs), f"{prefix}/{n.label}", n.domain) for n in expert.body)
    defined = set(ins) | {o for n in expert.body for o in n.outputs}
    body_consts = {rename(i): consts.value(i) for n in expert.body for i in n.inputs if i and i not in defined}
    return Graph(nodes, tuple(ValueInfo(rename(v)) for v in ins), (ValueInfo(rename(expert.fc2.input)),),
                 body_consts, dict(opsets), f"{prefix}_activation")


def stacked_weights(match: MoeMatch, inits: Mapping[str, Any]) -> dict[str, np.ndarray | None]:
    """fc1/fc2/fc3 weights and biases of ``match``'s experts, stacked in onnxruntime's MoE layout."""
    ex = match.experts

    def stack(get: Any) -> np.ndarray:
        return np.ascontiguousarray(np.stack([get(e) for e in ex]))

    def bias(lin_of: Any) -> np.ndarray | None:
        if lin_of(ex[0]).bias is None:
            return None
        return stack(lambda e: np.asarray(inits[lin_of(e).bias]).reshape(-1))

    gated = len(ex[0].entries) == 2
    return {
        "fc1_experts_weights": stack(lambda e: e.entries[0].matrix(inits).T),
        "fc1_experts_bias": bias(lambda e: e.entries[0]),
        "fc2_experts_weights": stack(lambda e: e.fc2.matrix(inits).T),
        "fc2_experts_bias": bias(lambda e: e.fc2),
        "fc3_experts_weights": stack(lambda e: e.entries[1].matrix(inits).T) if gated else None,
        "fc3_experts_bias": bias(lambda e: e.entries[1]) if gated else None,
    }


def _used(nodes: list[Node], graph: Graph) -> set[str]:
    used = set(graph.output_names) | set(graph.state_vars.values())
    for n in nodes:
        used.update(i for i in n.inputs if i)
        for sub in n.subgraphs():
            used |= outer_names(sub)
    return used


def _survivors(graph: Graph, match: MoeMatch, new: Node) -> list[Node] | None:
    """``graph``'s nodes with ``new`` for the combine and the region/experts dropped where nothing else
    reads them; None when an expert's value is read elsewhere (the match is then only partial)."""
    expert_ids = {id(n) for e in match.experts for n in e.nodes}
    removable = expert_ids | {id(n) for n in match.region}
    sink = next(n for n in match.region if match.out in n.outputs)
    if any(o and o != match.out for o in sink.outputs):
        return None
    restored: set[int] = set()
    while True:
        kept = [new if n is sink else n for n in graph.nodes
                if id(n) not in removable or id(n) in restored or n is sink]
        used = _used(kept, graph)
        back = {id(n) for n in graph.nodes if id(n) in removable and n is not sink and id(n) not in restored
                and any(o in used for o in n.outputs if o)}
        if not back:
            break
        restored |= back
    return None if restored & expert_ids else kept


def rewrite(graph: Graph, match: MoeMatch, consts: _Consts, index: int = 0) -> Graph | None:
    """``graph`` with ``match`` replaced by one StackedMoE node; None when an expert value is read elsewhere."""
    inits = dict(graph.initializers)
    taken = set(inits) | {o for n, _ in graph.walk() for o in n.outputs} | set(graph.input_names)
    prefix = _unique(f"moe{index}", taken)
    slots = []
    for slot, arr in stacked_weights(match, inits).items():
        if arr is None:
            slots.append("")
            continue
        name = _unique(f"{prefix}.{slot}", taken)
        inits[name] = arr
        slots.append(name)
    while slots and not slots[-1]:
        slots.pop()
    attrs: dict[str, Any] = {"k": match.k, "normalize_routing_weights": int(match.normalize)}
    body = _activation_body(match.experts[0], consts, graph.opsets, prefix)
    if body is not None:
        attrs["activation"] = body
    new = Node(OP_TYPE, (match.x, match.logits, *slots), (match.out,), attrs, prefix, DOMAIN)
    kept = _survivors(graph, match, new)
    if kept is None:
        return None
    kept_ids = {id(n) for n in kept}
    dropped = {i for n in graph.nodes if id(n) not in kept_ids for i in n.inputs if i}
    used = _used(kept, graph)
    inits = {k: v for k, v in inits.items() if k in used or k not in dropped}
    return graph.replace(nodes=tuple(kept), initializers=inits, opsets={**graph.opsets, DOMAIN: 1})


def fuse_moe(graph: Graph, registry: Registry | None = None) -> Graph:
    """``graph`` with every recognised MoE layer rewritten into a ``jaxinfer::StackedMoE`` node.

    Args:
      graph: an ONNX-derived :class:`~jaxinfer.graph.Graph` (other formats come back unchanged).
      registry: the op registry used to run the probes (default: the ONNX registry).

    Returns:
      A new graph, or ``graph`` itself when nothing matched in full.

    Example:
      >>> g = fuse_moe(model.graph)                                         # doctest: +SKIP
      >>> [n.op_type for n in g.nodes if n.domain == "jaxinfer"]            # doctest: +SKIP
      ['StackedMoE']
    """
    registry = registry if registry is not None else _onnx_registry()
    split = split_gelu(graph)
    matches = find_moe(split, registry)
    if not matches:
        return graph
    consts = _Consts(split, registry)
    out = split
    for i, match in enumerate(matches):
        nxt = rewrite(out, match, consts, i)
        out = out if nxt is None else nxt
    return out


def _onnx_registry() -> Registry:
    from ..converters.onnx.ops import REGISTRY

    return REGISTRY

