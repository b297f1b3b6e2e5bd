"""Exhaustive 8-bit checks: every input value of quantized HARD_SWISH vs LiteRT's three kernel sets."""

from __future__ import annotations

import numpy as np
import pytest

from .builder import ModelBuilder
from .harness import compare

PARAMS = [
    (np.int8, (0.05, 4), (0.03, -60)),
    (np.uint8, (0.04, 130), (0.025, 20)),
    (np.int8, (0.1, -10), (0.05, -100)),
    (np.int8, (0.02, 0), (0.1, 0)),
]


@pytest.mark.parametrize("kernels", ["auto", "builtin", "reference"])
@pytest.mark.parametrize("k", range(len(PARAMS)))
def test_hard_swish_all_values_bit_exact(k, kernels):
    dt, qi, qo = PARAMS[k]
    b = ModelBuilder()
    x = b.input("x", (256,), dt, qi)
    y = b.tensor("y", (256,), dt, qo)
    b.op("HARD_SWISH", [x], [y])
    b.outputs(y)
    info = np.iinfo(dt)
    stats = compare(b.finish(), {"x": np.arange(info.min, info.max + 1).astype(dt)}, kernels=kernels)
    assert stats == [(1.0, 0)]
