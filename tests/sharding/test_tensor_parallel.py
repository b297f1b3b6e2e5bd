"""Automatic tensor parallelism: rules from the graph, equality, collectives, memory."""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxinfer
from jaxinfer.sharding import ShardingConfigError, analyze, collectives, format_rules, shard, specs_from_rules


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def test_rules_are_megatron_pairs(gpt2):
    a = analyze(gpt2, 8)
    specs = specs_from_rules(a.rules, gpt2.params)
    for i in range(2):
        for p in ("q", "k", "v"):
            assert specs[f"h{i}.attn.{p}.weight"] == P(None, "tensor")
            assert specs[f"h{i}.attn.{p}.bias"] == P("tensor")
        assert specs[f"h{i}.attn.o.weight"] == P("tensor", None)
        assert specs[f"h{i}.attn.o.bias"] == P()
        assert specs[f"h{i}.mlp.up.weight"] == P(None, "tensor")
        assert specs[f"h{i}.mlp.down.weight"] == P("tensor", None)
    assert all(s == P() for k, s in specs.items() if "ln" in k)  # norms replicated (deduped ones share a name)
    assert specs["wte"] == P("tensor", None)  # embedding split by vocabulary
    assert len(a.pairs) == 8  # (q, k, v) -> o and up -> down, per layer
    # rules fold layer indices, print as Python, and round-trip
    text = format_rules(a.rules)
    assert r"h\\d+\\.mlp\\.up\\.weight" in text
    back = eval("[" + text + "]", {"P": P})  # noqa: S307 - our own output
    assert specs_from_rules(back, gpt2.params) == specs


def test_gpt2_tp8_equal_and_memory(gpt2, gpt2_feeds, gpt2_ref):
    sm = shard(gpt2, {"tensor_parallel": 8})
    out = sm.run(gpt2_feeds)
    assert _rel(out["logits"], gpt2_ref["logits"]) <= 1e-5
    total = sum(v.nbytes for v in gpt2.params.values())
    per = sm.per_device_params_bytes()
    assert len(per) == 8 and max(per.values()) <= 1.05 * total / 8
    exe = sm.compiled(sm._check_inputs(gpt2_feeds))
    c = collectives(exe)
    # Megatron minimum: 2 all-reduces per layer, + 1 for the vocab-split embedding; no all-gathers
    assert c.counts["all-reduce"] <= 2 * 2 + 1, str(c)
    assert c.counts["all-gather"] == 0 and c.counts["all-to-all"] == 0, str(c)


def test_layer_collectives_at_megatron_minimum(fm):
    m = jaxinfer.load(fm.layer_only(d=64, heads=8))
    x = {"hidden": np.random.RandomState(1).randn(4, 8, 64).astype(np.float32)}
    ref = m.run(x)["out"]
    sm = shard(m, {"tensor": 4, "data": 2})
    assert _rel(sm.run(x)["out"], ref) <= 1e-5
    c = collectives(sm.compiled(sm._check_inputs(x)))
    ar, rs, ag = c.counts["all-reduce"], c.counts["reduce-scatter"], c.counts["all-gather"]
    assert ar + rs <= 2 and ag <= rs, str(c)
    assert c.total_bytes > 0


def test_bert_tp_dp_and_edited_rules(fm):
    m = jaxinfer.load(fm.bert_like(layers=1, d=64, heads=4, vocab=256, seq=8))
    rs = np.random.RandomState(2)
    feeds = {"input_ids": rs.randint(0, 256, (4, 8)).astype(np.int64),
             "token_type_ids": rs.randint(0, 2, (4, 8)).astype(np.int64),
             "attention_mask": (rs.rand(4, 8) > 0.2).astype(np.float32)}
    ref = m.run(feeds)
    sm = shard(m, {"tensor": 4, "data": 2})
    out = sm.run(feeds)
    for k in ref:
        assert _rel(out[k], ref[k]) <= 1e-5, k
    assert sm.param_specs["token_type_embeddings"] == P()  # 2 rows: too small to split
    # edit the rules: keep the MLP replicated, pass them back
    rules = [(p, s) for p, s in analyze(m, 4).rules if "mlp" not in p]
    sm2 = shard(m, {"tensor": 4, "data": 2, "rules": rules})
    assert sm2.param_specs["l0.mlp.up.weight"] == P()
    assert _rel(sm2.run(feeds)["pooler_output"], ref["pooler_output"]) <= 1e-5


def test_conv_by_out_channels(fm):
    m = jaxinfer.load(fm.convnet(channels=16))
    x = {"image": np.random.RandomState(3).randn(2, 3, 16, 16).astype(np.float32)}
    sm = shard(m, {"tensor": 4})
    w1, w2 = sorted(k for k in sm.param_specs if k.startswith(("conv1.weight", "conv2.weight")))
    hwio = w1.endswith("__hwio")  # the layout pass stores conv weights spatial-first
    assert sm.param_specs[w1] == (P(None, None, None, "tensor") if hwio else P("tensor", None, None, None))
    assert sm.param_specs[w2] == (P(None, None, "tensor", None) if hwio else P(None, "tensor", None, None))
    assert _rel(sm.run(x)["logits"], m.run(x)["logits"]) <= 1e-5


def test_indivisible_heads_error_says_what_fits(fm):
    m = jaxinfer.load(fm.layer_only(d=48, heads=6, ff=96))
    with pytest.raises(ShardingConfigError, match=r"tensor=4 does not divide.*fit this model: \[1, 2\]"):
        shard(m, {"tensor": 4})
    sm = shard(m, {"tensor": 4, "strict": False})  # replicate what does not divide
    x = {"hidden": np.ones((2, 8, 48), np.float32)}
    assert _rel(sm.run(x)["out"], m.run(x)["out"]) <= 1e-5


def test_data_parallel_and_batch_error(gpt2, gpt2_feeds, gpt2_ref):
    sm = shard(gpt2, {"data_parallel": 8})
    assert _rel(sm.run(gpt2_feeds)["logits"], gpt2_ref["logits"]) <= 1e-5
    with pytest.raises(ShardingConfigError, match="batch 4 is not divisible by data=8"):
        sm.run({"input_ids": gpt2_feeds["input_ids"][:4]})
