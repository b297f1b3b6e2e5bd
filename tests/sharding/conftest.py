"""Fixture models for the sharding tests, built at test time (tests/fixtures/sharding/models.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "fixtures" / "sharding" / "models.py"


def fixture_models():
    spec = importlib.util.spec_from_file_location("jaxinfer_sharding_fixture_models", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _eight_devices():
    """The sharding tests lay meshes over 8 devices of JAX's default backend: CI's 8 simulated CPU
    devices; a host with one GPU has one, and these tests skip there."""
    import jax

    if jax.device_count() < 8:
        pytest.skip(f"needs 8 devices of JAX's default backend; this host has {jax.device_count()} "
                    f"({jax.default_backend()})")


@pytest.fixture(scope="session")
def fm():
    return fixture_models()


@pytest.fixture(scope="session")
def gpt2(fm):
    import jaxinfer

    return jaxinfer.load(fm.gpt2_like(layers=2, d=128, heads=8, vocab=512, seq=8))


@pytest.fixture(scope="session")
def gpt2_feeds():
    return {"input_ids": np.random.RandomState(0).randint(0, 512, (8, 8)).astype(np.int64)}


@pytest.fixture(scope="session")
def gpt2_ref(gpt2, gpt2_feeds):
    return gpt2.run(gpt2_feeds)
