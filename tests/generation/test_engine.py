"""The slot scheduler: stop ids, limits, errors, failures inside steps, close, asyncio, and the two policies."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from jaxinfer.batching.batcher import QueueFullError
from jaxinfer.errors import InputError, JaxinferError
from jaxinfer.generation import Decoder, Engine, SamplingParams, generate

PROMPT = [5, 17, 300, 42, 7]


def _greedy(gpt2: Decoder, n: int = 20) -> list[int]:
    return generate(gpt2, PROMPT, n)


def test_stop_ids_and_max_new_tokens_end_a_request(gpt2):
    greedy = _greedy(gpt2)
    stop = greedy[6]
    with Engine(gpt2) as engine:
        stopped = engine.submit(PROMPT, SamplingParams(max_new_tokens=20, stop_ids=(stop, 511)))
        limited = engine.submit(PROMPT, SamplingParams(max_new_tokens=3))
        one = engine.submit(PROMPT, SamplingParams(max_new_tokens=1))
        assert stopped.result(timeout=60) == greedy[: greedy.index(stop) + 1]
        assert stopped.finish_reason == "stop"
        assert limited.result(timeout=60) == greedy[:3] and limited.finish_reason == "length"
        assert one.result(timeout=60) == greedy[:1] and one.finish_reason == "length"
        assert engine.stats()["active_slots"] == 0


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "empty"),
    ([1, 512], SamplingParams(), "outside"),
    ([-1], SamplingParams(), "outside"),
    ([1.5, 2], SamplingParams(), "int token ids"),
    ("hello", SamplingParams(), "sequence of token ids"),
    (list(range(17)), SamplingParams(max_new_tokens=4), "largest prefill bucket"),
    ([1] * 16, SamplingParams(max_new_tokens=113), "exceeds max_len=128"),
    ([1], SamplingParams(temperature=-0.5), "temperature"),
    ([1], SamplingParams(temperature=1e308), "temperature"),  # inf once float32 on the device
    ([1], SamplingParams(top_k=2**31), "top_k"),  # overflowed the engine's int32 top_k array
])
def test_bad_requests_raise_at_submit(gpt2, prompt, params, match):
    with Engine(gpt2) as engine:
        with pytest.raises(InputError, match=match):
            engine.submit(prompt, params)
        assert engine.submit([1, 2], SamplingParams(max_new_tokens=2)).result(timeout=60)  # nothing else affected


def test_queue_full(gpt2, monkeypatch):
    release = threading.Event()
    real = gpt2.prefill

    def held(*args):
        release.wait(30)
        return real(*args)

    monkeypatch.setattr(gpt2, "prefill", held)
    with Engine(gpt2, max_waiting=1) as engine:
        first = engine.submit([1, 2], SamplingParams(max_new_tokens=2))
        deadline = time.monotonic() + 30
        while engine.stats()["waiting"] and time.monotonic() < deadline:  # the thread took it and is held
            time.sleep(0.01)
        second = engine.submit([3], SamplingParams(max_new_tokens=2))
        with pytest.raises(QueueFullError, match="queue full"):
            engine.submit([4], SamplingParams(max_new_tokens=2))
        release.set()
        assert len(first.result(timeout=60)) == len(second.result(timeout=60)) == 2


def test_a_failing_step_fails_its_streams_and_the_engine_keeps_serving(gpt2, monkeypatch):
    real_decode, real_prefill = gpt2.decode, gpt2.prefill
    calls = {"decode": 0}

    def broken_decode(*args):
        calls["decode"] += 1
        if calls["decode"] == 3:
            raise RuntimeError("device fell over")
        return real_decode(*args)

    def broken_prefill(slot, prompt, params):
        if prompt == [13, 13]:
            raise RuntimeError("bad prefill")
        return real_prefill(slot, prompt, params)

    monkeypatch.setattr(gpt2, "decode", broken_decode)
    monkeypatch.setattr(gpt2, "prefill", broken_prefill)
    with Engine(gpt2) as engine:
        bad = engine.submit([13, 13], SamplingParams(max_new_tokens=5))
        with pytest.raises(RuntimeError, match="bad prefill"):
            bad.result(timeout=60)
        a = engine.submit(PROMPT, SamplingParams(max_new_tokens=10))
        with pytest.raises(RuntimeError, match="device fell over"):
            a.result(timeout=60)
        assert a.finish_reason == "error" and bad.finish_reason == "error"
        assert engine.submit(PROMPT, SamplingParams(max_new_tokens=10)).result(timeout=60) == _greedy(gpt2, 10)
        assert engine.stats()["errors"] == 2


def test_close_fails_pending_streams_and_refuses_new_ones(gpt2):
    engine = Engine(gpt2)
    streams = [engine.submit(PROMPT, SamplingParams(max_new_tokens=100)) for _ in range(6)]
    engine.close()
    for s in streams:
        assert s.done
    assert any(s.finish_reason == "error" for s in streams)
    with pytest.raises(JaxinferError, match="closed"):
        streams[-1].result(timeout=1)
    with pytest.raises(JaxinferError, match="closed"):
        engine.submit(PROMPT)
    with Engine(gpt2) as again:  # the decoder is free for the next engine
        assert again.submit(PROMPT, SamplingParams(max_new_tokens=2)).result(timeout=60)


def test_one_engine_per_decoder(gpt2):
    with Engine(gpt2):
        with pytest.raises(JaxinferError, match="already has a running Engine"):
            Engine(gpt2)


def test_stream_iteration_asyncio_and_timings(gpt2):
    want = _greedy(gpt2, 12)

    async def consume(stream):
        return [t async for t in stream]

    with Engine(gpt2) as engine:
        blocking = engine.submit(PROMPT, SamplingParams(max_new_tokens=12))
        assert list(blocking) == want
        assert asyncio.run(consume(engine.submit(PROMPT, SamplingParams(max_new_tokens=12)))) == want
        assert asyncio.run(consume(blocking)) == want  # a finished stream replays
        assert blocking.ttft_s is not None and blocking.ttft_s >= 0
        assert len(blocking.token_times) == 12 and blocking.token_times == sorted(blocking.token_times)


def _mixed_run(gpt2: Decoder, policy: str) -> tuple[list, dict]:
    """One long request and six short ones on 4 slots; returns (streams, engine stats)."""
    engine = Engine(gpt2, policy=policy)
    try:
        with engine._cond:  # hold the scheduler so all seven are queued before the first admission
            long = engine.submit(PROMPT, SamplingParams(max_new_tokens=40))
            short = [engine.submit([i + 1, i + 2], SamplingParams(max_new_tokens=4)) for i in range(6)]
        for s in (long, *short):
            s.result(timeout=120)
        return [long, *short], engine.stats()
    finally:
        engine.close()


def test_continuous_refills_freed_slots_static_waits(gpt2):
    (long, *short), cont = _mixed_run(gpt2, "continuous")
    # the three short requests that did not fit at first finish while the long one still runs
    assert max(s.token_times[-1] for s in short[3:]) < long.token_times[-1]
    assert cont["steps"] == 39 and cont["prefills"] == 7 and cont["tokens_generated"] == 40 + 6 * 4
    (long, *short), stat = _mixed_run(gpt2, "static")
    # static: they wait for the whole first batch, i.e. for the long request
    assert min(s.token_times[0] for s in short[3:]) > long.token_times[-1]
    assert stat["steps"] == 39 + 3 and stat["prefills"] == 7
    for s in short:
        assert s.finish_reason == "length"


def test_generate_uses_a_given_engine_and_leaves_it_running(gpt2):
    from jaxinfer.generation import generate_stream

    want = _greedy(gpt2, 5)
    with Engine(gpt2) as engine:
        assert generate(engine, [PROMPT, PROMPT], 5) == [want, want]
        assert generate(gpt2, PROMPT, 5) == want  # the decoder's running engine is shared, not replaced
        with pytest.raises(InputError, match="empty"):
            generate_stream(engine, [], 5)  # validated when called, not at the first next()
        assert list(generate_stream(engine, PROMPT, 5)) == want
        assert engine.submit(PROMPT, SamplingParams(max_new_tokens=5)).result(timeout=60) == want



def test_cancel_frees_the_slot_and_drops_a_queued_request(gpt2):
    with Engine(gpt2) as engine:
        running = engine.submit(PROMPT, SamplingParams(max_new_tokens=100))
        next(iter(running))  # it holds a slot and has produced a token
        running.cancel()
        got = running.result(timeout=60)  # it finishes early, keeping what it had
        assert running.finish_reason == "cancelled" and 1 <= len(got) < 100

        busy = [engine.submit([3, 4], SamplingParams(max_new_tokens=50)) for _ in range(gpt2.slots)]
        waiting = engine.submit([5], SamplingParams(max_new_tokens=50))  # no free slot: it queues
        waiting.cancel()
        for s in busy:
            s.cancel()
        assert waiting.result(timeout=60) == [] and waiting.finish_reason == "cancelled"
        assert all(s.result(timeout=60) is not None and s.finish_reason in ("cancelled", "length") for s in busy)
        assert engine.submit([1, 2], SamplingParams(max_new_tokens=3)).result(timeout=60)  # nothing else lost
        assert engine.stats()["active_slots"] == 0 and engine.stats()["cancelled"] >= 2
