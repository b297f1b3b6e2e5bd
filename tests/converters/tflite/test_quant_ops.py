"""Integer (int8/uint8) TFLite kernels vs LiteRT: bit-exact on >= 99.9 % of elements, never more than 1 LSB."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from .builder import ModelBuilder
from .harness import compare

RNG = np.random.default_rng(1)
I8, U8 = np.int8, np.uint8


@pytest.fixture(autouse=True)
def _draws_per_test(request):
    """Each test draws from its own generator, seeded by its id: what a case compares does not depend
    on which other cases ran before it in the same worker."""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def qrand(shape, dtype=I8) -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, shape).astype(dtype)


def build(op, inputs, outputs, options=None, *, rng: np.random.Generator | None = None, **fields):
    """``inputs``: ("in", shape, dtype, q) runtime, ("c", array, q) constant, or None; ``outputs``: (shape, dtype, q).

    Feeds are drawn from ``rng`` (this module's generator by default, so other modules pass their own).
    """
    rng = RNG if rng is None else rng
    b = ModelBuilder()
    idx, feeds = [], {}
    for k, spec in enumerate(inputs):
        if spec is None:
            idx.append(-1)
        elif spec[0] == "in":
            _, shape, dtype, q = spec
            idx.append(b.input(f"in{k}", shape, dtype, q))
            info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else None
            feeds[f"in{k}"] = rng.integers(info.min, info.max + 1, shape).astype(dtype) if info is not None else \
                rng.uniform(-3, 3, shape).astype(dtype)
        else:
            _, value, q = spec
            idx.append(b.const(f"c{k}", value, q))
    outs = [b.tensor(f"out{k}", shape, dtype, q) for k, (shape, dtype, q) in enumerate(outputs)]
    b.op(op, idx, outs, options, **fields)
    b.outputs(*outs)
    return b.finish(), feeds


def _conv_case(dtype, per_channel, depthwise=False, act=0, stride=1, padding=0, cin=3):
    cout = 2 * cin
    zp_in = 5 if dtype == I8 else 130
    qi = (0.05, zp_in)
    qo = (0.17, -3 if dtype == I8 else 120)
    if depthwise:
        wshape = (1, 3, 3, cout)
        ch_axis = 3
    else:
        wshape = (cout, 3, 3, cin)
        ch_axis = 0
    if per_channel:
        ws = RNG.uniform(0.005, 0.03, cout).astype(np.float32)
        qw = (ws, np.zeros(cout, np.int64), ch_axis)
        w = RNG.integers(-127, 128, wshape).astype(I8)
    else:
        ws = np.array([0.02], np.float32)
        qw = (ws, [0] if dtype == I8 else [128])
        w = qrand(wshape, dtype) if dtype == U8 else RNG.integers(-127, 128, wshape).astype(I8)
    bscale = (np.float32(qi[0]) * np.broadcast_to(ws, (cout,))).astype(np.float32)
    bias = RNG.integers(-2000, 2000, cout).astype(np.int32)
    qb = (bscale, np.zeros(cout, np.int64), 0)
    h = 8
    out_h = -(-h // stride) if padding == 0 else (h - 3) // stride + 1
    ins = [("in", (2, h, h, cin), dtype, qi), ("c", w, qw), ("c", bias, qb)]
    outs = [((2, out_h, out_h, cout), dtype, qo)]
    if depthwise:
        return build("DEPTHWISE_CONV_2D", ins, outs, "DepthwiseConv2DOptions", padding=padding, stride_w=stride,
                     stride_h=stride, depth_multiplier=2, fused_activation_function=act, dilation_w_factor=1,
                     dilation_h_factor=1)
    return build("CONV_2D", ins, outs, "Conv2DOptions", padding=padding, stride_w=stride, stride_h=stride,
                 fused_activation_function=act, dilation_w_factor=1, dilation_h_factor=1)


def _fc_case(dtype, per_channel, act=0):
    qi = (0.04, -7 if dtype == I8 else 128)
    qo = (0.3, 4 if dtype == I8 else 100)
    n, k = 16, 24
    if per_channel:
        ws = RNG.uniform(0.005, 0.03, n).astype(np.float32)
        qw = (ws, np.zeros(n, np.int64), 0)
    else:
        ws = np.array([0.015], np.float32)
        qw = (ws, [0] if dtype == I8 else [127])
    w = RNG.integers(-127, 128, (n, k)).astype(I8) if dtype == I8 else qrand((n, k), U8)
    bias = RNG.integers(-3000, 3000, n).astype(np.int32)
    qb = ((np.float32(qi[0]) * np.broadcast_to(ws, (n,))).astype(np.float32), np.zeros(n, np.int64), 0)
    return build("FULLY_CONNECTED", [("in", (5, k), dtype, qi), ("c", w, qw), ("c", bias, qb)],
                 [((5, n), dtype, qo)], "FullyConnectedOptions", fused_activation_function=act)


def _binary(op, options, dtype, qa, qb, qo, act=0, shape_b=(4, 7)):
    fields = {"fused_activation_function": act} if options else {}
    return build(op, [("in", (3, 4, 7), dtype, qa), ("in", shape_b, dtype, qb)], [((3, 4, 7), dtype, qo)],
                 options, **fields)


def _unary(op, dtype, qi, qo, options=None, shape=(4, 64), **fields):
    return build(op, [("in", shape, dtype, qi)], [(shape, dtype, qo)], options, **fields)


CASES = {
    "conv_int8_per_channel": lambda: _conv_case(I8, True),
    "conv_int8_per_channel_relu6_stride2": lambda: _conv_case(I8, True, act=3, stride=2),
    "conv_int8_valid_relu": lambda: _conv_case(I8, True, act=1, padding=1),
    "conv_uint8_per_tensor": lambda: _conv_case(U8, False),
    "conv_int8_per_tensor": lambda: _conv_case(I8, False),
    "depthwise_int8_per_channel": lambda: _conv_case(I8, True, depthwise=True),
    # 10 channels: LiteRT's optimized kernel rounds 8 in SIMD (ties up), 2 in its scalar tail (ties away)
    "depthwise_int8_per_channel_10ch": lambda: _conv_case(I8, True, depthwise=True, cin=5),
    "depthwise_uint8": lambda: _conv_case(U8, False, depthwise=True),
    "depthwise_uint8_relu": lambda: _conv_case(U8, False, depthwise=True, act=1),
    "fc_int8_per_channel": lambda: _fc_case(I8, True),
    "fc_int8_per_tensor_relu": lambda: _fc_case(I8, False, act=1),
    "fc_uint8": lambda: _fc_case(U8, False),
    "add_int8_scales": lambda: _binary("ADD", "AddOptions", I8, (0.05, 3), (0.11, -8), (0.09, 1)),
    "add_int8_relu_bcast": lambda: _binary("ADD", "AddOptions", I8, (0.05, 3), (0.02, -8), (0.04, -128), act=1),
    "add_uint8": lambda: _binary("ADD", "AddOptions", U8, (0.05, 128), (0.07, 120), (0.1, 125)),
    "add_uint8_same_shape": lambda: _binary("ADD", "AddOptions", U8, (0.05, 128), (0.07, 120), (0.1, 125),
                                            shape_b=(3, 4, 7)),
    "add_int8_scalar_bcast": lambda: _binary("ADD", "AddOptions", I8, (0.05, 3), (0.02, -8), (0.04, -12),
                                             shape_b=(3, 4, 1)),
    "sub_int8": lambda: _binary("SUB", "SubOptions", I8, (0.05, 3), (0.11, -8), (0.12, 0)),
    "mul_int8": lambda: _binary("MUL", "MulOptions", I8, (0.05, 3), (0.11, -8), (0.2, 2)),
    "mul_uint8_relu6": lambda: _binary("MUL", "MulOptions", U8, (0.02, 128), (0.03, 110), (0.03, 0), act=3),
    "avg_pool_int8_same": lambda: build("AVERAGE_POOL_2D", [("in", (2, 7, 7, 5), I8, (0.1, 2))],
                                        [((2, 4, 4, 5), I8, (0.1, 2))], "Pool2DOptions", padding=0, stride_w=2,
                                        stride_h=2, filter_width=3, filter_height=3),
    "avg_pool_uint8_valid": lambda: build("AVERAGE_POOL_2D", [("in", (2, 7, 7, 5), U8, (0.1, 128))],
                                          [((2, 3, 3, 5), U8, (0.1, 128))], "Pool2DOptions", padding=1, stride_w=2,
                                          stride_h=2, filter_width=3, filter_height=3),
    "max_pool_int8": lambda: build("MAX_POOL_2D", [("in", (2, 7, 7, 5), I8, (0.1, 2))],
                                   [((2, 4, 4, 5), I8, (0.1, 2))], "Pool2DOptions", padding=0, stride_w=2,
                                   stride_h=2, filter_width=2, filter_height=2, fused_activation_function=1),
    "softmax_int8": lambda: _unary("SOFTMAX", I8, (0.08, 10), (1 / 256, -128), "SoftmaxOptions", beta=1.0),
    "softmax_uint8": lambda: _unary("SOFTMAX", U8, (0.05, 128), (1 / 256, 0), "SoftmaxOptions", beta=1.0),
    "logistic_int8": lambda: _unary("LOGISTIC", I8, (0.06, -5), (1 / 256, -128)),
    "logistic_uint8": lambda: _unary("LOGISTIC", U8, (0.06, 128), (1 / 256, 0)),
    "tanh_int8": lambda: _unary("TANH", I8, (0.03, 4), (1 / 128, 0)),
    "hard_swish_int8": lambda: _unary("HARD_SWISH", I8, (0.05, 4), (0.03, -60)),
    "relu_int8": lambda: _unary("RELU", I8, (0.05, 4), (0.03, -100)),
    "relu6_int8": lambda: _unary("RELU6", I8, (0.05, 4), (0.03, -128)),
    "leaky_relu_int8": lambda: _unary("LEAKY_RELU", I8, (0.05, 4), (0.04, 10), "LeakyReluOptions", alpha=0.2),
    "quantize_float_int8": lambda: build("QUANTIZE", [("in", (4, 50), np.float32, None)], [((4, 50), I8, (0.03, -4))]),
    "quantize_float_uint8": lambda: build("QUANTIZE", [("in", (4, 50), np.float32, None)],
                                          [((4, 50), U8, (0.03, 128))]),
    "quantize_requant_int8": lambda: build("QUANTIZE", [("in", (4, 50), I8, (0.03, -4))], [((4, 50), I8, (0.05, 7))]),
    "quantize_uint8_to_int8": lambda: build("QUANTIZE", [("in", (4, 50), U8, (0.03, 128))],
                                            [((4, 50), I8, (0.03, 0))]),
    "reshape_int8": lambda: build("RESHAPE", [("in", (2, 3, 4), I8, (0.1, 3)), ("c", np.array([6, 4], np.int32), None)],
                                  [((6, 4), I8, (0.1, 3))]),
    "concat_uint8_rescale": lambda: build("CONCATENATION", [("in", (2, 3), U8, (0.1, 3)), ("in", (2, 5), U8, (0.05, 200))],
                                          [((2, 8), U8, (0.08, 1))], "ConcatenationOptions", axis=1),
    "concat_uint8_same": lambda: build("CONCATENATION", [("in", (2, 3), U8, (0.1, 3)), ("in", (2, 5), U8, (0.1, 3))],
                                       [((2, 8), U8, (0.1, 3))], "ConcatenationOptions", axis=1),
    "mean_int8": lambda: build("MEAN", [("in", (2, 5, 5, 8), I8, (0.1, 3)), ("c", np.array([1, 2], np.int32), None)],
                               [((2, 1, 1, 8), I8, (0.07, -1))], "ReducerOptions", keep_dims=True),
    "mean_int8_same_q": lambda: build("MEAN", [("in", (2, 5, 5, 8), I8, (0.1, 3)),
                                               ("c", np.array([1, 2], np.int32), None)],
                                      [((2, 8), I8, (0.1, 3))], "ReducerOptions", keep_dims=False),
}


def _dequant_case():
    return build("DEQUANTIZE", [("in", (4, 50), I8, (0.03, -4))], [((4, 50), np.float32, None)])


#: (case, kernels) pairs known to differ from LiteRT by 1 LSB on more than 0.1 % of elements (none today).
KNOWN_GAPS: dict[tuple[str, str], str] = {}


@pytest.mark.parametrize("kernels", ["builtin", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_quantized_op(case, kernels):
    """Bit-exact (>= 99.9 %, <= 1 LSB) vs LiteRT's builtin kernels and its reference kernels, two calls each.

    Each kernel set is compared with the matching ``requant`` rounding (ruy rounds ties up).
    """
    data, feeds = CASES[case]()
    gap = KNOWN_GAPS.get((case, kernels))
    compare(data, [feeds, {k: v[::-1].copy() for k, v in feeds.items()}], kernels=kernels,
            min_exact=0.0 if gap else 0.999,  # known gaps must still stay within 1 LSB
            requant="builtin" if kernels == "builtin" else "reference")


#: The conv/FC cases, whose requantization differs between LiteRT's kernel sets (ops/nn.py ``requant_rule``).
CONV_FC_CASES = sorted(c for c in CASES if c.startswith(("conv_", "depthwise_", "fc_")))
#: Draws per conv/FC case in the sweep below (the case test above draws one per test id).
SWEEP_SEEDS = 4


@pytest.mark.parametrize("kernels", ["builtin", "reference"])
@pytest.mark.parametrize("case", CONV_FC_CASES)
def test_conv_fc_bit_exact_over_seeds(case, kernels):
    """Each conv/FC case over several draws of weights, bias and inputs: every element bit-exact.

    A 1-LSB rounding difference shows on a few elements of some draws only (ties, rare in Q31
    arithmetic), so one draw per case cannot catch it; seeds derived from the case name keep
    the draws fixed.
    """
    global RNG
    base = zlib.crc32(f"{case}-sweep".encode())
    for seed in range(SWEEP_SEEDS):
        RNG = np.random.default_rng(base + seed)
        data, feeds = CASES[case]()
        stats = compare(data, [feeds, {k: v[::-1].copy() for k, v in feeds.items()}], kernels=kernels,
                        requant=kernels)
        assert stats == [(1.0, 0)] * 2, (seed, stats)


def _every_accumulator(op, dtype, per_channel, scales):
    """A 1x1 conv / FC / depthwise whose accumulators (x - zp) * 1 + bias cover every value that lands
    inside the output range: 256 inputs times one channel per 256 consecutive bias values."""
    si, sw, so = (float(np.float32(v)) for v in scales)
    info = np.iinfo(dtype)
    zx, zw, zo = (0, 0, 0) if dtype == I8 else (128, 127, 128)
    m = si * sw / so
    lo = int(np.floor((info.min - zo - 1) / m))
    nch = (int(np.ceil((info.max - zo + 1) / m)) - lo + 256) // 256
    bias = (lo + 128 + 256 * np.arange(nch)).astype(np.int32)
    x = np.arange(info.min, info.max + 1).astype(dtype)
    w = np.full(nch, zw + 1).astype(dtype)
    axis = 3 if op == "DEPTHWISE_CONV_2D" else 0
    qw = (np.full(nch, sw, np.float32), np.zeros(nch, np.int64), axis) if per_channel else ([sw], [zw])
    qb = (np.full(nch, np.float32(si) * np.float32(sw), np.float32), np.zeros(nch, np.int64), 0)
    if op == "FULLY_CONNECTED":
        ins = [("in", (256, 1), dtype, (si, zx)), ("c", w.reshape(nch, 1), qw), ("c", bias, qb)]
        data, _ = build(op, ins, [((256, nch), dtype, (so, zo))], "FullyConnectedOptions")
        return data, {"in0": x.reshape(256, 1)}
    conv = {"padding": 1, "stride_w": 1, "stride_h": 1, "dilation_w_factor": 1, "dilation_h_factor": 1}
    if op == "CONV_2D":
        ins = [("in", (1, 16, 16, 1), dtype, (si, zx)), ("c", w.reshape(nch, 1, 1, 1), qw), ("c", bias, qb)]
        data, _ = build(op, ins, [((1, 16, 16, nch), dtype, (so, zo))], "Conv2DOptions", **conv)
        return data, {"in0": x.reshape(1, 16, 16, 1)}
    ins = [("in", (1, 16, 16, nch), dtype, (si, zx)), ("c", w.reshape(1, 1, 1, nch), qw), ("c", bias, qb)]
    data, _ = build(op, ins, [((1, 16, 16, nch), dtype, (so, zo))], "DepthwiseConv2DOptions", depth_multiplier=1,
                    **conv)
    return data, {"in0": np.repeat(x.reshape(1, 16, 16, 1), nch, axis=3)}


#: Scales whose multiplier is exactly 2**-7, so every odd accumulator is a tie for some rounding step;
#: and two sets where the float32 input * filter scale product gives another multiplier than the float64
#: one (as a Q31 multiplier: LEGACY_SCALES, 1-2 of ~600k outputs tell them apart; as a float64 real:
#: PRODUCT_SCALES, 24 of 92k outputs).
TIE_SCALES = (0.0625, 0.0625, 0.5)
LEGACY_SCALES = (0.010465528815984726, 0.019678421318531036, 0.4799436032772064)
PRODUCT_SCALES = (0.09631737321615219, 0.010745445266366005, 0.37033218145370483)


@pytest.mark.parametrize("kernels", ["builtin", "reference"])
@pytest.mark.parametrize("op,dtype,per_channel,scales", [
    ("FULLY_CONNECTED", U8, False, TIE_SCALES), ("FULLY_CONNECTED", U8, False, LEGACY_SCALES),
    ("FULLY_CONNECTED", I8, False, PRODUCT_SCALES), ("FULLY_CONNECTED", I8, True, TIE_SCALES),
    ("CONV_2D", U8, False, TIE_SCALES), ("CONV_2D", U8, False, LEGACY_SCALES), ("CONV_2D", I8, False, TIE_SCALES),
    ("CONV_2D", I8, True, LEGACY_SCALES), ("DEPTHWISE_CONV_2D", U8, False, TIE_SCALES),
    ("DEPTHWISE_CONV_2D", U8, False, LEGACY_SCALES), ("DEPTHWISE_CONV_2D", I8, True, TIE_SCALES)])
def test_requantization_every_accumulator(op, dtype, per_channel, scales, kernels):
    """Every accumulator in the output range through each kernel set's requantization, bit-exact."""
    data, feeds = _every_accumulator(op, dtype, per_channel, scales)
    assert compare(data, feeds, kernels=kernels, requant=kernels) == [(1.0, 0)]


@pytest.mark.parametrize("dtype,qa,qb,qo", [(U8, (0.05, 128), (0.07, 120), (0.1, 125)),
                                             (I8, (0.05, 3), (0.02, -8), (0.04, -12))])
@pytest.mark.parametrize("shape_a,shape_b", [((100,), (100,)), ((2, 3, 5, 33), (33,)), ((5, 6, 9), (5, 6, 1)),
                                             ((6, 40), (1,)), ((2, 3, 5, 17), (1, 3, 1, 17))])
def test_add_builtin_vector_lanes(dtype, qa, qb, qo, shape_a, shape_b):
    """8-bit ADD vs LiteRT's optimized kernel over its broadcast paths (elementwise runs, scalar
    broadcast, generic): vector lanes and scalar tails, every element bit-exact."""
    data, _ = build("ADD", [("in", shape_a, dtype, qa), ("in", shape_b, dtype, qb)],
                    [(np.broadcast_shapes(shape_a, shape_b), dtype, qo)], "AddOptions", fused_activation_function=0)
    info = np.iinfo(dtype)
    steps = [{"in0": RNG.integers(info.min, info.max + 1, shape_a).astype(dtype),
              "in1": RNG.integers(info.min, info.max + 1, shape_b).astype(dtype)} for _ in range(4)]
    assert compare(data, steps, kernels="builtin", requant="builtin") == [(1.0, 0)] * 4


def test_dequantize():
    data, feeds = _dequant_case()
    compare(data, feeds, rtol=0, atol=0)
