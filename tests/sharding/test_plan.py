"""Plan search: every factorization compiled, measured, invalid ones explained, ranked."""

from __future__ import annotations

import json

import jax
import numpy as np

import jaxinfer
from jaxinfer.sharding import plan, shard


def test_plan_ranks_and_best_is_shardable(fm):
    m = jaxinfer.load(fm.layer_only(d=32, heads=2, ff=64))
    p = plan(m, devices=4, batch=4, repeats=1)
    assert len(p.rows) == 3
    by_mesh = {r.mesh: r for r in p.rows}
    bad = by_mesh["d1xs1xe1xt4"]  # 2 heads cannot split 4 ways
    assert not bad.ok and "fit this model" in bad.reason
    ok = [r for r in p.rows if r.ok]
    assert len(ok) == 2 and all(r.latency_s is not None and r.compile_s > 0 for r in ok)
    assert [r.latency_s for r in ok] == sorted(r.latency_s for r in ok)  # ranked by measured latency
    tp2 = by_mesh["d2xs1xe1xt2"]
    assert tp2.collectives.get("all-reduce", 0) == 2 and tp2.per_device_params_bytes < by_mesh["d4xs1xe1xt1"].per_device_params_bytes
    assert "rank" in p.table() and json.loads(p.to_json())["best"] == p.best
    x = {"hidden": np.ones((4, 8, 32), np.float32)}
    np.testing.assert_allclose(shard(m, p.best, devices=jax.devices()[:4]).run(x)["out"], m.run(x)["out"], rtol=1e-5, atol=1e-6)


def test_plan_memory_limit_drops_replicated(fm):
    m = jaxinfer.load(fm.layer_only(d=32, heads=2, ff=64))
    full = sum(v.nbytes for v in m.params.values())
    p = plan(m, devices=2, batch=2, timed=False, memory_limit=int(full * 0.8))
    by_mesh = {r.mesh: r for r in p.rows}
    assert not by_mesh["d2xs1xe1xt1"].ok and "memory limit" in by_mesh["d2xs1xe1xt1"].reason
    assert p.best["tensor"] >= 2


def test_plan_times_only_the_best_estimates(fm):
    """timed=k: the k best estimates are timed (interleaved) and ranked first; the rest keep their estimate."""
    m = jaxinfer.load(fm.layer_only(d=32, heads=2, ff=64))
    p = plan(m, devices=4, batch=4, timed=1, repeats=1)
    ok = [r for r in p.rows if r.ok]
    assert len(ok) == 2
    assert ok[0].latency_s is not None and ok[1].latency_s is None
    assert ok[0].estimate_s <= ok[1].estimate_s  # the one timed is the one the estimate ranked best
    assert p.best == ok[0].config
