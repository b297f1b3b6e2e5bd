"""What a quantization did, layer by layer, and how far its outputs moved from float."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Calibration batches used to measure errors in a report (the first ones).
REPORT_BATCHES = 8


def cosine(a: Any, b: Any) -> float:
    a = np.asarray(a, np.float64).ravel()
    b = np.asarray(b, np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _f32(x: Any) -> np.ndarray:
    return np.asarray(np.asarray(x).astype(np.float32))


def compare(ref: Any, q: Any, names: Sequence[str], data: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """name -> {cosine, max_abs} of ``q``'s value against ``ref``'s, over the batches."""
    from .calibrate import probe

    names = list(dict.fromkeys(names))
    if not names:
        return {}
    pr, pq = probe(ref, names), probe(q, names)
    acc: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {n: [] for n in names}
    for feeds in list(data)[:REPORT_BATCHES]:
        a, b = pr.run(feeds), pq.run(feeds)
        for n in names:
            acc[n].append((_f32(a[n]), _f32(b[n])))
    out = {}
    for n, pairs in acc.items():
        fa = np.concatenate([p[0].ravel() for p in pairs])
        fb = np.concatenate([p[1].ravel() for p in pairs])
        out[n] = {"cosine": round(cosine(fa, fb), 6), "max_abs": float(np.max(np.abs(fa - fb))) if fa.size else 0.0}
    return out


def output_metrics(ref_outs: Sequence[Mapping[str, Any]], q_outs: Sequence[Mapping[str, Any]],
                   names: Sequence[str]) -> dict[str, float]:
    """End-to-end: min per-batch cosine over float outputs, max abs, top-1 agreement of the first."""
    cos, maxabs, agree, total = [], 0.0, 0, 0
    for a, b in zip(ref_outs, q_outs):
        fa = [_f32(a[n]) for n in names if np.issubdtype(np.asarray(a[n]).dtype, np.floating)]
        fb = [_f32(b[n]) for n in names if np.issubdtype(np.asarray(b[n]).dtype, np.floating)]
        if not fa:
            continue
        cos.append(cosine(np.concatenate([x.ravel() for x in fa]), np.concatenate([x.ravel() for x in fb])))
        maxabs = max(maxabs, max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(fa, fb)))
        first_a, first_b = fa[0], fb[0]
        if first_a.ndim >= 1 and first_a.shape[-1] > 1:
            agree += int(np.sum(np.argmax(first_a, -1) == np.argmax(first_b, -1)))
            total += int(np.prod(first_a.shape[:-1]))
    res: dict[str, float] = {}
    if cos:
        res["cosine"] = round(min(cos), 6)
        res["max_abs"] = maxabs
    if total:
        res["top1_agreement"] = agree / total
    return res


def end_to_end(ref: Any, q: Any, data: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    names = [s.name for s in ref.outputs]
    batches = list(data)[:REPORT_BATCHES]
    return output_metrics([ref.run(f) for f in batches], [q.run(f) for f in batches], names)


@dataclass
class QuantReport:
    """Per-layer rows (method, bytes before/after, cosine/max_abs) and model totals."""

    method: str
    rows: list[dict[str, Any]]
    totals: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "rows": self.rows, "totals": self.totals}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, default=_jsonable)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantReport:
        return cls(d["method"], list(d.get("rows", [])), dict(d.get("totals", {})))

    def __str__(self) -> str:
        pruning = self.method.startswith("prune")
        chans = f" {'channels':>11s}" if pruning else ""
        head = (f"{'layer':40s} {'op':7s} {'method':13s}{chans} {'before':>11s} {'after':>11s} {'ratio':>6s} "
                f"{'cosine':>9s} {'max_abs':>9s}")
        lines = [f"{'pruning' if pruning else 'quantization'}: {self.method}", head, "-" * len(head)]
        for r in self.rows:
            cosv = f"{r['cosine']:.6f}" if "cosine" in r else "-"
            mav = f"{r['max_abs']:.3g}" if "max_abs" in r else "-"
            ch = f" {str(r.get('channels_before')) + '->' + str(r.get('channels_after')):>11s}" if pruning else ""
            lines.append(f"{r['layer'][:40]:40s} {r['op']:7s} {r['method']:13s}{ch} {r['bytes_before']:>11,d} "
                         f"{r['bytes_after']:>11,d} {r['ratio'] or 0:>6.2f} {cosv:>9s} {mav:>9s}")
        t = self.totals
        lines.append("-" * len(head))
        if pruning:
            lines.append(f"params bytes: {t.get('params_bytes_f32', 0):,d} -> {t.get('params_bytes', 0):,d} "
                         f"({t.get('params_ratio')}x); sparsity {t.get('sparsity')}, {t.get('pruned_layers', 0)} "
                         f"layers pruned")
        else:
            lines.append(f"params bytes: {t.get('params_bytes_f32', 0):,d} -> {t.get('params_bytes', 0):,d}; "
                         f"quantized weights {t.get('quantized_weights_bytes_before', 0):,d} -> "
                         f"{t.get('quantized_weights_bytes_after', 0):,d} ({t.get('quantized_weights_ratio')}x)")
        if "cosine" in t:
            lines.append(f"end to end: cosine {t['cosine']:.6f}, max abs {t.get('max_abs', 0):.4g}"
                         + (f", top-1 agreement {t['top1_agreement']:.4f}" if "top1_agreement" in t else ""))
        for s in t.get("skipped", []):
            lines.append(f"{'kept' if pruning else 'skipped'} {s['layer']}: {s['why']}")
        return "\n".join(lines)

    __repr__ = __str__


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
