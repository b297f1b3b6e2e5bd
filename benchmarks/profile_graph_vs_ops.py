"""Whole-graph vs op-by-op time of an ONNX model, and its optimized HLO.

For a model whose whole jitted graph is much slower than its ops jitted one by
one (the AlexNet batch-8 case), this prints both, the slowest single ops, and
writes the optimized HLO (``--hlo out.txt``) so the fusion XLA chose can be read.

    python benchmarks/profile_graph_vs_ops.py bvlc_alexnet --batch 8 --hlo /tmp/alexnet_b8.hlo
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import onnx

from jaxinfer.bench import dummy_inputs, interleaved, light_models
from jaxinfer.converters.onnx import load_onnx
from jaxinfer.converters.onnx.restamp import restamp_batch
from jaxinfer.tracer import run_node


def median_ms(fn: Callable[[], Any], runs: int) -> float:
    """Median ms of ``fn`` (device work included) after one warm-up call."""
    return interleaved([lambda: jax.block_until_ready(fn())], runs, warmup=1)[0]


def per_op_ms(model: Any, feeds: dict[str, np.ndarray], runs: int) -> list[tuple[str, str, float]]:
    """Each node jitted alone on its real inputs (values from one eager pass), median ms."""
    graph = model.graph
    env: dict[str, Any] = {**model._constants, **model.params, **feeds}
    for name, value in graph.initializers.items():
        env.setdefault(name, value)
    rows = []
    for node in graph.nodes:
        inputs = {n: env[n] for n in node.inputs if n}
        traced = {n: v for n, v in inputs.items() if isinstance(v, jax.Array) or
                  (isinstance(v, np.ndarray) and v.size > 64)}

        def one(vals: dict[str, Any], node=node, inputs=inputs) -> tuple:
            local = {**inputs, **vals}
            run_node(node, local, model.registry, graph.opsets, set())
            return tuple(local[o] for o in node.outputs if o)

        jitted = jax.jit(one)
        ms = median_ms(lambda: jitted(traced), runs) if traced else 0.0
        run_node(node, env, model.registry, graph.opsets, set())
        rows.append((node.op_type, node.label, ms))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="substring of a light model name, or a path to an .onnx file")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--hlo", default="")
    args = ap.parse_args()
    path = Path(args.model) if Path(args.model).exists() else \
        next(p for p in light_models() if args.model in p.name)
    proto = restamp_batch(onnx.load(str(path)), args.batch)
    model = load_onnx(proto)
    feeds = dummy_inputs(model.inputs, args.batch)
    model.run(feeds)
    whole = median_ms(lambda: model.run_device(feeds), args.runs)
    ops = per_op_ms(model, feeds, args.runs)
    total = sum(ms for _, _, ms in ops)
    print(f"{path.stem} b{args.batch}: whole graph {whole:.1f} ms, ops jitted one by one sum {total:.1f} ms")
    for op, label, ms in sorted(ops, key=lambda r: -r[2])[:8]:
        print(f"  {op:20s} {label:30s} {ms:8.2f} ms")
    if args.hlo:
        exe = model.compiled(model._check_inputs(feeds))
        Path(args.hlo).write_text(exe.as_text())
        print(f"wrote {args.hlo}")


if __name__ == "__main__":
    main()
