"""The arithmetic ops call: matmul, dot_general, einsum and conv, dispatched on the weight's type.

Quantization swaps the arithmetic, not the op (design habit 6). The policy lives in the
params pytree, so an op written once runs in float, bf16 or int8 depending on what the
weight it receives is:

* a plain array: the usual ``lax`` op at ``Precision.HIGHEST`` (full float32, as ONNX
  defines products). A weight stored in a narrower float than the activation (bf16
  weights, f32 activations: ``auto``'s middle rung) is widened to the activation dtype.
* a :class:`qwix.QArray` (int8 values + per-output-channel scales): **weight-only int8**.
  The int8 values go into the dot as they are (``lax.dot_general`` with an int8 operand and
  a float result) and the per-channel scale multiplies the output, so no f32 copy of the
  weight is written to memory. Scales that vary along a contracted axis (sub-channel
  tiles) fall back to qwix's ``dot_general`` (dequantize, then dot).
* a :class:`W8A8` (a QArray plus an optional calibrated activation scale): **w8a8**. The
  activation is quantized to int8 at run time, per row (``act_scale is None``: dynamic) or
  with the calibrated per-tensor scale (static), and the product runs int8 x int8 -> int32
  (qwix's ``dot_general`` fast path: ``preferred_element_type=int32``), then both scales.
  Where int8 dots are not trusted (GPU, :func:`jaxinfer.intmath.native_int8_dots`) the int8
  activation values and the int8 weight go into a float32 dot instead: the same numbers up to
  float32 rounding, and the weight still stays int8 in memory.

qwix has the int8 array and the quantized dot, but no place to say "quantize the other
operand too, with this calibrated scale" outside its Flax interception providers, which a
graph of ONNX ops does not go through; :class:`W8A8` is that one missing piece.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from jax import lax

from . import conv_lowering, cpu_kernels, intmath

PRECISION = lax.Precision.HIGHEST

QArray = qwix.QArray


@jax.tree_util.register_dataclass
@dataclass(frozen=True)
class W8A8:
    """An int8 weight whose products also quantize the activation to int8.

    Attributes:
      w: the int8 weight (values + per-output-channel scales).
      act_scale: ``None`` for dynamic quantization (per-row absmax at run time), else the
        calibrated per-tensor activation scale (a float32 scalar array): static.
      act_unsigned: a static activation calibrated non-negative (after a ReLU, say): quantized over
        ``[0, 255 * act_scale]`` as int8 with zero point -128 (:data:`UNSIGNED_ZP`), 256 steps where
        symmetric int8 gives such values 128.
      transposed: the weight stored with its output channels (its last axis) first, scales on axis 0: a
        2-D ``[K, N]`` weight as ``[N, K]``, a convolution's HWIO filter as OHWI. Few-row products stream
        such a weight 1.3-1.4x faster on XLA CPU (each output's K values contiguous; 8 rows x 1024 x 4096,
        weights from DRAM), and our int8 conv kernel reads a filter as ``[O, H W I]``: an HWIO one was
        transposed and copied on every call (int8-dynamic ResNet-50 at batch 1: 13 of ~30 ms).
        :attr:`shape` and the products still speak of the ``[K, N]`` / HWIO weight.
    """

    w: QArray
    act_scale: jax.Array | None = None
    transposed: bool = field(default=False, metadata={"static": True})
    act_unsigned: bool = field(default=False, metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        stored = tuple(self.w.shape)
        return stored[1:] + stored[:1] if self.transposed else stored

    @property
    def ndim(self) -> int:
        return self.w.ndim

    @property
    def dtype(self) -> Any:
        return self.w.dtype

    @property
    def mode(self) -> str:
        return "int8-dynamic" if self.act_scale is None else "int8-static"


def untransposed(w: W8A8) -> QArray:
    """The ``[K, N]`` (or HWIO) QArray a :class:`W8A8` stands for, whatever its storage."""
    if not w.transposed:
        return w.w
    q = w.w
    back = (*range(1, q.qvalue.ndim), 0)
    zero = None if q.zero_point is None else jnp.transpose(q.zero_point, back)
    return QArray(jnp.transpose(q.qvalue, back), jnp.transpose(q.scale, back), zero, q.qtype)


def split_channels(w: Any, parts: int, axis: int) -> list[Any]:
    """``jnp.split(w, parts, axis)`` of a weight that may be quantized (``axis`` of the logical weight, as
    :attr:`W8A8.shape` speaks of it): each part of a QArray / W8A8 keeps its own channels' scales (and zero
    points), and a W8A8 its activation scale."""
    if isinstance(w, W8A8):
        stored = (axis + 1) % w.ndim if w.transposed else axis  # transposed: the last logical axis stored first
        return [W8A8(q, w.act_scale, w.transposed, w.act_unsigned) for q in split_channels(w.w, parts, stored)]
    if isinstance(w, QArray):
        def cut(v: Any) -> list[Any]:
            if v is None:
                return [None] * parts
            return jnp.split(v, parts, axis) if v.shape[axis] > 1 else [v] * parts

        return [QArray(q, s, z, w.qtype) for q, s, z in zip(cut(w.qvalue), cut(w.scale), cut(w.zero_point))]
    return jnp.split(jnp.asarray(w), parts, axis)


def is_quantized(x: Any) -> bool:
    return isinstance(x, (QArray, W8A8))


def kind(x: Any) -> str:
    """The arithmetic a weight selects: float, int8-weight, int8-dynamic or int8-static."""
    if isinstance(x, W8A8):
        return x.mode
    if isinstance(x, QArray):
        return "int8-weight"
    return "float"


def nbytes(x: Any) -> int:
    """Bytes a param (array, QArray or W8A8) holds on device."""
    return int(sum(np.dtype(leaf.dtype).itemsize * int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(x)))


# --------------------------------------------------------------------------- helpers
def _scale_contracted(q: QArray, axes: Sequence[int]) -> bool:
    return any(q.scale.shape[a] > 1 for a in axes)


def _output_scale(scale: jax.Array, dims: Any, ndim_lhs: int, for_rhs: bool) -> jax.Array:
    """A per-channel scale of one operand, laid out to broadcast against the dot's output.

    dot_general's output is ``batch dims, lhs free dims, rhs free dims``.
    """
    (lc, rc), (lb, rb) = dims
    contract, batch = (rc, rb) if for_rhs else (lc, lb)
    nd = scale.ndim
    free = [a for a in range(nd) if a not in contract and a not in batch]
    s = jnp.transpose(scale, tuple(batch) + tuple(contract) + tuple(free))
    s = s.reshape(tuple(scale.shape[a] for a in batch) + tuple(scale.shape[a] for a in free))
    n_batch = len(batch)
    n_lhs_free = ndim_lhs - len(lc) - len(lb)
    if for_rhs:
        # batch, [lhs free -> 1s], rhs free
        return s.reshape(s.shape[:n_batch] + (1,) * n_lhs_free + s.shape[n_batch:])
    return s  # batch, lhs free; rhs free dims broadcast from the right only if trailing 1s added by caller


def _float_dtype(a: Any) -> Any:
    dt = jnp.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.float32


#: The largest magnitude a symmetric int8 row maps to (qwix's convention: -127.5 rounds to -128 and
#: 127.5 to 128, which the clip makes 127), and its reciprocal as the float32 constant we multiply by.
_ROW_QMAX = 127.5
_ROW_INV_QMAX = np.float32(1.0 / _ROW_QMAX)


def quantize_rows(x: jax.Array, axes: Sequence[int]) -> QArray:
    """Dynamic symmetric int8 of an activation: one scale per index of the axes not in ``axes``.

    qwix's ``quantize`` divides twice (``absmax / 127.5``, then ``x / scale``), and XLA's simplifier turns
    ``x / s`` into ``x * (1 / s)`` and back depending on how it fused the program (a data-sharded program
    and its unsharded twin went opposite ways): a value at a rounding boundary then quantized one step
    apart. Here the scale is a multiply by ``1 / 127.5`` and each row's reciprocal sits behind an
    optimization barrier, so every program computes ``x * (1 / scale)`` and the same int8 values.
    """
    x = jnp.asarray(x)
    axes = tuple(sorted(a % x.ndim for a in axes)) if x.ndim else ()
    x, absmax = _absmax(x, axes)
    scale = absmax * jnp.asarray(_ROW_INV_QMAX, x.dtype)
    scale = jnp.where(scale < jnp.sqrt(jnp.finfo(x.dtype).tiny), jnp.ones_like(scale), scale)  # an all-zero row
    inv = lax.optimization_barrier(1 / scale)  # not folded back into a division by XLA
    q = intmath.round_saturate(x * inv, jnp.int8)
    return QArray(q, scale, None, jnp.int8)


def _absmax(x: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """``(x, max |x|)`` over ``axes`` (kept as 1s). One scale per leading index (a conv's per-sample scale) comes
    from our CPU kernel's row maximum with ``x`` back as the buffer it read (``buffers.cc``): XLA writes ``x`` once
    and the quantization reads it, where its reduction and the quantization each recomputed ``x`` from its
    producers. The numbers are the same."""
    if x.ndim >= 2 and axes == tuple(range(1, x.ndim)):
        x, amax = cpu_kernels.row_absmax(x, lambda r: jnp.max(jnp.abs(r), axis=tuple(range(1, r.ndim))))
        return x, amax.reshape((x.shape[0],) + (1,) * (x.ndim - 1))
    return x, jnp.max(jnp.abs(x), axis=axes, keepdims=True)


#: The zero point of an unsigned static activation (:attr:`W8A8.act_unsigned`): ``x / scale`` in [0, 255]
#: becomes int8 ``x / scale - 128``.
UNSIGNED_ZP = -128


def quantize_static(x: jax.Array, scale: jax.Array, unsigned: bool = False) -> QArray:
    """Static int8 of an activation with a calibrated per-tensor scale (clipped): symmetric, or for a
    non-negative activation (``unsigned``) ``round(x / scale) - 128`` with zero point :data:`UNSIGNED_ZP`
    (the QArray's ``zero_point``; only jaxinfer's own products read it, see :func:`dequantize_act`)."""
    s = jnp.asarray(scale, x.dtype)
    ones = (1,) * x.ndim
    if not unsigned:
        q = intmath.round_saturate(jnp.clip(x / s, -127, 127), jnp.int8)
        return QArray(q, jnp.broadcast_to(s, ones), None, jnp.int8)
    q = intmath.round_saturate(x / s, jnp.int8, UNSIGNED_ZP)
    return QArray(q, jnp.broadcast_to(s, ones), np.full(ones, UNSIGNED_ZP, np.int32), jnp.int8)  # a constant


def dequantize_act(xq: QArray, dtype: Any) -> jax.Array:
    """An activation's int8 values back as ``dtype``: ``(q - zero_point) * scale``, exact integers times
    the scale (qwix's own dequantize is not asked about zero points)."""
    if xq.zero_point is None:
        return qwix.dequantize(xq).astype(dtype)
    return ((xq.qvalue.astype(jnp.int32) - xq.zero_point).astype(dtype) * xq.scale.astype(dtype)).astype(dtype)


# ------------------------------------------------------------------------ dot_general
def dot_general(lhs: Any, rhs: Any, dimension_numbers: Any, *, precision: Any = PRECISION,
                preferred_element_type: Any = None) -> jax.Array:
    """``lax.dot_general`` where ``rhs`` (the weight) may be a QArray / W8A8 / narrower float."""
    if isinstance(rhs, W8A8):
        return _w8a8_dot(lhs, rhs, dimension_numbers, preferred_element_type)
    if isinstance(rhs, QArray):
        return _weight_only_dot(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    (lc, rc), (lb, rb) = dimension_numbers
    if (not lb and not rb and tuple(rc) == (1,) and rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,)
            and preferred_element_type is None and precision == PRECISION):
        y = conv_lowering.few_rows_matmul(lhs, rhs, nk=True)  # x @ w.T, a [N, K] weight: our kernel where it takes it
        if y is not None:
            return y
    lhs, rhs = _align_float(lhs, rhs)
    return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                           preferred_element_type=preferred_element_type)


def _align_float(a: Any, b: Any) -> tuple[Any, Any]:
    """A float weight narrower than the activation (bf16 storage, f32 compute) is widened."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    if (a.dtype != b.dtype and jnp.issubdtype(a.dtype, jnp.floating) and jnp.issubdtype(b.dtype, jnp.floating)):
        if jnp.finfo(b.dtype).bits < jnp.finfo(a.dtype).bits:
            b = b.astype(a.dtype)
        else:
            a = a.astype(b.dtype)
    return a, b


def _weight_only_dot(lhs: Any, w: QArray, dims: Any, precision: Any, pet: Any) -> jax.Array:
    (lc, rc), (lb, rb) = dims
    out_dtype = pet or _float_dtype(lhs)
    if w.zero_point is not None or _scale_contracted(w, rc) or _scale_contracted(w, rb):
        return qwix.dot_general(lhs, w, dims, precision=precision, preferred_element_type=pet)
    # int8 values straight into the dot (XLA converts inside the dot, no f32 weight copy; our CPU kernel widens
    # them in registers for few rows), per-output-channel scale on the output.
    lhs = jnp.asarray(lhs)
    if (not lb and not rb and tuple(rc) == (0,) and w.ndim == 2 and tuple(lc) == (lhs.ndim - 1,)
            and lhs.dtype == jnp.float32 and out_dtype == jnp.float32 and w.qvalue.dtype == jnp.int8):
        def rows_by_kn(x: Any, wq: Any) -> jax.Array:  # x [..., K] by a [K, N] MatMul weight, any leading dims
            return lax.dot_general(x, wq, (((x.ndim - 1,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=out_dtype)

        y = cpu_kernels.f32_int8w_dot(lhs, w.qvalue, rows_by_kn)
    else:
        y = lax.dot_general(lhs, w.qvalue, dims, precision=precision, preferred_element_type=out_dtype)
    return y * _output_scale(w.scale.astype(out_dtype), dims, jnp.ndim(lhs), for_rhs=True)


def _w8a8_dot(lhs: Any, w: W8A8, dims: Any, pet: Any) -> jax.Array:
    (lc, rc), (lb, rb) = dims
    if w.transposed:  # the caller's axes are the [K, N] weight's; w.w holds [N, K]
        dims = ((lc, tuple(1 - a for a in rc)), (lb, tuple(1 - a for a in rb)))
    lhs = jnp.asarray(lhs)
    out_dtype = pet or _float_dtype(lhs)
    if w.act_scale is None and intmath.native_int8_dots() and _dynamic_rows(lhs, w.w, dims):
        out = cpu_kernels.int8_dot_dyn(lhs, w.w.qvalue, _dynamic_rows_dot)  # the row scales applied
        return jnp.multiply(out, jnp.reshape(w.w.scale, (w.w.scale.shape[0],))).astype(out_dtype)
    if w.act_scale is None:
        xq = quantize_rows(lhs, lc)
    else:
        xq = quantize_static(lhs, w.act_scale, w.act_unsigned)
    if _rows_by_channels(xq, w.w, dims) and intmath.native_int8_dots():
        return _rows_dot(xq, w.w, out_dtype)
    if not intmath.native_int8_dots() or xq.zero_point is not None:
        # the int8 activation's values (exact in float), the int8 weight into a float dot: where int8 dots
        # are not trusted, and for an unsigned activation outside the rows-by-channels product
        return _weight_only_dot(dequantize_act(xq, out_dtype), w.w, dims, PRECISION, out_dtype)
    return qwix.dot_general(xq, w.w, dims, preferred_element_type=out_dtype)


def _rows_by_channels(xq: QArray, w: QArray, dims: Any) -> bool:
    """Whether ``xq`` [..., K] (one scale per row or per tensor) meets a ``[N, K]`` int8 weight with one
    scale per output channel: the product :func:`_rows_dot` computes."""
    (lc, rc), (lb, rb) = dims
    return (not lb and not rb and tuple(lc) == (xq.ndim - 1,) and tuple(rc) == (1,) and w.ndim == 2
            and (xq.zero_point is None or xq.zero_point.size == 1) and w.zero_point is None
            and xq.qvalue.dtype == jnp.int8
            and w.qvalue.dtype == jnp.int8 and xq.scale.ndim == xq.ndim and xq.scale.shape[-1] == 1
            and w.scale.shape[1] == 1)


def _dynamic_rows(lhs: jax.Array, w: QArray, dims: Any) -> bool:
    """Whether a float32 ``lhs`` [..., K] quantized per row meets a ``[N, K]`` int8 weight with one scale per
    output channel: the product :func:`jaxinfer.cpu_kernels.int8_dot_dyn` takes whole."""
    (lc, rc), (lb, rb) = dims
    return (not lb and not rb and lhs.dtype == jnp.float32 and lhs.ndim >= 1 and tuple(lc) == (lhs.ndim - 1,)
            and tuple(rc) == (1,) and w.ndim == 2 and w.zero_point is None and w.qvalue.dtype == jnp.int8
            and w.scale.shape == (w.shape[0], 1))


def _dynamic_rows_dot(x: jax.Array, wq: jax.Array) -> jax.Array:
    """float32 ``x`` [..., K] quantized per row (:func:`quantize_rows`) times int8 ``wq`` [N, K], the int32
    sums times the row scales: the first steps of :func:`_rows_dot`, which the kernel's fused call reproduces."""
    xq = quantize_rows(x, (x.ndim - 1,))
    return jnp.multiply(cpu_kernels.int8_dot(xq.qvalue, wq), xq.scale)


def _rows_dot(xq: QArray, w: QArray, out_dtype: Any) -> jax.Array:
    """``xq @ w.T`` as qwix's fast path computes it (int32 sums, then the row scales, then the channel
    scales), the int32 sums from :func:`jaxinfer.cpu_kernels.int8_dot` (few rows on XLA CPU: our kernel)."""
    if xq.zero_point is None:
        acc = cpu_kernels.int8_dot(xq.qvalue, w.qvalue)
    else:  # one zero point for the tensor (an unsigned static activation), subtracted in the kernel's pass
        zp = jnp.broadcast_to(jnp.reshape(xq.zero_point, ()).astype(jnp.int32), xq.qvalue.shape[:-1])
        acc = cpu_kernels.int8_dot_zp(xq.qvalue, zp, w.qvalue)
    out = jnp.multiply(acc, xq.scale)
    out = jnp.multiply(out, jnp.reshape(w.scale, (w.scale.shape[0],)))
    return out.astype(out_dtype)


# ------------------------------------------------------------------------------ matmul
def matmul(a: Any, b: Any) -> jax.Array:
    """numpy ``matmul`` semantics; ``b`` may be a quantized 2-D weight ``[K, N]``."""
    if not is_quantized(b) and hasattr(a, "dtype") and hasattr(b, "dtype"):
        y = conv_lowering.few_rows_matmul(jnp.asarray(a), jnp.asarray(b))  # our kernel, where it takes this product
        if y is not None:
            return y
    if is_quantized(b) or (hasattr(b, "dtype") and hasattr(a, "dtype") and a.dtype != b.dtype):
        a = jnp.asarray(a)
        if is_quantized(b):
            if b.ndim != 2:
                raise ValueError(f"a quantized MatMul weight must be 2-D, got shape {b.shape}")
            if a.ndim == 1:
                return dot_general(a[None, :], b, (((1,), (0,)), ((), ())))[0]
            return dot_general(a, b, (((a.ndim - 1,), (0,)), ((), ())))
        a, b = _align_float(a, b)
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.dtype == jnp.float32 and b.dtype == jnp.float32:
        y = conv_lowering.f32_matmul(a, b)  # our kernel's product, where it takes this one
        if y is not None:
            return y
    return jnp.matmul(a, b, precision=PRECISION)


# ------------------------------------------------------------------------------ einsum
def einsum(equation: str, *operands: Any) -> jax.Array:
    """``jnp.einsum``; a quantized operand goes through qwix's einsum (int8-weight: dequantize
    fused by XLA; w8a8: the other operands quantized per tensor at run time)."""
    if not any(is_quantized(o) for o in operands):
        if len({jnp.asarray(o).dtype for o in operands}) > 1:
            ref = max((jnp.asarray(o) for o in operands), key=lambda o: jnp.finfo(o.dtype).bits
                      if jnp.issubdtype(o.dtype, jnp.floating) else 0)
            operands = tuple(_align_float(ref, o)[1] for o in operands)
        return jnp.einsum(equation, *operands, precision=PRECISION)
    ops: list[Any] = []
    w8a8 = next((o for o in operands if isinstance(o, W8A8)), None)
    for o in operands:
        if isinstance(o, W8A8):
            ops.append(untransposed(o))
        elif isinstance(o, QArray):
            ops.append(o)
        elif w8a8 is not None:
            x = jnp.asarray(o)
            xq = (quantize_static(x, w8a8.act_scale, w8a8.act_unsigned) if w8a8.act_scale is not None
                  else quantize_rows(x, range(x.ndim)))  # one scale for the tensor
            # no int8 x int8 einsum where int8 dots are not trusted (nor with a zero point): the values in float
            native = intmath.native_int8_dots() and xq.zero_point is None
            ops.append(xq if native else dequantize_act(xq, x.dtype))
        else:
            ops.append(o)
    return qwix.einsum(equation, *ops, preferred_element_type=jnp.float32)


# -------------------------------------------------------------------------------- conv
def conv(lhs: Any, rhs: Any, window_strides: Sequence[int], padding: Any, *, lhs_dilation: Any = None,
         rhs_dilation: Any = None, dimension_numbers: Any = None, feature_group_count: int = 1,
         batch_group_count: int = 1, precision: Any = PRECISION, preferred_element_type: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` where ``rhs`` (the kernel) may be quantized.

    int8-weight: the kernel is dequantized into the conv (XLA fuses the convert on
    accelerators; on CPU it is a small per-call copy of the kernel). w8a8: the input is
    quantized per sample (dynamic) or with the calibrated scale (static), then the conv runs
    int8 x int8 -> int32 through :func:`jaxinfer.intmath.zp_conv` (our CPU kernel's patch product on
    AVX-512 VNNI, else the exact float32 route: XLA CPU's integer convolution is ~10x slower than
    that, XLA GPU has none), on TPU through qwix.
    """
    kw = dict(lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
              feature_group_count=feature_group_count, batch_group_count=batch_group_count)
    if isinstance(rhs, W8A8):
        x = jnp.asarray(lhs)
        out_dtype = preferred_element_type or _float_dtype(x)
        if rhs.act_scale is None:
            xq = _quantize_samples(x, lax.conv_dimension_numbers(x.shape, rhs.shape, dimension_numbers))
        else:
            xq = quantize_static(x, rhs.act_scale, rhs.act_unsigned)
        if jax.default_backend() != "tpu":
            y = _exact_w8a8_conv(xq, untransposed(rhs), window_strides, padding, out_dtype, kw)
            if y is not None:
                return y
        if not intmath.native_int8_dots() or xq.zero_point is not None:  # XLA GPU: no integer convolutions
            return conv_lowering.conv_general_dilated(
                dequantize_act(xq, out_dtype), qwix.dequantize(untransposed(rhs)).astype(out_dtype),
                window_strides, padding, precision=PRECISION, preferred_element_type=out_dtype, **kw)
        return qwix.conv_general_dilated(xq, untransposed(rhs), window_strides, padding, preferred_element_type=out_dtype,
                                         **kw)
    if isinstance(rhs, QArray):
        # qwix's conv takes int8 only on both sides; a float input dequantizes the kernel
        # (a convert + multiply XLA fuses into the conv's operand on accelerators).
        rhs = qwix.dequantize(rhs).astype(_float_dtype(lhs))
    lhs, rhs = _align_float(lhs, rhs)
    return conv_lowering.conv_general_dilated(lhs, rhs, window_strides, padding, precision=precision,
                                              preferred_element_type=preferred_element_type, **kw)


def _quantize_samples(x: jax.Array, dn: lax.ConvDimensionNumbers) -> QArray:
    """A conv input quantized with one scale per sample (:func:`quantize_rows`), computed channels-last: the
    layout our int8 conv kernel reads, so that the buffer the scale's reduction reads (``_absmax``) is the one
    the quantization reads too, without a transposed copy on either side (an NCHW buffer cost squeezenet's
    int8-dynamic batch 8 ~25 %); the values come back in ``x``'s layout, which XLA's transposes cancel."""
    def per_sample(v: jax.Array) -> tuple[jax.Array, jax.Array]:
        xq = quantize_rows(v, tuple(range(1, v.ndim)))
        return xq.qvalue, xq.scale

    q, scale = conv_lowering.channels_last(per_sample, x, dn.lhs_spec)
    return QArray(q, scale, None, jnp.int8)


def _exact_w8a8_conv(xq: QArray, wq: QArray, window_strides: Sequence[int], padding: Any, out_dtype: Any,
                     kw: dict[str, Any]) -> jax.Array | None:
    """int8 x int8 conv (the activation symmetric, or with one constant zero point), exact int32 sums, then
    the per-sample and per-channel scales.

    None when the operands are outside what this handles (weight zero points, scales along other axes,
    lhs dilation or batch groups): the caller then uses qwix.
    """
    lhs_dilated = kw["lhs_dilation"] is not None and any(d != 1 for d in kw["lhs_dilation"])
    if ((xq.zero_point is not None and xq.zero_point.size != 1) or wq.zero_point is not None or lhs_dilated
            or kw["batch_group_count"] != 1):
        return None
    x_zp = None if xq.zero_point is None else xq.zero_point.reshape(())  # a numpy constant: the kernel takes it
    dn = lax.conv_dimension_numbers(xq.qvalue.shape, wq.qvalue.shape, kw["dimension_numbers"])
    xs, ws = _scale_along(xq.scale, dn.lhs_spec[0]), _scale_along(wq.scale, dn.rhs_spec[0])
    if xs is None or ws is None:
        return None
    acc = intmath.zp_conv(xq.qvalue, x_zp, wq.qvalue, None, window_strides, padding, bound=255 * 128,
                          dimension_numbers=dn, rhs_dilation=kw["rhs_dilation"],
                          feature_group_count=kw["feature_group_count"])
    ndim = acc.ndim

    def along(s: jax.Array, axis: int) -> jax.Array:
        return s.astype(out_dtype).reshape([s.size if i == axis else 1 for i in range(ndim)])

    return acc.astype(out_dtype) * along(xs, dn.out_spec[0]) * along(ws, dn.out_spec[1])


def _scale_along(scale: Any, axis: int) -> jax.Array | None:
    """A keepdims scale's values along ``axis`` (flattened), or None if it varies along another axis."""
    scale = jnp.asarray(scale)
    if any(d != 1 for i, d in enumerate(scale.shape) if i != axis):
        return None
    return scale.reshape(-1)


__all__ = ["PRECISION", "QArray", "W8A8", "conv", "dot_general", "einsum", "is_quantized", "kind", "untransposed",
           "matmul", "nbytes", "quantize_rows", "quantize_static", "dequantize_act", "split_channels", "UNSIGNED_ZP"]
