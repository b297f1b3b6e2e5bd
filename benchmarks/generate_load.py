"""Generation under load: continuous batching vs static batching vs one request at a time.

A fixed-seed workload of mixed prompt lengths (``--prompt-len``, default 8..96 tokens)
and output lengths (``--out-len``, default 8..128, log-uniform so short and long
requests mix) runs through :class:`jaxinfer.generation.Engine` in-process, at equal
slot count:

- ``continuous``: a freed slot is refilled between decode steps (JetStream's insert);
- ``static``: a new batch is admitted only when every slot of the previous one is done;
- ``sequential``: one request at a time (``slots=1``).

Requests arrive all at once (``burst``) and as a Poisson process at several rates
(fractions of the continuous engine's burst throughput, so every fixture gets a
curve over its own capacity). Per point: tokens/s, TTFT p50/p99 (submit to first
token, queueing included), inter-token p50/p99, and the compiles after warm-up
(must be 0). Optionally one row through the HTTP server (``--http``): the same burst
sent to ``/generate_stream`` with an async client.

Prints a table, writes JSON and a PNG (matplotlib) under ``benchmarks/results/``.

    python benchmarks/generate_load.py --fixtures gpt2_tiny llama_tiny --requests 48 --http
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FIXTURES = ROOT / "tests" / "fixtures" / "decoders"
MODES = ("continuous", "static", "sequential")


# ------------------------------------------------------------------ workload
@dataclass(frozen=True)
class Request:
    prompt: tuple[int, ...]
    max_new_tokens: int
    arrival_s: float  # offset from the start of the run


def workload(n: int, vocab: int, prompt_len: tuple[int, int], out_len: tuple[int, int], seed: int) -> list[Request]:
    """``n`` requests: uniform prompt lengths, log-uniform output lengths, random ids (fixed seed)."""
    rng = np.random.default_rng(seed)
    plens = rng.integers(prompt_len[0], prompt_len[1] + 1, n)
    olens = np.exp(rng.uniform(np.log(out_len[0]), np.log(out_len[1] + 1), n)).astype(int).clip(*out_len)
    return [Request(tuple(int(t) for t in rng.integers(0, vocab, p)), int(o), 0.0) for p, o in zip(plens, olens)]


def with_arrivals(reqs: list[Request], rate: float | None, seed: int) -> list[Request]:
    """Arrival offsets: all at 0 (``rate`` None) or a Poisson process of ``rate`` requests/s."""
    if rate is None:
        return [Request(r.prompt, r.max_new_tokens, 0.0) for r in reqs]
    gaps = np.random.default_rng(seed + 1).exponential(1.0 / rate, len(reqs))
    times = np.concatenate([[0.0], np.cumsum(gaps)[:-1]])
    return [Request(r.prompt, r.max_new_tokens, float(t)) for r, t in zip(reqs, times)]


# ------------------------------------------------------------------- metrics
def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def summarize(t0: float, streams: list[Any], n_tokens: list[int]) -> dict[str, float]:
    ttft = [s.ttft_s for s in streams if s.ttft_s is not None]
    itl = [b - a for s in streams for a, b in zip(s.token_times, s.token_times[1:])]
    end = max(s.token_times[-1] for s in streams if s.token_times)
    total = sum(n_tokens)
    return {"requests": len(streams), "tokens": total, "wall_s": end - t0, "tokens_per_s": total / (end - t0),
            "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
            "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99)}


# ---------------------------------------------------------------- in-process
def run_engine(engine: Any, reqs: list[Request]) -> dict[str, float]:
    """Submit ``reqs`` at their arrival offsets from this thread; wait for every stream."""
    from jaxinfer.generation import SamplingParams

    streams = []
    t0 = time.monotonic()
    for r in reqs:
        delay = t0 + r.arrival_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        streams.append(engine.submit(list(r.prompt), SamplingParams(max_new_tokens=r.max_new_tokens)))
    n_tokens = [len(s.result(timeout=600)) for s in streams]
    return summarize(t0, streams, n_tokens)


def median_run(engine: Any, reqs: list[Request], repeats: int) -> dict[str, Any]:
    """The run with the median tokens/s out of ``repeats`` (a shared, loaded machine is noisy)."""
    runs = sorted((run_engine(engine, reqs) for _ in range(repeats)), key=lambda r: r["tokens_per_s"])
    return {**runs[len(runs) // 2], "tokens_per_s_runs": [r["tokens_per_s"] for r in runs]}


def bench_fixture(path: Path, args: argparse.Namespace) -> dict[str, Any]:
    import jaxinfer
    from jaxinfer.generation import Decoder, Engine

    model = jaxinfer.load(path)
    out: dict[str, Any] = {"model": path.name, "modes": {}}
    decoders: dict[int, tuple[Any, float]] = {}  # by slot count: continuous and static share one (and its compiles)
    capacity = None
    reqs: list[Request] = []
    for mode in MODES:
        slots = 1 if mode == "sequential" else args.slots
        policy = "static" if mode == "static" else "continuous"
        if slots not in decoders:
            t = time.perf_counter()
            dec = Decoder(model, slots=slots, max_len=args.max_len,
                          prefill_buckets=tuple(args.prefill_buckets) if args.prefill_buckets else None)
            dec.warmup()
            decoders[slots] = (dec, time.perf_counter() - t)
        dec, warmup_s = decoders[slots]
        warm_compiles = dec.compiles
        if not reqs:
            reqs = workload(args.requests, dec.vocab_size, tuple(args.prompt_len), tuple(args.out_len), args.seed)
        engine = Engine(dec, policy=policy)
        try:
            run_engine(engine, reqs[:4])  # settle threads and allocator before measuring
            rows = {"burst": median_run(engine, with_arrivals(reqs, None, args.seed), args.repeats)}
            if capacity is None:  # rates relative to the continuous engine's burst throughput
                capacity = rows["burst"]["requests"] / rows["burst"]["wall_s"]
            for frac in args.rate_fractions:
                row = median_run(engine, with_arrivals(reqs, frac * capacity, args.seed), args.repeats)
                rows[f"poisson@{frac:g}"] = {**row, "rate_req_s": frac * capacity}
            stats = engine.stats()
        finally:
            engine.close()
        late = dec.compiles - warm_compiles
        out["modes"][mode] = {"slots": slots, "policy": policy, "warmup_s": warmup_s, "warm_compiles": warm_compiles,
                              "compiles_after_warmup": late, "engine_stats": _plain(stats), "rows": rows}
        print(f"  {path.stem} {mode:<10} burst {rows['burst']['tokens_per_s']:.0f} tok/s, "
              f"TTFT p99 {rows['burst']['ttft_p99_ms']:.0f} ms, {late} compiles after warm-up", flush=True)
    out["capacity_req_s"] = capacity
    out["workload"] = {"requests": len(reqs), "prompt_len": list(args.prompt_len), "out_len": list(args.out_len),
                       "seed": args.seed, "prompt_tokens": sum(len(r.prompt) for r in reqs),
                       "output_tokens": sum(r.max_new_tokens for r in reqs)}
    if args.http:
        out["http"] = bench_http(model, reqs, args)
    return out


def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v)) for k, v in d.items()}


# ---------------------------------------------------------------------- HTTP
def bench_http(model: Any, reqs: list[Request], args: argparse.Namespace) -> dict[str, Any]:
    """The burst through ``jaxinfer.serve`` and ``/generate_stream``, timed by the client."""
    import asyncio

    import httpx

    import jaxinfer

    gen = {"slots": args.slots, "max_len": args.max_len}
    if args.prefill_buckets:
        gen["prefill_buckets"] = list(args.prefill_buckets)
    with jaxinfer.serve({"m": model}, port=0, compilation_cache=False, generation=gen) as server:
        mv = server.repo.get("m")
        warm = mv.compiles

        async def one(client: httpx.AsyncClient, r: Request, t0: float) -> tuple[float, list[float], int]:
            body = {"input_ids": list(r.prompt), "parameters": {"max_tokens": r.max_new_tokens}}
            times: list[float] = []
            async with client.stream("POST", f"{server.url}/v2/models/m/generate_stream", json=body) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if line.startswith("data: ") and json.loads(line[6:]).get("output_ids"):
                        times.append(time.monotonic())
            return times[0] - t0 if times else float("nan"), times, len(times)

        async def burst() -> dict[str, float]:
            limits = httpx.Limits(max_connections=len(reqs) + 4)
            async with httpx.AsyncClient(timeout=600, limits=limits) as client:
                t0 = time.monotonic()
                got = await asyncio.gather(*(one(client, r, t0) for r in reqs))
            ttft = [g[0] for g in got]
            itl = [b - a for g in got for a, b in zip(g[1], g[1][1:])]
            end = max(g[1][-1] for g in got if g[1])
            total = sum(g[2] for g in got)
            return {"requests": len(reqs), "tokens": total, "wall_s": end - t0, "tokens_per_s": total / (end - t0),
                    "ttft_p50_ms": 1e3 * pct(ttft, 50), "ttft_p99_ms": 1e3 * pct(ttft, 99),
                    "itl_p50_ms": 1e3 * pct(itl, 50), "itl_p99_ms": 1e3 * pct(itl, 99)}

        asyncio.run(burst())  # first connections, settle
        row = asyncio.run(burst())
        row["compiles_after_warmup"] = mv.compiles - warm
    print(f"  http       burst {row['tokens_per_s']:.0f} tok/s, TTFT p99 {row['ttft_p99_ms']:.0f} ms", flush=True)
    return row


# -------------------------------------------------------------------- report
def report(results: dict[str, Any]) -> None:
    cols = ("tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms")
    print(f"\n{'model':<12} {'mode':<11} {'arrivals':<14} " + " ".join(f"{c:>12}" for c in cols) + "  compiles")
    for name, fx in results["fixtures"].items():
        for mode, m in fx["modes"].items():
            for arrivals, row in m["rows"].items():
                label = arrivals if "rate_req_s" not in row else f"{arrivals} ({row['rate_req_s']:.1f}/s)"
                print(f"{name:<12} {mode:<11} {label:<14} " + " ".join(f"{row[c]:>12.1f}" for c in cols)
                      + f"  {m['compiles_after_warmup']:>8}")
        if "http" in fx:
            row = fx["http"]
            print(f"{name:<12} {'http-cont.':<11} {'burst':<14} " + " ".join(f"{row[c]:>12.1f}" for c in cols)
                  + f"  {row['compiles_after_warmup']:>8}")
        c, s = fx["modes"]["continuous"]["rows"]["burst"], fx["modes"]["static"]["rows"]["burst"]
        q = fx["modes"]["sequential"]["rows"]["burst"]
        print(f"{name}: burst continuous/static tokens/s = {c['tokens_per_s'] / s['tokens_per_s']:.2f}x "
              f"(/sequential {c['tokens_per_s'] / q['tokens_per_s']:.2f}x); TTFT p99 continuous "
              f"{c['ttft_p99_ms']:.0f} ms vs static {s['ttft_p99_ms']:.0f} ms\n")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fixtures = results["fixtures"]
    fig, axes = plt.subplots(2, len(fixtures), figsize=(6 * len(fixtures), 8), squeeze=False)
    for col, (name, fx) in enumerate(fixtures.items()):
        for mode, m in fx["modes"].items():
            pts = sorted((row["rate_req_s"], row) for k, row in m["rows"].items() if "rate_req_s" in row)
            burst = m["rows"]["burst"]
            xs = [p[0] for p in pts] + [fx["capacity_req_s"] * 1.6]  # the burst drawn past the highest rate
            axes[0][col].plot(xs, [p[1]["tokens_per_s"] for p in pts] + [burst["tokens_per_s"]], "o-", label=mode)
            axes[1][col].plot(xs, [p[1]["ttft_p99_ms"] for p in pts] + [burst["ttft_p99_ms"]], "o-", label=mode)
        axes[0][col].set_title(f"{name}: tokens/s (last point: all at once)")
        axes[1][col].set_title(f"{name}: TTFT p99 (ms)")
        axes[1][col].set_yscale("log")
        for ax in axes[:, col]:
            ax.set_xlabel("Poisson arrival rate (requests/s)")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(f"generate_load: {results['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", nargs="+", default=["gpt2_tiny", "llama_tiny"])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--prefill-buckets", type=int, nargs="*", default=None)
    p.add_argument("--prompt-len", type=int, nargs=2, default=(8, 96))
    p.add_argument("--out-len", type=int, nargs=2, default=(8, 128))
    p.add_argument("--rate-fractions", type=float, nargs="*", default=[0.25, 0.5, 0.75, 1.0],
                   help="Poisson rates as fractions of the continuous engine's burst requests/s")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=3, help="runs per point; the median (by tokens/s) is kept")
    p.add_argument("--http", action="store_true", help="also one burst row through the HTTP server")
    p.add_argument("--machine", default=f"{platform.machine()} CPU, {_cores()} cores (shared, loaded)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "generate_load.json"))
    args = p.parse_args(argv)
    if args.prompt_len[1] + args.out_len[1] > args.max_len:
        p.error(f"longest prompt + output {args.prompt_len[1] + args.out_len[1]} exceeds --max-len {args.max_len}")
    results: dict[str, Any] = {"machine": args.machine, "args": {k: v for k, v in vars(args).items()},
                               "fixtures": {}}
    for name in args.fixtures:
        path = FIXTURES / f"{name}.onnx"
        print(f"{name}: {path}", flush=True)
        results["fixtures"][name] = bench_fixture(path, args)
    report(results)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"json: {out}")
    plot(results, out.with_suffix(".png"))
    return 0


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 0)


if __name__ == "__main__":
    raise SystemExit(main())
