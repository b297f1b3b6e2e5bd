"""Prometheus metrics for one server (its own registry, so several servers can coexist)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..batching import BatchReport

_LAT = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_ITL = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
RATE_WINDOW_S = 10.0  # tokens/s is measured over about this many seconds of recent scrapes
QUANTILES = (0.5, 0.9, 0.99)
WINDOW = 2048  # recent request durations kept per model version for the quantiles


class Metrics:
    """The counters and histograms of the issue's metric names, plus live gauges read on scrape."""

    def __init__(self, versions: Callable[[], Iterable[Any]], compiles_retired: Callable[[], int]):
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ("model", "version")
        r = self.registry
        self.request_duration = Histogram("jaxinfer_request_duration_seconds", "End-to-end request latency",
                                          labels, buckets=_LAT, registry=r)
        self.queue_duration = Histogram("jaxinfer_queue_duration_seconds", "Time from arrival to dispatch",
                                        labels, buckets=_LAT, registry=r)
        self.compute_duration = Histogram("jaxinfer_compute_duration_seconds", "Device time per batch",
                                          labels, buckets=_LAT, registry=r)
        self.batch_size = Histogram("jaxinfer_batch_size", "Rows per dispatched batch", labels,
                                    buckets=_BATCH, registry=r)
        self.batch_size_current = Gauge("jaxinfer_batch_size_current", "Rows in the last batch", labels,
                                        registry=r)
        self.padding_ratio = Histogram("jaxinfer_padding_ratio", "Padded fraction of each batch's bucket",
                                       labels, buckets=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0), registry=r)
        self.requests = Counter("jaxinfer_requests", "Requests by outcome", labels + ("status",), registry=r)
        self.cache_hits = Counter("jaxinfer_cache_hits", "Response cache hits", labels, registry=r)
        self.cache_misses = Counter("jaxinfer_cache_misses", "Response cache misses", labels, registry=r)
        # generation (decoders served through the generate endpoints)
        self.ttft = Histogram("jaxinfer_time_to_first_token_seconds", "Generate: request arrival to first token",
                              labels, buckets=_LAT, registry=r)
        self.inter_token = Histogram("jaxinfer_inter_token_latency_seconds", "Generate: time between tokens",
                                     labels, buckets=_ITL, registry=r)
        self.generated_tokens = Counter("jaxinfer_generated_tokens", "Generate: tokens sent to clients", labels,
                                        registry=r)
        self.generate_length = Histogram("jaxinfer_generate_output_tokens", "Generate: tokens per request",
                                         labels, buckets=_BATCH, registry=r)
        self._recent: dict[tuple[str, str], deque[float]] = {}
        self._tokens: dict[tuple[str, str], int] = {}
        self._token_samples: dict[tuple[str, str], deque[tuple[float, float]]] = {}
        self._lock = threading.Lock()
        self._versions = versions
        self._series: dict[tuple[str, str, int], tuple[Any, Any, deque[float] | None]] = {}
        self.registry.register(_Live(self, versions, compiles_retired))

    def observe_request(self, model: str, version: str, status: int, seconds: float) -> None:
        """Count one answered request. Its series are looked up once per (model, version, status), and
        only loaded models and versions get their own: a request naming another is counted under
        ``model=""`` (unknown model) or ``version=""`` (unknown version), so clients cannot grow
        ``/metrics`` without bound by inventing names."""
        key = (model, version, status)
        series = self._series.get(key)
        if series is None:
            series = self._new_series(model, version, status)
        count, duration, recent = series
        count.inc()
        if duration is not None:
            duration.observe(seconds)
            with self._lock:
                recent.append(seconds)

    def _new_series(self, model: str, version: str, status: int) -> tuple[Any, Any, deque[float] | None]:
        live = {(v.name, str(v.version)) for v in self._versions()}
        known = (model, version) in live
        if not known:  # counted, but not remembered under the caller's names
            model = model if any(model == m for m, _ in live) else ""
            version = ""
        duration = recent = None
        if status == 200:
            duration = self.request_duration.labels(model, version)
            with self._lock:
                recent = self._recent.setdefault((model, version), deque(maxlen=WINDOW))
        series = (self.requests.labels(model, version, str(status)), duration, recent)
        if known:
            self._series[(model, version, status)] = series
        return series

    def observe_generation(self, model: str, version: str, stream: Any, n_tokens: int, *,
                           count_tokens: bool = True) -> None:
        """One finished generation: its TTFT, its inter-token gaps, its length (and its tokens, unless
        the streaming handler already counted them one by one)."""
        if count_tokens:
            self.count_tokens(model, version, n_tokens)
        if not n_tokens:
            return
        self.generate_length.labels(model, version).observe(n_tokens)
        ttft = getattr(stream, "ttft_s", None)
        if ttft is not None:
            self.ttft.labels(model, version).observe(ttft)
        times = list(getattr(stream, "token_times", ()) or ())
        itl = self.inter_token.labels(model, version)
        for a, b in zip(times, times[1:]):
            itl.observe(b - a)

    def count_tokens(self, model: str, version: str, n: int) -> None:
        if n:
            self.generated_tokens.labels(model, version).inc(n)
            with self._lock:
                self._tokens[(model, version)] = self._tokens.get((model, version), 0) + n

    def token_rate(self, model: str, version: str) -> float:
        """Tokens/s sent for (model, version) over the last ~RATE_WINDOW_S seconds of scrapes."""
        now = time.monotonic()
        with self._lock:
            total = self._tokens.get((model, version), 0)
            samples = self._token_samples.setdefault((model, version), deque())
            samples.append((now, total))
            while len(samples) > 2 and now - samples[1][0] >= RATE_WINDOW_S:
                samples.popleft()
            t0, n0 = samples[0]
        return (total - n0) / (now - t0) if now > t0 else 0.0

    def on_batch(self, model: str, version: str, report: BatchReport) -> None:
        if report.error:
            return
        self.compute_duration.labels(model, version).observe(report.compute_s)
        self.batch_size.labels(model, version).observe(report.rows)
        self.batch_size_current.labels(model, version).set(report.rows)
        self.padding_ratio.labels(model, version).observe(report.padding_ratio)
        queue = self.queue_duration.labels(model, version)  # one lookup per batch, not per request
        for q in report.queue_s:
            queue.observe(q)

    def quantiles(self) -> dict[tuple[str, str], dict[float, float]]:
        with self._lock:
            recent = {k: np.asarray(v) for k, v in self._recent.items() if v}
        return {k: {q: float(np.quantile(v, q)) for q in QUANTILES} for k, v in recent.items()}

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Live:
    """Gauges read at scrape time: quantiles, compiles, queue depth, device memory/utilisation."""

    def __init__(self, metrics: Metrics, versions: Callable[[], Iterable[Any]], retired: Callable[[], int]):
        self.metrics, self.versions, self.retired = metrics, versions, retired

    def describe(self) -> list:
        return []

    def collect(self) -> Iterable[Any]:
        q = GaugeMetricFamily("jaxinfer_request_duration_quantile_seconds",
                              f"Request latency quantiles over the last {WINDOW} requests",
                              labels=["model", "version", "quantile"])
        for (model, version), qs in self.metrics.quantiles().items():
            for k, v in qs.items():
                q.add_metric([model, version, str(k)], v)
        yield q
        live = list(self.versions())
        compiles = CounterMetricFamily("jaxinfer_compiles", "XLA compiles, warm-up included")
        compiles.add_metric([], self.retired() + sum(v.compiles for v in live))
        yield compiles
        late = CounterMetricFamily("jaxinfer_compiles_after_warmup", "Compiles after warm-up (should stay 0)",
                                   labels=["model", "version"])
        depth = GaugeMetricFamily("jaxinfer_queue_size", "Requests waiting", labels=["model", "version"])
        util = GaugeMetricFamily("jaxinfer_device_utilization", "Busy-time fraction of the device per model",
                                 labels=["model", "version"])
        streams = GaugeMetricFamily("jaxinfer_sequences_active", "Streams a stateful model keeps a state for",
                                    labels=["model", "version"])
        for v in live:
            late.add_metric([v.name, str(v.version)], v.late_compiles)
            depth.add_metric([v.name, str(v.version)], v.queued())
            util.add_metric([v.name, str(v.version)], v.utilization())
            if getattr(v, "bucketed", None) is not None and v.bucketed.sequences is not None:
                streams.add_metric([v.name, str(v.version)], v.sequences())
        yield late
        yield depth
        yield util
        yield streams
        yield from self._generation(live)
        mem = GaugeMetricFamily("jaxinfer_device_memory_bytes_in_use", "Device memory in use",
                                labels=["device"])
        for d in jax.local_devices()[:8]:
            stats = d.memory_stats() if hasattr(d, "memory_stats") else None
            if stats and "bytes_in_use" in stats:
                mem.add_metric([str(d.id)], stats["bytes_in_use"])
        yield mem

    def _generation(self, live: list[Any]) -> Iterable[Any]:
        """Per decoder version: slots in use, KV-cache occupancy, tokens/s, engine steps."""
        labels = ["model", "version"]
        slots = GaugeMetricFamily("jaxinfer_generate_active_slots", "Generate: KV-cache slots decoding now",
                                  labels=labels)
        occupancy = GaugeMetricFamily("jaxinfer_generate_cache_occupancy",
                                      "Generate: fraction of the KV cache (slots x max_len) holding tokens",
                                      labels=labels)
        rate = GaugeMetricFamily("jaxinfer_generate_tokens_per_second",
                                 f"Generate: tokens sent per second over the last ~{RATE_WINDOW_S:g} s", labels=labels)
        steps = CounterMetricFamily("jaxinfer_generate_decode_steps", "Generate: decode steps run by the engine",
                                    labels=labels)
        for v in live:
            if getattr(v, "kind", None) != "decoder":
                continue
            key = [v.name, str(v.version)]
            stats = v.stats()
            slots.add_metric(key, float(stats.get("active_slots", 0)))
            occupancy.add_metric(key, float(stats.get("cache_occupancy", 0.0)))
            rate.add_metric(key, self.metrics.token_rate(v.name, str(v.version)))
            steps.add_metric(key, float(stats.get("steps", 0)))
        yield slots
        yield occupancy
        yield rate
        yield steps
