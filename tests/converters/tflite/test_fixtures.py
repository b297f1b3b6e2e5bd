"""The committed fixtures (tests/fixtures/tflite/*.tflite) through ``jaxinfer.load(path)`` vs LiteRT, 3 calls each."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import jaxinfer

from .harness import litert_steps, quant_stats

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "tflite"
NAMES = ["conv_f32", "conv_int8", "hybrid_mlp", "lstm_stream"]
#: Full-integer models follow TFLite's reference integer arithmetic, which LiteRT's builtin kernels
#: implement; its XNNPACK delegate requantizes in float32 (1-LSB differences that grow layer by layer).
KERNELS = {"conv_int8": "builtin"}


def _feeds(model, rng):
    out = {}
    for inp in model.inputs:
        shape = tuple(inp.shape)
        if np.dtype(inp.dtype).kind == "i":
            out[inp.name] = rng.integers(-128, 128, shape).astype(inp.dtype)
        else:
            out[inp.name] = rng.uniform(-1, 1, shape).astype(inp.dtype)
    return out


@pytest.mark.parametrize("name", NAMES)
def test_fixture_matches_litert(name):
    path = FIXTURES / f"{name}.tflite"
    model = jaxinfer.load(str(path))
    rng = np.random.default_rng(0)
    steps = [_feeds(model, rng) for _ in range(3)]
    refs = litert_steps(path.read_bytes(), steps, KERNELS.get(name, "auto"))
    for i, (feeds, ref) in enumerate(zip(steps, refs)):
        ours = model.run(feeds)
        for (out_name, got), want in zip(ours.items(), ref.values()):
            got = np.asarray(got)
            assert got.shape == want.shape and got.dtype == want.dtype
            if want.dtype.kind == "i":
                exact, lsb = quant_stats(got, want)
                assert exact >= 0.999 and lsb <= 1, f"step {i} {out_name}: {exact:.4%} exact, {lsb} LSB"
            else:
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"step {i} {out_name}")
