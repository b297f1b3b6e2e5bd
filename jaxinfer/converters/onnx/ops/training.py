"""Training ops (ai.onnx.preview.training): Momentum, Adagrad, Adam.

Each optimizer takes a learning rate ``R`` and step count ``T`` (scalars), then
the variadic tensors grouped by role (all X's, then all G's, then the state
tensors), and returns the updated tensors grouped the same way. The update is
elementwise and runs in each tensor's own dtype; ``T`` may be a runtime value.

``Gradient`` is not implemented: it differentiates the *enclosing graph* (its
``xs``/``y`` attributes name values elsewhere in it), which an op function
cannot see; it needs a graph pass that rewrites it before tracing.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS, domain="ai.onnx.preview.training")


def _groups(tensors: tuple[Any, ...], n_groups: int, op_type: str) -> list[tuple[Any, ...]]:
    """Split the variadic inputs into ``n_groups`` equal groups (X's, G's, states...)."""
    if not tensors or len(tensors) % n_groups:
        raise ValueError(f"{op_type} wants R, T and then {n_groups} equal groups of tensors "
                         f"(X..., G..., ...), got {len(tensors)} tensors after R and T")
    n = len(tensors) // n_groups
    return [tensors[i * n:(i + 1) * n] for i in range(n_groups)]


def _scalar(v: Any, dtype: Any) -> Any:
    return jnp.asarray(v).reshape(()).astype(dtype)


@op("Momentum", 1)
def momentum(r, t, *tensors, alpha: float, beta: float, mode: str, norm_coefficient: float):
    """https://onnx.ai/onnx/operators/onnx_aionnxpreviewtraining_Momentum.html"""
    if mode not in ("standard", "nesterov"):
        raise ValueError(f"Momentum mode must be 'standard' or 'nesterov', got '{mode}'")
    xs, gs, vs = _groups(tensors, 3, "Momentum")
    first = jnp.asarray(t).reshape(()) <= 0
    new_x, new_v = [], []
    for x, g, v in zip(xs, gs, vs):
        dt = jnp.result_type(x)
        rate = _scalar(r, dt)
        g_reg = norm_coefficient * x + g
        beta_t = jnp.where(first, jnp.asarray(1.0, dt), jnp.asarray(beta, dt))
        v_next = alpha * v + beta_t * g_reg
        step = g_reg + alpha * v_next if mode == "nesterov" else v_next
        new_x.append((x - rate * step).astype(dt))
        new_v.append(v_next.astype(jnp.result_type(v)))
    return (*new_x, *new_v)


@op("Adagrad", 1)
def adagrad(r, t, *tensors, decay_factor: float = 0.0, epsilon: float = 0.0, norm_coefficient: float = 0.0):
    """https://onnx.ai/onnx/operators/onnx_aionnxpreviewtraining_Adagrad.html"""
    xs, gs, hs = _groups(tensors, 3, "Adagrad")
    new_x, new_h = [], []
    for x, g, h in zip(xs, gs, hs):
        dt = jnp.result_type(x)
        rate = _scalar(r, dt) / (1.0 + _scalar(t, dt) * decay_factor)
        g_reg = norm_coefficient * x + g
        h_next = h + g_reg * g_reg
        new_x.append((x - rate * g_reg / (jnp.sqrt(h_next) + epsilon)).astype(dt))
        new_h.append(h_next.astype(jnp.result_type(h)))
    return (*new_x, *new_h)


@op("Adam", 1)
def adam(r, t, *tensors, alpha: float = 0.9, beta: float = 0.999, epsilon: float = 0.0,
         norm_coefficient: float = 0.0, norm_coefficient_post: float = 0.0):
    """https://onnx.ai/onnx/operators/onnx_aionnxpreviewtraining_Adam.html"""
    xs, gs, vs, hs = _groups(tensors, 4, "Adam")
    new_x, new_v, new_h = [], [], []
    for x, g, v, h in zip(xs, gs, vs, hs):
        dt = jnp.result_type(x)
        step = _scalar(t, dt)
        rate = _scalar(r, dt)
        g_reg = norm_coefficient * x + g
        v_next = alpha * v + (1.0 - alpha) * g_reg
        h_next = beta * h + (1.0 - beta) * (g_reg * g_reg)
        corrected = rate * jnp.sqrt(1.0 - beta ** step) / (1.0 - alpha ** step)
        rate = jnp.where(step > 0, corrected, rate)
        x_next = x - rate * (v_next / (jnp.sqrt(h_next) + epsilon))
        new_x.append(((1.0 - norm_coefficient_post) * x_next).astype(dt))
        new_v.append(v_next.astype(jnp.result_type(v)))
        new_h.append(h_next.astype(jnp.result_type(h)))
    return (*new_x, *new_v, *new_h)
