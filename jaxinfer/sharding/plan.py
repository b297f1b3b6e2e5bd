"""Plan search: enumerate data×stage×expert×tensor factorizations, compile each,
read XLA's memory and cost analyses (and, where cheap, time a few runs), drop
what exceeds the memory limit, rank the rest.

``plan(model, devices=8, batch=8).best`` is a config ``shard`` accepts;
``.rows`` holds every candidate with its figures, best first; ``.table()``
prints them.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import jax
import numpy as np

from ..checks import is_int
from .config import MeshConfig, ShardingConfigError, enumerate_configs, parse_config, pick_devices
from .hlo import collectives

#: Rough per-device figures used only when a candidate is not timed.
PEAK_FLOPS = 2e10
MEM_BW = 1e10
LINK_BW = 5e9
COLLECTIVE_LATENCY = 2e-5


@dataclass
class PlanRow:
    config: dict[str, Any]
    ok: bool = True
    reason: str = ""
    per_device_params_bytes: int = 0
    argument_bytes: int = 0
    temp_bytes: int = 0
    output_bytes: int = 0
    flops: float = 0.0
    bytes_accessed: float = 0.0
    collectives: dict[str, int] = field(default_factory=dict)
    collective_bytes: int = 0
    compile_s: float = 0.0
    latency_s: float | None = None
    estimate_s: float = 0.0

    @property
    def mesh(self) -> str:
        c = self.config
        return "x".join(f"{a[0]}{c.get(a, 1)}" for a in ("data", "stage", "expert", "tensor"))

    @property
    def score(self) -> float:
        return self.latency_s if self.latency_s is not None else self.estimate_s


@dataclass
class Plan:
    rows: list[PlanRow]
    devices: int
    batch: int

    @property
    def best(self) -> dict[str, Any] | None:
        ok = [r for r in self.rows if r.ok]
        return dict(ok[0].config) if ok else None

    def table(self) -> str:
        head = f"{'rank':>4} {'mesh':14} {'params/dev':>11} {'temp':>10} {'GFLOP':>7} {'colls':>5} {'coll B':>9} " \
               f"{'compile s':>9} {'latency ms':>10} {'est ms':>8}  note"
        lines = [head]
        for i, r in enumerate(self.rows, 1):
            lat = f"{r.latency_s * 1e3:10.2f}" if r.latency_s is not None else f"{'-':>10}"
            lines.append(f"{i if r.ok else '-':>4} {r.mesh:14} {r.per_device_params_bytes:11d} {r.temp_bytes:10d} "
                         f"{r.flops / 1e9:7.3f} {sum(r.collectives.values()):5d} {r.collective_bytes:9d} "
                         f"{r.compile_s:9.2f} {lat} {r.estimate_s * 1e3:8.2f}  {r.reason}")
        return "\n".join(lines)

    def to_json(self) -> str:
        return json.dumps({"devices": self.devices, "batch": self.batch, "best": self.best,
                           "rows": [asdict(r) for r in self.rows]}, indent=1, default=str)


def example_feeds(model: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random feeds for ``model``'s signature with symbolic dims set to ``batch``."""
    rs = np.random.RandomState(seed)
    feeds = {}
    for s in model.inputs:
        shape = tuple(d if isinstance(d, int) and d > 0 else batch for d in (s.shape or ()))
        dt = np.dtype(s.dtype or np.float32)
        if dt.kind in "iu":
            feeds[s.name] = rs.randint(0, 2, shape).astype(dt)
        elif dt.kind == "b":
            feeds[s.name] = rs.rand(*shape) > 0.5
        else:
            feeds[s.name] = rs.rand(*shape).astype(dt)
    return feeds


def _cost(exe: Any) -> tuple[float, float]:
    try:
        ca = exe.cost_analysis()
    except Exception:  # noqa: BLE001 - not every backend reports it
        return 0.0, 0.0
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    return float(ca.get("flops", 0.0)), float(ca.get("bytes accessed", 0.0))


def _call(sm: Any, exe: Any, placed: Mapping[str, Any]) -> Any:
    """One run of ``sm``'s executable (a stateful model's takes and returns its state; the state is kept)."""
    return exe(sm.params, sm.state, placed) if sm.stateful else exe(sm.params, placed)


def measure(sm: Any, feeds: Mapping[str, Any], *, timed: bool = True, repeats: int = 3) -> dict[str, Any]:
    """Compile ``sm`` for ``feeds`` and collect its figures (used by plan and the benchmark)."""
    if hasattr(sm, "measure"):  # a pipelined model measures its stages itself
        return sm.measure(feeds, timed=timed, repeats=repeats)
    checked = sm._check_inputs(feeds)
    t0 = time.perf_counter()
    exe = sm.compiled(checked)
    compile_s = time.perf_counter() - t0
    mem = exe.memory_analysis()
    flops, bytes_acc = _cost(exe)
    coll = collectives(exe)
    per = sm.per_device_params_bytes()
    out = dict(per_device_params_bytes=max(per.values()) if per else 0,
               argument_bytes=int(getattr(mem, "argument_size_in_bytes", 0) or 0),
               temp_bytes=int(getattr(mem, "temp_size_in_bytes", 0) or 0),
               output_bytes=int(getattr(mem, "output_size_in_bytes", 0) or 0),
               flops=flops, bytes_accessed=bytes_acc,
               collectives={k: v for k, v in coll.counts.items() if v}, collective_bytes=coll.total_bytes,
               compile_s=compile_s, latency_s=None)
    out["estimate_s"] = (flops / PEAK_FLOPS + bytes_acc / MEM_BW + coll.total_bytes / LINK_BW
                         + coll.total * COLLECTIVE_LATENCY)
    if timed:
        placed = sm.place_inputs(checked)
        jax.block_until_ready(_call(sm, exe, placed))  # warm
        times = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            jax.block_until_ready(_call(sm, exe, placed))
            times.append(time.perf_counter() - t)
        out["latency_s"] = statistics.median(times)
    return out


def plan(model: Any, devices: int | Sequence[Any] = 8, *, batch: int = 8, memory_limit: int | None = None,
         feeds: Mapping[str, Any] | None = None, timed: bool | int = True, repeats: int = 3,
         configs: Sequence[MeshConfig] | None = None, allow_stage: bool = False,
         micro_batches: int | None = None, finalists: int = 3) -> Plan:
    """Rank every mesh for ``model`` on ``devices``.

    Args:
      model: a loaded Model.
      devices: a device count (the first N of ``jax.devices()``) or a device list.
      batch: batch size for the symbolic batch dim (ignored when ``feeds`` given).
      memory_limit: per-device bytes (params + arguments + temporaries) a candidate may use.
      timed: True times ``repeats`` runs of each candidate; an int ``k`` times only the ``k``
        candidates the estimate ranks best; False ranks by the estimate alone (from
        cost_analysis and collective bytes).
      finalists: when timing, the fastest few are timed again, calls interleaved round-robin
        (``2 * repeats`` each), and ranked by that: one candidate timed while the host was
        busier cannot win or lose by it.
      configs: candidates to try (default: every factorization; expert sizes only when
        the model has a com.microsoft MoE op or an exported MoE pattern that ``moe_pattern``
        recognises).
      allow_stage: also try pipeline stages (with ``micro_batches``, default ``batch``
        split as finely as the data size allows).

    Returns:
      A :class:`Plan`; ``plan.best`` is a config dict for ``shard``.
    """
    from ..model import Model
    from .sharded import shard

    if not isinstance(model, Model):
        raise ShardingConfigError(f"plan() takes a jaxinfer.Model (from jaxinfer.load), got {type(model).__name__}")
    devs = pick_devices(devices)
    _check_plan_args(batch, memory_limit, timed, repeats, micro_batches, finalists)
    feeds = dict(feeds) if feeds is not None else example_feeds(model, batch)
    if configs is None:
        from .expert import has_experts

        configs = enumerate_configs(len(devs), allow_stage=allow_stage, allow_expert=has_experts(model))
        configs = [replace(c, micro_batches=micro_batches or max(1, batch // c.data)) if c.stage > 1 else c
                   for c in configs]
    configs = [parse_config(c) for c in configs]
    rows: list[PlanRow] = []
    for cfg in configs:
        try:
            cfg = cfg.resolved(len(devs))
        except ShardingConfigError:
            pass  # shard() raises it again below: a row with its reason
        d = {"data": cfg.data, "stage": cfg.stage, "expert": cfg.expert, "tensor": cfg.tensor}
        if cfg.stage > 1:
            d["micro_batches"] = cfg.micro_batches
        row = PlanRow(config=d)
        try:
            sm = shard(model, cfg, devices=devs)
            figures = measure(sm, feeds, timed=False)
            for k, v in figures.items():
                setattr(row, k, v)
            used = row.argument_bytes + row.temp_bytes + row.output_bytes
            if memory_limit is not None and used > memory_limit:
                row.ok, row.reason = False, f"over memory limit ({used} > {memory_limit} B per device)"
            elif timed is True:
                row.latency_s = measure(sm, feeds, timed=True, repeats=repeats)["latency_s"]
            del sm
        except Exception as e:  # noqa: BLE001 - an invalid mesh is a row with its reason
            row.ok, row.reason = False, f"{type(e).__name__}: {e}"[:500]
        rows.append(row)
    if not isinstance(timed, bool) and timed > 0:  # time the k best estimates
        ok = sorted((r for r in rows if r.ok), key=lambda r: r.estimate_s)
        _time_interleaved(model, ok[:timed], feeds, devs, repeats)
    elif timed is True and finalists > 1:
        ok = sorted((r for r in rows if r.ok and r.latency_s is not None), key=lambda r: r.latency_s)
        _time_interleaved(model, ok[:finalists], feeds, devs, 2 * repeats)
    # timed candidates first (by latency), then the rest by estimate
    rows.sort(key=lambda r: (not r.ok, r.latency_s is None, r.score))
    return Plan(rows, len(devs), batch)


def _check_plan_args(batch: Any, memory_limit: Any, timed: Any, repeats: Any, micro_batches: Any,
                     finalists: Any) -> None:
    """Refuse plan() arguments of the wrong type or range, naming what was expected."""
    for name, value, low in (("batch", batch, 1), ("repeats", repeats, 1), ("finalists", finalists, 0)):
        if not is_int(value) or value < low:
            raise ShardingConfigError(f"{name} must be an integer >= {low}, got {value!r}")
    if memory_limit is not None and (not is_int(memory_limit) or memory_limit < 0):
        raise ShardingConfigError(f"memory_limit must be a whole number of bytes per device (or None), "
                                  f"got {memory_limit!r}")
    if micro_batches is not None and (not is_int(micro_batches) or micro_batches < 1):
        raise ShardingConfigError(f"micro_batches must be a positive integer (or None), got {micro_batches!r}")
    if not isinstance(timed, (bool, np.bool_)) and (not is_int(timed) or timed < 0):
        raise ShardingConfigError(f"timed must be True, False or a count of candidates to time, got {timed!r}")


def _time_interleaved(model: Any, rows: Sequence[PlanRow], feeds: Mapping[str, Any], devs: list[Any],
                      runs: int) -> None:
    """Set each row's latency to the median of ``runs`` calls, the rows' calls interleaved round-robin."""
    from ..bench import interleaved
    from .sharded import shard

    if not rows:
        return
    models = [shard(model, r.config, devices=devs) for r in rows]
    calls = []
    for sm in models:
        if hasattr(sm, "measure"):  # a pipeline: its own micro-batched run
            calls.append(lambda sm=sm: jax.block_until_ready(sm.run_device(feeds)))
        else:
            checked = sm._check_inputs(feeds)
            exe, placed = sm.compiled(checked), sm.place_inputs(checked)
            calls.append(lambda exe=exe, sm=sm, placed=placed: jax.block_until_ready(_call(sm, exe, placed)))
    for row, ms in zip(rows, interleaved(calls, max(1, runs), warmup=1)):
        row.latency_s = ms / 1e3
