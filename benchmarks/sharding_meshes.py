"""Every valid mesh for a GPT-2-like decoder and a BERT-like encoder.

For each model and each data×tensor factorization of the devices: per-device
params bytes, XLA temp bytes, collective count and bytes (from the compiled
HLO), compile time, step latency and throughput. Prints a table per model,
writes JSON (and PNG plots when matplotlib is installed), and reports how the
estimate-ranked plan compares with the fastest measured mesh.

    python benchmarks/sharding_meshes.py                 # 8 simulated CPU devices
    python benchmarks/sharding_meshes.py --devices all   # whatever the host has (GPU/TPU)
    python benchmarks/sharding_meshes.py --layers 2 --d-model 128 --quick
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fixtures():
    spec = importlib.util.spec_from_file_location("sharding_fixture_models", ROOT / "tests/fixtures/sharding/models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", default="8", help="simulated CPU device count, or 'all' (use the host's devices)")
    ap.add_argument("--models", default="gpt2,bert")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--d-model", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/sharding_meshes"))
    ap.add_argument("--quick", action="store_true", help="2 repeats, no plots")
    args = ap.parse_args(argv)

    import jax

    if args.devices != "all":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", int(args.devices))
    import jaxinfer
    from jaxinfer.sharding import plan

    fm = _fixtures()
    devices = jax.devices()
    n = len(devices)
    device_desc = f"{n} x {devices[0].device_kind} ({devices[0].platform})"
    print(f"devices: {device_desc}; host {platform.node()}")
    builders = {
        "gpt2": lambda: fm.gpt2_like(layers=args.layers, d=args.d_model, heads=args.heads, vocab=args.vocab, seq=args.seq),
        "bert": lambda: fm.bert_like(layers=args.layers, d=args.d_model, heads=args.heads, vocab=args.vocab, seq=args.seq),
    }
    report: dict = {"devices": device_desc, "args": vars(args), "models": {}}
    for name in args.models.split(","):
        t0 = time.perf_counter()
        model = jaxinfer.load(builders[name]())
        total = sum(v.nbytes for v in model.params.values())
        print(f"\n== {name}: {args.layers} layers, d_model {args.d_model}, params {total / 2**20:.1f} MiB, "
              f"batch {args.batch} x seq {args.seq} (load {time.perf_counter() - t0:.1f}s)")
        p = plan(model, devices=n, batch=args.batch, repeats=2 if args.quick else args.repeats)
        print(p.table())
        ok = [r for r in p.rows if r.ok]
        fastest = min(ok, key=lambda r: r.latency_s)
        by_est = min(ok, key=lambda r: r.estimate_s)
        gap = by_est.latency_s / fastest.latency_s - 1
        print(f"fastest measured: {fastest.mesh} {fastest.latency_s * 1e3:.2f} ms; estimate-ranked first: "
              f"{by_est.mesh} {by_est.latency_s * 1e3:.2f} ms ({gap * 100:+.1f}%)")
        tokens = args.batch * args.seq
        rows = []
        for r in p.rows:
            d = json.loads(json.dumps(r.__dict__, default=str))
            d["mesh"] = r.mesh
            if r.latency_s:
                d["tokens_per_s"] = tokens / r.latency_s
            rows.append(d)
        report["models"][name] = {"params_bytes": total, "rows": rows, "fastest": fastest.mesh,
                                  "estimate_first": by_est.mesh, "estimate_first_gap": gap}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {out.with_suffix('.json')}")
    if not args.quick:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no plots")
            return 0
        fig, axes = plt.subplots(1, 3, figsize=(14, 4))
        for name, m in report["models"].items():
            ok = [r for r in m["rows"] if r["ok"]]
            labels = [r["mesh"] for r in ok]
            axes[0].bar([f"{name}\n{l}" for l in labels], [r["latency_s"] * 1e3 for r in ok])
            axes[1].bar([f"{name}\n{l}" for l in labels], [r["per_device_params_bytes"] / 2**20 for r in ok])
            axes[2].bar([f"{name}\n{l}" for l in labels], [r["collective_bytes"] / 2**10 for r in ok])
        for ax, t in zip(axes, ("latency ms", "params MiB / device", "collective KiB")):
            ax.set_title(t)
            ax.tick_params(axis="x", labelrotation=90, labelsize=6)
        fig.suptitle(device_desc)
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=100)
        print(f"wrote {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
