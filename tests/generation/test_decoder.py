"""The Decoder against onnxruntime's plain loop (issue 9's first number), its layout, cache and compiles."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import jaxinfer
from jaxinfer.errors import InputError
from jaxinfer.generation import Decoder, DecoderLayout, Engine, SamplingParams, generate
from jaxinfer.generation.decoder import SlotSampling, default_buckets
from jaxinfer.generation.layout import recognise_layout

from .conftest import DECODER_FILES, fixture_path
from .ort_reference import ort_greedy

# lengths 5 and 8 fill the 8-bucket (padded / exact), 11 and 16 the 16-bucket
PROMPTS = [[5, 17, 300, 42, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9, 400, 33, 12, 250, 77, 3, 3, 90, 11, 500],
           list(range(100, 116))]
N_NEW = 64


@pytest.mark.parametrize("name", DECODER_FILES)
def test_greedy_tokens_identical_to_onnxruntime(decoders, name):
    """64 greedy tokens per prompt, all prompts decoded together in the slot scheduler == ort_greedy one by one."""
    dec = decoders[name]
    got = generate(dec, PROMPTS, N_NEW)
    for prompt, tokens in zip(PROMPTS, got):
        assert tokens == ort_greedy(fixture_path(name), prompt, N_NEW), f"{name}: prompt of {len(prompt)} tokens"
    assert generate(dec, PROMPTS[2], N_NEW) == got[2]  # alone == in a batch


def test_layout_recognised(decoders):
    gqa = decoders["llama_gqa_contrib.onnx"].layout
    assert (gqa.n_layers, gqa.kv_heads, gqa.head_dim, gqa.kv_write) == (2, 2, 16, "inplace")
    gpt2 = decoders["gpt2_tiny.onnx"]
    assert (gpt2.layout.kv_heads, gpt2.layout.kv_write, gpt2.vocab_size) == (4, "append", 512)
    assert gpt2.layout.past_keys == ("past_key_values.0.key", "past_key_values.1.key")
    assert gpt2.prefill_buckets == (8, 16)


def test_explicit_layout_checked_against_the_graph(decoders):
    model = decoders["gpt2_tiny.onnx"].model
    layout = recognise_layout(model)
    renamed = DecoderLayout(**{**layout.__dict__, "past_keys": ("past.0.k", "past.1.k")})
    with pytest.raises(InputError, match=r"past\.0\.k"):
        Decoder(model, layout=renamed)
    with pytest.raises(InputError, match="kv_write"):
        DecoderLayout(**{**layout.__dict__, "kv_write": "shared"})


def test_not_a_decoder_is_rejected_with_what_was_expected(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    path = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    with pytest.raises(InputError, match="input_ids.*past_key_values"):
        Decoder(str(path))


def test_decoder_arguments_validated(decoders):
    model = decoders["gpt2_tiny.onnx"].model
    with pytest.raises(InputError, match="prefill_buckets"):
        Decoder(model, max_len=64, prefill_buckets=(16, 128))
    with pytest.raises(InputError, match="slots"):
        Decoder(model, slots=0)
    assert default_buckets(100) == (16, 32, 64, 100)
    assert default_buckets(256) == (16, 32, 64, 128, 256)


def test_cache_is_fixed_shape_and_donated(gpt2):
    shape = (gpt2.slots, 4, gpt2.max_len, 16)
    assert all(a.shape == shape for a in (*gpt2.cache.keys, *gpt2.cache.values))
    before = gpt2.cache.keys[0]
    with Engine(gpt2):  # the engine owns the decoder's cache while it runs; step it by hand afterwards
        pass
    gpt2.decode(np.zeros(gpt2.slots, np.int32), np.zeros(gpt2.slots, np.int32), SlotSampling.empty(gpt2.slots))
    assert before.is_deleted(), "the decode step should consume (donate) the cache it was given"
    assert gpt2.cache.keys[0].shape == shape


def test_no_compile_after_warmup(gpt2):
    """A mixed workload (both buckets, sampling settings, stops, both policies) compiles nothing new."""
    before = dict(gpt2.stats)
    rng = np.random.default_rng(0)
    for policy in ("continuous", "static"):
        with Engine(gpt2, policy=policy) as engine:
            streams = []
            for i in range(7):
                prompt = rng.integers(0, 512, int(rng.integers(1, 17))).tolist()
                params = SamplingParams(max_new_tokens=int(rng.integers(1, 20)), temperature=[0.0, 0.7][i % 2],
                                        top_k=[0, 5][i % 2], top_p=[1.0, 0.9][i % 2], seed=i, stop_ids=(3,))
                streams.append(engine.submit(prompt, params))
            for s in streams:
                s.result(timeout=120)
            assert engine.stats()["compiles_since_warmup"] == 0
    assert gpt2.stats["prefill_compiles"] == before["prefill_compiles"] == len(gpt2.prefill_buckets)
    assert gpt2.stats["decode_compiles"] == before["decode_compiles"] == 1
    assert gpt2.stats["prefills"] == before["prefills"] + 14


def test_generate_builds_and_closes_its_own_decoder(decoders):
    """From a Model: slots/max_len chosen here; executables of an equal geometry are reused, not recompiled."""
    dec = decoders["gpt2_tiny.onnx"]
    model = dec.model
    want = generate(dec, PROMPTS[:2], 6)
    assert jaxinfer.generate(model, PROMPTS[:2], 6, slots=dec.slots, max_len=dec.max_len) == want
    assert jaxinfer.generate(model, PROMPTS[0], 6, slots=dec.slots, max_len=dec.max_len) == want[0]
    assert list(jaxinfer.generate_stream(model, PROMPTS[1], 6, slots=dec.slots, max_len=dec.max_len)) == want[1]


@pytest.mark.skipif(not os.environ.get("JAXINFER_SLOW"), reason="slow (compiles a new geometry): JAXINFER_SLOW=1")
def test_generate_from_a_path():
    path = fixture_path("llama_tiny.onnx")
    assert jaxinfer.generate(path, PROMPTS[0], 12) == ort_greedy(path, PROMPTS[0], 12)


def _wide_gqa_decoder() -> onnx.ModelProto:
    """A one-layer Llama-style decoder whose MLP weights (2048 x 512) are big enough for the few-row rule."""
    from tests.fixtures.decoders.make_decoders import VOCAB, gqa_graph

    hidden, heads, kv_heads, inter = 512, 8, 2, 2048
    head_dim = hidden // heads
    rng = np.random.default_rng(0)

    def r(*shape):
        return (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32)

    p = "model.layers.0."
    w = {"model.embed_tokens.weight": r(VOCAB, hidden), "model.norm.weight": np.ones(hidden, np.float32),
         "lm_head.weight": r(VOCAB, hidden), p + "input_layernorm.weight": np.ones(hidden, np.float32),
         p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
         p + "self_attn.q_proj.weight": r(hidden, hidden), p + "self_attn.k_proj.weight": r(kv_heads * head_dim, hidden),
         p + "self_attn.v_proj.weight": r(kv_heads * head_dim, hidden), p + "self_attn.o_proj.weight": r(hidden, hidden),
         p + "mlp.gate_proj.weight": r(inter, hidden), p + "mlp.up_proj.weight": r(inter, hidden),
         p + "mlp.down_proj.weight": r(hidden, inter)}
    return gqa_graph(w, n_layers=1, num_heads=heads, kv_heads=kv_heads, eps=1e-5, theta=10000.0)


def test_decode_steps_take_the_few_row_rule(monkeypatch):
    """Decode steps and short prefills (few rows through 1M-element weights) run those products in our
    few-rows kernel where it is there (cpu_kernels.f32_rows_dot), else compile their dots in XLA's own loops;
    long prefills keep the library (jaxinfer.xla_dots); the tokens are the same either way."""
    from jaxinfer import conv_lowering, cpu_kernels
    from jaxinfer import model as model_mod

    proto = _wide_gqa_decoder()
    real = model_mod.options_for
    chosen: list[dict] = []
    kernel: list[bool] = []

    def options_for(low, opts):
        kernel.append(cpu_kernels.TARGET_F32_ROWS in low.as_text())
        chosen.append(real(low, opts))
        return chosen[-1]

    monkeypatch.setattr(model_mod, "options_for", options_for)
    dec = Decoder(jaxinfer.load(proto), slots=4, max_len=64, prefill_buckets=[8, 64])
    dec.warmup()
    takes = conv_lowering.F32_KERNEL and cpu_kernels.available() and cpu_kernels.isa() == 2
    assert kernel == [takes, False, takes]  # prefill 8, prefill 64, decode
    if model_mod._options_apply():
        flag = model_mod.YNN_FUSION_FLAG
        got = [c[flag] for c in chosen]
        assert got[1] == model_mod.YNN_FUSION_TYPES  # prefill 64: the library
        if not takes:
            assert got[0] == got[2] == ""  # XLA's own loops for the few-row programs
    monkeypatch.setattr(model_mod, "options_for", lambda low, opts: dict(opts))  # the library everywhere
    plain = Decoder(jaxinfer.load(proto), slots=4, max_len=64, prefill_buckets=[8, 64])
    params = SamplingParams()
    for d in (dec, plain):
        for slot, prompt in enumerate(([5, 17, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])):
            d.prefill(slot, prompt, params)
    tokens, lens = np.array([7, 9, 0, 0], np.int32), np.array([3, 10, 0, 0], np.int32)
    sampling = SlotSampling.empty(4)
    np.testing.assert_array_equal(dec.decode(tokens, lens, sampling), plain.decode(tokens, lens, sampling))
