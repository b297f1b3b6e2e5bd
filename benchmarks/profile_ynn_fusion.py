"""XLA CPU's default YNNPACK fusion vs jaxinfer's per-dot/per-convolution setting, on the light CNNs.

``Model`` compiles with ``xla_cpu_experimental_ynn_fusion_type`` set to
individual dots and convolutions (see ``jaxinfer.model.YNN_FUSION_TYPES``):
XLA's default merges AlexNet's fc6 -> fc7 -> fc8 -> softmax into one library
fusion that runs ~200x slower. This times both settings on the same inputs,
interleaved, so the setting can be checked on every model and batch size.

    python benchmarks/profile_ynn_fusion.py [--batch 1,8] [--runs 5] [--models alexnet,resnet]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import onnx

from jaxinfer.bench import dummy_inputs, geomean, interleaved, light_models, table
from jaxinfer.converters.onnx import load_onnx
from jaxinfer.converters.onnx.restamp import restamp_batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--models", default="")
    ap.add_argument("--json", default="benchmarks/results/ynn_fusion.json")
    args = ap.parse_args()
    rows = []
    for path in light_models():
        if args.models and not any(s in path.name for s in args.models.split(",")):
            continue
        proto = onnx.load(str(path))
        for batch in (int(b) for b in args.batch.split(",")):
            stamped = restamp_batch(proto, batch)
            ours, xla_default = load_onnx(stamped), load_onnx(stamped)
            xla_default.compiler_options = {}
            feeds = dummy_inputs(ours.inputs, batch)
            ms_ours, ms_default = interleaved([lambda: jax.block_until_ready(ours.run_device(feeds)),
                                               lambda: jax.block_until_ready(xla_default.run_device(feeds))],
                                              args.runs, warmup=1)
            row = {"model": path.stem.replace("light_", ""), "batch": batch,
                   "individual_ms": ms_ours, "xla_default_ms": ms_default}
            row["speedup"] = row["xla_default_ms"] / row["individual_ms"]
            rows.append(row)
            print(f"  {row['model']:14s} b{batch}: individual {row['individual_ms']:9.1f} ms  "
                  f"xla default {row['xla_default_ms']:9.1f} ms  speedup {row['speedup']:.2f}", flush=True)
    print(table(rows, ["model", "batch", "individual_ms", "xla_default_ms", "speedup"]))
    print(f"geomean speedup: {geomean([r['speedup'] for r in rows]):.3f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))


if __name__ == "__main__":
    main()
