"""Sequence builtins: UNIDIRECTIONAL_SEQUENCE_LSTM, BIDIRECTIONAL_SEQUENCE_LSTM, UNIDIRECTIONAL_SEQUENCE_RNN, SVDF.

Float kernels (hybrid int8 weights are dequantized), one ``lax.scan`` over time.
Tensor layouts follow TFLite's builtin kernels: weights are ``[n_cell, n_input]``
and ``[n_cell, n_output]``, gates in the order input, forget, cell, output; an
omitted input gate (CIFG) uses ``1 - forget``; peepholes read the previous cell
state for the input/forget gates and the new one for the output gate; with
layer norm the bias is added after normalization.

The state inputs are TFLite *variable* tensors that LiteRT carries across
invocations; the reader turns them into graph state and lists their slots in
``state_outputs``: each op returns its outputs followed by the final value of
every such state slot.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ....registry import OpDef, registrar
from .. import quant as Q
from ._util import QList, fused, qat

OPS: list[OpDef] = []
op = registrar(OPS, domain="tflite")

_NORM_EPS = 1e-8
#: Sequences up to this many steps are unrolled (XLA's CPU while loop costs tens of microseconds per step).
_UNROLL_MAX = 32


def _unroll(steps: int) -> int | bool:
    return True if steps <= _UNROLL_MAX else 1


def _f32(args: tuple[Any, ...], in_q: QList, slot: int):
    """Input ``slot`` as float32 (None when omitted); int8 weights (hybrid models) are dequantized."""
    if slot >= len(args) or args[slot] is None:
        return None
    v = args[slot]
    q = qat(in_q, slot)
    if q is not None and jnp.issubdtype(jnp.result_type(v), jnp.integer):
        return Q.dequantize(v, q)
    return jnp.asarray(v, jnp.float32)


def _layer_norm(z):
    mean = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(z - mean), axis=-1, keepdims=True)
    return (z - mean) * lax.rsqrt(var + _NORM_EPS)


def _mm(x, w):
    """x[..., K] @ w[N, K].T"""
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _lstm_layer(x_tm, h0, c0, w: dict[str, Any], act: str, cell_clip: float, proj_clip: float,
                aux_tm=None, reverse: bool = False, diagonal: bool = False):
    """One LSTM direction over time-major ``x_tm`` [T, B, I]; returns (outputs [T, B, n_output], h_T, c_T)."""
    cifg = w["wi"] is None
    gates = ("f", "c", "o") if cifg else ("i", "f", "c", "o")
    layer_norm = w["ln_f"] is not None
    pre = {}
    for g in gates:
        z = _mm(x_tm, w["w" + g])
        if aux_tm is not None and w.get("aw" + g) is not None:
            z = z + _mm(aux_tm, w["aw" + g])
        if not layer_norm and w["b" + g] is not None:
            z = z + w["b" + g]
        pre[g] = z

    def gate(g, z, h, cell, fn):
        r = w["r" + g]
        z = z + (h * r if diagonal else _mm(h, r))
        peep = w.get("p" + g)
        if peep is not None and cell is not None:
            z = z + cell * peep
        if layer_norm:
            z = _layer_norm(z) * w["ln_" + g]
            if w["b" + g] is not None:
                z = z + w["b" + g]
        return fn(z)

    def act_fn(v):
        return fused(v, act)

    def step(carry, zs):
        h, c = carry
        z = dict(zip(gates, zs))
        f = gate("f", z["f"], h, c, jax.nn.sigmoid)
        i = 1.0 - f if cifg else gate("i", z["i"], h, c, jax.nn.sigmoid)
        g = gate("c", z["c"], h, None, act_fn)
        c_new = c * f + i * g
        if cell_clip > 0:
            c_new = jnp.clip(c_new, -cell_clip, cell_clip)
        o = gate("o", z["o"], h, c_new, jax.nn.sigmoid)
        out = o * act_fn(c_new)
        if w["proj_w"] is not None:
            out = _mm(out, w["proj_w"])
            if w["proj_b"] is not None:
                out = out + w["proj_b"]
            if proj_clip > 0:
                out = jnp.clip(out, -proj_clip, proj_clip)
        return (out, c_new), out

    (h_t, c_t), ys = lax.scan(step, (h0, c0), tuple(pre[g] for g in gates), reverse=reverse,
                              unroll=_unroll(x_tm.shape[0]))
    return ys, h_t, c_t


def _lstm_weights(args, in_q, base: int, peep: int, bias: int, proj: int, ln: int | None = None,
                  aux: int | None = None) -> dict[str, Any]:
    names = "ifco"
    w: dict[str, Any] = {}
    for k, g in enumerate(names):
        w["w" + g] = _f32(args, in_q, base + k)
        w["r" + g] = _f32(args, in_q, base + 4 + k)
        w["b" + g] = _f32(args, in_q, bias + k)
        w["ln_" + g] = _f32(args, in_q, ln + k) if ln is not None else None
        w["aw" + g] = _f32(args, in_q, aux + k) if aux is not None else None
    for k, g in enumerate("ifo"):
        w["p" + g] = _f32(args, in_q, peep + k)
    w["proj_w"] = _f32(args, in_q, proj)
    w["proj_b"] = _f32(args, in_q, proj + 1)
    return w


def _state(args, in_q, slot: int, batch: int, size: int):
    v = _f32(args, in_q, slot)
    if v is None:
        return jnp.zeros((batch, size), jnp.float32)
    return jnp.reshape(v, (batch, size))


def _time_major(x, time_major: bool):
    x = jnp.asarray(x)
    return x if time_major else jnp.swapaxes(x, 0, 1)


@op("UNIDIRECTIONAL_SEQUENCE_LSTM")
def unidirectional_sequence_lstm(*args, fused_activation_function: str = "TANH", cell_clip: float = 0.0,
                                 proj_clip: float = 0.0, time_major: bool = False,
                                 asymmetric_quantize_inputs: bool = False, diagonal_recurrent_tensors: bool = False,
                                 state_outputs: tuple[int, ...] = (), in_q: QList = None, out_q: QList = None):
    """LSTM over a [B, T, I] (or time-major [T, B, I]) sequence; inputs in TFLite's 24-slot layout."""
    x = _f32(args, in_q, 0)
    w = _lstm_weights(args, in_q, 1, 9, 12, 16, ln=20 if len(args) > 20 else None)
    x_tm = _time_major(x, time_major)
    batch = x_tm.shape[1]
    n_cell = w["wf"].shape[0]
    n_out = w["proj_w"].shape[0] if w["proj_w"] is not None else n_cell
    h0 = _state(args, in_q, 18, batch, n_out)
    c0 = _state(args, in_q, 19, batch, n_cell)
    ys, h_t, c_t = _lstm_layer(x_tm, h0, c0, w, fused_activation_function, float(cell_clip), float(proj_clip),
                               diagonal=bool(diagonal_recurrent_tensors))
    finals = {18: h_t, 19: c_t}
    return (_time_major(ys, time_major),) + tuple(finals[s].reshape(jnp.shape(args[s])) for s in state_outputs)


@op("BIDIRECTIONAL_SEQUENCE_LSTM")
def bidirectional_sequence_lstm(*args, fused_activation_function: str = "TANH", cell_clip: float = 0.0,
                                proj_clip: float = 0.0, merge_outputs: bool = False, time_major: bool = True,
                                asymmetric_quantize_inputs: bool = False, state_outputs: tuple[int, ...] = (),
                                _num_outputs: int = 2, in_q: QList = None, out_q: QList = None):
    """Forward and backward LSTMs over one sequence (48-slot layout); outputs fw, bw (or one merged output).

    An auxiliary input (slot 39) with auxiliary weights adds to each direction's gates; without
    auxiliary weights the backward direction reads the auxiliary input instead of the input.
    """
    x_tm = _time_major(_f32(args, in_q, 0), time_major)
    aux = _f32(args, in_q, 39)
    aux_tm = _time_major(aux, time_major) if aux is not None else None
    fw = _lstm_weights(args, in_q, 1, 9, 12, 16, aux=40)
    bw = _lstm_weights(args, in_q, 18, 26, 29, 33, aux=44)
    batch = x_tm.shape[1]
    act, cc, pc = fused_activation_function, float(cell_clip), float(proj_clip)
    results = {}
    for name, w, hs, cs, rev in (("fw", fw, 35, 36, False), ("bw", bw, 37, 38, True)):
        n_cell = w["wf"].shape[0]
        n_out = w["proj_w"].shape[0] if w["proj_w"] is not None else n_cell
        h0, c0 = _state(args, in_q, hs, batch, n_out), _state(args, in_q, cs, batch, n_cell)
        inp, aux_in = x_tm, aux_tm
        if aux_tm is not None and w["awf"] is None:
            inp, aux_in = (aux_tm if name == "bw" else x_tm), None
        ys, h_t, c_t = _lstm_layer(inp, h0, c0, w, act, cc, pc, aux_tm=aux_in, reverse=rev)
        results[name] = ys
        results[hs], results[cs] = h_t, c_t
    states = tuple(results[s].reshape(jnp.shape(args[s])) for s in state_outputs)
    if merge_outputs:
        return (_time_major(jnp.concatenate([results["fw"], results["bw"]], axis=-1), time_major),) + states
    return (_time_major(results["fw"], time_major), _time_major(results["bw"], time_major)) + states


@op("UNIDIRECTIONAL_SEQUENCE_RNN")
def unidirectional_sequence_rnn(*args, time_major: bool = False, fused_activation_function: str = "NONE",
                                asymmetric_quantize_inputs: bool = False, state_outputs: tuple[int, ...] = (),
                                in_q: QList = None, out_q: QList = None):
    """h_t = act(x_t W^T + h_{t-1} R^T + b): input, weights [U, I], recurrent [U, U], bias [U], hidden state [B, U]."""
    x_tm = _time_major(_f32(args, in_q, 0), time_major)
    wx, wh, b = _f32(args, in_q, 1), _f32(args, in_q, 2), _f32(args, in_q, 3)
    batch, units = x_tm.shape[1], wx.shape[0]
    h0 = _state(args, in_q, 4, batch, units)
    zx = _mm(x_tm, wx)
    if b is not None:
        zx = zx + b

    def step(h, z):
        h_new = fused(z + _mm(h, wh), fused_activation_function)
        return h_new, h_new

    h_t, ys = lax.scan(step, h0, zx, unroll=_unroll(zx.shape[0]))
    return (_time_major(ys, time_major),) + tuple(h_t.reshape(jnp.shape(args[s])) for s in state_outputs)


@op("SVDF")
def svdf(*args, rank: int = 1, fused_activation_function: str = "NONE", asymmetric_quantize_inputs: bool = False,
         state_outputs: tuple[int, ...] = (), in_q: QList = None, out_q: QList = None):
    """Singular-value-decomposition filter: one time step per call over a [B, F*M] activation memory.

    The memory shifts left by one, its newest column becomes ``weights_feature @ x``; each filter's
    memory is weighted by ``weights_time`` and summed, ``rank`` filters sum into each unit.
    """
    x = _f32(args, in_q, 0)
    w_feat, w_time, b = _f32(args, in_q, 1), _f32(args, in_q, 2), _f32(args, in_q, 3)
    batch = x.shape[0]
    filters, memory = w_time.shape
    state = _state(args, in_q, 4, batch, filters * memory).reshape(batch, filters, memory)
    newest = _mm(jnp.reshape(x, (batch, -1)), w_feat)  # [B, F]
    state = jnp.concatenate([state[:, :, 1:], newest[:, :, None]], axis=2)
    per_filter = jnp.einsum("bfm,fm->bf", state, w_time)
    y = per_filter.reshape(batch, filters // rank, rank).sum(axis=-1)
    if b is not None:
        y = y + b
    y = fused(y, fused_activation_function)
    return (y,) + tuple(state.reshape(jnp.shape(args[s])) for s in state_outputs)
