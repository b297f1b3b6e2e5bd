"""``jaxinfer.load``: any supported model file or object -> :class:`Model`."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from .errors import ModelLoadError
from .model import Model


def _sniff(data: bytes) -> str:
    if len(data) >= 8 and data[4:8] == b"TFL3":
        return "tflite"
    return "onnx"


def load(source: Any, **options: Any) -> Model:
    """Load an ONNX or TFLite model, or a directory written by ``jaxinfer.save``.

    Args:
      source: a path (``.onnx``, ``.tflite``, or a saved directory), raw bytes,
        or an ``onnx.ModelProto``.
      **options: the format's loader options: ONNX ``optimize`` (default True: the graph
        passes); TFLite ``hybrid`` ("xnnpack" | "builtin": which LiteRT CPU path
        dynamic-range layers follow) and ``requant`` ("reference" | "builtin" | "xnnpack":
        which LiteRT kernels' requantization rounding to match bit for bit); for any format
        ``tune=True`` sets :attr:`Model.tune` (time XLA CPU option sets per input shape).

    Returns:
      A :class:`Model`: ``run``/``__call__``, the pure ``fn`` and its ``params``.

    Example:
      >>> m = jaxinfer.load("model.onnx")                  # doctest: +SKIP
      >>> m.run({"x": np.ones((1, 3), np.float32)})        # doctest: +SKIP
    """
    tune = bool(options.pop("tune", False))
    model = _load(source, options)
    model.tune = tune
    return model


def _load(source: Any, options: dict[str, Any]) -> Model:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            if options:
                raise TypeError(f"load(): options {sorted(options)} apply to model files, not to a saved directory")
            return _load_dir(path)
        if not path.exists():
            raise ModelLoadError(f"model file not found: {path}")
        suffix = path.suffix.lower()
        if suffix == ".tflite":
            return _load_tflite(path, options)
        if suffix != ".onnx":
            with open(path, "rb") as f:
                if _sniff(f.read(8)) == "tflite":
                    return _load_tflite(path, options)
        return _load_onnx(path, options)
    if isinstance(source, (bytes, bytearray, memoryview)):
        if _sniff(bytes(source[:8])) == "tflite":
            return _load_tflite(bytes(source), options)
        return _load_onnx(bytes(source), options)
    try:
        from onnx import ModelProto
    except ImportError:  # pragma: no cover
        ModelProto = ()  # type: ignore[assignment]
    if isinstance(source, ModelProto):
        return _load_onnx(source, options)
    raise ModelLoadError(f"cannot load a model from {type(source).__name__}; give a path, bytes or an onnx.ModelProto")


def _load_dir(path: Path) -> Model:
    """A directory: one written by ``jaxinfer.save``, or one holding a single model file."""
    try:
        from . import saving
    except ImportError:
        saving = None  # type: ignore[assignment]
    if saving is not None and saving.is_saved_dir(path):
        return saving.load_saved(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in (".onnx", ".tflite"))
    if len(files) == 1:
        return load(files[0])
    raise ModelLoadError(f"{path} is a directory without a saved jaxinfer model or a single .onnx/.tflite file "
                         f"(found {[f.name for f in files]})")


def _call_loader(fmt: str, loader: Any, source: Any, options: dict[str, Any] | None) -> Model:
    """``loader(source, **options)`` once every option is one of the loader's keyword-only parameters."""
    options = options or {}
    known = sorted(n for n, p in inspect.signature(loader).parameters.items() if p.kind is p.KEYWORD_ONLY)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"load(): unknown option(s) {unknown} for a {fmt} model; it takes {known}")
    return loader(source, **options)


def _load_onnx(source: Any, options: dict[str, Any] | None = None) -> Model:
    from .converters.onnx import load_onnx

    return _call_loader("onnx", load_onnx, source, options)


def _load_tflite(source: Any, options: dict[str, Any] | None = None) -> Model:
    try:
        from .converters.tflite import load_tflite
    except ImportError as e:
        raise ModelLoadError(f"TFLite support is not available: {e}") from e
    return _call_loader("tflite", load_tflite, source, options)
