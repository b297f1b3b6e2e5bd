"""``jaxinfer::StackedMoE``: the op a recognised MoE subgraph becomes (see ``moe_pattern``).

Same inputs as ``com.microsoft.MoE`` -- ``input``, router logits, then per-expert
weights stacked on a leading ``experts`` dim in onnxruntime's layout (fc1/fc3
``[E, inter, hidden]``, fc2 ``[E, hidden, inter]``, biases ``[E, n]``) -- but the
activation between fc1 and fc2 is the exporter's own elementwise subgraph
(``activation``: ``(h[, h3]) -> a``), carried as a graph attribute, so an erf GELU
stays an erf GELU. Routing: softmax over the logits, top ``k``, optionally
renormalised; the output is the gate-weighted sum of the chosen experts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax.numpy as jnp

from ..converters.onnx.ops.contrib import dense_moe
from ..registry import OpDef, Registry

DOMAIN = "jaxinfer"
OP_TYPE = "StackedMoE"


def body_activation(activation: Any) -> Callable[[Any, Any], Any]:
    """``act(h, h3)`` from the op's ``activation`` subgraph (identity when absent)."""
    if activation is None:
        return lambda h, h3: h if h3 is None else h * h3

    def act(h: Any, h3: Any) -> Any:
        out = activation(h) if h3 is None else activation(h, h3)
        return jnp.asarray(out[0]).astype(h.dtype)

    return act


def stacked_moe(input, router_logits, fc1_experts_weights, fc1_experts_bias=None, fc2_experts_weights=None,
                fc2_experts_bias=None, fc3_experts_weights=None, fc3_experts_bias=None, *, k: int = 1,
                normalize_routing_weights: int = 0, activation=None):
    """Mixture of experts over stacked weights; every expert runs densely on every token (exact)."""
    weights = (fc1_experts_weights, fc1_experts_bias, fc2_experts_weights, fc2_experts_bias, fc3_experts_weights,
               fc3_experts_bias)
    return dense_moe(input, router_logits, weights, int(k), bool(normalize_routing_weights),
                     body_activation(activation))


STACKED_MOE = OpDef(OP_TYPE, DOMAIN, 1, stacked_moe)


class OverlayRegistry(Registry):
    """A registry with some ops swapped (``overrides``) and some added (``extra``)."""

    def __init__(self, base: Registry, overrides: Mapping[tuple[str, str], Callable[[OpDef], OpDef]] | None = None,
                 extra: Iterable[OpDef] = ()):
        self._base = base
        self._overrides = dict(overrides or {})
        self._extra = {(d.domain, d.op_type): d for d in extra}
        self._table = {**base._table, **{k: ([d.since], [d]) for k, d in self._extra.items()}}

    def resolve(self, domain: str, op_type: str, opset: int) -> OpDef | None:
        key = (domain or "", op_type)
        found = self._extra.get(key) or self._base.resolve(domain, op_type, opset)
        swap = self._overrides.get(key)
        return swap(found) if found is not None and swap is not None else found


def with_stacked_moe(registry: Registry) -> Registry:
    """``registry`` plus ``jaxinfer::StackedMoE`` (unchanged when it already has it)."""
    if registry.resolve(DOMAIN, OP_TYPE, 1) is not None:
        return registry
    return OverlayRegistry(registry, extra=(STACKED_MOE,))
