"""``shard(model, config)``: the same graph, params placed over a device mesh.

A ``ShardedModel`` is a ``Model`` whose params carry ``NamedSharding``s
(from the tensor-parallel rules) and whose compile step is
``jax.jit(..., in_shardings=..., out_shardings=...)``: inputs split over
``data`` on their leading (batch) dim. Ops stay sharding-agnostic; XLA's
SPMD partitioner inserts the collectives the param specs imply.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .. import arith, cpu_kernels
from ..graph import Node
from ..model import Model
from .config import AXES, MeshConfig, ShardingConfigError, build_mesh, divisors, parse_config, pick_devices
from .rules import Analysis, analyze, specs_from_rules


def place(value: Any, sharding: Any) -> Any:
    """Put a host/device array on ``sharding`` (multi-process safe: every process holds the same value).

    A quantized param (QArray, W8A8) takes the pytree of shardings :func:`param_sharding` gives for it.
    """
    if not isinstance(sharding, NamedSharding):
        return jax.tree.map(place, value, sharding)
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    arr = np.asarray(value)
    return jax.make_array_from_callback(arr.shape, sharding, lambda idx: arr[idx])


def _leaf_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """``spec`` for an array of ``shape`` that goes with the weight (a scale or zero point, broadcast along
    some dims): a dim keeps its axes only where the mesh splits it evenly."""
    out = []
    for dim, axes in enumerate(tuple(spec)[:len(shape)]):
        names = axes if isinstance(axes, tuple) else ((axes,) if axes is not None else ())
        n = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        out.append(axes if names and shape[dim] % n == 0 else None)
    return P(*out)


def param_sharding(value: Any, spec: P, mesh: Mesh) -> Any:
    """The sharding that lays ``value`` out as ``spec`` says (``spec`` speaks of the logical weight).

    A plain array gets one ``NamedSharding``; a quantized weight a pytree of them like its own: the int8
    values take ``spec`` (its last axis first for a W8A8 stored transposed), its scales and zero points the
    dims of ``spec`` they are not broadcast along, a static activation scale is replicated.
    """
    if isinstance(value, arith.W8A8):
        full = tuple(spec) + (None,) * (value.w.qvalue.ndim - len(spec))
        stored = P(full[-1], *full[:-1]) if value.transposed else spec  # output channels first
        act = None if value.act_scale is None else NamedSharding(mesh, P())
        return arith.W8A8(param_sharding(value.w, stored, mesh), act, value.transposed, value.act_unsigned)
    if isinstance(value, arith.QArray):
        zero = None if value.zero_point is None else NamedSharding(mesh, _leaf_spec(spec, value.zero_point.shape, mesh))
        return value.replace(qvalue=NamedSharding(mesh, spec),
                             scale=NamedSharding(mesh, _leaf_spec(spec, value.scale.shape, mesh)), zero_point=zero)
    return NamedSharding(mesh, spec)


def _host(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [_host(x) for x in v]
    if isinstance(v, jax.Array) and not v.is_fully_addressable:
        if not v.sharding.is_fully_replicated:
            raise ShardingConfigError("an output split across processes cannot be read on one host; "
                                      "shard with replicate_outputs=True")
        return np.asarray(v.addressable_data(0))
    return np.asarray(v)


def _spec_ok(name: str, shape: tuple, spec: P, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ShardingConfigError(f"param '{name}' has rank {len(shape)} but its spec {spec} has {len(spec)} entries")
    for dim, axes in enumerate(spec):
        if axes is None:
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        n = 1
        for a in names:
            if a not in mesh.shape:
                raise ShardingConfigError(f"param '{name}': spec {spec} names axis '{a}'; mesh axes are {AXES}")
            n *= mesh.shape[a]
        if shape[dim] % n:
            fits = [d for d in divisors(shape[dim])]
            raise ShardingConfigError(
                f"param '{name}' dim {dim} has size {shape[dim]}, not divisible by {'×'.join(names)} = {n}; "
                f"sizes that divide it: {fits}")


def params_bytes_per_device(params: Mapping[str, Any]) -> dict[int, int]:
    """Bytes of ``params`` each addressable device holds (device id -> bytes)."""
    out: dict[int, int] = {}
    for v in jax.tree.leaves(params):
        for s in v.addressable_shards:
            out[s.device.id] = out.get(s.device.id, 0) + s.data.nbytes
    return out


class ShardedModel(Model):
    """A Model laid over ``mesh``: ``param_specs`` beside the params, jit with shardings."""

    def __init__(self, base: Model, mesh: Mesh, config: MeshConfig, param_specs: Mapping[str, P],
                 analysis: Analysis | None = None, params: Mapping[str, Any] | None = None,
                 registry: Any = None):
        self.mesh = mesh
        self.config = config
        self.param_specs = dict(param_specs)
        self.analysis = analysis
        self.base = base
        self.chunk_segments: dict[tuple, list] = {}
        self.replicated_inputs: frozenset[str] = frozenset()  # inputs with no batch dim (pipeline stages)
        src = base.params if params is None else params
        placed = {k: place(v, param_sharding(v, self.param_specs.get(k, P()), mesh)) for k, v in src.items()}
        super().__init__(base.graph, base.registry if registry is None else registry, params=placed,
                         source=base.source, check=False)

    @property
    def rules(self) -> list:
        return list(self.config.rules or (self.analysis.rules if self.analysis else []))

    # ------------------------------------------------------------ shardings
    def input_spec(self, name: str, value: Any) -> P:
        nd = np.ndim(value)
        data = self.mesh.shape["data"]
        if data == 1 or nd == 0 or name in self.replicated_inputs:
            return P()
        b = np.shape(value)[0]
        if b % data:
            raise ShardingConfigError(
                f"input '{name}': batch {b} is not divisible by data={data}; use a batch that is a multiple "
                f"of {data}, or data in {divisors(b)}")
        return P("data")

    def _input_shardings(self, dynamic: Mapping[str, Any]) -> dict[str, NamedSharding]:
        return {k: NamedSharding(self.mesh, self.input_spec(k, v)) for k, v in dynamic.items()}

    def _compile(self, key: tuple, feeds: Mapping[str, Any]) -> Any:
        static = {k: v for k, v in feeds.items() if k in self.value_inputs}
        dynamic = {k: v for k, v in feeds.items() if k not in self.value_inputs}
        fn = self._chunked_fn(key, feeds) if self.config.chunk_size else self.fn
        pshard = jax.tree.map(lambda v: v.sharding, self.params)
        ishard = self._input_shardings(dynamic)
        abstract = {k: jax.ShapeDtypeStruct(np.shape(v), np.asarray(v).dtype if not hasattr(v, "dtype") else v.dtype,
                                            sharding=ishard[k]) for k, v in dynamic.items()}
        out_sh = NamedSharding(self.mesh, P()) if self.config.replicate_outputs else None
        start = time.perf_counter()
        # our CPU kernels are custom calls, which XLA's partitioner would gather whole onto every device
        with cpu_kernels.suppressed() if self.mesh.devices.size > 1 else contextlib.nullcontext():
            exe = self._lower(fn, static, pshard, ishard, abstract, out_sh)
        self.stats.compiles += 1
        self.stats.compile_seconds += time.perf_counter() - start
        self.stats.keys.append(key)
        return exe

    def _lower(self, fn: Any, static: Mapping[str, Any], pshard: Any, ishard: Any, abstract: Any, out_sh: Any) -> Any:
        """``fn`` jitted over the mesh's shardings, lowered and compiled."""
        stats = self.stats
        if self.stateful:
            sshard = {k: NamedSharding(self.mesh, P()) for k in self.state}

            def call(params: Any, state: Any, inputs: Any) -> Any:
                stats.traces += 1
                return fn(params, state, {**inputs, **static})

            jitted = jax.jit(call, in_shardings=(pshard, sshard, ishard),
                             out_shardings=None if out_sh is None else (out_sh, sshard))
            exe = jitted.lower(self.params, self.state, abstract).compile(self.compiler_options or None)
        else:
            def call(params: Any, inputs: Any) -> Any:  # type: ignore[misc]
                stats.traces += 1
                return fn(params, {**inputs, **static})

            jitted = jax.jit(call, in_shardings=(pshard, ishard), out_shardings=out_sh)
            exe = jitted.lower(self.params, abstract).compile(self.compiler_options or None)
        return exe

    def _chunked_fn(self, key: tuple, feeds: Mapping[str, Any]) -> Any:
        """This graph's fn with its row-local segments run over ``chunk_size``-row chunks."""
        from .chunking import make_chunked_fn, schedule
        from .values import abstract_values

        if self.stateful:
            raise ShardingConfigError("chunk_size does not support models with state variables; drop chunk_size")
        steps = schedule(self.graph, abstract_values(self, feeds), self.config.chunk_size)
        self.chunk_segments[key] = [s for s in steps if not isinstance(s, Node)]
        return make_chunked_fn(self.graph, self.registry, self._constants, steps, self.config.chunk_size,
                               self.mesh.shape["data"])

    # -------------------------------------------------------------- running
    def place_inputs(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        dynamic = {k: v for k, v in feeds.items() if k not in self.value_inputs}
        return {k: place(v, s) for k, s, v in ((k, s, dynamic[k]) for k, s in self._input_shardings(dynamic).items())}

    def run_device(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        feeds = self._check_inputs(feeds)
        exe = self.compiled(feeds)
        dynamic = self.place_inputs(feeds)
        if self.stateful:
            outs, self.state = exe(self.params, self.state, dynamic)
            return outs
        return exe(self.params, dynamic)

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        outs = self.run_device(feeds)
        return {s.name: _host(outs[s.name]) for s in self.outputs}

    # ------------------------------------------------------------ reporting
    def per_device_params_bytes(self) -> dict[int, int]:
        """Bytes of params each (addressable) device holds."""
        return params_bytes_per_device(self.params)

    def with_params(self, params: Mapping[str, Any]) -> ShardedModel:
        return ShardedModel(self.base, self.mesh, self.config, self.param_specs, self.analysis, params=params,
                            registry=self.registry)

    def info(self) -> dict[str, Any]:
        d = super().info()
        per = self.per_device_params_bytes()
        d.update(mesh=dict(self.mesh.shape), config=str(self.config),
                 per_device_params_bytes=max(per.values()) if per else 0,
                 rules=[(p, str(s)) for p, s in self.rules])
        return d

    def __repr__(self) -> str:
        return f"ShardedModel({self.source or self.graph.name!r}, mesh={dict(self.mesh.shape)})"


def shard(model: Model, config: Any = None, *, devices: int | Sequence[Any] | None = None,
          example: Mapping[str, Any] | None = None, **overrides: Any) -> Model:
    """Lay ``model`` over a device mesh.

    Args:
      model: a loaded :class:`~jaxinfer.Model` (or a ShardedModel, resharded).
      config: a MeshConfig, dict (long or short form), YAML path/text, or any
        frozen dataclass with the same fields; None means ``overrides`` only.
      devices: the devices to use (default ``jax.devices()``: all processes'), or a count of them.
      example: feeds for inputs read at trace time (shape inputs), if any.
      overrides: MeshConfig fields, e.g. ``tensor=4``.

    Returns:
      A :class:`ShardedModel` (or a pipelined model when ``stage > 1``).
    """
    if not isinstance(model, Model):
        raise ShardingConfigError(f"shard() takes a jaxinfer.Model (from jaxinfer.load), got {type(model).__name__}")
    cfg = parse_config(config if config is not None else {})
    if overrides:
        cfg = parse_config({**cfg.to_dict(), **({"rules": cfg.rules} if cfg.rules else {}), **overrides})
    base = model.base if isinstance(model, ShardedModel) else model
    params = model.params if isinstance(model, ShardedModel) else None
    devs = pick_devices(devices)
    cfg = cfg.resolved(len(devs))
    if cfg.expert > 1:
        from .expert import expert_specs, experts_model

        base, params = experts_model(base, params)  # exported MoE patterns -> StackedMoE nodes
        expert_specs(base, cfg.expert)  # the model has experts, and expert divides them (else a clear error)
    if cfg.stage > 1:
        from .pipeline import pipeline

        return pipeline(base, cfg, devs, example=example, params=params)
    _check_fixed_batch(base, cfg.data)
    mesh = build_mesh(cfg, devs)
    specs, analysis = tensor_specs(base, cfg, len(devs), example=example)
    registry = None
    if cfg.expert > 1:
        from .expert import expert_registry, expert_specs

        specs.update(expert_specs(base, cfg.expert))
        registry = expert_registry(base.registry, mesh)
    for name, spec in specs.items():
        _spec_ok(name, tuple(np.shape(base.params[name])), spec, mesh)
    return ShardedModel(base, mesh, cfg, specs, analysis, params=params, registry=registry)


def _check_fixed_batch(model: Model, data: int) -> None:
    """ShardingConfigError at shard time for an input whose fixed dim 0 ``data`` cannot split: every run
    would fail (a batch-1 TFLite model under the default config takes every device as ``data``)."""
    if data == 1:
        return
    for s in model.inputs:
        lead = s.shape[0] if s.kind == "tensor" and s.shape else None
        if isinstance(lead, int) and lead % data and s.name not in model.value_inputs:
            raise ShardingConfigError(
                f"input '{s.name}' has a fixed batch of {lead} ({s}), which data={data} cannot split; shard with "
                f"data in {divisors(lead)} (e.g. data=1 with tensor=N to use the devices)")


def tensor_specs(base: Model, cfg: MeshConfig, n_devices: int, *,
                 example: Mapping[str, Any] | None = None) -> tuple[dict[str, P], Analysis | None]:
    """Param specs from ``cfg.rules`` or, for ``tensor > 1``, the automatic analysis (checked)."""
    analysis = None
    if cfg.rules is not None:
        rules = list(cfg.rules)
    elif cfg.tensor > 1:
        analysis = analyze(base, cfg.tensor, example=example)
        if cfg.strict and analysis.unsplittable:
            free = analyze(base, None, example=example)
            bad = ", ".join(f"{why} = {size}" for why, size in analysis.unsplittable[:2])
            if len(analysis.unsplittable) > 2:
                bad += f", +{len(analysis.unsplittable) - 2} more"
            raise ShardingConfigError(
                f"tensor={cfg.tensor} does not divide the model dims tensor parallelism splits ({bad}); "
                f"tensor sizes that fit this model: {[d for d in free.fits() if n_devices % d == 0]} "
                f"(or pass strict=False to leave those params replicated)")
        if not analysis.param_dims:
            hint = (f" (its experts split over expert={cfg.expert}; e.g. {{'expert': {cfg.expert}, 'data': "
                    f"{cfg.data * cfg.tensor}}} instead)" if cfg.expert > 1 else "")
            raise ShardingConfigError(f"tensor={cfg.tensor}: found nothing in this graph to split over 'tensor'; "
                                      f"use data parallelism or pass explicit rules{hint}")
        rules = analysis.rules
    else:
        rules = []
    return specs_from_rules(rules, base.params), analysis
