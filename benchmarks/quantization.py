"""Quantization on CPU: f32 vs int8-weight vs int8-dynamic (w8a8) vs bf16, and onnxruntime.

The model is the 4-layer d_model 1024 / ffn 4096 encoder (~50M params) built in code
(jaxinfer.quant.fixtures.encoder). For each batch x tokens shape, every variant runs on the
same input, interleaved call by call in one process; each figure is the median of --runs
calls. onnxruntime runs the same model in f32 and after ``quantize_dynamic`` (int8 weights,
dynamic uint8 activations). Cosine is against our f32 output. The crossover is the
smallest tokens count where int8-dynamic stops beating f32.

    python benchmarks/quantization.py --shapes 1x8,4x32 --runs 20
    python benchmarks/quantization.py --shapes 1x8,1x32,1x128,4x128,1x512 --variants f32,int8-dynamic
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

import jaxinfer
from jaxinfer.quant import fixtures, quantize
from jaxinfer.quant.report import cosine


def _ort_sessions(proto, want: set[str]) -> dict:
    import onnxruntime as ort

    sessions = {}
    tmp = Path(tempfile.mkdtemp())
    f32 = tmp / "encoder.onnx"
    import onnx

    onnx.save(proto, str(f32))
    so = ort.SessionOptions()
    if "ort-f32" in want:
        sessions["ort-f32"] = ort.InferenceSession(str(f32), so, providers=["CPUExecutionProvider"])
    if "ort-int8" in want:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = tmp / "encoder.int8.onnx"
        quantize_dynamic(str(f32), str(q), weight_type=QuantType.QInt8)
        sessions["ort-int8"] = ort.InferenceSession(str(q), so, providers=["CPUExecutionProvider"])
    return sessions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1x8,4x32", help="batch x tokens, comma separated")
    p.add_argument("--variants", default="f32,int8-weight,int8-dynamic,bf16,ort-f32,ort-int8")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--json", default="benchmarks/results/quantization.json")
    args = p.parse_args()
    variants = args.variants.split(",")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    proto = fixtures.encoder(args.d_model, args.ffn, args.layers)
    base = jaxinfer.load(proto.SerializeToString())
    calib = [fixtures.inputs(1, 16, args.d_model, seed=100 + i) for i in range(4)]
    models = {"f32": base}
    for v in variants:
        if v not in models and not v.startswith("ort"):
            models[v] = quantize(base, v, calibration=calib if v == "int8-static" else None)
    sessions = _ort_sessions(proto, {v for v in variants if v.startswith("ort")})
    bytes_ = {v: m.report().totals["params_bytes"] if hasattr(m, "report") else m.info()["params_bytes"]
              for v, m in models.items()}
    rows = []
    for b, t in shapes:
        feeds = fixtures.inputs(b, t, args.d_model, seed=7)
        ref = base.run(feeds)["y"]
        calls = {}
        for v in variants:
            if v in models:
                m = models[v]
                m.warmup(feeds)
                calls[v] = (lambda m=m: m.run(feeds)["y"])
            else:
                s = sessions[v]
                calls[v] = (lambda s=s: s.run(["y"], feeds)[0])
        outs = {v: f() for v, f in calls.items()}
        times = {v: [] for v in calls}
        for _ in range(args.runs):
            for v, f in calls.items():
                t0 = time.perf_counter()
                f()
                times[v].append(time.perf_counter() - t0)
        for v in calls:
            ms = float(np.median(times[v]) * 1e3)
            rows.append({"batch": b, "tokens": t, "variant": v, "ms": round(ms, 3),
                         "cosine_vs_f32": round(cosine(outs[v], ref), 6), "params_bytes": bytes_.get(v)})
        f32ms = next(r["ms"] for r in rows if r["batch"] == b and r["tokens"] == t and r["variant"] == "f32")
        line = "  ".join(f"{r['variant']} {r['ms']:.2f}ms ({f32ms / r['ms']:.2f}x)" for r in rows
                         if r["batch"] == b and r["tokens"] == t)
        print(f"{b}x{t}: {line}", flush=True)
    cross = None
    if "int8-dynamic" in variants:
        for b, t in shapes:
            f = next(r["ms"] for r in rows if (r["batch"], r["tokens"], r["variant"]) == (b, t, "f32"))
            q = next(r["ms"] for r in rows if (r["batch"], r["tokens"], r["variant"]) == (b, t, "int8-dynamic"))
            if q >= f and cross is None:
                cross = b * t
    out = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load": os.getloadavg()},
           "model": {"d_model": args.d_model, "ffn": args.ffn, "layers": args.layers}, "runs": args.runs,
           "rows": rows, "crossover_tokens": cross}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"crossover (batch x tokens where int8-dynamic stops beating f32): {cross}")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
