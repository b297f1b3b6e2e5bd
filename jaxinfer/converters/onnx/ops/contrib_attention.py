"""onnxruntime contrib attention ops (``com.microsoft``): Attention, MultiHeadAttention, GroupQueryAttention.

Masks follow onnxruntime's CPU kernels: masked scores get ``mask_filter_value`` (default -10000)
for Attention/MultiHeadAttention and -inf for GroupQueryAttention. GroupQueryAttention's
``total_sequence_length`` sets the present cache's length, so it is a static input;
``seqlens_k`` (per-batch valid lengths) stays a runtime value handled with masks and gathers.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from .activation import last_axis_softmax
from .attention import rotary_embedding as _rotary_23

MS = "com.microsoft"
OPS: list[OpDef] = []
op = registrar(OPS, domain=MS)
HI = lax.Precision.HIGHEST


def _st(x: Any) -> Any:
    return jnp.float64 if jnp.result_type(x) == jnp.float64 else jnp.float32


def _heads(x: Any, n: int) -> Any:
    """(B, S, n*D) -> (B, n, S, D)."""
    b, s, h = x.shape
    if h % n:
        raise ValueError(f"hidden size {h} is not a multiple of num_heads {n}")
    return x.reshape(b, s, n, h // n).transpose(0, 2, 1, 3)


def _merge(x: Any) -> Any:
    b, n, s, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)


def _softmax_attend(q: Any, k: Any, v: Any, scale: float, bias: Any, extra_logit: Any = None,
                    softcap: float = 0.0) -> tuple[Any, Any]:
    """q (B,N,S,D), k/v (B,N,T,D), bias broadcastable to (B,N,S,T) -> (context (B,N,S,Dv), probs)."""
    st = _st(q)
    scores = jnp.einsum("bnsd,bntd->bnst", q.astype(st), k.astype(st), precision=HI) * scale
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias
    if extra_logit is not None:  # a per-head sink logit joining the softmax denominator
        m = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), extra_logit)
        e = jnp.exp(scores - m)
        probs = e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(extra_logit - m))
    else:
        probs = last_axis_softmax(scores, scores.ndim - 1)
    ctx = jnp.einsum("bnst,bntd->bnsd", probs, v.astype(st), precision=HI)
    return ctx.astype(q.dtype), probs


def _key_mask_bias(mask: Any, b: int, s: int, t: int, past: int, filt: float, st: Any) -> Any:
    """onnxruntime's mask_index / key_padding_mask formats -> an additive (B, 1, S, T) bias."""
    m = jnp.asarray(mask)
    j = jnp.arange(t)
    if m.ndim == 1 and m.shape[0] == b:  # right padding: valid key lengths
        keep = j[None, :] < m[:, None]
        keep = keep[:, None, None, :]
    elif m.ndim == 1 and m.shape[0] == 2 * b:  # left padding: exclusive ends, then inclusive starts
        end, start = m[:b], m[b:]
        keep = (j[None, :] < end[:, None]) & (j[None, :] >= start[:, None])
        keep = keep[:, None, None, :]
    elif m.ndim == 2:
        keep = (m != 0)[:, None, None, :]
    elif m.ndim == 3:
        keep = (m != 0)[:, None, :, :]
    elif m.ndim == 4:
        keep = (m[:, :, past:past + s, :t] != 0)
    else:
        raise ValueError(f"mask of shape {m.shape} is not a supported mask_index/key_padding_mask format")
    return jnp.where(keep, jnp.asarray(0.0, st), jnp.asarray(filt, st))


def _total_bias(key_mask, unidirectional, attention_bias, b, s, t, p, mask_filter_value, st):
    """Sum of the key-padding mask, the causal mask and an explicit bias (None when there is none)."""
    parts = []
    if key_mask is not None:
        parts.append(_key_mask_bias(key_mask, b, s, t, p, mask_filter_value, st))
    if unidirectional:
        parts.append(_causal_bias(s, t, p, mask_filter_value, st))
    if attention_bias is not None:
        parts.append(jnp.asarray(attention_bias).astype(st))
    total = None
    for part in parts:
        total = part if total is None else total + part
    return total


def _causal_bias(s: int, t: int, past: int, filt: float, st: Any) -> Any:
    i = jnp.arange(s)[:, None]
    j = jnp.arange(t)[None, :]
    return jnp.where(j <= past + i, jnp.asarray(0.0, st), jnp.asarray(filt, st))


@op("Attention", 1)
def attention(input, weights, bias=None, mask_index=None, past=None, attention_bias=None, past_sequence_length=None,
              *, num_heads: int, qkv_hidden_sizes=(), unidirectional: int = 0, scale: float = 0.0,
              mask_filter_value: float = -10000.0, do_rotary: int = 0, past_present_share_buffer: int = 0,
              rotary_embedding_dim: int = 0):
    """com.microsoft Attention: fused QKV projection + multi-head attention -> (output, present)."""
    if do_rotary or past_present_share_buffer:
        raise ValueError("Attention: do_rotary and past_present_share_buffer are not supported; expected 0")
    x = jnp.asarray(input)
    st = _st(x)
    proj = jnp.matmul(x.astype(st), jnp.asarray(weights).astype(st), precision=HI)
    if bias is not None:
        proj = proj + jnp.asarray(bias).astype(st)
    total = proj.shape[-1]
    hq, hk, hv = tuple(int(v) for v in qkv_hidden_sizes) if len(qkv_hidden_sizes) else (total // 3,) * 3
    q = _heads(proj[..., :hq], num_heads)
    k = _heads(proj[..., hq:hq + hk], num_heads)
    v = _heads(proj[..., hq + hk:hq + hk + hv], num_heads)
    p = 0
    if past is not None:
        past = jnp.asarray(past).astype(st)
        p = past.shape[3]
        k = jnp.concatenate([past[0], k], axis=2)
        v = jnp.concatenate([past[1], v], axis=2)
    b, _, s, d = q.shape
    t = k.shape[2]
    bias_total = _total_bias(mask_index, unidirectional, attention_bias, b, s, t, p, mask_filter_value, st)
    ctx, _ = _softmax_attend(q, k, v, scale or 1.0 / math.sqrt(d), bias_total)
    present = jnp.stack([k, v]).astype(x.dtype) if k.shape == v.shape else None
    return _merge(ctx).astype(x.dtype), present


@op("MultiHeadAttention", 1)
def multi_head_attention(query, key=None, value=None, bias=None, key_padding_mask=None, attention_bias=None,
                         past_key=None, past_value=None, past_sequence_length=None, cache_indirection=None, *,
                         num_heads: int, unidirectional: int = 0, scale: float = 0.0,
                         mask_filter_value: float = -10000.0, _num_outputs: int = 1):
    """com.microsoft MultiHeadAttention -> (output, present_key, present_value, qk)."""
    if cache_indirection is not None:
        raise ValueError("MultiHeadAttention: cache_indirection (beam search) is not supported")
    q = jnp.asarray(query)
    st = _st(q)
    n = num_heads
    if key is None:  # packed QKV: (B, S, N, 3, D)
        b, s = q.shape[:2]
        q, k, v = q[:, :, :, 0], q[:, :, :, 1], q[:, :, :, 2]
        q, k, v = (x.reshape(b, s, -1) for x in (q, k, v))
    elif value is None:  # packed KV: (B, L, N, 2, D)
        kv = jnp.asarray(key)
        b, L = kv.shape[:2]
        k, v = kv[:, :, :, 0].reshape(b, L, -1), kv[:, :, :, 1].reshape(b, L, -1)
    else:
        k, v = jnp.asarray(key), jnp.asarray(value)
    if bias is not None:
        bias = jnp.asarray(bias)
        hq = q.shape[-1]
        hk = k.shape[-1] if k.ndim == 3 else k.shape[1] * k.shape[3]
        q = q + bias[:hq]
        if k.ndim == 3:
            k = k + bias[hq:hq + hk]
        if v.ndim == 3:
            v = v + bias[hq + hk:]
    qh = _heads(q, n)
    kh = _heads(k, n) if k.ndim == 3 else k
    vh = _heads(v, n) if v.ndim == 3 else v
    p = 0
    if past_key is not None and k.ndim == 3:
        p = past_key.shape[2]
        kh = jnp.concatenate([jnp.asarray(past_key), kh], axis=2)
        vh = jnp.concatenate([jnp.asarray(past_value), vh], axis=2)
    b, _, s, d = qh.shape
    t = kh.shape[2]
    bias_total = _total_bias(key_padding_mask, unidirectional, attention_bias, b, s, t, p, mask_filter_value, st)
    sc = scale or 1.0 / math.sqrt(d)
    ctx, probs = _softmax_attend(qh, kh, vh, sc, bias_total)
    outs = (_merge(ctx).astype(q.dtype), kh, vh)
    if _num_outputs > 3:
        scores = jnp.einsum("bnsd,bntd->bnst", qh.astype(st), kh.astype(st), precision=HI) * sc
        outs = outs + (scores.astype(q.dtype),)
    return outs


def _rope(x: Any, cos: Any, sin: Any, pos: Any, interleaved: int) -> Any:
    """x (B, N, S, D) rotated at absolute positions ``pos`` (B, S)."""
    return _rotary_23(x, cos, sin, pos, interleaved=interleaved, rotary_embedding_dim=2 * cos.shape[-1])


@op("GroupQueryAttention", 1, static=(6,))
def group_query_attention(query, key=None, value=None, past_key=None, past_value=None, seqlens_k=None,
                          total_sequence_length=None, cos_cache=None, sin_cache=None, position_ids=None,
                          attention_bias=None, head_sink=None, k_scale=None, v_scale=None, q_norm_weight=None,
                          k_norm_weight=None, query_seqlens=None, *, num_heads: int, kv_num_heads: int,
                          scale: float = 0.0, softcap: float = 0.0, local_window_size: int = -1,
                          do_rotary: int = 0, rotary_interleaved: int = 0, smooth_softmax: int = -1,
                          causal: int = 1, qk_output: int = 0, k_quant_type: str = "NONE",
                          v_quant_type: str = "NONE", kv_cache_bit_width: int = 0, sliding_window_cache: int = 0,
                          qk_norm_epsilon: float = 1e-6, q_norm_epsilon: float | None = None,
                          k_norm_epsilon: float | None = None):
    """com.microsoft GroupQueryAttention with a (non-shared or shared) BNSH KV cache -> (output, present_key, present_value).

    Per batch entry b: T = seqlens_k[b] + 1 tokens after the step, Q = min(S, T) valid query rows,
    P = T - Q cached before. New rows land at cache rows [P, T); query row s sits at position P + s.
    Rows of the outputs past the valid ones are unspecified (here: zero-filled cache rows).
    """
    if k_quant_type != "NONE" or v_quant_type != "NONE" or k_scale is not None:
        raise ValueError("GroupQueryAttention: quantized KV cache is not supported; expected k/v_quant_type NONE")
    if sliding_window_cache or q_norm_weight is not None or query_seqlens is not None or qk_output:
        raise ValueError("GroupQueryAttention: sliding_window_cache, q/k_norm_weight, query_seqlens and qk_output "
                         "are not supported")
    q = jnp.asarray(query)
    st = _st(q)
    b, s = q.shape[:2]
    n, kvn = num_heads, kv_num_heads
    if key is None:  # packed QKV
        d = q.shape[-1] // (n + 2 * kvn)
        k = q[..., n * d:(n + kvn) * d]
        v = q[..., (n + kvn) * d:]
        q = q[..., :n * d]
    else:
        k, v = jnp.asarray(key), jnp.asarray(value)
    qh, kh, vh = _heads(q, n), _heads(k, kvn), _heads(v, kvn)
    d = qh.shape[-1]
    total_len = int(np.asarray(total_sequence_length).reshape(()))
    past_len = 0 if past_key is None else past_key.shape[2]
    cap = max(total_len, past_len)
    tb = jnp.asarray(seqlens_k).astype(jnp.int32).reshape(b) + 1  # tokens after this step
    qb = jnp.minimum(s, tb)
    pb = tb - qb  # tokens cached before this step
    pos = pb[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]  # (B, S) absolute positions
    if do_rotary:
        rp = pos if position_ids is None else jnp.asarray(position_ids)
        qh = _rope(qh, jnp.asarray(cos_cache), jnp.asarray(sin_cache), rp, rotary_interleaved)
        kh = _rope(kh, jnp.asarray(cos_cache), jnp.asarray(sin_cache), rp, rotary_interleaved)
    # present[b, :, t] = new[b, :, t - P_b] for P_b <= t < T_b, else past[b, :, t]
    rows = jnp.arange(cap, dtype=jnp.int32)
    idx_new = rows[None, :] - pb[:, None]  # (B, cap)
    from_new = (idx_new >= 0) & (idx_new < qb[:, None])
    take = jnp.clip(idx_new, 0, s - 1)

    def place(new: Any, past: Any) -> Any:
        gathered = jnp.take_along_axis(new, take[:, None, :, None], axis=2)
        if past is None:
            base = jnp.zeros((b, kvn, cap, d), new.dtype)
        else:
            past = jnp.asarray(past).astype(new.dtype)
            base = past[:, :, :cap] if past_len >= cap else jnp.pad(past, ((0, 0), (0, 0), (0, cap - past_len), (0, 0)))
        return jnp.where(from_new[:, None, :, None], gathered, base)

    present_k, present_v = place(kh, past_key), place(vh, past_value)
    rep = n // kvn
    kx = jnp.repeat(present_k, rep, axis=1)
    vx = jnp.repeat(present_v, rep, axis=1)
    j = rows[None, None, :]  # key positions
    keep = j < tb[:, None, None]  # (B, 1->S, cap)
    if causal:
        keep = keep & (j <= pos[:, :, None])
        if local_window_size > 0:
            keep = keep & (j > pos[:, :, None] - local_window_size)  # the window holds the query itself
    neg = jnp.asarray(-jnp.inf, st)
    bias_total = jnp.where(keep[:, None], jnp.asarray(0.0, st), neg)
    if attention_bias is not None:
        ab = jnp.asarray(attention_bias).astype(st)
        bias_total = bias_total + ab[..., :cap]
    sink = None
    if head_sink is not None:
        sink = jnp.asarray(head_sink).astype(st).reshape(1, n, 1, 1)
    elif smooth_softmax > 0:
        sink = jnp.zeros((1, 1, 1, 1), st)
    ctx, _ = _softmax_attend(qh, kx, vx, scale or 1.0 / math.sqrt(d), bias_total, sink, softcap)
    valid_q = (jnp.arange(s)[None, :] < qb[:, None])[:, None, :, None]
    ctx = jnp.where(valid_q, jnp.nan_to_num(ctx), 0.0).astype(q.dtype)
    return _merge(ctx), present_k.astype(q.dtype), present_v.astype(q.dtype)
