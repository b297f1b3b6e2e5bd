"""The model repository: versions on disk (or Models in memory), warm-up, load/unload/reload.

Layout (Triton's)::

    repo/<model>/config.yaml              optional, see :mod:`jaxinfer.serve.config`
    repo/<model>/<version>/model.onnx     or model.tflite, or model/ (a jaxinfer.save directory)
    repo/<model>[/<version>]/tokenizer.json   optional, for a decoder's text in/out

A past-KV decoder (or a model whose config.yaml has ``generation``) is served
by a :class:`~jaxinfer.serve.generate.DecoderVersion` (KV-cache slots and a
continuous-batching engine, warmed at load) behind the generate endpoints;
every other model by a :class:`ModelVersion` (buckets and a dynamic batcher).

A (re)load warms every new version *before* it is published; versions that
leave the policy are then drained (their queued requests finish) and stopped,
so a reload under load drops no request. Identical weights across versions
and models are stored once on the device (:class:`ParamPool`).
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..batching import (BatchReport, BucketedModel, DynamicBatcher, LatencyModel, Prepared, StreamRef,
                        stderr_progress)
from ..errors import JaxinferError
from ..model import Model
from .cache import ResponseCache, tensors_key
from .config import ConfigError, ModelConfig
from .generate import DecoderVersion, wants_generation
from .protocol import datatype_of

log = logging.getLogger("jaxinfer.serve")

MODEL_FILES = ("model.onnx", "model.tflite", "model")


class ModelNotFoundError(JaxinferError):
    """No such model or version is loaded (HTTP 404)."""


class ModelLoadFailed(JaxinferError):
    """A model in the repository could not be loaded; the message says why (HTTP 400)."""


class ParamPool:
    """Device arrays by content digest: identical initializers are stored once."""

    def __init__(self) -> None:
        self._arrays: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._lock = threading.Lock()
        self.shared_bytes = 0  # bytes not re-stored thanks to sharing, cumulative

    @staticmethod
    def digest(arr: np.ndarray) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{arr.dtype}|{arr.shape}|".encode())
        h.update(np.ascontiguousarray(arr).tobytes())
        return h.hexdigest()

    def share(self, model: Model) -> Model:
        """``model`` with each param replaced by an identical pooled one where there is one."""
        params: dict[str, Any] = {}
        inits = model.graph.initializers
        for name, value in model.params.items():
            init = inits.get(name)
            same = init is not None and np.shape(init) == tuple(value.shape) and np.asarray(init).dtype == value.dtype
            host = np.asarray(init) if same else np.asarray(value)  # hash the host copy when there is one
            key = self.digest(host)
            with self._lock:
                pooled = self._arrays.get(key)
                if pooled is not None:
                    self.shared_bytes += host.nbytes
                    params[name] = pooled
                else:
                    self._arrays[key] = value
                    params[name] = value
        return model.with_params(params)


@dataclass(frozen=True)
class VersionKey:
    version: int
    stamp: float  # mtime of the model file: a changed file is a new load


class ModelVersion:
    """One served version: bucketed model, batcher, optional response cache."""

    def __init__(self, name: str, version: int, model: Model, config: ModelConfig, *,
                 on_batch: Callable[[str, str, BatchReport], None] | None = None, stamp: float = 0.0):
        self.name, self.version, self.config, self.stamp = name, version, config, stamp
        self.source = model
        if model.stateful and config.response_cache:
            raise ConfigError(f"model '{name}' is stateful: a cached answer would skip its state update, so "
                              "response_cache must be off for it")
        self.bucketed = BucketedModel(model, config.buckets(), config.sequences())
        if self.bucketed.sequences is not None:
            self.bucketed.sequences.name = name  # errors name the served model
        self.latency = LatencyModel()
        cb = (lambda r: on_batch(name, str(version), r)) if on_batch else None
        self.batcher = DynamicBatcher(self.bucketed, self.latency, config.batcher(), name=f"{name}/{version}",
                                      on_batch=cb)
        self.cache = ResponseCache(config.response_cache) if config.response_cache else None
        self.state = "LOADING"
        self.warmup_s = 0.0

    def start(self, progress: bool = False) -> ModelVersion:
        """Compile and time every bucket, then open the queue."""
        t = time.perf_counter()
        timings = self.bucketed.warmup(stderr_progress if progress else None, label=f"{self.name}/{self.version}")
        for bucket, seconds in timings.items():
            self.latency.update(bucket, seconds)
        self.warmup_s = time.perf_counter() - t
        self.batcher.start()
        self.state = "READY"
        log.info("%s/%s ready: %d compiles in %.1fs, buckets %s", self.name, self.version, self.compiles,
                 self.warmup_s, list(self.bucketed.policy.batch_sizes))
        return self

    def stop(self, drain: bool = True) -> None:
        self.state = "UNLOADING"
        self.batcher.stop(drain=drain)
        self.state = "UNAVAILABLE"

    @property
    def compiles(self) -> int:
        return self.bucketed.compiles

    @property
    def late_compiles(self) -> int:
        return self.bucketed.late_compiles

    def prepare(self, feeds: Mapping[str, Any], sequence: StreamRef | None = None) -> Prepared:
        return self.bucketed.prepare(feeds, sequence)

    def sequences(self) -> int:
        """Streams a stateful model keeps now (0 for a stateless one)."""
        return len(self.bucketed.sequences) if self.bucketed.sequences is not None else 0

    def queued(self) -> int:
        return self.batcher.queued()

    def utilization(self) -> float:
        return self.batcher.utilization()

    def submit(self, prepared: Prepared, *, timeout_s: float | None = None) -> tuple[Future, bool]:
        """Queue a prepared request; returns (future, cache hit)."""
        if self.cache is not None:
            key = tensors_key(prepared.feeds) + repr(prepared.sizes)
            hit = self.cache.get(key)
            if hit is not None:
                f: Future = Future()
                f.set_result(hit)
                return f, True
            fut = self.batcher.submit(prepared, timeout_s=timeout_s)
            fut.add_done_callback(lambda d: d.exception() is None and self.cache.put(key, d.result()))
            return fut, False
        return self.batcher.submit(prepared, timeout_s=timeout_s), False

    def metadata(self, versions: list[int]) -> dict[str, Any]:
        def tensor(s: Any, batched: bool) -> dict[str, Any]:
            shape = [d if isinstance(d, int) else -1 for d in (s.shape or ())]
            if batched and shape:
                shape[0] = -1
            return {"name": s.name, "datatype": datatype_of(s.dtype), "shape": shape}

        bm = self.bucketed
        batched = bm.layout != "none"
        return {
            "name": self.name,
            "versions": [str(v) for v in versions],
            "platform": f"jaxinfer_{bm.model.graph.fmt}",
            "inputs": [tensor(s, batched) for s in bm.inputs],
            "outputs": [tensor(s, s.name in bm.batched_outputs) for s in bm.outputs],
        }

    def triton_config(self) -> dict[str, Any]:
        bm = self.bucketed
        cfg = self.config
        return {
            "name": self.name,
            "platform": f"jaxinfer_{bm.model.graph.fmt}",
            "max_batch_size": bm.policy.max_batch if bm.layout != "none" else 0,
            "dynamic_batching": {"preferred_batch_size": list(bm.policy.batch_sizes),
                                 "max_queue_delay_microseconds": int(cfg.max_queue_delay_ms * 1000)},
            "sla_ms": cfg.sla_ms,
            "dim_buckets": {k: list(v) for k, v in bm.policy.dims.items()},
            "response_cache": {"enable": cfg.response_cache > 0, "size": cfg.response_cache},
            **({"sequence_batching": {"max_sequences": cfg.max_sequences,
                                      "max_sequence_idle_microseconds": int(cfg.sequence_idle_ms * 1000),
                                      "state": [str(s) for s in bm.model.inputs if s not in bm.inputs]}}
               if bm.sequences is not None else {}),
            "latency_model_s": {str(k): v for k, v in self.latency.snapshot().items()},
        }


#: What the repository serves per version: a batched model or a decoder (generate endpoints).
Served = ModelVersion | DecoderVersion


def _model_path(version_dir: Path) -> Path | None:
    for name in MODEL_FILES:
        p = version_dir / name
        if p.exists():
            return p
    return None


class ModelRepository:
    """Loaded model versions by name, from a directory and/or in-memory Models."""

    def __init__(self, root: str | Path | None = None, models: Mapping[str, Model] | None = None, *,
                 overrides: Mapping[str, Any] | None = None, progress: bool = False,
                 on_batch: Callable[[str, str, BatchReport], None] | None = None,
                 share_weights: bool = True):
        self.root = Path(root) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ModelLoadFailed(f"model repository {self.root} is not a directory")
        self.memory: dict[str, Model] = dict(models or {})
        self.overrides = dict(overrides or {})
        self.progress = progress
        self.on_batch = on_batch
        self.pool = ParamPool() if share_weights else None
        self._live: dict[str, dict[int, Served]] = {}
        self._errors: dict[str, str] = {}
        self._lock = threading.RLock()  # guards _live
        self._load_locks: dict[str, threading.Lock] = {}
        self.retired_compiles = 0
        self.loaded_snap: dict[str, tuple] = {}  # what was on disk when each model last loaded
        self.failed_snap: dict[str, tuple] = {}  # ... or last failed to load

    # ---------------------------------------------------------------- lookup
    def names(self) -> list[str]:
        """Every model the repository knows (on disk or in memory), loaded or not."""
        found = set(self.memory)
        if self.root is not None:
            found |= {p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        return sorted(found | set(self._live))

    def versions(self) -> list[Served]:
        with self._lock:
            return [v for vs in self._live.values() for v in vs.values()]

    def get(self, name: str, version: str | int | None = None) -> Served:
        with self._lock:
            vs = self._live.get(name)
            if not vs:
                raise ModelNotFoundError(f"model '{name}' is not loaded; loaded models: {sorted(self._live)}")
            if version in (None, ""):
                return vs[max(vs)]
            try:
                v = int(version)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ModelNotFoundError(f"model '{name}' has no version {version!r}; versions: {sorted(vs)}") \
                    from None
            if v not in vs:
                raise ModelNotFoundError(f"model '{name}' has no version {v} loaded; versions: {sorted(vs)}")
            return vs[v]

    def loaded_versions(self, name: str) -> list[int]:
        with self._lock:
            return sorted(self._live.get(name, {}))

    def ready(self) -> bool:
        with self._lock:
            return bool(self._live) and all(v.state == "READY" for vs in self._live.values() for v in vs.values())

    def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        rows = []
        with self._lock:
            for name in self.names():
                live = self._live.get(name, {})
                if live:
                    rows += [{"name": name, "version": str(v), "state": mv.state, "reason": ""}
                             for v, mv in sorted(live.items())]
                elif not ready_only:
                    rows.append({"name": name, "version": "", "state": "UNAVAILABLE",
                                 "reason": self._errors.get(name, "unloaded")})
        return [r for r in rows if not ready_only or r["state"] == "READY"]

    # ----------------------------------------------------------- load/unload
    def config_for(self, name: str) -> ModelConfig:
        base = ModelConfig()
        if self.root is not None and (self.root / name / "config.yaml").exists():
            base = ModelConfig.load(self.root / name / "config.yaml")
        if self.overrides:
            base = base.merged(**self.overrides)
        return base

    def _on_disk(self, name: str) -> dict[int, Path]:
        if self.root is None or not (self.root / name).is_dir():
            return {}
        found = {}
        for d in (self.root / name).iterdir():
            # ASCII digits only: str.isdigit() also passes '²' or '١', which int() refuses or reads as another version
            if d.is_dir() and d.name.isascii() and d.name.isdigit():
                path = _model_path(d)
                if path is not None:
                    found[int(d.name)] = path
        return found

    def _load_one(self, name: str, version: int, path: Path | None, config: ModelConfig) -> Served:
        import jaxinfer

        model = self.memory[name] if path is None else jaxinfer.load(path)
        if self.pool is not None:
            model = self.pool.share(model)
        stamp = path.stat().st_mtime if path is not None else 0.0
        if wants_generation(model, config):
            folders = (path.parent, path.parent.parent) if path is not None else ()
            dv = DecoderVersion(name, version, model, config, stamp=stamp, folders=folders)
            return dv.start(progress=self.progress)
        mv = ModelVersion(name, version, model, config, on_batch=self.on_batch, stamp=stamp)
        return mv.start(progress=self.progress)

    def load(self, name: str) -> list[int]:
        """(Re)load ``name``: warm new/changed versions, publish them, drain the retired ones."""
        if name not in self.names():
            raise ModelNotFoundError(f"no model '{name}' in the repository; models: {self.names()}")
        lock = self._load_locks.setdefault(name, threading.Lock())
        with lock:
            snap = self.snapshot_of(name)  # taken first: a change during the load triggers another poll load
            try:
                config = self.config_for(name)
                if name in self.memory:
                    wanted: dict[int, Path | None] = {1: None}
                else:
                    disk = self._on_disk(name)
                    if not disk:
                        raise ModelLoadFailed(f"model '{name}' has no version directory holding one of "
                                              f"{list(MODEL_FILES)} under {self.root / name}")
                    chosen = config.version_policy.select(list(disk))
                    if not chosen:
                        raise ModelLoadFailed(f"model '{name}': version policy {config.version_policy} selects "
                                              f"none of the versions on disk {sorted(disk)}")
                    wanted = {v: disk[v] for v in chosen}
                with self._lock:
                    current = dict(self._live.get(name, {}))
                fresh: dict[int, Served] = {}
                for v, path in sorted(wanted.items()):
                    old = current.get(v)
                    stamp = path.stat().st_mtime if path is not None else 0.0
                    # reuse only a live version: an unload racing this load may have stopped it
                    if old is not None and old.state == "READY" and old.stamp == stamp and old.config == config:
                        fresh[v] = old
                    else:
                        fresh[v] = self._load_one(name, v, path, config)  # warm before publishing
            except (JaxinferError, ConfigError, OSError) as e:
                self._errors[name] = str(e)
                self.failed_snap[name] = snap
                raise ModelLoadFailed(f"failed to load model '{name}': {e}") from e
            except Exception as e:  # noqa: BLE001  (a broken model file must not take the server down)
                self._errors[name] = f"{type(e).__name__}: {e}"
                self.failed_snap[name] = snap
                raise ModelLoadFailed(f"failed to load model '{name}': {type(e).__name__}: {e}") from e
            with self._lock:
                self._live[name] = fresh
                self._errors.pop(name, None)
                self.loaded_snap[name] = snap
                self.failed_snap.pop(name, None)
            for v, mv in current.items():
                if fresh.get(v) is not mv:
                    self._retire(mv)
            return sorted(fresh)

    def _retire(self, mv: Served) -> None:
        mv.stop(drain=True)
        self.retired_compiles += mv.compiles

    def unload(self, name: str) -> None:
        """Stop serving ``name``: after a load of it in progress (which would publish afterwards), drain it."""
        if name not in self.names():  # checked first: a client's invented names get no lock
            raise ModelNotFoundError(f"no model '{name}' in the repository; models: {self.names()}")
        with self._load_locks.setdefault(name, threading.Lock()):
            with self._lock:
                gone = self._live.pop(name, None)
            if gone is None:
                return
            self._errors[name] = "unloaded"
            for mv in gone.values():
                self._retire(mv)

    def load_all(self) -> dict[str, str]:
        """Load every model; returns {name: error} for those that failed (the rest serve)."""
        failed = {}
        for name in self.names():
            try:
                self.load(name)
            except (ModelLoadFailed, ModelNotFoundError) as e:
                log.error("%s", e)
                failed[name] = str(e)
        return failed

    def stop(self, drain: bool = True) -> None:
        with self._lock:
            everything = [v for vs in self._live.values() for v in vs.values()]
            self._live.clear()
        for mv in everything:
            mv.stop(drain=drain)
            self.retired_compiles += mv.compiles

    # ------------------------------------------------------------- polling
    def snapshot_of(self, name: str) -> tuple:
        """What is on disk now for ``name`` (versions, model mtimes, config mtime), to detect changes."""
        if self.root is None or name in self.memory:
            return ()
        cfg = self.root / name / "config.yaml"
        return (tuple(sorted((v, p.stat().st_mtime) for v, p in self._on_disk(name).items())),
                cfg.stat().st_mtime if cfg.exists() else 0.0)

    def changed(self) -> list[str]:
        """Models whose files changed since they last loaded (or failed to load): what a poll reloads."""
        if self.root is None:
            return []
        out = []
        for name in self.names():
            if name in self.memory:
                continue
            snap = self.snapshot_of(name)
            if snap != self.loaded_snap.get(name) and snap != self.failed_snap.get(name):
                out.append(name)
        return out

