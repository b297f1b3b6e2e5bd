"""Recurrent ops (ai.onnx): RNN, GRU, LSTM via lax.scan over time.

The input projection ``X W^T + Wb`` is one matmul for all time steps; the scan
carries the hidden (and cell) state. Per-batch ``sequence_lens`` freeze the
state and zero ``Y`` past each entry's length; the reverse direction reverses
each entry within its own length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)

Act = Callable[[jax.Array], jax.Array]

# name -> (builder(alpha, beta), default alpha, default beta, takes alpha, takes beta)
_ACTIVATIONS: dict[str, tuple[Callable[[float, float], Act], float, float, bool, bool]] = {
    "relu": (lambda a, b: jax.nn.relu, 0.0, 0.0, False, False),
    "tanh": (lambda a, b: jnp.tanh, 0.0, 0.0, False, False),
    "sigmoid": (lambda a, b: jax.nn.sigmoid, 0.0, 0.0, False, False),
    "softsign": (lambda a, b: (lambda x: x / (1.0 + jnp.abs(x))), 0.0, 0.0, False, False),
    "softplus": (lambda a, b: jax.nn.softplus, 0.0, 0.0, False, False),
    "affine": (lambda a, b: (lambda x: a * x + b), 1.0, 0.0, True, True),
    "leakyrelu": (lambda a, b: (lambda x: jnp.where(x >= 0, x, a * x)), 0.01, 0.0, True, False),
    "thresholdedrelu": (lambda a, b: (lambda x: jnp.where(x > a, x, jnp.zeros_like(x))), 1.0, 0.0, True, False),
    "scaledtanh": (lambda a, b: (lambda x: a * jnp.tanh(b * x)), 1.0, 1.0, True, True),
    "hardsigmoid": (lambda a, b: (lambda x: jnp.clip(a * x + b, 0.0, 1.0)), 0.2, 0.5, True, True),
    "elu": (lambda a, b: (lambda x: jnp.where(x >= 0, x, a * (jnp.exp(x) - 1.0))), 1.0, 0.0, True, False),
}

_DEFAULT_ACTS = {"RNN": ("Tanh",), "GRU": ("Sigmoid", "Tanh"), "LSTM": ("Sigmoid", "Tanh", "Tanh")}
_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}


def _activations(kind: str, names: Sequence[str] | None, alphas: Sequence[float] | None,
                 betas: Sequence[float] | None, n_dirs: int) -> list[list[Act]]:
    """Per direction, the op's activation functions; alpha/beta lists are consumed in order
    by the activations that take them (others use the ONNX operators' defaults)."""
    per_dir = len(_DEFAULT_ACTS[kind])
    names = list(names) if names else list(_DEFAULT_ACTS[kind]) * n_dirs
    if len(names) == per_dir and n_dirs == 2:
        names = names * 2
    if kind == "RNN" and len(names) > n_dirs and n_dirs == 1:
        names = names[:1]  # RNN's spec default lists ("Tanh", "Tanh")
    if len(names) != per_dir * n_dirs:
        raise ValueError(f"{kind}: activations {names} has {len(names)} entries, expected {per_dir * n_dirs} "
                         f"({per_dir} per direction, {n_dirs} direction(s))")
    a_iter, b_iter = iter(alphas or ()), iter(betas or ())
    fns: list[Act] = []
    for name in names:
        key = name.lower()
        if key not in _ACTIVATIONS:
            raise ValueError(f"{kind}: unsupported activation '{name}'; expected one of {sorted(_ACTIVATIONS)}")
        build, da, db, takes_a, takes_b = _ACTIVATIONS[key]
        a = float(next(a_iter, da)) if takes_a else da
        b = float(next(b_iter, db)) if takes_b else db
        fns.append(build(a, b))
    return [fns[d * per_dir:(d + 1) * per_dir] for d in range(n_dirs)]


def _clipper(clip: float | None) -> Act:
    if clip is None:
        return lambda v: v
    return lambda v: jnp.clip(v, -clip, clip)


def _rnn_cell(acts: list[Act], clip: Act, r: jax.Array, rb: jax.Array, **_: Any):
    (f,) = acts

    def cell(xw, h, c):
        return f(clip(xw + h @ r.T + rb)), c
    return cell


def _gru_cell(acts: list[Act], clip: Act, r: jax.Array, rb: jax.Array, linear_before_reset: int = 0, **_: Any):
    f, g = acts
    hs = r.shape[1]
    r_zr, r_h = r[:2 * hs], r[2 * hs:]
    rb_zr, rb_h = rb[:2 * hs], rb[2 * hs:]

    def cell(xw, h, c):
        zr = xw[:, :2 * hs] + h @ r_zr.T + rb_zr
        z = f(clip(zr[:, :hs]))
        rt = f(clip(zr[:, hs:]))
        if linear_before_reset:
            hh = g(clip(xw[:, 2 * hs:] + rt * (h @ r_h.T + rb_h)))
        else:
            hh = g(clip(xw[:, 2 * hs:] + (rt * h) @ r_h.T + rb_h))
        return (1.0 - z) * hh + z * h, c
    return cell


def _lstm_cell(acts: list[Act], clip: Act, r: jax.Array, rb: jax.Array, p: jax.Array | None = None,
               input_forget: int = 0, **_: Any):
    f, g, hf = acts
    hs = r.shape[1]
    pi, po, pf = (None, None, None) if p is None else (p[:hs], p[hs:2 * hs], p[2 * hs:])

    def peep(v, pw, c):
        return v if pw is None else v + pw * c

    def cell(xw, h, c):
        gates = xw + h @ r.T + rb
        gi, go, gf, gc = (gates[:, k * hs:(k + 1) * hs] for k in range(4))
        i = f(clip(peep(gi, pi, c)))
        ft = 1.0 - i if input_forget else f(clip(peep(gf, pf, c)))
        c_new = ft * c + i * g(clip(gc))
        o = f(clip(peep(go, po, c_new)))
        return o * hf(c_new), c_new
    return cell


_CELLS = {"RNN": _rnn_cell, "GRU": _gru_cell, "LSTM": _lstm_cell}


def _one_direction(cell, xw: jax.Array, h0: jax.Array, c0: jax.Array, lens: jax.Array | None,
                   reverse: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Scan ``cell`` over time: Y [T, N, H], final h and c [N, H]."""
    t_len = xw.shape[0]
    if lens is None and not reverse:
        def step(carry, x_t):
            h, c = cell(x_t, *carry)
            return (h, c), h
        (h, c), y = lax.scan(step, (h0, c0), xw)
        return y, h, c
    t = jnp.arange(t_len)[:, None]
    n_lens = jnp.full((xw.shape[1],), t_len) if lens is None else lens.astype(jnp.int32)
    live = t < n_lens[None, :]  # [T, N]
    idx = jnp.where(live, n_lens[None, :] - 1 - t, t) if reverse else None
    if idx is not None:
        xw = jnp.take_along_axis(xw, idx[:, :, None], axis=0)

    def masked_step(carry, inp):
        x_t, live_t = inp
        h, c = carry
        h_new, c_new = cell(x_t, h, c)
        m = live_t[:, None]
        return (jnp.where(m, h_new, h), jnp.where(m, c_new, c)), jnp.where(m, h_new, jnp.zeros_like(h_new))

    (h, c), y = lax.scan(masked_step, (h0, c0), (xw, live))
    if idx is not None:
        y = jnp.take_along_axis(y, idx[:, :, None], axis=0)
    return y, h, c


def _recurrent(kind: str, x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, *,
               activation_alpha=None, activation_beta=None, activations=None, clip=None,
               direction: str = "forward", hidden_size: int | None = None, layout: int = 0,
               **cell_attrs: Any) -> tuple[jax.Array, ...]:
    if direction not in ("forward", "reverse", "bidirectional"):
        raise ValueError(f"{kind}: direction '{direction}' is not one of forward, reverse, bidirectional")
    if layout not in (0, 1):
        raise ValueError(f"{kind}: layout must be 0 or 1, got {layout}")
    x = jnp.asarray(x)
    dt = x.dtype
    if layout:
        x = jnp.swapaxes(x, 0, 1)
        initial_h = None if initial_h is None else jnp.swapaxes(initial_h, 0, 1)
        initial_c = None if initial_c is None else jnp.swapaxes(initial_c, 0, 1)
    n_dirs = 2 if direction == "bidirectional" else 1
    gates = _GATES[kind]
    hs = int(hidden_size) if hidden_size else jnp.shape(r)[-1]
    if jnp.shape(w)[:2] != (n_dirs, gates * hs) or jnp.shape(r) != (n_dirs, gates * hs, hs):
        raise ValueError(f"{kind}: W {jnp.shape(w)} / R {jnp.shape(r)} do not match {n_dirs} direction(s), "
                         f"{gates} gate(s) and hidden_size {hs}")
    batch = x.shape[1]
    w, r = jnp.asarray(w, dt), jnp.asarray(r, dt)
    b = jnp.zeros((n_dirs, 2 * gates * hs), dt) if b is None else jnp.asarray(b, dt)
    h0 = jnp.zeros((n_dirs, batch, hs), dt) if initial_h is None else jnp.asarray(initial_h, dt)
    c0 = jnp.zeros((n_dirs, batch, hs), dt) if initial_c is None else jnp.asarray(initial_c, dt)
    acts = _activations(kind, activations, activation_alpha, activation_beta, n_dirs)
    lens = None if sequence_lens is None else jnp.asarray(sequence_lens)
    ys, hs_out, cs_out = [], [], []
    for d in range(n_dirs):
        wb, rb = b[d, :gates * hs], b[d, gates * hs:]
        pd = None if p is None else jnp.asarray(p, dt)[d]
        cell = _CELLS[kind](acts[d], _clipper(clip), r[d], rb, p=pd, **cell_attrs)
        xw = jnp.einsum("tni,gi->tng", x, w[d]) + wb
        reverse = direction == "reverse" or d == 1
        y, h, c = _one_direction(cell, xw, h0[d], c0[d], lens, reverse)
        ys.append(y)
        hs_out.append(h)
        cs_out.append(c)
    y_all = jnp.stack(ys, axis=1)  # [T, D, N, H]
    y_h, y_c = jnp.stack(hs_out), jnp.stack(cs_out)  # [D, N, H]
    if layout:
        y_all = jnp.transpose(y_all, (2, 0, 1, 3))
        y_h, y_c = jnp.swapaxes(y_h, 0, 1), jnp.swapaxes(y_c, 0, 1)
    return (y_all, y_h, y_c) if kind == "LSTM" else (y_all, y_h)


@op("RNN", (1, 7, 14, 22))
def rnn(x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None, activation_beta=None,
        activations=None, clip=None, direction: str = "forward", hidden_size: int | None = None,
        layout: int = 0, output_sequence: int = 0):
    """https://onnx.ai/onnx/operators/onnx__RNN.html"""
    return _recurrent("RNN", x, w, r, b, sequence_lens, initial_h, activation_alpha=activation_alpha,
                      activation_beta=activation_beta, activations=activations, clip=clip, direction=direction,
                      hidden_size=hidden_size, layout=layout)


@op("GRU", (1, 3, 7, 14, 22))
def gru(x, w, r, b=None, sequence_lens=None, initial_h=None, *, activation_alpha=None, activation_beta=None,
        activations=None, clip=None, direction: str = "forward", hidden_size: int | None = None,
        layout: int = 0, linear_before_reset: int = 0, output_sequence: int = 0):
    """https://onnx.ai/onnx/operators/onnx__GRU.html (gates z, r, h)."""
    return _recurrent("GRU", x, w, r, b, sequence_lens, initial_h, activation_alpha=activation_alpha,
                      activation_beta=activation_beta, activations=activations, clip=clip, direction=direction,
                      hidden_size=hidden_size, layout=layout, linear_before_reset=linear_before_reset)


@op("LSTM", (1, 7, 14, 22))
def lstm(x, w, r, b=None, sequence_lens=None, initial_h=None, initial_c=None, p=None, *, activation_alpha=None,
         activation_beta=None, activations=None, clip=None, direction: str = "forward",
         hidden_size: int | None = None, input_forget: int = 0, layout: int = 0, output_sequence: int = 0):
    """https://onnx.ai/onnx/operators/onnx__LSTM.html (gates i, o, f, c; peepholes P = [i, o, f])."""
    return _recurrent("LSTM", x, w, r, b, sequence_lens, initial_h, initial_c, p, activation_alpha=activation_alpha,
                      activation_beta=activation_beta, activations=activations, clip=clip, direction=direction,
                      hidden_size=hidden_size, layout=layout, input_forget=input_forget)
