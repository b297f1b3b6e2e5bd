"""jaxinfer's CPU int8 dot kernel against XLA's int8 dot (int8 x int8 -> int32, weight [N, K]).

Each case runs 12 distinct weights per call (so they stream from memory, as a model's layers do),
the programs interleaved in one process; the table gives median ms per product and the speedup. On a
CPU with AVX-512 VNNI the kernel's AVX2 path is timed too (``cpu_kernels.isa(1)``, same program: also
where the AVX2 rule would leave the product to XLA). A case the kernel does not take at all (its rule on
this CPU) reads as XLA's dot in the kernel columns.

The conv table (``--parts convs``) times 8-bit convolutions (NHWC, OHWI filter, input zero point 3)
as ``intmath.zp_conv`` runs them (on AVX-512 VNNI: the kernel's patch product) against the exact
float32 convolution they took before (``intmath.exact_conv`` of the shifted values), one layer per call.

    python benchmarks/int8_dot.py [--parts dots,convs] [--runs 20] [--json benchmarks/results/int8_dot.json]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxinfer import cpu_kernels, intmath

CASES = [(1, 1024, 4096), (8, 1024, 4096), (8, 4096, 1024), (8, 1024, 1024), (32, 1024, 4096), (64, 1024, 4096),
         (128, 1024, 4096), (512, 1024, 4096), (1024, 256, 256), (2048, 768, 768), (256, 768, 3072), (1024, 288, 32),
         (8192, 288, 32), (4096, 27, 16)]
WEIGHTS = 12
#: (x [B, H, W, C], w [N, KH, KW, C], stride): stems, 3x3 and 1x1 layers of small CNNs and ResNet-50.
CONVS = [((1, 32, 32, 3), (32, 3, 3, 3), 1), ((1, 32, 32, 32), (32, 3, 3, 32), 1),
         ((8, 32, 32, 32), (32, 3, 3, 32), 1), ((8, 16, 16, 64), (128, 1, 1, 64), 1),
         ((1, 224, 224, 3), (64, 7, 7, 3), 2), ((1, 56, 56, 64), (64, 3, 3, 64), 1),
         ((1, 56, 56, 64), (256, 1, 1, 64), 1), ((1, 14, 14, 256), (256, 3, 3, 256), 1),
         ((8, 7, 7, 512), (2048, 1, 1, 512), 1)]


def _xla(x: jax.Array, w: jax.Array) -> jax.Array:
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.int32)


def _median_ms(f, *args, runs: int) -> float:
    ts = []
    for _ in range(runs):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts)) * 1e3


def conv_rows(runs: int, rounds: int) -> list[dict]:
    """The conv table: zp_conv (the kernel's patch product where this CPU takes it) vs the float32 route."""
    rng = np.random.default_rng(1)
    dn = ("NHWC", "OHWI", "NHWC")
    print(f"{'x -> w, stride':>40} {'zp_conv ms':>11} {'float32 ms':>11} {'speedup':>8}")
    rows = []
    for xs, ws, st in CONVS:
        x = jnp.asarray(rng.integers(-128, 128, xs, dtype=np.int8))
        w = jnp.asarray(rng.integers(-128, 128, ws, dtype=np.int8))
        ours = jax.jit(lambda x, w, st=st: intmath.zp_conv(x, 3, w, None, (st, st), "SAME", bound=256 * 128,
                                                           dimension_numbers=dn))
        ref = jax.jit(lambda x, w, st=st: intmath.exact_conv(x.astype(jnp.int32) - 3, w.astype(jnp.int32), (st, st),
                                                             "SAME", bound=256 * 128, dimension_numbers=dn))
        assert np.array_equal(ours(x, w), ref(x, w))
        best = [np.inf, np.inf]
        for _ in range(rounds):
            best = [min(best[0], _median_ms(ours, x, w, runs=runs)), min(best[1], _median_ms(ref, x, w, runs=runs))]
        row = {"x": list(xs), "w": list(ws), "stride": st, "zp_conv_ms": round(best[0], 4),
               "float32_ms": round(best[1], 4), "speedup": round(best[1] / best[0], 2)}
        rows.append(row)
        print(f"{f'{list(xs)} -> {list(ws)}, {st}':>40} {best[0]:>11.3f} {best[1]:>11.3f} {row['speedup']:>7.2f}x")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="dots,convs")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best median counts")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("the CPU kernel is not available here (see jaxinfer/cpu_kernels)")
    parts = set(args.parts.split(","))
    rng = np.random.default_rng(0)
    rows = []
    best_isa = cpu_kernels.isa()
    paths = {"kernel": best_isa, "kernel_avx2": 1} if best_isa == 2 else {"kernel": best_isa}
    print(f"kernel path: {cpu_kernels.ISAS[best_isa]}")
    if "dots" in parts:
        print(f"{'rows x K x N':>18} " + " ".join(f"{p + ' ms':>16}" for p in paths)
              + f" {'XLA ms':>10} {'speedup':>8}")
    for m, k, n in CASES if "dots" in parts else []:
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
    convs = conv_rows(args.runs, args.rounds) if "convs" in parts else []
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": jax.devices()[0].device_kind, "kernel_path": cpu_kernels.ISAS[best_isa],
                       "weights_per_call": WEIGHTS, "cases": rows, "convs": convs}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
