"""Image resampling and layout ops (ai.onnx): Resize, Upsample, GridSample, AffineGrid, RoiAlign, CenterCropPad,
DepthToSpace, SpaceToDepth.

Resize is separable: per resized axis the taps and weights are computed on the host (sizes, scales
and roi are static), so XLA sees one static gather and a weighted sum per axis.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from ._util import axes as norm_axes
from ._util import ints

OPS: list[OpDef] = []
op = registrar(OPS)

# ---------------------------------------------------------------------------------------------- Resize


def _source_coords(mode: str, out_len: int, in_len: int, scale: float, roi: tuple[float, float] | None
                   ) -> np.ndarray:
    """Input coordinate of every output index along one axis (float64)."""
    y = np.arange(out_len, dtype=np.float64)
    length = scale * in_len  # the (possibly fractional) resized length
    if mode == "half_pixel":
        return (y + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        offset = in_len / 2 * (1 - out_len / length)
        return offset + (y + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (y + 0.5) / scale - 0.5 if length > 1 else np.full(out_len, -0.5)
    if mode == "align_corners":
        return y * (in_len - 1) / (length - 1) if length != 1 else np.zeros(out_len)
    if mode == "asymmetric":
        return y / scale
    if mode == "tf_half_pixel_for_nn":
        return (y + 0.5) / scale
    if mode == "tf_crop_and_resize":
        start, end = roi if roi is not None else (0.0, 1.0)
        if length == 1:
            return np.full(out_len, (end - start) * (in_len - 1) / 2 + start * (in_len - 1))
        return y * (end - start) * (in_len - 1) / (length - 1) + start * (in_len - 1)
    raise ValueError(f"Resize: coordinate_transformation_mode {mode!r} is not one of half_pixel, "
                     "half_pixel_symmetric, pytorch_half_pixel, align_corners, asymmetric, tf_crop_and_resize, "
                     "tf_half_pixel_for_nn")


def _nearest_index(x: np.ndarray, mode: str, scale: float) -> np.ndarray:
    f = np.floor(x)
    r = x - f
    if mode == "round_prefer_floor":
        up = r > 0.5
    elif mode == "round_prefer_ceil":
        up = r >= 0.5
    elif mode == "floor":
        up = np.zeros_like(r, bool)
    elif mode == "ceil":
        up = r > 0
    elif mode == "simple":  # Resize-10 / Upsample: truncate when enlarging, ceil when shrinking
        up = (r > 0) if scale < 1 else np.zeros_like(r, bool)
    else:
        raise ValueError(f"Resize: nearest_mode {mode!r} is not one of round_prefer_floor, round_prefer_ceil, "
                         "floor, ceil")
    return (f + up).astype(np.int64)


def _cubic(s: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances ``s``."""
    s = np.abs(s)
    near = ((a + 2) * s - (a + 3)) * s * s + 1
    far = ((a * s - 5 * a) * s + 8 * a) * s - 4 * a
    return np.where(s <= 1, near, np.where(s < 2, far, 0.0))


def _interp_weights(x: np.ndarray, mode: str, scale: float, cubic_a: float, antialias: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(taps, weights), each (out, T): unclamped input indices and their coefficients."""
    base = np.floor(x)
    r = x - base
    exact = r == 0  # an exact hit keeps the pixel on the left of x, with ratio 1
    base = np.where(exact, base - 1, base).astype(np.int64)
    r = np.where(exact, 1.0, r)
    s = min(scale, 1.0) if antialias else 1.0
    if mode == "linear":
        start = int(np.floor(-1 / s) + 1)
    elif mode == "cubic":
        start = int(np.floor(-2 / s) + 1)
    else:
        raise ValueError(f"Resize: mode {mode!r} is not one of nearest, linear, cubic")
    offsets = np.arange(start, 2 - start)  # T = 2 - 2 * start taps
    dist = (offsets[None, :] - r[:, None]) * s
    w = np.clip(1 - np.abs(dist), 0, 1) if mode == "linear" else _cubic(dist, cubic_a)
    if antialias:
        w = w / w.sum(axis=1, keepdims=True)
    return base[:, None] + offsets[None, :], w


def _resize_axis(x, axis: int, out_len: int, scale: float, *, mode: str, coord_mode: str, nearest_mode: str,
                 cubic_a: float, exclude_outside: int, antialias: int, roi, extrapolation: float):
    in_len = x.shape[axis]
    src = _source_coords(coord_mode, out_len, in_len, scale, roi)
    if mode == "nearest":
        idx = np.clip(_nearest_index(src, nearest_mode, scale), 0, in_len - 1)
        k = out_len // in_len if in_len else 0
        if k and out_len == k * in_len and np.array_equal(idx, np.arange(out_len) // k):
            y = jnp.repeat(x, k, axis=axis)  # integer upsampling: a broadcast, no gather
        else:
            y = jnp.take(x, idx, axis=axis)
    else:
        taps, w = _interp_weights(src, mode, scale, cubic_a, antialias)
        if exclude_outside:
            w = np.where((taps < 0) | (taps >= in_len), 0.0, w)
            total = w.sum(axis=1, keepdims=True)
            w = w / np.where(total == 0, 1.0, total)
        cdt = x.dtype if x.dtype in (jnp.float32, jnp.float64) else jnp.float32
        g = jnp.take(x, np.clip(taps, 0, in_len - 1), axis=axis).astype(cdt)  # (..., out, T, ...)
        wb = jnp.asarray(w, cdt).reshape(w.shape + (1,) * (x.ndim - axis - 1))
        y = jnp.sum(g * wb, axis=axis + 1)
    if coord_mode == "tf_crop_and_resize":
        outside = (src < 0) | (src > in_len - 1)
        if outside.any():
            mask = outside.reshape((-1,) + (1,) * (x.ndim - axis - 1))
            y = jnp.where(mask, jnp.asarray(extrapolation, y.dtype), y)
    return y


def _cast_back(y, dtype):
    """Round and saturate to an integer ``dtype``; plain cast for floats."""
    if y.dtype == dtype:
        return y
    if jnp.issubdtype(dtype, jnp.integer):
        info = jnp.iinfo(dtype)
        y = jnp.clip(jnp.round(y), info.min, info.max)
    return y.astype(dtype)


def _plan(shape: Sequence[int], axes: tuple[int, ...], scales, sizes, policy: str
          ) -> tuple[list[float], list[int]]:
    """Per-axis (scale, output length) from ``scales`` or ``sizes`` (+ keep_aspect_ratio_policy)."""
    if sizes is not None:
        sizes = ints(sizes)
        if len(sizes) != len(axes):
            raise ValueError(f"Resize: sizes has {len(sizes)} entries, expected {len(axes)} (one per axis)")
        scale = [sizes[i] / shape[a] for i, a in enumerate(axes)]
        out = list(sizes)
        if policy in ("not_larger", "not_smaller"):
            s = min(scale) if policy == "not_larger" else max(scale)
            scale = [s] * len(axes)
            out = [int(s * shape[a] + 0.5) for a in axes]
        elif policy != "stretch":
            raise ValueError(f"Resize: keep_aspect_ratio_policy {policy!r} is not stretch, not_larger, not_smaller")
        return scale, out
    if scales is None:
        raise ValueError("Resize: one of scales or sizes must be given")
    sc = np.asarray(scales).reshape(-1)
    if len(sc) != len(axes):
        raise ValueError(f"Resize: scales has {len(sc)} entries, expected {len(axes)} (one per axis)")
    return [float(s) for s in sc], [int(np.float64(s) * shape[a]) for s, a in zip(sc, axes)]


def resize_nd(x, scales=None, sizes=None, roi=None, *, axes=None, mode: str = "nearest",
              coordinate_transformation_mode: str = "half_pixel", nearest_mode: str = "round_prefer_floor",
              cubic_coeff_a: float = -0.75, exclude_outside: int = 0, extrapolation_value: float = 0.0,
              antialias: int = 0, keep_aspect_ratio_policy: str = "stretch"):
    """Resize ``x`` along ``axes``; scales/sizes/roi are host values (one entry per axis)."""
    if mode not in ("nearest", "linear", "cubic"):
        raise ValueError(f"Resize: mode {mode!r} is not one of nearest, linear, cubic")
    ax = norm_axes(axes, x.ndim)
    scale, out = _plan(x.shape, ax, scales, sizes, keep_aspect_ratio_policy)
    use_roi = coordinate_transformation_mode == "tf_crop_and_resize" and roi is not None and np.size(roi) > 0
    roi_v = np.asarray(roi, np.float64).reshape(-1) if use_roi else None  # other modes ignore roi
    if roi_v is not None and len(roi_v) != 2 * len(ax):
        if len(roi_v) == 2 * x.ndim and len(ax) < x.ndim:
            roi_v = np.concatenate([roi_v[list(ax)], roi_v[[a + x.ndim for a in ax]]])
        else:
            raise ValueError(f"Resize: roi has {len(roi_v)} entries, expected {2 * len(ax)}")
    y = x
    for i, a in enumerate(ax):
        axis_roi = None if roi_v is None else (float(roi_v[i]), float(roi_v[i + len(ax)]))
        trivial_roi = coordinate_transformation_mode != "tf_crop_and_resize" or axis_roi in (None, (0.0, 1.0))
        if scale[i] == 1.0 and out[i] == x.shape[a] and trivial_roi:
            continue
        y = _resize_axis(y, a, out[i], scale[i], mode=mode, coord_mode=coordinate_transformation_mode,
                         nearest_mode=nearest_mode, cubic_a=cubic_coeff_a, exclude_outside=exclude_outside,
                         antialias=antialias if mode != "nearest" else 0, roi=axis_roi,
                         extrapolation=extrapolation_value)
    return _cast_back(y, x.dtype)


def _present(v):
    return None if v is None or np.size(v) == 0 else v


@op("Resize", (11, 13, 18, 19), static=(1, 2, 3))
def resize(x, roi=None, scales=None, sizes=None, *, antialias: int = 0, axes=None,
           coordinate_transformation_mode: str = "half_pixel", cubic_coeff_a: float = -0.75,
           exclude_outside: int = 0, extrapolation_value: float = 0.0, keep_aspect_ratio_policy: str = "stretch",
           mode: str = "nearest", nearest_mode: str = "round_prefer_floor"):
    """https://onnx.ai/onnx/operators/onnx__Resize.html"""
    return resize_nd(x, _present(scales), _present(sizes), _present(roi), axes=axes, mode=mode,
                     coordinate_transformation_mode=coordinate_transformation_mode, nearest_mode=nearest_mode,
                     cubic_coeff_a=cubic_coeff_a, exclude_outside=exclude_outside,
                     extrapolation_value=extrapolation_value, antialias=antialias,
                     keep_aspect_ratio_policy=keep_aspect_ratio_policy)


def _legacy_resize(x, scales, mode: str):
    """Resize-10 / Upsample: asymmetric coordinates, nearest truncates."""
    if mode not in ("nearest", "linear", "bilinear"):
        raise ValueError(f"Upsample/Resize-10: mode {mode!r} is not nearest or linear")
    return resize_nd(x, np.asarray(scales, np.float32), mode="nearest" if mode == "nearest" else "linear",
                     coordinate_transformation_mode="asymmetric", nearest_mode="simple")


@op("Resize", 10, static=(1,))
def resize_v10(x, scales, *, mode: str = "nearest"):
    """https://onnx.ai/onnx/operators/onnx__Resize.html#resize-10"""
    return _legacy_resize(x, scales, mode)


@op("Upsample", (9, 10), static=(1,))
def upsample(x, scales, *, mode: str = "nearest"):
    """https://onnx.ai/onnx/operators/onnx__Upsample.html"""
    return _legacy_resize(x, scales, mode)


@op("Upsample", 7)
def upsample_v7(x, *, mode: str = "nearest", scales):
    return _legacy_resize(x, scales, mode)


@op("Upsample", 1)
def upsample_v1(x, *, height_scale: float, width_scale: float, mode: str = "nearest"):
    return _legacy_resize(x, [1.0, 1.0, height_scale, width_scale], mode)


# ---------------------------------------------------------------------------------------------- GridSample


def _reflect(v, lo: float, hi: float):
    """Reflect coordinates into [lo, hi] by the nearer border, repeatedly."""
    rng = hi - lo
    if rng <= 0:
        return jnp.full_like(v, lo)
    below = v < lo
    d = jnp.where(below, lo - v, v - hi)
    n = jnp.floor(d / rng)
    r = d - n * rng
    even = jnp.mod(n, 2) == 0
    inside = jnp.where(below, jnp.where(even, lo + r, hi - r), jnp.where(even, hi - r, lo + r))
    return jnp.where((v < lo) | (v > hi), inside, v)


def _grid_sample_taps(i, size: int, padding_mode: str, lo: float, hi: float):
    """(clamped index, validity) of integer tap ``i`` along an axis of ``size``."""
    if padding_mode == "zeros":
        return jnp.clip(i, 0, size - 1), (i >= 0) & (i < size)
    if padding_mode == "border":
        return jnp.clip(i, 0, size - 1), None
    r = _reflect(i.astype(jnp.float32), lo, hi).astype(jnp.int32)
    return jnp.clip(r, 0, size - 1), None


def _cubic_weights(t):
    a = -0.75
    return [((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a,
            ((a + 2) * t - (a + 3)) * t * t + 1,
            ((a + 2) * (1 - t) - (a + 3)) * (1 - t) * (1 - t) + 1,
            ((a * (2 - t) - 5 * a) * (2 - t) + 8 * a) * (2 - t) - 4 * a]


def grid_sample_nd(x, grid, *, mode: str = "linear", padding_mode: str = "zeros", align_corners: int = 0):
    """Sample ``x`` (N, C, *S) at normalized ``grid`` (N, *P, n) (last axis x, y, z...) -> (N, C, *P)."""
    if mode not in ("linear", "nearest", "cubic"):
        raise ValueError(f"GridSample: mode {mode!r} is not linear/bilinear, nearest or cubic/bicubic")
    if padding_mode not in ("zeros", "border", "reflection"):
        raise ValueError(f"GridSample: padding_mode {padding_mode!r} is not zeros, border or reflection")
    spatial = x.shape[2:]
    n = len(spatial)
    if grid.shape[-1] != n:
        raise ValueError(f"GridSample: grid's last dim is {grid.shape[-1]}, expected {n} for input {x.shape}")
    cdt = x.dtype if x.dtype == jnp.float64 else jnp.float32
    g = grid.astype(cdt)[..., ::-1]  # (.., z, y, x) to match the spatial axes
    coords, per_axis = [], []
    for a, size in enumerate(spatial):
        v = g[..., a]
        v = (v + 1) / 2 * (size - 1) if align_corners else ((v + 1) * size - 1) / 2
        lo, hi = (0.0, size - 1.0) if align_corners else (-0.5, size - 0.5)
        if mode == "nearest":
            v = jnp.round(v)
        if mode == "cubic":
            pass  # cubic pads each tap instead (as PyTorch and onnxruntime do)
        elif padding_mode == "border":
            v = jnp.clip(v, 0, size - 1)
        elif padding_mode == "reflection":
            v = _reflect(v, lo, hi)
        coords.append(v)
        if mode == "nearest":
            taps = [(v.astype(jnp.int32), jnp.ones_like(v))]
        else:
            base = jnp.floor(v)
            t = v - base
            base = base.astype(jnp.int32)
            if mode == "linear":
                taps = [(base, 1 - t), (base + 1, t)]
            else:
                taps = list(zip([base - 1, base, base + 1, base + 2], _cubic_weights(t)))
        per_axis.append([(*_grid_sample_taps(i, size, padding_mode, lo, hi), w) for i, w in taps])
    xt = jnp.moveaxis(x, 1, -1)  # (N, *S, C)
    batch = jnp.arange(x.shape[0]).reshape((-1,) + (1,) * (grid.ndim - 2))
    out = jnp.zeros(grid.shape[:-1] + (x.shape[1],), cdt)
    for combo in itertools.product(*per_axis):
        weight = jnp.ones(grid.shape[:-1], cdt)
        for _, valid, w in combo:
            weight = weight * (w if valid is None else jnp.where(valid, w, 0))
        vals = xt[(batch, *[i for i, _, _ in combo])].astype(cdt)
        out = out + weight[..., None] * vals
    return jnp.moveaxis(out, -1, 1).astype(x.dtype)


@op("GridSample", (20, 22))
def grid_sample(x, grid, *, align_corners: int = 0, mode: str = "linear", padding_mode: str = "zeros"):
    """https://onnx.ai/onnx/operators/onnx__GridSample.html (N-D)"""
    return grid_sample_nd(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


@op("GridSample", 16)
def grid_sample_v16(x, grid, *, align_corners: int = 0, mode: str = "bilinear", padding_mode: str = "zeros"):
    """https://onnx.ai/onnx/operators/onnx__GridSample.html#gridsample-16 (4-D; bilinear/bicubic names)"""
    mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
    return grid_sample_nd(x, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)


@op("AffineGrid", (20,), static=(1,))
def affine_grid(theta, size, *, align_corners: int = 0):
    """https://onnx.ai/onnx/operators/onnx__AffineGrid.html: (N, *S, n) normalized sampling grid."""
    dims = ints(size)
    spatial = dims[2:]
    n = len(spatial)
    if theta.shape[1:] != (n, n + 1):
        raise ValueError(f"AffineGrid: theta shape {theta.shape} does not match size {dims}; expected (N, {n}, {n + 1})")

    def line(length: int) -> np.ndarray:
        if align_corners:
            return np.linspace(-1.0, 1.0, length) if length > 1 else np.zeros(1)
        return (np.arange(length) * 2.0 + 1.0) / length - 1.0

    axes_ = np.meshgrid(*[line(s) for s in spatial], indexing="ij")  # D, H, W order
    base = np.stack([*axes_[::-1], np.ones(spatial)], axis=-1)  # (..., x, y, [z], 1)
    base = jnp.asarray(base, theta.dtype)
    return jnp.einsum("...k,njk->n...j", base, theta, precision=lax.Precision.HIGHEST)


# ---------------------------------------------------------------------------------------------- RoiAlign


def _roi_align(x, rois, batch_indices, *, mode: str, output_height: int, output_width: int, sampling_ratio: int,
               spatial_scale: float, half_pixel: bool):
    if mode not in ("avg", "max"):
        raise ValueError(f"RoiAlign: mode {mode!r} is not avg or max")
    height, width = x.shape[2:]
    cdt = x.dtype
    offset = 0.5 if half_pixel else 0.0
    r = rois.astype(cdt) * spatial_scale - offset
    start_w, start_h, end_w, end_h = r[:, 0], r[:, 1], r[:, 2], r[:, 3]
    roi_w, roi_h = end_w - start_w, end_h - start_h
    if not half_pixel:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)
    bin_h, bin_w = roi_h / output_height, roi_w / output_width
    if sampling_ratio > 0:
        grid_h = jnp.full(rois.shape[:1], sampling_ratio, jnp.int32)
        grid_w = grid_h
    else:
        grid_h = jnp.ceil(roi_h / output_height).astype(jnp.int32)
        grid_w = jnp.ceil(roi_w / output_width).astype(jnp.int32)
    count = jnp.maximum(grid_h * grid_w, 1).astype(cdt)
    max_w = jnp.maximum(jnp.max(grid_w, initial=1), 1)
    steps = jnp.max(grid_h, initial=0) * max_w  # a traced trip count when sampling is adaptive
    xt = jnp.moveaxis(x, 1, -1)  # (N, H, W, C)
    b = batch_indices.astype(jnp.int32)[:, None, None]
    ph = jnp.arange(output_height, dtype=cdt)
    pw = jnp.arange(output_width, dtype=cdt)

    def axis_taps(start, bin_size, grid, i, p, size):
        """Per (roi, bin) low/high index and weights along one axis for sample ``i``; valid mask."""
        v = start[:, None] + p[None] * bin_size[:, None] + (i + 0.5) * bin_size[:, None] / grid[:, None]
        ok = (v >= -1.0) & (v <= size)
        v = jnp.maximum(v, 0)
        low = jnp.floor(v).astype(jnp.int32)
        at_end = low >= size - 1
        low = jnp.where(at_end, size - 1, low)
        high = jnp.where(at_end, size - 1, low + 1)
        v = jnp.where(at_end, low.astype(cdt), v)
        frac = v - low
        return low, high, 1 - frac, frac, ok

    def body(k, acc):
        iy, ix = k // max_w, k % max_w
        yl, yh, wyl, wyh, oky = axis_taps(start_h, bin_h, grid_h.astype(cdt), iy.astype(cdt), ph, height)
        xl, xh, wxl, wxh, okx = axis_taps(start_w, bin_w, grid_w.astype(cdt), ix.astype(cdt), pw, width)
        active = ((iy < grid_h) & (ix < grid_w))[:, None, None]
        valid = (oky[:, :, None] & okx[:, None, :])[..., None]
        corners = []
        for yi, wy in ((yl, wyl), (yh, wyh)):
            for xi, wx in ((xl, wxl), (xh, wxh)):
                w = (wy[:, :, None] * wx[:, None, :])[..., None]
                corners.append(jnp.where(valid, w, 0) * xt[b, yi[:, :, None], xi[:, None, :]])
        if mode == "avg":
            return jnp.where(active[..., None], acc + sum(corners), acc)
        sample = jnp.maximum(jnp.maximum(corners[0], corners[1]), jnp.maximum(corners[2], corners[3]))
        return jnp.where(active[..., None], jnp.maximum(acc, sample), acc)

    shape = (rois.shape[0], output_height, output_width, x.shape[1])
    init = jnp.zeros(shape, cdt) if mode == "avg" else jnp.full(shape, -jnp.inf, cdt)
    acc = lax.fori_loop(0, steps, body, init)
    y = acc / count[:, None, None, None] if mode == "avg" else jnp.where(jnp.isneginf(acc), 0, acc)
    return jnp.moveaxis(y, -1, 1).astype(x.dtype)


@op("RoiAlign", (16, 22))
def roi_align(x, rois, batch_indices, *, coordinate_transformation_mode: str = "half_pixel", mode: str = "avg",
              output_height: int = 1, output_width: int = 1, sampling_ratio: int = 0, spatial_scale: float = 1.0):
    """https://onnx.ai/onnx/operators/onnx__RoiAlign.html (max mode: max of weighted corners, as the reference)."""
    if coordinate_transformation_mode not in ("half_pixel", "output_half_pixel"):
        raise ValueError(f"RoiAlign: coordinate_transformation_mode {coordinate_transformation_mode!r} is not "
                         "half_pixel or output_half_pixel")
    return _roi_align(x, rois, batch_indices, mode=mode, output_height=output_height, output_width=output_width,
                      sampling_ratio=sampling_ratio, spatial_scale=spatial_scale,
                      half_pixel=coordinate_transformation_mode == "half_pixel")


@op("RoiAlign", 10)
def roi_align_v10(x, rois, batch_indices, *, mode: str = "avg", output_height: int = 1, output_width: int = 1,
                  sampling_ratio: int = 0, spatial_scale: float = 1.0):
    """https://onnx.ai/onnx/operators/onnx__RoiAlign.html#roialign-10 (output_half_pixel coordinates)."""
    return _roi_align(x, rois, batch_indices, mode=mode, output_height=output_height, output_width=output_width,
                      sampling_ratio=sampling_ratio, spatial_scale=spatial_scale, half_pixel=False)


# ---------------------------------------------------------------------------------------------- layout


@op("CenterCropPad", (18,), static=(1,))
def center_crop_pad(x, shape, *, axes=None):
    """https://onnx.ai/onnx/operators/onnx__CenterCropPad.html: crop or zero-pad each axis around its center."""
    ax = norm_axes(axes, x.ndim)
    target = ints(shape)
    if len(target) != len(ax):
        raise ValueError(f"CenterCropPad: shape has {len(target)} entries, expected {len(ax)} (one per axis)")
    config = [(0, 0, 0)] * x.ndim
    for a, t in zip(ax, target):
        delta = t - x.shape[a]
        lo = int(delta / 2)  # toward zero: the extra crop/pad element goes to the end
        config[a] = (lo, delta - lo, 0)
    return lax.pad(x, jnp.zeros((), x.dtype), config)


@op("DepthToSpace", (1, 11, 13, 28))
def depth_to_space(x, *, blocksize: int, mode: str = "DCR"):
    """https://onnx.ai/onnx/operators/onnx__DepthToSpace.html"""
    b, c, h, w = x.shape
    bs = blocksize
    if mode == "DCR":
        y = x.reshape(b, bs, bs, c // (bs * bs), h, w).transpose(0, 3, 4, 1, 5, 2)
    elif mode == "CRD":
        y = x.reshape(b, c // (bs * bs), bs, bs, h, w).transpose(0, 1, 4, 2, 5, 3)
    else:
        raise ValueError(f"DepthToSpace: mode {mode!r} is not DCR or CRD")
    return y.reshape(b, c // (bs * bs), h * bs, w * bs)


@op("SpaceToDepth", (1, 13, 28))
def space_to_depth(x, *, blocksize: int, mode: str = "DCR"):
    """https://onnx.ai/onnx/operators/onnx__SpaceToDepth.html"""
    b, c, h, w = x.shape
    bs = blocksize
    y = x.reshape(b, c, h // bs, bs, w // bs, bs)
    if mode == "DCR":
        y = y.transpose(0, 3, 5, 1, 2, 4)
    elif mode == "CRD":
        y = y.transpose(0, 1, 3, 5, 2, 4)
    else:
        raise ValueError(f"SpaceToDepth: mode {mode!r} is not DCR or CRD")
    return y.reshape(b, c * bs * bs, h // bs, w // bs)
