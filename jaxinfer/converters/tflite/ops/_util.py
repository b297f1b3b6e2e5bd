"""Helpers shared by the TFLite op families: fused activations, quantization checks."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ..quant import QParams

QList = tuple[QParams | None, ...] | None


def fused(x: jnp.ndarray, act: str) -> jnp.ndarray:
    """A float op's fused activation (TFLite's ActivationFunctionType)."""
    if act == "NONE":
        return x
    if act == "RELU":
        return jnp.maximum(x, 0)
    if act == "RELU6":
        return jnp.clip(x, 0, 6)
    if act == "RELU_N1_TO_1":
        return jnp.clip(x, -1, 1)
    if act == "TANH":
        return jnp.tanh(x)
    if act == "SIGN_BIT":
        return jnp.sign(x)
    raise ValueError(f"unknown fused activation {act!r} (expected NONE, RELU, RELU6, RELU_N1_TO_1, TANH or SIGN_BIT)")


#: The fused activations that are a clamp to [lo, hi] (None: no activation), as our float kernels finish a layer.
CLAMPS: dict[str, tuple[float, float] | None] = {"NONE": None, "RELU": (0.0, float("inf")), "RELU6": (0.0, 6.0),
                                                 "RELU_N1_TO_1": (-1.0, 1.0)}


def qat(qs: QList, i: int) -> QParams | None:
    """The quantization of slot ``i``, or None."""
    if not qs or i >= len(qs):
        return None
    return qs[i]


def is_quantized(in_q: QList, out_q: QList) -> bool:
    """True when the op's first input and its output are affine-quantized integers."""
    return qat(in_q, 0) is not None and qat(out_q, 0) is not None


def same_q(a: QParams | None, b: QParams | None) -> bool:
    if a is None or b is None:
        return a is b
    return (a.dtype == b.dtype and a.scale.shape == b.scale.shape and bool((a.scale == b.scale).all())
            and bool((a.zero_point == b.zero_point).all()))


def require_float(op: str, in_q: QList, out_q: QList, x: Any = None) -> None:
    """Raise for quantized tensors on an op that has only a float kernel here."""
    if any(q is not None for q in (in_q or ()) + (out_q or ())):
        raise ValueError(f"{op} on quantized tensors is not supported (only the float kernel is implemented)")
