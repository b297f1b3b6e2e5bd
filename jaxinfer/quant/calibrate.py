"""Calibration: run the float model on sample inputs, watch named values, pick int8 scales.

Observers (symmetric int8, one scale per tensor, ``scale = threshold / 127``):

* ``minmax``: the largest ``|x|`` seen.
* ``percentile``: the ``p``-th percentile of ``|x|`` (default 99.99): ignores rare outliers.
* ``mse``: the clipping threshold (searched on a grid below max ``|x|``) that minimizes the
  mean squared error of fake-quantized ``x``: the entropy/MSE family's cheap member.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from ..graph import ValueInfo

OBSERVERS = ("minmax", "percentile", "mse")

#: Values kept per watched tensor for percentile/MSE (a uniform subsample beyond this).
SAMPLE_LIMIT = 1 << 20


def probe(model: Any, names: Sequence[str]) -> Any:
    """A Model over ``model``'s graph and params whose outputs are ``names`` (any values)."""
    from ..model import Model

    graph = model.graph.replace(outputs=tuple(ValueInfo(n) for n in names))
    return Model(graph, model.registry, params=model.params, source=model.source, check=False)


def batches(calibration: Iterable[Mapping[str, Any]] | None) -> list[dict[str, np.ndarray]]:
    if calibration is None:
        return []
    if isinstance(calibration, Mapping):
        calibration = [calibration]
    return [{k: np.asarray(v) for k, v in b.items()} for b in calibration]


class Observer:
    """Running statistics of one tensor's magnitudes."""

    def __init__(self, rng: np.random.Generator):
        self.absmax = 0.0
        self._samples: list[np.ndarray] = []
        self._rng = rng
        self._kept = 0

    def update(self, x: np.ndarray) -> None:
        a = np.abs(np.asarray(x, np.float32)).ravel()
        if a.size == 0:
            return
        self.absmax = max(self.absmax, float(a.max()))
        if a.size > SAMPLE_LIMIT // 4:
            a = self._rng.choice(a, SAMPLE_LIMIT // 4, replace=False)
        self._samples.append(a)
        self._kept += a.size
        if self._kept > SAMPLE_LIMIT:
            allv = np.concatenate(self._samples)
            allv = self._rng.choice(allv, SAMPLE_LIMIT, replace=False)
            self._samples, self._kept = [allv], allv.size

    def threshold(self, method: str = "minmax", percentile: float = 99.99) -> float:
        if self.absmax == 0.0:
            return 1.0
        if method == "minmax":
            return self.absmax
        values = np.concatenate(self._samples)
        if method == "percentile":
            return max(float(np.percentile(values, percentile)), 1e-12)
        if method == "mse":
            return _mse_threshold(values, self.absmax)
        raise ValueError(f"unknown observer '{method}'; choose one of {OBSERVERS}")


def _mse_threshold(values: np.ndarray, absmax: float) -> float:
    best, best_err = absmax, np.inf
    for frac in np.linspace(0.2, 1.0, 41):
        t = absmax * frac
        s = t / 127.0
        q = np.clip(np.round(values / s), -127, 127) * s
        err = float(np.mean((values - q) ** 2))
        if err < best_err:
            best, best_err = t, err
    return best


def observe(model: Any, names: Sequence[str], data: Sequence[Mapping[str, Any]], seed: int = 0) -> dict[str, Observer]:
    """Run ``model`` on every calibration batch and observe the values ``names``."""
    names = list(dict.fromkeys(names))
    rng = np.random.default_rng(seed)
    obs = {n: Observer(rng) for n in names}
    if not names:
        return obs
    p = probe(model, names)
    for feeds in data:
        outs = p.run(feeds)
        for n in names:
            obs[n].update(outs[n])
    return obs


def act_scales(obs: Mapping[str, Observer], method: str = "minmax", percentile: float = 99.99) -> dict[str, float]:
    """name -> per-tensor int8 scale."""
    return {n: o.threshold(method, percentile) / 127.0 for n, o in obs.items()}
