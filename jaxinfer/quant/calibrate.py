"""Calibration: run the float model on sample inputs, watch named values, pick int8 scales.

Observers (symmetric int8, one scale per tensor, ``scale = threshold / 127``):

* ``minmax``: the largest ``|x|`` seen.
* ``percentile``: the ``p``-th percentile of ``|x|`` (default 99.99): ignores rare outliers.
* ``mse``: the clipping threshold (searched on a grid below max ``|x|``) that minimizes the
  mean squared error of fake-quantized ``x``: the entropy/MSE family's cheap member.

Weights (:func:`weight_int8`) get the same MSE search per output channel, with no calibration data.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..errors import JaxinferError
from ..graph import ValueInfo

OBSERVERS = ("minmax", "percentile", "mse")


class CalibrationError(JaxinferError, ValueError):
    """Calibration data is missing or does not match the model's inputs."""

#: Values kept per watched tensor for percentile/MSE (a uniform subsample beyond this).
SAMPLE_LIMIT = 1 << 20


def probe(model: Any, names: Sequence[str]) -> Any:
    """A Model over ``model``'s graph and params whose outputs are ``names`` (any values)."""
    from ..model import Model

    graph = model.graph.replace(outputs=tuple(ValueInfo(n) for n in names))
    return Model(graph, model.registry, params=model.params, source=model.source, check=False)


CALIBRATION_LAYOUT = """\
A calibration directory holds .npy files, one per model input, named after the input with
every character other than letters, digits, '.', '-' and '_' replaced by '_' (input
'gpu_0/data_0' -> gpu_0_data_0.npy); a model with a single input takes any one .npy file.
Either the directory itself holds one batch (DIR/x.npy), or each subdirectory holds one
batch (DIR/000/x.npy, DIR/001/x.npy, ..., read in sorted order)."""


def npy_name(input_name: str) -> str:
    """The file name an input's calibration array has: see ``CALIBRATION_LAYOUT``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", input_name) + ".npy"


def read_npy_dir(directory: str | os.PathLike[str], input_names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """Calibration batches from a directory of .npy files laid out as ``CALIBRATION_LAYOUT`` says.

    Raises:
      CalibrationError: the directory is missing, empty, or a batch lacks an input's file.
    """
    root = Path(directory)
    if not root.is_dir():
        raise CalibrationError(f"calibration directory not found: {root}")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    folders = subdirs if subdirs and not list(root.glob("*.npy")) else [root]
    out = []
    for folder in folders:
        files = sorted(folder.glob("*.npy"))
        if len(input_names) == 1 and len(files) == 1:
            out.append({input_names[0]: np.load(files[0], allow_pickle=False)})
            continue
        missing = [f"{n} ({npy_name(n)})" for n in input_names if not (folder / npy_name(n)).is_file()]
        if missing:
            raise CalibrationError(f"calibration batch {folder} lacks {', '.join(missing)}; found "
                                   f"{[f.name for f in files]}. Layout:\n{CALIBRATION_LAYOUT}")
        out.append({n: np.load(folder / npy_name(n), allow_pickle=False) for n in input_names})
    return out


def batches(calibration: Iterable[Mapping[str, Any]] | None) -> list[dict[str, np.ndarray]]:
    """Calibration batches as ``[{input name: array}]``; CalibrationError for another layout or
    non-finite values (one Inf or NaN would set an activation scale to inf or to a fallback)."""
    if calibration is None:
        return []
    if isinstance(calibration, (str, os.PathLike)):
        raise CalibrationError(f"calibration={str(calibration)!r} is a path; pass batches (an iterable of "
                               "{input name: array} dicts), e.g. read_npy_dir(path, input_names)")
    if isinstance(calibration, Mapping):
        calibration = [calibration]
    if not isinstance(calibration, Iterable) or isinstance(calibration, bytes):
        raise CalibrationError(f"calibration must be an iterable of {{input name: array}} dicts, got "
                               f"{type(calibration).__name__}")
    out = []
    for i, b in enumerate(calibration):
        if not isinstance(b, Mapping):
            raise CalibrationError(f"calibration batch {i} is a {type(b).__name__}; expected a dict "
                                   "{input name: array}")
        arrays = {k: np.asarray(v) for k, v in b.items()}
        for name, a in arrays.items():
            bad = int(np.size(a) - np.count_nonzero(np.isfinite(a))) if a.dtype.kind in "fc" else 0
            if bad:
                raise CalibrationError(f"calibration batch {i}, input '{name}': {bad} non-finite value(s) "
                                       "(inf/nan); calibration data must be finite")
        out.append(arrays)
    return out


class Observer:
    """Running statistics of one tensor's magnitudes."""

    def __init__(self, rng: np.random.Generator):
        self.absmax = 0.0
        self.minimum = np.inf  # the smallest value seen: >= 0 makes the tensor unsigned (see act_scales)
        self._samples: list[np.ndarray] = []
        self._rng = rng
        self._kept = 0

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, np.float32)).ravel()
        if a.size == 0:
            return
        self.minimum = min(self.minimum, float(np.min(x)))
        self.absmax = max(self.absmax, float(a.max()))
        if a.size > SAMPLE_LIMIT // 4:
            a = self._rng.choice(a, SAMPLE_LIMIT // 4, replace=False)
        self._samples.append(a)
        self._kept += a.size
        if self._kept > SAMPLE_LIMIT:
            allv = np.concatenate(self._samples)
            allv = self._rng.choice(allv, SAMPLE_LIMIT, replace=False)
            self._samples, self._kept = [allv], allv.size

    def threshold(self, method: str = "minmax", percentile: float = 99.99, steps: int = 127) -> float:
        """The clipping threshold of ``method``; ``steps``: how many quantization steps span it (127
        symmetric, 255 for an unsigned tensor), which only the mse search depends on."""
        if self.absmax == 0.0:
            return 1.0
        if method == "minmax":
            return self.absmax
        values = np.concatenate(self._samples)
        if method == "percentile":
            return max(float(np.percentile(values, percentile)), 1e-12)
        if method == "mse":
            return _mse_threshold(values, self.absmax, steps)
        raise ValueError(f"unknown observer '{method}'; choose one of {OBSERVERS}")


def _mse_threshold(values: np.ndarray, absmax: float, steps: int = 127) -> float:
    return float(mse_thresholds(values[None, :], np.array([absmax], np.float32), ACT_FRACTIONS, steps)[0])


#: Clipping thresholds (fractions of max ``|x|``) the MSE searches try: activations per tensor, weights
#: per output channel (a weight channel is never clipped below half its largest value).
ACT_FRACTIONS = np.linspace(0.2, 1.0, 41)
WEIGHT_FRACTIONS = np.linspace(0.5, 1.0, 26)


def mse_thresholds(rows: np.ndarray, absmax: np.ndarray, fractions: np.ndarray, steps: int = 127) -> np.ndarray:
    """Per row of ``rows`` [C, R] the clipping threshold ``absmax * f`` (``f`` in ``fractions``) whose
    fake quantization (``scale = t / steps``, values in [-steps, steps]: symmetric int8 at 127, an unsigned
    tensor's 256 levels at 255) has the least squared error; the first (smallest) such threshold on ties.
    ``absmax`` [C] must be positive."""
    rows = np.asarray(rows, np.float32)
    best = np.asarray(absmax, np.float32).copy()
    best_err = np.full(best.shape, np.inf)
    for frac in fractions:
        t = (np.asarray(absmax, np.float32) * np.float32(frac))[:, None]
        s = t / np.float32(steps)
        q = np.clip(np.rint(rows / s), -steps, steps)
        q *= s
        q -= rows
        err = np.einsum("cr,cr->c", q, q)
        better = err < best_err
        best = np.where(better, t[:, 0], best)
        best_err = np.where(better, err, best_err)
    return best


def weight_int8(w: Any, channel_axes: Sequence[int]) -> Any:
    """A float weight as symmetric int8 with one scale per index of ``channel_axes`` (none: per tensor).

    Each channel's clipping threshold is searched (:data:`WEIGHT_FRACTIONS`) for the least squared error
    rather than taken at its largest value (qwix's ``quantize``: ``max |w| / 127.5``). At 8 bits clipping
    rarely pays much (Gaussian filters keep 0.96-1.0 of their largest value; channels of few weights gain
    most), yet on the light CNNs' He-initialized weights (512 synthetic images, one process, session 21)
    int8-weight top-1 agreement with f32 went 98.6 -> 99.6 % on SqueezeNet and 98.8 -> 99.4 % on
    ResNet-50, int8-static (min-max) 98.4 -> 99.2 % and 98.6 -> 98.8 %.
    """
    from .. import arith  # arith imports jax; calibrate stays importable without tracing anything

    w = np.asarray(w, np.float32)
    keep = tuple(sorted({a % w.ndim for a in channel_axes})) if w.ndim else ()  # rows in the scale's order
    shape = tuple(w.shape[a] if a in keep else 1 for a in range(w.ndim))
    rows = np.moveaxis(w, keep, tuple(range(len(keep)))).reshape(int(np.prod(shape, dtype=np.int64)), -1)
    t = np.full(rows.shape[0], 127.0, np.float32)  # scale 1 where a channel is empty or all zero
    if rows.shape[1]:
        absmax = np.abs(rows).max(axis=1)
        live = np.flatnonzero(absmax > 0)
        step = max(1, (1 << 22) // rows.shape[1])  # channels per search: a few temporaries of 16 MB at most
        for i in range(0, live.size, step):
            part = live[i:i + step]
            t[part] = mse_thresholds(rows[part], absmax[part], WEIGHT_FRACTIONS)
    scale = (t / np.float32(127.0)).astype(np.float32).reshape(shape)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return arith.QArray(jnp.asarray(q), jnp.asarray(scale), None, jnp.int8)


def _value(name: str, readers: Mapping[str, Sequence[str]] | None) -> str:
    """``value 'h'`` and, when known, the layers that read it: ``value 'h' (input of layer 'fc1')``."""
    layers = list((readers or {}).get(name, ()))
    if not layers:
        return f"value '{name}'"
    shown = ", ".join(f"'{n}'" for n in layers[:3]) + (", ..." if len(layers) > 3 else "")
    return f"value '{name}' (input of layer {shown})"


def observe(model: Any, names: Sequence[str], data: Sequence[Mapping[str, Any]], seed: int = 0,
            readers: Mapping[str, Sequence[str]] | None = None) -> dict[str, Observer]:
    """Run ``model`` on every calibration batch and observe the values ``names``.

    ``readers`` (value -> the layers reading it) only makes error messages name those layers.

    Raises:
      CalibrationError: a watched value holds inf/nan on some batch, naming the batch and value.
    """
    names = list(dict.fromkeys(names))
    rng = np.random.default_rng(seed)
    obs = {n: Observer(rng) for n in names}
    if not names:
        return obs
    p = probe(model, names)
    for i, feeds in enumerate(data):
        outs = p.run(feeds)
        for n in names:
            if np.asarray(outs[n]).dtype.kind == "f" and not np.all(np.isfinite(outs[n])):
                raise CalibrationError(f"calibration batch {i}: the model's {_value(n, readers)} holds inf/nan "
                                       "(an overflow inside the model?); its int8 scale cannot be measured")
            obs[n].update(outs[n])
    return obs


def act_scales(obs: Mapping[str, Observer], method: str = "minmax", percentile: float = 99.99,
               readers: Mapping[str, Sequence[str]] | None = None,
               unsigned: Iterable[str] = ()) -> dict[str, float]:
    """name -> per-tensor int8 scale: ``threshold / 127``, or ``threshold / 255`` for the names in
    ``unsigned`` (non-negative values quantized over 256 steps with a zero point, see :func:`nonnegative`).

    Raises:
      CalibrationError: a scale came out non-finite or not positive (a range too wide for float32).
    """
    wide = set(unsigned)
    scales = {n: o.threshold(method, percentile, 255 if n in wide else 127) / (255.0 if n in wide else 127.0)
              for n, o in obs.items()}
    for n, s in scales.items():
        if not np.isfinite(s) or s <= 0:
            raise CalibrationError(f"calibration: {_value(n, readers)} gave int8 activation scale {s} (observed |x| up to "
                                   f"{obs[n].absmax}); calibration must give each value a finite, nonzero range")
    return scales


def nonnegative(obs: Mapping[str, Observer]) -> set[str]:
    """The watched values that were never negative on the calibration data (after a ReLU, say): int8-static
    quantizes them unsigned, ``[0, threshold]`` in 256 steps, where symmetric int8 gives them 128. On the
    light CNNs (512 synthetic images, float emulation, session 21) ResNet-50's int8-static top-1 agreement
    with f32 went 98.4 -> 99.2 %."""
    return {n for n, o in obs.items() if o.minimum >= 0.0}
