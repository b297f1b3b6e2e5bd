"""Side-by-side timing of jaxinfer and onnxruntime (ONNX files) or LiteRT (TFLite files) on the same
model and inputs.

Both run in one process, each in blocks of back-to-back calls with the blocks
rotated (:func:`blocked`), so slow drifts of the machine hit both alike and
neither engine's idle threads land in the other's timings; the figure is the
median of ``runs`` calls.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np

from .errors import InputError
from .model import Model, Signature


@dataclass(frozen=True)
class BenchRow:
    """One model at one batch size."""

    model: str
    batch: int
    jaxinfer_ms: float
    reference_ms: float | None  # the reference engine's time: onnxruntime's, or LiteRT's (``reference``)
    ratio: float | None  # jaxinfer / the reference: < 1 means jaxinfer is faster
    max_abs_diff: float | None
    compile_s: float
    reference: str = "onnxruntime"

    def as_dict(self) -> dict[str, Any]:
        """The row as a dict; the reference engine's time is keyed ``<reference>_ms``."""
        d = asdict(self)
        d[f"{self.reference}_ms"] = d.pop("reference_ms")
        return d


def dummy_inputs(signatures: Sequence[Signature], batch: int | None = None, seed: int = 0,
                 kind: str = "ramp") -> dict[str, np.ndarray]:
    """Inputs of the declared shapes (symbolic dims -> ``batch`` for dim 0, else 1).

    ``kind="ramp"`` gives ``arange(n)/n`` like the onnx backend suite (finite
    on the light models' constant weights); ``"random"`` gives uniform [0, 1).
    """
    rng = np.random.default_rng(seed)
    feeds = {}
    for sig in signatures:
        dims = []
        for i, d in enumerate(sig.shape or ()):
            if i == 0 and batch is not None:
                dims.append(batch)
            elif isinstance(d, int) and d > 0:
                dims.append(d)
            else:
                dims.append(1)
        dtype = sig.dtype if sig.dtype is not None else np.dtype(np.float32)
        n = int(np.prod(dims)) if dims else 1
        if dtype.kind == "f":
            arr = (np.arange(n).reshape(dims) / max(n, 1)) if kind == "ramp" else rng.random(dims)
        elif dtype.kind in "iu":
            arr = rng.integers(0, 2, size=dims)
        elif dtype.kind == "b":
            arr = rng.integers(0, 2, size=dims).astype(bool)
        else:
            raise ValueError(f"cannot make a dummy value for input {sig}")
        feeds[sig.name] = np.asarray(arr, dtype=dtype)
    return feeds


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def interleaved(fns: Sequence[Callable[[], Any]], runs: int, warmup: int = 3) -> list[float]:
    """Median milliseconds of each callable, calls interleaved round-robin."""
    for _ in range(warmup):
        for f in fns:
            f()
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            samples[i].append(time.perf_counter() - t)
    return [_median_ms(s) for s in samples]


#: The benchmarks' and ``jaxinfer bench``'s default for :func:`blocked`'s ``min_block_s``.
MIN_BLOCK_S = 0.25


def blocked(fns: Sequence[Callable[[], Any]], runs: int, rounds: int = 3, min_block_s: float = 0.0) -> list[float]:
    """Median milliseconds of each callable, timed in blocks of back-to-back calls, blocks rotated ``rounds`` times.

    onnxruntime's intra-op threads spin-wait for a while after each run; with calls in turn
    that spin eats into whichever engine runs next on a small machine (our ResNet-50 at batch 1:
    ~79 ms alone, ~124 ms right after onnxruntime calls). Blocks give every engine its own
    steady state (onnxruntime keeps the benefit of its spinning); a pause and one untimed call
    start each block. A block times ``runs / rounds`` calls, and more while it has run for
    less than ``min_block_s`` (a few sub-millisecond calls right after the pause measure
    sleeping threads and cold caches, not the steady state).
    """
    samples: list[list[float]] = [[] for _ in fns]
    per = max(1, -(-runs // rounds))
    for _ in range(rounds):
        for i, f in enumerate(fns):
            time.sleep(0.05)
            f()
            start = time.perf_counter()
            n = 0
            while n < per or time.perf_counter() - start < min_block_s:
                t = time.perf_counter()
                f()
                samples[i].append(time.perf_counter() - t)
                n += 1
    return [_median_ms(s) for s in samples]


def ort_providers() -> list[str]:
    """onnxruntime's execution providers for a comparison on the device JAX runs on: its CUDA provider
    when JAX's backend is a GPU and this onnxruntime build has one, else its CPU provider."""
    import onnxruntime as ort

    if jax.default_backend() == "gpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def devices() -> dict[str, str]:
    """Where each engine runs, for a benchmark's report: a GPU run next to onnxruntime on the CPU says so."""
    d = jax.devices()[0]
    return {"jaxinfer": f"{d.platform}: {d.device_kind}", "onnxruntime": ort_providers()[0]}


def ort_session(model_bytes: bytes, threads: int | None = None) -> Any:
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model_bytes, opts, providers=ort_providers())


def compare(model_path: str | Path, batches: Sequence[int] = (1, 8), runs: int = 20,
            against: str | None = "onnxruntime", label: str | None = None, tune: bool = False,
            min_block_s: float = 0.0) -> list[BenchRow]:
    """Time ``model_path`` at each batch size (re-stamping a fixed batch dim when needed).

    ``runs`` and ``min_block_s``: as :func:`blocked` takes them.
    ``tune``: set :attr:`Model.tune` (time XLA CPU option sets per shape, keep the fastest).
    """
    import onnx

    from .converters.onnx import load_onnx
    from .converters.onnx.restamp import restamp_batch

    proto = onnx.load(str(model_path))
    rows = []
    for batch in batches:
        stamped = restamp_batch(proto, batch) if _needs_restamp(proto, batch) else proto
        model = load_onnx(stamped)
        model.tune = tune
        feeds = dummy_inputs(model.inputs, batch)
        t0 = time.perf_counter()
        ours = model.run(feeds)
        compile_s = time.perf_counter() - t0
        fns: list[Callable[[], Any]] = [lambda: model.run(feeds)]
        diff = None
        if against == "onnxruntime":
            sess = ort_session(stamped.SerializeToString())
            theirs = sess.run(None, feeds)
            diff = max(_max_abs(a, b) for a, b in zip(ours.values(), theirs))
            fns.append(lambda: sess.run(None, feeds))
        times = blocked(fns, runs, min_block_s=min_block_s)
        ort_ms = times[1] if len(times) > 1 else None
        rows.append(BenchRow(label or Path(model_path).stem, batch, times[0], ort_ms,
                             times[0] / ort_ms if ort_ms else None, diff, compile_s))
    return rows


def compare_tflite(model_path: str | Path, batches: Sequence[int] = (1,), runs: int = 20, label: str | None = None,
                   min_block_s: float = 0.0) -> list[BenchRow]:
    """Time a TFLite file against LiteRT's interpreter on the same inputs.

    The time is LiteRT's default interpreter's (its XNNPACK delegate on CPU); ``max_abs_diff`` is against
    LiteRT's own builtin kernels, which define TFLite's arithmetic: the XNNPACK delegate's int8 results
    can differ from them (on the committed int8 conv fixture by up to 120 steps on 13 % of the
    elements, where jaxinfer and LiteRT's builtin and reference kernels agree exactly).
    A batch other than the file's own re-stamps a fixed batch of 1 on our side and resizes LiteRT's
    inputs; a stateful model, or one whose batch is not a plain leading 1, runs at its own batch only.
    Outputs are compared in the subgraph's output order.
    """
    from ai_edge_litert.interpreter import OpResolverType

    from .converters.tflite import load_tflite

    data = Path(model_path).read_bytes()
    base = load_tflite(str(model_path))
    rows = []
    for batch in batches:
        model = _tflite_at_batch(base, batch)
        feeds = dummy_inputs(model.inputs, batch)
        values = [feeds[s.name] for s in model.inputs]
        litert = _litert_runner(data, values)
        kernels = _litert_runner(data, values, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
        t0 = time.perf_counter()
        ours = model.run(feeds)
        compile_s = time.perf_counter() - t0
        diff = max(_max_abs(a, b) for a, b in zip(ours.values(), kernels()))
        model.reset_state()
        times = blocked([lambda model=model, feeds=feeds: model.run(feeds), litert], runs, min_block_s=min_block_s)
        rows.append(BenchRow(label or Path(model_path).stem, batch, times[0], times[1], times[0] / times[1], diff,
                             compile_s, reference="litert"))
    return rows


def _litert_runner(data: bytes, values: Sequence[np.ndarray], resolver: Any = None) -> Callable[[], list[np.ndarray]]:
    """A call running LiteRT's interpreter (``resolver``: its op resolver, default its default) on ``values``."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_content=data, **({} if resolver is None else {"experimental_op_resolver_type": resolver}))
    ins, outs = interp.get_input_details(), interp.get_output_details()
    if any(tuple(d["shape"]) != v.shape for d, v in zip(ins, values)):
        for d, v in zip(ins, values):
            interp.resize_tensor_input(d["index"], list(v.shape))
    interp.allocate_tensors()

    def run() -> list[np.ndarray]:
        for d, v in zip(ins, values):
            interp.set_tensor(d["index"], v)
        interp.invoke()
        return [interp.get_tensor(o["index"]) for o in outs]

    return run


def _tflite_at_batch(model: Model, batch: int) -> Model:
    """``model`` run at ``batch`` rows: itself when that is its batch, else its fixed batch of 1 re-stamped."""
    from .batching.buckets import batch_layout, batchable

    if {s.shape[0] for s in model.inputs if s.shape} == {batch}:
        return model
    if model.stateful or batch_layout(model) != "fixed1":
        raise InputError(f"{model.source}: inputs {[str(s) for s in model.inputs]} fix the batch"
                         f"{' and it keeps state' if model.stateful else ''}; it cannot run at batch {batch}")
    return batchable(model, batch)


def _needs_restamp(proto: Any, batch: int) -> bool:
    inits = {i.name for i in proto.graph.initializer}
    for i in proto.graph.input:
        if i.name in inits:
            continue
        dims = i.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value != batch:
            return True
    return False


def _max_abs(a: Any, b: Any) -> float:
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return math.inf
    if a.dtype.kind in "fc":
        return float(np.nanmax(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0
    return float(np.max(np.abs(a.astype(np.int64) - b.astype(np.int64)))) if a.size else 0.0


def geomean(values: Sequence[float]) -> float:
    vals = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else float("nan")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``rows`` (dicts) over ``columns``."""

    def fmt(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.3f}"
        return str(v)

    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    sep = "  ".join("-" * w for w in widths)
    body = "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)
    return f"{line}\n{sep}\n{body}"


def light_models() -> list[Path]:
    """The nine small real CNNs the onnx wheel ships (``backend/test/data/light``)."""
    import onnx

    return sorted((Path(onnx.__file__).parent / "backend" / "test" / "data" / "light").glob("*.onnx"))


def model_summary(model: Model) -> dict[str, Any]:
    return model.info()
