"""Persistent compilation cache: first ``Model.run`` in a cold process vs in a second (warm) process.

Issue 4's figure: a second process loading the same model should start from JAX's persistent
compilation cache, its first call taking <= 20 % of a cold process's. For each model this script
spawns a fresh Python process twice with ``jax_compilation_cache_dir`` pointing at a new temporary
directory (cold: empty; warm: what the cold process wrote) and times, inside each child: the load,
the first ``run()`` (trace + lower + XLA compile or cache load + execute; with a stored executable
from jaxinfer/aot.py: just loading it + execute) and a second ``run()``.
JAX's monitoring events split the first call into jaxpr tracing, MLIR lowering and backend compile
time, and count persistent-cache hits (the load's own events are kept apart, under ``load_events``).

JAX only writes executables whose compile took longer than
``jax_persistent_cache_min_compile_time_secs`` (default 1 s); ``--min-compile-secs`` sets it (default 0:
everything, including the small eager programs jaxinfer's trace-time shape folding dispatches).
jaxinfer itself enables the cache only in ``jaxinfer.serve`` (serve/server.py enable_compilation_cache);
here the children get it through the ``JAX_COMPILATION_CACHE_DIR`` environment variable.

    python benchmarks/compile_cache.py                                    # bert_legacy fixture + resnet50
    python benchmarks/compile_cache.py --models cnn_qdq,gpt2_dynamo,squeezenet --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "onnx"
EVENTS = {
    "/jax/core/compile/jaxpr_trace_duration": "trace_s",
    "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
    "/jax/core/compile/backend_compile_duration": "backend_compile_s",
    "/jax/compilation_cache/cache_retrieval_time_sec": "cache_load_s",
}


def _model_path(name: str) -> str:
    """A fixture under tests/fixtures/onnx, else a path or an onnx-wheel CNN name (cli.resolve_model)."""
    fixture = FIXTURES / f"{name}.onnx"
    if fixture.exists():
        return str(fixture)
    from jaxinfer.cli import resolve_model

    return resolve_model(name)


def _feeds(model: Any, batch: int, seq: int) -> dict[str, Any]:
    """Random inputs for the model's signature: symbolic dims -> batch (first) or seq (later)."""
    import numpy as np

    rng = np.random.default_rng(0)
    feeds = {}
    for sig in model.inputs:
        shape = tuple((batch if i == 0 else seq) if isinstance(d, str) or d is None else int(d)
                      for i, d in enumerate(sig.shape))
        dtype = np.dtype(sig.dtype)
        if np.issubdtype(dtype, np.integer):
            high = 2 if "mask" in sig.name or "type" in sig.name else 100
            feeds[sig.name] = rng.integers(0, high, shape).astype(dtype)
        else:
            feeds[sig.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def child(name: str, batch: int, seq: int) -> dict[str, Any]:
    """Runs inside a spawned process: load, first and second run, with JAX's compile events."""
    t0 = time.perf_counter()
    import jax

    totals = {v: 0.0 for v in EVENTS.values()}
    counts = {"cache_hits": 0, "cache_misses": 0}

    def on_duration(event: str, secs: float, **_: Any) -> None:
        if event in EVENTS:
            totals[EVENTS[event]] += secs

    def on_event(event: str, **_: Any) -> None:
        key = event.rsplit("/", 1)[-1]
        if key in counts:
            counts[key] += 1

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    import jaxinfer
    from jaxinfer import aot

    t_import = time.perf_counter() - t0
    t = time.perf_counter()
    model = jaxinfer.load(_model_path(name))
    t_load = time.perf_counter() - t
    at_load = {**totals, **counts}  # load itself compiles: constant folding dispatches eager ops
    for k in totals:
        totals[k] = 0.0
    for k in counts:
        counts[k] = 0
    feeds = _feeds(model, batch, seq)
    t = time.perf_counter()
    model.run(feeds)
    first = time.perf_counter() - t
    t = time.perf_counter()
    model.run(feeds)
    second = time.perf_counter() - t
    return {"model": name, "import_s": t_import, "load_s": t_load, "first_run_s": first, "second_run_s": second,
            **totals, **counts, "load_events": at_load, "cache_dir": jax.config.jax_compilation_cache_dir,
            "stored": dict(aot.COUNTS)}


def _spawn(name: str, cache_dir: str, min_secs: float, batch: int, seq: int) -> dict[str, Any]:
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(min_secs))
    cmd = [sys.executable, __file__, "--child", name, "--batch", str(batch), "--seq", str(seq)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT, check=False)
    if proc.returncode:
        raise RuntimeError(f"{name}: child process failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_s"] = time.perf_counter() - t
    return row


def _dir_size(path: str) -> tuple[int, int]:
    files = [p for p in Path(path).rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def measure(name: str, repeats: int, min_secs: float, batch: int, seq: int) -> dict[str, Any]:
    pairs = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="jaxinfer-xla-") as cache:
            cold = _spawn(name, cache, min_secs, batch, seq)
            entries, size = _dir_size(cache)
            warm = _spawn(name, cache, min_secs, batch, seq)
        pairs.append({"cold": cold, "warm": warm, "cache_entries": entries, "cache_bytes": size})
    med = {kind: {k: statistics.median(p[kind][k] for p in pairs) for k, v in pairs[0][kind].items()
                  if isinstance(v, (int, float))} for kind in ("cold", "warm")}
    for kind, row in med.items():
        row["load_and_first_s"] = statistics.median(p[kind]["load_s"] + p[kind]["first_run_s"] for p in pairs)
    return {"model": name, "cold_first_run_s": med["cold"]["first_run_s"],
            "warm_first_run_s": med["warm"]["first_run_s"],
            "warm_over_cold": med["warm"]["first_run_s"] / med["cold"]["first_run_s"],
            "load_and_first_warm_over_cold": med["warm"]["load_and_first_s"] / med["cold"]["load_and_first_s"],
            "median": med, "cache_entries": statistics.median(p["cache_entries"] for p in pairs), "pairs": pairs}


def _source(stored: dict[str, int]) -> str:
    """Where a warm process's program came from (aot.COUNTS): a stored executable, an export, or a trace."""
    if stored.get("executable_loaded"):
        return "executable"
    if stored.get("export_loaded"):
        return "export (+ compile)"
    return "traced" if stored.get("exported") else "jit (not stored)"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Cold vs warm bars: the first run() alone, and load + first run() (time to first result)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(3 + 1.5 * len(rows), 4))
    x = range(len(rows))
    panels = ((axes[0], "first_run_s", "first run()"), (axes[1], "load_and_first_s", "load + first run()"))
    for ax, key, title in panels:
        for off, kind in ((-0.2, "cold"), (0.2, "warm")):
            vals = [r["median"][kind][key] for r in rows]
            ax.bar([i + off for i in x], vals, width=0.4, label=kind)
        for i, r in enumerate(rows):
            ratio = r["median"]["warm"][key] / r["median"]["cold"][key]
            ax.text(i + 0.2, r["median"]["warm"][key], f"{100 * ratio:.0f}%", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(x), [r["model"] for r in rows], fontsize=8)
        ax.set_ylabel("seconds")
        ax.set_title(f"{title}: cold process vs warm cache", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="bert_legacy,resnet50",
                   help="fixture names (tests/fixtures/onnx), onnx-wheel CNN names, or paths; comma separated")
    p.add_argument("--repeats", type=int, default=1, help="cold/warm process pairs per model (median)")
    p.add_argument("--min-compile-secs", type=float, default=0.0,
                   help="jax_persistent_cache_min_compile_time_secs in the children")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=16, help="value for symbolic dims after the first")
    p.add_argument("--json", default="benchmarks/results/compile_cache.json")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch, args.seq)))
        return
    rows = [measure(m, args.repeats, args.min_compile_secs, args.batch, args.seq) for m in args.models.split(",")]
    print(f"{'model':14s} {'cold 1st':>9s} {'warm 1st':>9s} {'warm/cold':>9s} {'cold load+1st':>13s} "
          f"{'warm load+1st':>13s} {'warm/cold':>9s} {'cold compile':>12s} {'warm cache-load':>15s} "
          f"{'warm trace+lower':>16s} {'hits':>5s} {'entries':>7s}  warm program from")
    for r in rows:
        c, w = r["median"]["cold"], r["median"]["warm"]
        print(f"{r['model']:14s} {c['first_run_s']:9.2f} {w['first_run_s']:9.2f} {100 * r['warm_over_cold']:8.1f}% "
              f"{c['load_and_first_s']:13.2f} {w['load_and_first_s']:13.2f} "
              f"{100 * r['load_and_first_warm_over_cold']:8.1f}% {c['backend_compile_s']:12.2f} "
              f"{w['cache_load_s']:15.2f} {w['trace_s'] + w['lower_s']:16.2f} {int(w['cache_hits']):5d} "
              f"{int(r['cache_entries']):7d}  {_source(r['pairs'][-1]['warm'].get('stored', {}))}")
    print("(medians over --repeats cold/warm process pairs; compile, cache-load, trace+lower: JAX events "
          "during the first run() only)")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "min_compile_secs": args.min_compile_secs, "batch": args.batch, "seq": args.seq,
            "date": time.strftime("%Y-%m-%d %H:%M")}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    _plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
