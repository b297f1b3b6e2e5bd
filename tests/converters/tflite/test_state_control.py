"""Resource variables (CALL_ONCE init + READ/ASSIGN_VARIABLE) as state, WHILE/IF, signatures, load errors."""

from __future__ import annotations

import numpy as np
import pytest

import jaxinfer
from jaxinfer.converters.tflite import load_tflite

from .builder import ModelBuilder, accumulator_model
from .harness import compare

RNG = np.random.default_rng(2)


def test_resource_variables_are_state_step_by_step():
    data = accumulator_model((1, 4), 0.5)
    steps = [{"x": RNG.standard_normal((1, 4)).astype(np.float32)} for _ in range(4)]
    compare(data, steps)
    m = load_tflite(data)
    assert m.stateful
    first = m.run(steps[0])["s"]
    m.reset_state()
    np.testing.assert_allclose(m.run(steps[0])["s"], first)


def test_while_loop():
    b = ModelBuilder()
    i = b.input("i", (), np.int32)
    x = b.input("x", (3,))
    i_out, x_out = b.tensor("i_out", (), np.int32), b.tensor("x_out", (3,))
    b.op("WHILE", [i, x], [i_out, x_out], "WhileOptions", cond_subgraph_index=1, body_subgraph_index=2)
    b.outputs(i_out, x_out)
    b.subgraph("cond")
    ci, cx = b.input("i", (), np.int32), b.input("x", (3,))
    lim = b.const("limit", np.array(5, np.int32))
    c = b.tensor("c", (), np.bool_)
    b.op("LESS", [ci, lim], [c])
    b.outputs(c)
    b.subgraph("body")
    bi, bx = b.input("i", (), np.int32), b.input("x", (3,))
    one = b.const("one", np.array(1, np.int32))
    two = b.const("two", np.full((3,), 1.5, np.float32))
    ni, nx = b.tensor("ni", (), np.int32), b.tensor("nx", (3,))
    b.op("ADD", [bi, one], [ni], "AddOptions", fused_activation_function=0)
    b.op("MUL", [bx, two], [nx], "MulOptions", fused_activation_function=0)
    b.outputs(ni, nx)
    data = b.finish()
    for start in (0, 3, 7):
        compare(data, {"i": np.array(start, np.int32), "x": RNG.standard_normal(3).astype(np.float32)})


def test_if():
    b = ModelBuilder()
    p = b.input("p", (), np.bool_)
    x = b.input("x", (3,))
    y = b.tensor("y", (3,))
    b.op("IF", [p, x], [y], "IfOptions", then_subgraph_index=1, else_subgraph_index=2)
    b.outputs(y)
    for name, op in (("then", "EXP"), ("else", "NEG")):
        b.subgraph(name)
        sx = b.input("x", (3,))
        sy = b.tensor("y", (3,))
        b.op(op, [sx], [sy])
        b.outputs(sy)
    data = b.finish()
    for pv in (True, False):
        compare(data, {"p": np.array(pv), "x": RNG.standard_normal(3).astype(np.float32)})


def test_signature_names_inputs_and_outputs():
    b = ModelBuilder()
    x = b.input("serving_default_x:0", (2, 3))
    y = b.tensor("StatefulPartitionedCall:0", (2, 3))
    b.op("TANH", [x], [y])
    b.outputs(y)
    b.sign({"image": x}, {"probs": y})
    m = load_tflite(b.finish())
    assert [s.name for s in m.inputs] == ["image"] and [s.name for s in m.outputs] == ["probs"]
    xv = RNG.standard_normal((2, 3)).astype(np.float32)
    np.testing.assert_allclose(m.run({"image": xv})["probs"], np.tanh(xv), rtol=1e-6)


def test_unsupported_and_custom_ops_reported_at_once():
    b = ModelBuilder()
    x = b.input("x", (4,))
    y, z = b.tensor("y", (4,)), b.tensor("z", (4,))
    b.custom("MyFancyOp", [x], [y])
    b.op("HASHTABLE_LOOKUP", [y], [z])
    b.outputs(z)
    with pytest.raises(jaxinfer.UnsupportedOpsError) as e:
        load_tflite(b.finish())
    assert "MyFancyOp" in str(e.value) and "HASHTABLE_LOOKUP" in str(e.value)


def test_corrupt_file_raises_model_load_error():
    with pytest.raises(jaxinfer.ModelLoadError):
        load_tflite(b"\x00\x00\x00\x00TFL3" + b"\xff" * 40)
    with pytest.raises(jaxinfer.ModelLoadError):
        load_tflite(b"not a model at all")
