"""The dynamic batcher: every caller gets its own result or exception; limits, SLA, drain."""

from __future__ import annotations

import threading
import time

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer.batching import (BatcherConfig, BatcherStoppedError, BucketedModel, BucketPolicy, DynamicBatcher,
                               LatencyModel, QueueFullError, RequestTimeoutError)

from jaxinfer.batching import batcher as batcher_module

from .models import mlp_proto, mlp_reference


@pytest.fixture(scope="module")
def warm_model():
    proto = mlp_proto(seed=3)
    bm = BucketedModel(jaxinfer.load(proto), BucketPolicy.for_max_batch(8))
    return proto, bm, bm.warmup()


@pytest.fixture(params=["inline", "completion-thread"])
def bucketed(request, warm_model, monkeypatch):
    """Each batcher test twice: CPU batches answered on the loop thread (they are computed when their
    run returns), and as on an accelerator, where a completion thread waits for them."""
    if request.param == "completion-thread":
        monkeypatch.setattr(batcher_module, "_ready", lambda outputs: False)
    return warm_model


def test_latency_model_interpolates_and_updates():
    lat = LatencyModel({1: 0.01, 4: 0.04})
    assert lat.estimate(2) == pytest.approx(0.02)
    assert lat.estimate(8) == pytest.approx(0.08)
    lat.update(1, 0.02)
    assert 0.01 < lat.estimate(1) < 0.02
    assert LatencyModel().estimate(3) == 0.0


def test_useful_batch_follows_throughput():
    gpu_like = LatencyModel({1: 0.010, 2: 0.011, 4: 0.012, 8: 0.014})
    assert gpu_like.useful_batch((1, 2, 4, 8)) == 8
    cpu_like = LatencyModel({1: 0.070, 2: 0.150, 4: 0.300, 8: 0.700})  # no gain from batching
    assert cpu_like.useful_batch((1, 2, 4, 8)) == 1


def test_config_validation():
    with pytest.raises(ValueError, match="queue_size"):
        BatcherConfig(queue_size=0)
    with pytest.raises(ValueError, match="sla_ms"):
        BatcherConfig(sla_ms=-1)


def test_concurrent_callers_get_their_own_rows(bucketed):
    proto, bm, timings = bucketed
    reports = []
    b = DynamicBatcher(bm, LatencyModel(timings), BatcherConfig(max_queue_delay_ms=20, adaptive_cap=False,
                                                                 max_in_flight=1), on_batch=reports.append)
    rng = np.random.default_rng(0)
    xs = [rng.standard_normal((1 + i % 3, 8)).astype(np.float32) for i in range(40)]
    results: dict[int, dict] = {}
    real, gate = bm.dispatch, threading.Event()
    with b:
        def call(i):
            results[i] = b.submit({"x": xs[i]}).result(10)
        try:
            bm.dispatch = lambda parts: (gate.wait(5), real(parts))[1]  # a busy device: requests gather
            threads = [threading.Thread(target=call, args=(i,)) for i in range(len(xs))]
            for t in threads:
                t.start()
            time.sleep(0.2)
            gate.set()
            for t in threads:
                t.join()
        finally:
            bm.dispatch = real
    for i, x in enumerate(xs):
        np.testing.assert_allclose(results[i]["y"], mlp_reference(proto, x)["y"], rtol=1e-5, atol=1e-5)
    assert max(r.rows for r in reports) > 1  # batching happened
    assert all(r.rows <= 8 for r in reports)
    assert bm.late_compiles == 0


def test_oversize_request_is_split(bucketed):
    proto, bm, timings = bucketed
    x = np.random.default_rng(2).standard_normal((21, 8)).astype(np.float32)
    with DynamicBatcher(bm, LatencyModel(timings)) as b:
        out = b.submit({"x": x}).result(10)
    np.testing.assert_allclose(out["z"], mlp_reference(proto, x)["z"], rtol=1e-5, atol=1e-5)


def test_request_that_can_never_fit_the_queue_is_a_400_not_a_429(bucketed):
    """Split into more parts than queue_size, a request could never be queued: retrying would not help."""
    _, bm, timings = bucketed
    with DynamicBatcher(bm, LatencyModel(timings), BatcherConfig(queue_size=2)) as b:
        x = np.ones((24, 8), np.float32)  # 3 parts of max_batch 8
        with pytest.raises(jaxinfer.InputError, match="splits into 3 batches .* at most 16 rows"):
            b.submit({"x": x})
        assert b.submit({"x": x[:16]}).result(10)["z"].shape[0] == 16


def test_full_queue_refuses_at_once(bucketed):
    _, bm, timings = bucketed
    b = DynamicBatcher(bm, LatencyModel(timings), BatcherConfig(queue_size=2, max_queue_delay_ms=200,
                                                                 max_in_flight=1))
    b.start()
    gate = threading.Event()
    real = bm.dispatch

    try:
        bm.dispatch = lambda parts: (gate.wait(5), real(parts))[1]  # hold the device
        x = np.ones((8, 8), np.float32)
        first = b.submit({"x": x})  # full batch: dispatched, blocks in dispatch
        time.sleep(0.05)
        queued = [b.submit({"x": x[:1]}), b.submit({"x": x[:1]})]
        with pytest.raises(QueueFullError, match="queue is full"):
            b.submit({"x": x[:1]})
        gate.set()
        first.result(5)
        for f in queued:
            f.result(5)
    finally:
        bm.dispatch = real
        gate.set()
        b.stop()


def test_timeout_and_errors_reach_callers(bucketed):
    _, bm, timings = bucketed
    b = DynamicBatcher(bm, LatencyModel(timings), BatcherConfig(max_in_flight=1))
    b.start()
    real = bm.dispatch
    gate = threading.Event()
    try:
        bm.dispatch = lambda parts: (gate.wait(1), real(parts))[1]
        slow = b.submit({"x": np.ones((8, 8), np.float32)})
        time.sleep(0.05)
        late = b.submit({"x": np.ones((1, 8), np.float32)}, timeout_s=0.05)
        with pytest.raises(RequestTimeoutError):
            late.result(5)
        gate.set()
        slow.result(5)

        def boom(parts):
            raise RuntimeError("device exploded")
        bm.dispatch = boom
        futs = [b.submit({"x": np.ones((1, 8), np.float32)}) for _ in range(3)]
        for f in futs:
            with pytest.raises(RuntimeError, match="device exploded"):
                f.result(5)
    finally:
        bm.dispatch = real
        gate.set()
        b.stop()


def test_cancelled_requests_are_skipped_not_run(bucketed):
    """Callers that gave up (a dropped connection cancels its future) leave the queue without running,
    wherever they sit in it; the others still get their own rows; a stop with only those left ends."""
    _, bm, timings = bucketed
    b = DynamicBatcher(bm, LatencyModel(timings), BatcherConfig(max_in_flight=1, max_queue_delay_ms=1))
    b.start()
    gate = threading.Event()
    real = bm.dispatch
    seen: list[int] = []
    xs = [np.full((1, 8), i, np.float32) for i in range(6)]
    want = [bm.run({"x": x})["y"] for x in xs]
    try:
        def held(parts):
            gate.wait(5)
            seen.append(sum(p.rows for p in parts))
            return real(parts)
        bm.dispatch = held
        first = b.submit({"x": np.ones((8, 8), np.float32)})  # holds the device
        time.sleep(0.05)
        futs = [b.submit({"x": x}) for x in xs]
        for i in (0, 3):  # the head of the queue and one in the middle
            assert futs[i].cancel()
        gate.set()
        first.result(5)
        for i in (1, 2, 4, 5):
            np.testing.assert_allclose(futs[i].result(5)["y"], want[i], rtol=1e-5, atol=1e-5)
        assert sum(seen) == 8 + 4  # the two cancelled rows never reached the device
        assert b.queued() == 0
        gate.clear()
        more = [b.submit({"x": xs[0]}) for _ in range(3)]  # queued behind a held batch, then cancelled
        time.sleep(0.05)
        for f in more[1:]:
            f.cancel()
        gate.set()
    finally:
        bm.dispatch = real
        gate.set()
    t = time.perf_counter()
    b.stop(drain=True, timeout=5)
    assert time.perf_counter() - t < 5 and not b._loop_thread.is_alive()
    assert more[0].result(0)["y"].shape == (1, 4)


def test_idle_device_waits_for_as_many_rows_as_the_last_batch(bucketed):
    """Callers of a batch that just finished tend to send again at once: an idle device gathers up to
    that many rows for at most max_queue_delay; a lone request after a quiet spell runs at once."""
    _, bm, timings = bucketed
    reports = []
    b = DynamicBatcher(bm, LatencyModel(timings), BatcherConfig(max_queue_delay_ms=300, max_in_flight=1,
                                                                 adaptive_cap=False),
                       on_batch=reports.append)
    with b:
        t = time.perf_counter()
        b.submit({"x": np.ones((4, 8), np.float32)}).result(5)  # nothing ran before: at once
        assert time.perf_counter() - t < 0.25
        futs = []
        for _ in range(3):  # the last batch had 4 rows: these gather into one batch
            futs.append(b.submit({"x": np.ones((1, 8), np.float32)}))
            time.sleep(0.03)
        for f in futs:
            assert f.result(5)["y"].shape == (1, 4)
        assert [r.rows for r in reports] == [4, 3]
        time.sleep(0.4)  # a quiet spell longer than max_queue_delay
        t = time.perf_counter()
        b.submit({"x": np.ones((1, 8), np.float32)}).result(5)
        assert time.perf_counter() - t < 0.25
        assert [r.rows for r in reports] == [4, 3, 1]


def test_sla_dispatches_early(bucketed):
    """With a slow bucket-4 latency estimate, waiting for more would miss the SLA: send 1 at once."""
    _, bm, _ = bucketed
    lat = LatencyModel({1: 0.001, 2: 0.002, 4: 0.5, 8: 1.0})
    b = DynamicBatcher(bm, lat, BatcherConfig(sla_ms=100, max_queue_delay_ms=5_000, adaptive_cap=False))
    with b:
        t = time.perf_counter()
        b.submit({"x": np.ones((3, 8), np.float32)}).result(5)  # next batch (4) would take 500 ms > SLA
        assert time.perf_counter() - t < 1.0


def test_drain_on_stop_and_refuse_after(bucketed):
    _, bm, timings = bucketed
    b = DynamicBatcher(bm, LatencyModel(timings), BatcherConfig(max_queue_delay_ms=500))
    b.start()
    futs = [b.submit({"x": np.ones((1, 8), np.float32)}) for _ in range(5)]
    b.stop(drain=True)
    assert all(f.result(0)["y"].shape == (1, 4) for f in futs)
    with pytest.raises(BatcherStoppedError):
        b.submit({"x": np.ones((1, 8), np.float32)})


def test_a_computed_cpu_batch_is_answered_on_the_loop_thread(warm_model, monkeypatch):
    """No hand-off when the run is done on return (CPU) and nothing waits; a pending run goes to the
    completion thread."""
    _, bm, timings = warm_model
    x = np.ones((1, 8), np.float32)
    for ready, thread in ((True, "batcher-m"), (False, "batcher-m-done")):
        monkeypatch.setattr(batcher_module, "_ready", lambda outputs, r=ready: r)
        seen: list[str] = []
        with DynamicBatcher(bm, LatencyModel(timings), BatcherConfig(max_queue_delay_ms=0), name="m",
                            on_batch=lambda r: seen.append(threading.current_thread().name)) as b:
            assert b.submit({"x": x}).result(10)["y"].shape[0] == 1
        assert seen == [thread]


def test_with_requests_waiting_the_completion_thread_answers_while_the_loop_dispatches(warm_model):
    """Answering a batch while others wait would hold back their dispatch: then the completion thread
    answers it; the last batch, with nothing left waiting, is answered on the loop thread."""
    proto, bm, timings = warm_model
    seen: list[str] = []
    real, gate = bm.dispatch, threading.Event()
    xs = [np.full((1, 8), i, np.float32) for i in range(20)]
    # one batch in flight at a time: the last batch is dispatched once the one before it is answered, so
    # nothing is in flight or waiting then (with two in flight, a loaded runner could still be answering
    # the one before and send the last to the completion thread too)
    config = BatcherConfig(max_queue_delay_ms=0, adaptive_cap=False, max_in_flight=1)
    with DynamicBatcher(bm, LatencyModel(timings), config, name="m",
                        on_batch=lambda r: seen.append(threading.current_thread().name)) as b:
        try:
            bm.dispatch = lambda parts: (gate.wait(5), real(parts))[1]  # a busy device: requests gather
            futures = [b.submit({"x": x}) for x in xs]
            gate.set()
            results = [f.result(10) for f in futures]
        finally:
            bm.dispatch = real
    for x, r in zip(xs, results):
        np.testing.assert_allclose(r["y"], mlp_reference(proto, x)["y"], rtol=1e-5, atol=1e-5)
    assert "batcher-m-done" in seen, seen
    if jax.default_backend() == "cpu":  # elsewhere a batch is still running when dispatch returns
        assert seen[-1] == "batcher-m", seen
