"""The committed decoder fixtures: their layout, their KV-cache consistency, and jaxinfer agreeing with onnxruntime.

These pin the ground the generation tests stand on: if a fixture's past/present tensors did not reproduce a
full forward, or jaxinfer's import of it disagreed with onnxruntime, token-identity tests elsewhere would fail
for reasons that have nothing to do with the Decoder or the scheduler.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import jaxinfer

from .ort_reference import empty_past, ort_greedy, ort_session, ort_step

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "decoders"
VOCAB = 512
# fixture -> (layers, kv heads, head_dim)
DECODERS = {
    "gpt2_tiny.onnx": (2, 4, 16),
    "llama_tiny.onnx": (2, 2, 16),
    "llama_gqa_contrib.onnx": (2, 2, 16),
}
ATOL = 1e-4

each_decoder = pytest.mark.parametrize("name", list(DECODERS))


def _path(name: str) -> str:
    return str(FIXTURES / name)


def _ids(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (1, n), dtype=np.int64)


def _feeds(ids: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    past_len = next(iter(past.values())).shape[2]
    seq = ids.shape[1]
    return {"input_ids": ids, "attention_mask": np.ones((1, past_len + seq), np.int64),
            "position_ids": np.arange(past_len, past_len + seq, dtype=np.int64)[None], **past}


@lru_cache(maxsize=None)
def _jax_model(name: str) -> jaxinfer.Model:
    return jaxinfer.load(_path(name))


@each_decoder
def test_layout(name):
    layers, kv_heads, head_dim = DECODERS[name]
    sess = ort_session(_path(name))
    ins = {i.name: i for i in sess.get_inputs()}
    outs = {o.name: o for o in sess.get_outputs()}
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    assert list(ins) == ["input_ids", "attention_mask", "position_ids", *past]
    assert list(outs) == ["logits", *present]
    for n in ("input_ids", "attention_mask", "position_ids"):
        assert ins[n].type == "tensor(int64)" and len(ins[n].shape) == 2
        assert all(isinstance(d, str) for d in ins[n].shape), f"{n} must have symbolic batch/sequence dims"
    for n in past:
        b, h, p, d = ins[n].shape
        assert ins[n].type == "tensor(float)" and (h, d) == (kv_heads, head_dim)
        assert isinstance(b, str) and isinstance(p, str)
    assert outs["logits"].shape[2] == VOCAB
    for n in present:
        assert tuple(outs[n].shape[1::2]) == (kv_heads, head_dim)


@each_decoder
def test_kv_cache_reproduces_full_forward(name):
    """Prefill 5 tokens, then 7 single-token steps feeding present back as past == one 12-token forward."""
    sess = ort_session(_path(name))
    ids = _ids(12)
    full, full_present = ort_step(sess, ids, empty_past(sess))
    logits, past = ort_step(sess, ids[:, :5], empty_past(sess))
    parts = [logits]
    for t in range(5, 12):
        logits, past = ort_step(sess, ids[:, t:t + 1], past)
        parts.append(logits)
    np.testing.assert_allclose(np.concatenate(parts, axis=1), full, atol=ATOL)
    for k, v in past.items():
        assert v.shape[2] == 12
        np.testing.assert_allclose(v, full_present[k], atol=ATOL)


@each_decoder
def test_greedy_reference_is_uncached_argmax(name):
    """ort_greedy (cached, one token a step) gives the tokens of re-running the whole sequence each step."""
    path = _path(name)
    sess = ort_session(path)
    prompt = [int(t) for t in _ids(4, seed=1)[0]]
    got = ort_greedy(path, prompt, 8)
    seq = list(prompt)
    for _ in range(8):
        logits, _ = ort_step(sess, np.asarray([seq], np.int64), empty_past(sess))
        seq.append(int(np.argmax(logits[0, -1])))
    assert got == seq[len(prompt):]
    assert len(set(ort_greedy(path, prompt, 32))) > 8, "random weights should not collapse into a few tokens"


@each_decoder
def test_jaxinfer_matches_onnxruntime(name):
    """jaxinfer.load(...).run on a prefill (empty past) and on one decode step with a 6-token past."""
    sess = ort_session(_path(name))
    model = _jax_model(name)
    ids = _ids(7, seed=2)
    prefill = _feeds(ids[:, :6], empty_past(sess))
    want_logits, past = ort_step(sess, ids[:, :6], empty_past(sess))
    got = model.run(prefill)
    np.testing.assert_allclose(np.asarray(got["logits"]), want_logits, atol=ATOL)
    for k, v in past.items():
        np.testing.assert_allclose(np.asarray(got[k.replace("past_key_values.", "present.", 1)]), v, atol=ATOL)

    want_logits, want_past = ort_step(sess, ids[:, 6:], past)
    got = model.run(_feeds(ids[:, 6:], past))
    np.testing.assert_allclose(np.asarray(got["logits"]), want_logits, atol=ATOL)
    for k, v in want_past.items():
        np.testing.assert_allclose(np.asarray(got[k.replace("past_key_values.", "present.", 1)]), v, atol=ATOL)


def test_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_file(_path("tokenizer.json"))
    assert tok.get_vocab_size() <= VOCAB
    text = "Hello, jaxinfer streams tokens: ünïcode 42!"
    ids = tok.encode(text).ids
    assert ids and max(ids) < VOCAB
    assert tok.decode(ids) == text
    assert tok.token_to_id("<|endoftext|>") == 0
