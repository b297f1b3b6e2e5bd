"""The fast paths: depthwise as shifted taps, and int8 convolutions/FC split into float32-exact chunks."""

from __future__ import annotations

import numpy as np
import pytest

from .builder import ACT, ModelBuilder
from .harness import compare

RNG = np.random.default_rng(21)
F = np.float32


def _out(size, k, s, d, padding):
    eff = (k - 1) * d + 1
    return -(-size // s) if padding == 0 else -(-(size - eff + 1) // s)


@pytest.mark.parametrize("padding,stride,dilation,mult,k", [
    (0, 1, 1, 1, 3), (1, 2, 1, 1, 3), (0, 2, 2, 2, 3), (1, 1, 2, 3, 2), (0, 3, 1, 1, 5)])
def test_depthwise_float(padding, stride, dilation, mult, k):
    n, size, c = 2, 11, 4
    b = ModelBuilder()
    x = b.input("x", (n, size, size, c))
    w = b.const("w", RNG.standard_normal((1, k, k, c * mult)).astype(F))
    bias = b.const("b", RNG.standard_normal(c * mult).astype(F))
    o = _out(size, k, stride, dilation, padding)
    y = b.tensor("y", (n, o, o, c * mult))
    b.op("DEPTHWISE_CONV_2D", [x, w, bias], [y], "DepthwiseConv2DOptions", padding=padding, stride_w=stride,
         stride_h=stride, depth_multiplier=mult, fused_activation_function=ACT["RELU6"],
         dilation_w_factor=dilation, dilation_h_factor=dilation)
    b.outputs(y)
    compare(b.finish(), {"x": RNG.standard_normal((n, size, size, c)).astype(F)})


@pytest.mark.parametrize("zp_in", [0, -128])
def test_int8_conv_long_reduction(zp_in):
    """3x3x96 terms with |x - zp| up to 255: more than float32 holds exactly in one sum, so the conv is chunked."""
    cin, cout = 96, 8
    b = ModelBuilder()
    x = b.input("x", (1, 6, 6, cin), np.int8, (0.05, zp_in))
    ws = RNG.uniform(0.001, 0.004, cout).astype(F)
    w = b.const("w", RNG.integers(-127, 128, (cout, 3, 3, cin)).astype(np.int8), (ws, np.zeros(cout, np.int64), 0))
    bias = b.const("b", RNG.integers(-1000, 1000, cout).astype(np.int32),
                   ((0.05 * ws).astype(F), np.zeros(cout, np.int64), 0))
    y = b.tensor("y", (1, 6, 6, cout), np.int8, (0.5, 3))
    b.op("CONV_2D", [x, w, bias], [y], "Conv2DOptions", padding=0, stride_w=1, stride_h=1,
         fused_activation_function=0, dilation_w_factor=1, dilation_h_factor=1)
    k = b.const("k", RNG.integers(-127, 128, (5, 6 * 6 * cout)).astype(np.int8), ([0.002], [0]))
    z = b.tensor("z", (1, 5), np.int8, (0.3, -2))
    b.op("FULLY_CONNECTED", [y, k, -1], [z], "FullyConnectedOptions", fused_activation_function=0)
    b.outputs(y, z)
    feeds = {"x": RNG.integers(-128, 128, (1, 6, 6, cin)).astype(np.int8)}
    stats = compare(b.finish(), [feeds], kernels="reference")
    assert all(e == 1.0 for e, _ in stats)
