from __future__ import annotations

import pytest

import jaxinfer
from jaxinfer.quant import fixtures

D, FFN = 128, 512


@pytest.fixture(scope="module")
def encoder():
    """A 2-layer d_model 128 / ffn 512 encoder (the benchmark's model, small)."""
    return jaxinfer.load(fixtures.encoder(D, FFN, layers=2, heads=4).SerializeToString())


@pytest.fixture(scope="module")
def calib():
    return [fixtures.inputs(2, 8, D, seed=s) for s in range(3)]
