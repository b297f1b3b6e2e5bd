"""Shared decoders for the generation tests: each fixture is loaded and compiled once per session.

Compiles dominate these tests' time, so every test that can reuses the session's Decoders (their
executables are also shared, per Model, with any other Decoder of the same geometry).
"""

from __future__ import annotations

from pathlib import Path

import pytest

import jaxinfer
from jaxinfer.generation import Decoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "decoders"
DECODER_FILES = ("gpt2_tiny.onnx", "llama_tiny.onnx", "llama_gqa_contrib.onnx")
MAX_LEN = 128
SLOTS = 4
BUCKETS = (8, 16)  # GPT-2: two buckets, to exercise bucketing; the Llama fixtures: one, to save compiles


def fixture_path(name: str) -> str:
    return str(FIXTURES / name)


@pytest.fixture(scope="session")
def models() -> dict[str, jaxinfer.Model]:
    return {}


@pytest.fixture(scope="session")
def decoders(models) -> dict[str, Decoder]:
    """name -> Decoder(slots=4, max_len=128), built on first use."""
    return _LazyDecoders(models)


class _LazyDecoders(dict):
    def __init__(self, models: dict[str, jaxinfer.Model]):
        super().__init__()
        self._models = models

    def __missing__(self, name: str) -> Decoder:
        model = self._models.setdefault(name, jaxinfer.load(fixture_path(name)))
        buckets = BUCKETS if name.startswith("gpt2") else BUCKETS[-1:]
        dec = Decoder(model, slots=SLOTS, max_len=MAX_LEN, prefill_buckets=buckets)
        self[name] = dec
        return dec


@pytest.fixture(scope="session")
def gpt2(decoders) -> Decoder:
    """The GPT-2 fixture's Decoder, warmed up (both buckets and the decode step compiled)."""
    dec = decoders["gpt2_tiny.onnx"]
    dec.warmup()
    return dec
