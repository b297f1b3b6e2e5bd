"""jaxinfer vs onnxruntime on the onnx wheel's light CNNs and the exported fixtures, batch 1 and 8.

Both run in one process on the same inputs, in rotating blocks of back-to-back
calls (jaxinfer.bench.blocked: onnxruntime's spinning threads would otherwise slow
whichever engine runs right after it); each figure is the median of --runs
calls. ``--tune`` sets Model.tune. A model whose batch dim is fixed at 1 is
re-stamped (jaxinfer.converters.onnx.restamp) so both engines run the same
batch-8 graph. The exported fixtures (tests/fixtures/onnx/*.onnx: BERT, GPT-2,
ViT, a CNN, their onnxruntime-optimized and quantized variants) are picked up
when present; their text inputs get token ids, an all-ones attention mask and
--seq tokens. Prints a table, writes JSON, and the geometric mean of the
jaxinfer/onnxruntime latency ratio per batch size (all models, light CNNs,
fixtures). A model that fails to load or run is reported and skipped. jaxinfer runs
on JAX's default device; on a GPU host onnxruntime takes its CUDA provider when its
build has one (the lent GPU machines' onnxruntime is CPU-only), and the report
names both (``devices`` in the JSON).

    python benchmarks/onnx_vs_ort.py --runs 20 --json benchmarks/results/onnx_vs_ort.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

import jaxinfer  # noqa: F401
from jaxinfer.bench import (MIN_BLOCK_S, BenchRow, blocked, compare, devices, geomean, light_models, ort_session,
                             table)

FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "onnx"
VOCAB = 256  # the fixtures' vocabulary (tests/fixtures/onnx/README.md)


def fixture_models() -> list[Path]:
    """The committed exported fixtures that exist now (none is fine)."""
    return sorted(FIXTURES.glob("*.onnx"))


def fixture_feeds(model: Any, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for an exported model: dim 0 = batch, other symbolic dims = ``seq``; ids in the vocabulary."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for sig in model.inputs:
        dims = [batch if i == 0 else (d if isinstance(d, int) and d > 0 else seq)
                for i, d in enumerate(sig.shape or ())]
        dtype = sig.dtype if sig.dtype is not None else np.dtype(np.float32)
        if dtype.kind == "f":
            arr = rng.standard_normal(dims)
        elif "mask" in sig.name:
            arr = np.ones(dims)
        elif "type" in sig.name:
            arr = np.zeros(dims)
        else:
            arr = rng.integers(0, VOCAB, dims)
        feeds[sig.name] = np.asarray(arr, dtype=dtype)
    return feeds


def max_abs(ours: dict[str, Any], theirs: list[Any]) -> float:
    diffs = [0.0]
    for a, b in zip(ours.values(), theirs):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a.shape != b.shape:
            return float("inf")
        if a.size:
            diffs.append(float(np.nanmax(np.abs(a - b))))
    return max(diffs)


def compare_fixture(path: Path, batches: list[int], runs: int, seq: int, tune: bool = False,
                    min_block_s: float = 0.0) -> list[BenchRow]:
    """Like jaxinfer.bench.compare, with inputs the exported models take (token ids, masks)."""
    from jaxinfer.converters.onnx import load_onnx

    data = path.read_bytes()
    sess = ort_session(data)
    rows = []
    for batch in batches:
        model = load_onnx(data)
        model.tune = tune
        feeds = fixture_feeds(model, batch, seq)
        t0 = time.perf_counter()
        ours = model.run(feeds)
        compile_s = time.perf_counter() - t0
        diff = max_abs(ours, sess.run(None, feeds))
        fns: list[Callable[[], Any]] = [lambda: model.run(feeds), lambda: sess.run(None, feeds)]
        ms = blocked(fns, runs, min_block_s=min_block_s)
        rows.append(BenchRow(path.stem, batch, ms[0], ms[1], ms[0] / ms[1], diff, compile_s))
    return rows


def summarize(rows: list[dict], batches: list[int]) -> dict[str, float]:
    out = {}
    for group, pick in (("", lambda r: True), ("_light", lambda r: r["kind"] == "light"),
                        ("_fixtures", lambda r: r["kind"] == "fixture")):
        for b in batches:
            ratios = [r["ratio"] for r in rows if r["batch"] == b and pick(r) and r["ratio"]]
            if ratios:
                out[f"geomean_ratio{group}_batch{b}"] = geomean(ratios)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--seq", type=int, default=32, help="sequence length for the text fixtures")
    p.add_argument("--models", default="", help="comma-separated substrings to select models")
    p.add_argument("--no-light", action="store_true", help="only the exported fixtures")
    p.add_argument("--no-fixtures", action="store_true", help="only the light CNNs")
    p.add_argument("--tune", action="store_true",
                   help="Model.tune: time XLA CPU option sets per shape, keep the fastest")
    p.add_argument("--min-block-s", type=float, default=MIN_BLOCK_S,
                   help="each timing block runs for at least this long (more calls for fast models)")
    p.add_argument("--json", default=None,
                   help="where to write the results (default: benchmarks/results/onnx_vs_ort.json for a full run, "
                        "onnx_vs_ort_fixtures.json with --no-light, onnx_vs_ort_light.json with --no-fixtures; a "
                        "--models subset writes nothing unless this is given)")
    args = p.parse_args()
    if args.json is None and not args.models:
        part = "_fixtures" if args.no_light else "_light" if args.no_fixtures else ""
        args.json = f"benchmarks/results/onnx_vs_ort{part}.json"
    batches = [int(b) for b in args.batch.split(",")]
    where = devices()
    print(f"jaxinfer on {where['jaxinfer']}, onnxruntime on {where['onnxruntime']}")

    def wanted(path: Path) -> bool:
        return not args.models or any(s in path.name for s in args.models.split(","))

    jobs: list[tuple[str, Path, Callable[[Path], list[BenchRow]]]] = []
    if not args.no_light:
        jobs += [("light", m, lambda m: compare(m, batches, runs=args.runs, label=m.stem.replace("light_", ""),
                                                tune=args.tune, min_block_s=args.min_block_s))
                 for m in light_models() if wanted(m)]
    if not args.no_fixtures:
        jobs += [("fixture", m, lambda m: compare_fixture(m, batches, args.runs, args.seq, args.tune,
                                                                    args.min_block_s))
                 for m in fixture_models() if wanted(m)]
    rows, failed = [], []
    for kind, path, run in jobs:
        try:
            result = run(path)
        except Exception as e:  # noqa: BLE001 - one model failing must not stop the table
            failed.append({"model": path.stem, "error": f"{type(e).__name__}: {e}"[:500]})
            print(f"  {path.stem:24s} FAILED: {type(e).__name__}: {str(e)[:200]}", flush=True)
            traceback.print_exc(limit=2)
            continue
        for row in result:
            rows.append({"kind": kind, **row.as_dict()})
            print(f"  {row.model:24s} b{row.batch}: jaxinfer {row.jaxinfer_ms:8.2f} ms  "
                  f"onnxruntime {row.reference_ms:8.2f} ms  ratio {row.ratio:.2f}", flush=True)
    print()
    print(table(rows, ["kind", "model", "batch", "jaxinfer_ms", "onnxruntime_ms", "ratio", "max_abs_diff",
                       "compile_s"]))
    summary = summarize(rows, batches)
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    for f in failed:
        print(f"failed: {f['model']}: {f['error']}")
    out = {"rows": rows, "summary": summary, "failed": failed, "seq": args.seq, "tune": args.tune,
           "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "devices": devices()}
    if args.json is None:
        return
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
