"""Pipeline parallelism: balanced cuts, params only on their stage, GPipe micro-batches, PP x TP / DP."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxinfer
from jaxinfer.sharding import ShardingConfigError, collectives, plan, shard
from jaxinfer.sharding.pipeline import split_stages
from jaxinfer.sharding.values import abstract_inputs, abstract_values


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def test_cuts_are_narrow_and_balanced(gpt2):
    values = abstract_values(gpt2, abstract_inputs(gpt2, 8))
    split = split_stages(gpt2.graph, values, 2)
    assert split.crossing == 1  # only the residual stream crosses a cut
    assert split.bounds[0] == 0 and split.bounds[-1] == len(gpt2.graph.nodes)
    cost = [f / sum(split.flops) + b / sum(split.params_bytes) for f, b in zip(split.flops, split.params_bytes)]
    assert max(cost) / min(cost) < 1.6, split  # 2 layers + embeddings/head over 2 stages


def test_pp_equal_params_on_their_stage_and_profile(gpt2, gpt2_feeds, gpt2_ref):
    pm = shard(gpt2, {"pipeline_parallel": {"stages": 2, "micro_batches": 4, "schedule": "stages"}},
               devices=jax.devices()[:2])
    assert _rel(pm.run(gpt2_feeds)["logits"], gpt2_ref["logits"]) <= 1e-5
    stage_devs = [pm.stage_devices(s) for s in range(2)]
    assert stage_devs[0].isdisjoint(stage_devs[1])
    for s, sm in enumerate(pm.stage_models):
        assert sm.params and all(v.sharding.device_set <= stage_devs[s] for v in sm.params.values())
    names = [set(sm.params) for sm in pm.stage_models]
    assert "h0.mlp.up.weight" in names[0] and "h1.mlp.up.weight" in names[1]
    assert "h1.mlp.up.weight" not in names[0] and "h0.mlp.up.weight" not in names[1]
    total = sum(v.nbytes for v in gpt2.params.values())
    per = pm.per_device_params_bytes()
    assert len(per) == 2 and max(per.values()) < 0.75 * total  # each device holds about its stage's share
    prof = pm.profile(gpt2_feeds)
    assert len(prof.timeline) == 2 * 4 and prof.ideal_bubble == pytest.approx(1 / 5)
    assert 0.0 <= prof.bubble < 1.0 and all(b > 0 for b in prof.busy_s)
    for m in range(4):  # GPipe order: stage 1 starts micro-batch m after stage 0 ends it
        s0 = next(r for r in prof.timeline if r[:2] == (0, m))
        s1 = next(r for r in prof.timeline if r[:2] == (1, m))
        assert s1[2] >= s0[3]


def test_pp_tp_dp(gpt2, gpt2_feeds, gpt2_ref):
    pm = shard(gpt2, {"stage": 2, "tensor": 2, "data": 2, "micro_batches": 2})
    assert _rel(pm.run(gpt2_feeds)["logits"], gpt2_ref["logits"]) <= 1e-5
    assert dict(pm.mesh.shape) == {"data": 2, "stage": 2, "expert": 1, "tensor": 2}
    s1 = pm.stage_models[1]
    assert s1.param_specs["h1.mlp.up.weight"] == P(None, "tensor")  # TP inside the stage
    assert len(pm.stage_devices(1)) == 4
    assert all(v.sharding.device_set <= pm.stage_devices(1) for v in s1.params.values())


def test_pp_errors(fm, gpt2, gpt2_feeds):
    m = jaxinfer.load(fm.layer_only(d=32, heads=2, ff=64))
    with pytest.raises(ShardingConfigError, match=r"stages=8 but this graph can be cut in only \d+ place"):
        shard(m, {"stage": 8})
    for schedule in ("stages", "stacked"):
        pm = shard(gpt2, {"stage": 2, "micro_batches": 3, "schedule": schedule}, devices=jax.devices()[:2])
        with pytest.raises(ShardingConfigError, match=r"micro_batches=3 does not divide the batch 8.*\[1, 2, 4, 8\]"):
            pm.run(gpt2_feeds)
    with pytest.raises(ShardingConfigError, match="schedule='stacked' does not apply: the stacked schedule runs stage-only"):
        shard(gpt2, {"stage": 2, "tensor": 2, "schedule": "stacked"}, devices=jax.devices()[:4])


def test_stacked_layers_shard_map_ppermute(fm):
    m = jaxinfer.load(fm.gpt2_like(layers=4, d=64, heads=4, vocab=256, seq=8))
    x = {"input_ids": np.random.RandomState(3).randint(0, 256, (8, 8)).astype(np.int64)}
    pm = shard(m, {"pipeline_parallel": {"stages": 4, "micro_batches": 4}}, devices=jax.devices()[:4])
    assert type(pm).__name__ == "StackedPipelineModel" and pm.layer_run.layers == 4
    assert _rel(pm.run(x)["logits"], m.run(x)["logits"]) <= 1e-5
    c = collectives(pm.compiled(pm._check_inputs(x)))
    assert c.counts["collective-permute"] == 1, str(c)  # the ppermute inside the clock loop
    up = pm.params["stacked:h0.mlp.up.weight"]  # [stages, layers per stage, d, ff]
    assert up.shape[:2] == (4, 1)
    for shard_ in up.addressable_shards:  # each stage's devices hold only that stage's layers
        assert shard_.index[0] == slice(pm.stage_of(shard_.device), pm.stage_of(shard_.device) + 1)


def test_plan_tries_stages(fm):
    m = jaxinfer.load(fm.layer_only(d=32, heads=2, ff=64))
    p = plan(m, devices=2, batch=4, timed=False, allow_stage=True)
    by_mesh = {r.mesh: r for r in p.rows}
    assert set(by_mesh) == {"d2xs1xe1xt1", "d1xs2xe1xt1", "d1xs1xe1xt2"}
    pp = by_mesh["d1xs2xe1xt1"]
    assert pp.ok, pp.reason
    assert pp.config["micro_batches"] == 4 and pp.per_device_params_bytes < by_mesh["d2xs1xe1xt1"].per_device_params_bytes
