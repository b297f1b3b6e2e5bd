"""Sequence builtins (LSTM, bidirectional LSTM, RNN, SVDF) vs LiteRT over consecutive calls.

Their state inputs are variable tensors, which LiteRT carries from one invoke to
the next: every case runs 3 steps on one interpreter / one Model.
"""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer.converters.tflite import load_tflite

from .builder import ACT, ModelBuilder
from .harness import compare

RNG = np.random.default_rng(7)
F = np.float32


def w(*shape, scale=0.4):
    return (RNG.standard_normal(shape) * scale).astype(F)


def steps(name, shape, n=3):
    return [{name: RNG.uniform(-1, 1, shape).astype(F)} for _ in range(n)]


def lstm_inputs(b: ModelBuilder, prefix: str, n_in: int, n_cell: int, n_out: int, *, cifg=False, peephole=False,
                projection=False, layer_norm=False):
    """The 16 weight slots (1..17 of the unidirectional layout) and, with layer norm, the 4 coefficients."""
    gates = "ifco"
    iw = [-1 if (cifg and g == "i") else b.const(f"{prefix}w{g}", w(n_cell, n_in)) for g in gates]
    rw = [-1 if (cifg and g == "i") else b.const(f"{prefix}r{g}", w(n_cell, n_out)) for g in gates]
    peep = [-1 if (not peephole or (cifg and g == "i")) else b.const(f"{prefix}p{g}", w(n_cell)) for g in "ifo"]
    bias = [-1 if (cifg and g == "i") else b.const(f"{prefix}b{g}", w(n_cell, scale=0.2) + (1.0 if g == "f" else 0.0))
            for g in gates]
    proj = [b.const(f"{prefix}pw", w(n_out, n_cell)), b.const(f"{prefix}pb", w(n_out, scale=0.1))] if projection \
        else [-1, -1]
    ln = [-1 if (cifg and g == "i") else b.const(f"{prefix}ln{g}", 1.0 + w(n_cell, scale=0.1)) for g in gates] \
        if layer_norm else None
    return iw + rw + peep + bias + proj, ln


LSTM_CASES = {
    "basic": {},
    "cifg_peephole": {"cifg": True, "peephole": True},
    "projection_clip": {"projection": True, "cell_clip": 1.5, "proj_clip": 0.8},
    "layer_norm": {"layer_norm": True, "peephole": True},
    "time_major_relu": {"time_major": True, "act": "RELU"},
}


def uni_lstm_model(weights_fn, case: dict, *, batch: int, t: int, n_in: int, n_cell: int,
                   n_proj: int) -> tuple[bytes, tuple[int, ...]]:
    """A one-op UNIDIRECTIONAL_SEQUENCE_LSTM model for ``case`` (its options and ``weights_fn``'s
    flags), weights from ``weights_fn`` (float here, int8 in the hybrid tests); returns (model, input shape)."""
    cfg = dict(case)
    time_major = cfg.pop("time_major", False)
    act = cfg.pop("act", "TANH")
    asymmetric = cfg.pop("asymmetric", False)
    cell_clip, proj_clip = cfg.pop("cell_clip", 0.0), cfg.pop("proj_clip", 0.0)
    n_out = n_proj if cfg.get("projection") else n_cell
    b = ModelBuilder()
    shape = (t, batch, n_in) if time_major else (batch, t, n_in)
    x = b.input("x", shape)
    weights, ln = weights_fn(b, "", n_in, n_cell, n_out, **cfg)
    h = b.tensor("h", (batch, n_out), variable=True)
    c = b.tensor("c", (batch, n_cell), variable=True)
    y = b.tensor("y", shape[:2] + (n_out,))
    b.op("UNIDIRECTIONAL_SEQUENCE_LSTM", [x] + weights + [h, c] + (ln or []), [y],
         "UnidirectionalSequenceLSTMOptions", fused_activation_function=ACT[act], cell_clip=cell_clip,
         proj_clip=proj_clip, time_major=time_major, asymmetric_quantize_inputs=asymmetric)
    b.outputs(y)
    return b.finish(), shape


@pytest.mark.parametrize("case", sorted(LSTM_CASES))
def test_unidirectional_sequence_lstm(case):
    data, shape = uni_lstm_model(lstm_inputs, LSTM_CASES[case], batch=2, t=5, n_in=3, n_cell=4, n_proj=3)
    compare(data, steps("x", shape))


@pytest.mark.parametrize("merge", [False, True])
def test_bidirectional_sequence_lstm(merge):
    batch, t, n_in, n_cell = 2, 4, 3, 5
    b = ModelBuilder()
    x = b.input("x", (t, batch, n_in))
    fw, _ = lstm_inputs(b, "f", n_in, n_cell, n_cell, peephole=True)
    bw, _ = lstm_inputs(b, "b", n_in, n_cell, n_cell, cifg=True)
    states = [b.tensor(n, (batch, n_cell), variable=True) for n in ("fh", "fc", "bh", "bc")]
    if merge:
        outs = [b.tensor("y", (t, batch, 2 * n_cell))]
    else:
        outs = [b.tensor("yf", (t, batch, n_cell)), b.tensor("yb", (t, batch, n_cell))]
    b.op("BIDIRECTIONAL_SEQUENCE_LSTM", [x] + fw + bw + states + [-1] * 9, outs, "BidirectionalSequenceLSTMOptions",
         fused_activation_function=ACT["TANH"], merge_outputs=merge, time_major=True)
    b.outputs(*outs)
    compare(b.finish(), steps("x", (t, batch, n_in)))


@pytest.mark.parametrize("time_major,act", [(False, "TANH"), (True, "RELU")])
def test_unidirectional_sequence_rnn(time_major, act):
    batch, t, n_in, units = 2, 6, 4, 5
    shape = (t, batch, n_in) if time_major else (batch, t, n_in)
    b = ModelBuilder()
    x = b.input("x", shape)
    ins = [x, b.const("w", w(units, n_in)), b.const("r", w(units, units, scale=0.3)), b.const("b", w(units)),
           b.tensor("h", (batch, units), variable=True)]
    y = b.tensor("y", shape[:2] + (units,))
    b.op("UNIDIRECTIONAL_SEQUENCE_RNN", ins, [y], "SequenceRNNOptions", time_major=time_major,
         fused_activation_function=ACT[act])
    b.outputs(y)
    compare(b.finish(), steps("x", shape))


@pytest.mark.parametrize("rank,bias", [(1, True), (2, False)])
def test_svdf(rank, bias):
    batch, n_in, units, memory = 2, 5, 3, 4
    filters = units * rank
    b = ModelBuilder()
    x = b.input("x", (batch, n_in))
    ins = [x, b.const("wf", w(filters, n_in)), b.const("wt", w(filters, memory)),
           b.const("b", w(units)) if bias else -1, b.tensor("s", (batch, filters * memory), variable=True)]
    y = b.tensor("y", (batch, units))
    b.op("SVDF", ins, [y], "SVDFOptions", rank=rank, fused_activation_function=ACT["RELU"])
    b.outputs(y)
    compare(b.finish(), steps("x", (batch, n_in), n=5))


def test_lstm_state_resets():
    """Model.reset_state() puts the variable tensors back to zeros: the first step repeats exactly."""
    batch, t, n_in, units = 1, 3, 2, 3
    b = ModelBuilder()
    x = b.input("x", (batch, t, n_in))
    ins = [x, b.const("w", w(units, n_in)), b.const("r", w(units, units)), b.const("b", w(units)),
           b.tensor("h", (batch, units), variable=True)]
    y = b.tensor("y", (batch, t, units))
    b.op("UNIDIRECTIONAL_SEQUENCE_RNN", ins, [y], "SequenceRNNOptions", fused_activation_function=ACT["TANH"])
    b.outputs(y)
    m = load_tflite(b.finish())
    assert m.stateful
    feed = {"x": np.ones((batch, t, n_in), F)}
    first = np.asarray(m.run(feed)["y"])
    second = np.asarray(m.run(feed)["y"])
    assert not np.allclose(first, second)
    m.reset_state()
    np.testing.assert_array_equal(np.asarray(m.run(feed)["y"]), first)
