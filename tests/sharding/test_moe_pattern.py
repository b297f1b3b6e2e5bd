"""Exported MoE patterns (no MoE op): recognised, fused into StackedMoE, expert parallel, vs onnxruntime."""

from __future__ import annotations

import jax
import numpy as np
import onnxruntime as ort
import pytest
from jax.sharding import PartitionSpec as P

import jaxinfer
from jaxinfer.sharding import ShardingConfigError, collectives, plan, shard
from jaxinfer.sharding.expert import EXPERT_SLOTS, experts_model, has_experts, moe_nodes
from jaxinfer.sharding.moe_pattern import find_moe, fuse_moe

from .moe_fixtures import decomposed_moe, moe_decoder, torch_moe

FORMS = {  # name -> decomposed_moe kwargs
    "dense-gelu": {"form": "dense", "act": "gelu"},
    "stack-relu": {"form": "stack", "act": "relu"},
    "onehot-swiglu": {"form": "onehot", "act": "swiglu"},
    "equal-gelu": {"form": "equal", "act": "gelu"},
    "equal-k1-raw": {"form": "equal", "act": "relu", "k": 1, "normalize": False},
    "dense-2d-gemm": {"form": "dense", "act": "gelu", "seq": None},  # [tokens, d]: experts load as Gemm
}
_CACHE: dict[str, tuple] = {}


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def _case(name: str, proto=None, tokens_2d: bool | None = None):
    """(model, feeds, onnxruntime output) for a fixture, built once per session."""
    if name not in _CACHE:
        if proto is None:
            proto = decomposed_moe(**FORMS[name])
            tokens_2d = FORMS[name].get("seq", 4) is None
        x = {"hidden": np.random.RandomState(7).randn(*((32,) if tokens_2d else (8, 4)), 16).astype(np.float32)}
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        _CACHE[name] = (jaxinfer.load(proto), x, sess.run(None, x)[0])
    return _CACHE[name]


def _stacked(graph):
    return [n for n in graph.nodes if (n.domain, n.op_type) == ("jaxinfer", "StackedMoE")]


@pytest.mark.parametrize("name", list(FORMS))
def test_pattern_fused_into_one_node_and_matches_onnxruntime(name):
    m, x, ref = _case(name)
    kw = FORMS[name]
    g = fuse_moe(m.graph, m.registry)
    assert g is not m.graph and len(m.graph.nodes) > 50
    assert [n.op_type for n in g.nodes] == ["MatMul", "StackedMoE", "Add"]  # router, experts+combine, residual
    (node,) = _stacked(g)
    assert node.attrs["k"] == kw.get("k", 2) and node.attrs["normalize_routing_weights"] == int(kw.get("normalize", True))
    shapes = {i: g.initializers[node.inputs[i]].shape for i in EXPERT_SLOTS if i < len(node.inputs) and node.inputs[i]}
    assert shapes[2] == (8, 32, 16) and shapes[4] == (8, 16, 32)  # onnxruntime's layout: [E, inter, d], [E, d, inter]
    assert (6 in shapes) == (kw["act"] == "swiglu") and (3 in shapes) == (kw["act"] != "swiglu")
    assert not any(k.startswith("experts.") for k in g.initializers)  # per-expert weights gone
    assert len(m.graph.nodes) > 50 and _rel(m.run(x)["out"], ref) <= 1e-5  # the input graph is untouched
    fused, _ = experts_model(m)
    assert fused.graph is not m.graph and _rel(fused.run(x)["out"], ref) <= 1e-5


@pytest.mark.parametrize("name,experts", [("dense-gelu", 2), ("dense-gelu", 4), ("dense-gelu", 8),
                                          ("onehot-swiglu", 2), ("onehot-swiglu", 4), ("onehot-swiglu", 8),
                                          ("stack-relu", 4), ("equal-gelu", 8), ("equal-k1-raw", 4),
                                          ("dense-2d-gemm", 8)])
def test_expert_parallel_pattern_matches_onnxruntime_and_splits_experts(name, experts):
    m, x, ref = _case(name)
    sm = shard(m, {"expert": experts})
    assert dict(sm.mesh.shape) == {"data": 8 // experts, "stage": 1, "expert": experts, "tensor": 1}
    assert _rel(sm.run(x)["out"], ref) <= 1e-5
    (node,) = _stacked(sm.graph)
    names = [node.inputs[i] for i in EXPERT_SLOTS if i < len(node.inputs) and node.inputs[i]]
    total = sum(v.nbytes for k, v in m.params.items() if k.startswith("experts."))
    assert sum(sm.params[k].nbytes for k in names) == total
    per: dict[int, int] = {}
    for k in names:
        for s in sm.params[k].addressable_shards:
            per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
    assert len(per) == 8 and max(per.values()) <= 1.05 * total / experts
    c = collectives(sm.compiled(sm._check_inputs(x)))
    assert c.counts["all-to-all"] == 2, str(c)  # dispatch and return


@pytest.mark.parametrize("form,breaks", [("dense", "wrong_gate"), ("onehot", "wrong_gate"), ("equal", "leak"),
                                         ("onehot", "mixed_act"), ("dense", "dropped"), ("equal", "dropped")])
def test_partial_match_left_unchanged(form, breaks):
    proto = decomposed_moe(form, breaks=breaks)
    m = jaxinfer.load(proto)
    assert find_moe(m.graph, m.registry) == [] and fuse_moe(m.graph, m.registry) is m.graph
    assert not has_experts(m)
    with pytest.raises(ShardingConfigError, match="no com.microsoft MoE op, and no router -> top-k"):
        shard(m, {"expert": 2})
    x = {"hidden": np.random.RandomState(3).randn(8, 4, 16).astype(np.float32)}  # still runs as exported
    ref = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)
    assert _rel(m.run(x)["out"], ref[0]) <= 1e-5


def test_plan_offers_expert_sizes_for_the_pattern():
    m, x, ref = _case("dense-gelu")
    assert has_experts(m) and not moe_nodes(m.graph)
    p = plan(m, devices=4, batch=4, timed=False)
    rows = {r.mesh: r for r in p.rows}
    assert {"d2xs1xe2xt1", "d1xs1xe4xt1"} <= set(rows)
    for mesh in ("d2xs1xe2xt1", "d1xs1xe4xt1"):
        assert rows[mesh].ok, rows[mesh].reason
        assert rows[mesh].collectives.get("all-to-all") == 2
    assert rows["d1xs1xe4xt1"].per_device_params_bytes < rows["d4xs1xe1xt1"].per_device_params_bytes
    best = shard(m, p.best, devices=jax.devices()[:4])
    assert _rel(best.run(x)["out"], ref) <= 1e-5


def test_reshard_from_data_parallel_to_expert():
    m, x, ref = _case("onehot-swiglu")
    dp = shard(m, {"data": 8})
    ep = shard(dp, {"expert": 4})
    assert _stacked(ep.graph) and _rel(ep.run(x)["out"], ref) <= 1e-5
    assert all(not k.startswith("experts.") for k in ep.params)


@pytest.mark.parametrize("form,dynamo,tokens_2d", [("mask", False, True), ("dense", True, False)])
def test_torch_exported_moe_recognised(form, dynamo, tokens_2d):
    """TorchScript export of an ``==`` mask loop on [tokens, d] (Gemm transB=1 experts, erf GELU), and
    the dynamo export of a scattered gate matrix on [batch, seq, d] (MatMul + Add experts)."""
    pytest.importorskip("torch")
    if dynamo:
        pytest.importorskip("onnxscript")
    proto = torch_moe(form, dynamo=dynamo, tokens_2d=tokens_2d)
    m, x, ref = _case(f"torch-{form}-{int(dynamo)}", proto=proto, tokens_2d=tokens_2d)
    assert ("Gemm" in m.graph.op_histogram()) == tokens_2d
    g = fuse_moe(m.graph, m.registry)
    assert [n.op_type for n in g.nodes] == ["MatMul", "StackedMoE", "Add"]
    assert _rel(m.run(x)["out"], ref) <= 1e-5
    sm = shard(m, {"expert": 4})
    assert _rel(sm.run(x)["out"], ref) <= 1e-5


@pytest.fixture(scope="module")
def decoder():
    """2 layers of attention + decomposed MoE (4 experts), its feeds and onnxruntime's output."""
    proto = moe_decoder()
    x = {"hidden": np.random.RandomState(11).randn(8, 4, 16).astype(np.float32)}
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return jaxinfer.load(proto), x, sess.run(None, x)[0]


def _expert_bytes(model, names):
    per: dict[int, int] = {}
    for k in names:
        for s in model.params[k].addressable_shards:
            per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
    return per


def test_expert_with_tensor(decoder):
    m, x, ref = decoder
    assert len(_stacked(fuse_moe(m.graph, m.registry))) == 2  # one per layer
    sm = shard(m, {"expert": 2, "tensor": 2, "data": 2})
    assert _rel(sm.run(x)["out"], ref) <= 1e-5
    assert sm.param_specs["l0.attn.q.weight"] == P(None, "tensor")  # attention split by heads
    stacked = [n.inputs[i] for n in _stacked(sm.graph) for i in EXPERT_SLOTS if i < len(n.inputs) and n.inputs[i]]
    assert stacked and all(sm.param_specs[k] == P("expert") for k in stacked)
    total = sum(sm.params[k].nbytes for k in stacked)
    assert max(_expert_bytes(sm, stacked).values()) <= 1.05 * total / 2
    c = collectives(sm.compiled(sm._check_inputs(x)))
    assert c.counts["all-to-all"] == 4 and c.counts["all-reduce"] == 2, str(c)  # 2 per MoE, 1 per attention
    with pytest.raises(ShardingConfigError, match=r"tensor=2: found nothing.*expert=2; e\.g\. \{'expert': 2, 'data': 4\}"):
        shard(_case("dense-gelu")[0], {"expert": 2, "tensor": 2})  # an MoE alone has nothing for tensor


def test_expert_with_stage(decoder):
    m, x, ref = decoder
    pm = shard(m, {"stage": 2, "expert": 2, "data": 2, "micro_batches": 2})
    assert _rel(pm.run(x)["out"], ref) <= 1e-5
    assert dict(pm.mesh.shape) == {"data": 2, "stage": 2, "expert": 2, "tensor": 1}
    for s, sm in enumerate(pm.stage_models):
        stacked = [n.inputs[i] for n in _stacked(sm.graph) for i in EXPERT_SLOTS if i < len(n.inputs) and n.inputs[i]]
        assert len(stacked) == 4  # each stage holds one MoE layer: fc1/fc2 weights and biases
        assert all(sm.param_specs[k] == P("expert") for k in stacked)
        per = _expert_bytes(sm, stacked)
        assert set(per) == {d.id for d in pm.stage_devices(s)}  # only on this stage's devices
        assert max(per.values()) <= 1.05 * sum(sm.params[k].nbytes for k in stacked) / 2
    with pytest.raises(ShardingConfigError, match="expert=2 given.*stages with data/tensor/expert"):
        shard(m, {"stage": 2, "expert": 2, "micro_batches": 2, "schedule": "stacked"})
    with pytest.raises(ShardingConfigError, match=r"expert=8 does not divide the 4 experts.*\[1, 2, 4\]"):
        shard(m, {"stage": 1, "expert": 8})
