"""jaxinfer vs onnxruntime on the onnx wheel's light CNNs, batch 1 and 8.

Both run in one process on the same inputs, interleaved call by call; each
figure is the median of --runs calls. A model whose batch dim is fixed at 1 is
re-stamped (jaxinfer.converters.onnx.restamp) so both engines run the same
batch-8 graph. Prints a table, writes JSON, and the geometric mean of the
jaxinfer/onnxruntime latency ratio per batch size.

    python benchmarks/onnx_vs_ort.py --runs 20 --json benchmarks/results/onnx_vs_ort.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

import jaxinfer  # noqa: F401
from jaxinfer.bench import compare, geomean, light_models, table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,8")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--models", default="", help="comma-separated substrings to select models")
    p.add_argument("--json", default="benchmarks/results/onnx_vs_ort.json")
    args = p.parse_args()
    batches = [int(b) for b in args.batch.split(",")]
    models = [m for m in light_models() if not args.models or any(s in m.name for s in args.models.split(","))]
    rows = []
    for path in models:
        for row in compare(path, batches, runs=args.runs, label=path.stem.replace("light_", "")):
            rows.append(row.as_dict())
            print(f"  {row.model:14s} b{row.batch}: jaxinfer {row.jaxinfer_ms:8.2f} ms  "
                  f"onnxruntime {row.onnxruntime_ms:8.2f} ms  ratio {row.ratio:.2f}", flush=True)
    print()
    print(table(rows, ["model", "batch", "jaxinfer_ms", "onnxruntime_ms", "ratio", "max_abs_diff", "compile_s"]))
    summary = {f"geomean_ratio_batch{b}": geomean([r["ratio"] for r in rows if r["batch"] == b]) for b in batches}
    for k, v in summary.items():
        print(f"{k}: {v:.3f}")
    out = {"rows": rows, "summary": summary, "machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
