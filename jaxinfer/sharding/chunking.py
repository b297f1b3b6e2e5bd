"""``chunk_size``: run row-local stretches of a graph over chunks of rows to bound peak memory.

A transformer's projections, MLPs, norms and embeddings act on every token
(row) independently: ``[batch, seq, d] -> [batch, seq, ff] -> [batch, seq, d]``.
Run whole, the widest intermediate (``batch*seq x ff``) is live at once. Here
each maximal *row-local segment* of the graph -- a run of nodes that starts at
a MatMul/Gemm/embedding Gather/norm and continues through elementwise ops,
norms over feature dims and further projections, all on values that share the
same leading (row) dims -- is evaluated over chunks of at most
``chunk_size`` rows, so only one chunk's intermediates are live.

Chunk ``i`` takes rows ``[i*c, (i+1)*c)`` of each data-parallel group (the
row block one data shard owns), so a chunk is split over ``data`` exactly as
the whole was; inputs/outputs are reshaped in place and a ``fori_loop`` writes
each chunk's outputs into preallocated buffers. Ops are unchanged: the
segment's nodes run through the same registry on ``[rows, *features]`` values
(axis attributes rewritten to count from the end).

It pays where the widest intermediate dominates (an MLP much wider than the
model); each segment output costs an extra buffer, so a segment is only chunked
when its widest internal value outweighs its outputs. Measured on XLA CPU, each
loop also keeps its own buffers (they are not shared between loops), so a deep
model with a narrow MLP (ff = 4·d) can end with a *higher* peak: check
``compiled.memory_analysis()`` (benchmarks/sharding_meshes.py prints both).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..graph import Graph, Node, outer_names
from ..registry import Registry
from ..tracer import Env, run_node, static_names
from .values import Abstract

#: Ops that apply to each element (extra operands broadcast over feature dims only).
ELEMENTWISE = frozenset({
    "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Sqrt", "Exp", "Log", "Neg", "Abs", "Cast", "Identity", "Softplus",
    "Softsign", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "HardSigmoid", "LeakyRelu", "Elu",
    "Selu", "HardSwish", "Mish", "Celu", "ThresholdedRelu", "QuickGelu", "FastGelu", "BiasGelu", "Clip", "Swish",
    "Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual",
    "GreaterOrEqual", "And", "Or", "Xor", "Not", "Mod", "PRelu", "Sum", "Mean",
})
#: Ops that normalize over trailing (feature) dims from an ``axis`` attribute.
NORMS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"})
SOFTMAX = frozenset({"Softmax", "LogSoftmax"})
#: Ops worth chunking for: a segment needs one of these to be chunked at all.
HEAVY = frozenset({"MatMul", "Gemm", "Gather"})


@dataclass(frozen=True)
class Segment:
    """Nodes that act row by row over leading dims ``lead``, run as one chunked loop.

    ``row_inputs`` come from outside with shape ``lead + features``;
    ``outputs`` are the values later nodes (or the graph) read; ``nodes`` have
    their axis attributes counted from the end.
    """

    lead: tuple[int, ...]
    row_inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: tuple[Node, ...]

    @property
    def rows(self) -> int:
        return math.prod(self.lead)

    def chunks(self, chunk_size: int) -> tuple[int, int]:
        """(number of chunks, rows per chunk) with rows per chunk <= chunk_size."""
        n = -(-self.rows // chunk_size)
        return n, -(-self.rows // n)


def _is_row(name: str, lead: tuple[int, ...], values: Mapping[str, Abstract]) -> bool:
    v = values.get(name)
    return v is not None and v.traced and not v.param and len(v.shape) > len(lead) - 1 \
        and v.shape[:len(lead)] == lead


def _feature_axis(node: Node, rank: int, lead: int, default: int) -> int | None:
    """The node's axis counted from the end, or None when it points into the row dims."""
    axis = int(node.attrs.get("axis", default))
    axis = axis - rank if axis >= 0 else axis
    return axis if -axis <= rank - lead else None


def _row_local(node: Node, lead: tuple[int, ...], rows: set[str], values: Mapping[str, Abstract]) -> Node | None:
    """``node`` rewritten for ``[chunk, *features]`` values if it acts row by row on ``rows``, else None."""
    ins = [i for i in node.inputs if i]
    outs = [o for o in node.outputs if o]
    if len(outs) != 1 or outs[0] not in values or values[outs[0]].shape[:len(lead)] != lead:
        return None
    out_rank = len(values[outs[0]].shape)
    row_ins = [i for i in ins if i in rows]
    if not row_ins:
        return None
    others = [i for i in ins if i not in rows]
    op = node.op_type
    if op in ELEMENTWISE:
        feat = out_rank - len(lead)
        if any(len(values[i].shape) != out_rank for i in row_ins if i in values):
            return None
        if any(i not in values or len(values[i].shape) > feat for i in others):
            return None
        return node
    if op == "MatMul":
        a, b = node.inputs[0], node.inputs[1]
        ok = a in rows and b not in rows and b in values and len(values[b].shape) == 2
        return node if ok and len(values[a].shape) == len(lead) + 1 else None
    if op == "Gemm":
        a = node.inputs[0]
        ok = len(lead) == 1 and a in rows and not int(node.attrs.get("transA", 0)) and len(row_ins) == 1
        return node if ok and all(len(values[i].shape) <= 2 for i in others) else None
    if op == "Gather":
        data, idx = node.inputs[0], node.inputs[1]
        ok = int(node.attrs.get("axis", 0)) == 0 and data not in rows and idx in rows
        return node if ok else None
    if op in NORMS or op in SOFTMAX:
        x = node.inputs[0]
        if x not in rows or len(row_ins) != 1 or any(len(values[i].shape) > out_rank - len(lead) for i in others):
            return None
        if op in SOFTMAX and node.attrs.get("axis", -1) not in (-1, out_rank - 1):
            return None  # opset < 13 Softmax flattens from axis: only the last axis is safe
        axis = _feature_axis(node, out_rank, len(lead), -1)
        if axis is None:
            return None
        return Node(op, node.inputs, node.outputs, {**node.attrs, "axis": axis}, node.name, node.domain)
    return None


def _seed_lead(node: Node, values: Mapping[str, Abstract]) -> tuple[int, ...] | None:
    """Leading (row) dims of a node that may start a segment."""
    if node.op_type == "MatMul" and len(node.inputs) == 2:
        a = values.get(node.inputs[0])
        return tuple(a.shape[:-1]) if a is not None and len(a.shape) >= 2 else None
    if node.op_type == "Gemm":
        a = values.get(node.inputs[0])
        return tuple(a.shape[:1]) if a is not None and len(a.shape) == 2 else None
    if node.op_type == "Gather" and len(node.inputs) == 2:
        i = values.get(node.inputs[1])
        return tuple(i.shape) if i is not None and len(i.shape) >= 1 else None
    if node.op_type in NORMS:
        x = values.get(node.inputs[0])
        if x is None:
            return None
        axis = int(node.attrs.get("axis", -1)) % len(x.shape)
        return tuple(x.shape[:axis]) if axis >= 1 else None
    return None


def _reads(node: Node) -> set[str]:
    names = {v for v in node.inputs if v}
    for sub in node.subgraphs():
        names |= outer_names(sub)
    return names


def schedule(graph: Graph, values: Mapping[str, Abstract], chunk_size: int) -> tuple[Node | Segment, ...]:
    """``graph``'s nodes reordered into plain nodes and row-local :class:`Segment` s.

    From each seed (a MatMul/Gemm/Gather/norm over more than ``chunk_size``
    rows) the rest of the graph is scanned once: a row-local node that reads no
    value of a deferred node joins the segment; a node independent of the
    segment runs before it; everything else (and what reads it) runs after.
    The segment's leading nodes that save the most memory are kept (see
    :func:`_best_prefix`); the rest go back to the pending list.
    """
    pending = list(graph.nodes)
    out: list[Node | Segment] = []
    while pending:
        lead = _seed_lead(pending[0], values)
        if lead is None or math.prod(lead) <= chunk_size:
            out.append(pending.pop(0))
            continue
        members: list[Node] = []
        originals: list[Node] = []
        before: list[Node] = []
        after: list[Node] = []
        rows: set[str] = set()
        row_inputs: list[str] = []
        produced: set[str] = set()
        deferred: set[str] = set()
        for node in pending:
            reads = _reads(node)
            outs = {o for o in node.outputs if o}
            if reads & deferred:
                after.append(node)
                deferred |= outs
                continue
            if not any(True for _ in node.subgraphs()):
                candidates = {v for v in reads if v in produced or _is_row(v, lead, values)}
                rewritten = _row_local(node, lead, rows | candidates, values)
                if rewritten is not None:
                    originals.append(node)
                    row_inputs.extend(v for v in node.inputs if v in candidates - produced and v not in row_inputs)
                    rows |= candidates | outs
                    produced |= outs
                    members.append(rewritten)
                    continue
            if reads & produced:
                after.append(node)
                deferred |= outs
            else:
                before.append(node)
        later = set().union(*(_reads(n) for n in after)) if after else set()
        later |= set(graph.output_names)
        k, outputs = _best_prefix(members, later, values)
        if not k:
            out.append(pending.pop(0))
            continue
        tail = {id(o) for o in originals[k:]}
        rest = [n for n in pending if id(n) in tail]
        used = {v for n in members[:k] for v in n.inputs if v}
        out.extend(before)
        out.append(Segment(lead, tuple(v for v in row_inputs if v in used), outputs, tuple(members[:k])))
        pending = rest + after
    return tuple(out)


def _best_prefix(members: Sequence[Node], later: set[str], values: Mapping[str, Abstract]
                 ) -> tuple[int, tuple[str, ...]]:
    """(k, outputs): the leading ``members[:k]`` that saves most memory when chunked (k = 0: none).

    Chunking saves the widest value that stays inside the segment but adds a
    buffer per output, so a prefix counts only when the former is larger.
    """
    best, best_k, best_out = 0, 0, ()
    for k in range(1, len(members) + 1):
        head, tail = members[:k], members[k:]
        if not any(n.op_type in HEAVY for n in head):
            continue
        needed = later | {v for n in tail for v in n.inputs if v}
        outs = tuple(o for n in head for o in n.outputs if o and o in needed)
        internal = [values[o].nbytes for n in head for o in n.outputs if o and o not in outs and o in values]
        saving = max(internal, default=0) - sum(values[o].nbytes for o in outs if o in values)
        if saving > best:
            best, best_k, best_out = saving, k, outs
    return best_k, best_out


def _to_chunks(x: Any, lead: tuple[int, ...], groups: int, n: int, c: int) -> Any:
    """``lead + feat`` -> ``[groups, n, c, *feat]`` (a free reshape unless rows need padding)."""
    feat = tuple(x.shape[len(lead):])
    per = math.prod(lead) // groups
    x = jnp.reshape(x, (groups, per) + feat)
    if n * c > per:
        x = jnp.pad(x, [(0, 0), (0, n * c - per)] + [(0, 0)] * len(feat))
    return jnp.reshape(x, (groups, n, c) + feat)


def _from_chunks(y: Any, lead: tuple[int, ...], groups: int, n: int, c: int) -> Any:
    feat = tuple(y.shape[3:])
    per = math.prod(lead) // groups
    y = jnp.reshape(y, (groups, n * c) + feat)
    return jnp.reshape(y[:, :per] if n * c > per else y, lead + feat)


def run_segment(seg: Segment, env: Env, registry: Registry, opsets: Mapping[str, int], keep: set[str],
                chunk_size: int, groups: int = 1) -> None:
    """Evaluate ``seg`` one chunk of rows at a time, writing its outputs into ``env``.

    ``groups`` (the data-parallel size) keeps the row blocks each data shard
    owns apart: chunk ``i`` takes rows ``[i*c, (i+1)*c)`` of every group, so a
    chunk is split over ``data`` exactly as the whole was. Inputs and outputs
    are reshaped in place (no transposes); the loop writes each chunk's
    outputs into preallocated buffers.
    """
    groups = groups if seg.rows % groups == 0 else 1
    n, c = seg.chunks(chunk_size)
    c = -(-(seg.rows // groups) // n)
    xs = tuple(_to_chunks(env[v], seg.lead, groups, n, c) for v in seg.row_inputs)

    def body(chunk: tuple[Any, ...]) -> tuple[Any, ...]:
        local = dict(env)
        local.update((v, jnp.reshape(x, (groups * c,) + x.shape[2:])) for v, x in zip(seg.row_inputs, chunk))
        for node in seg.nodes:
            run_node(node, local, registry, opsets, keep)
        return tuple(jnp.reshape(local[o], (groups, c) + tuple(local[o].shape[1:])) for o in seg.outputs)

    def take(i: Any) -> tuple[Any, ...]:
        return tuple(lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False) for x in xs)

    shapes = jax.eval_shape(body, take(0))
    init = tuple(jnp.zeros((groups, n) + s.shape[1:], s.dtype) for s in shapes)

    def step(i: Any, bufs: tuple[Any, ...]) -> tuple[Any, ...]:
        ys = body(take(i))
        return tuple(lax.dynamic_update_index_in_dim(b, y, i, axis=1) for b, y in zip(bufs, ys))

    outs = lax.fori_loop(0, n, step, init)
    for name, y in zip(seg.outputs, outs):
        env[name] = _from_chunks(y, seg.lead, groups, n, c)


def make_chunked_fn(graph: Graph, registry: Registry, constants: Mapping[str, Any], steps: Sequence[Node | Segment],
                    chunk_size: int, groups: int = 1) -> Callable[[Mapping[str, Any], Mapping[str, Any]], dict[str, Any]]:
    """``fn(params, inputs) -> outputs`` like ``make_fn``'s, running ``steps`` (from :func:`schedule`);
    ``groups`` is the data-parallel size (see :func:`run_segment`)."""
    if graph.state_vars:
        raise ValueError("chunk_size does not support graphs with state variables")
    keep = static_names(graph, registry)

    def fn(params: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
        env: Env = dict(constants)
        env.update(params)
        env.update(inputs)
        for name, value in graph.initializers.items():
            env.setdefault(name, value)
        for step in steps:
            if isinstance(step, Segment):
                run_segment(step, env, registry, graph.opsets, keep, chunk_size, groups)
            else:
                run_node(step, env, registry, graph.opsets, keep)
        return {name: env[name] for name in graph.output_names}

    return fn
