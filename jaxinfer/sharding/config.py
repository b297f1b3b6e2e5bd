"""Mesh configuration: parse dicts / frozen dataclasses / YAML into a ``MeshConfig``
and build a ``jax.sharding.Mesh`` with axes ``data``, ``stage``, ``expert``, ``tensor``.

Accepted layouts (all equivalent forms of "4-way tensor, 2-way data")::

    {"tensor_parallel": 4, "data_parallel": 2}
    {"tensor": 4, "data": 2}
    {"distributed": {"strategy": "hybrid",
                     "tensor_parallel": {"world_size": 4, "chunk_size": 4096},
                     "data_parallel": {"world_size": 2}}}
    MeshConfig(tensor=4, data=2)
    "path/to/config.yaml"  (either layout above, as YAML)

Devices a config leaves over become data parallel (``data`` unset or 0/"auto").
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from ..checks import is_int
from ..errors import JaxinferError

#: Mesh axis order: tensor innermost (neighbouring devices), data outermost.
AXES = ("data", "stage", "expert", "tensor")


class ShardingConfigError(JaxinferError, ValueError):
    """A mesh config that cannot be built for these devices or this model."""


_ALIASES = {
    "data": "data", "data_parallel": "data", "dp": "data",
    "stage": "stage", "stages": "stage", "pipeline_parallel": "stage", "pipeline": "stage", "pp": "stage",
    "tensor": "tensor", "tensor_parallel": "tensor", "tp": "tensor",
    "expert": "expert", "expert_parallel": "expert", "ep": "expert",
}
_STRATEGIES = ("auto", "hybrid", "data", "tensor", "pipeline", "expert")
_SCHEDULES = ("auto", "stacked", "stages")


@dataclass(frozen=True)
class MeshConfig:
    """How to lay a model over devices.

    Attributes:
      data, stage, expert, tensor: mesh axis sizes; ``data=None`` takes every
        device the others leave over.
      micro_batches: GPipe micro-batches when ``stage > 1``.
      schedule: pipeline schedule: "stacked" (repeated layers stacked, shard_map +
        ppermute over ``stage``), "stages" (per-stage executables on sub-meshes) or
        "auto" (stacked where it applies).
      chunk_size: run row-local stretches (projections, MLPs, norms, embeddings)
        over chunks of at most this many rows to bound peak memory (see chunking.py).
      strategy: a label ("hybrid", ...) kept for round-tripping user configs.
      rules: tensor-parallel rules ``[(regex, PartitionSpec), ...]`` overriding
        the automatic ones (None: found from the graph).
      strict: fail (rather than replicate) when tensor parallelism cannot split
        a dim the graph analysis wants split.
      replicate_outputs: gather outputs onto every device (needed when outputs
        are read in a multi-process run).
    """

    data: int | None = None
    stage: int = 1
    expert: int = 1
    tensor: int = 1
    micro_batches: int = 1
    chunk_size: int | None = None
    schedule: str = "auto"
    strategy: str = "auto"
    rules: tuple | None = None
    strict: bool = True
    replicate_outputs: bool = False
    devices: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        """Check every field's type and range (a config that passes here only fails on these devices/model)."""
        data = _optional_int(self.data, "data", zero_is_none=True)
        object.__setattr__(self, "data", data)
        for name in ("stage", "expert", "tensor", "micro_batches"):
            object.__setattr__(self, name, _positive_int(getattr(self, name), name))
        object.__setattr__(self, "chunk_size", _optional_int(self.chunk_size, "chunk_size", zero_is_none=False))
        if self.schedule not in _SCHEDULES:
            raise ShardingConfigError(f"schedule must be one of {_SCHEDULES}, got {self.schedule!r}")
        if self.strategy not in _STRATEGIES:
            raise ShardingConfigError(f"unknown strategy {self.strategy!r}; one of {_STRATEGIES}")
        for name in ("strict", "replicate_outputs"):
            if not isinstance(getattr(self, name), (bool, np.bool_)):
                raise ShardingConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "devices", _optional_int(self.devices, "devices", zero_is_none=False))
        if self.rules is not None:
            from .rules import coerce_rules

            object.__setattr__(self, "rules", coerce_rules(self.rules))

    def resolved(self, n_devices: int) -> MeshConfig:
        """This config with ``data`` filled in for ``n_devices`` (checked)."""
        if isinstance(n_devices, bool) or not isinstance(n_devices, (int, np.integer)) or n_devices < 1:
            raise ShardingConfigError(f"a mesh needs at least one device, got {n_devices!r} devices")
        fixed = self.stage * self.expert * self.tensor
        if self.data is None:
            if n_devices % fixed:
                raise ShardingConfigError(
                    f"stage×expert×tensor = {self.stage}×{self.expert}×{self.tensor} = {fixed} does not divide "
                    f"the {n_devices} devices; sizes that fit: products dividing {n_devices} "
                    f"({', '.join(str(d) for d in divisors(n_devices))})")
            return replace(self, data=n_devices // fixed)
        total = self.data * fixed
        if total > n_devices or n_devices % total:
            raise ShardingConfigError(
                f"data×stage×expert×tensor = {self.data}×{self.stage}×{self.expert}×{self.tensor} = {total} "
                f"does not divide the {n_devices} devices; with these stage/expert/tensor sizes data may be "
                f"{[d for d in divisors(n_devices // fixed)] if n_devices % fixed == 0 else 'none'}")
        if total < n_devices:  # leftover devices become data parallel
            return replace(self, data=n_devices // fixed)
        return self

    @property
    def shape(self) -> dict[str, int]:
        return {a: (getattr(self, a) or 1) for a in AXES}

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("rules", "devices")}
        if self.rules is not None:
            d["rules"] = [(p, tuple(s) if s is not None else None) for p, s in self.rules]
        return d

    def __str__(self) -> str:
        parts = [f"{a}={getattr(self, a)}" for a in AXES if (getattr(self, a) or 1) > 1 or a == "data"]
        if self.stage > 1:
            parts.append(f"micro_batches={self.micro_batches}")
        if self.chunk_size:
            parts.append(f"chunk_size={self.chunk_size}")
        return "MeshConfig(" + ", ".join(parts) + ")"


def _positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1 (numpy integers accepted; bools, floats and strings refused)."""
    if not is_int(value) or value < 1:
        raise ShardingConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _optional_int(value: Any, name: str, *, zero_is_none: bool) -> int | None:
    """``value`` as None (unset) or an int >= 1; 0 means unset where ``zero_is_none``."""
    if value is None or (zero_is_none and is_int(value) and value == 0):
        return None
    if not is_int(value) or value < 1:
        unset = "None or 0" if zero_is_none else "None"
        raise ShardingConfigError(f"{name} must be a positive integer ({unset} to leave it unset), got {value!r}")
    return int(value)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _size(value: Any, key: str) -> tuple[int | None, dict[str, Any]]:
    """An axis entry: int, "auto", or a mapping with world_size/stages/size and extras."""
    if value is None or (isinstance(value, str) and value.lower() == "auto"):
        return None, {}
    if isinstance(value, bool):
        raise ShardingConfigError(f"'{key}' must be a size, got {value!r}")
    if isinstance(value, (int, np.integer)):
        return int(value), {}
    if isinstance(value, Mapping):
        extras = dict(value)
        size = None
        for k in ("world_size", "stages", "size", "degree", "num_experts_per_device_group"):
            if k in extras:
                size = extras.pop(k)
                break
        if size is not None and not isinstance(size, (int, np.integer)):
            if isinstance(size, str) and size.lower() == "auto":
                size = None
            else:
                raise ShardingConfigError(f"'{key}': size must be an integer, got {size!r}")
        return (int(size) if size is not None else None), extras
    raise ShardingConfigError(f"'{key}': expected an integer or a mapping with world_size, got {type(value).__name__}")


def _is_file(text: str) -> bool:
    """Whether ``text`` names an existing file (False for strings no path can be: too long, NUL bytes)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _config_text(config: str | os.PathLike) -> str:
    """The YAML a config path names, or ``config`` itself when it is YAML text rather than a path."""
    if isinstance(config, os.PathLike) or _is_file(str(config)):
        path = Path(config)
        try:
            return path.read_text()
        except FileNotFoundError:
            raise ShardingConfigError(f"config file not found: {config}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ShardingConfigError(f"cannot read the config file {config}: {e}") from e
    if not str(config).strip():
        raise ShardingConfigError("config is an empty string; pass a YAML path, YAML text, a dict or a MeshConfig")
    return str(config)


def parse_config(config: Any) -> MeshConfig:
    """A ``MeshConfig`` from a MeshConfig, another dataclass, a dict, a YAML path or YAML text."""
    if isinstance(config, MeshConfig):
        return config
    if is_dataclass(config) and not isinstance(config, type):
        config = {f.name: getattr(config, f.name) for f in fields(config)}
    elif isinstance(config, (str, os.PathLike)):
        import yaml

        text = _config_text(config)
        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ShardingConfigError(f"config is not valid YAML: {e}") from e
        if not isinstance(config, Mapping):
            raise ShardingConfigError(f"config {str(text)[:60]!r} is neither a YAML mapping nor an existing file")
    if not isinstance(config, Mapping):
        raise ShardingConfigError(f"cannot read a mesh config from {type(config).__name__}")
    config = dict(config)
    if "distributed" in config:
        inner = config.pop("distributed")
        if not isinstance(inner, Mapping):
            raise ShardingConfigError("'distributed' must be a mapping")
        config = {**config, **inner}
    out: dict[str, Any] = {}
    known = {f.name for f in fields(MeshConfig)}
    for key, value in config.items():
        axis = _ALIASES.get(key)
        if axis is not None:
            size, extras = _size(value, key)
            if axis in out and out[axis] != size:
                raise ShardingConfigError(f"axis '{axis}' given twice ({out[axis]} and {size})")
            if size is None and axis != "data":
                size = 1 if not extras else None
                if size is None:
                    raise ShardingConfigError(f"'{key}' needs a world_size")
            out[axis] = size
            for k, v in extras.items():
                if k in ("micro_batches", "chunk_size"):
                    if v is not None:  # None: the default; anything else is checked by MeshConfig
                        out[k] = v
                elif k == "schedule":
                    if v not in _SCHEDULES:
                        raise ShardingConfigError(f"'{key}': schedule must be auto, stacked or stages, got {v!r}")
                    out[k] = v
                elif k in ("num_experts",):
                    pass
                else:
                    raise ShardingConfigError(f"'{key}': unknown option '{k}' (known: world_size, chunk_size, "
                                              "micro_batches, stages, schedule)")
        elif key == "strategy":
            if str(value) not in _STRATEGIES:
                raise ShardingConfigError(f"unknown strategy {value!r}; one of {_STRATEGIES}")
            out["strategy"] = str(value)
        elif key == "rules" and value is not None:
            from .rules import coerce_rules

            out["rules"] = coerce_rules(value)
        elif key in known:
            out[key] = value
        else:
            raise ShardingConfigError(
                f"unknown config key '{key}'; expected data_parallel/tensor_parallel/pipeline_parallel/"
                f"expert_parallel (or data/tensor/stage/expert), strategy, micro_batches, chunk_size, rules")
    return MeshConfig(**out)


def pick_devices(devices: int | Sequence[Any] | None) -> list[Any]:
    """The devices a mesh is laid over: all (None), the first ``n`` of ``jax.devices()`` (an int), or a list.

    Raises:
      ShardingConfigError: no devices, more than exist, an entry that is not a JAX device, or one twice.
    """
    every = jax.devices()
    if devices is None:
        return list(every)
    if is_int(devices):
        if not 1 <= devices <= len(every):
            raise ShardingConfigError(f"asked for {devices} devices; between 1 and the {len(every)} that exist")
        return list(every[:int(devices)])
    if isinstance(devices, (str, bytes)) or not isinstance(devices, (Sequence, np.ndarray)):
        raise ShardingConfigError(f"devices must be a device count or a list of JAX devices, got "
                                  f"{type(devices).__name__}")
    devs = list(np.asarray(devices, dtype=object).ravel()) if isinstance(devices, np.ndarray) else list(devices)
    if not devs:
        raise ShardingConfigError("devices is empty; pass None for every device, a count, or a list of devices")
    bad = [d for d in devs if not isinstance(d, jax.Device)]
    if bad:
        raise ShardingConfigError(f"devices must be JAX devices (from jax.devices()), got {bad[0]!r}")
    if len(set(devs)) != len(devs):
        raise ShardingConfigError(f"devices lists a device more than once: {[str(d) for d in devs]}")
    return devs


def build_mesh(config: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
    """A Mesh with axes ``AXES`` (Auto axis types) over ``devices`` (default all)."""
    devs = list(jax.devices() if devices is None else devices)
    cfg = config if config.data is not None and math.prod(config.shape.values()) == len(devs) else config.resolved(len(devs))
    shape = tuple(cfg.shape[a] for a in AXES)
    types = (AxisType.Auto,) * len(AXES)
    if devices is None:
        return jax.make_mesh(shape, AXES, axis_types=types)
    try:
        return jax.make_mesh(shape, AXES, axis_types=types, devices=devs)
    except Exception:  # noqa: BLE001 - fall back to the given order
        return Mesh(np.asarray(devs, dtype=object).reshape(shape), AXES, axis_types=types)


def enumerate_configs(n_devices: int, *, allow_stage: bool = False, allow_expert: bool = False) -> list[MeshConfig]:
    """Every data×stage×expert×tensor factorization of ``n_devices``."""
    out = []
    for t in divisors(n_devices):
        for s in (divisors(n_devices // t) if allow_stage else [1]):
            for e in (divisors(n_devices // (t * s)) if allow_expert else [1]):
                out.append(MeshConfig(data=n_devices // (t * s * e), stage=s, expert=e, tensor=t))
    return out
