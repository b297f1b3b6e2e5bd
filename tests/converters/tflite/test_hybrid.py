"""Dynamic-range (hybrid) models: int8 weights, float activations quantized per batch item on the fly.

LiteRT's hybrid kernels quantize each batch row of the input to int8 (symmetric, or
asymmetric when ``asymmetric_quantize_inputs`` / per-channel conv weights), accumulate
in int32 and rescale in float; jaxinfer follows the same steps, so outputs agree to
float rounding (not merely to the weight quantization error).
"""

from __future__ import annotations

import numpy as np
import pytest

from .builder import ACT, ModelBuilder
from .harness import compare

RNG = np.random.default_rng(11)
F = np.float32
#: The jaxinfer hybrid mode that mirrors each LiteRT kernel set.
HYBRID = {"auto": "xnnpack", "builtin": "builtin"}


def int8_weights(shape, channels: int | None, axis: int = 0):
    w = RNG.integers(-127, 128, shape).astype(np.int8)
    if channels is None:
        return w, ([0.013], [0])
    return w, (RNG.uniform(0.005, 0.03, channels).astype(F), np.zeros(channels, np.int64), axis)


def feeds(name, shape, n=3):
    out = [{name: RNG.uniform(-2, 3, shape).astype(F)} for _ in range(n - 1)]
    zero_row = RNG.uniform(-2, 3, shape).astype(F)
    zero_row[0] = 0.0  # an all-zero batch item takes the kernels' zero-input path
    return out + [{name: zero_row}]


@pytest.mark.parametrize("kernels", ["builtin", "auto"])
@pytest.mark.parametrize("asymmetric,per_channel", [(False, False), (True, False), (False, True), (True, True)])
def test_fully_connected_hybrid(asymmetric, per_channel, kernels):
    batch, k, n = 3, 20, 6
    b = ModelBuilder()
    x = b.input("x", (batch, k))
    w, q = int8_weights((n, k), n if per_channel else None)
    ins = [x, b.const("w", w, q), b.const("b", RNG.standard_normal(n).astype(F))]
    y = b.tensor("y", (batch, n))
    b.op("FULLY_CONNECTED", ins, [y], "FullyConnectedOptions", fused_activation_function=ACT["RELU"],
         asymmetric_quantize_inputs=asymmetric)
    b.outputs(y)
    compare(b.finish(), feeds("x", (batch, k)), kernels=kernels, hybrid=HYBRID[kernels])


@pytest.mark.parametrize("kernels", ["builtin", "auto"])
@pytest.mark.parametrize("per_channel,padding,stride", [(False, "SAME", 1), (True, "SAME", 2), (True, "VALID", 1)])
def test_conv_2d_hybrid(per_channel, padding, stride, kernels):
    batch, size, cin, cout = 2, 7, 3, 4
    b = ModelBuilder()
    x = b.input("x", (batch, size, size, cin))
    w, q = int8_weights((cout, 3, 3, cin), cout if per_channel else None)
    ins = [x, b.const("w", w, q), b.const("b", RNG.standard_normal(cout).astype(F))]
    out = -(-size // stride) if padding == "SAME" else (size - 3) // stride + 1
    y = b.tensor("y", (batch, out, out, cout))
    b.op("CONV_2D", ins, [y], "Conv2DOptions", padding={"SAME": 0, "VALID": 1}[padding], stride_w=stride,
         stride_h=stride, fused_activation_function=ACT["RELU6"], dilation_w_factor=1, dilation_h_factor=1)
    b.outputs(y)
    compare(b.finish(), feeds("x", (batch, size, size, cin)), kernels=kernels, hybrid=HYBRID[kernels])


@pytest.mark.parametrize("kernels", ["builtin", "auto"])
def test_depthwise_conv_2d_hybrid(kernels):
    batch, size, c = 2, 6, 4
    b = ModelBuilder()
    x = b.input("x", (batch, size, size, c))
    w, q = int8_weights((1, 3, 3, c), c, axis=3)
    ins = [x, b.const("w", w, q), b.const("b", RNG.standard_normal(c).astype(F))]
    y = b.tensor("y", (batch, size, size, c))
    b.op("DEPTHWISE_CONV_2D", ins, [y], "DepthwiseConv2DOptions", padding=0, stride_w=1, stride_h=1,
         depth_multiplier=1, fused_activation_function=0, dilation_w_factor=1, dilation_h_factor=1)
    b.outputs(y)
    compare(b.finish(), feeds("x", (batch, size, size, c)), kernels=kernels, hybrid=HYBRID[kernels])


def test_load_takes_the_tflite_options():
    import jaxinfer

    b = ModelBuilder()
    x = b.input("x", (2, 8))
    w, q = int8_weights((4, 8), None)
    y = b.tensor("y", (2, 4))
    b.op("FULLY_CONNECTED", [x, b.const("w", w, q)], [y], "FullyConnectedOptions")
    b.outputs(y)
    data = b.finish()
    feed = {"x": RNG.uniform(-2, 3, (2, 8)).astype(F)}
    outs = {mode: jaxinfer.load(data, hybrid=mode).run(feed)["y"] for mode in ("builtin", "xnnpack")}
    assert not np.array_equal(outs["builtin"], outs["xnnpack"])  # symmetric vs asymmetric input rows
    with pytest.raises(ValueError, match="hybrid"):
        jaxinfer.load(data, hybrid="fast")
    with pytest.raises(TypeError, match="optimize"):
        jaxinfer.load(data, optimize=False)
