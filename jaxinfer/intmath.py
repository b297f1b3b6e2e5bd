"""Exact integer dots and convolutions: int8 dots, or float sums that cannot round.

Quantized kernels (ONNX QLinearConv/ConvInteger/MatMulInteger and the QDQ-fused ops, TFLite's
int8/int16 CONV_2D/FULLY_CONNECTED) need the int32 sum of products of small integers. XLA
CPU's integer convolution is a slow generic loop (a 3x3 64->64 conv on 8x56x56: ~370 ms in
int32, ~32 ms in float32 on the development machine), and so are its dots of anything but two
int8 operands. A float32 sum of integers stays exact while every partial sum is below 2**24, in
any order and with FMAs, so when ``terms * bound < 2**24`` (``bound`` = the largest |product|)
the float32 result *is* the integer result. Longer reductions are split into chunks that each
stay exact, and the chunks' int32 results are added; when even a one-item chunk is too long
(int16 x int8 products) float64 is used, exact below 2**53.

Every float product here asks for ``Precision.HIGHEST``, so no backend swaps in a reduced
precision (TF32, bf16 passes) that would break exactness.

Matmuls of 8-bit operands go another way (:func:`zp_matmul`): a true int8 x int8 -> int32
``dot_general`` on the raw values, with the zero points applied afterwards as sums
(``sum (a - za)(b - zb) = a.b - za*colsum(b) - zb*rowsum(a) + K*za*zb``). XLA CPU hands
those dots to its int8 library kernels, which read a quarter of the float32 route's bytes
(8x1024 x 1024x4096: ~0.7 ms against ~2.5 ms for converting both sides and a float dot).
That route is taken where int8 dots are trusted (:func:`native_int8_dots`: XLA CPU, TPU); on
GPU the exact float route is used instead (see there why).

Convolutions of 8-bit operands (:func:`zp_conv`) take our CPU kernel's patch product on AVX-512 VNNI
hosts (:func:`cpu_kernels.int8_conv`: the zero point pads the image, so it needs no correction),
and the exact float route elsewhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax import lax

from . import cpu_kernels
from .conv_lowering import conv_general_dilated, from_nhwc, ohwi, to_nhwc

#: float32 holds every integer of magnitude below this exactly.
F32_EXACT = 1 << 24
#: Products above this bound (int16 x int8) leave float32 chunks too short to pay off: use float64.
CHUNK_BOUND_MAX = 1 << 16
_HIGHEST = lax.Precision.HIGHEST


def native_int8_dots() -> bool:
    """Whether int8 x int8 -> int32 ``dot_general`` is used as such: on XLA CPU (its int8 library
    kernels; every quantized test checks it) and TPU (int8 matrix units; not run here).

    On GPU the exact float sums are used instead. On an H200 (jax 0.11.2, CUDA 13) XLA's int8 dots
    returned wrong sums: ONNX MatMulInteger of a 4x3 by 3x2 uint8 product gave 1844 where -38 is
    right, and QLinearMatMul, TFLite hybrid LSTM/RNN/SVDF and w8a8 products were off the same way.
    XLA GPU has no integer convolutions at all (``UNIMPLEMENTED``: cuDNN lowers only narrow idioms).
    Session 18's H200 run: a [6, 33] x [17, 33] int8 dot gave exactly twice every sum.
    """
    return jax.default_backend() in ("cpu", "tpu")


def ieee_division() -> bool:
    """Whether a float32 tensor is divided by a scale as written (``x / s``): everywhere but GPU.

    XLA divides by a scalar (or a broadcast one) as a multiplication by its reciprocal, 1 ulp off the
    quotient for most inputs, on CPU too (measured: 72 % of ``v / 255``); that moves a rounded
    quantized value only where the quotient sits within an ulp of a .5 tie, and taking the quotient
    in float64 on CPU made the int8 BERT fixture (bert_qdq) 1.81x slower with the same outputs, so
    the CPU keeps ``x / s``. On an H200 the ONNX DynamicQuantizeLinear backend case hit such a tie
    (-2.5 / (5/255): -127.5 where the float32 quotient is -127.49999): there :func:`divide` takes the
    float64 route. Session 18's H200 run still gave -127.5 through it (the backend case fails there;
    why XLA GPU loses the float64 quotient is not established: not re-testable here).
    """
    return jax.default_backend() != "gpu"


def divide(x: Any, s: Any) -> jax.Array:
    """``x / s`` for quantizers' tensors: as written where :func:`ieee_division`, else :func:`quotient`
    (a float32 quotient taken in float64 and rounded back is the float32 quotient: 53 >= 2 * 24 + 2
    bits, so double rounding of a quotient is harmless)."""
    return jnp.asarray(x) / jnp.asarray(s) if ieee_division() else quotient(x, s)


def quotient(x: Any, s: Any) -> jax.Array:
    """``x / s`` as the correctly rounded float32 quotient on every backend, for the small operands of
    scales and requantization multipliers: taken in float64 and rounded back. XLA divides by a
    scalar as a multiplication by its reciprocal, CPU too, which can be 1 ulp off the quotient
    onnxruntime and LiteRT compute (DynamicQuantizeLinear's ``(max - min) / 255`` was, on CPU)."""
    x, s = jnp.asarray(x), jnp.asarray(s)
    if jnp.result_type(x, s) != jnp.float32:
        return x / s
    return (x.astype(jnp.float64) / s.astype(jnp.float64)).astype(jnp.float32)


#: 1.5 * 2**23: a float32 of magnitude below 2**22 added to it is rounded half to even to an integer,
#: which then sits in the sum's low mantissa bits (its bit pattern is ``_ROUNDER_BITS + n``).
_ROUNDER = np.float32(1.5 * 2.0 ** 23)
_ROUNDER_BITS = 0x4B400000


def round_saturate(v: Any, dtype: Any, zero_point: Any = None) -> jax.Array:
    """``clip(round_half_even(v) + zero_point, dtype's range).astype(dtype)`` for a float32 ``v`` and an
    integer type of at most 16 bits: the quantizers' last step, without XLA CPU's float-to-integer
    convert.

    That convert is slow on XLA CPU (saturation and NaN handling per element): over 256 x 256 values on
    one core, a plain ``clip(round(v) + 128, 0, 255).astype(uint8)`` took 29.5 us against 12.6 us here,
    and four quantize-dequantize steps in a row 134 against 54 us. Here ``v`` is first clipped to the
    range less the zero point (integers, so clipping commutes with rounding), rounded by adding
    :data:`_ROUNDER` (exact float32 addition in round-half-even mode), and the integer read back from the
    sum's bits; the zero point is added in int32. Other dtypes and wider floats take the plain route.
    A NaN's result is not defined (nor is it by ONNX or TFLite): on XLA CPU it came out 0 or the zero
    point, depending on how the program was fused.
    """
    v = jnp.asarray(v)
    target = np.dtype(dtype)
    zp = None if zero_point is None else jnp.asarray(zero_point).astype(jnp.int32)
    lo, hi = int(ml_dtypes.iinfo(target).min), int(ml_dtypes.iinfo(target).max)
    if v.dtype != jnp.float32 or target.itemsize > 2 or not jnp.issubdtype(target, jnp.integer):
        q = jnp.round(v) if zp is None else jnp.round(v) + zp.astype(v.dtype)
        return jnp.clip(q, lo, hi).astype(target)
    if zp is None:
        c = jnp.clip(v, np.float32(lo), np.float32(hi))
    else:
        zf = zp.astype(jnp.float32)
        c = jnp.clip(v, lo - zf, hi - zf)
    n = lax.bitcast_convert_type(c + _ROUNDER, jnp.int32) - _ROUNDER_BITS
    return (n if zp is None else n + zp).astype(target)


def abs_bound(dtype: Any, shifted: bool) -> int:
    """Largest |v| of an integer tensor of ``dtype``; ``shifted``: of ``v - zero_point`` (zp in range)."""
    info = ml_dtypes.iinfo(np.dtype(dtype))  # numpy's iinfo does not know int4/uint4
    return int(info.max) - int(info.min) if shifted else max(int(info.max), -int(info.min))


def exact_float(terms: int, bound: int) -> Any:
    """A float dtype whose sums of ``terms`` products (each |p| <= bound) are exact integers."""
    return jnp.float32 if terms * bound < F32_EXACT else jnp.float64


def float_chunks(total: int, per_item: int, bound: int) -> list[tuple[int, int]] | None:
    """Split ``total`` reduction items (``per_item`` products each) into float32-exact chunks; None: use float64."""
    step = (F32_EXACT - 1) // (per_item * bound)
    if step < 1 or (bound > CHUNK_BOUND_MAX and step < total):
        return None
    return [(i, min(i + step, total)) for i in range(0, total, step)]


def exact_dot(a: Any, b: Any, dims: Any, k_axis_a: int, k_axis_b: int, bound: int,
              acc_dtype: Any = jnp.int32) -> jax.Array:
    """Integer ``lax.dot_general`` (``acc_dtype`` result) of integer-valued ``a``, ``b``; |a*b| <= ``bound``.

    ``dims`` must contract one axis: ``k_axis_a`` of ``a`` with ``k_axis_b`` of ``b``.
    """
    k = a.shape[k_axis_a]
    parts = float_chunks(k, 1, bound)
    if parts is None:
        return lax.dot_general(a.astype(jnp.float64), b.astype(jnp.float64), dims,
                               precision=_HIGHEST).astype(acc_dtype)
    acc = None
    for lo, hi in parts:
        pa = lax.slice_in_dim(a, lo, hi, axis=k_axis_a).astype(jnp.float32)
        pb = lax.slice_in_dim(b, lo, hi, axis=k_axis_b).astype(jnp.float32)
        part = lax.dot_general(pa, pb, dims, precision=_HIGHEST).astype(jnp.int32).astype(acc_dtype)
        acc = part if acc is None else acc + part
    return acc


def _int8(v: jax.Array) -> tuple[jax.Array, int] | None:
    """``v`` as int8 plus the shift taken off (uint8 moves down by 128); None for other dtypes."""
    dt = np.dtype(v.dtype)
    if dt == np.int8:
        return v, 0
    if dt == np.uint8:
        return (v.astype(jnp.int16) - 128).astype(jnp.int8), 128
    return None


def _static_zero(z: Any) -> bool:
    """True when zero point ``z`` is known at trace time to be all zeros."""
    if z is None:
        return True
    if isinstance(z, jax.core.Tracer):
        return False
    return not np.any(np.asarray(z))


def zero_point(z: Any, shape: Sequence[int] | None = None) -> Any:
    """A zero point as int32: a scalar when per-tensor, else reshaped to ``shape`` (when given).

    A numpy constant stays numpy: inside a trace every ``jnp`` op yields a tracer, and
    :func:`zp_matmul` needs to see an all-zero zero point to leave its correction out.
    """
    if z is None:
        return None
    xp = jnp if isinstance(z, jax.core.Tracer) else np
    z = xp.asarray(z).astype(np.int32)
    if z.size == 1:
        return xp.reshape(z, ())
    return z if shape is None else xp.reshape(z, shape)


def _shifted_zp(zp: Any, shift: int) -> Any:
    """The zero point of an operand moved down by ``shift`` (int32; a plain 0 when both are zero)."""
    if _static_zero(zp):
        return -shift if shift else 0
    z = zero_point(zp)
    return z - shift if shift else z


def zp_matmul(a: Any, a_zp: Any, b: Any, b_zp: Any, *, trans_b: bool = False) -> jax.Array:
    """``sum_k (a - a_zp)(b - b_zp)`` in int32, ``jnp.matmul`` semantics (``b`` [N, K] when ``trans_b``).

    ``a`` [..., M, K] and ``b`` [..., K, N] hold raw integers; ``a_zp`` is None, a scalar or per row
    (broadcasting against ``a`` with size 1 on K), ``b_zp`` None, a scalar or per column
    (broadcasting against ``b`` with size 1 on K; [N, 1] when ``trans_b``). Two 8-bit operands
    take one int8 dot with the zero points applied after it; int32 wraps, so the result is exact
    whenever the true sum fits int32. Other dtypes, and every dtype where int8 dots are not
    trusted (:func:`native_int8_dots`), go through :func:`exact_matmul`.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    a8, b8 = _int8(a), _int8(b)
    bound = abs_bound(a.dtype, a_zp is not None) * abs_bound(b.dtype, b_zp is not None)
    if (a8 is None or b8 is None or a.ndim < 2 or b.ndim < 2 or not native_int8_dots()
            or _small_batched(a, b, bound, trans_b)):
        ai = a.astype(jnp.int32) - (0 if a_zp is None else jnp.asarray(a_zp).astype(jnp.int32))
        bi = b.astype(jnp.int32) - (0 if b_zp is None else jnp.asarray(b_zp).astype(jnp.int32))
        return exact_matmul(ai, jnp.swapaxes(bi, -1, -2) if trans_b else bi, bound)
    (a8, sa), (b8, sb) = a8, b8
    za, zb = _shifted_zp(a_zp, sa), _shifted_zp(b_zp, sb)
    k = a.shape[-1]
    if b.ndim == 2:
        return _rows_dot(a8, za, b8, zb, trans_b, a if sa else None)
    if trans_b:
        b8 = jnp.swapaxes(b8, -1, -2)
        zb = jnp.swapaxes(zb, -1, -2) if jnp.ndim(zb) >= 2 else zb
    acc = jnp.matmul(a8, b8, preferred_element_type=jnp.int32)
    if not _static_zero(za):
        acc = acc - za * jnp.sum(b8, axis=-2, keepdims=True, dtype=jnp.int32)
    if not _static_zero(zb):
        acc = acc - jnp.sum(a8, axis=-1, keepdims=True, dtype=jnp.int32) * zb
    if not (_static_zero(za) or _static_zero(zb)):
        acc = acc + k * za * zb
    return acc


#: Batched 8-bit products (two activations: attention) of at most this many multiply-adds, each sum short
#: enough to stay exact in float32, run as float32 dots: XLA CPU's batched int8 dot is slower there.
#: Measured on the 2-core host, uint8 operands with zero points, int8 vs float32 route: [32, 32, 16] x
#: [32, 16, 32] 92 vs 39 us, [32, 16, 16] x [32, 16, 16] 32 vs 24 us; at [96, 128, 64] x [96, 64, 128]
#: (100M) 2.42 vs 2.52 ms.
SMALL_BATCHED_MACS = 1 << 24


def _small_batched(a: jax.Array, b: jax.Array, bound: int, trans_b: bool) -> bool:
    """Whether :func:`zp_matmul` takes a batched product through exact float32 (see :data:`SMALL_BATCHED_MACS`)."""
    if b.ndim < 3 or a.ndim < 2:
        return False
    k, n = a.shape[-1], b.shape[-2] if trans_b else b.shape[-1]
    macs = math.prod(np.broadcast_shapes(a.shape[:-2], b.shape[:-2])) * a.shape[-2] * k * n
    return k * bound < F32_EXACT and macs <= SMALL_BATCHED_MACS


def _rows_dot(a8: jax.Array, za: Any, b8: jax.Array, zb: Any, trans_b: bool,
              a_u8: jax.Array | None = None) -> jax.Array:
    """:func:`zp_matmul` against a 2-D ``b`` (a weight): ``a``'s leading axes flattened into rows.

    ``za * colsum(b)`` needs the column sums of ``b``: an ``[N, K]`` weight takes
    :func:`cpu_kernels.int8_dot_zp`, which subtracts ``za`` from ``a`` as it widens it; otherwise a
    row of ones appended to ``a`` makes the dot compute them in the same pass over ``b``. ``a_u8`` is the uint8
    operand ``a8`` was shifted from (None for int8): the kernel reads it as it is, and ``a8`` (an XLA loop of its
    own between a DynamicQuantizeLinear and its MatMulInteger) is then never made.
    """
    lead, k = a8.shape[:-1], a8.shape[-1]
    n = b8.shape[0] if trans_b else b8.shape[1]
    rows = a8.reshape(-1, k)
    need_colsum = not _static_zero(za)
    za_rows = jnp.broadcast_to(jnp.asarray(za, jnp.int32), lead + (1,)).reshape(-1, 1) if need_colsum else None
    if trans_b and need_colsum and a_u8 is not None and _static_zero(zb):
        return cpu_kernels.int8_dot_zp(a_u8.reshape(-1, k), za_rows[:, 0] + 128, b8).reshape(lead + (n,))
    if trans_b:  # a [N, K] weight: few rows take our CPU kernel (the same sums)
        acc = cpu_kernels.int8_dot_zp(rows, za_rows[:, 0], b8) if need_colsum else cpu_kernels.int8_dot(rows, b8)
    else:
        lhs = jnp.concatenate([rows, jnp.ones((1, k), jnp.int8)]) if need_colsum else rows
        out = lax.dot_general(lhs, b8, (((1,), (0,)), ((), ())), preferred_element_type=jnp.int32)
        acc = out[:-1] - za_rows * out[-1:] if need_colsum else out
    if not _static_zero(zb):
        zb_cols = jnp.reshape(zb, (1, n) if jnp.size(zb) > 1 else (1, 1))
        acc = acc - jnp.sum(rows, axis=1, keepdims=True, dtype=jnp.int32) * zb_cols
        if need_colsum:
            acc = acc + k * za_rows * zb_cols
    return acc.reshape(lead + (n,))


def exact_matmul(a: Any, b: Any, bound: int, acc_dtype: Any = jnp.int32) -> jax.Array:
    """``jnp.matmul`` semantics (batch broadcasting, 1-D operands) for integer-valued operands, exactly."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    k_b = 0 if b.ndim == 1 else b.ndim - 2
    parts = float_chunks(a.shape[-1], 1, bound)
    if parts is None:
        return jnp.matmul(a.astype(jnp.float64), b.astype(jnp.float64), precision=_HIGHEST).astype(acc_dtype)
    acc = None
    for lo, hi in parts:
        pa = lax.slice_in_dim(a, lo, hi, axis=a.ndim - 1).astype(jnp.float32)
        pb = lax.slice_in_dim(b, lo, hi, axis=k_b).astype(jnp.float32)
        part = jnp.matmul(pa, pb, precision=_HIGHEST).astype(jnp.int32).astype(acc_dtype)
        acc = part if acc is None else acc + part
    return acc


def exact_conv(x: Any, w: Any, window_strides: Sequence[int], padding: Any, *, bound: int,
               dimension_numbers: Any = None, rhs_dilation: Sequence[int] | None = None,
               feature_group_count: int = 1, acc_dtype: Any = jnp.int32) -> jax.Array:
    """Integer ``lax.conv_general_dilated`` of integer-valued ``x``, ``w`` (|x*w| <= ``bound``), exactly.

    Zero padding adds nothing, so ``x`` must already be zero-point shifted. A reduction too long
    for one exact float32 convolution is split over input channels (ungrouped convs only).
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
    in_x, in_w = dn.lhs_spec[1], dn.rhs_spec[1]
    window = int(np.prod([w.shape[i] for i in dn.rhs_spec[2:]]))
    cin = w.shape[in_w]

    def conv(a: Any, b: Any, ft: Any) -> jax.Array:
        return conv_general_dilated(a.astype(ft), b.astype(ft), window_strides, padding, rhs_dilation=rhs_dilation,
                                    dimension_numbers=dn, feature_group_count=feature_group_count, precision=_HIGHEST)

    if feature_group_count == 1:
        parts = float_chunks(cin, window, bound)
    else:
        parts = [(0, cin)] if window * cin * bound < F32_EXACT else None
    if parts is None:
        return conv(x, w, jnp.float64).astype(acc_dtype)
    if not parts:  # no input channels: every sum is empty
        return conv(x, w, jnp.float32).astype(acc_dtype)
    acc = None
    for lo, hi in parts:
        xs = x if len(parts) == 1 else lax.slice_in_dim(x, lo, hi, axis=in_x)
        ws = w if len(parts) == 1 else lax.slice_in_dim(w, lo, hi, axis=in_w)
        part = conv(xs, ws, jnp.float32).astype(jnp.int32).astype(acc_dtype)
        acc = part if acc is None else acc + part
    return acc


def _zp_fits(z: Any, dtype: Any) -> bool:
    """Whether zero point ``z`` is one value of ``dtype`` (the patches are padded with it in 8 bits): known
    when ``z`` is a constant, or a traced value of ``dtype`` itself."""
    if z is None:
        return True
    if isinstance(z, jax.core.Tracer):
        return z.size == 1 and np.dtype(z.dtype) == np.dtype(dtype)
    v = np.asarray(z)
    info = np.iinfo(np.dtype(dtype))
    return v.size == 1 and np.issubdtype(v.dtype, np.integer) and info.min <= int(v.reshape(())) <= info.max


def _kernel_conv_takes(x: jax.Array, x_zp: Any, w: jax.Array, dn: Any, feature_group_count: int,
                       acc_dtype: Any) -> bool:
    """Whether :func:`zp_conv` runs as our kernel's patch product: 2-D, ungrouped, 8-bit operands, a
    per-tensor zero point of x's type, int32 sums, on a CPU whose kernel has AVX-512 VNNI (the AVX2 path
    has no panels: there the float32 convolution stays). Whatever the shape: the kernel was 1.3-8x
    faster than the float32 convolution on every layer timed (session 20: 3x3 and 7x7 stems, 1x1 layers
    of 32-512 channels up to 2048 outputs, 3x3 layers of 8-256 channels at batch 1 and 8)."""
    if x.ndim != 4 or feature_group_count != 1 or np.dtype(acc_dtype) != np.int32:
        return False
    if _int8(x) is None or _int8(w) is None or not _zp_fits(x_zp, x.dtype):
        return False
    return cpu_kernels.available() and cpu_kernels.isa() == 2


_NHWC_DN = ("NHWC", "OHWI", "NHWC")


@dataclass(frozen=True)
class _KernelConv:
    """A convolution as the int8 conv kernels take it: the NHWC image, its zero point (int32; a uint8 image is
    read as it is, so the zero point is its own), the OHWI filter and the window."""

    x: jax.Array
    zx: jax.Array
    w: jax.Array
    strides: tuple[int, ...]
    dilation: tuple[int, ...]
    pads: Any

    def exact(self, a: jax.Array, za: Any, b: jax.Array, bound: int = 256 * 128) -> jax.Array:
        """``sum (a - za) b`` over the same windows, the exact float route (what ``otherwise`` runs)."""
        return exact_conv(a.astype(jnp.int32) - za, b.astype(jnp.int32), self.strides, self.pads, bound=bound,
                          dimension_numbers=_NHWC_DN, rhs_dilation=self.dilation)


def _kernel_conv(x: jax.Array, x_zp: Any, w: jax.Array, dn: Any, window_strides: Sequence[int], padding: Any,
                 rhs_dilation: Sequence[int] | None) -> _KernelConv:
    xn, pads = to_nhwc(x, w, dn, window_strides, padding, rhs_dilation)
    return _KernelConv(xn, jnp.asarray(_shifted_zp(x_zp, 0), jnp.int32), ohwi(w, dn), tuple(window_strides),
                       tuple(rhs_dilation) if rhs_dilation is not None else (1, 1), pads)


def zp_conv_requant(x: Any, x_zp: Any, w: Any, w_zp: Any, bias: Any, multiplier: Any, y_zp: Any, out_dtype: Any,
                    relu: bool, window_strides: Sequence[int], padding: Any, *, dimension_numbers: Any = None,
                    rhs_dilation: Sequence[int] | None = None) -> jax.Array | None:
    """ONNX's requantized integer convolution in one kernel call, or None where the kernel does not take it.

    ``round_saturate((zp_conv(x, x_zp, w, w_zp) + bias[n]) * multiplier[n], out_dtype, y_zp)`` (clipped at
    ``y_zp`` from below too where ``relu``): :func:`zp_conv`'s kernel route with the requantization in the same
    call (:func:`cpu_kernels.int8_conv_requant_f32`), where XLA would take the int32 sums through a fusion
    that XLA CPU splits over its pool. Taken for what that route takes, with an int8 ``w`` whose zero point is
    known to be 0, a per-tensor ``y_zp`` and an 8-bit ``out_dtype``; the caller computes it its own way on None.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
    out_dtype = np.dtype(out_dtype)
    if (not _kernel_conv_takes(x, x_zp, w, dn, 1, jnp.int32) or w.dtype != jnp.int8 or not _static_zero(w_zp)
            or out_dtype not in (np.dtype(np.int8), np.dtype(np.uint8)) or jnp.size(y_zp) != 1):
        return None
    k = _kernel_conv(x, x_zp, w, dn, window_strides, padding, rhs_dilation)

    def otherwise(a: jax.Array, za: jax.Array, b: jax.Array, bias: jax.Array, scale: jax.Array,
                  zy: jax.Array) -> jax.Array:  # the same values on other platforms
        q = round_saturate((k.exact(a, za, b) + bias).astype(jnp.float32) * scale, out_dtype, zy.reshape(()))
        return jnp.maximum(q, zy.reshape(()).astype(out_dtype)) if relu else q

    y = cpu_kernels.int8_conv_requant_f32(k.x, k.zx, k.w, bias, multiplier, y_zp, out_dtype, relu, k.strides,
                                          k.dilation, k.pads, otherwise)
    return from_nhwc(y, dn)


def zp_conv(x: Any, x_zp: Any, w: Any, w_zp: Any, window_strides: Sequence[int], padding: Any, *, bound: int,
            dimension_numbers: Any = None, rhs_dilation: Sequence[int] | None = None, feature_group_count: int = 1,
            acc_dtype: Any = jnp.int32) -> jax.Array:
    """``lax.conv_general_dilated`` of ``x - x_zp`` and ``w - w_zp`` in ``acc_dtype``, exactly (int32 wraps).

    ``x``, ``w`` hold raw integers; ``x_zp`` is None or per tensor, ``w_zp`` None, per tensor or per
    output channel (broadcasting against ``w``); |(x - x_zp)(w - w_zp)| <= ``bound``. 8-bit operands on
    an AVX-512 VNNI CPU take :func:`cpu_kernels.int8_conv` (NHWC; other layouts are transposed to it and
    back), where the exact float32 convolution was 1.3-8x slower (``benchmarks/int8_dot.py --parts convs``);
    everything else is :func:`exact_conv` of the shifted values.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    dn = lax.conv_dimension_numbers(x.shape, w.shape, dimension_numbers)
    o_axis = dn.rhs_spec[0]

    def shifted(v: jax.Array, z: Any, axis: int | None) -> jax.Array:
        vi = v.astype(jnp.int32)
        if _static_zero(z):
            return vi
        z = jnp.asarray(z).astype(jnp.int32)
        if z.size > 1 and axis is not None:
            z = z.reshape([z.size if i == axis else 1 for i in range(v.ndim)])
        return vi - z.reshape(()) if z.size == 1 else vi - z

    def float_route() -> jax.Array:
        return exact_conv(shifted(x, x_zp, None), shifted(w, w_zp, o_axis), window_strides, padding, bound=bound,
                          dimension_numbers=dn, rhs_dilation=rhs_dilation, feature_group_count=feature_group_count,
                          acc_dtype=acc_dtype)

    if not _kernel_conv_takes(x, x_zp, w, dn, feature_group_count, acc_dtype):
        return float_route()
    w8, sw = _int8(w)
    zw = _shifted_zp(w_zp, sw)
    k = _kernel_conv(x, x_zp, w8, dn, window_strides, padding, rhs_dilation)
    acc = cpu_kernels.int8_conv(k.x, k.zx, k.w, k.strides, k.dilation, k.pads, k.exact)  # otherwise: the same sums
    if not _static_zero(zw):  # sum (x - zx)(w - zw) = sum (x - zx) w - zw * window sums of (x - zx)
        sums = k.exact(k.x, k.zx, jnp.ones((1,) + k.w.shape[1:], jnp.int32), bound=256)
        zw = jnp.asarray(zw, jnp.int32)
        acc = acc - sums * (zw.reshape(-1) if zw.size > 1 else zw.reshape(()))
    return from_nhwc(acc, dn)
