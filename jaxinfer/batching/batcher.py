"""The dynamic batcher: one loop per model version, latency-aware dispatch.

Requests queue with monotonic deadlines. The loop waits for a free device slot,
then looks at the queue and dispatches a batch when

* the batch is full (``max_batch`` rows), or
* waiting for one more request would make the oldest miss its SLA: now + the
  expected gap to the next arrival + the latency of the next bigger batch's
  bucket > the oldest's arrival + ``sla_ms`` (so it sends 2 at 80 ms rather than
  wait for a 4th and finish at 120 ms), or
* the oldest has waited ``max_queue_delay_ms``, or
* the device is idle (no batch in flight) and as many rows wait as the batch that just
  finished had (its callers tend to send again at once; a lone request runs at once), or
* the batcher is draining on stop.

While a batch runs, requests gather; when it completes the next batch takes them all.

The loop starts the device run and hands the batch to a completion thread that
copies results to the host and resolves each caller's future (a result, or the
exception). On accelerators the run is asynchronous, so the loop can start the next
batch meanwhile. On CPU, where jaxinfer runs computations inline (``_config.py``), a
batch is done when its run returns: then, when no request waits and no earlier batch is
still being answered, the loop answers it itself, which saves one thread hand-off (a lone
1-row request through the batcher: 0.33 -> 0.28 ms here, 2.9k -> 3.5k req/s at
concurrency 1). With requests waiting it still hands the batch over, so that their
dispatch does not wait for the answers (answering every batch on the loop cost ~13 % of
the transformer's in-process throughput at concurrency 32). The queue is bounded: a full queue
raises :class:`QueueFullError` at once instead of growing.
"""

from __future__ import annotations

import bisect
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, JaxinferError
from .buckets import Batch, BucketedModel, Prepared, merge_rows
from .sequences import SequenceTable, StreamRef

log = logging.getLogger("jaxinfer.batching")


class QueueFullError(JaxinferError):
    """The batcher's queue is at its limit; retry later (HTTP 429)."""


class BatcherStoppedError(JaxinferError):
    """The batcher is stopping or stopped and takes no new requests (HTTP 503)."""


class RequestTimeoutError(JaxinferError, TimeoutError):
    """A request waited longer than its timeout (HTTP 504)."""


class LatencyModel:
    """Seconds per batch bucket: measured at warm-up, then an online moving average."""

    def __init__(self, timings: Mapping[int, float] | None = None, alpha: float = 0.2):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._t: dict[int, float] = {int(k): float(v) for k, v in (timings or {}).items()}
        self._lock = threading.Lock()

    def update(self, bucket: int, seconds: float) -> None:
        with self._lock:
            old = self._t.get(bucket)
            self._t[bucket] = seconds if old is None else (1 - self.alpha) * old + self.alpha * seconds

    def estimate(self, bucket: int) -> float:
        """The expected seconds for ``bucket`` (linear between measured buckets; 0 when none)."""
        with self._lock:
            if bucket in self._t:
                return self._t[bucket]
            if not self._t:
                return 0.0
            keys = sorted(self._t)
            i = bisect.bisect_left(keys, bucket)
            if i == 0:
                return self._t[keys[0]] * bucket / keys[0]
            if i == len(keys):
                return self._t[keys[-1]] * bucket / keys[-1]
            lo, hi = keys[i - 1], keys[i]
            w = (bucket - lo) / (hi - lo)
            return (1 - w) * self._t[lo] + w * self._t[hi]

    def useful_batch(self, buckets: tuple[int, ...], slack: float = 0.9) -> int:
        """The smallest bucket whose rows/second is within ``slack`` of the best bucket's.

        Where bigger batches buy no throughput (a compute-bound CPU), this is 1 and the
        batcher stops adding latency for nothing; on an accelerator it is the largest bucket.
        """
        rates = {b: b / t for b, t in ((b, self.estimate(b)) for b in buckets) if t > 0}
        if len(rates) < len(buckets):
            return buckets[-1]
        best = max(rates.values())
        return min(b for b, r in rates.items() if r >= slack * best)

    def snapshot(self) -> dict[int, float]:
        with self._lock:
            return dict(self._t)


@dataclass(frozen=True)
class BatcherConfig:
    """Limits of one batcher; validated on construction."""

    max_queue_delay_ms: float = 2.0
    sla_ms: float | None = None
    queue_size: int = 1024
    timeout_ms: float | None = 30_000.0
    max_in_flight: int = 2
    adaptive_cap: bool = True  # cap batches at the bucket where throughput stops growing (latency model)

    def __post_init__(self) -> None:
        if self.max_queue_delay_ms < 0:
            raise ValueError(f"max_queue_delay_ms must be >= 0, got {self.max_queue_delay_ms}")
        if self.sla_ms is not None and self.sla_ms <= 0:
            raise ValueError(f"sla_ms must be > 0, got {self.sla_ms}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if self.timeout_ms is not None and self.timeout_ms <= 0:
            raise ValueError(f"timeout_ms must be > 0, got {self.timeout_ms}")
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")


@dataclass(frozen=True)
class BatchReport:
    """What one dispatched batch did, for metrics."""

    bucket: int
    rows: int
    requests: int
    compute_s: float
    queue_s: tuple[float, ...]
    error: bool = False

    @property
    def padding_ratio(self) -> float:
        return 0.0 if self.bucket == 0 else (self.bucket - self.rows) / self.bucket


class _Ticket:
    """One caller's request: its future, and its parts when it was split."""

    def __init__(self, parts: int, batched: set[str]):
        self.future: Future = Future()
        self.results: list[Any] = [None] * parts
        self.left = parts
        self.batched = batched
        self.lock = threading.Lock()

    def part_done(self, index: int, result: Mapping[str, np.ndarray]) -> None:
        with self.lock:
            if self.future.done():
                return
            self.results[index] = result
            self.left -= 1
            if self.left == 0:
                try:
                    self.future.set_result(merge_rows(self.results, self.batched))
                except InvalidStateError:  # the caller cancelled meanwhile
                    pass

    def fail(self, exc: BaseException) -> None:
        with self.lock:
            if not self.future.done():
                try:
                    self.future.set_exception(exc)
                except InvalidStateError:
                    pass


def _claim(future: Future) -> bool:
    """Mark a dispatched request's future running, so that its caller can no longer cancel it; False when
    it was cancelled (or has failed) already."""
    if future.running():
        return True
    try:
        return future.set_running_or_notify_cancel()
    except RuntimeError:  # finished meanwhile (failed)
        return False


def _releaser(sequences: SequenceTable, ref: StreamRef) -> Callable[[Future], None]:
    """A done-callback releasing ``ref``'s admitted request however its future ends (answer, error,
    timeout, cancel), so an ended stream goes and a stream with callers waiting is never dropped."""
    return lambda _: sequences.release(ref)


@dataclass
class _Item:
    part: Prepared
    ticket: _Ticket
    index: int
    arrival: float
    deadline: float  # monotonic; math.inf for no timeout
    dispatched: float = field(default=0.0)


_STOP = object()


def _ready(outputs: Mapping[str, Any]) -> bool:
    """Whether a batch's outputs are computed already (CPU runs inline), so no thread need wait on them."""
    return all(getattr(o, "is_ready", lambda: True)() for o in outputs.values())


class DynamicBatcher:
    """Queue requests for one model version and run them in latency-aware batches.

    Example:
        >>> bm = BucketedModel(model, BucketPolicy.for_max_batch(16)); lat = LatencyModel(bm.warmup())  # doctest: +SKIP
        >>> b = DynamicBatcher(bm, lat, BatcherConfig(sla_ms=50)); b.start()          # doctest: +SKIP
        >>> out = b.submit({"x": x}).result()                                         # doctest: +SKIP
        >>> b.stop()                                                                   # doctest: +SKIP
    """

    def __init__(self, model: BucketedModel, latency: LatencyModel | None = None,
                 config: BatcherConfig | None = None, *, name: str = "model",
                 on_batch: Callable[[BatchReport], None] | None = None):
        self.model = model
        self.latency = latency or LatencyModel()
        self.config = config or BatcherConfig()
        self.name = name
        self.on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._next_deadline = math.inf  # <= the earliest deadline in _pending (stale-low after takes)
        self._last_rows, self._last_done_at = 0, -math.inf  # the last completed batch (see _expected)
        self._cond = threading.Condition()
        self._slots = threading.Semaphore(self.config.max_in_flight)
        self._done_q: queue.Queue = queue.Queue()
        self._stopping = False
        self._started = False
        self._gap = 0.0  # moving average of the gap between arrivals (s)
        self._last_arrival: float | None = None
        self._cap_value, self._cap_at = model.policy.max_batch, -math.inf
        self._loop_thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._done_thread = threading.Thread(target=self._completions, name=f"batcher-{name}-done", daemon=True)
        self.busy_s = 0.0
        self.created = time.monotonic()
        self.in_flight = 0
        self._last_done = 0.0  # perf_counter when the last batch completed (its successor's compute starts after)
        #: a stateful model's streams with a request dispatched and not yet answered (see :meth:`_take`)
        self._busy: set[Any] | None = set() if model.sequences is not None else None

    # ------------------------------------------------------------- lifecycle
    def start(self) -> DynamicBatcher:
        if not self._started:
            self._started = True
            self._loop_thread.start()
            self._done_thread.start()
        return self

    def stop(self, *, drain: bool = True, timeout: float | None = None) -> None:
        """Take no new requests; finish (``drain``) or fail the queued ones; join the threads."""
        with self._cond:
            self._stopping = True
            if not drain:
                dropped = list(self._pending)
                self._pending.clear()
            else:
                dropped = []
            self._cond.notify_all()
        for item in dropped:
            item.ticket.fail(BatcherStoppedError(f"model '{self.name}' stopped before running this request"))
        if not self._started:
            return
        self._loop_thread.join(timeout)
        self._done_thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def __enter__(self) -> DynamicBatcher:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def queued(self) -> int:
        with self._cond:
            return len(self._pending)

    # ---------------------------------------------------------------- submit
    def submit(self, feeds: Mapping[str, Any] | Prepared, *, timeout_s: float | None = None,
               sequence: StreamRef | None = None) -> Future:
        """Queue one request; its future gets ``{output: np.ndarray}`` or the exception.

        A stateful model's request names its stream (``sequence``, or the Prepared's); a stream's
        requests run in the order they were submitted.

        Raises at once: ``InputError`` (bad input; :class:`SequenceError` for a stream that does not
        fit), :class:`QueueFullError`, :class:`SequenceLimitError`, :class:`BatcherStoppedError`.
        """
        prepared = feeds if isinstance(feeds, Prepared) else self.model.prepare(feeds, sequence)
        parts = self.model.split(prepared)
        if len(parts) > self.config.queue_size:  # could never be queued: retrying would not help
            raise InputError(f"request to '{self.name}' splits into {len(parts)} batches of at most "
                             f"{self.model.policy.max_batch} rows, more than the queue holds ({self.config.queue_size}); "
                             f"send at most {self.config.queue_size * self.model.policy.max_batch} rows per request "
                             "or raise queue_size")
        ticket = _Ticket(len(parts), self.model.batched_outputs)
        now = time.monotonic()
        if timeout_s is None and self.config.timeout_ms is not None:
            timeout_s = self.config.timeout_ms / 1000.0
        deadline = now + timeout_s if timeout_s is not None else math.inf
        with self._cond:
            if self._stopping or not self._started:
                raise BatcherStoppedError(f"model '{self.name}' is not accepting requests (stopping or not started)")
            if len(self._pending) + len(parts) > self.config.queue_size:
                raise QueueFullError(f"model '{self.name}' queue is full ({self.config.queue_size} requests); "
                                     "retry later")
            if self.model.sequences is not None and prepared.sequence is not None:
                self.model.sequences.admit(prepared.sequence)
                ticket.future.add_done_callback(_releaser(self.model.sequences, prepared.sequence))
            if self._last_arrival is not None:
                gap = now - self._last_arrival
                self._gap = gap if self._gap == 0.0 else 0.8 * self._gap + 0.2 * gap
            self._last_arrival = now
            for i, part in enumerate(parts):
                self._pending.append(_Item(part, ticket, i, now, deadline))
            self._next_deadline = min(self._next_deadline, deadline)
            self._cond.notify()
        return ticket.future

    def run(self, feeds: Mapping[str, Any], *, timeout_s: float | None = None,
            sequence: StreamRef | None = None) -> dict[str, np.ndarray]:
        """Submit and wait (a convenience for synchronous callers)."""
        return self.submit(feeds, timeout_s=timeout_s, sequence=sequence).result()

    # ------------------------------------------------------------------ loop
    def _expire(self, now: float) -> None:
        """Drop items whose caller timed out or gave up (caller holds the lock).

        A whole-queue pass, so the loop calls it only when a deadline is due (or every 20 ms while
        the device is busy); :meth:`_take` skips the items of callers that gave up in between.
        """
        keep: deque[_Item] = deque()
        earliest = math.inf
        for item in self._pending:
            if item.ticket.future.done():
                continue
            if now >= item.deadline:
                item.ticket.fail(RequestTimeoutError(
                    f"request to '{self.name}' timed out after {now - item.arrival:.3f}s in the queue"))
                continue
            keep.append(item)
            earliest = min(earliest, item.deadline)
        self._pending = keep
        self._next_deadline = earliest

    def _cap(self) -> int:
        """Rows per batch: max_batch, or less where the latency model says bigger buckets gain nothing."""
        buckets = self.model.policy.batch_sizes
        if not self.config.adaptive_cap:
            return buckets[-1]
        now = time.monotonic()
        if now - self._cap_at > 1.0:  # re-read the (online-updated) latency model once a second
            self._cap_value, self._cap_at = self.latency.useful_batch(buckets), now
        return self._cap_value

    def _expected(self, oldest: _Item, cap: int) -> int:
        """Rows worth waiting for on an idle device: the last batch's, when the oldest request came
        within max_queue_delay of that batch's completion (1 otherwise: run at once)."""
        if oldest.arrival - self._last_done_at > self.config.max_queue_delay_ms / 1000.0:
            return 1
        return max(1, min(self._last_rows, cap))

    def _take(self, now: float) -> tuple[list[_Item], float | None]:
        """Items to dispatch now, or ([], the time to look again). Caller holds the lock."""
        pending = self._pending
        while pending and pending[0].ticket.future.done():  # its caller gave up
            pending.popleft()
        if not pending:
            return [], None
        oldest = pending[0]
        blocked = set(self._busy) if self._busy is not None else None  # streams that may not join this batch
        if blocked is not None:
            # a stateful model: the oldest request whose stream is not running goes first, and each
            # stream's first waiting request is the only one of it that may join (arrival order)
            oldest = next((i for i in pending if i.part.sequence.id not in blocked  # type: ignore[union-attr]
                           and not i.ticket.future.done()), None)  # type: ignore[assignment]
            if oldest is None:  # every waiting stream is running: look again when a batch completes
                return [], self._next_deadline if self._next_deadline < math.inf else None
        key = oldest.part.key
        cap = self._cap() if self.model.layout != "none" else 1
        group: list[_Item] = []
        rows = 0
        full = False
        prefix = True  # the group is the queue's head (the common case: one shape, no gaps)
        for item in pending:
            if item.ticket.future.done():
                prefix = False
                continue
            if blocked is not None:
                sid = item.part.sequence.id  # type: ignore[union-attr]
                if sid in blocked:
                    prefix = False
                    continue
                blocked.add(sid)
            if item.part.key != key:
                prefix = False
                continue
            if group and rows + item.part.rows > cap:  # the oldest always goes, even when above the cap
                full = True
                break
            group.append(item)
            rows += item.part.rows
        full = full or rows >= cap
        cfg = self.config
        delay_at = oldest.arrival + cfg.max_queue_delay_ms / 1000.0
        wake = delay_at
        # an idle device runs at once (waiting only adds latency) unless the batch that just finished
        # says more requests are on their way: its callers, answered, tend to send again (a closed
        # loop), so up to that many rows gather for at most max_queue_delay. While a batch is in
        # flight, requests gather for up to max_queue_delay, or until it completes.
        idle_due = self.in_flight == 0 and rows >= self._expected(oldest, cap)
        due = full or self._stopping or now >= delay_at or idle_due
        if not due and cfg.sla_ms is not None:
            policy = self.model.policy
            nxt = policy.batch_bucket(min(rows + 1, policy.max_batch))
            sla_at = oldest.arrival + cfg.sla_ms / 1000.0
            gap = self._gap if self._gap > 0 else cfg.max_queue_delay_ms / 1000.0
            start_by = sla_at - self.latency.estimate(nxt) - gap
            due = now >= start_by
            wake = min(wake, start_by)
        wake = min(wake, self._next_deadline)
        if not due:
            return [], wake
        if prefix:
            for _ in group:
                pending.popleft()
        else:
            taken = set(map(id, group))
            self._pending = deque(i for i in pending if id(i) not in taken and not i.ticket.future.done())
        if self._busy is not None:
            self._busy.update(i.part.sequence.id for i in group)  # type: ignore[union-attr]
        return group, None

    def _loop(self) -> None:
        while True:
            # wait for a free device slot, letting the queue fill meanwhile (and expiring timed-out requests)
            while not self._slots.acquire(timeout=0.02):
                with self._cond:
                    self._expire(time.monotonic())
            group: list[_Item] = []
            with self._cond:
                while True:
                    now = time.monotonic()
                    if now >= self._next_deadline:
                        self._expire(now)
                    group, wake = self._take(now)
                    if group or (self._stopping and not self._pending):
                        break
                    self._cond.wait(None if wake is None else max(wake - now, 0.0))
            if not group:
                self._slots.release()
                self._done_q.put(_STOP)
                return
            self._dispatch(group)

    def _dispatch(self, group: list[_Item]) -> None:
        now = time.monotonic()
        for item in group:
            item.dispatched = now
        if self._busy is not None:
            group = self._drop_stale(group)
            if not group:
                self._slots.release()
                return
        try:
            batch = self.model.dispatch([i.part for i in group])
        except Exception as exc:  # noqa: BLE001  (delivered to every caller)
            if isinstance(exc, JaxinferError):  # says what was wrong itself: no traceback needed
                log.warning("batch for '%s' failed to start: %s", self.name, exc)
            else:
                log.exception("batch for '%s' failed to start", self.name)
            self._release_streams(group)
            for item in group:
                item.ticket.fail(exc)
            self._report(BatchReport(0, sum(i.part.rows for i in group), len(group), 0.0,
                                     tuple(now - i.arrival for i in group), error=True))
            self._slots.release()
            return
        with self._cond:
            inline = self.in_flight == 0 and not self._pending and _ready(batch.outputs)
            self.in_flight += 1
        if inline:  # computed on this thread (CPU), nothing waiting: answering here saves a thread hand-off
            self._complete(group, batch)
        else:
            self._done_q.put((group, batch))

    def _drop_stale(self, group: list[_Item]) -> list[_Item]:
        """Fail the requests whose stream has no state any more (ended or dropped while they waited)."""
        sequences = self.model.sequences
        assert sequences is not None
        keep = []
        for item in group:
            problem = sequences.missing(item.part.sequence)  # type: ignore[arg-type]
            if problem is None:
                keep.append(item)
            else:
                item.ticket.fail(problem)
        if len(keep) < len(group):
            kept = set(map(id, keep))
            self._release_streams([i for i in group if id(i) not in kept])
        return keep

    def _release_streams(self, group: list[_Item]) -> None:
        """Mark ``group``'s streams as no longer running (their requests failed before running)."""
        if self._busy is not None:
            with self._cond:
                self._busy.difference_update(i.part.sequence.id for i in group)  # type: ignore[union-attr]
                self._cond.notify()

    def _completions(self) -> None:
        while True:
            entry = self._done_q.get()
            if entry is _STOP:
                return
            self._complete(*entry)

    def _complete(self, group: list[_Item], batch: Batch) -> None:
        """Copy ``batch``'s outputs to the host and resolve its callers (batches complete in order).

        A stateful model's requests are claimed first (their futures marked running, so their callers can
        no longer cancel them): one whose caller already gave up (timed out, went away) does not step its
        stream, so the stream is where it was when that caller was told the request failed.
        """
        gone = [i for i, item in enumerate(group) if not _claim(item.ticket.future)] if self._busy is not None else []
        try:
            results = self.model.collect(batch, gone)
            error: BaseException | None = None
        except Exception as exc:  # noqa: BLE001
            log.exception("batch for '%s' failed", self.name)
            results, error = [], exc
        done = time.perf_counter()
        compute = done - max(batch.started, self._last_done)
        self._last_done = done
        with self._cond:
            self.in_flight -= 1
            if error is None:
                self._last_rows, self._last_done_at = batch.rows, time.monotonic()
            if self._busy is not None:  # their next requests may run now (on the state just stored)
                self._busy.difference_update(i.part.sequence.id for i in group)  # type: ignore[union-attr]
            self._cond.notify()  # an idle device: the loop may dispatch what is waiting
        self._slots.release()
        if error is None:
            self.latency.update(batch.bucket, compute)
            self.busy_s += compute
            for item, result in zip(group, results):
                item.ticket.part_done(item.index, result)
        else:
            for item in group:
                item.ticket.fail(error)
        self._report(BatchReport(batch.bucket, batch.rows, len(group), compute,
                                 tuple(i.dispatched - i.arrival for i in group), error=error is not None))

    def _report(self, report: BatchReport) -> None:
        if self.on_batch is not None:
            try:
                self.on_batch(report)
            except Exception:  # noqa: BLE001  (metrics must never break serving)
                log.exception("on_batch callback failed")

    def utilization(self) -> float:
        """Fraction of wall time the device was busy with this batcher's batches."""
        wall = time.monotonic() - self.created
        return min(1.0, self.busy_s / wall) if wall > 0 else 0.0
