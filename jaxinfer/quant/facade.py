"""``ModelManager``: the load / quantize / infer facade a user of the seed's API types.

It maps onto the library, adding nothing of its own but device placement and batching::

    manager = ModelManager(device="cpu", precision="fp32")
    model = manager.load_model("model.onnx")                    # jaxinfer.load
    model.quantize(method="static_int8", exclude_layers=["lm_head*"],
                   calibration_dataset=batches)                 # jaxinfer.quantize
    logits = manager.infer(InferenceRequest(inputs={"x": x}, batch_size=8)).output_logits

``precision`` picks what ``load_model`` applies: ``fp32`` (nothing), ``bf16``/``fp16``
(jaxinfer's ``bf16``/``fp16`` methods) or ``int8`` (``int8-dynamic``: w8a8 with run-time
activation scales, the int8 that needs no calibration; for ``int8-static`` call
``model.quantize(method="static_int8", calibration_dataset=...)``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np

from ..errors import InputError, JaxinferError

#: ``precision`` -> the quantize method ``load_model`` applies (None: keep float32).
PRECISIONS: dict[str, str | None] = {
    "fp32": None, "float32": None, "f32": None,
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "int8": "int8-dynamic",
}
DEVICES = ("auto", "cpu", "gpu", "tpu")


class DeviceUnavailableError(JaxinferError, ValueError):
    """The device a ModelManager was asked for is not present in this JAX installation."""


def resolve_device(device: str | jax.Device) -> jax.Device:
    """``"cpu"``/``"gpu"``/``"tpu"``/``"auto"`` (or a ``jax.Device``) -> the first such device.

    Raises:
      DeviceUnavailableError: the platform is not available, naming the ones that are.
    """
    if isinstance(device, jax.Device):
        return device
    if device not in DEVICES and not (isinstance(device, str) and device.split(":")[0] in DEVICES):
        raise ValueError(f"device must be one of {list(DEVICES)} (optionally 'gpu:1'), got {device!r}")
    if device == "auto":
        return jax.devices()[0]
    kind, _, index = device.partition(":")
    try:
        devices = jax.devices(kind)
    except RuntimeError as e:
        have = sorted({d.platform for d in jax.devices()})
        raise DeviceUnavailableError(
            f"device '{device}' is not available: this JAX has {have} devices "
            f"({len(jax.devices())} in all); use device='auto' or one of {have}") from e
    i = int(index or 0)
    if i >= len(devices):
        raise DeviceUnavailableError(f"device '{device}': only {len(devices)} {kind} device(s) here")
    return devices[i]


def method_for(precision: str) -> str | None:
    """The quantize method behind a ``precision`` name (None: float32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(set(PRECISIONS))}, got {precision!r}")
    return PRECISIONS[precision]


@dataclass(frozen=True)
class InferenceRequest:
    """Inputs for one ``infer`` call.

    Attributes:
      inputs: ``{input name: array}``, or one array for a model with a single input.
      batch_size: run at most this many rows per call (the leading axis is split, the last
        chunk zero-padded so every call reuses one compiled shape, outputs re-joined).
        None: the whole batch in one call.
    """

    inputs: Mapping[str, Any] | Any
    batch_size: int | None = None


@dataclass(frozen=True)
class InferenceResult:
    """Outputs of one ``infer`` call, in the model's output order."""

    outputs: dict[str, np.ndarray]
    latency_ms: float
    batches: int = 1

    @property
    def output_logits(self) -> np.ndarray:
        """The model's first output (a classifier's or language model's logits)."""
        return next(iter(self.outputs.values()))


def _as_feeds(model: Any, inputs: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(inputs, Mapping):
        return dict(inputs)
    names = [s.name for s in model.inputs]
    if len(names) != 1:
        raise InputError(f"this model takes {len(names)} inputs {names}: give inputs as a dict name -> array")
    return {names[0]: inputs}


def _calibration_feeds(model: Any, dataset: Any) -> Any:
    """``calibration_dataset`` as input dicts (bare arrays wrapped for a one-input model).

    A path, a single dict or a non-iterable goes through unchanged, so that ``quantize``/``prune``
    refuse it by name (CalibrationError) rather than this wrapper iterating a string's characters.
    """
    if dataset is None or isinstance(dataset, (str, bytes, Path, Mapping)) or not isinstance(dataset, Iterable):
        return dataset
    return [b if isinstance(b, Mapping) else _as_feeds(model, b) for b in dataset]


def run_batched(model: Any, feeds: Mapping[str, Any], batch_size: int | None) -> tuple[dict[str, np.ndarray], int]:
    """``model.run`` over ``batch_size``-row chunks of the leading axis (last chunk padded)."""
    arrays = {k: np.asarray(v) for k, v in feeds.items()}
    n = {v.shape[0] for v in arrays.values() if v.ndim}
    if batch_size is None or not n or max(n) <= batch_size:
        return model.run(arrays), 1
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    if len(n) != 1:
        raise InputError(f"inputs disagree on the batch (leading) size: {sorted(n)}")
    rows = n.pop()
    parts: list[dict[str, np.ndarray]] = []
    for start in range(0, rows, batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in arrays.items()}
        got = next(iter(chunk.values())).shape[0]
        if got < batch_size:  # pad: the same compiled shape as every other chunk
            chunk = {k: np.concatenate([v, np.zeros((batch_size - got,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
        out = model.run(chunk)
        for name, value in out.items():
            if np.ndim(value) == 0 or np.shape(value)[0] != batch_size:
                raise InputError(f"output '{name}' has shape {np.shape(value)}, not a leading batch of {batch_size}: "
                                 "run this model without batch_size")
        parts.append({k: v[:got] for k, v in out.items()})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, len(parts)


@dataclass
class ManagedModel:
    """A loaded model on a device. ``quantize``/``prune`` swap in a new jaxinfer Model (the old
    one is not mutated and stays in ``float_model``) and return this handle."""

    model: Any
    device: jax.Device
    float_model: Any = None
    history: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.float_model is None:
            self.float_model = self.model
        self.model = _placed(self.model, self.device)

    @property
    def inputs(self) -> list[Any]:
        return self.model.inputs

    @property
    def outputs(self) -> list[Any]:
        return self.model.outputs

    def quantize(self, method: str = "int8-dynamic", exclude_layers: Sequence[str] | str = (),
                 calibration_dataset: Iterable[Any] | None = None, **options: Any) -> ManagedModel:
        """``jaxinfer.quantize`` of the float model (aliases: ``dynamic_int8``, ``static_int8``,
        ``dynamic_fp16``); ``calibration_dataset`` holds input dicts or, for one-input models, arrays."""
        from .api import quantize

        data = _calibration_feeds(self.float_model, calibration_dataset)
        q = quantize(self.float_model, method, exclude=exclude_layers, calibration=data, **options)
        self.model = _placed(q, self.device)
        self.history.append(method)
        return self

    def prune(self, sparsity: float = 0.3, exclude_layers: Sequence[str] | str = (),
              calibration_dataset: Iterable[Any] | None = None, **options: Any) -> ManagedModel:
        """``jaxinfer.prune`` of the current float model (prune before quantizing)."""
        from .prune import prune

        data = _calibration_feeds(self.float_model, calibration_dataset)
        pruned = prune(self.float_model, sparsity, exclude=exclude_layers, calibration=data, **options)
        self.float_model = pruned
        self.model = _placed(pruned, self.device)
        self.history.append(f"prune {sparsity}")
        return self

    def report(self) -> Any:
        """The quantization/pruning report of the current model (None for a plain float model)."""
        return getattr(self.model, "quant_report", None)

    def infer(self, request: InferenceRequest) -> InferenceResult:
        feeds = _as_feeds(self.model, request.inputs)
        start = time.perf_counter()
        outs, n = run_batched(self.model, feeds, request.batch_size)
        return InferenceResult(outs, (time.perf_counter() - start) * 1e3, n)

    def save(self, directory: str | Path) -> Path:
        from ..saving import save

        return save(self.model, directory)


def _placed(model: Any, device: jax.Device) -> Any:
    """``model`` with its params committed to ``device`` (so its executables run there)."""
    model.params = jax.device_put(model.params, device)
    return model


class ModelManager:
    """Load models onto one device at one default precision, and run requests.

    Args:
      device: ``"cpu"``, ``"gpu"``, ``"tpu"``, ``"auto"`` (the default backend's first device),
        ``"gpu:1"``, or a ``jax.Device``.
      precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"`` (int8-dynamic).

    Example:
      >>> mm = ModelManager(device="cpu", precision="int8")              # doctest: +SKIP
      >>> m = mm.load_model("squeezenet.onnx")                           # doctest: +SKIP
      >>> mm.infer(InferenceRequest(inputs=x, batch_size=1)).output_logits.shape   # doctest: +SKIP
    """

    def __init__(self, device: str | jax.Device = "auto", precision: str = "fp32"):
        self.device = resolve_device(device)
        self.precision = precision
        self.method = method_for(precision)
        self.current: ManagedModel | None = None

    def load_model(self, path: str | Path | Any) -> ManagedModel:
        """``jaxinfer.load(path)`` (a model file or a saved directory), at the manager's precision."""
        from ..loading import load

        handle = ManagedModel(load(path), self.device)
        if self.method is not None and getattr(handle.model, "quant_report", None) is None:
            handle.quantize(self.method)
        self.current = handle
        return handle

    def infer(self, request: InferenceRequest, model: ManagedModel | None = None) -> InferenceResult:
        """Run ``request`` on ``model`` (default: the last one loaded)."""
        target = model or self.current
        if target is None:
            raise JaxinferError("no model loaded: call load_model(path) first")
        return target.infer(request)

    def __repr__(self) -> str:
        return f"ModelManager(device={self.device}, precision={self.precision!r})"


__all__ = ["DeviceUnavailableError", "InferenceRequest", "InferenceResult", "ManagedModel", "ModelManager",
           "method_for", "resolve_device", "run_batched"]
