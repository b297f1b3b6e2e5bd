"""Stateful serving: N concurrent streams on the streaming LSTM fixture, batched vs one at a time.

Each stream is a keep-alive HTTP/1.1 connection that sends its frames back to back (a closed loop), with
``sequence_id`` = the stream's number and ``sequence_start`` on its first request, to a ``jaxinfer serve``
subprocess on 127.0.0.1: once with ``max_batch: 1`` (each stream's step runs alone) and once with
dynamic batching (steps of different streams share a run, their states stacked). Raw ``Model.run`` of
one stream stepped alone gives the unbatched compute ceiling. Every answer is checked against the same
stream stepped alone in this process, so the throughput counted is of correct answers only.
Prints a table and writes JSON.

    python benchmarks/stream_serving.py --streams 1 8 32 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from serve_load import HEADER, _HttpConn, free_port, point, scrape, start_server, stop_server  # noqa: E402

FIXTURE = ROOT / "tests" / "fixtures" / "tflite" / "lstm_stream.tflite"
STEPS = 8  # distinct frames per stream, sent in a cycle


def frames(stream: int) -> list[np.ndarray]:
    rng = np.random.default_rng(stream)
    return [rng.standard_normal((1, 10, 40)).astype(np.float32) for _ in range(STEPS)]


def request(host: str, port: int, stream: int, x: np.ndarray, start: bool) -> bytes:
    data = x.tobytes()
    head = json.dumps({"inputs": [{"name": "frames", "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(data)}}],
                       "outputs": [{"name": "seq", "parameters": {"binary_data": True}}],
                       "parameters": {"sequence_id": stream, "sequence_start": start}}).encode()
    body = head + data
    return (f"POST /v2/models/lstm/infer HTTP/1.1\r\nHost: {host}:{port}\r\n{HEADER}: {len(head)}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


def expected(stream: int, steps: int) -> list[np.ndarray]:
    """The stream's answers stepped alone with Model.run (the reference each reply is checked against)."""
    import jaxinfer

    m = jaxinfer.load(FIXTURE)
    xs = frames(stream)
    return [m.run({"frames": xs[i % STEPS]})["seq"] for i in range(steps)]


async def streams_loop(port: int, streams: int, seconds: float) -> tuple[dict[str, float], list[list[bytes]]]:
    """Closed loop per stream; returns the point and each stream's reply bodies in order."""
    host = "127.0.0.1"
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    replies: list[list[bytes]] = [[] for _ in range(streams)]
    errors = 0
    end = time.perf_counter() + seconds

    async def one(k: int) -> None:
        nonlocal errors
        xs = frames(k + 1)
        first = request(host, port, k + 1, xs[0], True)
        rest = [request(host, port, k + 1, x, False) for x in xs]
        transport, conn = await loop.create_connection(_HttpConn, host, port)
        try:
            i = 0
            while time.perf_counter() < end:
                t = time.perf_counter()
                status, reply = await conn.request(first if i == 0 else rest[i % STEPS])
                if status != 200:
                    errors += 1
                    if errors == 1:
                        print(f"  first error: HTTP {status} {reply[:300]!r}", flush=True)
                    return
                lat.append(time.perf_counter() - t)
                replies[k].append(reply)
                i += 1
        finally:
            transport.close()

    start = time.perf_counter()
    await asyncio.gather(*(one(k) for k in range(streams)))
    return point(streams, lat, errors, time.perf_counter() - start), replies


def check(replies: list[list[bytes]], checked_steps: int) -> float:
    """The largest difference between a stream's replies and the stream stepped alone (first steps)."""
    worst = 0.0
    for k, rs in enumerate(replies):
        want = expected(k + 1, min(len(rs), checked_steps))
        for got, ref in zip(rs, want):
            head_len = len(got) - ref.nbytes
            arr = np.frombuffer(got[head_len:], np.float32).reshape(ref.shape)
            worst = max(worst, float(np.abs(arr - ref).max()))
    return worst


def raw_rate(seconds: float) -> float:
    """Steps/s of one stream through Model.run (no HTTP, no batching)."""
    import jaxinfer

    m = jaxinfer.load(FIXTURE)
    xs = frames(1)
    m.run({"frames": xs[0]})
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        m.run({"frames": xs[n % STEPS]})
        n += 1
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--checked-steps", type=int, default=6, help="replies per stream checked against Model.run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "stream_serving.json"))
    args = p.parse_args(argv)
    results: dict = {"raw_one_stream_steps_per_s": raw_rate(args.seconds)}
    for mode, max_batch in (("batch1", 1), ("dynamic", args.max_batch)):
        with tempfile.TemporaryDirectory() as tmp:
            repo = Path(tmp)
            (repo / "lstm" / "1").mkdir(parents=True)
            (repo / "lstm" / "1" / "model.tflite").write_bytes(FIXTURE.read_bytes())
            (repo / "lstm" / "config.yaml").write_text(f"max_batch: {max_batch}\nqueue_size: 4096\n")
            port = free_port()
            proc = start_server(repo, port)
            try:
                before = scrape(f"http://127.0.0.1:{port}")
                points = []
                for n in args.streams:
                    pt, replies = asyncio.run(streams_loop(port, n, args.seconds))
                    pt["max_abs_diff"] = check(replies, args.checked_steps)
                    points.append(pt)
                after = scrape(f"http://127.0.0.1:{port}")
            finally:
                stop_server(proc)
        results[mode] = {"points": points, "compiles_after_warmup":
                         after.get("jaxinfer_compiles_total", 0) - before.get("jaxinfer_compiles_total", 0)}
    print(f"raw Model.run, one stream: {results['raw_one_stream_steps_per_s']:.0f} steps/s")
    print(f"{'streams':>8} {'batch1 steps/s':>15} {'dynamic steps/s':>16} {'ratio':>6} "
          f"{'p50 batch1 ms':>14} {'p50 dynamic ms':>15} {'errors':>7} {'max |diff|':>11}")
    for a, b in zip(results["batch1"]["points"], results["dynamic"]["points"]):
        print(f"{a['concurrency']:>8} {a['throughput']:>15.0f} {b['throughput']:>16.0f} "
              f"{b['throughput'] / a['throughput']:>6.2f} {a['p50_ms']:>14.2f} {b['p50_ms']:>15.2f} "
              f"{a['errors'] + b['errors']:>7} {max(a['max_abs_diff'], b['max_abs_diff']):>11.1e}")
    print("compiles during load:", results["batch1"]["compiles_after_warmup"], "/",
          results["dynamic"]["compiles_after_warmup"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
