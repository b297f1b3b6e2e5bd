"""How convolutions and pooling windows are lowered for XLA CPU.

A convolution is ``lax.conv_general_dilated``, patches times the kernel (below), or on AVX-512 CPUs
our own kernel's float32 patch product (:func:`cpu_kernels.f32_conv`) for 2-D ungrouped float32
layers with filters of at most :data:`F32_KERNEL_MAX_WEIGHTS` values: XLA CPU's convolution ran those
1.3-3x slower (session 20); against larger filters the kernel, which packs the whole filter on every
call and multiplies it by a few rows at a time, lost (resnet50's deep layers: the model 2x slower at
batch 1). A max or sum window is ``lax.reduce_window`` or a chain of shifted slices (:func:`reduce_window`).
Float32 MatMuls of many rows by such small weights take the same kernel as a 1x1 convolution (:func:`f32_matmul`).

XLA CPU's convolution is slow on small layers with very few input channels (an RGB or mono
stem on a 32x32 image): measured here, a [1, 32, 32, 3] -> 16 channel 3x3 convolution took
115 us as one convolution and 48-53 us as the 27-column patch matrix times the [27, 16]
kernel; [1, 32, 32, 1] -> 16 took 113 vs 15-31 us. On large images and wide layers the
convolution wins (a 224x224 7x7 stem ran 2-4x slower as patches), and at batch 8 the
whole-model effect was mixed (0.85-1.17x), so only small, narrow-input 2-D layers of at most
one 32x32 image's worth of output pixels take the patch route (:func:`use_patches`), and only
on CPU. Whole models at batch 1, three A/B runs in one process: the exported ONNX CNN 1.12-1.30x,
the TFLite conv fixtures 0.9-1.13x (noise of this 2-core machine included).

Tried and dropped (session 13): the sum of ``kh * kw * C`` shifted input channels times kernel rows,
one fused elementwise loop. Alone it beat both routes at every size measured ([8, 32, 32, 3] -> 16:
732 us convolution, 428 patches, 258 multiply-adds; [1, 224, 224, 3] -> 24 stride 2: 1105 vs 481),
but in whole models XLA fused that sum into consumers that read it at several offsets (a depthwise
layer, pooling taps) and redid it there: the ONNX CNN gained (batch 8 1.05 -> 0.83 ms) while the
TFLite conv fixtures lost 1.4x and the dynamic-quantized CNN 2x (``lax.optimization_barrier`` does
not survive XLA CPU's pipeline; a stacked ``reduce`` instead of the chain lost everywhere).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import cpu_kernels

#: Off: float32 convolutions never take our CPU kernel (for A/B runs and tests).
F32_KERNEL = True
#: ... and only for filters of at most this many values (see :func:`_f32_kernel_takes`).
F32_KERNEL_MAX_WEIGHTS = 64 * 1024
#: NCHW inputs with at most this many channels (an image) go to the kernel as they are (``x_layout="NCHW"``).
NCHW_MAX_CHANNELS = 4
#: Patches only for convolutions with at most this many input channels ...
PATCH_MAX_IN_CHANNELS = 4
#: ... and at most this many output pixels per image (a 32x32 output) ...
PATCH_MAX_OUT_PIXELS = 32 * 32
#: ... and at most this many patch-matrix rows over the whole batch (one such image).
PATCH_MAX_ROWS = 32 * 32


def use_patches(lhs_shape: Sequence[int], rhs_shape: Sequence[int], out_shape: Sequence[int], dn: Any,
                feature_group_count: int, lhs_dilation: Sequence[int] | None) -> bool:
    """Whether the patch lowering is the faster one here (see the module docstring)."""
    if not _narrow(lhs_shape, dn, feature_group_count, lhs_dilation):
        return False
    pixels = out_shape[dn.out_spec[2]] * out_shape[dn.out_spec[3]]
    return pixels <= PATCH_MAX_OUT_PIXELS and pixels * out_shape[dn.out_spec[0]] <= PATCH_MAX_ROWS


def _narrow(lhs_shape: Sequence[int], dn: Any, feature_group_count: int, lhs_dilation: Sequence[int] | None) -> bool:
    """The shape-independent half of :func:`use_patches`: CPU, 2-D, ungrouped, few input channels."""
    if jax.default_backend() != "cpu" or feature_group_count != 1 or len(lhs_shape) != 4:
        return False
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        return False
    return lhs_shape[dn.lhs_spec[1]] <= PATCH_MAX_IN_CHANNELS


def conv_general_dilated(lhs: Any, rhs: Any, window_strides: Sequence[int], padding: Any, *,
                         lhs_dilation: Sequence[int] | None = None, rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None, feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None) -> jax.Array:
    """``lax.conv_general_dilated`` (same arguments and result), lowered as :func:`use_patches` says."""
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    kw = {"lhs_dilation": lhs_dilation, "rhs_dilation": rhs_dilation, "dimension_numbers": dn,
          "feature_group_count": feature_group_count, "batch_group_count": batch_group_count,
          "precision": precision, "preferred_element_type": preferred_element_type}
    if F32_KERNEL and _f32_kernel_takes(lhs, rhs, feature_group_count, batch_group_count, lhs_dilation,
                                        preferred_element_type) and rhs.size <= F32_KERNEL_MAX_WEIGHTS:
        return _f32_kernel_conv(lhs, rhs, window_strides, padding, rhs_dilation, dn)
    if batch_group_count == 1 and _narrow(lhs.shape, dn, feature_group_count, lhs_dilation):
        # the output shape only for the few convolutions that may qualify (abstract evaluation costs ~1 ms)
        out = jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, window_strides, padding, **kw), lhs, rhs)
        if use_patches(lhs.shape, rhs.shape, out.shape, dn, feature_group_count, lhs_dilation):
            return _patch_conv(lhs, rhs, tuple(window_strides), padding, tuple(rhs_dilation or (1, 1)), dn,
                               precision, preferred_element_type)
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, **kw)


def _f32_kernel_conv(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                     rhs_dilation: Sequence[int] | None, dn: Any, bias: Any = None,
                     clamp: tuple[float, float] | None = None, pool: tuple[int, int] | None = None) -> jax.Array:
    """A 2-D convolution (laid out as ``dn`` says) as our kernel's call (:func:`cpu_kernels.f32_conv`; the
    caller checked that it takes it), with the kernel's epilogue: ``bias``, ``clamp``, ``pool``."""
    x, pads = to_nhwc(lhs, rhs, dn, window_strides, padding, rhs_dilation)
    # an HWIO filter (ONNX convs' weights after passes.layout) is read as it is: no copy per call
    hwio = tuple(dn.rhs_spec) == (3, 2, 0, 1)
    w = rhs if hwio else ohwi(rhs, dn)
    dilation = tuple(rhs_dilation or (1, 1))
    # a model's NCHW input image (few channels) goes in as it is: the kernel transposes it as it pads (XLA's
    # transpose of it cost more than the stem's sums); wider NCHW values are our kernels' NHWC outputs
    # transposed back, whose transposes XLA cancels
    nchw = tuple(dn.lhs_spec) == (0, 1, 2, 3) and lhs.shape[1] <= NCHW_MAX_CHANNELS and dilation[1] == 1
    y = cpu_kernels.f32_conv(lhs if nchw else x, w, tuple(window_strides), dilation, pads,
                             "HWIO" if hwio else "OHWI", bias=bias, clamp=clamp, x_layout="NCHW" if nchw else "NHWC",
                             pool=pool)
    return from_nhwc(y, dn)


def conv_epilogue(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int], padding: Any,
                  rhs_dilation: Sequence[int] | None, dimension_numbers: Any, bias: Any,
                  clamp: tuple[float, float] | None, pool: tuple[int, int] | None) -> jax.Array | None:
    """A 2-D ungrouped convolution followed by ``+ bias`` [N], a clamp to ``clamp`` (lo <= hi: a Relu's or a
    Clip's) and a max over ``pool`` (PH, PW) blocks (a MaxPool whose strides are its window, no padding, floor),
    all in our kernel's one call, which never writes the convolution's full output; None where the kernel does
    not take it (the caller composes the ops then). The kernel's epilogue order is the ops': the bias, the
    clamp (max then min, NaN kept), then the max over each block (NaN kept, as ``jnp.maximum`` keeps it).

    At batch 8 an exported CNN's 3-channel stem, its BatchNorm folded, then Relu and a 2x2 MaxPool: 174 us as the
    kernel's call and XLA's fusion after it, 69 us as one call (session 28).
    """
    lhs, rhs = jnp.asarray(lhs), jnp.asarray(rhs)
    dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    dilation = tuple(rhs_dilation or (1, 1))
    if not f32_kernel_takes(lhs, rhs):
        return None
    if (pool is not None and dilation[1] != 1) or (clamp is not None and not clamp[0] <= clamp[1]):
        return None
    return _f32_kernel_conv(lhs, rhs, window_strides, padding, rhs_dilation, dn, bias, clamp, pool)


def _f32_kernel_takes(lhs: jax.Array, rhs: jax.Array, feature_group_count: int, batch_group_count: int,
                      lhs_dilation: Sequence[int] | None, preferred_element_type: Any) -> bool:
    """Whether a convolution may run as our CPU kernel's float32 patch product (:func:`cpu_kernels.f32_conv`;
    the caller checks the filter's size): 2-D, ungrouped, float32 in and out, on a CPU whose kernels
    have AVX-512 (:func:`cpu_kernels.isa` 2)."""
    if jax.default_backend() != "cpu" or lhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
        return False
    if lhs_dilation is not None and any(d != 1 for d in lhs_dilation):
        return False
    if preferred_element_type is not None and np.dtype(preferred_element_type) != np.float32:
        return False
    return lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32 and _f32_on_cpu(lhs, rhs)


def _f32_on_cpu(lhs: jax.Array, rhs: jax.Array) -> bool:
    """Both operands float32 (or 16-bit floats, where the caller takes them), on a CPU whose kernels have AVX-512
    (:func:`cpu_kernels.isa` 2)."""
    floats = (jnp.float32, jnp.bfloat16, jnp.float16)
    return (jax.default_backend() == "cpu" and lhs.dtype in floats and rhs.dtype in floats
            and cpu_kernels.available() and cpu_kernels.isa() == 2)


def f32_kernel_takes(x: jax.Array, w: jax.Array) -> bool:
    """Whether a float32 NHWC convolution of ``x`` with ``w`` (ungrouped) runs as our kernel's patch product,
    as :func:`conv_general_dilated` decides it."""
    return (F32_KERNEL and w.size <= F32_KERNEL_MAX_WEIGHTS and w.dtype == jnp.float32
            and _f32_kernel_takes(x, w, 1, 1, None, None))


#: Float32 MatMuls by a 2-D weight of at most F32_KERNEL_MAX_WEIGHTS values run as the kernel's 1x1 convolution
#: from this many rows (:func:`f32_matmul`).
F32_MATMUL_MIN_ROWS = 64
#: Float MatMuls of few rows by a weight of at least this many values run as the few-rows product
#: (:func:`few_rows_matmul`).
F32_ROWS_MIN_WEIGHTS = 1 << 16


def _image_width(rows: int) -> int | None:
    """How many of ``rows`` rows one image row of the 1x1 convolution holds: a divisor in 8..64, a multiple of 8
    and near 32 first (whole 8-pixel register blocks, several work items); None when there is none."""
    widths = [d for d in range(8, 65) if rows % d == 0]
    return min(widths, key=lambda d: (d % 8 != 0, abs(d - 32))) if widths else None


def few_rows_matmul(a: jax.Array, b: jax.Array, nk: bool = False) -> jax.Array | None:
    """``a @ b`` (numpy ``matmul``; ``a @ b.T`` with ``nk``) of at most :func:`cpu_kernels.rows_max_rows` rows of
    ``a`` [..., K] by a weight ``b`` [K, N] (``nk``: [N, K], an ONNX Gemm's with ``transB``, a TFLite
    FULLY_CONNECTED's) of at least :data:`F32_ROWS_MIN_WEIGHTS` values, as :func:`cpu_kernels.f32_rows_dot`
    (:func:`cpu_kernels.f32_rows_dot_nk`), which streams the weight from memory once; None where that does not apply
    (the caller's own product then). ``b`` is float32, bfloat16 or float16, ``a`` float32 or ``b``'s dtype; the
    result has the dtype the plain product would (float32 sums, rounded once to a 16-bit ``a``'s dtype).

    Session 31, one process, ms, XLA / kernel. ``[K, N]`` (12 weights per call): [8, 1024] x [1024, 4096]
    0.92-1.08 / 0.46-0.54, [8, 4096] x [4096, 1024] 1.07 / 0.50-0.56, [1, 1024] x [1024, 4096] 0.38-0.55 /
    0.30-0.37, [32, 1024] x [1024, 4096] 2.7-3.1 / 1.8, [48, 1024] x [1024, 1024] 0.87 / 0.60, [4, 768] x [768,
    3072] 0.51 / 0.21; from 64 rows XLA's library is faster ([64, 1024] x [1024, 4096] 2.8 / 3.6-4.1), under ~64K
    values both take the same. ``[N, K]``: [1, 9216] x [4096, 9216]^T (AlexNet's fc6) 3.46 / 2.94, 8 rows 11.2-11.9
    / 6.1-6.7, [8, 4096] x [4096, 4096]^T 3.3 / 2.0, [4, 1024] x [1024, 1024]^T 0.31-0.37 / 0.07, [32, 1024] x
    [4096, 1024]^T 1.5 / 1.2. XLA CPU's bfloat16 dots are slower still (the 4-layer encoder at 1x8 tokens: 66.6 ms
    in bfloat16 against 10.4 in float32), and 16-bit weights take the kernel up to 256 rows."""
    halves = (jnp.bfloat16, jnp.float16)
    k_axis = 1 if nk else 0
    if not (F32_KERNEL and b.ndim == 2 and a.ndim >= 1 and a.shape[-1] == b.shape[k_axis] and b.size > 0
            and (b.dtype == jnp.float32 or b.dtype in halves) and (a.dtype == jnp.float32 or a.dtype == b.dtype)):
        return None
    rows = math.prod(a.shape[:-1])
    if not (0 < rows <= cpu_kernels.rows_max_rows(b.dtype) and b.size >= F32_ROWS_MIN_WEIGHTS and _f32_on_cpu(a, b)):
        return None

    def otherwise(x: jax.Array, w: jax.Array) -> jax.Array:  # the plain product, float32 out
        return lax.dot_general(x.astype(a.dtype), w, (((x.ndim - 1,), (k_axis,)), ((), ())),
                               precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)

    kernel = cpu_kernels.f32_rows_dot_nk if nk else cpu_kernels.f32_rows_dot
    return kernel(a.astype(jnp.float32), b, otherwise).astype(a.dtype)


def f32_matmul(a: jax.Array, b: jax.Array) -> jax.Array | None:
    """``a @ b`` of a float32 ``a`` [..., K] (at least :data:`F32_MATMUL_MIN_ROWS` rows over its leading axes) by a
    float32 weight ``b`` [K, N] of at most :data:`F32_KERNEL_MAX_WEIGHTS` values, as our kernel's 1x1
    convolution over images of one row (:func:`cpu_kernels.f32_conv`: the weight read in place when N is a
    multiple of 16, the rows directly); None where that route does not apply (the caller's own product then).
    Session 29, one process, 2 cores: [256, 64] x [64, 256] 64 -> 50 us, [256, 256] x [256, 64] 64 -> 44, [256,
    64] x [64, 64] 26.5 -> 22 against XLA's YNNPACK dot (onnxruntime's MatMul: 42, 36, 16). Float32 sums in k
    order: the last bits may differ from XLA's."""
    if not (b.ndim == 2 and a.ndim >= 2 and a.shape[-1] == b.shape[0] and b.shape[1] > 0 and a.shape[-1] > 0):
        return None
    k, n = b.shape
    rows = math.prod(a.shape[:-1])
    width = _image_width(rows) if rows >= F32_MATMUL_MIN_ROWS else None
    if width is None:
        return None
    x = a.reshape(rows // width, 1, width, k)
    w = b.reshape(1, 1, k, n)
    if not f32_kernel_takes(x, w):  # the flag, the weight's size, the dtypes, the CPU
        return None
    y = cpu_kernels.f32_conv(x, w, (1, 1), (1, 1), ((0, 0), (0, 0)), w_layout="HWIO")
    return y.reshape(a.shape[:-1] + (n,))


def f32_depthwise_takes(x: jax.Array) -> bool:
    """Whether a float32 NHWC depthwise layer runs as our kernel (:func:`cpu_kernels.f32_depthwise`)."""
    return (jax.default_backend() == "cpu" and x.ndim == 4 and x.dtype == jnp.float32 and cpu_kernels.available()
            and cpu_kernels.isa() == 2)


def to_nhwc(lhs: jax.Array, rhs: jax.Array, dn: Any, strides: Sequence[int], padding: Any,
            dilation: Sequence[int] | None) -> tuple[jax.Array, tuple[tuple[int, int], ...]]:
    """A 2-D convolution's input as our kernels take it, NHWC (transposed from ``dn``'s layout; no copy
    when it is that already), and its padding as (lo, hi) pairs (``rhs`` gives the window's size)."""
    x = jnp.transpose(lhs, (dn.lhs_spec[0], dn.lhs_spec[2], dn.lhs_spec[3], dn.lhs_spec[1]))
    if isinstance(padding, str):
        dilation = tuple(dilation) if dilation is not None else (1, 1)
        window = [(rhs.shape[i] - 1) * d + 1 for i, d in zip(dn.rhs_spec[2:], dilation)]
        padding = lax.padtype_to_pads(x.shape[1:3], window, tuple(strides), padding)
    return x, tuple((int(lo), int(hi)) for lo, hi in padding)


def ohwi(rhs: jax.Array, dn: Any) -> jax.Array:
    """A 2-D convolution's filter as OHWI (transposed from ``dn``'s layout; no copy when it is that already)."""
    return jnp.transpose(rhs, (dn.rhs_spec[0], dn.rhs_spec[2], dn.rhs_spec[3], dn.rhs_spec[1]))


def from_nhwc(y: jax.Array, dn: Any) -> jax.Array:
    """A kernel's NHWC result with its axes where ``dn.out_spec`` puts them."""
    back = [0] * 4
    for src, axis in enumerate((dn.out_spec[0], dn.out_spec[2], dn.out_spec[3], dn.out_spec[1])):
        back[axis] = src
    return jnp.transpose(y, back)


def _patch_conv(lhs: jax.Array, rhs: jax.Array, strides: tuple[int, ...], padding: Any,
                dilation: tuple[int, ...], dn: Any, precision: Any, pet: Any) -> jax.Array:
    """A 2-D ungrouped convolution as [N*OH*OW, KH*KW*C] patches times the [KH*KW*C, O] kernel."""
    x = jnp.transpose(lhs, dn.lhs_spec)  # N, C, H, W
    w = jnp.transpose(rhs, dn.rhs_spec)  # O, I, KH, KW
    _, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    if isinstance(padding, str):
        eff = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
        padding = lax.padtype_to_pads((h, wd), eff, strides, padding)
    (pt, pb), (pl, pr) = padding
    x = jnp.transpose(x, (0, 2, 3, 1))  # NHWC: a patch row is contiguous channels per tap
    x = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))
    taps = window_slices(x, (1, kh, kw, 1), (1, *strides, 1), (1, *dilation, 1))
    patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)  # N, OH, OW, KH*KW*C
    kmat = jnp.transpose(w, (2, 3, 1, 0)).reshape(kh * kw * c, o)  # rows in the patches' (i, j, c) order
    y = lax.dot_general(patches, kmat, (((3,), (0,)), ((), ())), precision=precision, preferred_element_type=pet)
    # y is N, OH, OW, O: put its axes where dn.out_spec says
    y_nchw = jnp.transpose(y, (0, 3, 1, 2))
    inverse = [0] * 4
    for pos, axis in enumerate(dn.out_spec):
        inverse[axis] = pos
    return jnp.transpose(y_nchw, inverse)


#: Max and sum windows of at most this many elements reduce as shifted slices (:func:`reduce_window`).
MAX_TAPS = 64
#: Off: every window is one ``lax.reduce_window`` (for A/B runs and tests).
WINDOW_TAPS = True


def kept_channels_last(x: Any) -> Any:
    """A channels-first conv input (``[N, C, ...]``) written once to memory, channels-last, for all its readers
    (:func:`cpu_kernels.keep` of its channels-last transpose, transposed back: XLA's transposes cancel in the
    convolutions, which read it channels-last, and cost index arithmetic only in elementwise readers).

    For values :func:`jaxinfer.passes.layout.shared_conv_inputs` names: a value read by a convolution and by
    other ops (a residual sum, also read by the next residual add) was recomputed from its producers in each
    reader's fusion, back along the stage's chain of sums. ONNX ResNet-50 (light, session 32), ms, kept vs not:
    int8-static b8 135 vs 158, b1 21 vs 30; int8-dynamic b8 152-160 vs 166-177, b1 23 vs 31; float32 b8 289
    vs 309, b1 43 vs 46.
    """
    if not isinstance(x, jax.Array) or x.ndim < 3:
        return x
    return channels_last(cpu_kernels.keep, x)


def channels_last(fn: Callable[[jax.Array], Any], x: jax.Array, spec: Sequence[int] | None = None) -> Any:
    """``fn`` of ``x`` laid out channels-last (batch, spatial axes, features), each array it returns (one, or a
    tuple) transposed back to ``x``'s layout; XLA cancels these transposes against a convolution's own.
    ``spec``: ``x``'s batch, feature and spatial axes in that order (a conv's ``lhs_spec``), default
    channels-first."""
    spec = tuple(spec) if spec is not None else tuple(range(x.ndim))
    to_last = (spec[0], *spec[2:], spec[1])
    back = tuple(int(i) for i in np.argsort(to_last))
    out = fn(jnp.transpose(x, to_last))
    if isinstance(out, tuple):
        return tuple(jnp.transpose(o, back) for o in out)
    return jnp.transpose(out, back)


def reduce_window(x: Any, init: Any, reducer: Callable, window: Sequence[int], strides: Sequence[int],
                  padding: Sequence[tuple[int, int]], dilation: Sequence[int] | None = None,
                  taps: bool = True) -> jax.Array:
    """``lax.reduce_window`` (same result); max and sum windows of up to ``MAX_TAPS`` elements as taps.

    ``taps=False`` asks for the single ``lax.reduce_window`` (see below for when that is better).

    XLA CPU's reduce-window loops are slow: a 3x3 max pool over [1, 111, 111, 64] took 760 us as
    ``lax.reduce_window`` and 196 us as the maximum of its nine strided slices, which XLA fuses
    into one loop (3-6x over the pools of SqueezeNet and Inception, at batch 1 and 8). A sum's
    terms are added in tap order, which may round differently from XLA's own loop.

    XLA fuses freely around the taps, which can cost: it may recompute the slices inside each
    consumer's fusion (DenseNet lost 7-16 % until its channel concatenations went channels-last,
    onnx ops/shape.py), or recompute an expensive producer once per tap (ZFNet's LRN, with its
    power, ahead of a 3x3 max pool: 0.81-0.87x; passes.layout.pools_after_costly_ops marks such ONNX
    pools, which then pass ``taps=False``). Forcing every input into its own buffer instead fixed
    ZFNet but cost SqueezeNet 0.6-0.76x at batch 8.
    """
    x = jnp.asarray(x)
    dilation = tuple(dilation) if dilation is not None else (1,) * x.ndim
    init = jnp.asarray(init, x.dtype)
    if not (taps and WINDOW_TAPS and reducer in (lax.max, lax.add) and math.prod(window) <= MAX_TAPS):
        return lax.reduce_window(x, init, reducer, tuple(window), tuple(strides), list(padding),
                                 window_dilation=dilation)
    taps = window_slices(lax.pad(x, init, [(lo, hi, 0) for lo, hi in padding]), window, strides, dilation)
    acc = taps[0]
    for tap in taps[1:]:
        acc = reducer(acc, tap)
    return acc


def window_slices(x: jax.Array, window: Sequence[int], strides: Sequence[int],
                  dilation: Sequence[int] | None = None) -> list[jax.Array]:
    """One strided slice of ``x`` (already padded) per offset of the window, offsets in row-major order.

    Each slice has the windowed op's output shape: its element ``o`` is the window at ``o`` read
    at that offset. Pools (:func:`reduce_window`), patch matrices and depthwise taps are sums or
    maxima of these.
    """
    dilation = tuple(dilation) if dilation is not None else (1,) * x.ndim
    out = [(n - (k - 1) * d - 1) // st + 1 for n, k, d, st in zip(x.shape, window, dilation, strides)]
    slices = []
    for offs in np.ndindex(*window):
        start = [o * d for o, d in zip(offs, dilation)]
        slices.append(lax.slice(x, start, [b + (n - 1) * st + 1 for b, n, st in zip(start, out, strides)],
                                tuple(strides)))
    return slices


def depthwise_taps(x: jax.Array, taps: Any, kernel: Sequence[int], strides: Sequence[int],
                   dilation: Sequence[int]) -> jax.Array:
    """A depthwise 2-D convolution of NHWC ``x`` (already padded) as the sum of its window slices times
    ``taps`` ([KH*KW, C], one weight per channel per offset, in :func:`window_slices`' order).

    XLA CPU's grouped convolution ran 27x slower than this one fused elementwise loop on a
    [8, 112, 56, 56] 3x3 depthwise layer.
    """
    slices = window_slices(x, (1, *kernel, 1), (1, *strides, 1), (1, *dilation, 1))
    acc = slices[0] * taps[0]
    for tap, w_tap in zip(slices[1:], taps[1:]):
        acc = acc + tap * w_tap
    return acc
