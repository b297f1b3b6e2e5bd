"""bench: the timing helpers behind ``jaxinfer bench`` and benchmarks/."""

from __future__ import annotations

from jaxinfer import bench


def test_blocked_times_each_callable_in_rotated_blocks():
    order: list[str] = []
    ms = bench.blocked([lambda: order.append("a"), lambda: order.append("b")], runs=4, rounds=2)
    assert len(ms) == 2 and all(m >= 0 for m in ms)
    # per round: one untimed call, then ceil(4 / 2) = 2 timed calls, a's block before b's
    assert "".join(order) == "aaabbb" * 2


def test_blocked_keeps_calling_until_the_block_lasted_min_block_s():
    import time

    calls: list[str] = []

    def slow() -> None:
        calls.append("s")
        time.sleep(0.002)

    bench.blocked([slow], runs=1, rounds=1, min_block_s=0.03)
    # one untimed call, then timed calls until 30 ms passed: well over the one call runs=1 asks for
    assert 10 <= len(calls) - 1 <= 20


def test_interleaved_alternates_calls():
    order: list[str] = []
    bench.interleaved([lambda: order.append("a"), lambda: order.append("b")], runs=2, warmup=1)
    assert "".join(order) == "ababab"


def test_onnxruntime_runs_where_jax_runs(monkeypatch):
    """On a GPU run onnxruntime takes its CUDA provider when it has one, and the report names both."""
    import jax
    import onnxruntime as ort

    assert bench.ort_providers() == ["CPUExecutionProvider"]
    assert bench.devices() == {"jaxinfer": f"cpu: {jax.devices()[0].device_kind}", "onnxruntime": "CPUExecutionProvider"}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert bench.ort_providers()[0] == "CUDAExecutionProvider"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert bench.ort_providers() == ["CPUExecutionProvider"]  # the image's CPU-only build: CPU, and said so
