"""Sequence builtins: UNIDIRECTIONAL_SEQUENCE_LSTM, BIDIRECTIONAL_SEQUENCE_LSTM, UNIDIRECTIONAL_SEQUENCE_RNN, SVDF.

Float kernels, one ``lax.scan`` over time. Tensor layouts follow TFLite's builtin
kernels: weights are ``[n_cell, n_input]`` and ``[n_cell, n_output]``, gates in the
order input, forget, cell, output; an omitted input gate (CIFG) uses ``1 - forget``;
peepholes read the previous cell state for the input/forget gates and the new one for
the output gate; with layer norm the bias is added after normalization.

Dynamic-range (hybrid) models keep float activations and int8 weight matrices with one
scale each. As LiteRT's hybrid kernels do, every float operand of such a matrix (the
input at each step, the previous output state, the LSTM projection's input) is quantized
to int8 per batch row (symmetric, or asymmetric with ``asymmetric_quantize_inputs``),
multiplied in int32 and scaled back by ``row_scale * weight_scale``; contributions are
added to the gate in the kernels' order (bias, input, auxiliary input, recurrent,
peephole). Int8 peephole and SVDF time weights are dequantized (``q * scale``).

The state inputs are TFLite *variable* tensors that LiteRT carries across
invocations; the reader turns them into graph state and lists their slots in
``state_outputs``: each op returns its outputs followed by the final value of
every such state slot.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .... import cpu_kernels
from ....intmath import zp_matmul
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


@dataclass(frozen=True)
class _Int8Matrix:
    """A dynamic-range weight matrix [N, K]: its int8 values and its one float32 scale."""

    values: Any
    scale: np.float32 | np.ndarray  # one scale, or one per row where gates' matrices are stacked (mm_all)


def _matrix(args: tuple[Any, ...], in_q: QList, slot: int, hybrid: bool):
    """Weight matrix ``slot``: an :class:`_Int8Matrix` in a hybrid op, else float32 (None when omitted)."""
    if slot >= len(args) or args[slot] is None:
        return None
    q = qat(in_q, slot)
    if hybrid and q is not None and not q.per_axis and jnp.result_type(args[slot]) == jnp.int8:
        return _Int8Matrix(jnp.asarray(args[slot], jnp.int8), np.float32(q.s))
    return _f32(args, in_q, slot)


def _is_hybrid(args: tuple[Any, ...], in_q: QList, weight_slot: int) -> bool:
    """Float activations with an int8 weight (LiteRT checks one weight, as here): the hybrid kernel."""
    w = args[weight_slot] if weight_slot < len(args) else None
    return (w is not None and qat(in_q, weight_slot) is not None and jnp.result_type(w) == jnp.int8
            and jnp.issubdtype(jnp.result_type(args[0]), jnp.floating))


class _Operand:
    """A float operand of the gate matmuls; quantized per row (once) when it meets an int8 matrix."""

    def __init__(self, x, asymmetric: bool):
        self.x = x
        self.asymmetric = asymmetric
        self._q = None

    def mm(self, w):
        """``x @ w.T``: a float matmul, or LiteRT's hybrid one for an :class:`_Int8Matrix`."""
        if w is None:
            return None
        if not isinstance(w, _Int8Matrix):
            return _mm(self.x, w)
        if self._q is None:
            q, sf, off = Q.dynamic_quantize_rows(jnp.reshape(self.x, (-1, self.x.shape[-1])), self.asymmetric)
            self._q = (q, sf, off[:, None] if self.asymmetric else None)
        q, sf, off = self._q
        acc = zp_matmul(q, off, w.values, None, trans_b=True)
        y = acc.astype(jnp.float32) * (sf[:, None] * w.scale)
        return jnp.reshape(y, self.x.shape[:-1] + (w.values.shape[0],))

    def mm_all(self, ws: list[Any]) -> list[Any]:
        """``[self.mm(w) for w in ws]`` as one product against the matrices stacked by rows, split after: each
        gate's product alone was its own XLA call, four per step (an unrolled 10-step LSTM ran ~90 kernels)."""
        same = (all(isinstance(w, _Int8Matrix) for w in ws)
                or all(w is not None and not isinstance(w, _Int8Matrix) for w in ws))
        if len(ws) < 2 or not same:
            return [self.mm(w) for w in ws]
        sizes = [_n_rows(w) for w in ws]
        if isinstance(ws[0], _Int8Matrix):
            scales = np.concatenate([np.full(n, w.scale, np.float32) for n, w in zip(sizes, ws)])
            y = self.mm(_Int8Matrix(jnp.concatenate([w.values for w in ws]), scales))
        else:
            y = self.mm(jnp.concatenate(ws))
        return jnp.split(y, np.cumsum(sizes)[:-1], axis=-1)


def _layer_norm(z):
    mean = jnp.mean(z, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(z - mean), axis=-1, keepdims=True)
    return (z - mean) * lax.rsqrt(var + _NORM_EPS)


def _mm(x, w):
    """x[..., K] @ w[N, K].T"""
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _n_rows(m) -> int:
    return m.values.shape[0] if isinstance(m, _Int8Matrix) else m.shape[0]


def _lstm_layer(x_tm, h0, c0, w: dict[str, Any], act: str, cell_clip: float, proj_clip: float,
                aux_tm=None, reverse: bool = False, diagonal: bool = False, asymmetric: bool = False,
                kernel: bool = True):
    """One LSTM direction over time-major ``x_tm`` [T, B, I]; returns (outputs [T, B, n_output], h_T, c_T).
    With ``kernel``, a layer :func:`_takes_lstm_kernel` accepts runs as one :func:`cpu_kernels.f32_lstm` call."""
    if kernel and aux_tm is None and not diagonal and _takes_lstm_kernel(w, act, (x_tm, h0, c0)):
        gates = "ifco"

        def otherwise(x_tm, *ops):  # this function's XLA composition, from the kernel's operands
            new = {role + g: v for k, role in enumerate("wrb") for g, v in zip(gates, ops[4 * k:4 * k + 4])}
            return _lstm_layer(x_tm, ops[12], ops[13], {**w, **new}, act, cell_clip, proj_clip, reverse=reverse,
                               asymmetric=asymmetric, kernel=False)

        n = _n_rows(w["wf"])
        biases = [w["b" + g] if w["b" + g] is not None else jnp.zeros((n,), jnp.float32) for g in gates]
        return cpu_kernels.f32_lstm(x_tm, [w["w" + g] for g in gates], [w["r" + g] for g in gates], biases, h0, c0,
                                    time_major=True, reverse=reverse, cell_clip=cell_clip, otherwise=otherwise)
    cifg = w["wi"] is None
    gates = ("f", "c", "o") if cifg else ("i", "f", "c", "o")
    layer_norm = w["ln_f"] is not None
    xs = _Operand(x_tm, asymmetric)
    auxs = _Operand(aux_tm, asymmetric) if aux_tm is not None else None
    pre = {}
    inputs = dict(zip(gates, xs.mm_all([w["w" + g] for g in gates])))
    aux = dict(zip(gates, auxs.mm_all([w.get("aw" + g) for g in gates]))) if auxs is not None else {}
    for g in gates:
        z = inputs[g]
        if not layer_norm and w["b" + g] is not None:
            z = w["b" + g] + z  # the kernels start each gate from its bias
        if aux.get(g) is not None:
            z = z + aux[g]
        pre[g] = z

    def act_fn(v):
        return fused(v, act)

    def step(carry, zs):
        h, c = carry
        recurrent = {} if diagonal else dict(zip(gates, _Operand(h, asymmetric).mm_all([w["r" + g] for g in gates])))

        def gate(g, z, cell, fn):
            z = z + (h * w["r" + g] if diagonal else recurrent[g])
            peep = w.get("p" + g)
            if peep is not None and cell is not None:
                z = z + cell * peep
            if layer_norm:
                z = _layer_norm(z) * w["ln_" + g]
                if w["b" + g] is not None:
                    z = z + w["b" + g]
            return fn(z)

        z = dict(zip(gates, zs))
        f = gate("f", z["f"], c, jax.nn.sigmoid)
        i = 1.0 - f if cifg else gate("i", z["i"], c, jax.nn.sigmoid)
        g = gate("c", z["c"], None, act_fn)
        c_new = c * f + i * g
        if cell_clip > 0:
            c_new = jnp.clip(c_new, -cell_clip, cell_clip)
        o = gate("o", z["o"], c_new, jax.nn.sigmoid)
        out = o * act_fn(c_new)
        if w["proj_w"] is not None:
            out = _Operand(out, asymmetric).mm(w["proj_w"])
            if w["proj_b"] is not None:
                out = w["proj_b"] + out
            if proj_clip > 0:
                out = jnp.clip(out, -proj_clip, proj_clip)
        return (out, c_new), out

    (h_t, c_t), ys = lax.scan(step, (h0, c0), tuple(pre[g] for g in gates), reverse=reverse,
                              unroll=_unroll(x_tm.shape[0]))
    return ys, h_t, c_t


def _takes_lstm_kernel(w: dict[str, Any], act: str, activations: tuple[Any, ...]) -> bool:
    """Whether a layer goes to :func:`cpu_kernels.f32_lstm` (whose otherwise is this converter's composition):
    tanh, float32 inputs, state, weights and biases, no peepholes, projection, layer norm or coupled gates, and
    the AVX-512 kernels built."""
    if act != "TANH" or w["proj_w"] is not None or w["ln_f"] is not None:
        return False
    if any(jnp.asarray(v).dtype != jnp.float32 for v in activations):
        return False
    if any(w.get("p" + g) is not None for g in "ifo"):
        return False
    mats = [w[role + g] for role in "wr" for g in "ifco"] + [w["b" + g] for g in "ifco" if w["b" + g] is not None]
    if any(m is None or isinstance(m, _Int8Matrix) or jnp.asarray(m).dtype != jnp.float32 for m in mats):
        return False
    return cpu_kernels.available() and cpu_kernels.isa() == 2


def _lstm_weights(args, in_q, base: int, peep: int, bias: int, proj: int, ln: int | None = None,
                  aux: int | None = None, hybrid: bool = False, diagonal: bool = False) -> dict[str, Any]:
    """The LSTM's tensors by role; in a hybrid op the int8 weight matrices stay int8 (see :class:`_Int8Matrix`)."""
    names = "ifco"
    w: dict[str, Any] = {}
    for k, g in enumerate(names):
        w["w" + g] = _matrix(args, in_q, base + k, hybrid)
        w["r" + g] = _f32(args, in_q, base + 4 + k) if diagonal else _matrix(args, in_q, base + 4 + k, hybrid)
        w["b" + g] = _f32(args, in_q, bias + k)
        w["ln_" + g] = _f32(args, in_q, ln + k) if ln is not None else None
        w["aw" + g] = _matrix(args, in_q, aux + k, hybrid) if aux is not None else None
    for k, g in enumerate("ifo"):
        w["p" + g] = _f32(args, in_q, peep + k)
    w["proj_w"] = _matrix(args, in_q, proj, hybrid)
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
    diagonal = bool(diagonal_recurrent_tensors)
    w = _lstm_weights(args, in_q, 1, 9, 12, 16, ln=20 if len(args) > 20 else None,
                      hybrid=_is_hybrid(args, in_q, 4), diagonal=diagonal)
    x_tm = _time_major(x, time_major)
    batch = x_tm.shape[1]
    n_cell = _n_rows(w["wf"])
    n_out = _n_rows(w["proj_w"]) if w["proj_w"] is not None else n_cell
    h0 = _state(args, in_q, 18, batch, n_out)
    c0 = _state(args, in_q, 19, batch, n_cell)
    ys, h_t, c_t = _lstm_layer(x_tm, h0, c0, w, fused_activation_function, float(cell_clip), float(proj_clip),
                               diagonal=diagonal, asymmetric=bool(asymmetric_quantize_inputs))
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
    fw = _lstm_weights(args, in_q, 1, 9, 12, 16, aux=40, hybrid=_is_hybrid(args, in_q, 4))
    bw = _lstm_weights(args, in_q, 18, 26, 29, 33, aux=44, hybrid=_is_hybrid(args, in_q, 21))
    batch = x_tm.shape[1]
    act, cc, pc = fused_activation_function, float(cell_clip), float(proj_clip)
    results = {}
    for name, w, hs, cs, rev in (("fw", fw, 35, 36, False), ("bw", bw, 37, 38, True)):
        n_cell = _n_rows(w["wf"])
        n_out = _n_rows(w["proj_w"]) if w["proj_w"] is not None else n_cell
        h0, c0 = _state(args, in_q, hs, batch, n_out), _state(args, in_q, cs, batch, n_cell)
        inp, aux_in = x_tm, aux_tm
        if aux_tm is not None and w["awf"] is None:
            inp, aux_in = (aux_tm if name == "bw" else x_tm), None
        ys, h_t, c_t = _lstm_layer(inp, h0, c0, w, act, cc, pc, aux_tm=aux_in, reverse=rev,
                                   asymmetric=bool(asymmetric_quantize_inputs))
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
    hybrid = _is_hybrid(args, in_q, 1)
    asymmetric = bool(asymmetric_quantize_inputs)
    wx, wh, b = _matrix(args, in_q, 1, hybrid), _matrix(args, in_q, 2, hybrid), _f32(args, in_q, 3)
    batch, units = x_tm.shape[1], _n_rows(wx)
    h0 = _state(args, in_q, 4, batch, units)
    zx = _Operand(x_tm, asymmetric).mm(wx)
    if b is not None:
        zx = b + zx

    def step(h, z):
        h_new = fused(z + _Operand(h, asymmetric).mm(wh), fused_activation_function)
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
    w_feat = _matrix(args, in_q, 1, _is_hybrid(args, in_q, 1))
    w_time, b = _f32(args, in_q, 2), _f32(args, in_q, 3)
    batch = x.shape[0]
    filters, memory = w_time.shape
    state = _state(args, in_q, 4, batch, filters * memory).reshape(batch, filters, memory)
    newest = _Operand(jnp.reshape(x, (batch, -1)), bool(asymmetric_quantize_inputs)).mm(w_feat)  # [B, F]
    state = jnp.concatenate([state[:, :, 1:], newest[:, :, None]], axis=2)
    per_filter = jnp.einsum("bfm,fm->bf", state, w_time)
    y = per_filter.reshape(batch, filters // rank, rank).sum(axis=-1)
    if b is not None:
        y = y + b
    y = fused(y, fused_activation_function)
    return (y,) + tuple(state.reshape(jnp.shape(args[s])) for s in state_outputs)
