"""jaxinfer vs LiteRT latency on small TFLite models, interleaved in one process.

    python benchmarks/tflite_vs_litert.py [--iters 50] [--rounds 5] [--json out.json]

Models: the fixtures of tests/fixtures/tflite/make_fixtures.py (a float and an
int8 conv+depthwise stack, a dynamic-range MLP, a streaming LSTM) at batch 1 and 8,
plus the plain conv stacks below. LiteRT runs with its default (XNNPACK) kernels
on one thread. Each engine's figure is its best of --rounds interleaved rounds of
--iters calls (this 2-core VM's speed drifts 1.3-2x between rounds). Prints a table
and the geometric mean of jaxinfer/LiteRT latency ratios per kind (float incl.
hybrid/LSTM, int8).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer.converters.tflite import load_tflite  # noqa: E402
from tests.converters.tflite.builder import ModelBuilder  # noqa: E402
from tests.fixtures.tflite.make_fixtures import FIXTURES  # noqa: E402


def conv_stack(batch: int, quantized: bool, size: int = 32, width: int = 32, layers: int = 4) -> bytes:
    rng = np.random.default_rng(0)
    b = ModelBuilder()
    dt = np.int8 if quantized else np.float32
    q_act = (0.05, 0) if quantized else None
    x = b.input("x", (batch, size, size, 3), dt, q_act)
    cin = 3
    for i in range(layers):
        if quantized:
            ws = rng.uniform(0.002, 0.01, width).astype(np.float32)
            w = b.const(f"w{i}", rng.integers(-127, 128, (width, 3, 3, cin)).astype(np.int8),
                        (ws, np.zeros(width, np.int64), 0))
            bias = b.const(f"b{i}", rng.integers(-500, 500, width).astype(np.int32),
                           ((0.05 * ws).astype(np.float32), np.zeros(width, np.int64), 0))
        else:
            w = b.const(f"w{i}", (rng.standard_normal((width, 3, 3, cin)) * 0.2).astype(np.float32))
            bias = b.const(f"b{i}", rng.standard_normal(width).astype(np.float32))
        y = b.tensor(f"y{i}", (batch, size, size, width), dt, q_act)
        b.op("CONV_2D", [x, w, bias], [y], "Conv2DOptions", padding=0, stride_w=1, stride_h=1,
             fused_activation_function=1, dilation_w_factor=1, dilation_h_factor=1)
        x, cin = y, width
    b.outputs(x)
    return b.finish()


def _time(fn, iters: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters * 1e3


def bench(name: str, data: bytes, iters: int, rounds: int) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    model = load_tflite(data)  # hybrid="xnnpack": the same dynamic-range arithmetic as LiteRT's default path
    it = Interpreter(model_content=data, num_threads=1)
    it.allocate_tensors()
    inp = it.get_input_details()[0]
    shape, dtype = tuple(inp["shape"]), inp["dtype"]
    rng = np.random.default_rng(1)
    x = rng.integers(-128, 128, shape).astype(dtype) if np.dtype(dtype).kind == "i" else \
        rng.standard_normal(shape).astype(dtype)
    feeds = {model.inputs[0].name: x}

    def run_litert():
        it.set_tensor(inp["index"], x)
        it.invoke()
        return it.get_tensor(it.get_output_details()[0]["index"])

    def run_ours():
        return model.run(feeds)

    ours, theirs = [], []
    for _ in range(rounds):  # interleave
        ours.append(_time(run_ours, iters))
        theirs.append(_time(run_litert, iters))
    row = {"model": name, "jaxinfer_ms": min(ours), "litert_ms": min(theirs)}
    row["ratio"] = row["jaxinfer_ms"] / row["litert_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", type=str, default="")
    args = ap.parse_args()
    rows = []
    for quantized in (False, True):
        for batch in (1, 8):
            name = f"conv_stack_{'int8' if quantized else 'f32'}_b{batch}"
            rows.append(bench(name, conv_stack(batch, quantized), args.iters, args.rounds))
    for fname, build in FIXTURES.items():
        for batch in (1, 8):
            rows.append(bench(f"{fname}_b{batch}", build(batch), args.iters, args.rounds))
    print(f"{'model':28s} {'jaxinfer ms':>12s} {'LiteRT ms':>10s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['model']:28s} {r['jaxinfer_ms']:12.3f} {r['litert_ms']:10.3f} {r['ratio']:7.2f}")
    summary = {}
    for kind in ("f32", "int8"):
        ratios = [r["ratio"] for r in rows if ("int8" in r["model"]) == (kind == "int8")]
        summary[kind] = float(np.exp(np.mean(np.log(ratios))))
        print(f"geomean jaxinfer/LiteRT ({kind}): {summary[kind]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "geomean": summary}, indent=2))


if __name__ == "__main__":
    main()
