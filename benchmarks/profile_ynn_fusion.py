"""Which of XLA CPU's YNNPACK library fusions ``Model`` should ask for, measured per model.

``Model`` compiles with ``xla_cpu_experimental_ynn_fusion_type`` set to
``jaxinfer.model.YNN_FUSION_TYPES``. This times the candidate settings on the same inputs,
interleaved, on the light CNNs of the onnx wheel and on the committed exported fixtures
(transformers, a CNN, an int8 QDQ BERT):

* ``dot``: individual dots only (the default since session 5);
* ``dot+conv``: individual dots and convolutions (the default before it);
* ``none``: no library fusion (XLA's own loops and Eigen);
* ``xla``: XLA's default, which merged AlexNet's fc6 -> fc7 -> fc8 -> softmax into one
  library call ~40x slower at batch 8 (skipped for AlexNet at batch 8 unless ``--all``).

    python benchmarks/profile_ynn_fusion.py [--batch 1,8] [--runs 5] [--models alexnet,resnet,bert]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import onnx

from jaxinfer.bench import dummy_inputs, geomean, interleaved, light_models, table
from jaxinfer.converters.onnx import load_onnx
from jaxinfer.converters.onnx.restamp import restamp_batch
from jaxinfer.model import TUNE_CANDIDATES

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

#: Model.tune's candidates plus XLA's own default (no option passed).
SETTINGS: dict[str, dict[str, Any]] = {**TUNE_CANDIDATES, "xla": {}}
FIXTURES = ("bert_legacy", "gpt2_dynamo", "vit_legacy", "cnn", "bert_qdq")


def _models(selected: str) -> list[tuple[str, Path]]:
    paths = [(p.stem.replace("light_", ""), p) for p in light_models()]
    paths += [(name, ROOT / "tests" / "fixtures" / "onnx" / f"{name}.onnx") for name in FIXTURES]
    return [(n, p) for n, p in paths if not selected or any(s in n for s in selected.split(","))]


def _load(path: Path, batch: int, fixture: bool):
    proto = onnx.load(str(path))
    return load_onnx(proto if fixture else restamp_batch(proto, batch))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--models", default="")
    ap.add_argument("--all", action="store_true", help="also time XLA's default where it is known to be ~40x slower")
    ap.add_argument("--json", default="benchmarks/results/ynn_fusion.json")
    args = ap.parse_args()
    from onnx_vs_ort import fixture_feeds

    rows = []
    for name, path in _models(args.models):
        fixture = path.parent.name == "onnx"
        for batch in (int(b) for b in args.batch.split(",")):
            settings = {k: v for k, v in SETTINGS.items()
                        if args.all or not (k == "xla" and name == "bvlc_alexnet" and batch > 1)}
            models = {}
            for key, opts in settings.items():
                m = _load(path, batch, fixture)
                m.compiler_options = dict(opts)
                models[key] = m
            first = next(iter(models.values()))
            feeds = fixture_feeds(first, batch, 16) if fixture else dummy_inputs(first.inputs, batch)
            fns = [lambda m=m: jax.block_until_ready(m.run_device(feeds)) for m in models.values()]
            times = interleaved(fns, args.runs, warmup=1)
            row: dict[str, Any] = {"model": name, "batch": batch}
            row.update({f"{k}_ms": round(t, 3) for k, t in zip(models, times)})
            row["best"] = min(models, key=lambda k: row[f"{k}_ms"])
            rows.append(row)
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    cols = ["model", "batch"] + [f"{k}_ms" for k in SETTINGS] + ["best"]
    print(table([{c: r.get(c, "") for c in cols} for r in rows], cols))
    for key in SETTINGS:
        if key != "dot":
            ratios = [r[f"{key}_ms"] / r["dot_ms"] for r in rows if f"{key}_ms" in r]
            print(f"geomean {key} / dot: {geomean(ratios):.3f} over {len(ratios)} rows")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": SETTINGS, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
