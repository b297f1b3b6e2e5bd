"""Structured channel pruning: drop whole output channels of convs and matmuls.

``prune(model, sparsity)`` removes, from every prunable product (``Conv``/``jaxinfer::Conv``
with ``group=1``, ``Gemm``, 2-D-weight ``MatMul``), the ``sparsity`` fraction of output
channels that matter least, and rewrites everything downstream that reads those channels,
so the new model is smaller, not a zero-filled copy.

How channels are followed (a forward pass over the graph, see :func:`trace_channels`):

* a product's output starts a *channel group*; channel-wise ops carry it on: activations,
  pools, ``Dropout``, ``BatchNormalization`` (its params are sliced), depthwise convs (their
  kernel is sliced, ``group`` updated) and elementwise ops with a per-channel constant
  (the constant is sliced);
* ``Add``/``Sum``/``Mul``... of two followed values (residual joins) *unite* their groups:
  both branches lose the same channels; ``Concat`` on the channel axis concatenates them;
* ``Flatten`` / a ``Reshape`` to ``[N, K]`` of an NCHW value expands each channel over its
  ``H*W`` features for the ``Gemm`` that reads it (the reshape's target is rewritten);
* the next conv / Gemm / MatMul drops the matching *input* channels of its weight.

Anything else that reads a followed value (a graph output, ``Softmax``, ``LRN``, a
``Transpose``, a shuffle's ``Reshape``, a grouped conv, a join with an unfollowed value)
*freezes* the groups it reads: they keep every channel, and the report says why.

Criteria: ``l1``/``l2`` rank channels by the norm of their weights (summed over a group's
products, each normalized by its mean); ``sensitivity`` ranks them by the mean absolute
activation each channel carries on the calibration batches (a channel that is near zero
moves the next layer least).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import arith
from ..checks import is_real
from ..graph import Graph, Node
from ..model import Model
from . import calibrate as cal
from .layers import exclude_patterns, keeps_model_state, matches, require_model, warn_unmatched
from .report import QuantReport, cosine, end_to_end

CRITERIA = ("l1", "l2", "sensitivity")

#: Ops that map channel c of input 0 to channel c of output 0 (extra inputs must be constants).
CHANNELWISE = frozenset({
    "Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Erf", "Gelu", "Mish", "Abs", "Neg", "Identity", "Dropout", "Cast",
    "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
})
#: Elementwise ops over several inputs (broadcasting): followed inputs are united.
ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "Max", "Min", "Mean", "PRelu", "Pow"})
#: Normalizations with per-channel params in inputs 1.. (all sliced along axis 0).
NORMS = frozenset({"BatchNormalization", "InstanceNormalization"})

Segments = tuple[tuple[int | None, int], ...]
"""A value's channels: consecutive runs ``(group id or None for fixed, size)``."""


@dataclass(frozen=True)
class Layout:
    """Where a followed value's channels are: ``axis`` (negative), its rank (None: unknown),
    the segments, and ``flat``: True after Flatten (each channel spans ``repeat`` features)."""

    axis: int
    rank: int | None
    segs: Segments
    flat: bool = False

    @property
    def size(self) -> int:
        return sum(n for _, n in self.segs)


@dataclass(frozen=True)
class Edit:
    """Slice the tensor at ``node.inputs[slot]`` along ``axis`` by the kept channels of ``layout``.

    ``repeat``: each channel spans this many consecutive entries (a flattened NCHW value).
    """

    node: int
    slot: int
    axis: int
    layout: Layout
    repeat: int = 1


@dataclass(frozen=True)
class Producer:
    """A prunable product: node index, label, op, weight name and output-channel axis, its channels."""

    node: int
    name: str
    op_type: str
    weight: str
    out_axis: int
    channels: int
    layout: Layout


@dataclass
class Analysis:
    """The result of following channels through a graph."""

    producers: list[Producer] = field(default_factory=list)
    edits: list[Edit] = field(default_factory=list)
    attr_edits: list[tuple[int, str, Layout]] = field(default_factory=list)  # (node, attr, layout): attr = kept count
    reshape_edits: list[tuple[int, Layout, Layout]] = field(default_factory=list)  # (node, input layout, flat layout)
    parent: dict[int, int] = field(default_factory=dict)
    frozen: dict[int, str] = field(default_factory=dict)

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def freeze(self, layout: Layout, why: str) -> None:
        for g, _ in layout.segs:
            if g is not None:
                self.frozen.setdefault(g, why)

    def frozen_why(self, g: int) -> str | None:
        root = self.find(g)
        for member, why in self.frozen.items():
            if self.find(member) == root:
                return why
        return None


# ------------------------------------------------------------------ weight layouts
def _is_conv(node: Node) -> bool:
    return node.op_type == "Conv" and node.domain in ("", "ai.onnx", "jaxinfer")


def _conv_axes(node: Node, w: np.ndarray) -> tuple[int, int]:
    """(output-channel axis, input-channel axis) of a conv kernel."""
    return (w.ndim - 1, w.ndim - 2) if node.domain == "jaxinfer" else (0, 1)


def _product_axes(node: Node, w: np.ndarray) -> tuple[int, int] | None:
    """(output axis, input axis) of a product's constant weight, None if it is not one we prune."""
    if _is_conv(node):
        if w.ndim < 3 or int(node.attrs.get("group", 1)) != 1:
            return None
        return _conv_axes(node, w)
    if node.op_type == "Gemm" and node.domain in ("", "ai.onnx") and w.ndim == 2:
        return (0, 1) if node.attrs.get("transB", 0) else (1, 0)
    if node.op_type == "MatMul" and node.domain in ("", "ai.onnx") and w.ndim == 2:
        return (1, 0)
    return None


def _depthwise(node: Node, w: np.ndarray) -> bool:
    """A conv with one kernel per input channel (output channel c reads only input c)."""
    if not _is_conv(node) or w.ndim < 3:
        return False
    o_ax, i_ax = _conv_axes(node, w)
    g = int(node.attrs.get("group", 1))
    return g > 1 and w.shape[i_ax] == 1 and w.shape[o_ax] == g


# --------------------------------------------------------------- following channels
def trace_channels(graph: Graph, const: Mapping[str, np.ndarray], exclude: Sequence[str] = ()) -> Analysis:
    """Follow every prunable product's output channels through ``graph`` (see module doc)."""
    an = Analysis()
    lay: dict[str, Layout] = {}

    def new_group(why: str | None) -> int:
        g = len(an.parent)
        an.parent[g] = g
        if why:
            an.frozen[g] = why
        return g

    for idx, node in enumerate(graph.nodes):
        followed = [(s, lay[i]) for s, i in enumerate(node.inputs) if i in lay]
        inner = {n for sub in node.subgraphs() for n in _outer(sub)} & set(lay)
        for n in inner:
            an.freeze(lay[n], f"read inside a subgraph of {node.op_type} '{node.label}'")
        out = _follow(graph, node, idx, followed, const, an)
        if out is not None and node.outputs and node.outputs[0]:
            lay[node.outputs[0]] = out
        w = const.get(node.inputs[1]) if len(node.inputs) > 1 else None
        if w is None or not np.issubdtype(w.dtype, np.floating) or not node.outputs:
            continue
        axes = _product_axes(node, w)
        if axes is None or (node.op_type == "MatMul" and len(node.inputs) != 2):
            continue
        why = "excluded" if matches(exclude, node, node.inputs[1]) else None
        rank = w.ndim if _is_conv(node) else (2 if node.op_type == "Gemm" else None)
        axis = -(w.ndim - 1) if _is_conv(node) else -1
        g = new_group(why)
        layout = Layout(axis, rank, ((g, int(w.shape[axes[0]])),))
        lay[node.outputs[0]] = layout
        bias_slot = 2 if len(node.inputs) > 2 and node.inputs[2] and node.op_type in ("Conv", "Gemm") else None
        an.producers.append(Producer(idx, node.label, node.op_type, node.inputs[1], axes[0], int(w.shape[axes[0]]),
                                     layout))
        if bias_slot is not None:
            b = const.get(node.inputs[2])
            if b is None:
                an.frozen.setdefault(g, f"bias '{node.inputs[2]}' is not a constant")
            elif b.ndim >= 1 and b.shape[-1] == layout.size:
                an.edits.append(Edit(idx, 2, b.ndim - 1, layout))
        an.edits.append(Edit(idx, 1, axes[0], layout))
    for name in graph.output_names:
        if name in lay:
            an.freeze(lay[name], f"'{name}' is a graph output")
    return an


def _outer(sub: Graph) -> set[str]:
    from ..graph import outer_names

    return outer_names(sub)


def _follow(graph: Graph, node: Node, idx: int, followed: list[tuple[int, Layout]],
            const: Mapping[str, np.ndarray], an: Analysis) -> Layout | None:
    """The layout of ``node``'s first output given its followed inputs (recording edits), or None."""
    if not followed:
        return None
    op = node.op_type
    is_const = [i in const for i in node.inputs]
    where = f"{op} '{node.label}'"
    w = const.get(node.inputs[1]) if len(node.inputs) > 1 else None

    def stop(why: str) -> None:
        for _, layout in followed:
            an.freeze(layout, why)

    slots = [s for s, _ in followed]
    first = followed[0][1]
    if (op, node.domain) == ("Gelu", "jaxinfer") and slots == [0] and len(node.inputs) > 1 and node.inputs[1]:
        # passes.fuse.fuse_gelu's bias over the last axis: pruned with the channels, as the Add it was
        if node.inputs[1] not in const or first.flat or first.axis != -1:
            return stop(f"{where} adds a bias on another axis")
        an.edits.append(Edit(idx, 1, 0, first))
        return first
    if op in CHANNELWISE and node.domain in ("", "ai.onnx", "jaxinfer") and slots == [0]:
        extra = [i for i in node.inputs[1:] if i]
        if all(i in const and const[i].size == 1 for i in extra) and all(not o for o in node.outputs[1:2]
                                                                          if op == "MaxPool"):
            return first
        return stop(f"{where} has non-scalar extra inputs")
    if op in NORMS and slots == [0] and all(is_const[1:]):
        if first.flat:
            return stop(f"{where} after a flatten")
        for s in range(1, len(node.inputs)):
            if node.inputs[s]:
                an.edits.append(Edit(idx, s, 0, first))
        return first
    if _is_conv(node) and slots == [0] and w is not None:
        if first.flat or first.rank != w.ndim or first.axis != -(w.ndim - 1):
            return stop(f"{where} reads channels on another axis")
        o_ax, i_ax = _conv_axes(node, w)
        if int(node.attrs.get("group", 1)) == 1:
            an.edits.append(Edit(idx, 1, i_ax, first))
            return None
        if _depthwise(node, w) and w.shape[o_ax] == first.size:
            an.edits.append(Edit(idx, 1, o_ax, first))
            if len(node.inputs) > 2 and node.inputs[2]:
                an.edits.append(Edit(idx, 2, 0, first))
            an.attr_edits.append((idx, "group", first))
            return first
        return stop(f"{where} is a grouped conv (group={node.attrs.get('group')})")
    if op in ("Gemm", "MatMul") and slots == [0] and w is not None and w.ndim == 2 and node.domain in ("", "ai.onnx"):
        if op == "Gemm" and node.attrs.get("transA", 0):
            return stop(f"{where} has transA")
        if first.axis != -1:
            return stop(f"{where} reads channels on another axis")
        in_ax = 1 if op == "Gemm" and node.attrs.get("transB", 0) else 0
        k = int(w.shape[in_ax])
        if k % first.size:
            return stop(f"{where}: input width {k} is not a multiple of {first.size} channels")
        if k != first.size and not first.flat:
            return stop(f"{where}: input width {k} != {first.size} channels")
        an.edits.append(Edit(idx, 1, in_ax, first, k // first.size))
        return None
    if op in ELEMENTWISE and node.domain in ("", "ai.onnx"):
        others = [s for s, i in enumerate(node.inputs) if i and s not in slots and not is_const[s]]
        if others:
            return stop(f"{where} joins them with '{node.inputs[others[0]]}', whose channels are not followed")
        base = first
        for _, layout in followed[1:]:
            if (layout.axis, layout.flat, [n for _, n in layout.segs]) != (base.axis, base.flat, [n for _, n in base.segs]):
                return stop(f"{where} joins values with different channel layouts")
            for (ga, _), (gb, _) in zip(base.segs, layout.segs):
                if ga is not None and gb is not None:
                    an.union(ga, gb)
                elif ga is not None or gb is not None:
                    g = ga if ga is not None else gb
                    an.freeze(Layout(base.axis, None, ((g, 0),)), f"{where} joins with a fixed channel run")
        for s, name in enumerate(node.inputs):
            if name and is_const[s]:
                c = const[name]
                k = -base.axis
                if c.ndim >= k and c.shape[c.ndim - k] == base.size and base.size > 1:
                    an.edits.append(Edit(idx, s, c.ndim - k, base))
                elif c.ndim >= k and c.shape[c.ndim - k] != 1:
                    return stop(f"{where}: constant '{name}' {c.shape} does not broadcast per channel")
        return base
    if op == "Concat" and node.domain in ("", "ai.onnx"):
        ax = int(node.attrs.get("axis", 0))
        ranks = {lay.rank for _, lay in followed}
        if len(followed) != len([i for i in node.inputs if i]):
            return stop(f"{where} concatenates them with values whose channels are not followed")
        rank = next(iter(ranks)) if len(ranks) == 1 else None
        neg = ax - rank if (ax >= 0 and rank is not None) else ax
        if any(lay.axis != neg or lay.flat for _, lay in followed):
            return stop(f"{where} concatenates on another axis")
        return Layout(first.axis, rank, tuple(seg for _, lay in followed for seg in lay.segs))
    if op in ("Flatten", "Reshape") and slots == [0] and node.domain in ("", "ai.onnx"):
        if first.rank is None or first.axis != -(first.rank - 1) or first.flat:
            return stop(f"{where} mixes channels with other axes")
        if op == "Flatten" and int(node.attrs.get("axis", 1)) == 1:
            return Layout(-1, 2, first.segs, flat=True)
        if op == "Reshape" and node.inputs[1] in const:
            shape = const[node.inputs[1]].tolist()
            if len(shape) == 2:
                out = Layout(-1, 2, first.segs, flat=True)
                an.reshape_edits.append((idx, first, out))
                return out
        return stop(f"{where} reshapes channels into something other than [N, C*H*W]")
    return stop(f"{where} reads them and is not channel-wise")


# ------------------------------------------------------------------- choosing channels
def _norm_scores(w: np.ndarray, axis: int, p: int) -> np.ndarray:
    a = np.moveaxis(np.asarray(w, np.float64), axis, 0).reshape(w.shape[axis], -1)
    return np.abs(a).sum(1) if p == 1 else np.sqrt((a * a).sum(1))


def channel_scores(an: Analysis, const: Mapping[str, np.ndarray], criterion: str,
                   activations: Mapping[str, np.ndarray] | None = None,
                   graph: Graph | None = None) -> dict[int, np.ndarray]:
    """Group root -> per-channel importance (sum over the group's products, each mean-normalized)."""
    scores: dict[int, np.ndarray] = {}
    for p in an.producers:
        if criterion == "sensitivity":
            out = graph.nodes[p.node].outputs[0]
            s = np.asarray(activations[out], np.float64)
        else:
            s = _norm_scores(const[p.weight], p.out_axis, 1 if criterion == "l1" else 2)
        s = s / (s.mean() or 1.0)
        root = an.find(p.layout.segs[0][0])
        scores[root] = scores.get(root, 0.0) + s
    return scores


def _mean_abs_per_channel(model: Model, an: Analysis, data: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    names = [model.graph.nodes[p.node].outputs[0] for p in an.producers]
    pr = cal.probe(model, names)
    acc: dict[str, np.ndarray] = {}
    for feeds in data:
        outs = pr.run(feeds)
        for p, n in zip(an.producers, names):
            a = np.abs(np.asarray(outs[n], np.float64))
            a = np.moveaxis(a, a.ndim + p.layout.axis, 0).reshape(a.shape[a.ndim + p.layout.axis], -1).mean(1)
            acc[n] = acc.get(n, 0.0) + a
    return acc


def choose(an: Analysis, scores: Mapping[int, np.ndarray], sparsity: float) -> dict[int, np.ndarray]:
    """Group root -> sorted indices of the channels kept (all of them for frozen groups)."""
    keep: dict[int, np.ndarray] = {}
    for g in an.parent:
        root = an.find(g)
        if root in keep:
            continue
        s = scores.get(root)
        if s is None or an.frozen_why(root) is not None:
            n = next((p.channels for p in an.producers if an.find(p.layout.segs[0][0]) == root), 0)
            keep[root] = np.arange(n if s is None else len(s))
            continue
        n_keep = max(1, len(s) - int(np.floor(sparsity * len(s))))
        order = np.argsort(-s, kind="stable")[:n_keep]
        keep[root] = np.sort(order)
    return keep


def kept_indices(an: Analysis, keep: Mapping[int, np.ndarray], layout: Layout, repeat: int = 1) -> np.ndarray:
    """The kept positions of a value with ``layout`` (each channel spanning ``repeat`` entries)."""
    parts, off = [], 0
    for g, n in layout.segs:
        k = np.arange(n) if g is None else keep[an.find(g)]
        parts.append(off + k)
        off += n
    idx = np.concatenate(parts) if parts else np.arange(0)
    if repeat == 1:
        return idx
    return (idx[:, None] * repeat + np.arange(repeat)[None, :]).ravel()


# ------------------------------------------------------------------------- rewriting
def rewrite(graph: Graph, const: Mapping[str, np.ndarray], an: Analysis, keep: Mapping[int, np.ndarray]) -> Graph:
    """A new graph whose sliced tensors replace the originals (renamed where others share them)."""
    readers: dict[str, int] = {}
    for node, _ in graph.walk():
        for i in node.inputs:
            if i:
                readers[i] = readers.get(i, 0) + 1
    sliced: dict[tuple[int, int], np.ndarray] = {}
    for e in an.edits:
        name = graph.nodes[e.node].inputs[e.slot]
        arr = sliced.get((e.node, e.slot), np.asarray(const[name]))
        idx = kept_indices(an, keep, e.layout, e.repeat)
        if not np.array_equal(idx, np.arange(arr.shape[e.axis])):
            arr = np.take(arr, idx, axis=e.axis)
        sliced[(e.node, e.slot)] = arr
    inits = dict(graph.initializers)
    nodes = list(graph.nodes)
    for (n, s), arr in sliced.items():
        node = nodes[n]
        name = node.inputs[s]
        if arr.shape == np.asarray(const[name]).shape:
            continue
        new = name if readers.get(name, 0) == 1 else f"{name}__pruned@{node.label}"
        inits[new] = np.ascontiguousarray(arr)
        if new != name:
            nodes[n] = _with_input(node, s, new)
    for n, attr, layout in an.attr_edits:
        nodes[n] = Node(nodes[n].op_type, nodes[n].inputs, nodes[n].outputs,
                        {**nodes[n].attrs, attr: int(len(kept_indices(an, keep, layout)))}, nodes[n].name,
                        nodes[n].domain)
    for n, before, _ in an.reshape_edits:
        node = nodes[n]
        shape = np.asarray(const[node.inputs[1]]).copy()
        if shape[1] > 0:
            shape[1] = shape[1] // before.size * len(kept_indices(an, keep, before))
            new = f"{node.inputs[1]}__pruned@{node.label}"
            inits[new] = shape
            nodes[n] = _with_input(node, 1, new)
    from ..passes.cleanup import eliminate_dead_nodes

    g = graph.replace(nodes=tuple(nodes), initializers=inits)
    used = {i for node, _ in g.walk() for i in node.inputs if i} | set(g.output_names)
    g = g.replace(initializers={k: v for k, v in g.initializers.items() if k in used})
    return eliminate_dead_nodes(g)


def _with_input(node: Node, slot: int, name: str) -> Node:
    ins = list(node.inputs)
    ins[slot] = name
    return Node(node.op_type, tuple(ins), node.outputs, node.attrs, node.name, node.domain)


# ---------------------------------------------------------------------------- public
@keeps_model_state
def prune(model: Model, sparsity: float = 0.3, *, exclude: Sequence[str] | str = (),
          calibration: Iterable[Mapping[str, Any]] | None = None, criterion: str = "l1") -> Any:
    """A new, smaller Model with ``sparsity`` of each prunable layer's output channels removed.

    Args:
      model: a loaded float :class:`Model` (prune first, then quantize).
      sparsity: the fraction of output channels removed from each prunable group (0 <= s < 1).
      exclude: globs over node names, ``"op:Type"`` and weight names: those products keep
        all their channels (and so does every product joined with them by a residual add); one
        matching nothing in this model is warned about (:class:`~jaxinfer.errors.UnmatchedExcludeWarning`).
      calibration: input dicts; required by ``criterion="sensitivity"``; when given, the
        report measures each layer's (kept channels') and the model's output error.
      criterion: ``l1`` or ``l2`` (weight norms) or ``sensitivity`` (calibration activations).

    Returns:
      A :class:`~jaxinfer.quant.QuantizedModel` whose ``report()`` lists per layer the
      channels and weight bytes before/after, and for frozen layers why.

    Example:
      >>> p = jaxinfer.prune(m, 0.3, calibration=batches)     # doctest: +SKIP
      >>> print(p.report())                                   # doctest: +SKIP
    """
    from .api import build

    require_model(model, "prune")
    if not is_real(sparsity) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1) (the fraction of channels removed), got {sparsity!r}")
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion '{criterion}'; choose one of {list(CRITERIA)}")
    exclude = exclude_patterns(exclude)
    quantized = [k for k, v in model.params.items() if arith.is_quantized(v)]
    if quantized or getattr(model, "quant_report", None) is not None:
        raise ValueError(f"prune a float model, then quantize it: this one holds quantized params "
                         f"({quantized[:3] or 'a quantization report'})")
    warn_unmatched(exclude, model.graph, model.params)
    data = cal.batches(calibration)
    if criterion == "sensitivity" and not data:
        raise ValueError("criterion='sensitivity' needs calibration: an iterable of input dicts")
    graph = model.graph
    const = {k: np.asarray(v) for k, v in graph.initializers.items()}
    const.update({k: np.asarray(v) for k, v in model.params.items()})
    an = trace_channels(graph, const, exclude)
    acts = _mean_abs_per_channel(model, an, data) if criterion == "sensitivity" else None
    scores = channel_scores(an, const, criterion, acts, graph)
    keep = choose(an, scores, sparsity)
    new_graph = rewrite(graph, const, an, keep)
    pruned = build(model, new_graph, None, QuantReport(f"prune-{criterion}", []))
    pruned.quant_report = _report(model, pruned, an, keep, data, sparsity, criterion)
    return pruned


def _report(model: Model, pruned: Model, an: Analysis, keep: Mapping[int, np.ndarray],
            data: Sequence[Mapping[str, Any]], sparsity: float, criterion: str) -> QuantReport:
    prod_of = {n.outputs[0]: n for n in pruned.graph.nodes if n.outputs}
    errors = _layer_errors(model, pruned, an, keep, data) if data else {}
    rows = []
    for p in an.producers:
        out = model.graph.nodes[p.node].outputs[0]
        node = prod_of.get(out)
        w_after = (pruned.params.get(node.inputs[1]) if node is not None else None)
        before = arith.nbytes(model.params.get(p.weight, model.graph.initializers.get(p.weight)))
        after = arith.nbytes(w_after) if w_after is not None else 0
        kept = len(keep[an.find(p.layout.segs[0][0])])
        why = an.frozen_why(p.layout.segs[0][0])
        row = {"layer": p.name, "op": p.op_type, "weight": p.weight,
               "method": "kept" if why else ("pruned" if kept < p.channels else "unchanged"),
               "channels_before": p.channels, "channels_after": kept, "bytes_before": before,
               "bytes_after": after, "ratio": round(before / after, 3) if after else None}
        if why:
            row["why"] = why
        row.update(errors.get(out, {}))
        rows.append(row)
    totals: dict[str, Any] = {
        "params_bytes_f32": sum(arith.nbytes(v) for v in model.params.values()),
        "params_bytes": sum(arith.nbytes(v) for v in pruned.params.values()),
        "sparsity": sparsity, "criterion": criterion,
        "pruned_layers": sum(1 for r in rows if r["method"] == "pruned"),
        "skipped": [{"layer": r["layer"], "why": r["why"]} for r in rows if "why" in r],
    }
    totals["params_ratio"] = round(totals["params_bytes_f32"] / totals["params_bytes"], 3) if totals["params_bytes"] else None
    if data:
        totals.update(end_to_end(model, pruned, data))
    return QuantReport(f"prune-{criterion}", rows, totals)


def _layer_errors(model: Model, pruned: Model, an: Analysis, keep: Mapping[int, np.ndarray],
                  data: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """Per product output: cosine / max abs of the pruned model's kept channels vs the original's."""
    from .report import REPORT_BATCHES

    outs = {model.graph.nodes[p.node].outputs[0]: p for p in an.producers}
    names = [n for n in outs if n in {o for node in pruned.graph.nodes for o in node.outputs}]
    if not names:
        return {}
    pa, pb = cal.probe(model, names), cal.probe(pruned, names)
    acc: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
    for feeds in list(data)[:REPORT_BATCHES]:
        a, b = pa.run(feeds), pb.run(feeds)
        for n in names:
            lay = outs[n].layout
            x = np.asarray(a[n], np.float32)
            idx = kept_indices(an, keep, lay)
            acc[n].append((np.take(x, idx, axis=x.ndim + lay.axis).ravel(), np.asarray(b[n], np.float32).ravel()))
    res = {}
    for n, pairs in acc.items():
        fa = np.concatenate([p[0] for p in pairs])
        fb = np.concatenate([p[1] for p in pairs])
        res[n] = {"cosine": round(cosine(fa, fb), 6), "max_abs": float(np.max(np.abs(fa - fb))) if fa.size else 0.0}
    return res


__all__ = ["CRITERIA", "Analysis", "Layout", "channel_scores", "choose", "kept_indices", "prune", "rewrite",
           "trace_channels"]
