"""One state per stream for serving stateful models (TFLite resource variables, LSTM variable tensors).

A stateful model is ``fn(params, state, inputs) -> (outputs, state)``; ``Model.run`` keeps one
state, as LiteRT's interpreter does. A server has many clients, each streaming its own audio or
sensor frames, so it keeps one state per stream, the way Triton's sequence batcher does: each
request names its stream with ``sequence_id``, the first one says ``sequence_start`` (the state
starts from the model's initial values) and the last ``sequence_end`` (the state is dropped).
Streams that go quiet for ``idle_s`` are dropped when room is needed for a new one.

Requests of different streams batch together: :func:`stateless_view` turns the model's state
values into extra inputs and their next values into extra outputs, so the batch of states is
stacked along the batch dim like any input and the new states come back a row per stream. A
stream's requests run in arrival order, one at a time (the batcher never puts two of one stream
in a batch, nor starts one while the stream's previous request is running).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, JaxinferError
from ..graph import Graph, ValueInfo
from ..model import Model

#: The request parameters (KServe v2 ``parameters``, as tritonclient sends them) that name a stream.
SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


class SequenceError(InputError):
    """A request that does not fit its stream: no ``sequence_id`` for a stateful model, or a stream
    that was never started, has ended or was dropped while idle (HTTP 400)."""


class SequenceLimitError(JaxinferError):
    """No room for another stream: ``max_sequences`` are active and none is idle (HTTP 429)."""


@dataclass(frozen=True)
class StreamRef:
    """Which stream a request belongs to, and whether it starts or ends it."""

    id: int | str
    start: bool = False
    end: bool = False

    def __post_init__(self) -> None:
        ok_int = isinstance(self.id, int) and not isinstance(self.id, bool) and 0 < self.id < 2**64
        ok_str = isinstance(self.id, str) and 0 < len(self.id) <= 256
        if not (ok_int or ok_str):
            raise SequenceError(f"sequence_id must be a non-zero unsigned 64-bit integer or a non-empty string "
                                f"of at most 256 characters, got {self.id!r:.80}")
        for flag in ("start", "end"):
            if not isinstance(getattr(self, flag), bool):
                raise SequenceError(f"sequence_{flag} must be true or false, got {getattr(self, flag)!r:.80}")


def stream_of(parameters: Mapping[str, object]) -> StreamRef | None:
    """The stream named by a request's ``parameters`` (None when it names none)."""
    sid = parameters.get("sequence_id")
    start, end = parameters.get("sequence_start", False), parameters.get("sequence_end", False)
    if _names_no_stream(sid):
        if start or end:
            raise SequenceError("sequence_start/sequence_end need a sequence_id naming the stream")
        return None
    return StreamRef(sid, start, end)  # type: ignore[arg-type]


def _names_no_stream(sid: object) -> bool:
    """Whether ``sid`` says "no sequence": absent, tritonclient's integer 0, or ""; not false or 0.0,
    which are refused as ids rather than taken for none."""
    return sid is None or sid == "" or (type(sid) is int and sid == 0)


@dataclass(frozen=True)
class SequencePolicy:
    """How many streams a model version keeps, and after how long a quiet one may be dropped."""

    max_sequences: int = 1024
    idle_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.max_sequences, int) or isinstance(self.max_sequences, bool) or self.max_sequences < 1:
            raise ValueError(f"max_sequences must be a positive integer, got {self.max_sequences!r}")
        if not self.idle_s > 0:
            raise ValueError(f"sequence idle time must be > 0 seconds, got {self.idle_s!r}")


def stateless_view(model: Model) -> tuple[Model, dict[str, str]]:
    """``model`` with its state values as inputs and their next values as outputs (sharing params);
    and {state value: the output holding its next contents}."""
    graph = model.graph
    have = {v.name for v in graph.inputs}
    clash = sorted(set(graph.state_vars) & have)
    if clash:
        raise InputError(f"state values {clash} are also graph inputs")
    states = tuple(ValueInfo(name, tuple(np.shape(init)), np.asarray(init).dtype)
                   for name, init in graph.state_init.items())
    shapes = {v.name: v for v in states}
    outputs = list(graph.outputs)
    listed = {v.name for v in outputs}
    next_of: dict[str, str] = {}
    for var, nxt in graph.state_vars.items():
        next_of[var] = nxt
        if nxt not in listed:
            outputs.append(ValueInfo(nxt, shapes[var].shape, shapes[var].dtype))
            listed.add(nxt)
    view: Graph = graph.replace(inputs=tuple(graph.inputs) + states, outputs=tuple(outputs),
                                state_vars={}, state_init={})
    return Model(view, model.registry, params=model.params, source=model.source, check=False), next_of


@dataclass
class _Stream:
    state: dict[str, np.ndarray] | None  # None until the stream's first request has run (and after its end)
    used: float  # monotonic time of its last request (admitted or answered)
    waiting: int = 0  # requests admitted and not answered yet: a stream with any is never dropped
    open: bool = True  # False once its end request is admitted (until a new start): later steps are refused


class SequenceTable:
    """The state of every active stream of one model version (host arrays, one row each).

    Thread-safe: requests are admitted on the HTTP threads and states written on the batcher's.
    """

    def __init__(self, init: Mapping[str, np.ndarray], policy: SequencePolicy | None = None, *, name: str = "model"):
        self.init = {k: np.asarray(v) for k, v in init.items()}
        self.policy = policy or SequencePolicy()
        self.name = name
        self._streams: dict[int | str, _Stream] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._streams)

    def admit(self, ref: StreamRef) -> None:
        """Register a request of ``ref``'s stream as it is queued; raises what does not fit.

        Requests are admitted in the order they run, so the stream is judged as it will be when this
        one runs: after an admitted end only a start may follow. Each admitted request is released
        (:meth:`release`) once answered, failed, timed out or cancelled.
        """
        now = time.monotonic()
        with self._lock:
            stream = self._streams.get(ref.id)
            if stream is None or not stream.open:
                if not ref.start:
                    raise SequenceError(
                        f"sequence {ref.id!r:.80} of model '{self.name}' is not active (never started, ended, "
                        f"dropped after {self.policy.idle_s:g} s idle, or kept by a version since reloaded); its "
                        "first request needs sequence_start=true")
            if stream is None:
                if len(self._streams) >= self.policy.max_sequences:
                    self._drop_idle(now)
                if len(self._streams) >= self.policy.max_sequences:
                    raise SequenceLimitError(
                        f"model '{self.name}' already keeps {self.policy.max_sequences} active sequences "
                        f"(max_sequences) and none has been idle for {self.policy.idle_s:g} s; end finished "
                        "sequences with sequence_end=true, or retry later")
                stream = self._streams[ref.id] = _Stream(None, now)
            stream.open = not ref.end
            stream.waiting += 1
            stream.used = now

    def release(self, ref: StreamRef) -> None:
        """One admitted request of ``ref`` is answered: an ended stream goes once none is left waiting."""
        with self._lock:
            stream = self._streams.get(ref.id)
            if stream is None:
                return
            stream.waiting = max(0, stream.waiting - 1)
            stream.used = time.monotonic()
            if stream.waiting == 0 and not stream.open:
                del self._streams[ref.id]

    def waiting(self, ref: StreamRef) -> int:
        """Requests of ``ref``'s stream admitted and not answered yet."""
        with self._lock:
            stream = self._streams.get(ref.id)
            return 0 if stream is None else stream.waiting

    def _drop_idle(self, now: float) -> None:
        idle = [k for k, s in self._streams.items() if s.waiting == 0 and now - s.used > self.policy.idle_s]
        for k in idle:
            del self._streams[k]

    def state(self, ref: StreamRef) -> dict[str, np.ndarray]:
        """The state a request of ``ref`` runs on: the initial one when it starts the stream."""
        if ref.start:
            return self.init
        with self._lock:
            stream = self._streams.get(ref.id)
            state = None if stream is None else stream.state
        if state is None:
            raise SequenceError(f"sequence {ref.id!r:.80} of model '{self.name}' has no state: it ended, was "
                                "dropped while idle, or its start request did not run; start it again with "
                                "sequence_start=true")
        return state

    def missing(self, ref: StreamRef) -> SequenceError | None:
        """The error :meth:`state` would raise for ``ref``, without raising it."""
        try:
            self.state(ref)
        except SequenceError as e:
            return e
        return None

    def store(self, ref: StreamRef, state: dict[str, np.ndarray]) -> None:
        """Keep ``state`` as the stream's state after its request ran (an end drops it; the stream itself
        goes at :meth:`release`). A stream dropped meanwhile (every caller of it gave up) stays dropped."""
        with self._lock:
            stream = self._streams.get(ref.id)
            if stream is not None:
                stream.state = None if ref.end else state

    def active(self) -> list[int | str]:
        with self._lock:
            return list(self._streams)
