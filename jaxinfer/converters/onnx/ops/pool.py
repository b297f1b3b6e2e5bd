"""Pooling (ai.onnx), NCHW: MaxPool, AveragePool, LpPool, their Global forms, MaxUnpool, MaxRoiPool.

Windowed pools run channels-last through ``conv_lowering.reduce_window`` (max and sum windows as
a chain of shifted slices, others as one ``lax.reduce_window``). ``jaxinfer::MaxPool`` and
``jaxinfer::AveragePool`` are the same ops kept as one reduce-window: passes.layout puts them after
ops that XLA would otherwise recompute in every slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .... import cpu_kernels
from ....conv_lowering import reduce_window
from ....registry import OpDef, registrar
from ._util import auto_pads, ints, spatial_pads

OPS: list[OpDef] = []
op = registrar(OPS)

Pads = list[tuple[int, int]]

#: Windowed pools over (N, C, *S) run channels-last (see :meth:`Window.reduce`).
CHANNELS_LAST = True


def int8_kernels() -> bool:
    """Whether 8-bit max pools take our kernel (:func:`cpu_kernels.max_pool8`): XLA CPU with our AVX-512 kernels."""
    return jax.default_backend() == "cpu" and cpu_kernels.available() and cpu_kernels.isa() == 2


@dataclass(frozen=True)
class Window:
    """A pooling window over the spatial axes; ``padding`` includes the extra ceil_mode tail."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    explicit: Pads  # the pads the attributes ask for
    padding: Pads  # explicit + what ceil_mode adds at the end
    taps: bool = True  # max/sum as shifted slices where conv_lowering.reduce_window would

    def reduce(self, x, init, reducer: Callable, padding: Pads | None = None):
        """``reducer`` over every window of the spatial axes of ``x`` (N, C, *S).

        With ``CHANNELS_LAST`` the window runs over ``x`` moved to N, *S, C and the result moves
        back. XLA CPU keeps convolution outputs channels-last; a pool over the NCHW array made it
        materialize NCHW copies around every pool (SqueezeNet b8: its largest copy cost more than
        its first convolution), while these transposes meet the convolutions' and cancel.
        """
        lead = x.ndim - len(self.kernel)
        pads = self.padding if padding is None else padding
        if CHANNELS_LAST and lead == 2:
            spatial = tuple(range(2, x.ndim))

            def xla(xl):
                return reduce_window(xl, init, reducer, (1, *self.kernel, 1), (1, *self.strides, 1),
                                     [(0, 0), *pads, (0, 0)], (1, *self.dilations, 1), self.taps)

            xl = jnp.transpose(x, (0, *spatial, 1))
            if reducer is lax.max and x.ndim == 4 and x.dtype in (jnp.int8, jnp.uint8) and int8_kernels():
                # a quantized model's pool, whose input our int8 convolutions write to a buffer anyway
                y = cpu_kernels.max_pool8(xl, self.kernel, self.strides, self.dilations, pads, xla)
            else:
                y = xla(xl)
            return jnp.transpose(y, (0, x.ndim - 1, *range(1, x.ndim - 1)))
        return reduce_window(x, init, reducer, (1,) * lead + self.kernel, (1,) * lead + self.strides,
                             [(0, 0)] * lead + list(pads), (1,) * lead + self.dilations, self.taps)


def _ceil_pads(in_shape: Sequence[int], w_kernel, strides, dilations, padding: Pads) -> Pads:
    """Extend the end pads so the output length rounds up; the last window must start inside input or begin pad."""
    out = []
    for i, (lo, hi) in enumerate(padding):
        eff = (w_kernel[i] - 1) * dilations[i] + 1
        n_out = -(-(in_shape[i] + lo + hi - eff) // strides[i]) + 1
        if (n_out - 1) * strides[i] >= in_shape[i] + lo:
            n_out -= 1
        need = (n_out - 1) * strides[i] + eff - (in_shape[i] + lo + hi)
        out.append((lo, hi + max(need, 0)))
    return out


def window(x, kernel_shape, strides=None, pads=None, auto_pad: str = "NOTSET", dilations=None,
           ceil_mode: int = 0, taps: bool = True) -> Window:
    n = x.ndim - 2
    kernel = tuple(int(k) for k in kernel_shape)
    if len(kernel) != n:
        raise ValueError(f"kernel_shape {kernel} has {len(kernel)} dims; input has {n} spatial dims")
    strides = tuple(int(s) for s in strides) if strides else (1,) * n
    dilations = tuple(int(d) for d in dilations) if dilations else (1,) * n
    explicit = auto_pads(auto_pad, x.shape[2:], kernel, strides, dilations, pads)
    padding = _ceil_pads(x.shape[2:], kernel, strides, dilations, explicit) if ceil_mode else explicit
    return Window(kernel, strides, dilations, explicit, padding, taps)


def _lowest(dtype):
    return -jnp.inf if jnp.issubdtype(dtype, jnp.floating) else jnp.iinfo(dtype).min


def _flat_indices(shape: Sequence[int], storage_order: int):
    """Flat index of every element; storage_order=1 makes the spatial part column-major."""
    if not storage_order:
        return jnp.arange(int(np.prod(shape)), dtype=jnp.int64).reshape(shape)
    spatial = shape[2:]
    col_major = np.arange(int(np.prod(spatial)), dtype=np.int64).reshape(spatial[::-1]).T
    lead = np.arange(shape[0] * shape[1], dtype=np.int64).reshape(shape[:2] + (1,) * len(spatial))
    return jnp.asarray(lead * int(np.prod(spatial)) + col_major)


def _argmax_pair(a, b):
    (va, ia), (vb, ib) = a, b
    take_a = (va > vb) | ((va == vb) & (ia < ib))
    return jnp.where(take_a, va, vb), jnp.where(take_a, ia, ib)


@op("MaxPool", (1, 8, 10, 11, 12, 22))
def max_pool(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations=None, kernel_shape, pads=None,
             storage_order: int = 0, strides=None, _num_outputs: int = 1):
    """https://onnx.ai/onnx/operators/onnx__MaxPool.html (second output: flat argmax indices)."""
    win = window(x, kernel_shape, strides, pads, auto_pad, dilations, ceil_mode)
    return _max_pool(x, win, storage_order, _num_outputs)


@op("MaxPool", 1, domain="jaxinfer")
def max_pool_whole(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations=None, kernel_shape, pads=None,
                   storage_order: int = 0, strides=None, _num_outputs: int = 1):
    """MaxPool as one reduce-window, for an input XLA would recompute per tap (passes.layout.pools_after_costly_ops)."""
    win = window(x, kernel_shape, strides, pads, auto_pad, dilations, ceil_mode, taps=False)
    return _max_pool(x, win, storage_order, _num_outputs)


def _max_pool(x, win: Window, storage_order: int, num_outputs: int):
    low = jnp.asarray(_lowest(x.dtype), x.dtype)
    if num_outputs < 2:
        return win.reduce(x, low, lax.max)
    idx = _flat_indices(x.shape, storage_order)
    lead = x.ndim - len(win.kernel)
    y, i = lax.reduce_window((x, idx), (low, jnp.asarray(np.iinfo(np.int64).max, jnp.int64)), _argmax_pair,
                             (1,) * lead + win.kernel, (1,) * lead + win.strides, [(0, 0)] * lead + win.padding,
                             window_dilation=(1,) * lead + win.dilations)
    return y, i


def _window_sums(padded: np.ndarray, win: Window, out_shape: Sequence[int]) -> np.ndarray:
    """Host-side sum of ``padded`` under every window (the AveragePool divisors)."""
    out = np.zeros(tuple(out_shape), np.float64)
    for offs in np.ndindex(*win.kernel):
        out += padded[tuple(slice(o * d, o * d + (n - 1) * s + 1, s)
                            for o, d, s, n in zip(offs, win.dilations, win.strides, out_shape))]
    return out


@op("AveragePool", (1, 7, 10, 11, 19, 22))
def average_pool(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, count_include_pad: int = 0, dilations=None,
                 kernel_shape, pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__AveragePool.html

    The divisor counts input elements under the window, plus the explicit pads when
    ``count_include_pad``; the extra tail that ``ceil_mode`` adds is never counted.
    """
    return _average_pool(x, window(x, kernel_shape, strides, pads, auto_pad, dilations, ceil_mode), count_include_pad)


@op("AveragePool", 1, domain="jaxinfer")
def average_pool_whole(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, count_include_pad: int = 0,
                       dilations=None, kernel_shape, pads=None, strides=None):
    """AveragePool as one reduce-window, for an input XLA would recompute per tap (passes.layout)."""
    win = window(x, kernel_shape, strides, pads, auto_pad, dilations, ceil_mode, taps=False)
    return _average_pool(x, win, count_include_pad)


def _average_pool(x, win: Window, count_include_pad: int):
    zero = jnp.asarray(0, x.dtype)
    total = win.reduce(x, zero, lax.add)
    mask = np.ones(x.shape[2:], np.float64)
    if count_include_pad:  # explicit pads count, the ceil_mode tail does not
        mask = np.pad(mask, win.explicit, constant_values=1)
        mask = np.pad(mask, [(0, hi - ehi) for (_, hi), (_, ehi) in zip(win.padding, win.explicit)])
    else:
        mask = np.pad(mask, win.padding)
    counts = _window_sums(mask, win, total.shape[2:])
    if np.all(counts == counts.flat[0]):
        return total / jnp.asarray(counts.flat[0], x.dtype)
    return total / jnp.asarray(counts, x.dtype)


@op("LpPool", (1, 2, 11, 18, 22))
def lp_pool(x, *, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations=None, kernel_shape, p: float = 2,
            pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__LpPool.html: (sum |x|^p)^(1/p) per window."""
    # |x| ** p (p != 2) is a power per element: as taps XLA would compute it once per tap
    win = window(x, kernel_shape, strides, pads, auto_pad, dilations, ceil_mode, taps=p == 2)
    s = win.reduce(_pow_abs(x, p), jnp.asarray(0, x.dtype), lax.add)
    return _root(s, p)


def _pow_abs(x, p: float):
    return x * x if p == 2 else jnp.abs(x) ** p


def _root(s, p: float):
    return jnp.sqrt(s) if p == 2 else s ** (1.0 / p)


@op("GlobalAveragePool", (1, 22))
def global_average_pool(x):
    """https://onnx.ai/onnx/operators/onnx__GlobalAveragePool.html

    Scaled before summing, so the reduction is the last op: XLA CPU otherwise
    duplicates the trailing ``* 1/n`` into each consumer's fusion and contracts it
    into FMAs, and a following softmax saw max and exp disagree (NaN at 1e10 logits).
    """
    axes = tuple(range(2, x.ndim))
    n = int(np.prod([x.shape[a] for a in axes]))
    return jnp.sum(x * jnp.asarray(1.0 / n, x.dtype), axis=axes, keepdims=True)


@op("GlobalMaxPool", (1, 22))
def global_max_pool(x):
    """https://onnx.ai/onnx/operators/onnx__GlobalMaxPool.html"""
    return jnp.max(x, axis=tuple(range(2, x.ndim)), keepdims=True)


@op("GlobalLpPool", (1, 2, 22))
def global_lp_pool(x, *, p: float = 2):
    """https://onnx.ai/onnx/operators/onnx__GlobalLpPool.html"""
    return _root(jnp.sum(_pow_abs(x, p), axis=tuple(range(2, x.ndim)), keepdims=True), p)


@op("MaxUnpool", (9, 11, 22), static=(2,))
def max_unpool(x, indices, output_shape=None, *, kernel_shape, pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__MaxUnpool.html: scatter values to their flat argmax positions."""
    n = x.ndim - 2
    strides = tuple(int(s) for s in strides) if strides else (1,) * n
    pad = spatial_pads(pads, n)
    inferred = x.shape[:2] + tuple((x.shape[2 + i] - 1) * strides[i] + kernel_shape[i] - pad[i][0] - pad[i][1]
                                   for i in range(n))
    flat = jnp.zeros((int(np.prod(inferred)),), x.dtype)
    y = flat.at[indices.reshape(-1)].set(x.reshape(-1), mode="drop").reshape(inferred)
    if output_shape is None:
        return y
    # Indices address the inferred shape; output_shape grows (or trims) it at the end of each axis.
    shape = ints(output_shape)
    if len(shape) != y.ndim:
        raise ValueError(f"MaxUnpool: output_shape {shape} must have rank {y.ndim}")
    return lax.pad(y, jnp.zeros((), x.dtype), [(0, o - i, 0) for o, i in zip(shape, inferred)])


@op("MaxRoiPool", (1, 22))
def max_roi_pool(x, rois, *, pooled_shape, spatial_scale: float = 1.0):
    """https://onnx.ai/onnx/operators/onnx__MaxRoiPool.html: max over each bin of each ROI (empty bins give 0)."""
    ph, pw = (int(v) for v in pooled_shape)
    height, width = x.shape[2:]
    batch = rois[:, 0].astype(jnp.int32)

    def bins(start, end, n, size):
        """(R, n, size) membership of each pixel in each bin along one axis."""
        start = jnp.round(start * spatial_scale).astype(jnp.int32)
        end = jnp.round(end * spatial_scale).astype(jnp.int32)
        extent = jnp.maximum(end - start + 1, 1).astype(x.dtype)
        step = extent / n
        k = jnp.arange(n, dtype=x.dtype)
        lo = jnp.clip(jnp.floor(k[None] * step[:, None]).astype(jnp.int32) + start[:, None], 0, size)
        hi = jnp.clip(jnp.ceil((k[None] + 1) * step[:, None]).astype(jnp.int32) + start[:, None], 0, size)
        pos = jnp.arange(size)
        return (pos >= lo[..., None]) & (pos < hi[..., None])

    in_w = bins(rois[:, 1], rois[:, 3], pw, width)  # (R, pw, W)
    in_h = bins(rois[:, 2], rois[:, 4], ph, height)  # (R, ph, H)
    low = jnp.asarray(-jnp.inf, x.dtype)
    xb = x[batch]  # (R, C, H, W)
    by_w = jnp.max(jnp.where(in_w[:, None, None], xb[:, :, :, None, :], low), axis=-1)  # (R, C, H, pw)
    y = jnp.max(jnp.where(in_h[:, None, :, None, :], jnp.swapaxes(by_w, 2, 3)[:, :, None], low), axis=-1)
    return jnp.where(y == low, jnp.zeros((), x.dtype), y)
