"""Reductions and arg-reductions (axes are a static second input).

Quantized MEAN, SUM and REDUCE_PROD follow one of LiteRT's CPU kernel sets, picked by
``quant_kernel`` (the reader sets it from ``load_tflite(requant=...)``):

* ``"reference"`` (LiteRT's reference kernels): the int32 sum of ``q - zero_point`` is
  rescaled with a fixed-point multiplier; for MEAN the multiplier of ``input_scale /
  output_scale`` is divided by the element count in integers (``(m << k) // n`` with
  ``k = floor(log2 n)``, shift lowered by ``k``), so the result is not the multiplier of
  ``input_scale / (output_scale * n)``.
* ``"builtin"`` (the optimized builtin kernels, no delegate): MEAN of a rank-4 tensor over
  axes {1, 2} with keep_dims rescales the *raw* sum by the multiplier of the float32
  ``input_scale / (n * output_scale)`` and adds a float-derived bias; channels in whole
  blocks of 16 take the SIMD path, whose rescale rounds ties up (the rest round ties away
  from zero). Other MEANs as ``"reference"``. SUM rescales in float32 and rounds half away.
* ``"xnnpack"`` (LiteRT's default XNNPACK delegate, 8-bit MEAN and SUM): ``sum - n *
  zero_point`` times the float32 scale, plus the output zero point, rounded half to even.

REDUCE_PROD (int8/int16) is the same in every set: the running product is rescaled after
each multiplication by the multiplier of ``input_scale / output_scale ** (1 / n)``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from .. import quant as Q
from ._util import QList, is_quantized

OPS: list[OpDef] = []
op = registrar(OPS, domain="tflite")

#: The optimized 4-D MEAN's SIMD path handles this many channels at a time.
_SIMD_CHANNELS = 16
#: Quantized REDUCE_PROD unrolls up to this many factors (a scan beyond).
_PROD_UNROLL = 64


def _axes(axes, rank: int) -> tuple[int, ...]:
    return tuple(sorted({int(a) % rank for a in np.ravel(axes)}))


def _count(shape, ax) -> int:
    return int(np.prod([shape[a] for a in ax], dtype=np.int64))


def _clamp(y, qo: Q.QParams):
    return jnp.clip(y, qo.qmin, qo.qmax).astype(qo.dtype)


def _int_sum(x, ax, keep: bool):
    return jnp.sum(jnp.asarray(x, jnp.int64), axis=ax, keepdims=keep)


def _round_away(v):
    return jnp.sign(v) * jnp.floor(jnp.abs(v) + 0.5)


def _xnnpack_rescale(acc, scale: np.float32, qo: Q.QParams):
    """XNNPACK's 8-bit reduce output: ``acc * scale + zero_point`` in float32, rounded half to even."""
    v = acc.astype(jnp.float32) * jnp.float32(scale) + jnp.float32(qo.zp)
    return _clamp(jnp.round(v), qo)


def _mean_reference(s, n: int, qi: Q.QParams, qo: Q.QParams):
    """Reference-kernel MEAN: the multiplier of in/out scale divided by ``n`` in integers."""
    mult, shift = Q.quantize_multiplier(float(qi.s) / float(qo.s))
    k = min(n.bit_length() - 1, 32, 31 + shift)
    mult, shift = (mult << k) // n, shift - k
    acc = Q.wrap32(s - qi.zp * n)
    return _clamp(Q.multiply_by_quantized_multiplier(acc, mult, shift) + qo.zp, qo)


def _mean_hw_builtin(s, n: int, qi: Q.QParams, qo: Q.QParams):
    """The optimized builtin kernel's rank-4 MEAN over H, W: raw sum, float32-derived multiplier and bias."""
    si, so = np.float32(qi.s), np.float32(qo.s)
    temp = np.float32(np.float32(qi.zp) * si) / so
    temp = temp + np.float32(0.5) if temp > 0 else temp - np.float32(0.5)
    bias = qo.zp - int(np.trunc(temp))
    mult, shift = Q.quantize_multiplier(float(si / np.float32(np.float32(n) * so)))
    away = Q.simd_ties_away(s.shape[-1], _SIMD_CHANNELS)
    return _clamp(Q.multiply_by_quantized_multiplier(s, mult, shift, ties_away=away) + bias, qo)


@op("MEAN", static=(1,))
def mean(x, axes, *, keep_dims: bool = False, quant_kernel: str = "reference", in_q: QList = None,
         out_q: QList = None):
    """Mean over ``axes``; quantized: an integer sum rescaled as ``quant_kernel``'s LiteRT kernel does."""
    ax = _axes(axes, x.ndim)
    keep = bool(keep_dims)
    if not is_quantized(in_q, out_q):
        return jnp.mean(x, axis=ax, keepdims=keep)
    Q.check_kernel(quant_kernel)
    qi, qo = in_q[0], out_q[0]
    n = _count(x.shape, ax)
    s = _int_sum(x, ax, keep)
    if n == 0:
        return jnp.zeros(s.shape, qo.dtype)
    eight_bit = np.dtype(qi.dtype).itemsize == 1
    if quant_kernel == "xnnpack" and eight_bit:
        scale = np.float32(qi.s) / (np.float32(qo.s) * np.float32(n))
        return _xnnpack_rescale(s - qi.zp * n, scale, qo)
    if quant_kernel == "builtin" and eight_bit and keep and x.ndim == 4 and ax == (1, 2):
        return _mean_hw_builtin(s, n, qi, qo)
    return _mean_reference(s, n, qi, qo)


@op("SUM", static=(1,))
def sum_(x, axes, *, keep_dims: bool = False, quant_kernel: str = "reference", in_q: QList = None,
         out_q: QList = None):
    """Sum over ``axes``; quantized: the integer sum rescaled to the output as ``quant_kernel``'s kernel does."""
    ax = _axes(axes, x.ndim)
    keep = bool(keep_dims)
    if not is_quantized(in_q, out_q):
        return jnp.sum(x, axis=ax, keepdims=keep)
    Q.check_kernel(quant_kernel)
    qi, qo = in_q[0], out_q[0]
    n = _count(x.shape, ax)
    s = _int_sum(x, ax, keep)
    scale = np.float32(qi.s) / np.float32(qo.s)
    if quant_kernel == "xnnpack" and np.dtype(qi.dtype).itemsize == 1:
        return _xnnpack_rescale(s - qi.zp * n, scale, qo)
    if quant_kernel in ("builtin", "xnnpack"):
        bias = np.float32(np.float32(np.float32(-qi.zp) * scale) * np.float32(n))
        v = s.astype(jnp.float32) * jnp.float32(scale) + jnp.float32(bias)
        return _clamp(_round_away(v).astype(jnp.int64) + qo.zp, qo)
    mult, shift = Q.quantize_multiplier(float(qi.s) / float(qo.s))
    acc = Q.wrap32(s - qi.zp * n)
    return _clamp(Q.multiply_by_quantized_multiplier(acc, mult, shift) + qo.zp, qo)


def _quantized_prod(x, ax: tuple[int, ...], keep: bool, qi: Q.QParams, qo: Q.QParams, kernel: str):
    """Product of ``q - zero_point`` in visiting (row-major) order, rescaled after every multiplication."""
    if not ax and kernel != "reference":
        return jnp.asarray(x, qo.dtype)  # the optimized kernel copies when no axis is reduced
    kept = tuple(a for a in range(x.ndim) if a not in ax)
    n = _count(x.shape, ax)
    out_shape = tuple(1 if a in ax else d for a, d in enumerate(x.shape)) if keep else \
        tuple(x.shape[a] for a in kept)
    if n == 0:
        return jnp.zeros(out_shape, qo.dtype)
    mult, shift = Q.quantize_multiplier(float(qi.s) / math.pow(float(qo.s), 1.0 / n))
    xt = jnp.transpose(jnp.asarray(x, jnp.int64) - qi.zp, kept + ax)
    factors = jnp.moveaxis(jnp.reshape(xt, (-1, n)), 1, 0)  # [n, outputs]

    def rescale(v):
        return Q.wrap32(Q.multiply_by_quantized_multiplier_64(v, mult, shift))

    if n <= _PROD_UNROLL:
        acc = factors[0]
        for i in range(1, n):
            acc = rescale(acc * factors[i])
    else:
        acc, _ = lax.scan(lambda a, f: (rescale(a * f), None), factors[0], factors[1:])
    return _clamp(jnp.reshape(rescale(acc) + qo.zp, out_shape), qo)


@op("REDUCE_PROD", static=(1,))
def reduce_prod(x, axes, *, keep_dims: bool = False, quant_kernel: str = "reference", in_q: QList = None,
                out_q: QList = None):
    """Product over ``axes``; quantized int8/int16: rescaled after each multiplication (see the module doc)."""
    ax = _axes(axes, x.ndim)
    if is_quantized(in_q, out_q):
        Q.check_kernel(quant_kernel)
        if np.dtype(in_q[0].dtype) not in (np.dtype(np.int8), np.dtype(np.int16)):
            raise ValueError(f"quantized REDUCE_PROD takes int8 or int16 (as LiteRT), got {np.dtype(in_q[0].dtype)}")
        return _quantized_prod(x, ax, bool(keep_dims), in_q[0], out_q[0], quant_kernel)
    return jnp.prod(x, axis=ax, keepdims=bool(keep_dims))


def _reducer(name: str, fn) -> None:
    def reduce(x, axes, *, keep_dims: bool = False, in_q: QList = None, out_q: QList = None):
        if name not in ("REDUCE_MAX", "REDUCE_MIN") and (in_q or out_q):
            raise ValueError(f"{name} on quantized tensors is not supported (float kernel only)")
        return fn(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))

    reduce.__doc__ = f"{name} over ``axes``."
    op(name, static=(1,))(reduce)


for _name, _fn in {"REDUCE_MAX": jnp.max, "REDUCE_MIN": jnp.min, "REDUCE_ANY": jnp.any,
                   "REDUCE_ALL": jnp.all}.items():
    _reducer(_name, _fn)


@op("ARG_MAX", static=(1,))
def arg_max(x, axis, *, output_type: int = 2, out_dtype=None, in_q: QList = None, out_q: QList = None):
    """Index of the first maximum along ``axis``."""
    return jnp.argmax(x, axis=int(np.ravel(axis)[0])).astype(out_dtype or np.int32)


@op("ARG_MIN", static=(1,))
def arg_min(x, axis, *, output_type: int = 2, out_dtype=None, in_q: QList = None, out_q: QList = None):
    """Index of the first minimum along ``axis``."""
    return jnp.argmin(x, axis=int(np.ravel(axis)[0])).astype(out_dtype or np.int32)
