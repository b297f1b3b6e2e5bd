"""Activations, the softmax family and Dropout (ai.onnx)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .... import cpu_kernels
from ....registry import OpDef, registrar
from ._util import axis as norm_axis

OPS: list[OpDef] = []
op = registrar(OPS)


def _dt(x: Any) -> Any:
    return jnp.result_type(x)


def _zero(x: Any) -> jax.Array:
    return jnp.zeros((), _dt(x))


# ---------------------------------------------------------------- rectifiers


@op("Relu", (1, 6, 13, 14))
def relu(x, *, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__Relu.html"""
    return jnp.maximum(x, _zero(x))


@op("LeakyRelu", (1, 6, 16))
def leaky_relu(x, *, alpha: float = 0.01, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__LeakyRelu.html"""
    return jnp.where(x >= 0, x, x * alpha).astype(_dt(x))


@op("PRelu", (7, 9, 16))
def prelu(x, slope):
    """https://onnx.ai/onnx/operators/onnx__PRelu.html (``slope`` broadcasts to ``x``)."""
    return jnp.where(x >= 0, x, x * jnp.asarray(slope).astype(_dt(x)))


@op("PRelu", (1, 6))
def prelu_v1(x, slope, *, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__PRelu.html#prelu-6: a 1-D slope of size C is per channel (axis 1)."""
    slope = jnp.asarray(slope)
    if slope.ndim == 1 and slope.shape[0] != 1 and jnp.ndim(x) >= 2:
        if slope.shape[0] != jnp.shape(x)[1]:
            raise ValueError(f"PRelu slope of size {slope.shape[0]} must be 1 or the channel count {jnp.shape(x)[1]}")
        slope = jnp.reshape(slope, (-1,) + (1,) * (jnp.ndim(x) - 2))
    return prelu(x, slope)


@op("ThresholdedRelu", (10, 22))
def thresholded_relu(x, *, alpha: float = 1.0):
    """https://onnx.ai/onnx/operators/onnx__ThresholdedRelu.html"""
    return jnp.where(x > alpha, x, _zero(x))


@op("Elu", (1, 6, 22))
def elu(x, *, alpha: float = 1.0, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__Elu.html"""
    return jnp.where(x >= 0, x, alpha * jnp.expm1(x)).astype(_dt(x))


@op("Selu", (1, 6, 22))
def selu(x, *, alpha: float = 1.67326319217681884765625, gamma: float = 1.05070102214813232421875,
         consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__Selu.html"""
    return (gamma * jnp.where(x > 0, x, alpha * jnp.expm1(x))).astype(_dt(x))


@op("Celu", 12)
def celu(x, *, alpha: float = 1.0):
    """https://onnx.ai/onnx/operators/onnx__Celu.html: max(0, x) + min(0, alpha * (exp(x / alpha) - 1))."""
    return (jnp.maximum(x, 0.0) + jnp.minimum(0.0, alpha * jnp.expm1(x / alpha))).astype(_dt(x))


# ---------------------------------------------------------------- smooth activations


@op("Sigmoid", (1, 6, 13))
def sigmoid(x, *, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__Sigmoid.html"""
    return jax.nn.sigmoid(x)


@op("Tanh", (1, 6, 13))
def tanh(x, *, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__Tanh.html"""
    return jnp.tanh(x)


@op("HardSigmoid", (1, 6, 22))
def hard_sigmoid(x, *, alpha: float = 0.2, beta: float = 0.5, consumed_inputs=None):
    """https://onnx.ai/onnx/operators/onnx__HardSigmoid.html: max(0, min(1, alpha * x + beta))."""
    return jnp.clip(alpha * x + beta, 0.0, 1.0).astype(_dt(x))


@op("HardSwish", (14, 22))
def hard_swish(x):
    """https://onnx.ai/onnx/operators/onnx__HardSwish.html: x * HardSigmoid(x; alpha=1/6, beta=0.5)."""
    return (x * jnp.clip(x / 6.0 + 0.5, 0.0, 1.0)).astype(_dt(x))


@op("Softplus", (1, 22))
def softplus(x):
    """https://onnx.ai/onnx/operators/onnx__Softplus.html: log(1 + exp(x))."""
    return jnp.logaddexp(x, _zero(x))


@op("Softsign", (1, 22))
def softsign(x):
    """https://onnx.ai/onnx/operators/onnx__Softsign.html: x / (1 + |x|)."""
    return x / (1.0 + jnp.abs(x))


@op("Swish", 24)
def swish(x, *, alpha: float = 1.0):
    """https://onnx.ai/onnx/operators/onnx__Swish.html: x * sigmoid(alpha * x)."""
    return (x * jax.nn.sigmoid(alpha * x)).astype(_dt(x))


@op("Mish", (18, 22))
def mish(x):
    """https://onnx.ai/onnx/operators/onnx__Mish.html: x * tanh(softplus(x))."""
    return x * jnp.tanh(jnp.logaddexp(x, _zero(x)))


@op("Gelu", 20)
def gelu(x, *, approximate: str = "none"):
    """https://onnx.ai/onnx/operators/onnx__Gelu.html (``approximate`` 'none' or 'tanh')."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"Gelu approximate must be 'none' or 'tanh', got {approximate!r}")
    return cpu_kernels.gelu(x, None, approximate, lambda v: _gelu_xla(v, approximate))


@op("Gelu", 1, domain="jaxinfer")
def gelu_bias(x, bias=None, *, approximate: str = "none"):
    """The GELU (``approximate`` 'none': erf, or 'tanh') of ``x + bias`` (``bias`` [C] over the last axis, or
    none): an exporter's GELU chain and the Add before it (passes.fuse.fuse_gelu), as cpu_kernels.gelu's one call
    on float32 CPUs."""
    return cpu_kernels.gelu(x, bias, approximate, lambda v: _gelu_xla(v, approximate))


def _gelu_xla(x, approximate: str):
    """GELU as XLA's elementwise ops (float32 on CPU takes cpu_kernels.gelu instead)."""
    if approximate == "none":
        return (0.5 * x * (1.0 + jax.lax.erf(x * (1.0 / math.sqrt(2.0))))).astype(_dt(x))
    inner = math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)
    return (0.5 * x * (1.0 + jnp.tanh(inner))).astype(_dt(x))


@op("Shrink", 9)
def shrink(x, *, bias: float = 0.0, lambd: float = 0.5):
    """https://onnx.ai/onnx/operators/onnx__Shrink.html: x+bias below -lambd, x-bias above lambd, else 0."""
    dt = _dt(x)
    b, lo, hi = (jnp.asarray(v).astype(dt) for v in (bias, -lambd, lambd))
    return jnp.where(x < lo, x + b, jnp.where(x > hi, x - b, _zero(x)))


# ---------------------------------------------------------------- softmax family


def _hardmax(x, axis: int):
    """One-hot of the first maximum along ``axis``."""
    idx = jnp.argmax(x, axis=axis)
    return jax.nn.one_hot(idx, jnp.shape(x)[axis], dtype=_dt(x), axis=axis)


def _coerced_2d(fn: Callable[..., Any], x, axis: int):
    """Opset < 13: flatten to [prod(shape[:axis]), prod(shape[axis:])], apply over dim 1, restore."""
    shape = jnp.shape(x)
    a = norm_axis(axis, max(jnp.ndim(x), 1))
    rows = int(np.prod(shape[:a], dtype=np.int64))
    return fn(jnp.reshape(x, (rows, -1)), axis=1).reshape(shape)


def _axis_form(fn: Callable[..., Any], x, axis: int):
    return fn(x, axis=norm_axis(axis, jnp.ndim(x)))


def last_axis_softmax(x, axis: int):
    """``jax.nn.softmax`` over ``axis``; over the last axis of a float32 tensor, our CPU kernel
    (:func:`cpu_kernels.softmax`: one call where XLA ran four loops)."""
    x = jnp.asarray(x)
    if x.ndim and axis == x.ndim - 1 and x.dtype == jnp.float32:
        return cpu_kernels.softmax(x, jax.nn.softmax)
    return jax.nn.softmax(x, axis=axis)


@op("Softmax", (1, 11))
def softmax_v1(x, *, axis: int = 1):
    """https://onnx.ai/onnx/operators/onnx__Softmax.html#softmax-11 (2-D coercion)."""
    return _coerced_2d(last_axis_softmax, x, axis)


@op("Softmax", 13)
def softmax(x, *, axis: int = -1):
    """https://onnx.ai/onnx/operators/onnx__Softmax.html"""
    return _axis_form(last_axis_softmax, x, axis)


@op("LogSoftmax", (1, 11))
def log_softmax_v1(x, *, axis: int = 1):
    """https://onnx.ai/onnx/operators/onnx__LogSoftmax.html#logsoftmax-11 (2-D coercion)."""
    return _coerced_2d(jax.nn.log_softmax, x, axis)


@op("LogSoftmax", 13)
def log_softmax(x, *, axis: int = -1):
    """https://onnx.ai/onnx/operators/onnx__LogSoftmax.html"""
    return _axis_form(jax.nn.log_softmax, x, axis)


@op("Hardmax", (1, 11))
def hardmax_v1(x, *, axis: int = 1):
    """https://onnx.ai/onnx/operators/onnx__Hardmax.html#hardmax-11 (2-D coercion)."""
    return _coerced_2d(_hardmax, x, axis)


@op("Hardmax", 13)
def hardmax(x, *, axis: int = -1):
    """https://onnx.ai/onnx/operators/onnx__Hardmax.html"""
    return _axis_form(_hardmax, x, axis)


# ---------------------------------------------------------------- dropout


@op("Dropout", (1, 6, 7, 10))
def dropout_v1(x, *, ratio: float = 0.5, is_test: int = 0, consumed_inputs=None, _num_outputs: int = 1):
    """https://onnx.ai/onnx/operators/onnx__Dropout.html#dropout-10: an inference engine runs it as identity."""
    return (x, jnp.ones(jnp.shape(x), bool)) if _num_outputs > 1 else x


@op("Dropout", (12, 13, 22), static=(2,), random=True)
def dropout(x, ratio=None, training_mode=None, *, seed: int | None = None, _num_outputs: int = 1):
    """https://onnx.ai/onnx/operators/onnx__Dropout.html

    Inference (``training_mode`` absent or false): identity, mask all true.
    Training: keep each element with probability ``1 - ratio`` and scale by
    ``1 / (1 - ratio)``; the draw uses JAX's PRNG keyed by ``seed``, so it is
    reproducible but not bit-identical to other runtimes' generators.
    """
    training = training_mode is not None and bool(np.asarray(training_mode).reshape(-1)[0])
    if not training:
        return (x, jnp.ones(jnp.shape(x), bool)) if _num_outputs > 1 else x
    if seed is None:
        raise ValueError("Dropout in training mode needs the 'seed' attribute: jaxinfer has no per-run "
                         "random state to draw the mask from; set seed, or run with training_mode=False")
    r = jnp.asarray(0.5 if ratio is None else ratio).astype(_dt(x))
    keep = jax.random.uniform(jax.random.PRNGKey(int(seed)), jnp.shape(x), _dt(x)) >= r
    scale = jnp.where(r < 1, 1 / (1 - r), jnp.zeros((), _dt(x)))
    y = jnp.where(keep, x * scale, _zero(x))
    return (y, keep) if _num_outputs > 1 else y
