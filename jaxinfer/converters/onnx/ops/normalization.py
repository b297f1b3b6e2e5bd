"""Normalization ops (ai.onnx): batch, layer, group, instance, RMS, LRN, Lp, mean-variance.

Statistics are population statistics (divide by the element count). Where an op
has ``stash_type`` (Layer/Group/RMS normalization), its statistics are computed in
that type, as the spec's function bodies do, and the normalized value is cast back
to the input's type before the affine step.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax

from .... import cpu_kernels
from ....registry import OpDef, registrar
from ._util import axis as norm_axis
from ._util import dtype_of

OPS: list[OpDef] = []
op = registrar(OPS)


def _channel(v, ndim: int):
    """A per-channel vector [C] (or a per-activation tensor [C, D1, ...]) shaped to broadcast over [N, C, ...]."""
    v = jnp.asarray(v)
    if v.ndim == ndim - 1:  # spatial=0 forms: one value per activation
        return v[None]
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _moments(x, axes: tuple[int, ...]):
    mean = jnp.mean(x, axis=axes, keepdims=True)
    centered = x - mean
    return mean, centered, jnp.mean(centered * centered, axis=axes, keepdims=True)


def _eps(epsilon: float, dtype):
    return jnp.asarray(epsilon, dtype)


# --- BatchNormalization -------------------------------------------------------------------------


def _batch_norm_infer(x, scale, bias, mean, var, epsilon):
    inv = lax.rsqrt(_channel(var, x.ndim) + _eps(epsilon, x.dtype)) * _channel(scale, x.ndim)
    return (x - _channel(mean, x.ndim)) * inv + _channel(bias, x.ndim)


def _batch_norm_train(x, scale, bias, mean, var, epsilon: float, momentum: float, per_activation: bool):
    """Normalize with batch statistics; return (Y, running mean, running var, batch mean, batch var)."""
    axes = (0,) if per_activation else (0,) + tuple(range(2, x.ndim))
    batch_mean = jnp.mean(x, axis=axes)
    batch_var = jnp.var(x, axis=axes)
    y = _batch_norm_infer(x, scale, bias, batch_mean, batch_var, epsilon)
    m = jnp.asarray(momentum, x.dtype)
    running_mean = mean * m + batch_mean * (1 - m)
    running_var = var * m + batch_var * (1 - m)
    return y, running_mean.astype(x.dtype), running_var.astype(x.dtype), batch_mean, batch_var


@op("BatchNormalization", (1, 6, 7, 9))
def batch_normalization_legacy(x, scale, bias, mean, var, *, epsilon: float = 1e-5, momentum: float = 0.9,
                               spatial: int = 1, is_test: int = 0, consumed_inputs=None,
                               _num_outputs: int = 1, _opset: int = 9):
    """https://onnx.ai/onnx/operators/onnx__BatchNormalization.html (opset < 14).

    Training form when the node asks for the running statistics (outputs past Y) and,
    before opset 7, ``is_test`` is 0: Y, mean, var, saved_mean, saved_var.
    """
    training = _num_outputs > 1 and not (_opset < 7 and is_test)
    if not training:
        return _batch_norm_infer(x, scale, bias, mean, var, epsilon)
    out = _batch_norm_train(x, scale, bias, mean, var, epsilon, momentum, per_activation=not spatial)
    return out[:_num_outputs]


@op("BatchNormalization", (14, 15))
def batch_normalization(x, scale, bias, mean, var, *, epsilon: float = 1e-5, momentum: float = 0.9,
                        training_mode: int = 0):
    """https://onnx.ai/onnx/operators/onnx__BatchNormalization.html: training_mode=1 also returns running mean/var."""
    if not training_mode:
        return _batch_norm_infer(x, scale, bias, mean, var, epsilon)
    return _batch_norm_train(x, scale, bias, mean, var, epsilon, momentum, per_activation=False)[:3]


# --- Layer / RMS / Group / Instance ---------------------------------------------------------------


@op("LayerNormalization", (17,))
def layer_normalization(x, scale, b=None, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1):
    """https://onnx.ai/onnx/operators/onnx__LayerNormalization.html: Y, Mean, InvStdDev (stats in stash_type)."""
    ax = norm_axis(axis, x.ndim)
    st = dtype_of(stash_type)

    def stats(x):
        xs = x.astype(st)
        mean, centered, var = _moments(xs, tuple(range(ax, x.ndim)))
        return mean, centered, lax.rsqrt(var + _eps(epsilon, xs.dtype))

    def xla(x, scale, b):
        _, centered, inv_std = stats(x)
        y = (centered * inv_std).astype(x.dtype) * scale
        return y if b is None else y + b

    mean, _, inv_std = stats(x)  # Mean and InvStdDev are XLA's (dropped when nothing reads them)
    y = last_axis_norm(x, scale, b, epsilon, xla) if ax == x.ndim - 1 and np.dtype(st) == x.dtype else xla(x, scale, b)
    return y, mean, inv_std


def last_axis_norm(x, gamma, beta, epsilon: float, xla):
    """A float32 layer norm over the last axis with ``gamma`` / ``beta`` of C values each (any shape that
    broadcasts without adding axes) as our CPU kernel (:func:`cpu_kernels.layer_norm`: one call where XLA ran
    5-7 small loops); ``xla(x, gamma, beta)`` otherwise (and on other platforms, with gamma / beta as [C])."""
    x = jnp.asarray(x)
    c = x.shape[-1] if x.ndim else 0

    def fits(v) -> bool:
        return v is None or (np.size(v) == c and jnp.ndim(v) <= x.ndim and tuple(jnp.shape(v))[-1:] in ((c,), ()))

    if x.dtype != jnp.float32 or c == 0 or gamma is None or not fits(gamma) or not fits(beta):
        return xla(x, gamma, beta)
    flat = lambda v: None if v is None else jnp.asarray(v).astype(jnp.float32).reshape(c)  # noqa: E731
    return cpu_kernels.layer_norm(x, flat(gamma), flat(beta), float(epsilon), xla)


@op("RMSNormalization", (23,))
def rms_normalization(x, scale, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1):
    """https://onnx.ai/onnx/operators/onnx__RMSNormalization.html: X / sqrt(mean(X^2) + eps) * scale."""
    ax = norm_axis(axis, x.ndim)
    xs = x.astype(dtype_of(stash_type))
    mean_sq = jnp.mean(xs * xs, axis=tuple(range(ax, x.ndim)), keepdims=True)
    return (xs * lax.rsqrt(mean_sq + _eps(epsilon, xs.dtype))).astype(x.dtype) * scale


def _group_normalize(x, num_groups: int, epsilon: float):
    """x [N, C, ...] normalized per (instance, group of C/num_groups channels)."""
    n, c = x.shape[:2]
    if num_groups <= 0 or c % num_groups:
        raise ValueError(f"GroupNormalization: num_groups={num_groups} must divide the channel count {c}")
    grouped = x.reshape((n, num_groups, -1))
    _, centered, var = _moments(grouped, (2,))
    return (centered * lax.rsqrt(var + _eps(epsilon, x.dtype))).reshape(x.shape)


@op("GroupNormalization", (18,))
def group_normalization_18(x, scale, bias, *, epsilon: float = 1e-5, num_groups: int):
    """https://onnx.ai/onnx/operators/onnx__GroupNormalization.html#groupnormalization-18: scale/bias per group."""
    normalized = _group_normalize(x, num_groups, epsilon)
    group_size = x.shape[1] // num_groups
    per_channel = (jnp.repeat(jnp.asarray(scale), group_size), jnp.repeat(jnp.asarray(bias), group_size))
    return normalized * _channel(per_channel[0], x.ndim) + _channel(per_channel[1], x.ndim)


@op("GroupNormalization", (21,))
def group_normalization(x, scale, bias, *, epsilon: float = 1e-5, num_groups: int, stash_type: int = 1):
    """https://onnx.ai/onnx/operators/onnx__GroupNormalization.html: scale/bias per channel, stats in stash_type."""
    normalized = _group_normalize(x.astype(dtype_of(stash_type)), num_groups, epsilon).astype(x.dtype)
    return normalized * _channel(scale, x.ndim) + _channel(bias, x.ndim)


@op("InstanceNormalization", (1, 6, 22))
def instance_normalization(x, scale, b, *, epsilon: float = 1e-5, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__InstanceNormalization.html: per (instance, channel) over spatial axes."""
    _, centered, var = _moments(x, tuple(range(2, x.ndim)))
    return centered * lax.rsqrt(var + _eps(epsilon, x.dtype)) * _channel(scale, x.ndim) + _channel(b, x.ndim)


@op("MeanVarianceNormalization", (9, 13))
def mean_variance_normalization(x, *, axes=(0, 2, 3)):
    """https://onnx.ai/onnx/operators/onnx__MeanVarianceNormalization.html: (X - E[X]) / (sqrt(Var[X]) + 1e-9)."""
    _, centered, var = _moments(x, tuple(sorted({norm_axis(int(a), x.ndim) for a in axes})))
    return centered / (jnp.sqrt(var) + _eps(1e-9, x.dtype))


@op("LpNormalization", (1, 22))
def lp_normalization(x, *, axis: int = -1, p: int = 2):
    """https://onnx.ai/onnx/operators/onnx__LpNormalization.html: x / ||x||_p along axis (0 where the norm is 0)."""
    ax = norm_axis(axis, x.ndim)
    if p == 1:
        norm = jnp.sum(jnp.abs(x), axis=ax, keepdims=True)
    elif p == 2:
        norm = jnp.sqrt(jnp.sum(x * x, axis=ax, keepdims=True))
    else:
        raise ValueError(f"LpNormalization: p must be 1 or 2, got {p}")
    safe = jnp.where(norm == 0, jnp.ones_like(norm), norm)
    return jnp.where(norm == 0, jnp.zeros_like(x), x / safe)


@op("LRN", (1, 13))
def lrn(x, *, alpha: float = 1e-4, beta: float = 0.75, bias: float = 1.0, size: int):
    """https://onnx.ai/onnx/operators/onnx__LRN.html: across channels."""
    lo = (size - 1) // 2
    hi = size - 1 - lo
    # the channel window runs channels-last, as the pools do (ops/pool.py), so that a conv -> LRN ->
    # pool chain keeps XLA CPU's channels-last convolution layout instead of copying to NCHW and back
    xt = jnp.moveaxis(x, 1, -1)
    window = (1,) * (x.ndim - 1) + (size,)
    s = lax.reduce_window(xt * xt, jnp.asarray(0, x.dtype), lax.add, window, (1,) * x.ndim,
                          [(0, 0)] * (x.ndim - 1) + [(lo, hi)])
    return jnp.moveaxis(xt / (bias + (alpha / size) * s) ** beta, -1, 1)
