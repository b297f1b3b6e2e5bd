"""onnxruntime contrib ops (domain ``com.microsoft``), float part: activations, fused matmuls,
fused normalizations, embeddings, MatMulNBits and MoE.

Semantics follow onnxruntime's ContribOperators.md; statistics are computed in float32 (float64
for float64 inputs) as onnxruntime's CPU kernels do. The attention family lives in
``contrib_attention``, the quantized ops in ``contrib_quant``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .... import cpu_kernels
from ....registry import OpDef, registrar
from ._util import axis as norm_axis
from .attention import rotary_embedding as _rotary_23
from .normalization import last_axis_norm
from .normalization import layer_normalization as _layer_norm_17

MS = "com.microsoft"
OPS: list[OpDef] = []
op = registrar(OPS, domain=MS)


def stat_type(x: Any) -> Any:
    """The dtype statistics and MoE arithmetic run in: f64 for f64 inputs, f32 otherwise."""
    return jnp.float64 if jnp.result_type(x) == jnp.float64 else jnp.float32


def _gelu(x: Any) -> Any:
    xf = x.astype(stat_type(x))
    return (0.5 * xf * (1.0 + lax.erf(xf * (1.0 / math.sqrt(2.0))))).astype(x.dtype)


def _gelu_tanh(x: Any) -> Any:
    xf = x.astype(stat_type(x))
    inner = 0.7978845608028654 * (xf + 0.044715 * xf * xf * xf)
    return (0.5 * xf * (1.0 + jnp.tanh(inner))).astype(x.dtype)


# ----------------------------------------------------------------- activations


@op("Gelu", 1)
def gelu(X):
    """com.microsoft Gelu: exact (erf) GELU (float32: our CPU kernel's one call, cpu_kernels.gelu)."""
    return cpu_kernels.gelu(X, None, "none", _gelu)


@op("BiasGelu", 1)
def bias_gelu(A, B):
    """com.microsoft BiasGelu: Gelu(A + B), B over the last axis."""
    return cpu_kernels.gelu(A, B, "none", _gelu)


@op("FastGelu", 1)
def fast_gelu(X, bias=None):
    """com.microsoft FastGelu: tanh-approximated GELU of X (+ bias)."""
    return cpu_kernels.gelu(X, bias, "tanh", _gelu_tanh)


@op("QuickGelu", 1)
def quick_gelu(X, *, alpha: float = 1.702):
    """com.microsoft QuickGelu: x * sigmoid(alpha * x)."""
    X = jnp.asarray(X)
    return X * jax.nn.sigmoid(X * alpha)


@op("BiasAdd", 1)
def bias_add(X, bias, skip):
    """com.microsoft BiasAdd: X + bias + skip."""
    return jnp.asarray(X) + bias + skip


@op("BiasSoftmax", 1)
def bias_softmax(data, bias, *, axis: int = 1, is_inner_broadcast: int = 0):
    """com.microsoft BiasSoftmax: softmax(data + bias) over the dims from ``axis`` on (flattened)."""
    data, bias = jnp.asarray(data), jnp.asarray(bias)
    ax = norm_axis(axis, data.ndim)
    if bias.ndim < data.ndim:
        if is_inner_broadcast:  # bias covers the leading dims and the softmax dims: broadcast in between
            lead = data.ndim - bias.ndim
            bias = bias.reshape(bias.shape[: ax - lead] + (1,) * lead + bias.shape[ax - lead:])
        else:
            bias = bias.reshape((1,) * (data.ndim - bias.ndim) + bias.shape)
    x = (data + bias).astype(stat_type(data))
    shape = x.shape
    flat = x.reshape(shape[:ax] + (-1,))
    return jax.nn.softmax(flat, axis=-1).reshape(shape).astype(data.dtype)


# ------------------------------------------------------------------ matmuls


def _fused_operand(x: Any, trans: int, trans_batch: int) -> Any:
    if x.ndim <= 2 or not trans_batch:
        return jnp.swapaxes(x, -1, -2) if trans and x.ndim >= 2 else x
    r = x.ndim
    perm = list(range(1, r - 1)) + ([r - 1, 0] if trans else [0, r - 1])
    return x.transpose(perm)


@op("FusedMatMul", 1)
def fused_matmul(A, B, *, alpha: float = 1.0, transA: int = 0, transB: int = 0, transBatchA: int = 0,
                 transBatchB: int = 0):
    """com.microsoft FusedMatMul: alpha * op(A) @ op(B), op folding a transpose of the last two dims
    (``trans*``) and/or moving dim 0 next to the matrix dims (``transBatch*``)."""
    a = _fused_operand(jnp.asarray(A), transA, transBatchA)
    b = _fused_operand(jnp.asarray(B), transB, transBatchB)
    y = jnp.matmul(a, b, precision=lax.Precision.HIGHEST)
    return y if alpha == 1.0 else y * jnp.asarray(alpha, y.dtype)


# ------------------------------------------------------------ normalizations


def _layer_norm(x: Any, gamma: Any, beta: Any, epsilon: float, simplified: bool) -> tuple[Any, Any, Any]:
    st = stat_type(x)

    def stats(x):
        xf = x.astype(st)
        if simplified:
            mean = jnp.zeros(x.shape[:-1] + (1,), st)
            centered = xf
        else:
            mean = jnp.mean(xf, axis=-1, keepdims=True)
            centered = xf - mean
        var = jnp.mean(centered * centered, axis=-1, keepdims=True)
        return mean, centered, lax.rsqrt(var + jnp.asarray(epsilon, st))

    def xla(x, gamma, beta):
        _, centered, inv = stats(x)
        y = centered * inv * jnp.asarray(gamma).astype(st)
        if beta is not None:
            y = y + jnp.asarray(beta).astype(st)
        return y.astype(x.dtype)

    mean, _, inv = stats(x)  # XLA's (dropped when nothing reads them)
    if simplified or np.dtype(st) != x.dtype:
        return xla(x, gamma, beta), mean, inv
    return last_axis_norm(x, gamma, beta, epsilon, xla), mean, inv


@op("SkipLayerNormalization", 1)
def skip_layer_normalization(input, skip, gamma, beta=None, bias=None, *, epsilon: float = 1e-12):
    """com.microsoft SkipLayerNormalization: LN(input + skip + bias) -> (output, mean, inv_std_var, sum)."""
    # (input + bias) + skip is the order of the layers the optimizer fused (dense, then residual),
    # and it lets XLA keep each layer's sum as one buffer: summed as (input + skip) + bias, XLA
    # recomputed the whole residual chain inside every later fusion (bert b8: 524 -> 407 us)
    s = jnp.asarray(input)
    if bias is not None:
        s = s + bias
    s = s + skip
    y, mean, inv = _layer_norm(s, jnp.asarray(gamma), beta, epsilon, False)
    return y, mean, inv, s


@op("SkipSimplifiedLayerNormalization", 1)
def skip_simplified_layer_normalization(input, skip, gamma, bias=None, *, epsilon: float = 1e-12):
    """com.microsoft SkipSimplifiedLayerNormalization: RMSNorm(input + skip + bias) -> (output, mean, inv_std_var, sum)."""
    s = jnp.asarray(input) + skip
    if bias is not None:
        s = s + bias
    y, mean, inv = _layer_norm(s, jnp.asarray(gamma), None, epsilon, True)
    return y, mean, inv, s


def simplified_layer_normalization(X, scale, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1):
    """SimplifiedLayerNormalization (onnxruntime, ai.onnx domain v1): RMSNorm over dims ``axis``.. -> (Y, inv_std_var)."""
    X = jnp.asarray(X)
    ax = norm_axis(axis, X.ndim)
    st = stat_type(X)
    xf = X.astype(st)
    ms = jnp.mean(xf * xf, axis=tuple(range(ax, X.ndim)), keepdims=True)
    inv = lax.rsqrt(ms + jnp.asarray(epsilon, st))
    y = (xf * inv * jnp.asarray(scale).astype(st)).astype(X.dtype)
    return y, inv


def contrib_layer_normalization(X, Scale, B=None, *, axis: int = -1, epsilon: float = 1e-5, stash_type: int = 1):
    """LayerNormalization as onnxruntime registers it before opset 17 (same contract as LayerNormalization-17)."""
    return _layer_norm_17(jnp.asarray(X), Scale, B, axis=axis, epsilon=epsilon, stash_type=stash_type)


# onnxruntime registers these two in the ai.onnx domain at version 1 (LayerNormalization-17 is the
# standard op, registered in normalization.py); accept them under com.microsoft too.
op("SimplifiedLayerNormalization", 1, domain="")(simplified_layer_normalization)
op("SimplifiedLayerNormalization", 1)(simplified_layer_normalization)
op("LayerNormalization", 1, domain="")(contrib_layer_normalization)
op("LayerNormalization", 1)(contrib_layer_normalization)


@op("EmbedLayerNormalization", 1)
def embed_layer_normalization(input_ids, segment_ids, word_embedding, position_embedding, segment_embedding, gamma,
                              beta, mask=None, position_ids=None, *, epsilon: float = 1e-12,
                              mask_index_type: int = 1):
    """com.microsoft EmbedLayerNormalization -> (output, mask_index, embedding_sum)."""
    ids = jnp.asarray(input_ids)
    b, s = ids.shape
    word = jnp.asarray(word_embedding)
    if position_ids is None:
        pos = jnp.broadcast_to(jnp.arange(s), (b, s))
    else:
        pos = jnp.broadcast_to(jnp.asarray(position_ids), (b, s))
    emb = word[ids] + jnp.asarray(position_embedding)[pos]
    if segment_ids is not None and segment_embedding is not None:
        emb = emb + jnp.asarray(segment_embedding)[jnp.asarray(segment_ids)]
    y, _, _ = _layer_norm(emb, jnp.asarray(gamma), jnp.asarray(beta), epsilon, False)
    if mask is None:
        mask_index = jnp.zeros((b,), jnp.int32)
    else:
        mask_index = jnp.sum(jnp.asarray(mask) != 0, axis=1).astype(jnp.int32)
    return y, mask_index, emb


# ------------------------------------------------------------------- rotary


@op("RotaryEmbedding", 1)
def rotary_embedding(input, position_ids, cos_cache, sin_cache, *, interleaved: int = 0, num_heads: int = 0,
                     rotary_embedding_dim: int = 0, is_packed_batching: int = 0, scale: float = 1.0):
    """com.microsoft RotaryEmbedding; ``position_ids`` of shape (1,) is an offset for every batch."""
    x = jnp.asarray(input)
    if is_packed_batching:
        raise ValueError("RotaryEmbedding: is_packed_batching=1 is not supported; expected 0")
    b, s = (x.shape[0], x.shape[1]) if x.ndim == 3 else (x.shape[0], x.shape[2])
    pos = jnp.asarray(position_ids)
    if pos.ndim <= 1 and pos.size == 1:
        pos = jnp.broadcast_to(pos.reshape(()) + jnp.arange(s, dtype=pos.dtype), (b, s))
    cos, sin = jnp.asarray(cos_cache), jnp.asarray(sin_cache)
    rot = rotary_embedding_dim or 2 * cos.shape[-1]
    if x.ndim == 3 and not num_heads:
        num_heads = x.shape[-1] // rot  # head size equals the rotary dim when num_heads is not given
    return _rotary_23(x, cos, sin, pos, interleaved=interleaved, num_heads=num_heads, rotary_embedding_dim=rot)


# -------------------------------------------------------------- MatMulNBits


def unpack_bits(packed: Any, bits: int, count: int) -> Any:
    """uint8 bytes (..., nbytes) -> (..., count) unsigned ints, lowest bits first (onnxruntime's packing)."""
    packed = jnp.asarray(packed).astype(jnp.uint8)
    if bits == 8:
        return packed[..., :count]
    per = 8 // bits
    shifts = jnp.arange(per, dtype=jnp.uint8) * bits
    vals = (packed[..., None] >> shifts) & jnp.uint8((1 << bits) - 1)
    return vals.reshape(packed.shape[:-1] + (-1,))[..., :count]


@op("MatMulNBits", 1)
def matmul_nbits(A, B, scales, zero_points=None, g_idx=None, bias=None, *, K: int, N: int, block_size: int,
                 bits: int = 4, accuracy_level: int = 0, weight_prepacked: int = 0):
    """com.microsoft MatMulNBits: A @ dequant(B)^T with B kept packed (N, k_blocks, blob) and unpacked in-graph."""
    if weight_prepacked:
        raise ValueError(f"MatMulNBits: weight_prepacked={weight_prepacked} (an EP layout) is not supported; expected 0")
    if bits not in (2, 4, 8):
        raise ValueError(f"MatMulNBits: bits={bits} not supported; expected 2, 4 or 8")
    if g_idx is not None:
        raise ValueError("MatMulNBits: the deprecated g_idx input is not supported")
    A = jnp.asarray(A)
    out_shape = A.shape[:-1] + (N,)
    if 0 in np.shape(B):
        y = jnp.zeros(out_shape, A.dtype)
        return y if bias is None else y + bias
    k_blocks = -(-K // block_size)
    q = unpack_bits(B, bits, block_size).astype(jnp.int32).reshape(N, k_blocks, block_size)
    st = stat_type(A)
    sc = jnp.asarray(scales).astype(st).reshape(N, k_blocks, 1)
    if zero_points is None:
        w = (q - (1 << (bits - 1))).astype(st) * sc
    elif jnp.issubdtype(jnp.result_type(zero_points), jnp.floating):
        w = (q.astype(st) - jnp.asarray(zero_points).astype(st).reshape(N, k_blocks, 1)) * sc
    else:
        zp = unpack_bits(jnp.asarray(zero_points).reshape(N, -1), bits, k_blocks).astype(jnp.int32)
        w = (q - zp.reshape(N, k_blocks, 1)).astype(st) * sc
    w = w.reshape(N, k_blocks * block_size)[:, :K]
    y = jnp.matmul(A.astype(st), w.T, precision=lax.Precision.HIGHEST)
    if bias is not None:
        y = y + jnp.asarray(bias).astype(st)
    return y.astype(A.dtype)


# ---------------------------------------------------------------------- MoE


def check_moe_options(use_sparse_mixer: int, swiglu_limit_after_activation: int) -> None:
    """Refuse the MoE attributes onnxruntime's CPU kernel does not have either."""
    if use_sparse_mixer:
        raise ValueError("MoE: use_sparse_mixer=1 is not supported; expected 0")
    if swiglu_limit_after_activation:
        raise ValueError("MoE: swiglu_limit_after_activation=1 is CUDA-only; expected 0")


def moe_activation(h: Any, kind: str, alpha: float, beta: float, limit: float | None, fusion: int,
                    h3: Any = None) -> Any:
    if kind == "swiglu":
        if fusion == 1:
            g, lin = h[..., 0::2], h[..., 1::2]
        elif fusion == 2:
            half = h.shape[-1] // 2
            g, lin = h[..., :half], h[..., half:]
        else:
            if h3 is None:
                raise ValueError("MoE swiglu with swiglu_fusion=0 needs fc3_experts_weights")
            g, lin = h, h3
        if limit is not None:
            g = jnp.minimum(g, limit)
            lin = jnp.clip(lin, -limit, limit)
        return g * jax.nn.sigmoid(alpha * g) * (lin + beta)
    # onnxruntime's CPU MoE uses the tanh approximation for "gelu"
    acts = {"relu": jax.nn.relu, "gelu": _gelu_tanh, "silu": jax.nn.silu, "identity": lambda v: v}
    if kind not in acts:
        raise ValueError(f"MoE: activation_type {kind!r} not supported; expected relu, gelu, silu, swiglu or identity")
    a = acts[kind](h)
    return a if h3 is None else a * h3


def moe_route(logits: Any, k: int, normalize: bool) -> tuple[Any, Any]:
    """(gates [T, k], expert ids [T, k]): softmax over experts, top-k, optional renormalisation."""
    probs = jax.nn.softmax(logits, axis=-1)
    gates, ids = lax.top_k(probs, k)
    if normalize:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return gates, ids


def dense_moe(input: Any, router_logits: Any, weights: tuple[Any, ...], k: int, normalize: bool,
              act: Callable[[Any, Any], Any]) -> Any:
    """Routed expert FFNs with every expert run densely on every token (unselected ones weigh 0).

    ``weights`` = (fc1, fc1 bias, fc2, fc2 bias, fc3, fc3 bias) in onnxruntime's MoE layout
    (None where absent); ``act(h, h3)`` is the activation between fc1 and fc2. Exact and
    jit-friendly for the small expert counts of exported models.
    """
    x = jnp.asarray(input)
    st = stat_type(x)
    t = x.reshape(-1, x.shape[-1]).astype(st)
    logits = jnp.asarray(router_logits).reshape(t.shape[0], -1).astype(st)
    gates, ids = moe_route(logits, k, normalize)
    route = jnp.sum(jax.nn.one_hot(ids, logits.shape[-1], dtype=st) * gates[..., None], axis=1)  # (T, E)
    w1, b1, w2, b2, w3, b3 = weights

    def fc(w: Any, b: Any) -> Any:
        h = jnp.einsum("th,eih->eti", t, jnp.asarray(w).astype(st), precision=lax.Precision.HIGHEST)
        return h if b is None else h + jnp.asarray(b).astype(st)[:, None, :]

    a = act(fc(w1, b1), None if w3 is None else fc(w3, b3))
    y = jnp.einsum("eti,ehi->eth", a, jnp.asarray(w2).astype(st), precision=lax.Precision.HIGHEST)
    if b2 is not None:
        y = y + jnp.asarray(b2).astype(st)[:, None, :]
    out = jnp.einsum("eth,te->th", y, route, precision=lax.Precision.HIGHEST)
    return out.reshape(x.shape).astype(x.dtype)


@op("MoE", 1)
def moe(input, router_probs, fc1_experts_weights, fc1_experts_bias=None, fc2_experts_weights=None,
        fc2_experts_bias=None, fc3_experts_weights=None, fc3_experts_bias=None, *, k: int = 1,
        activation_type: str = "relu", normalize_routing_weights: int = 0, use_sparse_mixer: int = 0,
        activation_alpha: float = 1.0, activation_beta: float = 0.0, swiglu_fusion: int = 0,
        swiglu_limit: float | None = None, swiglu_limit_after_activation: int = 0):
    """com.microsoft MoE: softmax routing over ``router_probs``, top-k experts, weighted sum of expert FFNs
    (computed densely, see :func:`dense_moe`)."""
    check_moe_options(use_sparse_mixer, swiglu_limit_after_activation)

    def act(h: Any, h3: Any) -> Any:
        return moe_activation(h, activation_type, activation_alpha, activation_beta, swiglu_limit, swiglu_fusion, h3)

    weights = (fc1_experts_weights, fc1_experts_bias, fc2_experts_weights, fc2_experts_bias, fc3_experts_weights,
               fc3_experts_bias)
    return dense_moe(input, router_probs, weights, int(k), bool(normalize_routing_weights), act)
