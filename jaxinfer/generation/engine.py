"""``Engine``: the slot scheduler. One background thread runs prefill inserts and decode steps over a Decoder.

Each loop iteration admits waiting requests into free slots (a prefill each, which also emits their first
token), then runs one decode step over all slots and hands every active slot its token. A request that
emits a stop id or reaches max_new_tokens frees its slot at once. With the "continuous" policy a freed
slot is refilled before the next step, so short requests never wait for long ones; with "static" a new
batch is admitted only when every slot of the previous one is free (the baseline the benchmark compares).
"""

from __future__ import annotations

import atexit
import threading
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..batching.batcher import QueueFullError
from ..checks import is_int
from ..errors import InputError, JaxinferError
from .decoder import Decoder, SlotSampling
from .sampling import SamplingParams
from .stream import Stream

POLICIES = ("continuous", "static")

#: Guards "a Decoder has at most one live Engine" (the owner check and the claim are one step).
_OWNER_LOCK = threading.Lock()

#: Engines not closed yet: closed at interpreter exit, so no engine thread is inside XLA when the
#: interpreter stops its daemon threads (which aborted the process: "FATAL: exception not rethrown").
_LIVE: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    for engine in list(_LIVE):
        engine.close()


@dataclass
class _Request:
    prompt: list[int]
    params: SamplingParams
    stream: Stream


@dataclass
class _Active:
    """A request in a slot: ``length`` rows of its KV are cached; ``last`` is the token to feed next."""

    request: _Request
    length: int
    last: int
    generated: int = 0


class Engine:
    """Continuous-batching slot scheduler over one Decoder, one background thread.

    Example:
        >>> dec = Decoder("gpt2_tiny.onnx", slots=4, max_len=128); dec.warmup()   # doctest: +SKIP
        >>> with Engine(dec) as engine:                                            # doctest: +SKIP
        ...     a = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=16))
        ...     b = engine.submit([4, 5], SamplingParams(max_new_tokens=4, temperature=0.7, seed=1))
        ...     print(a.result(), b.result())
    """

    def __init__(self, decoder: Decoder, *, policy: str = "continuous", max_waiting: int = 1024):
        if not isinstance(decoder, Decoder):
            raise InputError(f"Engine needs a Decoder, got {type(decoder).__name__}")
        if policy not in POLICIES:
            raise InputError(f"Engine policy must be one of {POLICIES}, got {policy!r}")
        if not is_int(max_waiting) or max_waiting < 1:
            raise InputError(f"Engine max_waiting must be an int >= 1, got {max_waiting!r}")
        self._closed = False
        with _OWNER_LOCK:
            owner = getattr(decoder, "_engine", None)
            if owner is not None and not owner._closed:
                raise JaxinferError("this Decoder already has a running Engine (its KV cache has one owner); close "
                                    "that Engine first or build another Decoder")
            decoder._engine = self  # type: ignore[attr-defined]
        self.decoder, self.policy, self.max_waiting = decoder, policy, int(max_waiting)
        self._waiting: deque[_Request] = deque()
        self._slots: list[_Active | None] = [None] * decoder.slots
        self._sampling = SlotSampling.empty(decoder.slots)
        self._cond = threading.Condition()
        self._counters = {"tokens_generated": 0, "steps": 0, "prefills": 0, "errors": 0, "cancelled": 0}
        self._api_users = 0  # generate calls sharing this engine (api.py); 0: the caller's own, never closed there
        self._thread = threading.Thread(target=self._run, name="jaxinfer-generation-engine", daemon=True)
        self._thread.start()
        _LIVE.add(self)

    # --------------------------------------------------------------- public
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams = SamplingParams()) -> Stream:
        """Queue one request; bad input raises :class:`InputError` here, before anything is queued."""
        if not isinstance(params, SamplingParams):
            raise InputError(f"params must be a SamplingParams, got {type(params).__name__}")
        prompt = _token_list(prompt_ids)
        problems = self.decoder.request_problems(prompt, params)
        if problems:
            raise InputError("request rejected: " + "; ".join(problems))
        stream = Stream(len(prompt))
        with self._cond:
            if self._closed:
                raise JaxinferError("the Engine is closed; it accepts no more requests")
            if len(self._waiting) >= self.max_waiting:
                raise QueueFullError(f"queue full: {len(self._waiting)} requests waiting (max_waiting="
                                 f"{self.max_waiting}); retry later")
            self._waiting.append(_Request(prompt, params, stream))
            self._cond.notify_all()
        return stream

    def stats(self) -> dict[str, Any]:
        """Scheduler state and counters (compiles counted since the decoder's warmup, or since it was built)."""
        active = [a for a in self._slots if a is not None]
        dec = self.decoder
        return {
            "policy": self.policy,
            "slots": dec.slots,
            "active_slots": len(active),
            "waiting": len(self._waiting),
            "cache_occupancy": sum(a.length for a in active) / float(dec.slots * dec.max_len),
            **self._counters,
            "compiles": dec.compiles,
            "compiles_since_warmup": dec.compiles - int(dec.stats.get("compiles_at_warmup", 0)),
        }

    def close(self) -> None:
        """Stop the thread; requests still waiting or running finish with an error."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        closed = JaxinferError("the Engine was closed before this request finished")
        for i, active in enumerate(self._slots):
            if active is not None:
                active.request.stream._finish("error", closed)
                self._slots[i] = None
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            req.stream._finish("error", closed)
        if getattr(self.decoder, "_engine", None) is self:
            self.decoder._engine = None  # type: ignore[attr-defined]
        _LIVE.discard(self)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------- the loop
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or bool(self._waiting) or self._any_active())
                if self._closed:
                    return
                admitted = self._admissions()
            try:
                self._drop_cancelled()
                for slot, req in admitted:
                    self._prefill(slot, req)
                if self._any_active():
                    self._step()
            except Exception as e:  # a bug in the bookkeeping itself: fail what runs, keep serving
                self._fail_active(e)
                for _, req in admitted:  # taken from the queue but not placed yet: they would wait forever
                    req.stream._finish("error", e)

    def _any_active(self) -> bool:
        return any(a is not None for a in self._slots)

    def _admissions(self) -> list[tuple[int, _Request]]:
        """(slot, request) pairs to prefill now (caller holds the lock)."""
        free = [i for i, a in enumerate(self._slots) if a is None]
        if self.policy == "static" and len(free) < len(self._slots):
            return []
        for req in [r for r in self._waiting if r.stream.cancelled]:
            self._waiting.remove(req)
            self._counters["cancelled"] += 1
            req.stream._finish("cancelled")
        return [(slot, self._waiting.popleft()) for slot in free[: len(self._waiting)]]

    def _drop_cancelled(self) -> None:
        """Free the slots of running requests whose stream was cancelled."""
        for i, a in enumerate(self._slots):
            if a is not None and a.request.stream.cancelled:
                self._slots[i] = None
                self._counters["cancelled"] += 1
                a.request.stream._finish("cancelled")

    def _prefill(self, slot: int, req: _Request) -> None:
        if req.stream.cancelled:
            req.stream._finish("cancelled")
            return
        try:
            token = self.decoder.prefill(slot, req.prompt, req.params)
        except Exception as e:
            self._counters["errors"] += 1
            req.stream._finish("error", e)
            self._recover(e)
            return
        self._counters["prefills"] += 1
        self._slots[slot] = _Active(req, length=len(req.prompt), last=token)
        self._sampling.set_row(slot, req.params, count=1)
        self._deliver(slot, token)

    def _step(self) -> None:
        tokens = np.zeros(len(self._slots), np.int32)
        lens = np.zeros(len(self._slots), np.int32)
        for i, a in enumerate(self._slots):
            if a is not None:
                tokens[i], lens[i] = a.last, a.length
        try:
            out = self.decoder.decode(tokens, lens, self._sampling)
        except Exception as e:
            self._counters["errors"] += 1
            self._fail_active(e)
            self._recover(e)
            return
        self._counters["steps"] += 1
        for i, a in enumerate(self._slots):
            if a is not None:
                a.length += 1
                self._sampling.counts[i] += 1
                self._deliver(i, int(out[i]))

    def _deliver(self, slot: int, token: int) -> None:
        a = self._slots[slot]
        assert a is not None
        a.last = token
        a.generated += 1
        self._counters["tokens_generated"] += 1
        a.request.stream._emit(token)
        params = a.request.params
        if token in params.stop_ids:
            reason = "stop"
        elif a.generated >= params.max_new_tokens:
            reason = "length"
        else:
            return
        self._slots[slot] = None
        a.request.stream._finish(reason)

    def _fail_active(self, error: BaseException) -> None:
        for i, a in enumerate(self._slots):
            if a is not None:
                a.request.stream._finish("error", error)
                self._slots[i] = None

    def _recover(self, error: BaseException) -> None:
        """After a failed call: if it consumed the donated cache, the running requests lost their KV."""
        if self.decoder.cache_deleted():
            lost = JaxinferError(f"the KV cache was lost when another request's step failed ({error!r})")
            lost.__cause__ = error
            self._fail_active(lost)
            self.decoder.reset()


def _token_list(prompt_ids: Sequence[int]) -> list[int]:
    """``prompt_ids`` as a list of Python ints (raises :class:`InputError` for anything else)."""
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__len__"):
        raise InputError(f"prompt_ids must be a sequence of token ids, got {type(prompt_ids).__name__}")
    try:
        arr = np.asarray(prompt_ids)
    except (OverflowError, ValueError) as e:
        raise InputError(f"prompt_ids must be a flat sequence of int token ids: {e}") from e
    if arr.size and (arr.ndim != 1 or arr.dtype.kind not in "iu"):
        raise InputError(f"prompt_ids must be a flat sequence of int token ids, got shape {arr.shape} of "
                         f"{arr.dtype}")
    return [int(t) for t in arr.reshape(-1)]
