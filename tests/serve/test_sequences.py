"""Stateful models served with one state per stream (Triton's sequence_id / sequence_start / sequence_end).

Two TFLite models: an accumulator built here (a resource variable, ``acc += x``, whose output is the
running sum, so each stream's answer says whose state it ran on) and the committed streaming LSTM
fixture. Streams batch together; each stream's requests run in order on its own state, and the answers
equal a lone ``Model`` stepped through the same stream.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

import jaxinfer
from jaxinfer.batching import (BatcherConfig, BucketedModel, BucketPolicy, DynamicBatcher, LatencyModel,
                               SequenceError, SequenceLimitError, SequencePolicy, StreamRef, stream_of)
from jaxinfer.converters.tflite import load_tflite
from jaxinfer.serve.config import ConfigError, ModelConfig
from jaxinfer.serve.repository import ModelVersion

from ..converters.tflite.builder import accumulator_model

LSTM = Path(__file__).parents[1] / "fixtures" / "tflite" / "lstm_stream.tflite"
START = 0.5  # the accumulator's initial value


def _accumulator(state_shape: tuple[int, ...] = (1, 4)) -> bytes:
    return accumulator_model(state_shape, START)


def _steps(streams: int, steps: int, shape: tuple[int, ...], seed: int = 0) -> dict[int, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return {k: [rng.standard_normal(shape).astype(np.float32) for _ in range(steps)] for k in range(1, streams + 1)}


def _stepped(make_model, xs: list[np.ndarray], name: str) -> list[np.ndarray]:
    """The reference: one Model per stream, run step by step (as LiteRT's interpreter keeps state)."""
    m = make_model()
    return [next(iter(m.run({name: x}).values())) for x in xs]


@pytest.fixture(scope="module")
def lstm_bucketed() -> tuple[BucketedModel, LatencyModel]:
    bm = BucketedModel(jaxinfer.load(LSTM), BucketPolicy.for_max_batch(4))
    return bm, LatencyModel(bm.warmup(timing_runs=1))


@pytest.mark.parametrize("order", ["step-major", "stream-major"])
def test_streams_batch_together_each_on_its_own_state(lstm_bucketed, order):
    """5 streams x 4 steps queued at once: every answer equals its stream stepped alone, batches hold
    several streams, and nothing compiles after warm-up."""
    bm, lat = lstm_bucketed
    streams = _steps(5, 4, (1, 10, 40))
    want = {k: _stepped(lambda: jaxinfer.load(LSTM), xs, "frames") for k, xs in streams.items()}
    sizes = []
    keys = [(k, s) for s in range(4) for k in streams] if order == "step-major" else \
        [(k, s) for k in streams for s in range(4)]
    # the batch cap fixed at max_batch (a noisy one-run latency model may say batching gains nothing on
    # this CPU, and cap batches at 1), and all 20 requests queued before the loop takes any (on a loaded
    # machine it could otherwise run each alone as it arrives): so batches must hold several streams
    with DynamicBatcher(bm, lat, BatcherConfig(adaptive_cap=False), on_batch=lambda r: sizes.append(r.requests)) as b:
        with b._cond:
            futs = {(k, s): b.submit({"frames": streams[k][s]}, sequence=StreamRef(k, start=s == 0, end=s == 3))
                    for k, s in keys}
        for (k, s), f in futs.items():
            np.testing.assert_allclose(f.result(timeout=60)["seq"], want[k][s], rtol=1e-5, atol=1e-6)
    assert max(sizes) > 1, sizes
    assert bm.late_compiles == 0
    assert bm.sequences.active() == []  # every stream ended


def test_stream_restart_resets_its_state():
    bm = BucketedModel(load_tflite(_accumulator()), BucketPolicy.for_max_batch(2))
    bm.warmup(timing_runs=0)
    one = np.ones((1, 4), np.float32)
    assert bm.run({"x": one}, StreamRef("a", start=True))["s"][0, 0] == START + 1
    assert bm.run({"x": one}, StreamRef("a"))["s"][0, 0] == START + 2
    assert bm.run({"x": one}, StreamRef("a", start=True))["s"][0, 0] == START + 1  # a new start: fresh state
    assert bm.run({"x": one}, StreamRef("a", end=True))["s"][0, 0] == START + 2
    with pytest.raises(SequenceError, match="not active"):
        bm.run({"x": one}, StreamRef("a"))


def test_state_without_a_batch_row_serves_each_stream_alone():
    """A state of shape [4] (no batch row) cannot be stacked: the model is served unbatched, one state per
    stream all the same."""
    model = load_tflite(_accumulator((4,)))
    bm = BucketedModel(model, BucketPolicy.for_max_batch(8))
    assert bm.layout == "none" and bm.policy.max_batch == 1
    lat = LatencyModel(bm.warmup(timing_runs=0))
    streams = _steps(3, 3, (4,), seed=1)
    with DynamicBatcher(bm, lat) as b:
        futs = {(k, s): b.submit({"x": xs[s]}, sequence=StreamRef(k, start=s == 0))
                for s in range(3) for k, xs in streams.items()}
        for (k, s), f in futs.items():
            np.testing.assert_allclose(f.result(timeout=30)["s"], START + sum(streams[k][: s + 1]), rtol=1e-6)
    assert sorted(bm.sequences.active()) == [1, 2, 3]


def test_request_errors_name_what_is_wrong():
    bm = BucketedModel(load_tflite(_accumulator()), BucketPolicy.for_max_batch(4))
    one = {"x": np.ones((1, 4), np.float32)}
    with pytest.raises(SequenceError, match="stateful: each request needs a sequence_id"):
        bm.prepare(one)
    with pytest.raises(jaxinfer.InputError, match="has 2 rows; a request of a stateful model's sequence carries one"):
        bm.prepare({"x": np.ones((2, 4), np.float32)}, StreamRef(1, start=True))
    with pytest.raises(jaxinfer.InputError, match=r"are the model's state, kept by the server"):
        bm.prepare({**one, "var:acc": np.ones((1, 4), np.float32)}, StreamRef(1, start=True))
    with pytest.raises(jaxinfer.InputError, match=r"unknown input name\(s\) \['y'\]; this model takes \['x'\]"):
        bm.prepare({**one, "y": np.ones((1, 4), np.float32)}, StreamRef(1, start=True))
    for bad in (0, -1, 2**64, 1.5, True, "", "x" * 257, [1]):
        with pytest.raises(SequenceError, match="sequence_id must be"):
            StreamRef(bad)  # type: ignore[arg-type]
    with pytest.raises(SequenceError, match="sequence_start must be true or false"):
        stream_of({"sequence_id": 3, "sequence_start": "yes"})
    with pytest.raises(SequenceError, match="need a sequence_id"):
        stream_of({"sequence_start": True})
    assert stream_of({"sequence_id": 0}) is None and stream_of({}) is None
    assert stream_of({"sequence_id": "mic-7", "sequence_end": True}) == StreamRef("mic-7", end=True)


def test_stream_limit_and_idle_streams_make_room():
    bm = BucketedModel(load_tflite(_accumulator()), BucketPolicy.for_max_batch(2),
                       SequencePolicy(max_sequences=2, idle_s=0.2))
    bm.warmup(timing_runs=0)
    one = {"x": np.ones((1, 4), np.float32)}
    bm.run(one, StreamRef(1, start=True))
    bm.run(one, StreamRef(2, start=True))
    with pytest.raises(SequenceLimitError, match="already keeps 2 active sequences"):
        bm.run(one, StreamRef(3, start=True))
    bm.run(one, StreamRef(2, end=True))  # an ended stream frees its place
    bm.run(one, StreamRef(3, start=True))
    time.sleep(0.3)  # both streams go quiet: a new one may take an idle one's place
    bm.run(one, StreamRef(4, start=True))
    assert sorted(bm.sequences.active()) == [4]
    with pytest.raises(SequenceError, match="not active"):
        bm.run(one, StreamRef(1))


def test_config_keys_and_response_cache_refused():
    cfg = ModelConfig.from_dict({"max_sequences": 8, "sequence_idle_ms": 500})
    assert cfg.sequences() == SequencePolicy(8, 0.5)
    for bad in ({"max_sequences": 0}, {"max_sequences": "many"}, {"sequence_idle_ms": float("nan")},
                {"sequence_idle_ms": -1}, {"sequence_idle_ms": True}):
        with pytest.raises(ConfigError):
            ModelConfig.from_dict(bad)
    with pytest.raises(ConfigError, match="stateful: a cached answer would skip its state update"):
        ModelVersion("acc", 1, load_tflite(_accumulator()), ModelConfig(response_cache=16))


def test_tritonclient_streams_over_http():
    """The real server and tritonclient's sequence arguments: interleaved streams (integer and string ids),
    their answers against LiteRT-style stepping, the errors, and the active-streams gauge."""
    server = jaxinfer.serve(jaxinfer.load(LSTM), port=0, compilation_cache=False, max_batch=4, name="lstm")
    try:
        client = triton.InferenceServerClient(server.url.removeprefix("http://"))
        streams = _steps(2, 3, (1, 10, 40), seed=2)
        want = {k: _stepped(lambda: jaxinfer.load(LSTM), xs, "frames") for k, xs in streams.items()}
        ids = {1: 42, 2: "mic-2"}
        for s in range(3):
            for k, xs in streams.items():
                inp = triton.InferInput("frames", [1, 10, 40], "FP32")
                inp.set_data_from_numpy(xs[s], binary_data=s % 2 == 0)
                r = client.infer("lstm", [inp], sequence_id=ids[k], sequence_start=s == 0, sequence_end=s == 2 and k == 1)
                np.testing.assert_allclose(r.as_numpy("seq"), want[k][s], rtol=1e-5, atol=1e-6)
        metrics = httpx.get(server.url + "/metrics").text
        assert 'jaxinfer_sequences_active{model="lstm",version="1"} 1.0' in metrics  # 42 ended, mic-2 goes on
        assert client.get_model_config("lstm")["sequence_batching"]["max_sequences"] == 1024

        body = {"inputs": [{"name": "frames", "shape": [1, 10, 40], "datatype": "FP32", "data": [0.0] * 400}]}
        cases = [({}, 400, "needs a sequence_id"),
                 ({"sequence_id": 42}, 400, "not active"),  # ended above
                 ({"sequence_id": 1.5, "sequence_start": True}, 400, "sequence_id must be")]
        for params, status, text in cases:
            r = httpx.post(server.url + "/v2/models/lstm/infer", json={**body, "parameters": params})
            assert r.status_code == status and text in r.json()["error"], (params, r.text)
    finally:
        server.stop()
