"""jaxinfer's CPU int8 dot kernel against XLA's int8 dot (int8 x int8 -> int32, weight [N, K]).

Each case runs 12 distinct weights per call (so they stream from memory, as a model's layers do),
the programs interleaved in one process; the table gives median ms per product and the speedup. On a
CPU with AVX-512 VNNI the kernel's AVX2 path is timed too (``cpu_kernels.isa(1)``, same program: also
where the AVX2 rule would leave the product to XLA). A case the kernel does not take at all (its rule on
this CPU) reads as XLA's dot in the kernel columns.

    python benchmarks/int8_dot.py [--runs 20] [--json benchmarks/results/int8_dot.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfer import cpu_kernels

CASES = [(1, 1024, 4096), (8, 1024, 4096), (8, 4096, 1024), (8, 1024, 1024), (32, 1024, 4096), (64, 1024, 4096),
         (128, 1024, 4096), (512, 1024, 4096), (1024, 256, 256), (2048, 768, 768), (256, 768, 3072), (1024, 288, 32),
         (8192, 288, 32), (4096, 27, 16)]
WEIGHTS = 12


def _xla(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def _median_ms(f, *args, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best median counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("the CPU kernel is not available here (see jaxinfer/cpu_kernels)")
    rng = np.random.default_rng(0)
    rows = []
    best_isa = cpu_kernels.isa()
    paths = {"kernel": best_isa, "kernel_avx2": 1} if best_isa == 2 else {"kernel": best_isa}
    print(f"kernel path: {cpu_kernels.ISAS[best_isa]}")
    print(f"{'rows x K x N':>18} " + " ".join(f"{p + ' ms':>16}" for p in paths) + f" {'XLA ms':>10} {'speedup':>8}")
    for m, k, n in CASES:
        x = jnp.asarray(rng.integers(-128, 128, (m, k), dtype=np.int8))
        ws = [jnp.asarray(rng.integers(-128, 128, (n, k), dtype=np.int8)) for _ in range(WEIGHTS)]
        ours = jax.jit(lambda x, ws: [cpu_kernels.int8_dot(x, w) for w in ws])
        xla = jax.jit(lambda x, ws: [_xla(x, w) for w in ws])
        want = xla(x, ws)
        best = {p: np.inf for p in (*paths, "xla")}
        try:
            for p, isa in paths.items():
                cpu_kernels.isa(isa)
                assert all(np.array_equal(a, b) for a, b in zip(ours(x, ws), want))
            for _ in range(args.rounds):
                for p, isa in paths.items():
                    cpu_kernels.isa(isa)
                    best[p] = min(best[p], _median_ms(ours, x, ws, runs=args.runs) / WEIGHTS)
                best["xla"] = min(best["xla"], _median_ms(xla, x, ws, runs=args.runs) / WEIGHTS)
        finally:
            cpu_kernels.isa(best_isa)
        row = {"rows": m, "k": k, "n": n, **{f"{p}_ms": round(best[p], 4) for p in paths},
               "xla_ms": round(best["xla"], 4), "speedup": round(best["xla"] / best["kernel"], 2)}
        rows.append(row)
        print(f"{f'{m} x {k} x {n}':>18} " + " ".join(f"{row[p + '_ms']:>16.3f}" for p in paths)
              + f" {row['xla_ms']:>10.3f} {row['speedup']:>7.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "kernel_path": cpu_kernels.ISAS[best_isa],
                       "weights_per_call": WEIGHTS, "cases": rows}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
