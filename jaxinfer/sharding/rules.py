"""Automatic tensor-parallel rules from graph analysis.

The analysis walks the graph once with abstract shapes and tracks, for every
activation, which dim (if any) is split over the ``tensor`` axis:

* a MatMul/Gemm whose activation input is replicated becomes *column parallel*
  (weight split on its output dim; the output is split on its last dim);
* a MatMul/Gemm whose activation input is split on the contracting dim becomes
  *row parallel* (weight split on its input dim; the output is replicated after
  one all-reduce) -- Megatron's column->row pairs (QKV->out, up->down);
* reshapes/transposes carry the split (hidden dim -> heads dim and back), so
  attention runs split by heads with no communication;
* elementwise ops carry it (biases of column-parallel layers are split, masks
  broadcast), softmax/norms over other dims carry it;
* embeddings (Gather from a 2-D weight on axis 0) are split by vocabulary (the
  LM head too, when it is the transposed tied table); convs by out channels,
  then the next conv by in channels.

A column split whose output reaches an op that would need the whole dim (a
LayerNorm over it, a reshape that cannot carry it, ...) is undone and the
analysis rerun, so the result only contains pairs that close cleanly.

The result is data: ``[(regex, PartitionSpec), ...]`` matched against param
names with ``re.fullmatch``, first match wins, unmatched params replicated.
Print it, edit it, pass it back as ``MeshConfig(rules=...)``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from ..graph import Node
from ..tracer import is_concrete, run_node, static_names
from .config import AXES, ShardingConfigError

Rules = list[tuple[str, P]]

#: Embedding tables with fewer rows (token types, short position tables) stay replicated.
MIN_EMBEDDING_ROWS = 64

_UNARY = {
    "Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Sqrt", "Exp", "Log", "Neg", "Abs", "Cast", "Identity", "Dropout",
    "Softplus", "Softsign", "Reciprocal", "Not", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "HardSigmoid",
    "LeakyRelu", "Elu", "Selu", "HardSwish", "Mish", "Celu", "ThresholdedRelu", "IsNaN", "IsInf", "QuickGelu",
    "FastGelu", "BiasGelu", "Clip", "CastLike", "Swish",
}
_NARY = {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Equal", "Less", "Greater", "LessOrEqual",
         "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu", "Sum", "Mean", "BitShift"}
_SHAPE_CARRY = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_SAME_DIM_IF_UNCHANGED = {"Slice", "Pad", "Expand", "Tile"}
_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
_REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
           "ReduceSumSquare", "ReduceLogSum", "ReduceLogSumExp", "ArgMax", "ArgMin"}


@dataclass
class Analysis:
    """What the analysis found: ``param_dims`` (param -> split dim), the rules,
    ``needs`` (dim sizes the tensor size must divide, with why) and
    ``unsplittable`` (splits that ``tensor`` did not divide)."""

    param_dims: dict[str, int]
    rules: Rules
    needs: list[tuple[str, int]] = field(default_factory=list)
    unsplittable: list[tuple[str, int]] = field(default_factory=list)
    collectives: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)
    iterations: int = 0

    def fits(self) -> list[int]:
        """Tensor sizes that divide every dim this analysis splits."""
        g = 0
        for _, size in self.needs:
            g = math.gcd(g, size)
        return [d for d in range(1, (g or 1) + 1) if (g or 1) % d == 0]


class _Restart(Exception):
    pass


def _shapes(model: Any, example: Mapping[str, Any] | None, batch: int) -> tuple[dict[str, tuple], set[str]]:
    """Every value's shape (abstract evaluation) and the set of traced (non-concrete) values."""
    graph, registry = model.graph, model.registry
    keep = static_names(graph, registry)
    example = dict(example or {})
    dyn: dict[str, Any] = {}
    static: dict[str, Any] = {}
    for sig in model.inputs:
        if sig.name in example:
            v = np.asarray(example[sig.name])
            (static if sig.name in model.value_inputs else dyn)[sig.name] = v
            continue
        if sig.name in model.value_inputs:
            raise ValueError(f"input '{sig.name}' is read at trace time; pass example feeds to the analysis")
        shape = tuple(d if isinstance(d, int) and d > 0 else batch for d in (sig.shape or ()))
        dyn[sig.name] = jax.ShapeDtypeStruct(shape, sig.dtype or np.float32)
    for name, init in graph.state_init.items():  # state variables are read like inputs
        dyn[name] = jax.ShapeDtypeStruct(np.shape(init), np.asarray(init).dtype)
    shapes: dict[str, tuple] = {}
    traced: set[str] = set()

    def fn(params: Any, inputs: Any) -> Any:
        env = dict(model._constants)
        env.update(params)
        env.update(inputs)
        env.update(static)
        for name, value in graph.initializers.items():
            env.setdefault(name, value)
        for node in graph.nodes:
            run_node(node, env, registry, graph.opsets, keep)
            for o in node.outputs:
                if o and o in env and hasattr(env[o], "shape"):
                    shapes[o] = tuple(env[o].shape)
                    if not is_concrete(env[o]):
                        traced.add(o)
        return 0

    pshapes = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in model.params.items()}
    jax.eval_shape(fn, pshapes, {k: v for k, v in dyn.items()})
    for k, v in {**pshapes, **dyn}.items():
        shapes[k] = tuple(v.shape)
    traced |= set(dyn)
    return shapes, traced


def analyze(model: Any, tensor: int | None = None, *, example: Mapping[str, Any] | None = None,
            batch: int = 2) -> Analysis:
    """Find the tensor-parallel split of ``model``'s params for a ``tensor``-way axis.

    ``tensor=None`` ignores divisibility (reports every dim it would split in
    ``needs``); an int only splits dims it divides and lists the others in
    ``unsplittable``.
    """
    shapes, traced = _shapes(model, example, batch)
    params = set(model.params)
    blocked: set[int] = set()
    forced: set[str] = set()
    unsplit: list[tuple[str, int]] = []  # kept across restarts: a failed carry blocks its origin
    for it in range(1, 200):
        try:
            a = _propagate(model.graph.nodes, model.graph.output_names, shapes, traced, params, tensor, blocked,
                           forced, unsplit)
        except _Restart:
            continue
        a.iterations = it
        a.unsplittable = list(dict.fromkeys(a.unsplittable))
        a.rules = compress_rules(a.param_dims, {k: len(shapes[k]) for k in params})
        return a
    raise RuntimeError("tensor-parallel analysis did not converge")  # pragma: no cover


def _propagate(nodes: Sequence[Node], outputs: Sequence[str], shapes: dict[str, tuple], traced: set[str],
               params: set[str], tensor: int | None, blocked: set[int], forced: set[str],
               unsplit: list[tuple[str, int]]) -> Analysis:
    state: dict[str, tuple[int, frozenset]] = {}  # value -> (split dim, origins) for split values
    alias: dict[str, tuple[str, tuple[int, ...]]] = {p: (p, tuple(range(len(shapes[p])))) for p in params}
    pdims: dict[str, int] = {}
    needs: list[tuple[str, int]] = []
    colls: list[str] = []
    pairs: list[tuple[str, str]] = []
    col_label: dict[int, str] = {}

    def divides(size: int, why: str) -> bool:
        if tensor is None:
            needs.append((why, size))
            return True
        if size % tensor == 0:
            needs.append((why, size))
            return True
        unsplit.append((why, size))
        return False

    def assign(name: str, dim: int | None) -> bool:
        """Split the param behind alias ``name`` at alias dim ``dim``; False if forced replicated."""
        p, perm = alias[name]
        if p in forced:
            return False
        pd = perm[dim]
        old = pdims.get(p)
        if old is not None and old != pd:
            forced.add(p)
            raise _Restart
        pdims[p] = pd
        return True

    def gather_point(name: str, why: str) -> None:
        d, origins = state[name]
        colls.append(f"{why}: '{name}' split on dim {d}")
        if origins - blocked:
            blocked.update(origins)
            raise _Restart

    def split(v: str) -> int | None:
        s = state.get(v)
        return None if s is None else s[0]

    def origins_of(*vs: str) -> frozenset:
        out: frozenset = frozenset()
        for v in vs:
            if v in state:
                out |= state[v][1]
        return out

    def rank(v: str) -> int:
        return len(shapes.get(v, ()))

    def set_out(o: str, d: int | None, origins: frozenset) -> None:
        if o and d is not None and o in traced:
            state[o] = (d, origins)

    def matmul(idx: int, node: Node, a: str, b: str, out: str, trans_a: bool = False, trans_b: bool = False) -> None:
        da, db = split(a), split(b)
        ra, rb = rank(a), rank(b)
        if b in alias and a not in alias:
            if trans_a and da is not None:
                gather_point(a, f"{node.op_type} transA")
                return
            if rb != 2:
                if da is not None:
                    gather_point(a, f"{node.op_type} with rank-{rb} weight")
                return
            kdim, ndim = (1, 0) if trans_b else (0, 1)
            if da is None:
                n = shapes[b][ndim]
                if idx not in blocked and divides(n, f"{node.label} output features") and assign(b, ndim):
                    col_label[idx] = node.label
                    set_out(out, rank(out) - 1, frozenset({idx}))
                return
            if da == ra - 1:
                if assign(b, kdim):
                    for o in state[a][1]:
                        if o in col_label:
                            pairs.append((col_label[o], node.label))
                    return
                gather_point(a, f"{node.label}: weight '{alias[b][0]}' must stay replicated")
                return
            set_out(out, da + rank(out) - ra, state[a][1])
            return
        if a in alias and b in alias:
            return
        if a in alias:
            if db is not None:
                gather_point(b, f"{node.label}: weight on the left")
            return
        if da is None and db is None:
            return
        ro = rank(out)
        od_a = od_b = None
        contract_a = contract_b = False
        if da is not None:
            if da == ra - 1:
                contract_a = True
            elif da == ra - 2:
                od_a = ro - 2
            else:
                od_a = da + ro - ra
        if db is not None:
            if db == rb - 2 or (rb == 1):
                contract_b = True
            elif db == rb - 1:
                od_b = ro - 1
            else:
                od_b = db + ro - rb
        if contract_a or contract_b:
            if (contract_a and (db is None or contract_b)) or (contract_b and da is None):
                colls.append(f"{node.label}: contraction over a split dim (all-reduce)")
                return
            gather_point(a if da is not None else b, f"{node.label}: mixed splits")
            return
        if od_a is not None and od_b is not None and od_a != od_b:
            gather_point(a, f"{node.label}: operands split on different dims")
            return
        set_out(out, od_a if od_a is not None else od_b, origins_of(a, b))

    for idx, node in enumerate(nodes):
        op = node.op_type
        ins = [i for i in node.inputs]
        live = [i for i in ins if i and i in state]
        outs = [o for o in node.outputs if o]
        if op in ("Transpose", "Identity", "Cast") and ins and ins[0] in alias and ins[0] not in state:
            p, perm = alias[ins[0]]
            new = tuple(perm[j] for j in node.attrs.get("perm", reversed(range(len(perm))))) if op == "Transpose" else perm
            alias[outs[0]] = (p, new)
            continue
        if not live:
            # replicated inputs: only decisions that create splits matter
            if op == "MatMul" and len(ins) == 2:
                matmul(idx, node, ins[0], ins[1], outs[0])
            elif op == "Gemm":
                _gemm(idx, node, ins, outs, matmul, split, state, alias, assign, shapes)
            elif op == "Gather" and ins[0] in alias and int(node.attrs.get("axis", 0)) == 0 and rank(ins[0]) == 2:
                v = shapes[ins[0]][0]
                if v >= MIN_EMBEDDING_ROWS and divides(v, f"{node.label} embedding rows") and assign(ins[0], 0):
                    colls.append(f"{node.label}: embedding split by rows (all-reduce)")
            elif op == "Conv" and len(ins) >= 2 and ins[1] in alias:
                o_dim, _ = _conv_dims(node, rank(ins[1]))
                cout = shapes[ins[1]][o_dim]
                if int(node.attrs.get("group", 1)) == 1 and idx not in blocked and divides(cout, f"{node.label} out channels") \
                        and assign(ins[1], o_dim):
                    if len(ins) > 2 and ins[2] and ins[2] in alias:
                        assign(ins[2], 0)
                    col_label[idx] = node.label
                    set_out(outs[0], 1, frozenset({idx}))
            continue
        d0 = split(live[0])
        if op in _UNARY:
            if ins[0] in state:
                for o in outs[:1]:
                    set_out(o, d0, state[ins[0]][1])
            else:
                gather_point(live[0], f"{node.label}: split on a parameter input")
        elif op in _NARY:
            ro = rank(outs[0])
            dims = {split(v) + ro - rank(v) for v in live}
            if len(dims) > 1:
                gather_point(live[0], f"{node.label}: operands split on different dims")
            od = dims.pop()
            for v in ins:
                if v and v in alias:
                    pd = od - (ro - rank(v))
                    if pd >= 0 and shapes[v][pd] > 1 and not assign(v, pd):
                        pass  # replicated param: sliced locally
            set_out(outs[0], od, origins_of(*live))
        elif op in ("Softmax", "LogSoftmax", "Hardmax"):
            axis = int(node.attrs.get("axis", -1)) % rank(ins[0])
            if d0 == axis:
                gather_point(ins[0], f"{node.label} over the split dim")
            set_out(outs[0], d0, state[ins[0]][1])
        elif op in ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"):
            axis = int(node.attrs.get("axis", -1)) % rank(ins[0])
            if ins[0] not in state or d0 >= axis:
                gather_point(live[0], f"{node.label} normalizes over the split dim")
            set_out(outs[0], d0, state[ins[0]][1])
        elif op in ("BatchNormalization", "InstanceNormalization"):
            if ins[0] not in state or d0 != 1 and (op == "InstanceNormalization" or d0 >= 1):
                gather_point(live[0], f"{node.label} over the split dim")
            if d0 == 1:
                for v in ins[1:]:
                    if v and v in alias:
                        assign(v, 0)
            set_out(outs[0], d0, state[ins[0]][1])
        elif op in _SHAPE_CARRY:
            od = _carry(shapes[ins[0]], shapes[outs[0]], d0, tensor)
            if od is None and tensor is not None:
                free = _carry(shapes[ins[0]], shapes[outs[0]], d0, None)
                if free is not None:
                    unsplit.append((f"{node.label} split dim (e.g. attention heads)", shapes[outs[0]][free]))
            if od is None:
                gather_point(ins[0], f"{node.label} cannot carry the split")
            if od is not None and shapes[outs[0]][od] != shapes[ins[0]][d0]:
                divides(shapes[outs[0]][od], f"{node.label} split dim (e.g. attention heads)")
            set_out(outs[0], od, state[ins[0]][1])
        elif op == "Transpose":
            perm = list(node.attrs.get("perm", reversed(range(rank(ins[0])))))
            set_out(outs[0], perm.index(d0), state[ins[0]][1])
        elif op in _SAME_DIM_IF_UNCHANGED:
            if ins[0] not in state:
                gather_point(live[0], f"{node.label}: split on a shape input")
            ro, ri = rank(outs[0]), rank(ins[0])
            od = d0 + ro - ri
            if shapes[outs[0]][od] != shapes[ins[0]][d0]:
                gather_point(ins[0], f"{node.label} changes the split dim")
            set_out(outs[0], od, state[ins[0]][1])
        elif op == "Split":
            axis = int(node.attrs.get("axis", 0)) % rank(ins[0])
            if ins[0] not in state or d0 == axis:
                gather_point(live[0], f"{node.label} along the split dim")
            for o in outs:
                set_out(o, d0, state[ins[0]][1])
        elif op == "Concat":
            axis = int(node.attrs.get("axis", 0)) % rank(outs[0])
            dims = {split(v) for v in live}
            if len(dims) > 1 or axis in dims:
                gather_point(live[0], f"{node.label} along/with mixed split dims")
            set_out(outs[0], dims.pop(), origins_of(*live))
        elif op == "Gather":
            axis = int(node.attrs.get("axis", 0)) % rank(ins[0])
            if ins[0] not in state or d0 == axis:
                gather_point(live[0], f"{node.label} on the split dim")
            ri = rank(ins[1])
            set_out(outs[0], d0 if d0 < axis else d0 - 1 + ri, state[ins[0]][1])
        elif op == "MatMul":
            matmul(idx, node, ins[0], ins[1], outs[0])
        elif op == "Gemm":
            _gemm(idx, node, ins, outs, matmul, split, state, alias, assign, shapes)
        elif op == "Conv" and len(ins) >= 2 and ins[1] in alias and ins[0] in state and d0 == 1:
            group = int(node.attrs.get("group", 1))
            o_dim, i_dim = _conv_dims(node, rank(ins[1]))
            if group == 1:
                if not assign(ins[1], i_dim):
                    gather_point(ins[0], f"{node.label}: weight must stay replicated")
                for o in state[ins[0]][1]:
                    if o in col_label:
                        pairs.append((col_label[o], node.label))
            else:  # grouped/depthwise: groups follow the channel split
                if group % (tensor or 1) or not assign(ins[1], o_dim):
                    gather_point(ins[0], f"{node.label}: groups not divisible")
                if len(ins) > 2 and ins[2] in alias:
                    assign(ins[2], 0)
                set_out(outs[0], 1, state[ins[0]][1])
        elif op in _POOL or op in ("Resize", "Upsample", "LRN", "DepthToSpace") and op != "DepthToSpace":
            if ins[0] not in state or d0 > 1 or op == "LRN" and d0 == 1:
                gather_point(live[0], f"{node.label} over the split dim")
            set_out(outs[0], d0, state[ins[0]][1])
        elif op in _REDUCE:
            r = rank(ins[0])
            axes = node.attrs.get("axes")
            if axes is None and op in ("ArgMax", "ArgMin"):
                axes = [node.attrs.get("axis", 0)]
            if axes is None:
                so = shapes[outs[0]]
                si = shapes[ins[0]]
                keep = len(so) == len(si)
                axes = [i for i in range(r) if keep and so[i] != si[i]] if keep else None
            keepdims = int(node.attrs.get("keepdims", 1))
            if axes is None or ins[0] not in state:
                gather_point(live[0], f"{node.label}: reduction axes unknown")
            axes = [int(x) % r for x in axes]
            if d0 in axes:
                gather_point(ins[0], f"{node.label} reduces the split dim")
            set_out(outs[0], d0 if keepdims else d0 - sum(1 for x in axes if x < d0), state[ins[0]][1])
        elif op in ("Shape", "Size"):
            continue
        else:
            gather_point(live[0], f"{node.label}: {op} has no tensor-parallel rule")
    return Analysis(pdims, [], needs, unsplit, colls, pairs)


def _gemm(idx, node, ins, outs, matmul, split, state, alias, assign, shapes) -> None:
    trans_a = bool(node.attrs.get("transA", 0))
    trans_b = bool(node.attrs.get("transB", 0))
    matmul(idx, node, ins[0], ins[1], outs[0], trans_a, trans_b)
    if len(ins) > 2 and ins[2] and ins[2] in alias and outs[0] in state and state[outs[0]][0] == 1:
        c = shapes[ins[2]]
        if len(c) >= 1 and c[-1] > 1:
            assign(ins[2], len(c) - 1)


def _conv_dims(node: Node, rank: int) -> tuple[int, int]:
    """(out-channel dim, in-channel dim) of a conv weight: OIHW for ONNX, HWIO for jaxinfer::Conv."""
    if node.domain == "jaxinfer":
        return rank - 1, rank - 2
    return 0, 1


def _carry(si: tuple, so: tuple, d: int, tensor: int | None) -> int | None:
    """Where a block split of input dim ``d`` lands after a reshape, or None."""
    before = math.prod(si[:d])
    cands = [e for e in range(len(so)) if math.prod(so[:e]) == before and so[e] > 1]
    for e in cands:
        if so[e] == si[d]:
            return e
    for e in cands:
        n = so[e]
        if n >= si[d]:  # merge: [.., H, Dh] -> [.., H*Dh] (the split dim leads)
            if n % si[d] == 0:
                return e
        elif si[d] % n == 0 and (tensor is None or n % tensor == 0):  # split: [D] -> [H, Dh]
            return e
    return None


def compress_rules(param_dims: Mapping[str, int], ranks: Mapping[str, int]) -> Rules:
    """Rules for ``param_dims``, folding layer indices (``h3.`` -> ``h\\d+.``) where all matches agree."""

    def spec(name: str) -> P:
        d = param_dims.get(name)
        if d is None:
            return P()
        return P(*([None] * d + ["tensor"] + [None] * (ranks[name] - d - 1)))

    rules: Rules = []
    done: set[str] = set()
    names = sorted(ranks)
    for name in names:
        if name in done or name not in param_dims:
            continue
        generic = re.sub(r"\d+", r"\\d+", re.escape(name).replace(r"\d", "\0")).replace("\0", r"\d")
        want = spec(name)
        members = [n for n in names if re.fullmatch(generic, n)]
        if generic != re.escape(name) and all(spec(n) == want for n in members):
            rules.append((generic, want))
            done.update(members)
        else:
            rules.append((re.escape(name), want))
            done.add(name)
    return rules


def coerce_rules(rules: Iterable[Any]) -> tuple[tuple[str, P], ...]:
    """Rules from user data: ``(pattern, PartitionSpec | tuple | list | None)`` pairs or a mapping.

    Raises:
      ShardingConfigError: a rule that is not a (regex, spec) pair, a regex that does not compile, or a
        spec naming an axis that is not a mesh axis (or one axis twice).
    """
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
        raise ShardingConfigError(f"rules must be a list of (regex, spec) pairs or a mapping regex -> spec, "
                                  f"got {type(rules).__name__}")
    return tuple(_coerce_rule(item) for item in rules)


def _coerce_rule(item: Any) -> tuple[str, P]:
    """One ``(pattern, spec)`` rule, checked."""
    if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
        raise ShardingConfigError(f"rule {item!r}: expected a (regex, spec) pair such as "
                                  f"('.*mlp.up.weight', (None, 'tensor'))")
    pattern, spec = item
    if not isinstance(pattern, str):
        raise ShardingConfigError(f"rule {item!r}: the pattern must be a regex string, got {type(pattern).__name__}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ShardingConfigError(f"rule {item!r}: pattern {pattern!r} is not a valid regex ({e})") from None
    if spec is None:
        return pattern, P()
    if isinstance(spec, (str, bytes)) or not isinstance(spec, (P, Sequence)):
        raise ShardingConfigError(f"rule {item!r}: the spec must list one entry per dim (an axis name, a list of "
                                  f"axis names or None), e.g. (None, 'tensor'); got {spec!r}")
    entries = [None if s in (None, "None", "null") else (tuple(s) if isinstance(s, list) else s) for s in spec]
    seen: list[str] = []
    for entry in entries:
        names = entry if isinstance(entry, tuple) else (() if entry is None else (entry,))
        for a in names:
            if a not in AXES:
                raise ShardingConfigError(f"rule {item!r}: spec names axis {a!r}; mesh axes are {AXES}")
            if a in seen:
                raise ShardingConfigError(f"rule {item!r}: spec uses axis {a!r} for more than one dim")
            seen.append(a)
    return pattern, P(*entries)


def specs_from_rules(rules: Sequence[tuple[str, P]], params: Mapping[str, Any]) -> dict[str, P]:
    """Each param's PartitionSpec: the first rule that fullmatches its name; else replicated."""
    compiled = [(re.compile(p), s) for p, s in rules]
    out = {}
    for name in params:
        out[name] = next((s for rx, s in compiled if rx.fullmatch(name)), P())
    return out


def format_rules(rules: Sequence[tuple[str, P]]) -> str:
    """One rule per line, ready to paste back as Python."""
    width = max((len(repr(p)) for p, _ in rules), default=0)
    return "\n".join(f"({p!r},{' ' * (width - len(repr(p)))} {s!r})," for p, s in rules)
