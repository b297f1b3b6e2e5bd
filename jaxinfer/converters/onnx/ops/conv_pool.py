"""Convolutions (ai.onnx), NCHW as ONNX defines them: Conv, ConvTranspose, ConvInteger, DeformConv, Col2Im, ...

Pooling lives in ``pool.py``. Every convolution here is one ``lax.conv_general_dilated``
(DeformConv excepted: its sampling is data dependent).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .... import arith
from ....conv_lowering import channels_last, conv_epilogue, depthwise_taps
from ....intmath import abs_bound, zp_conv
from ....registry import OpDef, registrar
from ._util import auto_pads, ints, spatial_pads
from .pool import max_pool

OPS: list[OpDef] = []
op = registrar(OPS)


def conv_dims(n: int) -> tuple[str, str, str]:
    """``dimension_numbers`` for an N-D channels-first convolution."""
    sp = "DHW"[-n:] if n <= 3 else "".join(chr(ord("a") + i) for i in range(n))
    return ("NC" + sp, "OI" + sp, "NC" + sp)


def _per_axis(values: Sequence[int] | None, n: int, default: int = 1) -> tuple[int, ...]:
    return tuple(int(v) for v in values) if values else (default,) * n


def _bias(y, b):
    return y if b is None else y + b.reshape((1, -1) + (1,) * (y.ndim - 2))


def _depthwise_2d(x, w_hwio, strides, padding, dilations):
    """Depthwise 2-D conv (NCHW, kernel H, W, 1, C*M) as a sum of shifted slices times per-channel taps.

    (conv_lowering.depthwise_taps: XLA CPU's grouped convolution is an order of magnitude slower.)
    """
    kh, kw, _, out_c = w_hwio.shape
    mult = out_c // x.shape[1]
    if mult > 1:
        x = jnp.repeat(x, mult, axis=1)
    # channels-last (as the pools are, ops/pool.py): the neighbouring convolutions' layout, so XLA
    # cancels these transposes instead of copying the activations to NCHW and back
    xp = jnp.pad(jnp.transpose(x, (0, 2, 3, 1)), [(0, 0)] + [tuple(p) for p in padding] + [(0, 0)])
    acc = depthwise_taps(xp, jnp.reshape(w_hwio, (kh * kw, out_c)), (kh, kw), strides, dilations)
    return jnp.transpose(acc, (0, 3, 1, 2))


def grouped_conv(x, w, strides, padding, dilations, dims: tuple[str, str, str], group: int):
    """A convolution with ``group`` groups, shaped for XLA CPU.

    XLA CPU's grouped convolutions are slow (5.5x for AlexNet's 2-group conv, 27x for depthwise
    layers, measured here), so kernels run as per-group convolutions (quantized ones too: each group
    then takes the int8 kernel, and int8-dynamic's per-sample scale is each group's own: light ShuffleNet
    at batch 8, int8-static 282 -> 42 ms, int8-dynamic 290 -> 66, float32 42) or, plain depthwise ones in 2-D,
    as shifted slices; quantized depthwise kernels (``quantize`` keeps those float) go to ``arith.conv``
    unchanged.
    """
    plain = isinstance(w, (np.ndarray, jax.Array))
    o_axis, i_axis = dims[1].index("O"), dims[1].index("I")
    depthwise = group > 1 and group == x.shape[1] and w.shape[i_axis] == 1
    if group == 1 or (depthwise and not plain):
        return arith.conv(x, w, strides, padding, rhs_dilation=dilations, dimension_numbers=dims,
                          feature_group_count=group)
    if depthwise and x.ndim == 4:
        w_hwio = w if dims[1].endswith("IO") else jnp.transpose(w, (2, 3, 1, 0))
        return _depthwise_2d(x, w_hwio, strides, padding, dilations)
    if group > 16:
        return arith.conv(x, w, strides, padding, rhs_dilation=dilations, dimension_numbers=dims,
                          feature_group_count=group)
    # the groups are split and joined channels-last, as XLA CPU keeps convolution activations:
    # over NCHW, XLA copied every group to NCHW and back (ShuffleNet at batch 8: 131 copies, 44 %
    # of its time; channels-last 1.13-1.32x faster at batch 8, 1.05-1.26x at batch 1)
    last = ("N" + dims[0][2:] + "C", dims[1], "N" + dims[2][2:] + "C")
    ws = arith.split_channels(w, group, o_axis)

    def per_group(v: jax.Array) -> jax.Array:
        return jnp.concatenate([arith.conv(a, k, strides, padding, rhs_dilation=dilations, dimension_numbers=last)
                                for a, k in zip(jnp.split(v, group, axis=-1), ws)], axis=-1)

    return channels_last(per_group, x)


@op("Conv", (1, 11, 22))
def conv(x, w, b=None, *, auto_pad: str = "NOTSET", dilations=None, group: int = 1, kernel_shape=None,
         pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__Conv.html"""
    n = x.ndim - 2
    kernel = tuple(kernel_shape) if kernel_shape else w.shape[2:]
    strides, dilations = _per_axis(strides, n), _per_axis(dilations, n)
    padding = auto_pads(auto_pad, x.shape[2:], kernel, strides, dilations, pads)
    y = grouped_conv(x, w, strides, padding, dilations, conv_dims(n), group)
    return _bias(y, b)


def channels_last_kernel_dims(n: int) -> tuple[str, str, str]:
    """``dimension_numbers`` with the kernel stored spatial-first (``HWIO``)."""
    lhs, _, out = conv_dims(n)
    return (lhs, lhs[2:] + "IO", out)


@op("Conv", 1, domain="jaxinfer")
def conv_hwio(x, w, b=None, *, auto_pad: str = "NOTSET", dilations=None, group: int = 1, kernel_shape=None,
              pads=None, strides=None, activation=None, pool=None):
    """ONNX Conv with the weight pre-transposed to spatial..., I, O at load (passes.layout).

    XLA's CPU convolution wants the kernel spatial-first; an OIHW weight param
    would be transposed and copied on every call. ``activation`` (lo, hi) and ``pool`` (PH, PW) are the
    epilogue passes.fuse.fuse_conv_epilogue folds in: a Relu's or a Clip's clamp, then a MaxPool whose strides
    are its window, unpadded. 2-D ungrouped float32 layers our CPU kernel takes run all of it as the kernel's one
    call (conv_lowering.conv_epilogue); other layers (quantized weights, other platforms) run the ops as they were.
    """
    n = x.ndim - 2
    kernel = tuple(kernel_shape) if kernel_shape else w.shape[:n]
    strides, dilations = _per_axis(strides, n), _per_axis(dilations, n)
    padding = auto_pads(auto_pad, x.shape[2:], kernel, strides, dilations, pads)
    clamp = (float(activation[0]), float(activation[1])) if activation is not None else None
    window = (int(pool[0]), int(pool[1])) if pool is not None else None
    if (clamp or window) and n == 2 and group == 1 and isinstance(w, (np.ndarray, jax.Array)):
        y = conv_epilogue(x, w, strides, padding, dilations, channels_last_kernel_dims(n), b, clamp, window)
        if y is not None:
            return y
    y = _bias(grouped_conv(x, w, strides, padding, dilations, channels_last_kernel_dims(n), group), b)
    if clamp is not None:
        y = jnp.minimum(jnp.maximum(y, jnp.asarray(clamp[0], y.dtype)), jnp.asarray(clamp[1], y.dtype))
    if window is not None:
        y = max_pool(y, kernel_shape=window, strides=window)
    return y


@op("ConvInteger", (10,))
def conv_integer(x, w, x_zero_point=None, w_zero_point=None, *, auto_pad: str = "NOTSET", dilations=None,
                 group: int = 1, kernel_shape=None, pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__ConvInteger.html: int32 accumulation of zero-point-shifted ints."""
    n = x.ndim - 2
    kernel = tuple(kernel_shape) if kernel_shape else w.shape[2:]
    strides, dilations = _per_axis(strides, n), _per_axis(dilations, n)
    padding = auto_pads(auto_pad, x.shape[2:], kernel, strides, dilations, pads)
    bound = abs_bound(x.dtype, x_zero_point is not None) * abs_bound(w.dtype, w_zero_point is not None)
    return zp_conv(x, x_zero_point, w, w_zero_point, strides, padding, rhs_dilation=dilations,
                   dimension_numbers=conv_dims(n), feature_group_count=group, bound=bound)


def _transpose_pads(auto_pad: str, in_shape, kernel, strides, dilations, output_padding, output_shape,
                    pads) -> list[tuple[int, int]]:
    """(begin, end) pads of ConvTranspose; from ``output_shape`` or SAME_* when those are set."""
    n = len(kernel)
    if output_shape is None and auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        return [(0, 0)] * n if auto_pad == "VALID" else spatial_pads(pads, n)
    target = (tuple(int(o) for o in output_shape)[-n:] if output_shape is not None
              else tuple(i * s for i, s in zip(in_shape, strides)))
    out = []
    for i in range(n):
        total = (strides[i] * (in_shape[i] - 1) + output_padding[i] + (kernel[i] - 1) * dilations[i] + 1
                 - target[i])
        if auto_pad == "SAME_UPPER":
            out.append((total // 2, total - total // 2))
        else:
            out.append((total - total // 2, total // 2))
    return out


@op("ConvTranspose", (1, 11, 22))
def conv_transpose(x, w, b=None, *, auto_pad: str = "NOTSET", dilations=None, group: int = 1, kernel_shape=None,
                   output_padding=None, output_shape=None, pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__ConvTranspose.html as one input-dilated convolution."""
    n = x.ndim - 2
    kernel = tuple(kernel_shape) if kernel_shape else w.shape[2:]
    strides, dilations = _per_axis(strides, n), _per_axis(dilations, n)
    out_pad = _per_axis(output_padding, n, 0)
    pad = _transpose_pads(auto_pad, x.shape[2:], kernel, strides, dilations, out_pad, output_shape, pads)
    # (C_in, C_out/g, k...) -> (C_out, C_in/g, k...), spatially flipped.
    c_in, c_out_g = w.shape[:2]
    wg = w.reshape((group, c_in // group, c_out_g) + w.shape[2:])
    wg = jnp.swapaxes(wg, 1, 2).reshape((group * c_out_g, c_in // group) + w.shape[2:])
    wg = jnp.flip(wg, axis=tuple(range(2, w.ndim)))
    padding = [(d * (k - 1) - lo, d * (k - 1) - hi + op_)
               for k, d, (lo, hi), op_ in zip(kernel, dilations, pad, out_pad)]
    y = lax.conv_general_dilated(x, wg, (1,) * n, padding, lhs_dilation=strides, rhs_dilation=dilations,
                                 dimension_numbers=conv_dims(n), feature_group_count=group)
    return _bias(y, b)


@op("Col2Im", (18,), static=(1, 2))
def col2im(x, image_shape, block_shape, *, dilations=None, pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__Col2Im.html: the adjoint of patch extraction (a transposed conv)."""
    image, block = ints(image_shape), ints(block_shape)
    n = len(image)
    strides, dilations = _per_axis(strides, n), _per_axis(dilations, n)
    padding = spatial_pads(pads, n)
    k = int(np.prod(block))
    batch, ck = x.shape[0], x.shape[1]
    if ck % k:
        raise ValueError(f"Col2Im: input dim 1 ({ck}) must be a multiple of prod(block_shape)={k}")
    out_sp = tuple((image[i] + lo + hi - (dilations[i] * (block[i] - 1) + 1)) // strides[i] + 1
                   for i, (lo, hi) in enumerate(padding))
    if int(np.prod(out_sp)) != x.shape[2]:
        raise ValueError(f"Col2Im: input has {x.shape[2]} blocks, image/block/pads/strides give {out_sp}")

    def patches(img):
        return lax.conv_general_dilated_patches(img, block, strides, padding, rhs_dilation=dilations,
                                                dimension_numbers=conv_dims(n), precision=lax.Precision.HIGHEST)

    spec = jax.ShapeDtypeStruct((batch, ck // k) + image, x.dtype)
    (img,) = jax.linear_transpose(patches, spec)(x.reshape((batch, ck) + out_sp))
    return img


def bilinear_zeros(x, coords):
    """Sample ``x`` (N, C, *S) at fractional ``coords`` (N, *P, n) -> (N, C, *P); taps outside are 0."""
    n = coords.shape[-1]
    spatial = x.shape[2:]
    xt = jnp.moveaxis(x, 1, -1)  # (N, *S, C)
    batch = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (coords.ndim - 2))
    lo = jnp.floor(coords)
    frac = coords - lo
    lo = lo.astype(jnp.int32)
    out = jnp.zeros(coords.shape[:-1] + (x.shape[1],), x.dtype)
    for corner in np.ndindex(*(2,) * n):
        weight = jnp.ones(coords.shape[:-1], coords.dtype)
        valid = jnp.ones(coords.shape[:-1], bool)
        idx = []
        for a, c in enumerate(corner):
            i = lo[..., a] + c
            weight = weight * (frac[..., a] if c else 1 - frac[..., a])
            valid = valid & (i >= 0) & (i < spatial[a])
            idx.append(jnp.clip(i, 0, spatial[a] - 1))
        vals = xt[(batch, *idx)]
        out = out + jnp.where(valid, weight, 0).astype(x.dtype)[..., None] * vals
    return jnp.moveaxis(out, -1, 1)


@op("DeformConv", (19, 22))
def deform_conv(x, w, offset, b=None, mask=None, *, dilations=None, group: int = 1, kernel_shape=None,
                offset_group: int = 1, pads=None, strides=None):
    """https://onnx.ai/onnx/operators/onnx__DeformConv.html: bilinear sampling at offset taps, then a grouped matmul."""
    n = x.ndim - 2
    kernel = tuple(kernel_shape) if kernel_shape else w.shape[2:]
    strides, dilations = _per_axis(strides, n), _per_axis(dilations, n)
    padding = spatial_pads(pads, n)
    batch, c_in = x.shape[:2]
    out_sp = offset.shape[2:]
    k = int(np.prod(kernel))
    if offset.shape[1] != offset_group * k * n:
        raise ValueError(f"DeformConv: offset has {offset.shape[1]} channels, expected offset_group*prod(kernel)*{n}"
                         f" = {offset_group * k * n}")
    # Base sampling position of every (kernel tap, output pixel): (k, *out, n).
    grids = np.meshgrid(*[np.arange(o) for o in out_sp], indexing="ij")
    taps = np.stack(np.meshgrid(*[np.arange(kk) for kk in kernel], indexing="ij"), -1).reshape(k, n)
    base = np.stack([g * strides[a] - padding[a][0] for a, g in enumerate(grids)], -1)
    base = base[None] + (taps * np.asarray(dilations))[(slice(None),) + (None,) * n]
    off = offset.reshape((batch, offset_group, k, n) + out_sp)
    off = jnp.moveaxis(off, 3, -1)  # (N, G, k, *out, n)
    coords = off + jnp.asarray(base, offset.dtype)
    xg = x.reshape((batch * offset_group, c_in // offset_group) + x.shape[2:])
    coords = coords.reshape((batch * offset_group, k) + out_sp + (n,))
    cols = bilinear_zeros(xg, coords)  # (N*G, C/G, k, *out)
    cols = cols.reshape((batch, c_in, k) + out_sp)
    if mask is not None:
        m = mask.reshape((batch, offset_group, 1, k) + out_sp)
        cols = (cols.reshape((batch, offset_group, c_in // offset_group, k) + out_sp) * m).reshape(cols.shape)
    c_out = w.shape[0]
    cols = cols.reshape((batch, group, (c_in // group) * k, -1))
    wm = w.reshape((group, c_out // group, (c_in // group) * k))
    y = jnp.einsum("gok,bgkp->bgop", wm, cols, precision=lax.Precision.HIGHEST)
    return _bias(y.reshape((batch, c_out) + out_sp), b)


@op("CausalConvWithState", (27,))
def causal_conv_with_state(x, weight, bias=None, past_state=None, *, activation: str = "none"):
    """https://onnx.ai/onnx/operators/onnx__CausalConvWithState.html: depthwise causal 1-D conv carrying k-1 steps."""
    if activation not in ("none", "silu", "swish"):
        raise ValueError(f"CausalConvWithState: activation {activation!r}; expected 'none', 'silu' or 'swish'")
    if x.ndim != 3 or weight.ndim != 3:
        raise ValueError(f"CausalConvWithState: input and weight must be rank 3, got {x.shape} and {weight.shape}")
    batch, channels, _ = x.shape
    k = weight.shape[2]
    pad = jnp.zeros((batch, channels, k - 1), x.dtype) if past_state is None else past_state
    padded = jnp.concatenate([pad, x], axis=2)
    y = _bias(lax.conv_general_dilated(padded, weight, (1,), [(0, 0)], dimension_numbers=conv_dims(1),
                                       feature_group_count=channels), bias)
    if activation != "none":
        yf = y.astype(jnp.float32)
        y = (yf * jax.nn.sigmoid(yf)).astype(x.dtype)
    return y, padded[:, :, padded.shape[2] - (k - 1):]
