"""Attention-family ops (ai.onnx opset 23+): Attention, RotaryEmbedding, LinearAttention, SwiGLU.

(CausalConvWithState lives with the convolutions in conv_pool.py.)
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from ._util import dtype_of

OPS: list[OpDef] = []
op = registrar(OPS)

_NEG_INF = float("-inf")


def _split_heads(x: Any, num_heads: int, what: str) -> Any:
    """(B, S, H*D) -> (B, H, S, D)."""
    b, s, hidden = x.shape
    if num_heads <= 0 or hidden % num_heads:
        raise ValueError(f"{what}: hidden size {hidden} must be a positive multiple of num_heads={num_heads}")
    return x.reshape(b, s, num_heads, hidden // num_heads).transpose(0, 2, 1, 3)


def _merge_heads(x: Any) -> Any:
    """(B, H, S, D) -> (B, S, H*D)."""
    b, h, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, h * d)


def _matmul(a: Any, b: Any, dtype: Any) -> Any:
    """Batched matmul accumulated in float32 (float64 for double), result in ``dtype``."""
    acc = jnp.float64 if np.dtype(dtype) == np.float64 else jnp.float32
    return jnp.matmul(a, b, preferred_element_type=acc).astype(dtype)


def _bias_where(allowed: Any, dtype: Any) -> Any:
    return jnp.where(allowed, jnp.zeros((), dtype), jnp.full((), _NEG_INF, dtype))


def _frontier_diff(q_len: int, kv_len: int, offset: Any) -> Any:
    """(query absolute position) - (key index): (q, kv) for a scalar offset, (B, 1, q, kv) per batch."""
    i = jnp.arange(q_len).reshape(q_len, 1)
    j = jnp.arange(kv_len).reshape(1, kv_len)
    if jnp.ndim(offset) > 0:
        return (i + jnp.asarray(offset).reshape(-1, 1, 1, 1)) - j
    return (i + offset) - j


def _attention_bias(dtype: Any, q_len: int, kv_len: int, attn_mask: Any, is_causal: int, offset: Any,
                    nonpad_kv_seqlen: Any, left: int, right: int) -> Any | None:
    """The additive bias (0 / -inf / float mask) broadcastable to (B, H, q, kv), or None."""
    bias = None
    if attn_mask is not None:
        mask = jnp.asarray(attn_mask)
        pad = kv_len - mask.shape[-1]
        if pad < 0:
            raise ValueError(f"attn_mask's last dim {mask.shape[-1]} exceeds the total sequence length {kv_len}")
        if mask.dtype == jnp.bool_:
            bias = _bias_where(mask, dtype)
        else:
            bias = mask.astype(dtype)
        if pad:
            widths = [(0, 0)] * (bias.ndim - 1) + [(0, pad)]
            bias = jnp.pad(bias, widths, constant_values=_NEG_INF)
    allowed = None
    if is_causal:
        allowed = _frontier_diff(q_len, kv_len, offset) >= 0
    if left >= 0 or right >= 0:
        diff = _frontier_diff(q_len, kv_len, offset)
        window = jnp.ones(diff.shape, jnp.bool_)
        if left >= 0:
            window &= diff <= left
        if right >= 0:
            window &= -diff <= right
        allowed = window if allowed is None else allowed & window
    if nonpad_kv_seqlen is not None:
        lens = jnp.asarray(nonpad_kv_seqlen).reshape(-1, 1, 1, 1)
        valid = jnp.arange(kv_len).reshape(1, 1, 1, kv_len) < lens
        allowed = valid if allowed is None else allowed & valid
    if allowed is not None:
        extra = _bias_where(allowed, dtype)
        bias = extra if bias is None else bias + extra
    return bias


def _masked_softmax(x: Any) -> Any:
    """Softmax over the last axis; a row of all -inf gives zeros, not NaN."""
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jnp.where(jnp.isneginf(m), jnp.zeros((), x.dtype), m)
    e = jnp.exp(x - m)
    s = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(s == 0, jnp.ones((), x.dtype), s)


def _attention(Q, K, V, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *,
               is_causal: int = 0, kv_num_heads: int = 0, q_num_heads: int = 0, qk_matmul_output_mode: int = 0,
               scale: float | None = None, softcap: float = 0.0, softmax_precision: int = 0,
               left_window_size: int = -1, right_window_size: int = -1):
    Q, K, V = jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V)
    if not Q.ndim == K.ndim == V.ndim or Q.ndim not in (3, 4):
        raise ValueError(f"Q, K, V must all be 3-D or all 4-D, got ranks {Q.ndim}, {K.ndim}, {V.ndim}")
    if (past_key is None) != (past_value is None):
        raise ValueError("past_key and past_value must be given together")
    if nonpad_kv_seqlen is not None and past_key is not None:
        raise ValueError("nonpad_kv_seqlen cannot be combined with past_key/past_value")
    for name, v in (("left_window_size", left_window_size), ("right_window_size", right_window_size)):
        if v < -1:
            raise ValueError(f"{name} must be -1 or nonnegative, got {v}")
    three_d = Q.ndim == 3
    if three_d:
        if not q_num_heads or not kv_num_heads:
            raise ValueError("3-D Q/K/V need the q_num_heads and kv_num_heads attributes")
        Q = _split_heads(Q, q_num_heads, "Q")
        K = _split_heads(K, kv_num_heads, "K")
        V = _split_heads(V, kv_num_heads, "V")
    dtype = Q.dtype
    if scale is None:
        scale = 1.0 / math.sqrt(Q.shape[-1])
    root = jnp.asarray(math.sqrt(scale), dtype)

    if past_key is not None:
        K = jnp.concatenate([jnp.asarray(past_key), K], axis=2)
        V = jnp.concatenate([jnp.asarray(past_value), V], axis=2)
    present_key, present_value = K, V

    q_len, kv_len = Q.shape[2], K.shape[2]
    if past_key is not None:
        offset: Any = past_key.shape[2]
    elif nonpad_kv_seqlen is not None:
        offset = jnp.asarray(nonpad_kv_seqlen).astype(jnp.int64).reshape(-1) - q_len
    else:
        offset = 0
    bias = _attention_bias(dtype, q_len, kv_len, attn_mask, is_causal, offset, nonpad_kv_seqlen,
                           left_window_size, right_window_size)

    hq, hk = Q.shape[1], K.shape[1]
    if hq != hk:
        if hq % hk or V.shape[1] != hk:
            raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hk}, values {V.shape[1]})")
        K = jnp.repeat(K, hq // hk, axis=1)
        V = jnp.repeat(V, hq // hk, axis=1)

    qk = _matmul(Q * root, jnp.swapaxes(K * root, -1, -2), dtype)
    raw = qk
    if softcap > 0:
        qk = (jnp.tanh(qk / jnp.asarray(softcap, dtype)) * jnp.asarray(softcap, dtype)).astype(dtype)
    scores = qk if bias is None else qk + bias
    sm_dtype = dtype_of(softmax_precision) if softmax_precision else dtype
    probs = _masked_softmax(scores.astype(sm_dtype))
    if bias is not None:
        fully_masked = jnp.isneginf(jnp.max(bias, axis=-1, keepdims=True))
        probs = jnp.where(fully_masked, jnp.zeros((), probs.dtype), probs)
    probs = probs.astype(dtype)
    Y = _matmul(probs, V, dtype)
    if three_d:
        Y = _merge_heads(Y)

    modes = {0: raw, 1: qk, 2: scores, 3: probs}
    if qk_matmul_output_mode not in modes:
        raise ValueError(f"qk_matmul_output_mode must be 0, 1, 2 or 3, got {qk_matmul_output_mode}")
    qk_out = jnp.broadcast_to(modes[qk_matmul_output_mode], probs.shape).astype(dtype)
    return Y, present_key, present_value, qk_out


@op("Attention", (23, 24))
def attention(Q, K, V, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *,
              is_causal: int = 0, kv_num_heads: int = 0, q_num_heads: int = 0, qk_matmul_output_mode: int = 0,
              scale: float | None = None, softcap: float = 0.0, softmax_precision: int = 0):
    """https://onnx.ai/onnx/operators/onnx__Attention.html (opset 23/24)."""
    return _attention(Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, is_causal=is_causal,
                      kv_num_heads=kv_num_heads, q_num_heads=q_num_heads,
                      qk_matmul_output_mode=qk_matmul_output_mode, scale=scale, softcap=softcap,
                      softmax_precision=softmax_precision)


@op("Attention", 25)
def attention_25(Q, K, V, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None, *,
                 is_causal: int = 0, kv_num_heads: int = 0, q_num_heads: int = 0, qk_matmul_output_mode: int = 0,
                 scale: float | None = None, softcap: float = 0.0, softmax_precision: int = 0,
                 left_window_size: int = -1, right_window_size: int = -1):
    """https://onnx.ai/onnx/operators/onnx__Attention.html (opset 25: sliding windows; head attrs 3-D only)."""
    if jnp.ndim(Q) == 4 and (q_num_heads or kv_num_heads):
        raise ValueError("q_num_heads/kv_num_heads must not be set for 4-D Q/K/V (opset 25)")
    return _attention(Q, K, V, attn_mask, past_key, past_value, nonpad_kv_seqlen, is_causal=is_causal,
                      kv_num_heads=kv_num_heads, q_num_heads=q_num_heads,
                      qk_matmul_output_mode=qk_matmul_output_mode, scale=scale, softcap=softcap,
                      softmax_precision=softmax_precision, left_window_size=left_window_size,
                      right_window_size=right_window_size)


@op("RotaryEmbedding", 23)
def rotary_embedding(X, cos_cache, sin_cache, position_ids=None, *, interleaved: int = 0, num_heads: int = 0,
                     rotary_embedding_dim: int = 0):
    """https://onnx.ai/onnx/operators/onnx__RotaryEmbedding.html"""
    X = jnp.asarray(X)
    if X.ndim == 4:
        x = X.transpose(0, 2, 1, 3)  # (B, S, H, D)
    elif X.ndim == 3:
        b, s, hidden = X.shape
        if not num_heads or hidden % num_heads:
            raise ValueError(f"3-D input needs num_heads dividing the hidden size {hidden}, got {num_heads}")
        x = X.reshape(b, s, num_heads, hidden // num_heads)
    else:
        raise ValueError(f"RotaryEmbedding input must be 3-D or 4-D, got shape {X.shape}")
    head = x.shape[-1]
    rot = rotary_embedding_dim or head
    if rot % 2 or rot > head:
        raise ValueError(f"rotary_embedding_dim {rot} must be even and at most the head size {head}")
    cos, sin = jnp.asarray(cos_cache), jnp.asarray(sin_cache)
    if position_ids is not None:
        pos = jnp.asarray(position_ids)
        cos, sin = cos[pos], sin[pos]
    if cos.shape[-1] != rot // 2 or sin.shape[-1] != rot // 2:
        raise ValueError(f"cos/sin cache last dim ({cos.shape[-1]}, {sin.shape[-1]}) must be rotary dim / 2 = {rot // 2}")
    cos, sin = cos[..., None, :].astype(x.dtype), sin[..., None, :].astype(x.dtype)
    xr, rest = x[..., :rot], x[..., rot:]
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        rotated = jnp.stack([real, imag], axis=-1).reshape(xr.shape)
    else:
        rotated = jnp.concatenate([real, imag], axis=-1)
    out = jnp.concatenate([rotated, rest], axis=-1).astype(X.dtype)
    return out.reshape(X.shape) if X.ndim == 3 else out.transpose(0, 2, 1, 3)


@op("SwiGLU", 28)
def swiglu(A, B, *, alpha: float = 1.0):
    """https://onnx.ai/onnx/operators/onnx__SwiGLU.html: ``A * sigmoid(alpha * A) * B``."""
    A, B = jnp.asarray(A), jnp.asarray(B)
    if A.shape != B.shape or A.dtype != B.dtype:
        raise ValueError(f"SwiGLU needs A and B of one shape and type (no broadcasting), got "
                         f"{A.shape} {A.dtype} and {B.shape} {B.dtype}")
    return (A * jax.nn.sigmoid(A * jnp.asarray(alpha, A.dtype)) * B).astype(A.dtype)


def _linear_attention_step(carry, xs, *, gating: bool, delta: bool, group: int, scale: float):
    state = carry  # (B, Hkv, dk, dv) float32
    q_t, k_t, v_t, g_t, beta_t = xs
    if gating:
        state = state * jnp.exp(g_t)[..., None]
    if delta:
        retrieved = jnp.einsum("bhdm,bhd->bhm", state, k_t)
        v_t = beta_t * (v_t - retrieved)
    state = state + k_t[..., :, None] * v_t[..., None, :]
    b, hkv = state.shape[:2]
    q = q_t.reshape(b, hkv, group, q_t.shape[-1])
    o = scale * jnp.einsum("bhgd,bhdm->bhgm", q, state)
    return state, o.reshape(b, hkv * group, -1)


@op("LinearAttention", 27)
def linear_attention(query, key, value, past_state=None, decay=None, beta=None, *, chunk_size: int = 64,
                     kv_num_heads: int = 0, q_num_heads: int = 0, scale: float = 0.0,
                     update_rule: str = "gated_delta"):
    """https://onnx.ai/onnx/operators/onnx__LinearAttention.html (sequential recurrence, float32 state)."""
    del chunk_size  # a tuning hint; the recurrence is exact
    rules = {"linear": (False, False), "gated": (True, False), "delta": (False, True), "gated_delta": (True, True)}
    if update_rule not in rules:
        raise ValueError(f"update_rule must be one of {sorted(rules)}, got {update_rule!r}")
    gating, delta = rules[update_rule]
    if q_num_heads <= 0 or kv_num_heads <= 0 or q_num_heads % kv_num_heads:
        raise ValueError(f"q_num_heads ({q_num_heads}) must be a positive multiple of kv_num_heads ({kv_num_heads})")
    if gating != (decay is not None):
        raise ValueError(f"update_rule {update_rule!r} {'requires' if gating else 'forbids'} the decay input")
    if delta != (beta is not None):
        raise ValueError(f"update_rule {update_rule!r} {'requires' if delta else 'forbids'} the beta input")
    f32 = jnp.float32
    q4 = _split_heads(jnp.asarray(query), q_num_heads, "query").astype(f32)
    k4 = _split_heads(jnp.asarray(key), kv_num_heads, "key").astype(f32)
    v4 = _split_heads(jnp.asarray(value), kv_num_heads, "value").astype(f32)
    b, _, t, dk = k4.shape
    dv = v4.shape[-1]
    zeros_t = jnp.zeros((b, kv_num_heads, t, 1), f32)
    g4 = zeros_t
    if decay is not None:
        d = jnp.asarray(decay)
        if d.ndim != 3 or d.shape[-1] not in (kv_num_heads, kv_num_heads * dk):
            raise ValueError(f"decay must be (B, T, {kv_num_heads}) or (B, T, {kv_num_heads * dk}), got {d.shape}")
        g4 = _split_heads(d, kv_num_heads, "decay").astype(f32)
    b4 = zeros_t
    if beta is not None:
        be = jnp.asarray(beta)
        if be.ndim != 3 or be.shape[-1] not in (kv_num_heads, 1):
            raise ValueError(f"beta must be (B, T, {kv_num_heads}) or (B, T, 1), got {be.shape}")
        b4 = _split_heads(be, be.shape[-1], "beta").astype(f32)
    if past_state is not None:
        if tuple(past_state.shape) != (b, kv_num_heads, dk, dv):
            raise ValueError(f"past_state shape {tuple(past_state.shape)}, expected {(b, kv_num_heads, dk, dv)}")
        state_dtype = jnp.asarray(past_state).dtype
        state = jnp.asarray(past_state).astype(f32)
    else:
        state_dtype = jnp.asarray(query).dtype
        state = jnp.zeros((b, kv_num_heads, dk, dv), f32)
    dq = q4.shape[-1]
    scale_val = scale if scale else 1.0 / math.sqrt(dq)
    step = functools.partial(_linear_attention_step, gating=gating, delta=delta,
                                 group=q_num_heads // kv_num_heads, scale=scale_val)
    xs = tuple(jnp.moveaxis(a, 2, 0) for a in (q4, k4, v4, g4, b4))
    state, outs = lax.scan(step, state, xs)  # outs: (T, B, Hq, dv)
    out = jnp.moveaxis(outs, 0, 2)  # (B, Hq, T, dv)
    return _merge_heads(out).astype(jnp.asarray(query).dtype), state.astype(state_dtype)


def _apply_mod(mod: Any, x: Any, what: str) -> Any:
    if mod.n_inputs != 1 or mod.n_outputs != 1:
        raise ValueError(f"{what} must take 1 input and give 1 output, got {mod.n_inputs} -> {mod.n_outputs}")
    (out,) = mod(x)
    out = jnp.asarray(out)
    if out.shape != x.shape:
        raise ValueError(f"{what} must keep the shape {x.shape}, gave {out.shape}")
    return out.astype(x.dtype)


@op("FlexAttention", 1, domain="ai.onnx.preview")
def flex_attention(Q, K, V, *, scale: float | None = None, score_mod=None, prob_mod=None,
                   softmax_precision: int = 0):
    """https://onnx.ai/onnx/operators/onnx_aionnxpreview_FlexAttention.html: SDPA with score/prob subgraphs."""
    Q, K, V = jnp.asarray(Q), jnp.asarray(K), jnp.asarray(V)
    if Q.ndim != 4 or K.ndim != 4 or V.ndim != 4:
        raise ValueError(f"FlexAttention needs rank-4 Q, K, V, got {Q.shape}, {K.shape}, {V.shape}")
    hq, hk = Q.shape[1], K.shape[1]
    if V.shape[1] != hk or V.shape[2] != K.shape[2] or K.shape[3] != Q.shape[3]:
        raise ValueError(f"K {K.shape} and V {V.shape} do not fit Q {Q.shape}")
    if hq != hk:
        if hq % hk:
            raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hk})")
        K, V = jnp.repeat(K, hq // hk, axis=1), jnp.repeat(V, hq // hk, axis=1)
    if scale is None:
        scale = 1.0 / math.sqrt(Q.shape[-1])
    root = jnp.asarray(np.sqrt(np.float32(scale)), Q.dtype)
    if softmax_precision:
        compute = dtype_of(softmax_precision)
    else:
        compute = np.dtype(np.float64) if Q.dtype == jnp.float64 else np.dtype(np.float32)
    scores = _matmul(Q * root, jnp.swapaxes(K * root, -1, -2), Q.dtype).astype(compute)
    if score_mod is not None:
        scores = _apply_mod(score_mod, scores, "score_mod")
    probs = jax.nn.softmax(scores, axis=-1)
    if prob_mod is not None:
        probs = _apply_mod(prob_mod, probs, "prob_mod")
    return _matmul(probs, V.astype(compute), compute).astype(V.dtype)
