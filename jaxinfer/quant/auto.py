"""``auto``: per layer the cheapest of int8 (w8a8 dynamic) -> bf16 weights -> f32 within a budget.

Greedy by sensitivity: each layer alone in int8 is scored against float on the calibration
batches; layers are ordered least sensitive first, and the longest prefix that keeps the
model within ``budget`` goes int8 (binary search over the prefix: O(log n) evaluations,
each a compile). The rest try bf16 the same way; what is left stays float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..model import Model
from .report import QuantReport, output_metrics

INT8 = "int8-dynamic"


def _meets(metrics: Mapping[str, float], budget: Mapping[str, float]) -> bool:
    for key, limit in budget.items():
        if key not in metrics or metrics[key] < limit:
            return False
    return True


def auto(model: Model, layers: list[Any], skipped: list[tuple[str, str]], data: Sequence[Mapping[str, Any]],
         budget: Mapping[str, float] | None, granularity: str) -> Any:
    from .api import _report, _strip, build, layer_param

    if not data:
        raise ValueError("auto needs calibration: an iterable of input dicts to measure accuracy on")
    budget = dict(budget or {"cosine": 0.999})
    unknown = set(budget) - {"cosine", "top1_agreement"}
    if unknown:
        raise ValueError(f"budget keys must be 'cosine' and/or 'top1_agreement', got {sorted(unknown)}")
    names = [s.name for s in model.outputs]
    ref = [model.run(f) for f in data]
    cache: dict[str, dict[str, Any]] = {}

    def params_for(plan: Mapping[str, str]) -> dict[str, Any]:
        p = dict(model.params)
        for layer in layers:
            how = plan.get(layer.weight, "f32")
            if how != "f32":
                key = f"{layer.weight}|{how}"
                if key not in cache:
                    cache[key] = layer_param(layer, model.params[layer.weight], how, granularity)
                p[layer.weight] = cache[key]
        return p

    trials: list[dict[str, Any]] = []

    def score(plan: Mapping[str, str], what: str) -> dict[str, float]:
        q = model.with_params(params_for(plan))
        m = output_metrics(ref, [q.run(f) for f in data], names)
        trials.append({"trial": what, **m})
        return m

    full = {layer.weight: INT8 for layer in layers}
    plan: dict[str, str] = {}
    if layers and _meets(score(full, "all int8"), budget):
        plan = full
    elif layers:
        key = next(iter(budget))
        sens = {layer.weight: score({layer.weight: INT8}, f"only {layer.node} int8").get(key, 0.0) for layer in layers}
        order = sorted(layers, key=lambda la: -sens[la.weight])

        def longest(prefix_plan: dict[str, str], cands: list[Any], how: str) -> int:
            lo, hi = 0, len(cands)  # invariant: prefix lo meets, prefix > hi does not
            while lo < hi:
                mid = (lo + hi + 1) // 2
                trial = dict(prefix_plan)
                trial.update({la.weight: how for la in cands[:mid]})
                if _meets(score(trial, f"{mid} layers {how}"), budget):
                    lo = mid
                else:
                    hi = mid - 1
            return lo

        k = longest({}, order, INT8)
        plan.update({la.weight: INT8 for la in order[:k]})
        rest = order[k:]
        k2 = longest(plan, rest, "bf16")
        plan.update({la.weight: "bf16" for la in rest[:k2]})
    params = params_for(plan)
    graph = _strip(model.graph, [w for w, h in plan.items() if h.startswith("int8")])
    q = build(model, graph, params, QuantReport("auto", []))
    q.quant_report = _report(model, q, "auto", layers, skipped, {w: plan.get(w, "f32") for w in (la.weight for la in layers)},
                             data, extra={"budget": budget, "trials": trials,
                                          "budget_met": _meets(output_metrics(ref, [q.run(f) for f in data], names), budget)})
    return q
