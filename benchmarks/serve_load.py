"""Closed-loop serving load: max_batch=1 vs dynamic batching vs raw ``Model.run``.

For each fixture (a CNN: the onnx wheel's light SqueezeNet; a transformer
block and a ranking-style MLP built with onnx.helper) and each concurrency, ``C`` async clients send
binary KServe v2 requests back-to-back for ``--seconds`` to a ``jaxinfer
serve`` subprocess on 127.0.0.1, once with ``max_batch: 1`` and once with
dynamic batching. Raw ``Model.run`` at the same batch sizes gives the ceiling. The dynamic
server also takes full-batch requests (``--max-batch`` rows each, at ``--full-concurrency``):
their rows/s against raw ``Model.run`` at that batch is the serving overhead at the same batch size.
Prints a table, writes JSON and a PNG beside it (throughput and p50/p99 latency
against concurrency; ``--plot-only results.json`` redraws it).

    python benchmarks/serve_load.py --fixtures cnn --concurrency 1 8 32 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADER = "Inference-Header-Content-Length"


# ------------------------------------------------------------------ fixtures
def transformer_proto(d: int = 64, seq: int = 16, seed: int = 0) -> onnx.ModelProto:
    """One single-head attention block + FFN over [batch, seq, d] (symbolic batch)."""
    rng = np.random.default_rng(seed)

    def w(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)

    inits = [w("Wq", d, d), w("Wk", d, d), w("Wv", d, d), w("Wo", d, d), w("W1", d, 4 * d), w("W2", 4 * d, d),
             numpy_helper.from_array(np.array(1 / np.sqrt(d), np.float32), "scale")]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "Wq"], ["q"]), n("MatMul", ["x", "Wk"], ["k"]), n("MatMul", ["x", "Wv"], ["v"]),
             n("Transpose", ["k"], ["kt"], perm=[0, 2, 1]), n("MatMul", ["q", "kt"], ["s0"]),
             n("Mul", ["s0", "scale"], ["s"]), n("Softmax", ["s"], ["p"], axis=-1), n("MatMul", ["p", "v"], ["a"]),
             n("MatMul", ["a", "Wo"], ["o"]), n("Add", ["x", "o"], ["r"]), n("MatMul", ["r", "W1"], ["f"]),
             n("Relu", ["f"], ["g"]), n("MatMul", ["g", "W2"], ["h"]), n("Add", ["r", "h"], ["y"])]
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", seq, d])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", seq, d])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def mlp_proto(widths: tuple[int, ...] = (512, 2048, 2048, 512, 1), seed: int = 0) -> onnx.ModelProto:
    """A ranking-style MLP over [batch, 512] features (Gemm + Relu, 6.3 M params, 25 MB float32).

    At batch 1 its run reads every weight for one row, so rows in a batch share that cost: the
    case dynamic batching exists for. The transformer block is the opposite (0.08 ms at batch 1,
    most of a served request is Python), and the CNN is compute-bound.
    """
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    last = len(widths) - 2
    for i, (k, n) in enumerate(zip(widths[:-1], widths[1:])):
        inits += [numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), f"W{i}"),
                  numpy_helper.from_array((rng.standard_normal(n) * 0.1).astype(np.float32), f"B{i}")]
        out = "y" if i == last else f"g{i}"
        nodes.append(helper.make_node("Gemm", [x, f"W{i}", f"B{i}"], [out]))
        if i < last:
            nodes.append(helper.make_node("Relu", [out], [f"h{i}"]))
            out = f"h{i}"
        x = out
    g = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", widths[0]])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", widths[-1]])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def fixtures() -> dict[str, tuple[onnx.ModelProto, str, tuple[int, ...]]]:
    from jaxinfer.serve import default_model_path

    cnn = onnx.load(default_model_path().with_name("light_squeezenet.onnx"))
    weights = {i.name for i in cnn.graph.initializer}  # old-IR exports list weights among the inputs
    name = next(i.name for i in cnn.graph.input if i.name not in weights)
    return {"cnn": (cnn, name, (3, 224, 224)), "transformer": (transformer_proto(), "x", (16, 64)),
            "mlp": (mlp_proto(), "x", (512,))}


# ------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(repo: Path, port: int, timeout: float = 900.0) -> subprocess.Popen:
    code = f"import sys; from jaxinfer.serve import main; sys.exit(main([{str(repo)!r}, '--port', '{port}']))"
    log = open(repo / "server.log", "w")  # noqa: SIM115  (kept open for the server's lifetime)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {(repo / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(2)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def scrape(url: str) -> dict[str, float]:
    import httpx

    text = httpx.get(url + "/metrics").text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.match(r"^(\S+?)(\{.*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def batch_histogram(metrics: dict[str, float]) -> dict[str, float]:
    """Share of batches per batch-size bucket, from jaxinfer_batch_size_bucket."""
    cum = {}
    for k, v in metrics.items():
        m = re.match(r'jaxinfer_batch_size_bucket\{le="([^"]+)"', k)
        if m:
            cum[m.group(1)] = cum.get(m.group(1), 0) + v
    keys = sorted(cum, key=lambda s: float("inf") if s == "+Inf" else float(s))
    out, prev = {}, 0.0
    total = cum.get("+Inf", 0) or 1
    for k in keys:
        if cum[k] - prev > 0:
            out[k] = round((cum[k] - prev) / total, 3)
        prev = cum[k]
    return out


# --------------------------------------------------------------------- load
def point(concurrency: int, lat: list[float], errors: int, wall: float) -> dict[str, float]:
    """One closed-loop point: throughput and p50/p99 from the successful requests' latencies."""
    arr = np.asarray(lat) if lat else np.asarray([np.nan])
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors, "throughput": len(lat) / wall,
            "p50_ms": float(np.percentile(arr, 50) * 1e3), "p99_ms": float(np.percentile(arr, 99) * 1e3)}


def infer_body(name: str, shape: tuple[int, ...], rows: int = 1) -> tuple[bytes, bytes]:
    """One request of ``rows`` rows: (the JSON header, the whole binary-extension body)."""
    x = np.random.default_rng(0).standard_normal((rows, *shape)).astype(np.float32)
    data = x.tobytes()
    head = json.dumps({"inputs": [{"name": name, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": len(data)}}],
                       "parameters": {"binary_data_output": True}}).encode()
    return head, head + data


async def closed_loop(url: str, model: str, name: str, shape: tuple[int, ...], concurrency: int,
                      seconds: float, rows: int = 1) -> dict[str, float]:
    import aiohttp  # lighter per request than httpx's pool at 32-64 connections on 2 shared cores

    head, body = infer_body(name, shape, rows)
    headers = {HEADER: str(len(head)), "content-type": "application/octet-stream"}
    lat: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as client:
        async def one() -> None:
            nonlocal errors
            while time.perf_counter() < end:
                t = time.perf_counter()
                async with client.post(f"/v2/models/{model}/infer", data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
                        if errors == 1:
                            print(f"  first error: HTTP {r.status} {(await r.text())[:300]}", flush=True)
                    else:
                        lat.append(time.perf_counter() - t)

        start = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return point(concurrency, lat, errors, wall)


class _HttpConn(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection that sends a fixed request and reads Content-Length responses."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.waiter: asyncio.Future | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0 or self.waiter is None or self.waiter.done():
            return
        head = bytes(self.buf[:head_end]).split(b"\r\n")
        length = next((int(h.split(b":", 1)[1]) for h in head[1:] if h[:15].lower() == b"content-length:"), None)
        if length is None:
            self.waiter.set_exception(RuntimeError(f"response without Content-Length: {head[0]!r}"))
            return
        end = head_end + 4 + length
        if len(self.buf) >= end:
            status = int(head[0].split(b" ", 2)[1])
            body = bytes(self.buf[head_end + 4:end])
            del self.buf[:end]
            self.waiter.set_result((status, body))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"server closed the connection: {exc}"))

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)  # type: ignore[union-attr]
        return await self.waiter


async def closed_loop_raw(url: str, model: str, name: str, shape: tuple[int, ...], concurrency: int,
                          seconds: float, rows: int = 1) -> dict[str, float]:
    """The same closed loop with a lean HTTP/1.1 client (pre-built request bytes, one socket per client).

    On this 2-core machine the load generator shares the CPU with the server; like wrk or h2load it
    should cost as little as possible, so that what is measured is the server. aiohttp costs ~0.3 ms
    of CPU per request here (``--client aiohttp`` keeps it for comparison).
    """
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    head, body = infer_body(name, shape, rows)
    raw = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: {host}:{port}\r\n{HEADER}: {len(head)}\r\n"
           f"Content-Type: application/octet-stream\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
    loop = asyncio.get_running_loop()
    lat: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors
        transport, conn = await loop.create_connection(_HttpConn, host, int(port))
        try:
            while time.perf_counter() < end:
                t = time.perf_counter()
                status, reply = await conn.request(raw)
                if status != 200:
                    errors += 1
                    if errors == 1:
                        print(f"  first error: HTTP {status} {reply[:300]!r}", flush=True)
                else:
                    lat.append(time.perf_counter() - t)
        finally:
            transport.close()

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(concurrency)))
    wall = time.perf_counter() - start
    return point(concurrency, lat, errors, wall)


def run_client(kind: str, *args: Any) -> dict[str, float]:
    """One closed-loop point with the chosen client (uvloop when installed, as the server uses)."""
    fn = closed_loop_raw if kind == "raw" else closed_loop
    try:
        import uvloop

        return uvloop.run(fn(*args))
    except ImportError:
        return asyncio.run(fn(*args))


def raw_run(proto: onnx.ModelProto, sizes: list[int], seconds: float) -> list[dict[str, float]]:
    """``Model.run`` at each batch size through the same buckets (no HTTP, no batcher)."""
    import jaxinfer
    from jaxinfer.batching import BucketedModel, BucketPolicy

    bm = BucketedModel(jaxinfer.load(proto), BucketPolicy(tuple(sizes)))
    bm.warmup(timing_runs=0)
    rows = []
    sig = bm.inputs[0]
    for b in sizes:
        feeds = {sig.name: np.random.default_rng(0).standard_normal((b, *sig.shape[1:])).astype(np.float32)}
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / len(sizes) or n < 3:
            bm.model.run(feeds)
            n += 1
        dt = (time.perf_counter() - t0) / n
        rows.append({"batch": b, "ms_per_batch": dt * 1e3, "throughput": b / dt})
    return rows


def batcher_only(proto: onnx.ModelProto, max_batch: int, concurrency: list[int], seconds: float,
                 delay_ms: float) -> list[dict[str, float]]:
    """The same closed loop against the DynamicBatcher in process (no HTTP): batching's own effect."""
    import threading

    import jaxinfer
    from jaxinfer.batching import BatcherConfig, BucketedModel, BucketPolicy, DynamicBatcher, LatencyModel

    bm = BucketedModel(jaxinfer.load(proto), BucketPolicy.for_max_batch(max_batch))
    lat = LatencyModel(bm.warmup())
    sig = bm.inputs[0]
    x = np.random.default_rng(0).standard_normal((1, *sig.shape[1:])).astype(np.float32)
    rows = []
    with DynamicBatcher(bm, lat, BatcherConfig(max_queue_delay_ms=delay_ms, queue_size=4096)) as b:
        for c in concurrency:
            lats: list[float] = []
            end = time.perf_counter() + seconds

            def client() -> None:
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    b.submit({sig.name: x}).result()
                    lats.append(time.perf_counter() - t)

            threads = [threading.Thread(target=client) for _ in range(c)]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            rows.append({"concurrency": c, "requests": len(lats), "throughput": len(lats) / wall,
                         "p50_ms": float(np.percentile(lats, 50) * 1e3), "p99_ms": float(np.percentile(lats, 99) * 1e3)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", nargs="+", default=["cnn", "transformer", "mlp"])
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 16, 32, 64])
    p.add_argument("--seconds", type=float, default=5.0, help="per (mode, concurrency) point")
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-queue-delay-ms", type=float, default=2.0)
    p.add_argument("--full-concurrency", nargs="+", type=int, default=[1, 2, 4],
                   help="concurrency of the full-batch points: requests of --max-batch rows each, against "
                        "raw Model.run at that batch (serving overhead at the same batch size)")
    p.add_argument("--client", choices=("raw", "aiohttp"), default="raw",
                   help="load client: a lean HTTP/1.1 socket client (default) or aiohttp")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serve_load.json"))
    p.add_argument("--plot-only", metavar="JSON", help="redraw the PNG from a results JSON of an earlier run")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(json.loads(Path(args.plot_only).read_text()), Path(args.plot_only).with_suffix(".png"))
        return 0
    results: dict[str, dict] = {}
    fx = fixtures()
    for fname in args.fixtures:
        proto, input_name, shape = fx[fname]
        results[fname] = {"raw": raw_run(proto, sorted({1, args.max_batch} | {c for c in args.concurrency
                                                                          if c <= args.max_batch}), args.seconds)}
        for mode, max_batch in (("batch1", 1), ("dynamic", args.max_batch)):
            results[fname][f"inproc_{mode}"] = batcher_only(proto, max_batch, args.concurrency, args.seconds,
                                                            args.max_queue_delay_ms)
        for mode, max_batch in (("batch1", 1), ("dynamic", args.max_batch)):
            with tempfile.TemporaryDirectory() as tmp:
                repo = Path(tmp)
                (repo / fname / "1").mkdir(parents=True)
                onnx.save(proto, repo / fname / "1" / "model.onnx")
                (repo / fname / "config.yaml").write_text(
                    f"max_batch: {max_batch}\nmax_queue_delay_ms: {args.max_queue_delay_ms}\nqueue_size: 4096\n")
                port = free_port()
                t0 = time.perf_counter()
                proc = start_server(repo, port)
                url = f"http://127.0.0.1:{port}"
                warm = time.perf_counter() - t0
                try:
                    before = scrape(url)
                    points = [run_client(args.client, url, fname, input_name, shape, c, args.seconds)
                              for c in args.concurrency]
                    after = scrape(url)
                    full = [] if mode == "batch1" else [
                        {**run_client(args.client, url, fname, input_name, shape, c, args.seconds, args.max_batch),
                         "rows": args.max_batch} for c in args.full_concurrency]
                finally:
                    stop_server(proc)
            results[fname][mode] = {
                "points": points, "startup_s": warm,
                "compiles_after_warmup": after.get("jaxinfer_compiles_total", 0) - before.get("jaxinfer_compiles_total", 0),
                "batch_sizes": batch_histogram(after),
            }
            if full:
                results[fname][mode]["full_batch_points"] = full
            print(f"[{fname}/{mode}] ready in {warm:.1f}s; compiles during load: "
                  f"{results[fname][mode]['compiles_after_warmup']:.0f}; batch sizes {results[fname][mode]['batch_sizes']}",
                  flush=True)
    report(results, args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    plot(results, Path(args.out).with_suffix(".png"))
    return 0


def report(results: dict, args: argparse.Namespace) -> None:
    for fname, r in results.items():
        print(f"\n== {fname} ==")
        print(f"{'conc':>5} | {'batch1 req/s':>12} {'p50':>8} {'p99':>8} | {'dynamic req/s':>13} {'p50':>8} "
              f"{'p99':>8} | {'ratio':>6}")
        for a, b in zip(r["batch1"]["points"], r["dynamic"]["points"]):
            ratio = b["throughput"] / a["throughput"] if a["throughput"] else float("nan")
            print(f"{a['concurrency']:>5} | {a['throughput']:>12.1f} {a['p50_ms']:>7.1f}ms {a['p99_ms']:>7.1f}ms | "
                  f"{b['throughput']:>13.1f} {b['p50_ms']:>7.1f}ms {b['p99_ms']:>7.1f}ms | {ratio:>5.2f}x")
        print("in-process batcher, no HTTP:")
        for a, b in zip(r["inproc_batch1"], r["inproc_dynamic"]):
            print(f"{a['concurrency']:>5} | {a['throughput']:>12.1f} {a['p50_ms']:>7.1f}ms {a['p99_ms']:>7.1f}ms | "
                  f"{b['throughput']:>13.1f} {b['p50_ms']:>7.1f}ms {b['p99_ms']:>7.1f}ms | "
                  f"{b['throughput'] / a['throughput']:>5.2f}x")
        print("raw Model.run: " + ", ".join(f"b{x['batch']}: {x['throughput']:.1f}/s ({x['ms_per_batch']:.1f} ms)"
                                             for x in r["raw"]))
        raw1 = next((x["throughput"] for x in r["raw"] if x["batch"] == 1), None)
        best_raw = max(x["throughput"] for x in r["raw"])
        if raw1:
            print(f"raw batching ceiling (best rows/s over batch-1 rows/s): {best_raw / raw1:.2f}x")
        best_dyn = max(x["throughput"] for x in r["dynamic"]["points"])
        print(f"saturation, 1-row requests: dynamic {best_dyn:.1f}/s vs raw best {best_raw:.1f}/s = "
              f"{best_dyn / best_raw:.0%}")
        full = r["dynamic"].get("full_batch_points") or []
        if full:
            rows = full[0]["rows"]
            raw_b = next((x["throughput"] for x in r["raw"] if x["batch"] == rows), None)
            best = max(full, key=lambda x: x["throughput"])
            got = best["throughput"] * rows
            print(f"saturation, {rows}-row requests: " + ", ".join(
                f"c{x['concurrency']} {x['throughput'] * rows:.1f} rows/s" for x in full)
                + (f"; best {got:.1f} rows/s vs raw b{rows} {raw_b:.1f} rows/s = {got / raw_b:.0%}" if raw_b else ""))


#: (result key, label, line style) of each curve in the plot.
_CURVES = (("batch1", "HTTP, max_batch 1", "-"), ("dynamic", "HTTP, dynamic batching", "-"),
           ("inproc_batch1", "in-process, max_batch 1", ":"), ("inproc_dynamic", "in-process, dynamic", ":"))


def _points(r: dict, key: str) -> list[dict]:
    """A mode's points: HTTP modes keep them under "points", in-process ones are the list itself."""
    v = r.get(key)
    return (v.get("points", []) if isinstance(v, dict) else v) or []


def plot(results: dict, path: Path) -> None:
    """One column per fixture: throughput (top) and p50/p99 latency (bottom) against concurrency."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(2, len(results), figsize=(6.5 * len(results), 8), squeeze=False)
    for col, (fname, r) in enumerate(results.items()):
        tput, lat = axes[0][col], axes[1][col]
        for i, (key, label, style) in enumerate(_CURVES):
            pts = _points(r, key)
            if not pts:
                continue
            conc = [p["concurrency"] for p in pts]
            color = f"C{i}"
            tput.plot(conc, [p["throughput"] for p in pts], style, marker="o", color=color, label=label)
            lat.plot(conc, [p["p50_ms"] for p in pts], style, marker="o", color=color, label=f"{label} p50")
            lat.plot(conc, [p["p99_ms"] for p in pts], style, marker="^", color=color, alpha=0.5,
                     label=f"{label} p99")
        if r.get("raw"):
            best = max(r["raw"], key=lambda x: x["throughput"])
            tput.axhline(best["throughput"], ls="--", color="grey",
                         label=f"raw Model.run best (b{best['batch']})")
        for ax in (tput, lat):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrent clients")
            ax.grid(True, which="both", alpha=0.3)
        tput.set_yscale("log")
        lat.set_yscale("log")
        tput.set_ylabel("requests/s")
        lat.set_ylabel("latency (ms)")
        tput.set_title(f"{fname}: throughput")
        lat.set_title(f"{fname}: latency")
        tput.legend(fontsize=8)
        lat.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
