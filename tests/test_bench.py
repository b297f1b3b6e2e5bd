"""bench: the timing helpers behind ``jaxinfer bench`` and benchmarks/."""

from __future__ import annotations

from jaxinfer import bench


def test_blocked_times_each_callable_in_rotated_blocks():
    order: list[str] = []
    ms = bench.blocked([lambda: order.append("a"), lambda: order.append("b")], runs=4, rounds=2)
    assert len(ms) == 2 and all(m >= 0 for m in ms)
    # per round: one untimed call, then ceil(4 / 2) = 2 timed calls, a's block before b's
    assert "".join(order) == "aaabbb" * 2


def test_blocked_keeps_calling_until_the_block_lasted_min_block_s(monkeypatch):
    """Each call advances a fake clock by 2 ms (a real sleep overshoots on a busy host: a GPU host's
    run made 9 calls where 15 were due)."""
    now = [0.0]
    calls: list[str] = []

    def slow() -> None:
        calls.append("s")
        now[0] += 0.002

    monkeypatch.setattr(bench.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(bench.time, "sleep", lambda s: None)
    bench.blocked([slow], runs=1, rounds=1, min_block_s=0.03)
    # one untimed call, then timed calls until 30 ms passed: well over the one call runs=1 asks for
    assert len(calls) - 1 in (15, 16)


def test_interleaved_alternates_calls():
    order: list[str] = []
    bench.interleaved([lambda: order.append("a"), lambda: order.append("b")], runs=2, warmup=1)
    assert "".join(order) == "ababab"


def test_onnxruntime_runs_where_jax_runs(monkeypatch):
    """On a GPU run onnxruntime takes its CUDA provider when it has one, and the report names both."""
    import jax
    import onnxruntime as ort

    assert bench.ort_providers() == ["CPUExecutionProvider"]
    d = jax.devices()[0]
    assert bench.devices() == {"jaxinfer": f"{d.platform}: {d.device_kind}", "onnxruntime": "CPUExecutionProvider"}
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert bench.ort_providers()[0] == "CUDAExecutionProvider"
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert bench.ort_providers() == ["CPUExecutionProvider"]  # the image's CPU-only build: CPU, and said so
