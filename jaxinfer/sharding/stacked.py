"""Pipeline over repeated identical layers: layers stacked, a ``shard_map`` loop with ``ppermute`` over ``stage``.

Exported transformers repeat one layer ``L`` times. When the graph has such a
run (found structurally: same ops, attributes and constants, params of equal
shapes in the same positions, one activation in and out), its params are
stacked to ``[L, ...]`` and split over ``stage`` (each stage holds ``L/S``
consecutive layers, and only those). One jitted function then runs:

* the prefix (embeddings) and suffix (final norm, head) as ordinary graph
  pieces (replicated over ``stage``);
* the layers as a GPipe loop inside ``jax.shard_map`` over ``stage`` (the other
  axes stay automatic): at clock ``t`` stage ``s`` applies its ``L/S`` layers
  (a ``lax.scan``) to micro-batch ``t - s`` and ``lax.ppermute`` hands the
  result to stage ``s + 1``; ``M + S - 1`` clocks for ``M`` micro-batches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import arith
from ..graph import Graph, Node, ValueInfo
from ..model import Model, split_initializers
from .config import MeshConfig, ShardingConfigError, divisors
from .sharded import params_bytes_per_device
from .values import Abstract


@dataclass(frozen=True)
class LayerRun:
    """``layers`` copies of nodes ``[start, start + length)``; ``params[l][k]`` is layer ``l``'s name
    for layer 0's ``k``-th param; ``inputs[l]``/``outputs[l]`` the activation in/out of layer ``l``."""

    start: int
    length: int
    layers: int
    params: tuple[tuple[str, ...], ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def stop(self) -> int:
        return self.start + self.length * self.layers


def _match(a: Sequence[Node], b: Sequence[Node], a_in: str, b_in: str, values: Mapping[str, Abstract],
           graph: Graph) -> list[tuple[str, str]] | None:
    """Param pairs (a's, b's) when node runs ``a`` and ``b`` compute the same function of ``a_in``/``b_in``."""
    mapped = {a_in: b_in}
    pairs: list[tuple[str, str]] = []
    for x, y in zip(a, b):
        if (x.op_type, x.domain, len(x.inputs), len(x.outputs)) != (y.op_type, y.domain, len(y.inputs), len(y.outputs)):
            return None
        if any(True for _ in x.subgraphs()) or dict(x.attrs) != dict(y.attrs):
            return None
        for u, v in zip(x.inputs, y.inputs):
            if not u or not v:
                if u != v:
                    return None
                continue
            if u in mapped:
                if mapped[u] != v:
                    return None
                continue
            iu, iv = values.get(u), values.get(v)
            if iu is None or iv is None:
                return None
            if iu.param and iv.param and iu.shape == iv.shape and iu.dtype == iv.dtype:
                pairs.append((u, v))
                mapped[u] = v
            elif not iu.traced and not iv.traced and iu.value is not None and iv.value is not None \
                    and iu.value.shape == iv.value.shape and np.array_equal(iu.value, iv.value):
                mapped[u] = v
            elif u == v and not iu.traced:
                continue
            else:
                return None  # another traced value (a mask, ...) read by the layer
        for u, v in zip(x.outputs, y.outputs):
            mapped[u] = v
    return pairs


def find_layers(graph: Graph, values: Mapping[str, Abstract], cuts: Sequence[int]) -> LayerRun | None:
    """The longest run of structurally identical layers between single-activation cut points, or None."""
    nodes = graph.nodes
    crossing: dict[int, str] = {}
    for p in cuts:
        live = {o for n in nodes[:p] for o in n.outputs if o} | set(graph.input_names)
        later = {v for n in nodes[p:] for v in n.inputs if v} | set(graph.output_names)
        acts = [v for v in live & later if values.get(v) is not None and values[v].traced and not values[v].param]
        if len(acts) == 1:
            crossing[p] = acts[0]
    points = sorted(crossing)
    best: LayerRun | None = None
    for i, a in enumerate(points):
        for b in points[i + 1:]:
            length = b - a
            layer_params = []
            ins, outs = [crossing[a]], []
            k = 0
            while True:
                s1 = a + (k + 1) * length
                if s1 + length > len(nodes) or s1 not in crossing or s1 + length not in crossing:
                    break
                pairs = _match(nodes[a:b], nodes[s1:s1 + length], crossing[a], crossing[s1], values, graph)
                if pairs is None:
                    break
                if not layer_params:
                    layer_params.append(tuple(p for p, _ in pairs))
                layer_params.append(tuple(q for _, q in pairs))
                ins.append(crossing[s1])
                outs.append(crossing[s1])
                k += 1
            layers = k + 1
            if layers < 2 or not layer_params:
                continue
            outs.append(crossing[a + layers * length])
            run = LayerRun(a, length, layers, tuple(layer_params), tuple(ins), tuple(outs))
            if best is None or (run.layers * run.length, -run.length) > (best.layers * best.length, -best.length):
                best = run
    return best


def _piece(graph: Graph, nodes: Sequence[Node], ins: Sequence[str], outs: Sequence[str],
           values: Mapping[str, Abstract], shapes: Mapping[str, tuple], name: str) -> Graph:
    reads = {v for n in nodes for v in n.inputs if v}
    inits = {k: graph.initializers[k] for k in reads if k in graph.initializers}
    info = [ValueInfo(v, shapes.get(v, values[v].shape), values[v].dtype) for v in ins]
    oinfo = [ValueInfo(v, shapes.get(v, values[v].shape), values[v].dtype) for v in outs]
    return Graph(tuple(nodes), tuple(info), tuple(oinfo), inits, graph.opsets, name, {}, graph.fmt)


class StackedPipelineModel(Model):
    """A Model whose repeated layers run as a ``shard_map`` + ``ppermute`` GPipe loop over ``stage``."""

    def __init__(self, base: Model, mesh: Mesh, config: MeshConfig, run: LayerRun, values: Mapping[str, Abstract],
                 shapes: Mapping[str, tuple], params: Mapping[str, Any]):
        g = base.graph
        self.base, self.mesh, self.config, self.layer_run = base, mesh, config, run
        prefix = _piece(g, g.nodes[:run.start], [v.name for v in g.inputs], [run.inputs[0]], values, shapes, "prefix")
        layer = _piece(g, g.nodes[run.start:run.start + run.length], [run.inputs[0]], [run.outputs[0]], values, shapes,
                       "layer")
        suffix_in = run.outputs[-1]
        suffix = _piece(g, g.nodes[run.stop:], [suffix_in] + [v.name for v in g.inputs],
                        [o for o in g.output_names], values, shapes, "suffix")
        self._prefix = Model(prefix, base.registry, params={}, check=False)
        self._layer = Model(layer, base.registry, params={}, check=False)
        self._suffix = Model(suffix, base.registry, params={}, check=False)
        S, L = config.stage, run.layers
        stage_spec = NamedSharding(mesh, P("stage"))
        rep = NamedSharding(mesh, P())
        stacked = {k: jax.device_put(np.stack([np.asarray(params[run.params[l][i]]) for l in range(L)]).reshape(
            (S, L // S) + np.shape(params[k])), stage_spec) for i, k in enumerate(run.params[0])}
        self._piece_params = {name: set(split_initializers(m.graph, m.registry)[1])
                              for name, m in (("prefix", self._prefix), ("suffix", self._suffix))}
        ends = self._piece_params["prefix"] | self._piece_params["suffix"]
        other = {k: jax.device_put(np.asarray(v), rep) for k, v in params.items() if k in ends}
        self.stacked_names = tuple(run.params[0])
        super().__init__(g, base.registry, params={**other, **{f"stacked:{k}": v for k, v in stacked.items()}},
                         source=base.source, check=False)
        self.fn = self._pipelined_fn()

    def _pipelined_fn(self) -> Any:
        run, mesh, cfg = self.layer_run, self.mesh, self.config
        S, M = cfg.stage, cfg.micro_batches
        pre, lay, suf = self._prefix, self._layer, self._suffix
        pre_names, suf_names = self._piece_params["prefix"], self._piece_params["suffix"]
        h_in, h_out = run.inputs[0], run.outputs[0]
        names = self.stacked_names
        graph_inputs = [v.name for v in self.graph.inputs]

        def layers_local(local: dict[str, Any], h: Any) -> Any:
            def one(x: Any, p: dict[str, Any]) -> tuple[Any, None]:
                return lay.fn(p, {h_in: x})[h_out], None

            return lax.scan(one, h, {k: v[0] for k, v in local.items()})[0]

        def loop(local: dict[str, Any], hs: Any) -> Any:
            s = lax.axis_index("stage")
            state = jnp.zeros_like(hs[0])
            outs = jnp.zeros_like(hs)

            def clock(t: Any, carry: tuple[Any, Any]) -> tuple[Any, Any]:
                state, outs = carry
                x = jnp.where(s == 0, lax.dynamic_index_in_dim(hs, jnp.minimum(t, M - 1), keepdims=False), state)
                y = layers_local(local, x)
                m = t - (S - 1)
                put = lax.dynamic_update_index_in_dim(outs, y, jnp.clip(m, 0, M - 1), 0)
                outs = jnp.where((s == S - 1) & (m >= 0), put, outs)
                state = lax.ppermute(y, "stage", [(i, i + 1) for i in range(S - 1)])
                return state, outs

            _, outs = lax.fori_loop(0, M + S - 1, clock, (state, outs))
            return lax.psum(jnp.where(s == S - 1, outs, jnp.zeros_like(outs)), "stage")

        piped = jax.shard_map(loop, mesh=mesh, in_specs=({k: P("stage") for k in names}, P()), out_specs=P(),
                              axis_names={"stage"}, check_vma=False)

        def fn(params: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
            h = pre.fn({k: params[k] for k in pre_names}, dict(inputs))[h_in]
            b = h.shape[0]
            if b % M:
                raise ShardingConfigError(f"micro_batches={M} does not divide the batch {b}; use a batch that is a "
                                          f"multiple of {M}, or micro_batches in {divisors(b)}")
            hs = jnp.reshape(h, (M, b // M) + h.shape[1:])
            y = piped({k: params[f"stacked:{k}"] for k in names}, hs).reshape(h.shape)
            feeds = {run.outputs[-1]: y, **{k: v for k, v in inputs.items() if k in graph_inputs}}
            return suf.fn({k: params[k] for k in suf_names}, feeds)

        return fn

    def place_inputs(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Inputs as the executable takes them (replicated: the prefix runs on every stage)."""
        return {k: v for k, v in feeds.items() if k not in self.value_inputs}

    def stage_of(self, device: Any) -> int:
        """The ``stage`` index of ``device`` in this mesh."""
        where = np.argwhere(np.asarray(self.mesh.devices) == device)
        return int(where[0][list(self.mesh.axis_names).index("stage")])

    def info(self) -> dict[str, Any]:
        d = super().info()
        per = self.per_device_params_bytes()
        d.update(mesh=dict(self.mesh.shape), config=str(self.config), schedule="stacked",
                 layers=self.layer_run.layers, per_device_params_bytes=max(per.values()) if per else 0)
        return d

    def __repr__(self) -> str:
        return (f"StackedPipelineModel({self.source or self.graph.name!r}, layers={self.layer_run.layers}, "
                f"stages={self.config.stage}, micro_batches={self.config.micro_batches})")

    def per_device_params_bytes(self) -> dict[int, int]:
        return params_bytes_per_device(self.params)


def stacked_pipeline(base: Model, cfg: MeshConfig, mesh: Mesh, values: Mapping[str, Abstract],
                     shapes: Mapping[str, tuple], cuts: Sequence[int],
                     params: Mapping[str, Any]) -> tuple[Model | None, str]:
    """(the stacked-layer pipeline, "") when it applies to ``base`` and ``cfg``, else (None, why not)."""
    if cfg.tensor > 1 or cfg.expert > 1 or cfg.data > 1:
        return None, (f"the stacked schedule runs stage-only meshes (data={cfg.data}, tensor={cfg.tensor}, "
                      f"expert={cfg.expert} given); the per-stage schedule combines stages with data/tensor/expert")
    quantized = sorted(k for k, v in params.items() if arith.is_quantized(v))
    if quantized:
        return None, (f"the stacked schedule stacks float params only; {len(quantized)} are quantized "
                      f"(e.g. '{quantized[0]}')")
    run = find_layers(base.graph, values, cuts)
    if run is None:
        return None, "the graph has no run of identical layers with one activation between them"
    if run.layers % cfg.stage:
        return None, (f"{run.layers} identical layers do not split into stages={cfg.stage}; "
                      f"stages that fit: {[d for d in divisors(run.layers) if d > 1]}")
    g = base.graph
    if set(g.output_names) & {o for n in g.nodes[:run.stop] for o in n.outputs}:
        return None, "a graph output is computed before the last repeated layer"
    return StackedPipelineModel(base, mesh, cfg, run, values, shapes, params), ""
