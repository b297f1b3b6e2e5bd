"""Adversarial pass over the in-process generation API: bad input gets a clear jaxinfer error, nothing hangs,
abandoned or failed requests give their slots back, and concurrent callers of one Decoder do not hurt each other.

Every wait has a timeout, so a regression fails instead of blocking the suite.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from jaxinfer.batching.batcher import QueueFullError
from jaxinfer.errors import InputError, OutOfMemoryError
from jaxinfer.generation import Decoder, Engine, SamplingParams, generate, generate_stream

PROMPT = [5, 17, 300, 42, 7]
TIMEOUT = 60


def _wait_until(predicate, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _idle(engine: Engine) -> bool:
    stats = engine.stats()
    return stats["active_slots"] == 0 and stats["waiting"] == 0


@pytest.mark.parametrize("prompt", [[1.5, 2], [None], [[1, 2], 3], np.array(5), 7],
                         ids=["float-first", "none", "ragged-batch", "0d-array", "int"])
def test_malformed_prompts_raise_input_error(gpt2, prompt):
    # before: [1.5, 2], [None] and [[1, 2], 3] raised TypeError ('float' object is not iterable) from generate;
    # a 0-d array or an int raised TypeError (len() of unsized object) where generate builds the Decoder
    for model in (gpt2, gpt2.model):  # the Model path now fails before building anything
        with pytest.raises(InputError, match="prompt"):
            generate(model, prompt, 4)
    with pytest.raises(InputError, match="prompt"):
        generate_stream(gpt2.model, prompt, 4)


@pytest.mark.parametrize("kw, match", [
    (dict(stop_ids=5), "stop_ids must be a tuple or list"),        # before: TypeError, not iterable
    (dict(stop_ids=None), "stop_ids must be a tuple or list"),     # before: TypeError
    (dict(stop_ids="ab"), "stop_ids must be a tuple or list"),     # before: ValueError from int('a')
    (dict(stop_ids=[float("nan")]), "stop_ids must be token ids"),  # before: ValueError from int(nan)
    (dict(stop_ids=[1.7]), "stop_ids must be token ids"),          # before: silently became stop id 1
    (dict(stop_ids=[-1]), "stop_ids must be token ids"),
    (dict(stop_ids=[600]), "could never stop"),                    # vocab is 512
    (dict(temperature=None), "temperature must be a number"),      # before: TypeError from np.isfinite
    (dict(temperature="1"), "temperature must be a number"),
    (dict(temperature=True), "temperature must be a number"),      # before: accepted as 1.0
    (dict(top_p=None), "top_p must be a number"),                  # before: TypeError from '<'
    (dict(top_p="0.5"), "top_p must be a number"),
    (dict(top_k=True), "top_k must be an int"),                    # before: accepted as 1
    (dict(seed=True), "seed must be an int"),
    (dict(max_new_tokens=True), "max_new_tokens must be an int"),  # before: accepted as 1
])
def test_bad_sampling_values_raise_input_error(gpt2, kw, match):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(InputError, match=match):
        generate(gpt2, PROMPT, **kw)
    with pytest.raises(InputError, match=match):
        generate_stream(gpt2, PROMPT, **kw)
    params = {k: v for k, v in kw.items()}
    with Engine(gpt2) as engine:
        with pytest.raises(InputError, match=match):
            engine.submit(PROMPT, SamplingParams(**params))
        assert engine.submit(PROMPT, SamplingParams(max_new_tokens=2)).result(timeout=TIMEOUT)


@pytest.mark.parametrize("max_new_tokens", [float("inf"), float("nan"), -3, 0])
def test_bad_max_new_tokens_is_refused_before_a_decoder_is_built(gpt2, max_new_tokens):
    # before: inf -> OverflowError and nan -> ValueError (int() while sizing the Decoder); -3/0 built and
    # allocated a Decoder before being refused
    with pytest.raises(InputError, match="max_new_tokens must be an int >= 1"):
        generate(gpt2.model, PROMPT, max_new_tokens)


def test_a_cache_too_large_is_a_clear_out_of_memory_error(gpt2):
    # before: jax.errors.JaxRuntimeError RESOURCE_EXHAUSTED allocating 562949953421312 bytes
    with pytest.raises(OutOfMemoryError, match="KV cache of slots=1 x max_len="):
        generate(gpt2.model, PROMPT, 2**40)
    with pytest.raises(OutOfMemoryError, match="fewer slots or a smaller max_len"):
        Decoder(gpt2.model, slots=1, max_len=2**45)


def test_geometry_is_validated_not_replaced(gpt2):
    m = gpt2.model
    # before: slots=0 / max_len=0 in generate silently became the defaults
    with pytest.raises(InputError, match="slots must be an int >= 1"):
        generate(m, PROMPT, 2, slots=0)
    with pytest.raises(InputError, match="max_len an int >= 2"):
        generate(m, PROMPT, 2, max_len=0)
    with pytest.raises(InputError, match="slots must be an int >= 1"):
        generate_stream(m, PROMPT, 2, slots=0)
    # before: TypeError ('<' between str and int); True and 1.5 were taken as 1
    for bad in ("2", True, 1.5):
        with pytest.raises(InputError, match="slots"):
            Decoder(m, slots=bad, max_len=32)
    with pytest.raises(InputError, match="prefill_buckets"):
        Decoder(m, slots=1, max_len=32, prefill_buckets=(True,))
    with pytest.raises(InputError, match="needs a Decoder"):
        Engine(m)  # before: AttributeError (no .slots)
    with pytest.raises(InputError, match="max_waiting"):
        Engine(gpt2, max_waiting="big")  # before: TypeError


def test_geometry_for_a_given_decoder_is_refused_not_ignored(gpt2):
    """slots/max_len shape a Decoder that generate builds; asking a given Decoder for another geometry was
    silently ignored. Its own values are fine."""
    for call in (lambda **kw: generate(gpt2, PROMPT, 2, **kw), lambda **kw: generate_stream(gpt2, PROMPT, 2, **kw)):
        with pytest.raises(InputError, match=r"the Decoder given has slots=.*build another Decoder"):
            call(max_len=gpt2.max_len * 2)
        with pytest.raises(InputError, match="would set the geometry"):
            call(slots=gpt2.slots + 1)
    assert len(generate(gpt2, PROMPT, 2, slots=gpt2.slots, max_len=gpt2.max_len)) == 2
    assert len(list(generate_stream(gpt2, PROMPT, 2))) == 2


def test_decoder_prefill_checks_slot_and_ids(gpt2):
    # before: slot 99 / -1 were clamped by dynamic_update_slice into another slot's cache row; an id past the
    # vocabulary was clamped by the embedding gather; both returned a token
    for slot in (gpt2.slots, -1, 1.0):
        with pytest.raises(InputError, match="slot must be an int"):
            gpt2.prefill(slot, PROMPT, SamplingParams())
    with pytest.raises(InputError, match="vocab_size=512"):
        gpt2.prefill(0, [100000], SamplingParams())


def test_a_failure_in_the_engine_loop_fails_admitted_requests_instead_of_hanging(gpt2):
    """Two requests admitted in one iteration; the first one's bookkeeping raises. Before: the second one had
    been taken from the queue but not placed, so nobody ever finished it and result() waited forever."""
    with Engine(gpt2) as engine:
        real = engine._deliver

        def deliver(slot: int, token: int) -> None:
            if engine._slots[slot].request.params.seed == 13:
                raise RuntimeError("boom")
            real(slot, token)

        engine._deliver = deliver  # type: ignore[method-assign]
        with engine._cond:  # both are admitted in the same iteration
            bad = engine.submit(PROMPT, SamplingParams(max_new_tokens=4, seed=13))
            other = engine.submit(PROMPT, SamplingParams(max_new_tokens=4))
        for s in (bad, other):
            with pytest.raises(RuntimeError, match="boom"):
                s.result(timeout=TIMEOUT)
            assert s.finish_reason == "error"
        assert engine.submit(PROMPT, SamplingParams(max_new_tokens=3)).result(timeout=TIMEOUT)  # still serving
        assert _wait_until(lambda: _idle(engine))


def test_abandoned_generate_stream_frees_its_slot(gpt2):
    # before: a dropped iterator over a shared Engine kept decoding all max_new_tokens for nobody
    with Engine(gpt2) as engine:
        it = generate_stream(engine, PROMPT, 100)
        assert next(it) >= 0
        del it
        gc.collect()
        assert _wait_until(lambda: _idle(engine))
        assert engine.stats()["cancelled"] == 1 and engine.stats()["tokens_generated"] < 100
        unstarted = generate_stream(engine, PROMPT, 100)  # dropped before the first next()
        del unstarted
        gc.collect()
        assert _wait_until(lambda: engine.stats()["cancelled"] == 2 and _idle(engine))
        closed = generate_stream(engine, PROMPT, 100)
        next(closed)
        closed.close()
        assert _wait_until(lambda: engine.stats()["cancelled"] == 3 and _idle(engine))
        assert engine.stats()["tokens_generated"] < 100
        assert list(generate_stream(engine, PROMPT, 3)) == generate(engine, PROMPT, 3)  # still serving


def test_unstarted_generate_stream_closes_the_engine_it_started(gpt2):
    # before: an iterator dropped before its first next() never closed its Engine (thread and cache leaked)
    it = generate_stream(gpt2, PROMPT, 50)
    engine = gpt2._engine
    assert engine is not None and not engine._closed
    del it
    gc.collect()
    engine._thread.join(TIMEOUT)
    assert engine._closed and not engine._thread.is_alive() and gpt2._engine is None


def test_concurrent_generate_calls_on_one_decoder(gpt2):
    """Threads calling generate / generate_stream on one Decoder share the Engine the first one started.

    Before: whichever call finished first closed that Engine, and the others failed with "the Engine was closed
    before this request finished"."""
    want = generate(gpt2, PROMPT, 20)
    results: dict[int, object] = {}

    def call(i: int) -> None:
        n = 4 + 3 * (i % 6)
        try:
            got = generate(gpt2, PROMPT, n) if i % 2 else list(generate_stream(gpt2, PROMPT, n))
            results[i] = got == want[:n] or got
        except BaseException as e:  # noqa: BLE001 - reported below
            results[i] = repr(e)

    threads = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a generate call hung"
    assert results == {i: True for i in range(8)}
    assert _wait_until(lambda: getattr(gpt2, "_engine", None) is None)  # the last call closed it


def test_generate_cancels_its_other_requests_when_one_fails(gpt2):
    # before: with a given Engine, the prompts queued before the failing one kept decoding for nobody
    with Engine(gpt2, max_waiting=1) as engine:
        with engine._cond:  # the engine cannot admit, so the second prompt finds the queue full
            with pytest.raises(QueueFullError):
                generate(engine, [PROMPT, PROMPT], 50)
        assert _wait_until(lambda: _idle(engine))
        assert engine.stats()["cancelled"] == 1 and engine.stats()["tokens_generated"] == 0


def test_seeded_sampling_is_repeatable_and_independent_of_the_batch(gpt2):
    kw = dict(temperature=0.8, top_k=50, top_p=0.95, seed=5)
    alone = generate(gpt2, PROMPT, 12, **kw)
    assert generate(gpt2, PROMPT, 12, **kw) == alone
    batch = generate(gpt2, [[9, 9, 9], PROMPT, list(range(1, 15))], 12, **kw)
    assert batch[1] == alone
    assert alone != generate(gpt2, PROMPT, 12, **{**kw, "seed": 6})


def test_engines_left_running_are_closed_at_interpreter_exit(gpt2):
    # before: exiting Python while an Engine thread was inside a decode step aborted the process
    # ("terminate called ... FATAL: exception not rethrown", exit code 134)
    from jaxinfer.generation import engine as engine_module

    engine = Engine(gpt2)
    try:
        assert engine in engine_module._LIVE
        stream = engine.submit(PROMPT, SamplingParams(max_new_tokens=100))
        engine_module._close_live_engines()  # what atexit runs
        assert engine._closed and not engine._thread.is_alive() and engine not in engine_module._LIVE
        assert stream.done
    finally:
        engine.close()
