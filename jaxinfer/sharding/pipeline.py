"""Pipeline parallelism: the graph cut into ``stages``, each on its own sub-mesh, GPipe micro-batches.

Cutting. The graph's topological order is cut only where the fewest traced
values cross (in a transformer: the residual stream, plus e.g. a mask), so
stages exchange little. Among those cut points a small dynamic program picks
the ``stages - 1`` that minimise the most expensive stage, where a node costs
its share of the model's FLOPs plus its share of the params bytes (our own
count from abstract shapes: 2·M·N·K for MatMul/Gemm, output size otherwise).

Placing. Stage ``s`` runs on the devices at index ``s`` of the ``stage`` axis
(a sub-mesh with the same data/expert/tensor axes); its params -- and only its
params -- live there, laid out by the same tensor-parallel analysis run on the
stage's sub-graph. A param two stages read (tied embeddings) is placed on both.

Running. Each stage is a :class:`ShardedModel` of its sub-graph with its own
jitted executable. The batch is split into ``micro_batches``; stage
executables are dispatched in GPipe order (clock ``t`` runs micro-batch
``t - s`` on stage ``s``) and activations move between sub-meshes with
``jax.device_put``; on accelerators dispatch is asynchronous, so stage ``s`` works
on micro-batch ``m`` while stage ``s+1`` works on ``m-1``. (On CPU jaxinfer runs
one-device computations inline, ``_config.py``, so one-device stages run in turn;
there they share the host's cores anyway: an 8-layer d512 GPT-2 on 8 simulated
devices took the same time at 2, 4 and 8 stages either way, within 6 %.) :meth:`PipelineModel.profile`
runs one thread per stage and records each micro-batch's start/end (blocking
on its outputs) to measure the bubble against GPipe's (S-1)/(M+S-1).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ..graph import Graph, ValueInfo, outer_names
from ..model import Model
from .config import AXES, MeshConfig, ShardingConfigError, build_mesh, divisors
from .values import Abstract, abstract_inputs, abstract_values

#: Ops costed as matrix products (2·output·K FLOPs).
_MATMUL = {"MatMul", "Gemm", "MatMulInteger", "MatMulIntegerNK", "FusedMatMul", "QLinearMatMul",
           "QLinearMatMulInt", "Einsum"}
#: Mixture-of-experts ops (com.microsoft MoE, jaxinfer StackedMoE): fc1 weights [experts, inter, hidden] at input 2.
_MOE = {"MoE", "StackedMoE"}


@dataclass(frozen=True)
class StageSplit:
    """Where a graph is cut: ``bounds[s]:bounds[s+1]`` are stage ``s``'s node indices."""

    bounds: tuple[int, ...]
    flops: tuple[float, ...]
    params_bytes: tuple[int, ...]
    crossing: int  # traced values crossing each cut
    cut_points: int  # how many places the graph could be cut

    @property
    def stages(self) -> int:
        return len(self.bounds) - 1


def node_costs(graph: Graph, values: Mapping[str, Abstract]) -> tuple[list[float], list[int]]:
    """(FLOPs, params bytes read) per top-level node, from abstract shapes."""
    flops, pbytes = [], []
    for node in graph.nodes:
        out = values.get(node.outputs[0]) if node.outputs and node.outputs[0] else None
        size = float(np.prod(out.shape)) if out is not None else 0.0
        if node.op_type in _MATMUL and node.inputs and node.inputs[0] in values:
            a = values[node.inputs[0]].shape
            k = a[0] if node.op_type == "Gemm" and int(node.attrs.get("transA", 0)) else (a[-1] if a else 1)
            size *= 2 * k
        elif node.op_type in ("Conv", "ConvTranspose") and len(node.inputs) > 1 and node.inputs[1] in values:
            w = values[node.inputs[1]].shape
            size *= 2 * float(np.prod(w[1:]))
        elif node.op_type in _MOE and len(node.inputs) > 2 and node.inputs[2] in values:
            # routed experts: each token through k experts' fc1 (+fc3) and fc2, 2 FLOPs per multiply-add
            mats = 3 if len(node.inputs) > 6 and node.inputs[6] else 2
            size *= 2 * int(node.attrs.get("k", 1)) * mats * values[node.inputs[2]].shape[1]
        flops.append(size)
        reads = {v for v in node.inputs if v} | {v for s in node.subgraphs() for v in outer_names(s)}
        pbytes.append(sum(values[v].nbytes for v in reads if v in values and values[v].param))
    return flops, pbytes


def crossings(graph: Graph, values: Mapping[str, Abstract]) -> list[int]:
    """``c[p]``: traced non-param values produced before node ``p`` and read at/after it (p = 1..n-1)."""
    n = len(graph.nodes)
    born: dict[str, int] = {v.name: 0 for v in graph.inputs}
    last: dict[str, int] = {}
    for i, node in enumerate(graph.nodes):
        for v in {v for v in node.inputs if v} | {v for s in node.subgraphs() for v in outer_names(s)}:
            last[v] = i
        for o in node.outputs:
            if o:
                born.setdefault(o, i + 1)
    for o in graph.output_names:
        last[o] = n
    diff = [0] * (n + 2)
    for v, b in born.items():
        info = values.get(v)
        if info is None or not info.traced or info.param or v not in last or last[v] < b:
            continue
        diff[b] += 1  # live over cut points b..last[v]
        diff[last[v] + 1] -= 1
    out, run = [], 0
    for p in range(n + 1):
        run += diff[p]
        out.append(run)
    return out


def narrow_cuts(graph: Graph, values: Mapping[str, Abstract], prefix: Sequence[float] | None = None
                ) -> tuple[list[int], int]:
    """(cut points where the fewest traced values cross, that number); ``prefix`` (cumulative node
    cost) drops cuts with nothing before or after them."""
    n = len(graph.nodes)
    cross = crossings(graph, values)
    inner = [p for p in range(1, n) if prefix is None or (prefix[p] > 0 and prefix[n] - prefix[p] > 0)]
    narrow = min((cross[p] for p in inner), default=0)
    return [p for p in inner if cross[p] == narrow], narrow


def split_stages(graph: Graph, values: Mapping[str, Abstract], stages: int) -> StageSplit:
    """Cut ``graph`` into ``stages`` balanced by FLOPs + params at its narrowest points.

    Raises:
      ShardingConfigError: when the graph has fewer narrow cut points than ``stages - 1``.
    """
    n = len(graph.nodes)
    flops, pbytes = node_costs(graph, values)
    tf, tp = sum(flops) or 1.0, sum(pbytes) or 1
    cost = [f / tf + b / tp for f, b in zip(flops, pbytes)]
    prefix = [0.0]
    for c in cost:
        prefix.append(prefix[-1] + c)
    cuts, narrow = narrow_cuts(graph, values, prefix)
    if stages - 1 > len(cuts):
        raise ShardingConfigError(
            f"stages={stages} but this graph can be cut in only {len(cuts)} place(s) where the fewest values "
            f"({narrow}) cross, i.e. between its layers; stages may be 1..{len(cuts) + 1}")
    points = [0] + cuts + [n]
    # best[j][s]: minimal max-stage cost covering nodes [0, points[j]) with s stages
    inf = float("inf")
    best = [[inf] * (stages + 1) for _ in points]
    back = [[0] * (stages + 1) for _ in points]
    best[0][0] = 0.0
    for j in range(1, len(points)):
        for s in range(1, stages + 1):
            for i in range(j):
                if best[i][s - 1] == inf:
                    continue
                v = max(best[i][s - 1], prefix[points[j]] - prefix[points[i]])
                if v < best[j][s]:
                    best[j][s], back[j][s] = v, i
    bounds, j = [n], len(points) - 1
    for s in range(stages, 0, -1):
        j = back[j][s]
        bounds.append(points[j])
    bounds.reverse()
    sf = tuple(sum(flops[a:b]) for a, b in zip(bounds, bounds[1:]))
    sp = tuple(int(sum(pbytes[a:b])) for a, b in zip(bounds, bounds[1:]))
    return StageSplit(tuple(bounds), sf, sp, narrow, len(cuts))


def _batch_dims(a: Mapping[str, Abstract], b: Mapping[str, Abstract]) -> dict[str, tuple]:
    """Each value's shape with dims that change with the batch size written as "batch"."""
    return {k: tuple("batch" if x != y else x for x, y in zip(v.shape, b[k].shape))
            for k, v in a.items() if k in b and len(v.shape) == len(b[k].shape)}


def batch_coupled(graph: Graph, values: Mapping[str, Abstract], dims: Mapping[str, tuple]) -> list[tuple[str, str]]:
    """(value, node label) of each traced value computed from batched inputs that has no batch dim itself:
    it depends on every row of the batch (a whole-tensor reduction such as DynamicQuantizeLinear's
    scale), so running micro-batches one by one would change it."""
    batched = {v.name for v in graph.inputs if "batch" in dims.get(v.name, ())}
    found = []
    for node in graph.nodes:
        reads = {v for v in node.inputs if v} | {v for s in node.subgraphs() for v in outer_names(s)}
        if not reads & batched:
            continue
        for o in (o for o in node.outputs if o and o in values):
            if "batch" in dims.get(o, ()):
                batched.add(o)
            elif values[o].traced:
                batched.add(o)
                found.append((o, f"{node.label} ({node.op_type})"))
    return found


def stage_graphs(graph: Graph, split: StageSplit, values: Mapping[str, Abstract],
                 shapes: Mapping[str, tuple]) -> list[Graph]:
    """One sub-graph per stage: boundary values in, values later stages (or the graph) read out."""
    nodes = graph.nodes
    reads_from: list[set[str]] = []
    for a, b in zip(split.bounds, split.bounds[1:]):
        reads: set[str] = set()
        for node in nodes[a:b]:
            reads |= {v for v in node.inputs if v} | {v for s in node.subgraphs() for v in outer_names(s)}
        reads_from.append(reads)
    out = []
    for s, (a, b) in enumerate(zip(split.bounds, split.bounds[1:])):
        made = {o for node in nodes[a:b] for o in node.outputs if o}
        later = set(graph.output_names).union(*reads_from[s + 1:])
        ins = sorted(v for v in reads_from[s] - made if v not in graph.initializers and not _is_param(values, v))
        outs = [o for node in nodes[a:b] for o in node.outputs if o and o in later]
        inits = {k: graph.initializers[k] for k in reads_from[s] if k in graph.initializers}
        for v in [v for v in ins if not values[v].traced and v not in graph.input_names]:
            if "batch" in shapes.get(v, ()) or values[v].value is None:
                raise ShardingConfigError(f"value '{v}' is computed at trace time from the batch size and read "
                                          f"across a stage cut; pipeline parallelism cannot pass it")
            inits[v] = values[v].value  # a trace-time constant: a constant of the stage that reads it
            ins.remove(v)

        def info(v: str) -> ValueInfo:
            return ValueInfo(v, shapes.get(v, values[v].shape), values[v].dtype)

        out.append(Graph(nodes[a:b], tuple(info(v) for v in ins), tuple(info(v) for v in outs), inits,
                         graph.opsets, f"{graph.name}.stage{s}", {}, graph.fmt))
    return out


def _is_param(values: Mapping[str, Abstract], name: str) -> bool:
    """A param the graph does not hold as an initializer (a quantized weight lives only in the params)."""
    return name in values and values[name].param


def _reads(graph: Graph) -> set[str]:
    """Every value ``graph``'s nodes (and their subgraphs) read."""
    return {v for node in graph.nodes for v in node.inputs if v} | \
        {v for node in graph.nodes for s in node.subgraphs() for v in outer_names(s)}


def _stage_mesh(mesh: Mesh, s: int) -> Mesh:
    devs = np.asarray(mesh.devices)[:, s:s + 1]
    return Mesh(devs, AXES, axis_types=mesh.axis_types)


@dataclass
class Profile:
    """One profiled pipelined run: ``timeline`` rows are (stage, micro_batch, start_s, end_s)."""

    stages: int
    micro_batches: int
    timeline: list[tuple[int, int, float, float]] = field(default_factory=list)

    @property
    def wall_s(self) -> float:
        return max(e for *_, e in self.timeline) - min(s for _, _, s, _ in self.timeline)

    @property
    def busy_s(self) -> list[float]:
        return [sum(e - b for st, _, b, e in self.timeline if st == s) for s in range(self.stages)]

    @property
    def bubble(self) -> float:
        """Idle share of stage-time: 1 - sum(busy) / (stages * wall)."""
        return 1.0 - sum(self.busy_s) / (self.stages * self.wall_s)

    @property
    def ideal_bubble(self) -> float:
        return (self.stages - 1) / (self.micro_batches + self.stages - 1)

    def summary(self) -> dict[str, Any]:
        return {"stages": self.stages, "micro_batches": self.micro_batches, "wall_s": self.wall_s,
                "busy_s": self.busy_s, "bubble": self.bubble, "ideal_bubble": self.ideal_bubble}


class PipelineModel(Model):
    """A Model run as ``stages`` sub-models on sub-meshes with a GPipe micro-batch schedule.

    ``stage_models[s]`` is stage ``s``'s :class:`ShardedModel` (its params on its
    sub-mesh only); ``split`` says where the graph was cut and what each stage costs.
    """

    def __init__(self, base: Model, mesh: Mesh, config: MeshConfig, split: StageSplit, stage_models: list[Any],
                 batch_dims: Mapping[str, tuple]):
        self.base = base
        self.mesh = mesh
        self.config = config
        self.split = split
        self.stage_models = stage_models
        self._batch_dims = dict(batch_dims)
        params: dict[str, Any] = {}
        for sm in stage_models:
            for k, v in sm.params.items():
                params.setdefault(k, v)
        super().__init__(base.graph, base.registry, params=params, source=base.source, check=False)

    @property
    def stages(self) -> int:
        return len(self.stage_models)

    # ------------------------------------------------------------ schedule
    def _micro_feeds(self, feeds: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The checked feeds split into ``micro_batches`` along their batch dim."""
        m = self.config.micro_batches
        batch = None
        for k, v in feeds.items():
            dims = self._batch_dims.get(k, ())
            if dims and dims[0] == "batch":
                batch = np.shape(v)[0]
                break
        if m == 1:
            return [dict(feeds)]
        if batch is None:
            raise ShardingConfigError(f"micro_batches={m} needs an input with a batch dim first; "
                                      f"inputs {[str(s) for s in self.inputs]} have none")
        if batch % m:
            raise ShardingConfigError(
                f"micro_batches={m} does not divide the batch {batch}; use a batch that is a multiple of {m}, "
                f"or micro_batches in {divisors(batch)}")
        size = batch // m
        data = self.mesh.shape["data"]
        if size % data:
            raise ShardingConfigError(
                f"micro-batches of {size} (batch {batch} / micro_batches={m}) do not split over data={data}; "
                f"use micro_batches in {[d for d in divisors(batch) if (batch // d) % data == 0]} or a smaller data size")
        return [{k: (v[i * size:(i + 1) * size] if self._batch_dims.get(k, ("",))[0] == "batch" else v)
                 for k, v in feeds.items()} for i in range(m)]

    def _executables(self, micro: Mapping[str, Any]) -> list[Any]:
        """Each stage's executable for one micro-batch's shapes (compiled once per shape)."""
        env = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype) for k, v in micro.items()}
        exes = []
        for sm in self.stage_models:
            feeds = {v.name: env[v.name] for v in sm.graph.inputs}
            exes.append(sm.compiled(feeds))
            outs = jax.eval_shape(lambda p, x, sm=sm: sm.fn(p, x), sm.params, feeds)
            env.update({k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in outs.items()})
        return exes

    def _stage_call(self, s: int, exe: Any, env: Mapping[str, Any]) -> dict[str, Any]:
        sm = self.stage_models[s]
        feeds = {v.name: env[v.name] for v in sm.graph.inputs}
        placed = {k: jax.device_put(v, sh) for k, (v, sh) in
                  ((k, (feeds[k], sh)) for k, sh in sm._input_shardings(feeds).items())}
        return exe(sm.params, placed)

    def run_micro(self, feeds: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Run every micro-batch through every stage (asynchronous GPipe dispatch); per micro-batch outputs."""
        micros = self._micro_feeds(self._check_inputs(feeds))
        exes = self._executables(micros[0])
        envs: list[dict[str, Any]] = [dict(m) for m in micros]
        S, M = self.stages, len(micros)
        for t in range(M + S - 1):  # clock t: stage s works on micro-batch t - s
            for s in range(S):
                m = t - s
                if 0 <= m < M:
                    envs[m].update(self._stage_call(s, exes[s], envs[m]))
        return [{o.name: env[o.name] for o in self.outputs} for env in envs]

    def run_device(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        parts = self.run_micro(feeds)
        if len(parts) == 1:
            return parts[0]
        return {k: self._join(k, [p[k] for p in parts], jnp.concatenate) for k in parts[0]}

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        parts = self.run_micro(feeds)
        host = [{k: np.asarray(v) for k, v in p.items()} for p in parts]
        return {k: self._join(k, [p[k] for p in host], np.concatenate) for k in host[0]}

    def _join(self, name: str, parts: list[Any], concat: Any) -> Any:
        dims = self._batch_dims.get(name, ())
        return concat(parts, axis=0) if dims and dims[0] == "batch" and len(parts) > 1 else parts[0]

    def compiled(self, feeds: Mapping[str, Any]) -> Any:
        """The per-stage executables for one micro-batch of these feeds (a list, one per stage)."""
        return self._executables(self._micro_feeds(self._check_inputs(feeds))[0])

    # ----------------------------------------------------------- profiling
    def profile(self, feeds: Mapping[str, Any]) -> Profile:
        """Run once with one thread per stage, blocking on each micro-batch's outputs to time it."""
        micros = self._micro_feeds(self._check_inputs(feeds))
        exes = self._executables(micros[0])
        S, M = self.stages, len(micros)
        envs: list[dict[str, Any]] = [dict(m) for m in micros]
        done = [[threading.Event() for _ in range(M)] for _ in range(S)]
        prof = Profile(S, M)
        lock = threading.Lock()
        errors: list[BaseException] = []

        def worker(s: int) -> None:
            try:
                for m in range(M):
                    if s:
                        done[s - 1][m].wait()
                        if errors:
                            return
                    start = time.perf_counter()
                    out = jax.block_until_ready(self._stage_call(s, exes[s], envs[m]))
                    end = time.perf_counter()
                    with lock:
                        envs[m].update(out)
                        prof.timeline.append((s, m, start, end))
                    done[s][m].set()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                errors.append(e)
                for ev in done[s]:
                    ev.set()

        jax.block_until_ready(self._stage_call(0, exes[0], envs[0]))  # warm: first call allocates
        threads = [threading.Thread(target=worker, args=(s,), daemon=True) for s in range(S)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        prof.timeline.sort(key=lambda r: r[2])
        return prof

    # ------------------------------------------------------------ reporting
    def per_device_params_bytes(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for sm in self.stage_models:
            for d, b in sm.per_device_params_bytes().items():
                out[d] = out.get(d, 0) + b
        return out

    def stage_devices(self, s: int) -> set[Any]:
        return set(np.asarray(self.stage_models[s].mesh.devices).flat)

    def measure(self, feeds: Mapping[str, Any], *, timed: bool = True, repeats: int = 3) -> dict[str, Any]:
        """The figures :func:`jaxinfer.sharding.measure` reports, for a pipeline: memory and collectives
        per stage (max / sum), latency of the whole micro-batched run."""
        from .hlo import collectives
        from .plan import COLLECTIVE_LATENCY, LINK_BW, MEM_BW, PEAK_FLOPS, _cost

        t0 = time.perf_counter()
        exes = self.compiled(feeds)
        compile_s = time.perf_counter() - t0
        mems = [e.memory_analysis() for e in exes]
        costs = [_cost(e) for e in exes]
        colls = [collectives(e) for e in exes]
        M = self.config.micro_batches
        per = self.per_device_params_bytes()
        counts: dict[str, int] = {}
        for c in colls:
            for k, v in c.counts.items():
                if v:
                    counts[k] = counts.get(k, 0) + v
        stage_s = [(f / PEAK_FLOPS + b / MEM_BW + c.total_bytes / LINK_BW + c.total * COLLECTIVE_LATENCY)
                   for (f, b), c in zip(costs, colls)]
        out = dict(per_device_params_bytes=max(per.values()) if per else 0,
                   argument_bytes=max(int(m.argument_size_in_bytes) for m in mems),
                   temp_bytes=max(int(m.temp_size_in_bytes) for m in mems),
                   output_bytes=max(int(m.output_size_in_bytes) for m in mems),
                   flops=M * sum(f for f, _ in costs), bytes_accessed=M * sum(b for _, b in costs),
                   collectives=counts, collective_bytes=M * sum(c.total_bytes for c in colls),
                   compile_s=compile_s, latency_s=None,
                   estimate_s=(M + self.stages - 1) * max(stage_s))  # GPipe: M + S - 1 clocks of the slowest stage
        if timed:
            jax.block_until_ready(self.run_device(feeds))
            times = []
            for _ in range(max(1, repeats)):
                t = time.perf_counter()
                jax.block_until_ready(self.run_device(feeds))
                times.append(time.perf_counter() - t)
            out["latency_s"] = statistics.median(times)
        return out

    def info(self) -> dict[str, Any]:
        d = super().info()
        per = self.per_device_params_bytes()
        d.update(mesh=dict(self.mesh.shape), config=str(self.config), stage_bounds=list(self.split.bounds),
                 stage_flops=list(self.split.flops), stage_params_bytes=list(self.split.params_bytes),
                 per_device_params_bytes=max(per.values()) if per else 0)
        return d

    def __repr__(self) -> str:
        return (f"PipelineModel({self.source or self.graph.name!r}, stages={self.stages}, "
                f"micro_batches={self.config.micro_batches}, mesh={dict(self.mesh.shape)})")


def pipeline(base: Model, cfg: MeshConfig, devices: Sequence[Any], *, example: Mapping[str, Any] | None = None,
             params: Mapping[str, Any] | None = None) -> PipelineModel:
    """Cut ``base`` into ``cfg.stage`` stages over ``devices`` (see the module docstring)."""
    from .expert import expert_registry, expert_specs, moe_nodes
    from .sharded import ShardedModel, _spec_ok, tensor_specs

    if base.value_inputs:
        raise ShardingConfigError(f"pipeline parallelism needs inputs that are not read at trace time; "
                                  f"{list(base.value_inputs)} are")
    if base.stateful:
        raise ShardingConfigError("pipeline parallelism does not support models with state variables")
    if cfg.micro_batches < 1:
        raise ShardingConfigError(f"micro_batches must be a positive integer, got {cfg.micro_batches}")
    src = base.params if params is None else {k: jax.tree.map(np.asarray, v) for k, v in params.items()}
    probe = base if params is None else base.with_params(src)
    values = abstract_values(probe, abstract_inputs(probe, 2))
    dims = _batch_dims(values, abstract_values(probe, abstract_inputs(probe, 3)))
    coupled = batch_coupled(base.graph, values, dims) if cfg.micro_batches > 1 else []
    if coupled:
        value, node = coupled[0]
        raise ShardingConfigError(
            f"micro_batches={cfg.micro_batches}: value '{value}' of node {node} depends on every row of the batch "
            f"(+{len(coupled) - 1} more such values), so running micro-batches one at a time would change the "
            f"results; use micro_batches=1 for this model")
    mesh = build_mesh(cfg, devices)
    if cfg.schedule in ("auto", "stacked"):
        from .stacked import stacked_pipeline

        stacked, why = stacked_pipeline(base, cfg, mesh, values, dims, narrow_cuts(base.graph, values)[0], src)
        if stacked is not None:
            return stacked
        if cfg.schedule == "stacked":
            raise ShardingConfigError(f"schedule='stacked' does not apply: {why}; use schedule='stages'")
    split = split_stages(base.graph, values, cfg.stage)
    stage_cfg = replace(cfg, stage=1)
    models = []
    for s, g in enumerate(stage_graphs(base.graph, split, values, dims)):
        reads = _reads(g)
        sub = Model(g, base.registry, params={k: v for k, v in src.items() if k in g.initializers or k in reads},
                    source=base.source, check=False)
        sub_mesh = _stage_mesh(mesh, s)
        ex = None if example is None else {k: v for k, v in example.items() if k in sub.value_inputs}
        specs, analysis = tensor_specs(sub, stage_cfg, len(devices) // cfg.stage, example=ex)
        registry = None
        if cfg.expert > 1 and moe_nodes(g):  # this stage's experts split over its sub-mesh's expert axis
            specs.update(expert_specs(sub, cfg.expert))
            registry = expert_registry(sub.registry, sub_mesh)
        for name, spec in specs.items():
            _spec_ok(name, tuple(np.shape(sub.params[name])), spec, sub_mesh)
        sm = ShardedModel(sub, sub_mesh, stage_cfg, specs, analysis, registry=registry)
        sm.replicated_inputs = frozenset(v.name for v in g.inputs if dims.get(v.name, ("",))[:1] != ("batch",))
        models.append(sm)
    return PipelineModel(base, mesh, cfg, split, models, dims)
