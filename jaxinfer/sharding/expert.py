"""Expert parallelism: ``com.microsoft.MoE`` and exported MoE patterns with experts split over ``expert``.

An exported MoE without the op (router -> softmax -> top-k -> expert FFNs ->
weighted combine, see ``moe_pattern``) is first rewritten into one
``jaxinfer::StackedMoE`` node with stacked expert weights; both ops then take
the same path.

The expert weights (``fc1/fc2/fc3_experts_*``, leading dim = experts) are
placed ``P("expert")``: each device holds ``experts / N`` of them. The MoE ops
themselves are swapped, in this model's registry only, for a ``shard_map`` version:

1. tokens are split over ``data x expert`` (each device routes its own tokens);
2. softmax -> top-k -> (normalised) gates, as onnxruntime's CPU kernel does;
3. dense capacity-based dispatch: a one-hot ``[tokens, experts, capacity]``
   tensor places each (token, chosen expert) in that expert's buffer;
4. ``lax.all_to_all`` over ``expert`` sends each expert's buffers to the device
   that holds it, the expert FFNs run on local weights, a second all-to-all
   brings the results back, and the combine einsum weights them by the gates.

The default capacity holds every token a device routes (no token is dropped,
so the output equals the unsharded op); ``capacity_factor`` trades that for
memory as in GShard/Switch. ``ragged_all_to_all`` would avoid the padding but
XLA:CPU does not implement it (UNIMPLEMENTED in its thunk emitter, jax 0.10.2);
``ragged_dot`` does lower on CPU, but measured no faster than the dense einsum
there (195 vs 203 ms for 512 tokens, d 512, ffn 2048, 8 experts, top-2), so the
dense form is used everywhere. Untested on GPU/TPU, where both would pay.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ..converters.onnx.ops.contrib import check_moe_options, moe_activation, moe_route, stat_type
from ..graph import Graph, Node
from ..model import Model, split_initializers
from ..registry import Registry
from .config import ShardingConfigError, divisors
from .moe_op import (
    DOMAIN,
    OP_TYPE,
    OverlayRegistry,
    body_activation,
    with_stacked_moe,
)
from .moe_pattern import fuse_moe

MS = "com.microsoft"
#: The ops expert parallelism splits: (domain, op_type).
EP_OPS = frozenset({(MS, "MoE"), (DOMAIN, OP_TYPE)})
#: MoE input slots holding per-expert weights (leading dim = experts).
EXPERT_SLOTS = (2, 3, 4, 5, 6, 7)
_HI = lax.Precision.HIGHEST


def moe_nodes(graph: Graph) -> list[Node]:
    """The MoE nodes of ``graph`` (top level): com.microsoft MoE and jaxinfer StackedMoE."""
    return [n for n in graph.nodes if (n.domain, n.op_type) in EP_OPS]


def expert_specs(model: Any, expert: int) -> dict[str, P]:
    """``P("expert")`` for every param an MoE node reads as expert weights.

    Raises:
      ShardingConfigError: no MoE node, or ``expert`` does not divide the experts.
    """
    nodes = moe_nodes(model.graph)
    if not nodes:
        others = sorted({n.op_type for n, _ in model.graph.walk() if "moe" in n.op_type.lower()})
        raise ShardingConfigError(
            f"expert={expert} but the model has no com.microsoft MoE op, and no router -> top-k -> experts -> "
            "combine pattern was recognised, to split over experts"
            + (f" (found {others}, not supported for expert parallelism)" if others else "")
            + "; use data or tensor parallelism for these devices")
    specs: dict[str, P] = {}
    for node in nodes:
        for slot in EXPERT_SLOTS:
            name = node.inputs[slot] if slot < len(node.inputs) else ""
            if not name:
                continue
            if name not in model.params:
                raise ShardingConfigError(f"MoE node '{node.label}': expert weight '{name}' (input {slot}) is not a "
                                          "param; expert parallelism needs the expert weights as initializers")
            n_exp = model.params[name].shape[0]
            if n_exp % expert:
                fits = [d for d in divisors(n_exp)]
                raise ShardingConfigError(f"expert={expert} does not divide the {n_exp} experts of MoE node "
                                          f"'{node.label}'; expert sizes that fit: {fits}")
            specs[name] = P("expert")
    return specs


#: The last few graphs fuse_moe rewrote (plan shards one model many times): (graph, fused graph).
_FUSED: list[tuple[Graph, Graph]] = []


def fused_graph(model: Any) -> Graph:
    """``model.graph`` with its exported MoE patterns as StackedMoE nodes (itself when none or MoE ops already)."""
    graph = model.graph
    if moe_nodes(graph):
        return graph
    for src, out in _FUSED:
        if src is graph:
            return out
    out = fuse_moe(graph, model.registry)
    _FUSED.insert(0, (graph, out))
    del _FUSED[4:]
    return out


def has_experts(model: Any) -> bool:
    """Whether expert parallelism can split ``model``: an MoE op, or an exported MoE pattern."""
    return bool(moe_nodes(model.graph) or moe_nodes(fused_graph(model)))


def experts_model(model: Model, params: Mapping[str, Any] | None = None) -> tuple[Model, Mapping[str, Any] | None]:
    """``(model, params)`` with recognised MoE patterns fused into StackedMoE nodes (unchanged when none).

    ``params`` (a sharded model's, to reshard) keep their arrays where the fused graph has the same names;
    the stacked expert weights come from the graph's initializers.
    """
    graph = fused_graph(model)
    if graph is model.graph:
        return model, params
    registry = with_stacked_moe(model.registry)
    have = model.params if params is None else params
    _, new = split_initializers(graph, registry)
    placed = {k: have[k] if k in have else jax.device_put(v) for k, v in new.items()}
    fused = Model(graph, registry, params=placed, source=model.source)
    return fused, (None if params is None else placed)


def expert_registry(registry: Registry, mesh: Mesh, capacity_factor: float | None = None) -> Registry:
    """``registry`` with its MoE ops (com.microsoft MoE, jaxinfer StackedMoE) run expert-parallel over ``expert``."""
    ms, stacked = expert_parallel_moe(mesh, capacity_factor), expert_parallel_stacked_moe(mesh, capacity_factor)
    return OverlayRegistry(registry, {(MS, "MoE"): lambda d: dataclasses.replace(d, fn=ms),
                                      (DOMAIN, OP_TYPE): lambda d: dataclasses.replace(d, fn=stacked)})


def capacity(tokens: int, experts: int, k: int, factor: float | None) -> int:
    """Slots per expert per device: every token (no drops) unless ``factor`` bounds it."""
    if factor is None:
        return tokens
    return max(1, min(tokens, math.ceil(factor * k * tokens / experts)))


def dispatch_tensors(gates: Any, ids: Any, valid: Any, experts: int, cap: int) -> tuple[Any, Any]:
    """One-hot dispatch ``[T, E, C]`` (0/1) and combine (gate-weighted) tensors.

    A (token, expert) pair takes the next free slot of that expert's buffer,
    first choices before second choices; pairs past ``cap`` are dropped.
    """
    t, k = ids.shape
    chosen = jax.nn.one_hot(ids, experts, dtype=gates.dtype) * valid[:, None, None]  # [T, k, E]
    order = jnp.transpose(chosen, (1, 0, 2)).reshape(k * t, experts)  # choice-major priority
    pos = (jnp.cumsum(order, axis=0) - 1.0).reshape(k, t, experts).transpose(1, 0, 2)  # [T, k, E]
    slot = jnp.sum(pos * chosen, axis=-1).astype(jnp.int32)  # [T, k]
    kept = chosen * (jnp.sum(pos * chosen, axis=-1, keepdims=True) < cap)
    place = jax.nn.one_hot(slot, cap, dtype=gates.dtype)  # [T, k, C]
    dispatch = jnp.einsum("tke,tkc->tec", kept, place)
    combine = jnp.einsum("tke,tkc->tec", kept * gates[..., None], place)
    return dispatch, combine


def expert_parallel_ffn(mesh: Mesh, capacity_factor: float | None = None) -> Callable[..., Any]:
    """``run(x, logits, weights, k, normalize, act)``: routed expert FFNs with experts split over ``expert``.

    ``weights`` = (fc1, fc1 bias, fc2, fc2 bias, fc3, fc3 bias) in onnxruntime's MoE layout (None where absent);
    ``act(h, h3)`` is the activation between fc1 and fc2 (``h3`` = fc3's output or None).
    """
    # Tokens split over data x expert; tensor-parallel peers route the same tokens. (Splitting them over
    # tensor too cuts that repeat but, measured on a 2-layer attention+MoE decoder, XLA then all-gathers
    # the next attention's tensor-split weights instead of keeping Megatron's one all-reduce.)
    token_axes = tuple(a for a in ("data", "expert") if mesh.shape[a] > 1) or None
    shards = mesh.shape["data"] * mesh.shape["expert"]

    def run(input: Any, router_logits: Any, weights: tuple[Any, ...], k: int, normalize: bool,
            act: Callable[[Any, Any], Any]) -> Any:
        x = jnp.asarray(input)
        hidden = x.shape[-1]
        st = stat_type(x)
        tokens = x.reshape(-1, hidden).astype(st)
        n_tok = tokens.shape[0]
        logits = jnp.asarray(router_logits).reshape(n_tok, -1).astype(st)
        experts = logits.shape[-1]
        padded = -(-n_tok // shards) * shards
        valid = (jnp.arange(padded) < n_tok).astype(st)
        if padded > n_tok:
            tokens = jnp.pad(tokens, ((0, padded - n_tok), (0, 0)))
            logits = jnp.pad(logits, ((0, padded - n_tok), (0, 0)))
        cap = capacity(padded // shards, experts, k, capacity_factor)
        present = tuple(i for i, w in enumerate(weights) if w is not None)

        def local(tok: Any, lg: Any, ok: Any, *ws: Any) -> Any:
            w = [None] * 6
            for i, v in zip(present, ws):
                w[i] = jnp.asarray(v).astype(st)
            gates, ids = moe_route(lg, k, normalize)
            dispatch, combine = dispatch_tensors(gates, ids, ok, experts, cap)
            buf = jnp.einsum("tec,th->ech", dispatch, tok, precision=_HI)  # [E, C, H]
            buf = lax.all_to_all(buf, "expert", 0, 1, tiled=True)  # [E/N, N*C, H]: my experts, every sender
            h = jnp.einsum("ech,eih->eci", buf, w[0], precision=_HI)
            if w[1] is not None:
                h = h + w[1][:, None, :]
            h3 = None
            if w[4] is not None:
                h3 = jnp.einsum("ech,eih->eci", buf, w[4], precision=_HI)
                if w[5] is not None:
                    h3 = h3 + w[5][:, None, :]
            a = act(h, h3)
            y = jnp.einsum("eci,ehi->ech", a, w[2], precision=_HI)
            if w[3] is not None:
                y = y + w[3][:, None, :]
            y = lax.all_to_all(y, "expert", 1, 0, tiled=True)  # [E, C, H]: back to the senders
            return jnp.einsum("tec,ech->th", combine, y, precision=_HI)

        sharded = jax.shard_map(local, mesh=mesh,
                                in_specs=(P(token_axes), P(token_axes), P(token_axes)) + (P("expert"),) * len(present),
                                out_specs=P(token_axes))
        out = sharded(tokens, logits, valid, *(weights[i] for i in present))
        return out[:n_tok].reshape(x.shape).astype(x.dtype)

    return run


def expert_parallel_moe(mesh: Mesh, capacity_factor: float | None = None) -> Callable[..., Any]:
    """The com.microsoft MoE op (same signature) computed with experts split over ``expert``."""
    run = expert_parallel_ffn(mesh, capacity_factor)

    def moe(input, router_probs, fc1_experts_weights, fc1_experts_bias=None, fc2_experts_weights=None,
            fc2_experts_bias=None, fc3_experts_weights=None, fc3_experts_bias=None, *, k: int = 1,
            activation_type: str = "relu", normalize_routing_weights: int = 0, use_sparse_mixer: int = 0,
            activation_alpha: float = 1.0, activation_beta: float = 0.0, swiglu_fusion: int = 0,
            swiglu_limit: float | None = None, swiglu_limit_after_activation: int = 0):
        """com.microsoft MoE, expert parallel: dispatch -> all-to-all -> local experts -> all-to-all -> combine."""
        check_moe_options(use_sparse_mixer, swiglu_limit_after_activation)

        def act(h: Any, h3: Any) -> Any:
            return moe_activation(h, activation_type, activation_alpha, activation_beta, swiglu_limit,
                                  swiglu_fusion, h3)

        weights = (fc1_experts_weights, fc1_experts_bias, fc2_experts_weights, fc2_experts_bias,
                   fc3_experts_weights, fc3_experts_bias)
        return run(input, router_probs, weights, k, bool(normalize_routing_weights), act)

    return moe


def expert_parallel_stacked_moe(mesh: Mesh, capacity_factor: float | None = None) -> Callable[..., Any]:
    """The jaxinfer StackedMoE op (same signature) computed with experts split over ``expert``."""
    run = expert_parallel_ffn(mesh, capacity_factor)

    def stacked_moe(input, router_logits, fc1_experts_weights, fc1_experts_bias=None, fc2_experts_weights=None,
                    fc2_experts_bias=None, fc3_experts_weights=None, fc3_experts_bias=None, *, k: int = 1,
                    normalize_routing_weights: int = 0, activation=None):
        """jaxinfer StackedMoE, expert parallel (see :func:`expert_parallel_ffn`)."""
        weights = (fc1_experts_weights, fc1_experts_bias, fc2_experts_weights, fc2_experts_bias,
                   fc3_experts_weights, fc3_experts_bias)
        return run(input, router_logits, weights, int(k), bool(normalize_routing_weights),
                   body_activation(activation))

    return stacked_moe
