"""fp16-weight models (float16 constants + DEQUANTIZE) and STABLEHLO_COMPOSITE through its decomposition, vs LiteRT."""

from __future__ import annotations

import numpy as np
import pytest
from flatbuffers import flexbuffers

from jaxinfer.converters.tflite import load_tflite

from .builder import ACT, ModelBuilder
from .harness import compare

RNG = np.random.default_rng(3)
F, H = np.float32, np.float16


def fp16_const(b: ModelBuilder, name: str, value: np.ndarray) -> int:
    """A float16 constant and the DEQUANTIZE that widens it to float32 (what the fp16 converter emits)."""
    half = b.const(name + "_fp16", value.astype(H))
    full = b.tensor(name, value.shape)
    b.op("DEQUANTIZE", [half], [full])
    return full


@pytest.mark.parametrize("kernels", ["auto", "builtin"])
def test_fp16_conv_fc(kernels):
    b = ModelBuilder()
    x = b.input("x", (2, 6, 6, 3))
    w = fp16_const(b, "w", RNG.standard_normal((4, 3, 3, 3)).astype(F) * 0.3)
    bias = fp16_const(b, "b", RNG.standard_normal(4).astype(F))
    y = b.tensor("y", (2, 6, 6, 4))
    b.op("CONV_2D", [x, w, bias], [y], "Conv2DOptions", padding=0, stride_w=1, stride_h=1,
         fused_activation_function=ACT["RELU"], dilation_w_factor=1, dilation_h_factor=1)
    fw = fp16_const(b, "fw", RNG.standard_normal((5, 144)).astype(F) * 0.1)
    z = b.tensor("z", (2, 5))
    b.op("FULLY_CONNECTED", [y, fw, -1], [z], "FullyConnectedOptions", fused_activation_function=0)
    b.outputs(z)
    data = b.finish()
    compare(data, [{"x": RNG.standard_normal((2, 6, 6, 3)).astype(F)} for _ in range(2)], kernels=kernels)
    # the stored constants really are float16
    assert any(v.dtype == np.float16 for v in load_tflite(data).graph.initializers.values())


def _rms_norm_composite(decomposition: bool = True) -> bytes:
    """y = composite 'odml.rms_norm'(x, gamma) whose decomposition is x * rsqrt(mean(x^2) + eps) * gamma."""
    b = ModelBuilder()
    x = b.input("x", (2, 8))
    gamma = b.const("gamma", (1.0 + 0.1 * RNG.standard_normal(8)).astype(F))
    y = b.tensor("y", (2, 8))
    sub = b.subgraph("rms_norm_decomposition")
    dx = b.input("dx", (2, 8))
    dg = b.input("dg", (8,))
    sq = b.tensor("sq", (2, 8))
    b.op("MUL", [dx, dx], [sq], "MulOptions", fused_activation_function=0)
    axis = b.const("axis", np.array([1], np.int32))
    ms = b.tensor("ms", (2, 1))
    b.op("MEAN", [sq, axis], [ms], "ReducerOptions", keep_dims=True)
    eps = b.const("eps", np.array(1e-6, F))
    mse = b.tensor("mse", (2, 1))
    b.op("ADD", [ms, eps], [mse], "AddOptions", fused_activation_function=0)
    r = b.tensor("r", (2, 1))
    b.op("RSQRT", [mse], [r])
    xn = b.tensor("xn", (2, 8))
    b.op("MUL", [dx, r], [xn], "MulOptions", fused_activation_function=0)
    dy = b.tensor("dy", (2, 8))
    b.op("MUL", [xn, dg], [dy], "MulOptions", fused_activation_function=0)
    b.outputs(dy)
    b.use(0)
    b.op("STABLEHLO_COMPOSITE", [x, gamma], [y], "StableHLOCompositeOptions", name="odml.rms_norm",
         decomposition_subgraph_index=sub, composite_attributes=flexbuffers.Dumps({"epsilon": 1e-6}),
         composite_attributes_format=1, version=1)
    b.outputs(y)
    return b.finish()


def test_stablehlo_composite_decomposition():
    compare(_rms_norm_composite(), [{"x": RNG.standard_normal((2, 8)).astype(F)} for _ in range(2)])
