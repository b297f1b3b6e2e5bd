"""Model.run fixed overhead: a 1-op model (Relu on a [1, 4] float32 input), µs per call.

What run() costs beyond the kernel itself: input checks, the cache key, the
executable dispatch and the host copy of the outputs. Also times the bare
jitted function and run_device for comparison, and (when ai_edge_litert is
installed) LiteRT invoke on the same 1-op TFLite model.

    python benchmarks/profile_run_overhead.py [--calls 20000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import onnx
from onnx import TensorProto, helper

import jaxinfer


def relu_model() -> onnx.ModelProto:
    """One Relu on a float32 [1, 4] input: the kernel is negligible, what remains is overhead."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def per_call_us(fn: Callable[[], Any], calls: int, repeats: int = 40) -> float:
    """Least mean µs per call over ``repeats`` blocks of ``calls // repeats`` calls.

    The least block mean filters out the time other processes took the cores
    (this machine is shared), leaving what one call itself costs.
    """
    block = max(calls // repeats, 1)
    for _ in range(min(calls, 200)):
        fn()
    means = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(block):
            fn()
        means.append((time.perf_counter() - start) / block * 1e6)
    return min(means)


def litert_relu_us(calls: int) -> float | None:
    try:
        from ai_edge_litert.interpreter import Interpreter

        import sys
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.converters.tflite.builder import ModelBuilder
    except ImportError:
        return None
    b = ModelBuilder()
    x = b.input("x", (1, 4), np.float32)
    y = b.tensor("y", (1, 4), np.float32)
    b.op("RELU", [x], [y])
    b.outputs(y)
    it = Interpreter(model_content=b.finish(), num_threads=1)
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    arr = np.ones((1, 4), np.float32)

    def call() -> Any:
        it.set_tensor(i, arr)
        it.invoke()
        return it.get_tensor(o)

    return per_call_us(call, calls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=20000)
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    m = jaxinfer.load(relu_model())
    x = np.linspace(-1, 1, 4, dtype=np.float32).reshape(1, 4)
    feeds = {"x": x}
    m.run(feeds)
    jitted = jax.jit(m.fn)
    jitted(m.params, feeds)
    rows = {
        "jax.jit(fn) bare call (device out)": per_call_us(lambda: jitted(m.params, feeds), args.calls),
        "jax.jit(fn) + np.asarray(out)": per_call_us(lambda: np.asarray(jitted(m.params, feeds)["y"]), args.calls),
        "Model.run_device": per_call_us(lambda: m.run_device(feeds), args.calls),
        "Model.run": per_call_us(lambda: m.run(feeds), args.calls),
    }
    lite = litert_relu_us(args.calls)
    if lite is not None:
        rows["LiteRT set_tensor+invoke+get_tensor"] = lite
    for k, v in rows.items():
        print(f"{k:40s} {v:8.1f} µs")
    print(f"compiles: {m.stats.compiles}  traces: {m.stats.traces}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"us_per_call": rows, "calls": args.calls}, indent=2))


if __name__ == "__main__":
    main()
