"""``jaxinfer.quantize`` on TFLite float graphs: FULLY_CONNECTED, CONV_2D and BATCH_MATMUL weights become
int8 (weight-only, dynamic, static); bf16/fp16/mixed run TFLite's own CAST nodes; already-quantized
(int8, hybrid) kernels are left alone; a stateful model is neither advanced nor returned advanced."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jaxinfer
from jaxinfer import arith
from jaxinfer.converters.tflite import load_tflite

from ..converters.tflite.builder import ModelBuilder

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tflite"
RNG = np.random.default_rng(11)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _mlp() -> bytes:
    """x[4, 256] -> FC 256 (relu) -> x @ M[256, 64] (BATCH_MATMUL) -> x @ N[32, 64]^T (adj_y) -> SOFTMAX."""
    b = ModelBuilder()
    x = b.input("x", (4, 256))
    w1 = b.const("fc1_w", (RNG.standard_normal((256, 256)) / 16).astype(np.float32))
    b1 = b.const("fc1_b", RNG.standard_normal(256).astype(np.float32) * 0.1)
    h1, h2, h3, y = b.tensor("h1", (4, 256)), b.tensor("h2", (4, 64)), b.tensor("h3", (4, 32)), b.tensor("y", (4, 32))
    b.op("FULLY_CONNECTED", [x, w1, b1], [h1], "FullyConnectedOptions", fused_activation_function=1)
    m = b.const("mat_m", (RNG.standard_normal((256, 64)) / 16).astype(np.float32))
    b.op("BATCH_MATMUL", [h1, m], [h2], "BatchMatMulOptions", adj_x=False, adj_y=False)
    n = b.const("mat_n", (RNG.standard_normal((32, 64)) / 8).astype(np.float32))
    b.op("BATCH_MATMUL", [h2, n], [h3], "BatchMatMulOptions", adj_x=False, adj_y=True)
    b.op("SOFTMAX", [h3], [y], "SoftmaxOptions", beta=1.0)
    b.outputs(y)
    return b.finish()


def _batches(model: jaxinfer.Model, n: int = 4) -> list[dict[str, np.ndarray]]:
    return [{s.name: RNG.standard_normal(s.shape).astype(np.float32) for s in model.inputs} for _ in range(n)]


@pytest.mark.parametrize("method", ["int8-weight", "int8-dynamic", "int8-static"])
def test_int8_fc_and_batch_matmul(method):
    model = load_tflite(_mlp())
    data = _batches(model)
    q = jaxinfer.quantize(model, method, calibration=data)
    rows = {r["weight"]: r for r in q.report().rows}
    assert set(rows) == {"fc1_w", "mat_m", "mat_n"} and all(r["method"] == method for r in rows.values())
    assert all(arith.kind(q.params[w]) == method for w in rows)
    assert rows["fc1_w"]["ratio"] >= 3.9  # int8 values plus one float32 scale per output channel: 4K / (K + 4)
    for feeds in data:
        assert _cos(model.run(feeds)["y"], q.run(feeds)["y"]) >= 0.999


@pytest.mark.parametrize("method", ["int8-weight", "int8-dynamic", "int8-static"])
def test_int8_conv_fixture(method):
    """The committed float conv stack: its four CONV_2D weights (OHWI) quantized per output channel; the
    depthwise layers stay float."""
    model = jaxinfer.load(FIXTURES / "conv_f32.tflite")
    data = _batches(model, 2)
    q = jaxinfer.quantize(model, method, calibration=data)
    report = q.report()
    assert [r["op"] for r in report.rows] == ["CONV_2D"] * 4
    assert report.totals["quantized_layers"] == 4
    assert _cos(model.run(data[0])["z3"], q.run(data[0])["z3"]) >= 0.999


@pytest.mark.parametrize("method", ["bf16", "fp16", "mixed"])
def test_reduced_precision_uses_tflite_casts(method):
    model = load_tflite(_mlp())
    q = jaxinfer.quantize(model, method)
    casts = [n for n in q.graph.nodes if n.op_type == "CAST"]
    assert casts and all(n.domain == "tflite" for n in casts)
    if method != "mixed":  # the softmax reads float32
        softmax = next(n for n in q.graph.nodes if n.op_type == "SOFTMAX")
        feeding = next(n for n in casts if n.outputs[0] == softmax.inputs[0])
        assert feeding.attrs["out_dtype"] == np.float32
    feeds = _batches(model, 1)[0]
    out = q.run(feeds)["y"]
    assert out.dtype == np.float32
    assert _cos(model.run(feeds)["y"], out) >= 0.999


def test_quantized_tflite_kernels_are_left_alone():
    """A full-integer and a hybrid model: their kernels keep their own integer arithmetic (the same
    outputs), nothing is re-quantized."""
    for name in ("conv_int8.tflite", "hybrid_mlp.tflite"):
        model = jaxinfer.load(FIXTURES / name)
        feeds = {s.name: (RNG.integers(-100, 100, s.shape) if np.dtype(s.dtype).kind == "i"
                          else RNG.standard_normal(s.shape)).astype(s.dtype) for s in model.inputs}
        want = next(iter(model.run(feeds).values()))
        for method in ("mixed", "int8-dynamic"):
            q = jaxinfer.quantize(model, method)
            assert q.report().totals["quantized_layers"] == 0
            np.testing.assert_array_equal(next(iter(q.run(feeds).values())), want)


def test_save_and_load_a_quantized_tflite_model(tmp_path):
    model = load_tflite(_mlp())
    data = _batches(model, 2)
    q = jaxinfer.quantize(model, "int8-static", calibration=data)
    jaxinfer.save(q, tmp_path / "q")
    back = jaxinfer.load(tmp_path / "q")
    np.testing.assert_array_equal(back.run(data[0])["y"], q.run(data[0])["y"])


def test_stateful_model_is_not_advanced_by_quantize():
    """Calibration and the report step a stateful model; quantize restores the model's own state and
    returns the new model at its initial state, so both step through a stream alike."""
    model = jaxinfer.load(FIXTURES / "lstm_stream.tflite")
    feeds = _batches(model, 1)[0]
    model.run(feeds)  # the caller's stream is one step in
    mid = {k: np.asarray(v).copy() for k, v in model.state.items()}
    q = jaxinfer.quantize(model, "bf16", calibration=[feeds] * 3)
    assert all(np.array_equal(mid[k], np.asarray(model.state[k])) for k in mid)
    model.reset_state()
    for _ in range(3):
        assert _cos(model.run(feeds)["seq"], q.run(feeds)["seq"]) >= 0.9999
    pruned = jaxinfer.prune(model, 0.25, calibration=[feeds] * 2)
    assert all(np.array_equal(np.asarray(pruned.state[k]), np.asarray(v)) for k, v in model.graph.state_init.items())
