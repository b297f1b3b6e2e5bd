"""Adversarial checks of stateful serving (one state per stream): the stream's life as the batcher sees it.

The accumulator model (``acc += x``, answers the running sum) makes whose state a request ran on
obvious. Requests are held in the queue by slowing one stream's dispatch, so each race is exact.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time

import httpx
import numpy as np
import pytest

import jaxinfer
from jaxinfer.batching import (BucketedModel, BucketPolicy, DynamicBatcher, LatencyModel, RequestTimeoutError,
                               SequenceError, SequencePolicy, StreamRef, stream_of)
from jaxinfer.converters.tflite import load_tflite

from .test_sequences import START, _accumulator

ONE = {"x": np.ones((1, 4), np.float32)}


def _batcher(policy: SequencePolicy | None = None, slow: object = None, delay_s: float = 0.3) -> DynamicBatcher:
    """A started batcher on a fresh accumulator whose batches holding stream ``slow`` start ``delay_s`` late."""
    bm = BucketedModel(load_tflite(_accumulator()), BucketPolicy.for_max_batch(4), policy)
    lat = LatencyModel(bm.warmup(timing_runs=0))
    dispatch = bm.dispatch

    def slowed(parts):
        if any(p.sequence.id == slow for p in parts):
            time.sleep(delay_s)
        return dispatch(parts)

    bm.dispatch = slowed  # type: ignore[method-assign]
    return DynamicBatcher(bm, lat).start()


def _sum(fut) -> float:
    return float(fut.result(timeout=30)["s"][0, 0])


def test_step_after_a_queued_end_and_restart_runs_on_the_new_stream():
    """[end, start] of one id queued, then a step sent while the restart waits: the step was refused
    ('not active', the end had run and the start not yet) though the client sent them in a valid order."""
    b = _batcher(slow="a")
    try:
        assert b.run(ONE, sequence=StreamRef("a", start=True))["s"][0, 0] == START + 1
        end = b.submit(ONE, sequence=StreamRef("a", end=True))
        restart = b.submit(ONE, sequence=StreamRef("a", start=True))
        _sum(end)  # the restart is now held in its (slowed) dispatch
        step = b.submit(ONE, sequence=StreamRef("a"))
        assert (_sum(end), _sum(restart), _sum(step)) == (START + 2, START + 1, START + 2)
        last = b.submit(ONE, sequence=StreamRef("a", end=True))
        with pytest.raises(SequenceError, match="not active"):  # a step after an admitted end is refused at once
            b.submit(ONE, sequence=StreamRef("a"))
        assert _sum(last) == START + 3
    finally:
        b.stop()


def test_a_stream_with_requests_waiting_is_never_dropped_as_idle():
    """max_sequences 2: a new stream evicted stream 1 while its request was still queued, failing that
    request ('has no state') and the later one."""
    b = _batcher(SequencePolicy(max_sequences=2, idle_s=0.1), slow=1, delay_s=0.4)
    try:
        b.run(ONE, sequence=StreamRef(1, start=True))
        b.run(ONE, sequence=StreamRef(2, start=True))
        first, second = (b.submit(ONE, sequence=StreamRef(1)) for _ in range(2))
        time.sleep(0.2)  # stream 1 was admitted 0.2 s ago, stream 2 is idle
        b.run(ONE, sequence=StreamRef(3, start=True))  # takes idle stream 2's place, not busy stream 1's
        assert (_sum(first), _sum(second)) == (START + 2, START + 3)
        assert sorted(b.model.sequences.active()) == [1, 3]
        with pytest.raises(SequenceError, match="not active"):
            b.run(ONE, sequence=StreamRef(2))
    finally:
        b.stop()


def test_an_ended_stream_is_freed_even_when_its_end_request_times_out():
    """An end request that timed out in the queue left its stream active (counted against max_sequences)."""
    b = _batcher(slow="blocker")
    try:
        b.run(ONE, sequence=StreamRef("c", start=True))
        b.submit(ONE, sequence=StreamRef("blocker", start=True))
        end = b.submit(ONE, sequence=StreamRef("c", end=True), timeout_s=0.05)
        with pytest.raises(RequestTimeoutError):
            end.result(timeout=30)
        deadline = time.monotonic() + 5
        while "blocker" not in b.model.sequences.active() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert b.model.sequences.active() == ["blocker"]
    finally:
        b.stop()


def test_a_step_whose_caller_gave_up_while_it_ran_does_not_move_its_stream():
    """A request cancelled (timed out) while its batch ran stepped its stream all the same, so the caller,
    told it failed, sent it again and the step counted twice. Now the stream stays where it was."""
    b = _batcher(slow="a", delay_s=0.4)
    try:
        assert _sum(b.submit(ONE, sequence=StreamRef("a", start=True))) == START + 1  # slowed too
        lost = b.submit(ONE, sequence=StreamRef("a"))
        time.sleep(0.15)  # taken by the loop: its batch is running (in the slowed dispatch)
        assert b.queued() == 0 and lost.cancel()  # what the HTTP layer does on a timeout
        assert _sum(b.submit(ONE, sequence=StreamRef("a"))) == START + 2  # not + 3
        kept = b.submit(ONE, sequence=StreamRef("a"))
        assert _sum(kept) == START + 3
        assert not kept.cancel()  # answered; a claimed request cannot be cancelled either
    finally:
        b.stop()


def test_http_timeout_of_a_running_step_is_a_504_and_the_stream_does_not_move():
    server = jaxinfer.serve(load_tflite(_accumulator()), port=0, compilation_cache=False, max_batch=4, name="acc",
                            timeout_ms=150)
    try:
        mv = server.repo.get("acc")
        real, gate = mv.bucketed.dispatch, __import__("threading").Event()
        with httpx.Client(timeout=30) as c:
            r = _post(c, server.url, np.ones((1, 4), np.float32), sequence_id=5, sequence_start=True)
            assert r.status_code == 200 and r.json()["outputs"][0]["data"][0] == START + 1
            mv.bucketed.dispatch = lambda parts: (gate.wait(10), real(parts))[1]  # a slow device
            r = _post(c, server.url, np.ones((1, 4), np.float32), sequence_id=5)
            assert r.status_code == 504, r.text
            assert "stream 5 was not stepped by it" in r.json()["error"], r.text
            gate.set()
            mv.bucketed.dispatch = real
            time.sleep(0.2)  # the slowed batch completes (without storing the state)
            r = _post(c, server.url, np.ones((1, 4), np.float32), sequence_id=5)
            assert r.status_code == 200 and r.json()["outputs"][0]["data"][0] == START + 2, r.text
    finally:
        gate.set()
        server.stop()


def test_false_and_float_zero_are_refused_as_sequence_ids():
    """false and 0.0 were taken for "no sequence" (== 0), answered with 'need a sequence_id'."""
    for sid in (False, 0.0):
        with pytest.raises(SequenceError, match=r"sequence_id must be .*got (False|0\.0)"):
            stream_of({"sequence_id": sid, "sequence_start": True})
    assert stream_of({"sequence_id": 0, "sequence_start": False}) is None


@pytest.fixture(scope="module")
def server():
    s = jaxinfer.serve(load_tflite(_accumulator()), port=0, compilation_cache=False, max_batch=8, name="acc",
                       max_queue_delay_ms=2)
    yield s
    s.stop()


def _post(client: httpx.Client, url: str, x: np.ndarray, **params) -> httpx.Response:
    body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": x.ravel().tolist()}],
            "parameters": params}
    return client.post(url + "/v2/models/acc/infer", json=body)


def test_a_20000_digit_sequence_id_is_a_400(server):
    """Python's json refuses integers of over 4300 digits with a ValueError, which answered 500."""
    body = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [0, 0, 0, 0]}],
                       "parameters": {"sequence_id": 7, "sequence_start": True}})
    r = httpx.post(server.url + "/v2/models/acc/infer", content=body.replace('"sequence_id": 7', '"sequence_id": '
                                                                            + "9" * 20000))
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text


def test_one_stream_pipelined_over_many_connections_runs_each_step_once_in_order(server):
    """12 steps of one stream sent at once over 12 connections, beside 4 other streams: each answer is the
    sum of the steps before it in some single order (x = 2**i makes that order readable), none is lost."""
    url, k = server.url, 12
    with httpx.Client() as c:
        assert _post(c, url, np.zeros((1, 4), np.float32), sequence_id="pipe", sequence_start=True).status_code == 200
    clients = [httpx.Client(timeout=30) for _ in range(k)]

    def step(i: int) -> tuple[int, float]:
        r = _post(clients[i], url, np.full((1, 4), 2.0 ** i, np.float32), sequence_id="pipe")
        assert r.status_code == 200, r.text
        return i, r.json()["outputs"][0]["data"][0] - START

    def other(sid: int) -> None:
        for s in range(4):
            r = _post(clients[sid % k], url, np.full((1, 4), sid, np.float32), sequence_id=sid,
                      sequence_start=s == 0, sequence_end=s == 3)
            assert r.status_code == 200 and r.json()["outputs"][0]["data"][0] == START + sid * (s + 1), r.text

    try:
        with cf.ThreadPoolExecutor(8) as ex:
            others = [ex.submit(other, sid) for sid in range(1, 5)]
            answers = sorted((total, i) for i, total in ex.map(step, range(k)))
            for f in others:
                f.result()
    finally:
        for c in clients:
            c.close()
    before = 0
    for total, i in answers:
        assert total == before + 2 ** i, answers
        before = total
    assert before == 2 ** k - 1
