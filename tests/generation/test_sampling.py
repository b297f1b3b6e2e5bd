"""On-device sampling: greedy, temperature, top-k, top-p, per-request keys (no model needed)."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxinfer.generation import Engine, SamplingParams
from jaxinfer.generation.sampling import request_key, sample

VOCAB = 64
N = 1024  # every call below uses (N, VOCAB) logits so the sampler compiles once
_sample = jax.jit(sample)


def _rows(n, temperature=1.0, top_k=0, top_p=1.0, seeds=None, counts=None):
    seeds = range(n) if seeds is None else seeds
    return (np.full(n, temperature, np.float32), np.full(n, top_k, np.int32), np.full(n, top_p, np.float32),
            np.stack([request_key(s) for s in seeds]), np.arange(n, dtype=np.int32) if counts is None else counts)


def _logits(n, seed=0):
    return np.random.default_rng(seed).normal(size=(n, VOCAB)).astype(np.float32) * 2


def test_greedy_and_top_k_1_are_argmax():
    logits = _logits(N)
    want = logits.argmax(-1)
    np.testing.assert_array_equal(_sample(logits, *_rows(N, temperature=0.0)), want)
    np.testing.assert_array_equal(_sample(logits, *_rows(N, temperature=1.5, top_k=1)), want)
    np.testing.assert_array_equal(_sample(logits, *_rows(N, temperature=1.0, top_p=1e-6)), want)


def test_temperature_draws_differ_from_greedy_and_follow_the_distribution():
    logits = np.full((N, VOCAB), -np.inf, np.float32)
    logits[:, :3] = np.log([0.1, 0.2, 0.7])
    drawn = np.asarray(_sample(logits, *_rows(N, temperature=1.0, seeds=[7] * N)))
    freq = np.bincount(drawn, minlength=VOCAB) / N
    np.testing.assert_allclose(freq[:3], [0.1, 0.2, 0.7], atol=0.05)
    logits = _logits(N)
    assert (np.asarray(_sample(logits, *_rows(N))) != logits.argmax(-1)).any()


def test_top_k_and_top_p_restrict_the_support():
    n = N
    base = np.random.default_rng(3).normal(size=(1, VOCAB)).astype(np.float32)
    logits = np.tile(base, (n, 1))
    order = np.argsort(-base[0])
    top3 = set(order[:3].tolist())
    assert set(np.asarray(_sample(logits, *_rows(n, temperature=2.0, top_k=3, seeds=[1] * n))).tolist()) == top3
    probs = np.exp(base[0] - base[0].max())
    probs /= probs.sum()
    mass = np.cumsum(probs[order])
    nucleus = set(order[: int(np.searchsorted(mass, 0.5) + 1)].tolist())
    got = set(np.asarray(_sample(logits, *_rows(n, top_p=0.5, seeds=[2] * n))).tolist())
    assert got == nucleus


def test_a_rows_draw_depends_only_on_its_key_and_count():
    logits = _logits(N)
    rows = _rows(N, seeds=[5] * N, counts=np.full(N, 3, np.int32))
    neighbours = _rows(N, temperature=0.5, top_k=4, seeds=range(100, 100 + N))
    mixed = tuple(np.concatenate([r[:1], n[1:]]) for r, n in zip(rows, neighbours))
    first = np.asarray(_sample(logits, *rows))[0]
    assert np.asarray(_sample(np.concatenate([logits[:1], _logits(N, seed=1)[1:]]), *mixed))[0] == first
    same_row = np.tile(logits[:1], (N, 1))
    later = _rows(N, seeds=[5] * N, counts=np.full(N, 4, np.int32))
    assert (np.asarray(_sample(same_row, *rows)) != np.asarray(_sample(same_row, *later))).any()


@pytest.mark.parametrize("bad, match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(top_k=-2), "top_k"), (dict(top_p=0.0), "top_p"), (dict(seed=-1), "seed"),
])
def test_sampling_params_problems(bad, match):
    assert any(match in p for p in SamplingParams(**bad).problems())
    assert SamplingParams().problems() == []


def test_seeded_request_is_independent_of_its_neighbours(gpt2):
    """Same seed + prompt -> same tokens, alone or beside other sampled/greedy requests; top_k=1 == greedy."""
    prompt = [11, 22, 33, 44]
    sampled = SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95, seed=42)
    with Engine(gpt2) as engine:
        alone = engine.submit(prompt, sampled).result(timeout=120)
        others = [engine.submit([7] * n, SamplingParams(max_new_tokens=30, temperature=1.3, seed=n))
                  for n in (3, 9, 14)]
        beside = engine.submit(prompt, sampled)
        greedy = engine.submit(prompt, SamplingParams(max_new_tokens=24))
        top1 = engine.submit(prompt, SamplingParams(max_new_tokens=24, temperature=0.7, top_k=1, seed=9))
        assert beside.result(timeout=120) == alone
        assert top1.result(timeout=120) == greedy.result(timeout=120)
        assert alone != greedy.result()
        other_seed = engine.submit(prompt, SamplingParams(**{**sampled.__dict__, "seed": 43})).result(timeout=120)
        assert other_seed != alone
        for s in others:
            s.result(timeout=120)
