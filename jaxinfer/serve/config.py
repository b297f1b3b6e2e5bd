"""Per-model serving configuration: ``repo/<model>/config.yaml`` or keyword arguments.

Example ``config.yaml``::

    max_batch: 16                  # batch buckets 1, 2, 4, 8, 16 (or list them: batch_buckets)
    dim_buckets: {seq: [32, 64, 128]}
    sla_ms: 50                     # dispatch early when waiting would miss it
    max_queue_delay_ms: 2
    adaptive_cap: true             # stop growing batches where the latency model shows no throughput gain
    queue_size: 1024               # a full queue answers 429
    timeout_ms: 30000              # a request waiting longer answers 504
    version_policy: {latest: 1}    # or {specific: [1, 3]} or all
    response_cache: {size: 1024}   # or true / false
    max_sequences: 1024            # a stateful model: streams kept at once (sequence_id parameter)
    sequence_idle_ms: 60000        # ... a stream quiet this long may be dropped for a new one
    generation: {slots: 8, max_len: 256, prefill_buckets: [16, 64, 256]}   # a decoder: generate endpoints

A model whose inputs are a past-KV decoder's (``input_ids`` + ``past_*``) is
served through the generate endpoints with the defaults of
:class:`GenerationConfig` even without a ``generation`` key; ``generation:
false`` turns that off.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ..batching import BatcherConfig, BucketPolicy, SequencePolicy, default_batch_sizes
from ..errors import JaxinferError


class ConfigError(JaxinferError):
    """A config.yaml or serve() option that is malformed; names the key and what was expected."""


#: A config.yaml larger than this is refused unread (a real one is a few hundred bytes; YAML parsing runs
#: in pure Python at about 1.6 MB/s here, so a 50 MB file would hold a load for half a minute).
MAX_CONFIG_BYTES = 1 << 20
#: Deepest nesting of flow collections a config.yaml may have (a real one has 2 or 3).
MAX_CONFIG_NESTING = 64


def _flow_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in ``text`` (brackets inside quoted strings count too: an upper
    bound, which is all the check needs)."""
    depth = deepest = 0
    for ch in text:
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}" and depth:
            depth -= 1
    return deepest


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxlist, _SHOW.maxtuple, _SHOW.maxdict, _SHOW.maxstring, _SHOW.maxother = 3, 10, 10, 6, 60, 60


def _show(value: Any, limit: int = 300) -> str:
    """A bounded repr for error messages: a YAML alias bomb is a tiny object graph but a huge repr."""
    text = _SHOW.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of a model to serve: the latest N, a specific list, or all."""

    kind: str = "latest"
    count: int = 1
    versions: tuple[int, ...] = ()

    @classmethod
    def parse(cls, value: Any) -> VersionPolicy:
        if value is None:
            return cls()
        if value == "all" or value == {"all": {}} or (isinstance(value, Mapping) and "all" in value):
            return cls("all")
        if isinstance(value, Mapping) and len(value) == 1:
            (key, arg), = value.items()
            if key == "latest":
                n = arg.get("num_versions", 1) if isinstance(arg, Mapping) else arg
                if not _is_int(n) or n < 1:
                    raise ConfigError(f"version_policy latest needs a positive count, got {_show(arg)}")
                return cls("latest", n)
            if key == "specific":
                vs = arg.get("versions", []) if isinstance(arg, Mapping) else arg
                if not isinstance(vs, (list, tuple)) or not vs or not all(_is_int(v) for v in vs):
                    raise ConfigError(f"version_policy specific needs a list of version numbers, got {_show(arg)}")
                return cls("specific", versions=tuple(sorted(vs)))
        raise ConfigError(f"version_policy must be 'all', {{latest: N}} or {{specific: [versions]}}, "
                          f"got {_show(value)}")

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve out of those on disk."""
        have = sorted(available)
        if self.kind == "all":
            return have
        if self.kind == "latest":
            return have[-self.count:]
        return [v for v in have if v in self.versions]


@dataclass(frozen=True)
class GenerationConfig:
    """How a decoder model is served: KV-cache slots, their length, prefill buckets, scheduling."""

    enabled: bool = True
    slots: int = 8
    max_len: int = 256
    prefill_buckets: tuple[int, ...] = ()  # () -> the Decoder's default buckets
    policy: str = "continuous"              # or "static": admit a new batch only when all slots are done
    max_waiting: int = 1024                 # requests queued beyond the slots; more answer 429
    max_new_tokens: int | None = None       # when a request names no max_tokens (default: min(64, max_len/2))
    tokenizer: str | None = None            # a tokenizer.json path (default: the model/version folder's)

    def __post_init__(self) -> None:
        if self.max_new_tokens is None and isinstance(self.max_len, int):
            object.__setattr__(self, "max_new_tokens", max(1, min(64, self.max_len // 2)))
        for key in ("slots", "max_len", "max_waiting", "max_new_tokens"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"generation.{key} must be a positive integer, got {_show(value)}")
        if not all(_is_int(b) and 0 < b <= self.max_len
                   for b in self.prefill_buckets):
            raise ConfigError(f"generation.prefill_buckets must be positive integers <= max_len {self.max_len}, "
                              f"got {_show(list(self.prefill_buckets))}")
        object.__setattr__(self, "prefill_buckets", tuple(sorted(set(self.prefill_buckets))))
        if self.policy not in ("continuous", "static"):
            raise ConfigError(f"generation.policy must be 'continuous' or 'static', got {_show(self.policy)}")
        if self.max_new_tokens >= self.max_len:
            raise ConfigError(f"generation.max_new_tokens ({self.max_new_tokens}) must be below max_len "
                              f"({self.max_len}) to leave room for a prompt")

    @classmethod
    def parse(cls, value: Any, where: str = "config") -> GenerationConfig | None:
        """``true``/``false``/``None``/a mapping/a GenerationConfig -> a config (None: detect decoders)."""
        if value is None or isinstance(value, GenerationConfig):
            return value
        if value is True:
            return cls()
        if value is False:
            return cls(enabled=False)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: generation must be true/false or a mapping like "
                              f"{{slots: 8, max_len: 256}}, got {_show(value)}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown generation key(s) {_show(unknown)}; known keys are {sorted(known)}")
        kw = dict(value)
        if "prefill_buckets" in kw:
            kw["prefill_buckets"] = tuple(_ints(kw["prefill_buckets"], f"{where}: generation.prefill_buckets"))
        if kw.get("tokenizer") is not None and not isinstance(kw["tokenizer"], str):
            raise ConfigError(f"{where}: generation.tokenizer must be a path string, got {_show(kw['tokenizer'])}")
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides how one model is served."""

    max_batch: int = 32
    batch_buckets: tuple[int, ...] = ()
    dim_buckets: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    sla_ms: float | None = None
    max_queue_delay_ms: float = 2.0
    queue_size: int = 1024
    timeout_ms: float | None = 30_000.0
    max_in_flight: int = 2
    adaptive_cap: bool = True
    version_policy: VersionPolicy = VersionPolicy()
    response_cache: int = 0  # entries; 0 = off
    max_sequences: int = 1024  # a stateful model's streams kept at once
    sequence_idle_ms: float = 60_000.0  # a stream quiet this long may be dropped to make room
    precision: str | None = None
    quantize: str | None = None
    shard: Any = None
    generation: GenerationConfig | None = None  # None: a recognised past-KV decoder gets the defaults

    def __post_init__(self) -> None:
        for key in ("max_batch", "queue_size", "max_in_flight", "response_cache", "max_sequences"):
            if not _is_int(getattr(self, key)):
                raise ConfigError(f"{key} must be an integer, got {_show(getattr(self, key))}")
        if self.max_batch < 1:
            raise ConfigError(f"max_batch must be a positive integer, got {self.max_batch!r}")
        for key in ("sla_ms", "max_queue_delay_ms", "timeout_ms", "sequence_idle_ms"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value)):
                raise ConfigError(f"{key} must be a finite number of milliseconds (or null), got {_show(value)}")
        if not isinstance(self.adaptive_cap, bool):
            raise ConfigError(f"adaptive_cap must be true or false, got {_show(self.adaptive_cap)}")
        if self.batch_buckets:
            if not all(_is_int(b) and b > 0 for b in self.batch_buckets):
                raise ConfigError(f"batch_buckets must be positive integers, got {_show(list(self.batch_buckets))}")
            object.__setattr__(self, "batch_buckets", tuple(sorted(set(self.batch_buckets))))
            object.__setattr__(self, "max_batch", self.batch_buckets[-1])
        if self.response_cache < 0:
            raise ConfigError(f"response_cache size must be >= 0, got {self.response_cache}")
        try:
            self.batcher()
            self.sequences()
        except ValueError as e:
            raise ConfigError(str(e)) from e

    def buckets(self) -> BucketPolicy:
        sizes = self.batch_buckets or default_batch_sizes(self.max_batch)
        return BucketPolicy(sizes, dict(self.dim_buckets))

    def sequences(self) -> SequencePolicy:
        return SequencePolicy(self.max_sequences, self.sequence_idle_ms / 1000.0)

    def batcher(self) -> BatcherConfig:
        return BatcherConfig(max_queue_delay_ms=self.max_queue_delay_ms, sla_ms=self.sla_ms,
                             queue_size=self.queue_size, timeout_ms=self.timeout_ms,
                             max_in_flight=self.max_in_flight, adaptive_cap=self.adaptive_cap)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, *, where: str = "config") -> ModelConfig:
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {_show(unknown)}; known keys are {sorted(known)}")
        kw: dict[str, Any] = {}
        for key, value in raw.items():
            if key == "version_policy":
                kw[key] = VersionPolicy.parse(value)
            elif key == "batch_buckets":
                kw[key] = tuple(_ints(value, f"{where}: batch_buckets"))
            elif key == "dim_buckets":
                if not isinstance(value, Mapping):
                    raise ConfigError(f"{where}: dim_buckets must map a dim name to sizes, got {_show(value)}")
                kw[key] = {str(k): tuple(_ints(v, f"{where}: dim_buckets.{k}")) for k, v in value.items()}
            elif key == "response_cache":
                kw[key] = _cache_size(value, where)
            elif key == "generation":
                kw[key] = GenerationConfig.parse(value, where)
            elif key in ("sla_ms", "max_queue_delay_ms", "timeout_ms", "sequence_idle_ms"):
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    raise ConfigError(f"{where}: {key} must be a number of milliseconds, got {_show(value)}")
                kw[key] = None if value is None else float(value)
            else:
                kw[key] = value
        if kw.get("quantize") or kw.get("precision") or kw.get("shard"):
            raise ConfigError(f"{where}: precision/quantize/shard are not supported by the server yet; "
                              "quantize or shard the Model in Python and pass it to jaxinfer.serve")
        try:
            return cls(**kw)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{where}: {e}") from e

    @classmethod
    def load(cls, path: Path) -> ModelConfig:
        if path.exists() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is over the {MAX_CONFIG_BYTES}-byte limit "
                              "for a config.yaml")
        text = path.read_text() if path.exists() else ""
        if _flow_depth(text) > MAX_CONFIG_NESTING:  # refused before PyYAML recurses through it (seconds)
            raise ConfigError(f"{path}: YAML nested too deeply to be a config (over {MAX_CONFIG_NESTING} levels "
                              "of [ ] / { })")
        try:
            raw = yaml.safe_load(text) if text else {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        except RecursionError:
            raise ConfigError(f"{path}: YAML nested too deeply to be a config") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text: {e}") from None
        if raw is not None and not isinstance(raw, Mapping):
            raise ConfigError(f"{path}: expected a mapping of options, got {type(raw).__name__}")
        return cls.from_dict(raw, where=str(path))

    def merged(self, **overrides: Any) -> ModelConfig:
        """This config with ``overrides`` applied (validated like a config.yaml)."""
        base = {f.name: getattr(self, f.name) for f in fields(self)}
        unknown = sorted(set(overrides) - set(base))
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown}; known options are {sorted(base)}")
        for k, v in overrides.items():
            base[k] = v
        base["version_policy"] = base["version_policy"] if isinstance(base["version_policy"], VersionPolicy) \
            else VersionPolicy.parse(base["version_policy"])
        if not isinstance(base["response_cache"], int) or isinstance(base["response_cache"], bool):
            base["response_cache"] = _cache_size(base["response_cache"], "serve()")
        base["generation"] = GenerationConfig.parse(base["generation"], "serve()")
        if "max_batch" in overrides and "batch_buckets" not in overrides:
            base["batch_buckets"] = ()
        return ModelConfig(**base)


def _ints(value: Any, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not all(_is_int(v) for v in value):
        raise ConfigError(f"{where} must be a list of integers, got {_show(value)}")
    return list(value)


def _cache_size(value: Any, where: str) -> int:
    if value is True:
        return 1024
    if value in (False, None):
        return 0
    if _is_int(value):
        return value
    if isinstance(value, Mapping) and _is_int(value.get("size", 1024)):
        return int(value.get("size", 1024)) if value.get("enabled", True) else 0
    raise ConfigError(f"{where}: response_cache must be true/false, a size or {{size: N}}, got {_show(value)}")
