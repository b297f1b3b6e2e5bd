"""onnxruntime quantized contrib ops (``com.microsoft``) and jaxinfer's integer ops for QDQ graphs.

Products accumulate ``(a - a_zp) * (b - b_zp)`` exactly as int32 (through ``intmath``'s exact float sums);
rescaling happens once, in float32, followed by round-half-to-even, the zero point and
saturation. Elementwise QLinear ops dequantize to float32, apply the float op and requantize
(onnxruntime does the same through per-value lookup tables).

The ``jaxinfer`` domain ops ``QLinearConvInt`` and ``QLinearMatMulInt`` (Gemm too) are what
``passes.qdq`` rewrites ``DequantizeLinear -> Conv/MatMul/Gemm [-> QuantizeLinear]`` into;
``DequantMatMul`` is a float activation times a blocked or 4-bit weight kept packed in params.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .... import cpu_kernels
from ....intmath import (abs_bound, divide, exact_float, quotient, round_saturate, zero_point, zp_conv,
                         zp_conv_requant, zp_matmul)
from ....registry import OpDef, registrar
from ._util import auto_pads, dtype_of
from ._util import axis as norm_axis
from .pool import average_pool as _average_pool
from .quant import dequantize_linear as _dequantize_linear
from .quant import dynamic_quantize_linear as _dynamic_quantize_linear
from .quant import qlinear_conv as _qlinear_conv
from .quant import conv_weight_layout, qlinear_conv_laid_out
from .quant import quantize_linear as _quantize_linear

MS = "com.microsoft"
JX = "jaxinfer"
OPS: list[OpDef] = []
op = registrar(OPS, domain=MS)
F32 = jnp.float32


def _scalar(v: Any, dtype: Any = F32) -> Any:
    return jnp.asarray(v).astype(dtype).reshape(())


def _zp(v: Any) -> Any:
    return jnp.int32(0) if v is None else jnp.asarray(v).astype(jnp.int32).reshape(())


def _deq(x: Any, scale: Any, zp: Any) -> Any:
    return (jnp.asarray(x).astype(jnp.int32) - _zp(zp)).astype(F32) * _scalar(scale)


def _quant(v: Any, scale: Any, zp: Any, dtype: Any) -> Any:
    """float32 -> ``dtype``: divide by scale, round half to even, add the zero point, saturate."""
    return round_saturate(divide(v, _scalar(scale)), dtype, _zp(zp))


def _requant(acc: Any, multiplier: Any, zp: Any, dtype: Any) -> Any:
    return round_saturate(acc.astype(F32) * multiplier, dtype, _zp(zp))


def _col(p: Any, n: int) -> Any:
    """A per-tensor or per-column ([N]) parameter, broadcastable against (..., N)."""
    p = jnp.asarray(p)
    return p.reshape(()) if p.size == 1 else p.reshape((n,))


def _bound(v: Any, zp: Any) -> int:
    """Largest |v - zp| of an integer operand (its dtype's span when a zero point shifts it)."""
    return abs_bound(v.dtype, shifted=zp is not None)


def _int_matmul(a: Any, b: Any, a_zp: Any, b_zp: Any, trans_b: bool = False) -> Any:
    """``(a - a_zp) @ (b - b_zp)`` in int32; ``b`` [N, K] with ``trans_b`` (our int8 kernel's layout: no copy)."""
    n = b.shape[-2] if trans_b else b.shape[-1]
    return zp_matmul(a, zero_point(a_zp), b, zero_point(b_zp, (n, 1) if trans_b else (n,)), trans_b=trans_b)


# ---------------------------------------------------------------- matmuls


@op("MatMulIntegerToFloat", 1)
def matmul_integer_to_float(A, B, a_scale, b_scale, a_zero_point=None, b_zero_point=None, bias=None):
    """com.microsoft MatMulIntegerToFloat: (A - a_zp) @ (B - b_zp) in int32, times a_scale * b_scale (+ bias)."""
    B = jnp.asarray(B)
    n = B.shape[-1]
    acc = _int_matmul(A, B, a_zero_point, b_zero_point)
    out = jnp.result_type(a_scale)
    y = acc.astype(F32) * (_col(a_scale, 1).astype(F32) * _col(b_scale, n).astype(F32))
    if bias is not None:
        y = y + jnp.asarray(bias).astype(F32)
    return y.astype(out)


@op("DynamicQuantizeMatMul", 1)
def dynamic_quantize_matmul(A, B, b_scale, b_zero_point=None, bias=None):
    """com.microsoft DynamicQuantizeMatMul: A quantized to uint8 on the fly (DynamicQuantizeLinear), then
    an int32 matmul with the quantized B and one float rescale."""
    A = jnp.asarray(A)
    aq, a_scale, a_zp = _dynamic_quantize_linear(A)
    return matmul_integer_to_float(aq, B, a_scale, b_scale, a_zp, b_zero_point, bias).astype(A.dtype)


@op("QGemm", 1)
def qgemm(A, a_scale, a_zero_point, B, b_scale, b_zero_point=None, C=None, y_scale=None, y_zero_point=None, *,
          alpha: float = 1.0, transA: int = 0, transB: int = 0):
    """com.microsoft QGemm: int32 alpha*A'B' (+ int32 C at scale a_scale*b_scale); float out without y_scale."""
    a = jnp.asarray(A)
    b = jnp.asarray(B)
    a = a.T if transA else a
    n = b.shape[0] if transB else b.shape[-1]
    acc = _int_matmul(a, b, a_zero_point, b_zero_point, trans_b=bool(transB))
    if C is not None:
        acc = acc + jnp.asarray(C).astype(jnp.int32)
    scale = _scalar(a_scale) * _col(b_scale, n).astype(F32) * alpha
    if y_scale is None:
        return acc.astype(F32) * scale
    out = jnp.result_type(y_zero_point) if y_zero_point is not None else a.dtype
    return _requant(acc, quotient(scale, _scalar(y_scale)), y_zero_point, out)


# ------------------------------------------------------------ elementwise


def _binary(fn: Any, A: Any, A_scale: Any, A_zp: Any, B: Any, B_scale: Any, B_zp: Any, C_scale: Any, C_zp: Any) -> Any:
    out = jnp.result_type(A)
    return _quant(fn(_deq(A, A_scale, A_zp), _deq(B, B_scale, B_zp)), C_scale, C_zp, out)


@op("QLinearAdd", 1)
def qlinear_add(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point=None):
    """com.microsoft QLinearAdd: quantize(dequantize(A) + dequantize(B))."""
    return _binary(jnp.add, A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point)


@op("QLinearMul", 1)
def qlinear_mul(A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point=None):
    """com.microsoft QLinearMul: quantize(dequantize(A) * dequantize(B))."""
    return _binary(jnp.multiply, A, A_scale, A_zero_point, B, B_scale, B_zero_point, C_scale, C_zero_point)


def _unary(fn: Any, X: Any, X_scale: Any, X_zp: Any, Y_scale: Any, Y_zp: Any) -> Any:
    return _quant(fn(_deq(X, X_scale, X_zp)), Y_scale, Y_zp, jnp.result_type(X))


@op("QLinearSigmoid", 1)
def qlinear_sigmoid(X, X_scale, X_zero_point=None, Y_scale=None, Y_zero_point=None):
    """com.microsoft QLinearSigmoid."""
    return _unary(jax.nn.sigmoid, X, X_scale, X_zero_point, Y_scale, Y_zero_point)


@op("QLinearLeakyRelu", 1)
def qlinear_leaky_relu(X, X_scale, X_zero_point=None, Y_scale=None, Y_zero_point=None, *, alpha: float = 0.01):
    """com.microsoft QLinearLeakyRelu."""
    return _unary(lambda v: jnp.where(v >= 0, v, v * alpha), X, X_scale, X_zero_point, Y_scale, Y_zero_point)


@op("QLinearSoftmax", 1)
def qlinear_softmax(X, X_scale, x_zero_point=None, y_scale=None, y_zero_point=None, *, axis: int = -1,
                    opset: int = 13):
    """com.microsoft QLinearSoftmax: softmax of the dequantized input (2-D coercion before opset 13)."""
    x = _deq(X, X_scale, x_zero_point)
    ax = norm_axis(axis, x.ndim)
    if opset < 13:
        shape = x.shape
        y = jax.nn.softmax(x.reshape(int(np.prod(shape[:ax])), -1), axis=-1).reshape(shape)
    else:
        y = jax.nn.softmax(x, axis=ax)
    return _quant(y, y_scale, y_zero_point, jnp.result_type(y_zero_point if y_zero_point is not None else X))


@op("QLinearGlobalAveragePool", 1)
def qlinear_global_average_pool(X, x_scale, x_zero_point, y_scale, y_zero_point, *, channels_last: int = 0):
    """com.microsoft QLinearGlobalAveragePool: int32 window sums, one float rescale."""
    X = jnp.asarray(X)
    axes = tuple(range(1, X.ndim - 1)) if channels_last else tuple(range(2, X.ndim))
    count = int(np.prod([X.shape[a] for a in axes]))
    # int32 sums (jnp.sum would widen them to int64 under x64: an unvectorized loop, 43 us at cnn_qdq b8)
    wide = jnp.int32 if count * 256 < 2**31 else None
    acc = jnp.sum(X.astype(jnp.int32) - _zp(x_zero_point), axis=axes, keepdims=True, dtype=wide)
    mult = quotient(_scalar(x_scale), _scalar(y_scale) * count)
    return _requant(acc, mult, y_zero_point, X.dtype)


@op("QLinearAveragePool", 1)
def qlinear_average_pool(X, x_scale, x_zero_point=None, y_scale=None, y_zero_point=None, *, kernel_shape,
                         auto_pad: str = "NOTSET", ceil_mode: int = 0, channels_last: int = 0,
                         count_include_pad: int = 0, pads=None, strides=None):
    """com.microsoft QLinearAveragePool: dequantize, AveragePool in float32, quantize."""
    X = jnp.asarray(X)
    x = _deq(X, x_scale, x_zero_point)
    if channels_last:
        x = jnp.moveaxis(x, -1, 1)
    y = _average_pool(x, auto_pad=auto_pad, ceil_mode=ceil_mode, count_include_pad=count_include_pad,
                      kernel_shape=kernel_shape, pads=pads, strides=strides)
    if channels_last:
        y = jnp.moveaxis(y, 1, -1)
    return _quant(y, y_scale, y_zero_point, X.dtype)


@op("QLinearConcat", 1)
def qlinear_concat(Y_scale, Y_zero_point, *inputs, axis: int):
    """com.microsoft QLinearConcat: (tensor, scale, zero point) triples requantized to Y's and concatenated."""
    if len(inputs) % 3:
        raise ValueError(f"QLinearConcat: inputs come in (tensor, scale, zero point) triples, got {len(inputs)}")
    out = jnp.result_type(Y_zero_point)
    parts = []
    for i in range(0, len(inputs), 3):
        x, s, z = inputs[i:i + 3]
        parts.append(_quant(_deq(x, s, z), Y_scale, Y_zero_point, out))
    return jnp.concatenate(parts, axis=norm_axis(axis, parts[0].ndim))


@op("QLinearConv", 1)
def qlinear_conv_ms(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B=None, *,
                    auto_pad: str = "NOTSET", dilations: Sequence[int] = (), group: int = 1,
                    kernel_shape: Sequence[int] = (), pads: Sequence[int] = (), strides: Sequence[int] = (),
                    channels_last: int = 0):
    """com.microsoft QLinearConv: the ai.onnx op, optionally on channels-last activations."""
    x = jnp.asarray(x)
    if channels_last:
        x = jnp.moveaxis(x, -1, 1)
    y = _qlinear_conv(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B,
                      auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape, pads=pads,
                      strides=strides)
    return jnp.moveaxis(y, 1, -1) if channels_last else y


op("QuantizeLinear", 1)(_quantize_linear)
op("DequantizeLinear", 1)(_dequantize_linear)


# ------------------------------------------- jaxinfer integer ops (QDQ rewrite)

jx = registrar(OPS, domain=JX)


def _out(acc: Any, multiplier: Any, bias_f: Any, y_scale: Any, y_zero_point: Any, float_type: Any,
         relu: int = 0) -> Any:
    """int32 accumulator -> quantized (when y_scale is given) or float output; ``relu`` clamps a
    quantized output at its zero point (quantize(relu(v)) == max(quantize(v), zero point))."""
    if y_scale is None:
        y = acc.astype(F32) * multiplier
        if bias_f is not None:
            y = y + bias_f
        return y.astype(float_type)
    if bias_f is not None:
        raise ValueError("a float bias cannot join a requantized integer output")
    out = jnp.result_type(y_zero_point) if y_zero_point is not None else np.dtype(np.uint8)
    q = _requant(acc, quotient(multiplier, _scalar(y_scale)), y_zero_point, out)
    return jnp.maximum(q, _zp(y_zero_point).astype(out)) if relu else q


def _channel_param(p: Any, n: int, shape: tuple[int, ...]) -> Any:
    p = jnp.asarray(p)
    return p.reshape(()) if p.size == 1 else p.reshape(shape if p.size == n else (-1,))


@jx("QLinearConvInt", 1)
def qlinear_conv_int(x, x_scale, x_zero_point, w, w_scale, w_zero_point, bias_q=None, bias_f=None, y_scale=None,
                     y_zero_point=None, *, auto_pad: str = "NOTSET", dilations: Sequence[int] = (), group: int = 1,
                     kernel_shape: Sequence[int] = (), pads: Sequence[int] = (), strides: Sequence[int] = (),
                     float_type: int = 1, relu: int = 0, w_layout: str = "OIHW"):
    """Integer conv of a QDQ graph: int32 conv of zero-point-shifted int8/uint8 operands, int32 bias
    (at scale x_scale * w_scale), then requantization to y (or a float output + float bias). A 2-D weight may
    be stored OHWI (``w_layout``; ``passes.layout.int8_conv_weights_ohwi``)."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    n = x.ndim - 2
    strides = tuple(strides) or (1,) * n
    dilations = tuple(dilations) or (1,) * n
    spatial, dims = conv_weight_layout(w, w_layout)
    padding = auto_pads(auto_pad, x.shape[2:], spatial, strides, dilations, pads)
    cout = w.shape[0]
    chan = (1, cout) + (1,) * n
    mult = _scalar(x_scale) * _channel_param(w_scale, cout, chan).astype(F32)
    if y_scale is not None and bias_f is None and group == 1:
        out = jnp.result_type(y_zero_point) if y_zero_point is not None else np.dtype(np.uint8)
        y = zp_conv_requant(x, x_zero_point, w, w_zero_point, bias_q, quotient(mult, _scalar(y_scale)),
                            _zp(y_zero_point), out, bool(relu), strides, padding, dimension_numbers=dims,
                            rhs_dilation=dilations)
        if y is not None:
            return y
    acc = zp_conv(x, x_zero_point, w, w_zero_point, strides, padding, rhs_dilation=dilations, dimension_numbers=dims,
                  feature_group_count=group, bound=_bound(x, x_zero_point) * _bound(w, w_zero_point))
    if bias_q is not None:
        acc = acc + jnp.asarray(bias_q).astype(jnp.int32).reshape(chan)
    bf = None if bias_f is None else jnp.asarray(bias_f).astype(F32).reshape(chan)
    return _out(acc, mult, bf, y_scale, y_zero_point, _float_type(float_type), relu)


@jx("QLinearConv", 1)
def qlinear_conv_ohwi(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B=None, *,
                      auto_pad: str = "NOTSET", dilations: Sequence[int] = (), group: int = 1,
                      kernel_shape: Sequence[int] = (), pads: Sequence[int] = (), strides: Sequence[int] = (),
                      w_layout: str = "OHWI"):
    """ONNX QLinearConv with its 2-D weight stored OHWI at load (``passes.layout.int8_conv_weights_ohwi``): our
    int8 kernel reads it as it is, where an OIHW param was transposed and copied on every call."""
    return qlinear_conv_laid_out(x, x_scale, x_zero_point, w, w_scale, w_zero_point, y_scale, y_zero_point, B,
                                 auto_pad=auto_pad, dilations=dilations, group=group, kernel_shape=kernel_shape,
                                 pads=pads, strides=strides, w_layout=w_layout)


def _float_type(code: int) -> Any:
    return dtype_of(code)


@jx("MatMulIntegerNK", 1)
def matmul_integer_nk(a, b, a_zero_point=None, b_zero_point=None):
    """ONNX MatMulInteger with B stored ``[N, K]`` (:func:`jaxinfer.passes.layout.int8_weights_rows_first`):
    ``(A - a_zp) @ (B - b_zp).T`` in int32; b_zp per tensor or per output column."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    return zp_matmul(a, zero_point(a_zero_point, np.shape(a_zero_point) + (1,)), b,
                     zero_point(b_zero_point, (b.shape[0], 1)), trans_b=True)


@jx("QLinearMatMulInt", 1)
def qlinear_matmul_int(a, a_scale, a_zero_point, b, b_scale, b_zero_point, bias_q=None, bias_f=None, y_scale=None,
                       y_zero_point=None, *, trans_b: int = 0, alpha: float = 1.0, float_type: int = 1,
                       relu: int = 0, block_size: int = 0):
    """Integer MatMul/Gemm of a QDQ graph: a (..., K) x b (K, N) (or (N, K) with ``trans_b``), int32
    accumulation, per-tensor or per-column b scale, then requantization (or float output).

    b may be int4/uint4; with ``block_size`` its scale/zero point are ``(ceil(K / block_size), N)``
    (opset-21 blocked DequantizeLinear along K): one int32 dot per block, blocks combined in float32.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if block_size:
        return _blocked_matmul_int(a, a_scale, a_zero_point, b, b_scale, b_zero_point, y_scale, y_zero_point,
                                   block_size, _float_type(float_type), relu)
    n = b.shape[0] if trans_b else b.shape[-1]
    bzp = zero_point(b_zero_point, (n, 1) if trans_b else (n,))
    acc = zp_matmul(a, zero_point(a_zero_point), b, bzp, trans_b=bool(trans_b))
    if bias_q is not None:
        acc = acc + jnp.asarray(bias_q).astype(jnp.int32)
    mult = _scalar(a_scale) * _col(b_scale, n).astype(F32) * alpha
    bf = None if bias_f is None else jnp.asarray(bias_f).astype(F32)
    return _out(acc, mult, bf, y_scale, y_zero_point, _float_type(float_type), relu)


def _blocked_matmul_int(a: Any, a_scale: Any, a_zero_point: Any, b: Any, b_scale: Any, b_zero_point: Any,
                        y_scale: Any, y_zero_point: Any, block_size: int, float_type: Any, relu: int) -> Any:
    """(..., K) x (K, N) with b quantized per K-block: int32 partial dots per block, float32 combine."""
    k, n = b.shape
    groups = -(-k // block_size)
    pad = groups * block_size - k
    ai = a.astype(jnp.int32) - _zp(a_zero_point)
    bzp = jnp.zeros((groups, n), jnp.int32) if b_zero_point is None else jnp.asarray(b_zero_point).astype(jnp.int32)
    bi = b.astype(jnp.int32) - jnp.repeat(bzp, block_size, axis=0)[:k]
    # zero padding after the zero-point shift adds nothing to any block's sum
    ai = jnp.pad(ai, [(0, 0)] * (ai.ndim - 1) + [(0, pad)]).reshape(ai.shape[:-1] + (groups, block_size))
    bi = jnp.pad(bi, [(0, pad), (0, 0)]).reshape(groups, block_size, n)
    ft = exact_float(block_size, _bound(a, a_zero_point) * _bound(b, b_zero_point))  # one block's sum is exact
    acc = jnp.einsum("...gk,gkn->...gn", ai.astype(ft), bi.astype(ft), precision=lax.Precision.HIGHEST)
    y = jnp.sum(acc.astype(F32) * jnp.asarray(b_scale).astype(F32), axis=-2) * _scalar(a_scale)
    if y_scale is None:
        return y.astype(float_type)
    out = jnp.result_type(y_zero_point) if y_zero_point is not None else np.dtype(np.uint8)
    q = _quant(y, y_scale, y_zero_point, out)
    return jnp.maximum(q, _zp(y_zero_point).astype(out)) if relu else q


@jx("DequantMatMul", 1)
def dequant_matmul(a, b, b_scale, b_zero_point=None, *, axis: int = 0, block_size: int = 0):
    """Float a (..., K) x a quantized weight b (K, N) (int8/int4, per tensor, per axis or blocked),
    dequantized inside the jitted program: the weight stays packed in params, not folded to float."""
    a = jnp.asarray(a)
    w = _dequantize_linear(b, b_scale, b_zero_point, axis=axis, block_size=block_size)
    return jnp.matmul(a, w.astype(a.dtype))


@jx("Lookup8", 1)
def lookup8(x, *, body: Any, rank: int = 0):
    """``body(x)``, an elementwise chain over an 8-bit x (:mod:`jaxinfer.passes.lookup`), as a table:
    the body runs once on x's 256 codes, then each element reads its code's entry. ``rank`` is the
    highest rank among the chain's one-element constants (which broadcast x's shape up to it).
    A non-8-bit x runs the body directly."""
    x = jnp.asarray(x)
    if x.dtype not in (np.dtype(np.int8), np.dtype(np.uint8)):
        return body(x)[0]
    lo = int(np.iinfo(x.dtype).min)
    (table,) = body(jnp.arange(lo, lo + 256, dtype=jnp.int32).astype(x.dtype))
    table = jnp.reshape(table, (-1,))
    if table.shape[0] != 256:
        raise ValueError(f"Lookup8: the chain gave {table.shape[0]} entries for 256 codes; expected an "
                         "elementwise chain with one-element constants")
    y = cpu_kernels.lookup8(table, x)
    return y.reshape((1,) * max(0, rank - x.ndim) + x.shape)
