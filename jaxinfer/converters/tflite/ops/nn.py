"""Convolution, fully connected, matmul and pooling builtins (NHWC), float and int8/uint8."""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from jax import lax

from .... import arith, cpu_kernels, intmath
from ....conv_lowering import (conv_general_dilated, depthwise_taps, f32_depthwise_takes, f32_kernel_takes,
                               reduce_window)
from ....intmath import exact_conv, exact_dot, zp_conv, zp_matmul
from ....registry import OpDef, registrar
from .. import quant as Q
from ._util import CLAMPS, QList, fused, is_quantized, qat

OPS: list[OpDef] = []
op = registrar(OPS, domain="tflite")


#: LiteRT's optimized int8 DEPTHWISE_CONV_2D requantizes this many output channels at a time with
#: SIMD code that rounds ties up; the remaining (depth % 8) channels take a scalar loop, ties away.
_DEPTHWISE_SIMD_CHANNELS = 8


@dataclass(frozen=True)
class Requant:
    """How one LiteRT kernel turns an 8-bit conv/FC accumulator into the output (measured on x86-64).

    ``float32_product``: the real multiplier is ``double(float32(input_scale * filter_scale)) /
    output_scale`` (TFLite's GetQuantizedConvolutionMultipler, used for the one multiplier of
    uint8 convs and per-tensor FCs) rather than the float64 product (its per-channel multipliers).
    ``rounding`` and ``simd_block``: as :func:`~..quant.requantize` takes them.
    """

    float32_product: bool = False
    rounding: str = "double"
    simd_block: int = 0


def requant_rule(op_type: str, quant_kernel: str, qi: Q.QParams, qw: Q.QParams) -> Requant:
    """The requantization LiteRT's ``quant_kernel`` kernels apply to an 8-bit ``op_type``.

    * FULLY_CONNECTED: the reference kernels round ``double(acc) * real`` half away from zero
      (:func:`~..quant.multiply_by_real_float64`); the builtin ones run ruy, whose rescale
      rounds its final shift ties up, with the float32-product multiplier unless per channel.
    * CONV_2D: builtin on ruy (ties up), reference MultiplyByQuantizedMultiplier (ties away);
      uint8 with the float32-product multiplier.
    * DEPTHWISE_CONV_2D: ties away, uint8 with the float32-product multiplier; the builtin int8
      kernel rounds ties up on the channels its SIMD loop covers.

    ``"xnnpack"`` follows the reference kernels (XNNPACK's own float32 requantization is not
    modelled).
    """
    Q.check_kernel(quant_kernel)
    builtin = quant_kernel == "builtin"
    uint8 = np.dtype(qi.dtype) == np.uint8
    if op_type == "FULLY_CONNECTED":
        return Requant(not qw.per_axis, "ties_up") if builtin else Requant(False, "float64")
    if op_type == "CONV_2D":
        return Requant(uint8, "ties_up" if builtin else "double")
    return Requant(uint8, "double", _DEPTHWISE_SIMD_CHANNELS if builtin and not uint8 else 0)


def _per_channel_multiplier(qi: Q.QParams, qw: Q.QParams, qo: Q.QParams, channels: int,
                            float32_product: bool = False) -> np.ndarray:
    """input_scale * filter_scale[c] / output_scale in float64, one per output channel.

    ``float32_product``: the product is formed in float32 first (see :class:`Requant`).
    """
    ws = np.broadcast_to(qw.scale.astype(np.float32), (channels,)) if qw.scale.size == 1 else qw.scale
    if float32_product:
        prod = (np.float32(qi.scale[0]) * ws.astype(np.float32)).astype(np.float64)
        return prod / float(qo.s)
    return float(qi.s) * ws.astype(np.float64) / float(qo.s)


def _zp(q: Q.QParams, shape: tuple[int, ...] = ()) -> np.ndarray | None:
    """``q``'s zero point for :func:`zp_matmul`: None when zero, a scalar when uniform, else ``shape``."""
    zp = np.asarray(q.zero_point, np.int32).reshape(-1)
    if not np.any(zp):
        return None
    if np.all(zp == zp[0]):
        return np.int32(zp[0])
    if not shape:
        raise ValueError("per-axis zero points are not supported here")
    return zp.reshape(shape)


def _offset(x, q: Q.QParams, axis: int | None = None):
    """Integer tensor minus its zero point (per ``axis`` when per-axis), as int32."""
    shape = () if axis is None else tuple(q.zero_point.size if i == axis else 1 for i in range(x.ndim))
    zp = _zp(q, shape)
    x = jnp.asarray(x, jnp.int32)
    return x if zp is None else x - zp


def _finish(acc, bias, in_q, out_q, w_channels: int, act: str, rule: Requant = Requant(),
            wide_rounding: str = "int64"):
    """Add the bias, requantize per channel (last axis) as ``rule`` says, clamp to the fused activation.

    8-bit kernels accumulate in int32 with an int32 bias. 16x8 kernels (int16 activations,
    int8 weights) accumulate in int64 when the bias is int64 (or absent) and rescale with
    ``wide_rounding`` (see :func:`~..quant.requantize`); with an int32 bias TFLite keeps an
    int32 accumulator and ``rule.rounding``.
    """
    qi, qw, qo = in_q[0], in_q[1], out_q[0]
    wide = _is_16x8(qi) and (bias is None or jnp.result_type(bias) == jnp.int64)
    acc_t = jnp.int64 if wide else jnp.int32  # int32: C's wrap-around addition, and no int64 lanes
    acc = acc.astype(acc_t)
    if bias is not None:
        acc = acc + jnp.asarray(bias).astype(acc_t)
    mult = _per_channel_multiplier(qi, qw, qo, w_channels, rule.float32_product)
    return Q.requantize(acc, mult, qo, Q.activation_range(act, qo), channel_axis=-1,
                        rounding=wide_rounding if wide else rule.rounding, simd_block=rule.simd_block)


def _kernel_stage(x, in_q, out_q, channels: int, act: str, rule: Requant) -> cpu_kernels.OutputStage | None:
    """The output stage with which our int8 CPU kernels finish this layer in the same call (sums, bias, the
    rescale and the activation clamp: :func:`_finish`'s numbers), or None where they do not: activations not
    int8 in and out, a rescale other than the Q31 one, weight zero points, a CPU without the AVX-512 VNNI
    kernels."""
    qi, qw, qo = in_q[0], in_q[1], out_q[0]
    if not (np.dtype(qi.dtype) == np.dtype(qo.dtype) == np.int8 and jnp.result_type(x) == jnp.int8):
        return None
    if rule.rounding not in ("double", "ties_up") or _zp(qw) is not None or qi.zero_point.size != 1:
        return None
    if not (cpu_kernels.available() and cpu_kernels.isa() == 2):
        return None
    mult, shift = Q.quantize_multipliers(_per_channel_multiplier(qi, qw, qo, channels, rule.float32_product))
    if rule.rounding == "ties_up":
        away = np.zeros(channels, bool)
    else:
        away = Q.simd_ties_away(channels, rule.simd_block) if rule.simd_block else np.ones(channels, bool)
    lo, hi = Q.activation_range(act, qo)
    stage = cpu_kernels.OutputStage(mult, shift, away, int(qo.zp), lo, hi)
    return stage if stage.fits(channels) else None


def _window_pads(x_shape, kernel: tuple[int, int], stride, dilation, padding: str) -> tuple[tuple[int, int], ...]:
    """((top, bottom), (left, right)) padding of an NHWC input, TFLite/XLA style."""
    return tuple(_same_pads(x_shape[1 + i], kernel[i], stride[i], dilation[i], padding)[:2] for i in range(2))


def _rule(op_type: str, quant_kernel: str, in_q) -> Requant:
    """The 8-bit requantization rule; 16x8 kernels keep the defaults (their own roundings)."""
    return Requant() if _is_16x8(in_q[0]) else requant_rule(op_type, quant_kernel, in_q[0], in_q[1])


def _is_16x8(q: Q.QParams) -> bool:
    """int16 activations (with int8 weights): TFLite's "16x8" quantization."""
    return np.dtype(q.dtype) == np.int16


def _acc_dtype(q: Q.QParams):
    """Accumulator for products with activations quantized as ``q``: int64 for int16 activations."""
    return jnp.int64 if _is_16x8(q) else jnp.int32


def qrange(q: Q.QParams) -> int:
    """Largest |value - zero_point| of an integer tensor with these params."""
    zp = np.asarray(q.zero_point, np.int64)
    return int(max(np.max(np.abs(q.qmin - zp)), np.max(np.abs(q.qmax - zp))))


def _conv(x, w, stride, dilation, padding, groups, bound: int = 255 * 255, acc_dtype=jnp.int32):
    """NHWC x OHWI convolution; integer operands (|x * w| <= bound) go through :func:`exact_conv`."""
    dn = ("NHWC", "OHWI", "NHWC")
    if groups > 1 and groups == x.shape[-1] and w.shape[3] == 1:
        return _depthwise_taps(x, w, stride, dilation, padding, acc_dtype)
    if not jnp.issubdtype(x.dtype, jnp.integer):
        return conv_general_dilated(x, w.astype(x.dtype), window_strides=stride, padding=padding,
                                    rhs_dilation=dilation, dimension_numbers=dn, feature_group_count=groups)
    return exact_conv(x, w, stride, padding, bound=bound, dimension_numbers=dn, rhs_dilation=dilation,
                      feature_group_count=groups, acc_dtype=acc_dtype)


def _same_pads(size: int, k: int, s: int, d: int, padding: str) -> tuple[int, int, int]:
    """(pad_lo, pad_hi, out_size) of one spatial dim, TFLite/XLA style (SAME puts the extra pad after)."""
    eff = (k - 1) * d + 1
    if padding == "VALID":
        return 0, 0, max(-(-(size - eff + 1) // s), 0)
    out = -(-size // s)
    total = max((out - 1) * s + eff - size, 0)
    return total // 2, total - total // 2, out


def _depthwise_taps(x, w, stride, dilation, padding, int_acc=jnp.int32):
    """Depthwise convolution as a sum of kh*kw shifted, strided slices times per-channel taps.

    ``w`` is OHWI with I = 1 (output channel c*M+m reads input channel c). XLA's CPU grouped
    convolution is an order of magnitude slower than this one fused elementwise loop.
    Integer operands accumulate in ``int_acc`` (exact); float ones in their own dtype.
    """
    c = x.shape[-1]
    mult = w.shape[0] // c
    if mult > 1:
        x = jnp.repeat(x, mult, axis=-1)
    kh, kw = w.shape[1], w.shape[2]
    (sh, sw), (dh, dw) = stride, dilation
    ph = _same_pads(x.shape[1], kh, sh, dh, padding)
    pw = _same_pads(x.shape[2], kw, sw, dw, padding)
    acc_t = int_acc if jnp.issubdtype(x.dtype, jnp.integer) else x.dtype
    x = jnp.pad(x.astype(acc_t), ((0, 0), ph[:2], pw[:2], (0, 0)))
    taps = jnp.transpose(w[..., 0], (1, 2, 0)).astype(acc_t).reshape(kh * kw, -1)  # [kh*kw, C*M]
    return depthwise_taps(x, taps, (kh, kw), (sh, sw), (dh, dw))


def _hybrid_weight(w, qw: Q.QParams | None, x):
    """Dynamic-range/fp16 weights under float activations: dequantize the weight."""
    if qw is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating):
        return Q.dequantize(w, qw)
    return w


def _is_hybrid(x, w, qw: Q.QParams | None) -> bool:
    """Float activations with int8 weights (a dynamic-range model): LiteRT quantizes inputs on the fly."""
    return (qw is not None and jnp.issubdtype(jnp.result_type(x), jnp.floating)
            and jnp.result_type(w) == jnp.int8)


def _distinct_scales(q: Q.QParams) -> bool:
    return q.scale.size > 1 and bool(np.any(q.scale != q.scale[0]))


def _hybrid_conv(x, w, bias, qw: Q.QParams, stride, dil, padding, groups, asymmetric: bool, act: str, channels: int):
    """Dynamic-range convolution: each batch item quantized to int8 (one scale), int32 accumulation, float rescale.

    Per-tensor weights: symmetric input quantization, ``acc * (input_scale * filter_scale) + bias``.
    Per-channel weights (or depthwise): asymmetric, ``acc * filter_scale[c] * input_scale + bias``.
    """
    batch = x.shape[0]
    q, sf, off = Q.dynamic_quantize_rows(jnp.reshape(x, (batch, -1)), asymmetric)
    shifted = jnp.reshape(q.astype(jnp.int32) - off[:, None], x.shape)
    acc = _conv(shifted, jnp.asarray(w, jnp.int32), stride, dil, padding, groups,
                bound=(255 if asymmetric else 127) * qrange(qw))
    ws = np.broadcast_to(qw.scale.astype(np.float32), (channels,))
    accf = acc.astype(jnp.float32)
    if asymmetric:
        y = accf * jnp.asarray(ws) * sf[:, None, None, None]
    else:
        y = accf * (sf * jnp.float32(qw.scale[0]))[:, None, None, None]
    if bias is not None:
        y = y + jnp.asarray(bias, jnp.float32)
    return fused(y, act)


@op("CONV_2D")
def conv_2d(x, w, bias=None, *, padding: str = "SAME", stride_w: int = 1, stride_h: int = 1,
            fused_activation_function: str = "NONE", dilation_w_factor: int = 1, dilation_h_factor: int = 1,
            quantized_bias_type: int = 0, hybrid_asymmetric: bool = False, quant_kernel: str = "reference",
            requant_rounding: str | None = None, in_q: QList = None, out_q: QList = None):
    """2-D convolution, input NHWC, filter OHWI; int8 per-channel or uint8 per-tensor when quantized.

    ``quant_kernel``: the LiteRT kernel set whose 8-bit requantization to follow (:func:`requant_rule`).
    ``requant_rounding``: the attribute graphs saved by earlier versions carry ("ties_up" meant the
    builtin kernels); read so that such saved models still load.
    """
    if requant_rounding == "ties_up":
        quant_kernel = "builtin"
    groups = x.shape[-1] // w.shape[-1]
    stride, dil = (stride_h, stride_w), (dilation_h_factor, dilation_w_factor)
    if is_quantized(in_q, out_q):
        bound = qrange(in_q[0]) * qrange(in_q[1])
        rule = _rule("CONV_2D", quant_kernel, in_q)

        def patch_product(x, x_zp, w, bias):  # 8-bit: our CPU kernel's patch product where it pays
            acc = zp_conv(x, x_zp, w, _zp(in_q[1], (w.shape[0], 1, 1, 1)), stride, padding, bound=bound,
                          dimension_numbers=("NHWC", "OHWI", "NHWC"), rhs_dilation=dil)
            return _finish(acc, bias, in_q, out_q, w.shape[0], fused_activation_function, rule)

        if groups == 1 and not _is_16x8(in_q[0]):
            stage = _kernel_stage(x, in_q, out_q, w.shape[0], fused_activation_function, rule)
            if stage is None:
                return patch_product(x, _zp(in_q[0]), w, bias)
            pads = _window_pads(x.shape, w.shape[1:3], stride, dil, padding)
            return cpu_kernels.int8_conv_requant(x, jnp.int32(_zp(in_q[0]) or 0), w, bias, stage, stride, dil, pads,
                                                 patch_product)
        acc = _conv(_offset(x, in_q[0]), _offset(w, in_q[1], axis=0), stride, dil, padding, groups, bound=bound,
                    acc_dtype=_acc_dtype(in_q[0]))
        return _finish(acc, bias, in_q, out_q, w.shape[0], fused_activation_function, rule)
    if arith.is_quantized(w):  # jaxinfer.quantize's int8 weight (per output channel)
        y = arith.conv(x, w, stride, padding, rhs_dilation=dil, dimension_numbers=("NHWC", "OHWI", "NHWC"),
                       feature_group_count=groups)
        return fused(y + bias if bias is not None else y, fused_activation_function)
    qw = qat(in_q, 1)
    if _is_hybrid(x, w, qw):
        return _hybrid_conv(x, w, bias, qw, stride, dil, padding, groups, hybrid_asymmetric or _distinct_scales(qw),
                            fused_activation_function, w.shape[0])
    w = _hybrid_weight(w, qw, x).astype(x.dtype)
    bias = None if bias is None else _hybrid_weight(bias, qat(in_q, 2), x).astype(x.dtype)
    if groups == 1 and fused_activation_function in CLAMPS and f32_kernel_takes(x, w):
        # the bias and the activation's clamp in the kernel's pass: the same float operations XLA ran after it
        return cpu_kernels.f32_conv(x, w, stride, dil, _window_pads(x.shape, w.shape[1:3], stride, dil, padding),
                                    bias=bias, clamp=CLAMPS[fused_activation_function])
    y = _conv(x, w, stride, dil, padding, groups)
    if bias is not None:
        y = y + bias
    return fused(y, fused_activation_function)


@op("DEPTHWISE_CONV_2D")
def depthwise_conv_2d(x, w, bias=None, *, padding: str = "SAME", stride_w: int = 1, stride_h: int = 1,
                      depth_multiplier: int = 1, fused_activation_function: str = "NONE",
                      dilation_w_factor: int = 1, dilation_h_factor: int = 1, hybrid_asymmetric: bool = False,
                      quant_kernel: str = "reference", in_q: QList = None, out_q: QList = None):
    """Depthwise convolution, filter [1, H, W, C*M]; output channel c*M+m reads input channel c.

    ``quant_kernel``: the LiteRT kernel set whose 8-bit requantization to follow (:func:`requant_rule`).
    """
    c = x.shape[-1]
    stride, dil = (stride_h, stride_w), (dilation_h_factor, dilation_w_factor)
    if is_quantized(in_q, out_q):
        rule = _rule("DEPTHWISE_CONV_2D", quant_kernel, in_q)

        def taps_sum(x, x_zp, w, bias):
            wk = jnp.transpose(_offset(w, in_q[1], axis=3), (3, 1, 2, 0))  # [C*M, H, W, 1]
            xo = jnp.asarray(x, jnp.int32) if x_zp is None else jnp.asarray(x, jnp.int32) - x_zp
            acc = _conv(xo, wk, stride, dil, padding, c, bound=qrange(in_q[0]) * qrange(in_q[1]),
                        acc_dtype=_acc_dtype(in_q[0]))
            return _finish(acc, bias, in_q, out_q, w.shape[3], fused_activation_function, rule)

        stage = _kernel_stage(x, in_q, out_q, w.shape[3], fused_activation_function, rule) if w.shape[3] == c else None
        if stage is None:
            return taps_sum(x, _zp(in_q[0]), w, bias)
        kernel = (w.shape[1], w.shape[2])
        pads = _window_pads(x.shape, kernel, stride, dil, padding)
        return cpu_kernels.int8_depthwise(
            x, jnp.int32(_zp(in_q[0]) or 0), jnp.reshape(w, (-1, c)), bias, stage, kernel, stride, dil, pads,
            lambda x, zp, taps, bias: taps_sum(x, zp, jnp.reshape(taps, (1, *kernel, c)), bias))
    qw = qat(in_q, 1)
    if _is_hybrid(x, w, qw):
        return _hybrid_conv(x, jnp.transpose(w, (3, 1, 2, 0)), bias, qw, stride, dil, padding, c, True,
                            fused_activation_function, w.shape[3])
    w = _hybrid_weight(w, qw, x).astype(x.dtype)
    bias = None if bias is None else _hybrid_weight(bias, qat(in_q, 2), x).astype(x.dtype)

    def taps_sum(x, taps, b):  # XLA: the window slices times the taps, the bias, the activation
        y = _conv(x, jnp.transpose(jnp.reshape(taps, w.shape), (3, 1, 2, 0)), stride, dil, padding, c)
        return fused(y + b, fused_activation_function)

    if w.shape[3] == c and fused_activation_function in CLAMPS and f32_depthwise_takes(x):
        kernel = (w.shape[1], w.shape[2])
        return cpu_kernels.f32_depthwise(x, jnp.reshape(w, (-1, c)), bias, CLAMPS[fused_activation_function], kernel,
                                         stride, dil, _window_pads(x.shape, kernel, stride, dil, padding), taps_sum)
    y = _conv(x, jnp.transpose(w, (3, 1, 2, 0)), stride, dil, padding, c)
    if bias is not None:
        y = y + bias
    return fused(y, fused_activation_function)


@op("TRANSPOSE_CONV")
def transpose_conv(output_shape, w, x, bias=None, *, padding: str = "SAME", stride_w: int = 1, stride_h: int = 1,
                   fused_activation_function: str = "NONE", quantized_bias_type: int = 0):
    """Transposed convolution to ``output_shape`` (NHWC), filter OHWI (float)."""
    n, oh, ow, oc = (int(v) for v in output_shape)
    kh, kw = w.shape[1], w.shape[2]
    ih, iw = x.shape[1], x.shape[2]
    pads = []
    for size_in, size_out, k, s in ((ih, oh, kh, stride_h), (iw, ow, kw, stride_w)):
        if padding == "VALID":
            total = 0
        else:
            total = max((size_in - 1) * s + k - size_out, 0)
        lo = total // 2
        # gradient of a strided conv: dilate the input, pad by k-1-pad on each side.
        full = (size_in - 1) * s + k
        pads.append((k - 1 - lo, size_out - full + lo + (k - 1)))
    wk = jnp.flip(w, (1, 2)).astype(x.dtype)  # [O, H, W, I] -> used as OHWI with O as out channels
    y = lax.conv_general_dilated(x, jnp.transpose(wk, (3, 1, 2, 0)), (1, 1), pads, lhs_dilation=(stride_h, stride_w),
                                 dimension_numbers=("NHWC", "IHWO", "NHWC"))
    if bias is not None:
        y = y + bias
    return fused(y, fused_activation_function)


@op("CONV_3D")
def conv_3d(x, w, bias=None, *, padding: str = "SAME", stride_d: int = 1, stride_w: int = 1, stride_h: int = 1,
            fused_activation_function: str = "NONE", dilation_d_factor: int = 1, dilation_w_factor: int = 1,
            dilation_h_factor: int = 1):
    """3-D convolution, input NDHWC, filter DHWIO (float)."""
    y = lax.conv_general_dilated(x, w.astype(x.dtype), (stride_d, stride_h, stride_w), padding,
                                 rhs_dilation=(dilation_d_factor, dilation_h_factor, dilation_w_factor),
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    if bias is not None:
        y = y + bias
    return fused(y, fused_activation_function)


@op("FULLY_CONNECTED")
def fully_connected(x, w, bias=None, *, fused_activation_function: str = "NONE", weights_format: int = 0,
                    keep_num_dims: bool = False, asymmetric_quantize_inputs: bool = False,
                    quantized_bias_type: int = 0, hybrid_asymmetric: bool = False, quant_kernel: str = "reference",
                    in_q: QList = None, out_q: QList = None):
    """x @ w.T + bias, weights [N, K]; the input is flattened to [-1, K] unless keep_num_dims.

    ``quant_kernel``: the LiteRT kernel set whose 8-bit requantization to follow (:func:`requant_rule`);
    16x8 FCs rescale as LiteRT's int16 kernel does, ``round(double(acc) * real)``; its builtin
    kernel set without a bias goes through ruy instead, whose rescale rounds its final shift ties up
    (measured: 30 of 30 draws bit-exact each way, per tensor and per channel).
    """
    if weights_format != 0:
        raise ValueError(f"FULLY_CONNECTED weights_format {weights_format} (shuffled) is not supported; expected DEFAULT (0)")
    k = w.shape[1]
    lead = x.shape[:-1] if keep_num_dims else (int(np.prod(x.shape)) // k,)
    x2 = jnp.reshape(x, (-1, k))
    dims = (((1,), (1,)), ((), ()))
    if is_quantized(in_q, out_q):
        if _is_16x8(in_q[0]):
            acc = exact_dot(_offset(x2, in_q[0]), _offset(w, in_q[1], axis=0), dims, 1, 1,
                            qrange(in_q[0]) * qrange(in_q[1]), acc_dtype=_acc_dtype(in_q[0]))
        else:
            acc = zp_matmul(x2, _zp(in_q[0]), w, _zp(in_q[1], (w.shape[0], 1)), trans_b=True)
        rule = Requant(rounding="float64") if _is_16x8(in_q[0]) else _rule("FULLY_CONNECTED", quant_kernel, in_q)
        # LiteRT's builtin int16 FC without a bias runs ruy (int32 accumulator, final shift ties up)
        wide_rounding = "ties_up" if quant_kernel == "builtin" and bias is None else "float64"
        y = _finish(acc, bias, in_q, out_q, w.shape[0], fused_activation_function, rule, wide_rounding=wide_rounding)
    elif arith.is_quantized(w):  # jaxinfer.quantize's int8 weight: [N, K], a scale per output
        y = arith.dot_general(x2, w, dims)
        if bias is not None:
            y = y + jnp.asarray(bias).astype(y.dtype)
        y = fused(y, fused_activation_function)
    elif _is_hybrid(x, w, qat(in_q, 1)):
        qw = in_q[1]
        asym = bool(asymmetric_quantize_inputs or hybrid_asymmetric)
        wzp = _zp(qw, (w.shape[0], 1))

        def quantized_dot(x2, w):
            q, sf, off = Q.dynamic_quantize_rows(x2, asym)
            return zp_matmul(q, off[:, None] if asym else None, w, wzp, trans_b=True), sf

        ws = np.broadcast_to(qw.scale.astype(np.float32), (w.shape[0],))
        if (jnp.result_type(x2) == jnp.float32 and wzp is None and fused_activation_function in CLAMPS
                and intmath.native_int8_dots()):  # the kernel quantizes the rows and finishes the layer
            y = cpu_kernels.int8_dot_hybrid(x2, jnp.asarray(w), asym, ws, quantized_dot,
                                            bias=bias, clamp=CLAMPS[fused_activation_function])
        else:
            acc, sf = quantized_dot(x2, w)
            y = acc.astype(jnp.float32) * (sf[:, None] * jnp.asarray(ws)[None, :])
            if bias is not None:
                y = y + jnp.asarray(bias, jnp.float32)
            y = fused(y, fused_activation_function)
    else:
        w = _hybrid_weight(w, qat(in_q, 1), x).astype(x.dtype)
        y = arith.dot_general(x2, w, dims)  # few rows by a large float32 weight: our kernel (conv_lowering)
        if bias is not None:
            y = y + _hybrid_weight(bias, qat(in_q, 2), x).astype(x.dtype)
        y = fused(y, fused_activation_function)
    return jnp.reshape(y, tuple(lead) + (w.shape[0],))


@op("BATCH_MATMUL")
def batch_matmul(x, y, *, adj_x: bool = False, adj_y: bool = False, asymmetric_quantize_inputs: bool = False,
                 in_q: QList = None, out_q: QList = None):
    """Batched x @ y with optional adjoints (transposes of the last two axes), broadcasting batch dims."""
    if is_quantized(in_q, out_q):
        qa, qb, qo = in_q[0], in_q[1], out_q[0]
        a, b = jnp.asarray(x), jnp.asarray(y)
        if adj_x:
            a = jnp.swapaxes(a, -1, -2)
        acc = zp_matmul(a, _zp(qa), b, _zp(qb), trans_b=adj_y)
        return Q.requantize(acc.astype(jnp.int64), float(qa.s) * float(qb.s) / float(qo.s), qo, (qo.qmin, qo.qmax))
    if adj_x:
        x = jnp.swapaxes(x, -1, -2)
    if arith.is_quantized(y):  # jaxinfer.quantize's int8 2-D matrix
        return arith.dot_general(x, y, (((jnp.ndim(x) - 1,), (1 if adj_y else 0,)), ((), ())))
    y = _hybrid_weight(y, qat(in_q, 1), x)
    if adj_y:
        y = jnp.swapaxes(y, -1, -2)
    return arith.matmul(x, y)


def _pool_pads(shape, fh, fw, sh, sw, padding):
    if padding == "VALID":
        return [(0, 0)] * 4
    pads = [(0, 0)]
    for size, k, s in ((shape[1], fh, sh), (shape[2], fw, sw)):
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return pads + [(0, 0)]


def _window(x, init, fn, fh, fw, sh, sw, padding):
    return reduce_window(x, init, fn, (1, fh, fw, 1), (1, sh, sw, 1), _pool_pads(x.shape, fh, fw, sh, sw, padding))


@op("MAX_POOL_2D")
def max_pool_2d(x, *, padding: str = "SAME", stride_w: int = 1, stride_h: int = 1, filter_width: int = 1,
                filter_height: int = 1, fused_activation_function: str = "NONE",
                in_q: QList = None, out_q: QList = None):
    """Max over windows; padding never wins."""
    if is_quantized(in_q, out_q):
        qo = out_q[0]
        init = jnp.array(qo.qmin, x.dtype)
        y = _window(x, init, lax.max, filter_height, filter_width, stride_h, stride_w, padding)
        lo, hi = Q.activation_range(fused_activation_function, qo)
        return jnp.clip(y, lo, hi).astype(x.dtype)
    y = _window(x, jnp.array(-jnp.inf, x.dtype), lax.max, filter_height, filter_width, stride_h, stride_w, padding)
    return fused(y, fused_activation_function)


@op("AVERAGE_POOL_2D")
def average_pool_2d(x, *, padding: str = "SAME", stride_w: int = 1, stride_h: int = 1, filter_width: int = 1,
                    filter_height: int = 1, fused_activation_function: str = "NONE",
                    in_q: QList = None, out_q: QList = None):
    """Mean over the valid (unpadded) elements of each window; 8-bit: int32 sum, rounded integer division."""
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), jnp.int32)
    count = _window(ones, jnp.int32(0), lax.add, filter_height, filter_width, stride_h, stride_w, padding)
    if is_quantized(in_q, out_q):
        qo = out_q[0]
        s = _window(jnp.asarray(x, jnp.int32), jnp.int32(0), lax.add, filter_height, filter_width, stride_h,
                    stride_w, padding)
        half = count // 2
        num = jnp.where(s > 0, s + half, s - half)
        avg = jnp.where(num >= 0, num // count, -((-num) // count))
        lo, hi = Q.activation_range(fused_activation_function, qo)
        return jnp.clip(avg, lo, hi).astype(x.dtype)
    s = _window(x, jnp.array(0, x.dtype), lax.add, filter_height, filter_width, stride_h, stride_w, padding)
    return fused(s / count.astype(x.dtype), fused_activation_function)


@op("L2_POOL_2D")
def l2_pool_2d(x, *, padding: str = "SAME", stride_w: int = 1, stride_h: int = 1, filter_width: int = 1,
               filter_height: int = 1, fused_activation_function: str = "NONE"):
    """sqrt(mean(x**2)) over the valid elements of each window."""
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = _window(ones, jnp.array(0, x.dtype), lax.add, filter_height, filter_width, stride_h, stride_w, padding)
    s = _window(x * x, jnp.array(0, x.dtype), lax.add, filter_height, filter_width, stride_h, stride_w, padding)
    return fused(jnp.sqrt(s / count), fused_activation_function)
