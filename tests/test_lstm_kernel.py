"""cpu_kernels.f32_lstm, a whole float32 LSTM layer in one kernel call: it matches a float64 reference of the
LSTM equations to float32 accuracy for odd sizes (cell counts and inputs that are not multiples of 16, one
step, several batch rows, reverse, time- and batch-major, a cell clip), keeps NaN, answers as the XLA
composition does (the TFLite converter's scan), takes that composition under vmap and past LSTM_MAX_ROWS,
and rejects operands of the wrong shape with a message naming them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import cpu_kernels

AVX512 = cpu_kernels.available() and cpu_kernels.isa() == 2
needs_kernels = pytest.mark.skipif(not AVX512, reason="the LSTM kernel needs AVX-512")


def _operands(rng, t, b, i, n, time_major):
    x = rng.standard_normal((t, b, i) if time_major else (b, t, i)).astype(np.float32)
    ws = [(rng.standard_normal((n, i)) * 0.3).astype(np.float32) for _ in range(4)]
    rs = [(rng.standard_normal((n, n)) * 0.3).astype(np.float32) for _ in range(4)]
    bs = [(rng.standard_normal(n) * 0.5).astype(np.float32) for _ in range(4)]
    h0 = rng.standard_normal((b, n)).astype(np.float32)
    c0 = rng.standard_normal((b, n)).astype(np.float32)
    return x, ws, rs, bs, h0, c0


def _reference(x, ws, rs, bs, h0, c0, time_major, reverse, clip):
    """The LSTM equations in float64: gates i, f, c, o; tanh; c clipped to +-clip when clip > 0."""
    def sig(v):
        return 1 / (1 + np.exp(-v))

    xt = x.astype(np.float64) if time_major else np.swapaxes(x, 0, 1).astype(np.float64)
    h, c = h0.astype(np.float64), c0.astype(np.float64)
    ys = np.zeros(xt.shape[:2] + (h.shape[1],))
    steps = range(xt.shape[0] - 1, -1, -1) if reverse else range(xt.shape[0])
    for t in steps:
        g = [xt[t] @ w.T.astype(np.float64) + h @ r.T.astype(np.float64) + b for w, r, b in zip(ws, rs, bs)]
        c = c * sig(g[1]) + sig(g[0]) * np.tanh(g[2])
        if clip > 0:
            c = np.clip(c, -clip, clip)
        h = sig(g[3]) * np.tanh(c)
        ys[t] = h
    return (ys if time_major else np.swapaxes(ys, 0, 1)), h, c


def _composition(time_major, reverse, clip):
    """The XLA route: the LSTM equations in jnp, as `otherwise`."""
    def run(x, *ops):
        ws, rs, bs, h0, c0 = ops[0:4], ops[4:8], ops[8:12], ops[12], ops[13]
        xt = x if time_major else jnp.swapaxes(x, 0, 1)

        def step(carry, xs):
            h, c = carry
            g = [xs @ w.T + h @ r.T + b for w, r, b in zip(ws, rs, bs)]
            c = c * jax.nn.sigmoid(g[1]) + jax.nn.sigmoid(g[0]) * jnp.tanh(g[2])
            if clip > 0:
                c = jnp.clip(c, -clip, clip)
            h = jax.nn.sigmoid(g[3]) * jnp.tanh(c)
            return (h, c), h

        (h, c), ys = jax.lax.scan(step, (h0, c0), xt, reverse=reverse)
        return (ys if time_major else jnp.swapaxes(ys, 0, 1)), h, c
    return run


def _kernel(ops, time_major, reverse, clip):
    x, ws, rs, bs, h0, c0 = ops
    return jax.jit(lambda x, ws, rs, bs, h0, c0: cpu_kernels.f32_lstm(
        x, ws, rs, bs, h0, c0, time_major=time_major, reverse=reverse, cell_clip=clip,
        otherwise=_composition(time_major, reverse, clip)))(x, ws, rs, bs, h0, c0)


@needs_kernels
@pytest.mark.parametrize("t,b,i,n", [(10, 1, 40, 64), (1, 1, 3, 1), (7, 3, 17, 20), (4, 4, 64, 33), (3, 2, 1, 16)])
@pytest.mark.parametrize("time_major", [True, False])
@pytest.mark.parametrize("reverse,clip", [(False, 0.0), (True, 0.0), (False, 0.7)])
def test_matches_the_equations(t, b, i, n, time_major, reverse, clip):
    ops = _operands(np.random.default_rng(t * 100 + n), t, b, i, n, time_major)
    got = _kernel(ops, time_major, reverse, clip)
    want = _reference(*ops, time_major, reverse, clip)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-6)
    xla = jax.jit(_composition(time_major, reverse, clip))(ops[0], *ops[1], *ops[2], *ops[3], ops[4], ops[5])
    for g, w in zip(got, xla):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-6)


@needs_kernels
def test_saturating_gates_and_nan():
    """Large pre-activations saturate to exactly 0 / +-1 as tanh and sigmoid do; a NaN input stays NaN in its
    batch row only."""
    ops = list(_operands(np.random.default_rng(0), 3, 2, 8, 16, True))
    ops[0] = ops[0] * 1e4
    ops[0][1, 1, 0] = np.nan
    ys, h, c = (np.asarray(v) for v in _kernel(tuple(ops), True, False, 0.0))
    assert np.isnan(ys[1:, 1]).all() and np.isnan(h[1]).all()
    assert np.isfinite(ys[:, 0]).all() and np.isfinite(ys[0]).all()
    assert np.all(np.abs(ys[:, 0]) <= 1.0)
    want = _reference(*ops[:1], *ops[1:], True, False, 0.0)[0]
    np.testing.assert_allclose(ys[:, 0], want[:, 0], rtol=2e-5, atol=2e-6)


@needs_kernels
def test_vmap_and_many_rows_take_the_composition():
    """Under vmap the XLA composition runs per member; past LSTM_MAX_ROWS batch rows too (same answers)."""
    rows = cpu_kernels.LSTM_MAX_ROWS + 1
    x, ws, rs, bs, h0, c0 = _operands(np.random.default_rng(1), 4, rows, 8, 16, True)
    got = _kernel((x, ws, rs, bs, h0, c0), True, False, 0.0)
    np.testing.assert_allclose(np.asarray(got[0]), _reference(x, ws, rs, bs, h0, c0, True, False, 0.0)[0],
                               rtol=2e-5, atol=2e-6)
    stacked = jnp.stack([x, x * 0.5])
    fn = jax.vmap(lambda x: cpu_kernels.f32_lstm(x, ws, rs, bs, h0, c0, time_major=True, reverse=False,
                                                 cell_clip=0.0, otherwise=_composition(True, False, 0.0))[0])
    out = np.asarray(jax.jit(fn)(stacked))
    for k, xs in enumerate((x, x * 0.5)):
        np.testing.assert_allclose(out[k], _reference(xs, ws, rs, bs, h0, c0, True, False, 0.0)[0],
                                   rtol=2e-5, atol=2e-6)


def test_wrong_shapes_are_named():
    x, ws, rs, bs, h0, c0 = _operands(np.random.default_rng(2), 2, 1, 8, 16, True)
    with pytest.raises(ValueError, match="four r"):
        cpu_kernels.f32_lstm(x, ws, [r[:, :8] for r in rs], bs, h0, c0, time_major=True, reverse=False,
                             cell_clip=0.0, otherwise=_composition(True, False, 0.0))
    with pytest.raises(ValueError, match="h0 and c0"):
        cpu_kernels.f32_lstm(x, ws, rs, bs, h0[:, :4], c0, time_major=True, reverse=False, cell_clip=0.0,
                             otherwise=_composition(True, False, 0.0))
