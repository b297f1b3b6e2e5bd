"""The Model contract: signature, pure fn, compile cache, input errors, unsupported ops."""

from __future__ import annotations

import jax
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer import InputError, UnsupportedOpsError


def mlp_model(batch: int | str = "batch") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal((3,)).astype(np.float32), "b")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["hb"], name="add"),
        helper.make_node("Relu", ["hb"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def reference(x: np.ndarray, proto: onnx.ModelProto) -> np.ndarray:
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    return np.maximum(x @ inits["w"] + inits["b"], 0)


def test_signature_keeps_symbolic_dims():
    m = jaxinfer.load(mlp_model())
    assert m.inputs[0].name == "x"
    assert m.inputs[0].shape == ("batch", 4)
    assert m.inputs[0].dtype == np.float32
    assert m.outputs[0].shape == ("batch", 3)


def test_run_call_and_fn_agree():
    proto = mlp_model()
    m = jaxinfer.load(proto)
    x = np.random.default_rng(1).standard_normal((5, 4)).astype(np.float32)
    want = reference(x, proto)
    np.testing.assert_allclose(m.run({"x": x})["y"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m(x=x)["y"], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(m.fn(m.params, {"x": x})["y"]), want, rtol=1e-5, atol=1e-6)
    jitted = jax.jit(m.fn)(m.params, {"x": x})["y"]
    np.testing.assert_allclose(np.asarray(jitted), want, rtol=1e-5, atol=1e-6)


def test_fn_is_vmappable_and_weights_are_arguments():
    proto = mlp_model()
    m = jaxinfer.load(proto)
    assert set(m.params) == {"w", "b"}
    xs = np.random.default_rng(2).standard_normal((3, 2, 4)).astype(np.float32)
    ys = jax.vmap(lambda x: m.fn(m.params, {"x": x})["y"])(xs)
    np.testing.assert_allclose(np.asarray(ys), np.stack([reference(x, proto) for x in xs]), rtol=1e-5, atol=1e-6)
    # Weights never appear as constants in the compiled program: new params, new result, no retrace.
    m.run({"x": xs[0]})
    traces = m.stats.traces
    doubled = {k: v * 2 for k, v in m.params.items()}
    exe = m.compiled({"x": xs[0]})
    out = exe(doubled, {"x": xs[0]})["y"]
    assert m.stats.traces == traces
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    np.testing.assert_allclose(np.asarray(out), np.maximum(xs[0] @ (2 * inits["w"]) + 2 * inits["b"], 0), rtol=1e-5)


def test_compiles_once_per_shape_signature():
    m = jaxinfer.load(mlp_model())
    x2 = np.ones((2, 4), np.float32)
    m.run({"x": x2})
    m.run({"x": x2 + 1})
    assert m.stats.traces == 1 and m.stats.compiles == 1
    m.run({"x": np.ones((3, 4), np.float32)})
    assert m.stats.traces == 2 and m.stats.compiles == 2
    m.run({"x": x2})
    assert m.stats.traces == 2


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({}, "missing input"),
        ({"x": np.ones((2, 4), np.float32), "z": np.ones(1)}, "unknown input name"),
        ({"x": np.ones((2, 4), np.float64)}, "expected dtype float32, got float64"),
        ({"x": np.ones((2, 4, 1), np.float32)}, "expected rank 2"),
        ({"x": np.ones((2, 5), np.float32)}, "dim 1 must be 4"),
    ],
)
def test_input_errors_name_what_was_wrong(feeds, message):
    m = jaxinfer.load(mlp_model())
    with pytest.raises(InputError, match=message):
        m.run(feeds)
    # the model still works afterwards
    assert m.run({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 3)


def test_lists_are_converted_to_the_declared_dtype():
    m = jaxinfer.load(mlp_model())
    out = m.run({"x": [[1.0, 2.0, 3.0, 4.0]]})
    assert out["y"].dtype == np.float32


def test_symbolic_dims_must_agree_across_inputs():
    nodes = [helper.make_node("Add", ["a", "b"], ["c"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n"]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, ["n"])],
    )
    m = jaxinfer.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    with pytest.raises(InputError, match="'n'"):
        m.run({"a": np.ones(2, np.float32), "b": np.ones(3, np.float32)})


def test_all_unsupported_ops_reported_at_once():
    nodes = [
        helper.make_node("FancyOp", ["x"], ["a"], name="f1"),
        helper.make_node("FancyOp", ["a"], ["b"], name="f2"),
        helper.make_node("OtherOp", ["b"], ["y"], name="o1", domain="my.domain"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("my.domain", 1)])
    with pytest.raises(UnsupportedOpsError) as err:
        jaxinfer.load(proto)
    text = str(err.value)
    assert "FancyOp" in text and "f1" in text and "f2" in text
    assert "my.domain::OtherOp" in text and "o1" in text
    assert len(err.value.ops) == 2


def test_shape_arithmetic_folds_to_static_shapes():
    # Reshape to [Shape(x)[0], -1] built from Shape/Gather/Unsqueeze/Concat: must fold at trace time.
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero_axes"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus_one"], ["shape"], axis=0),
        helper.make_node("Reshape", ["x", "shape"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "zero_axes"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 6])], inits,
    )
    m = jaxinfer.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = np.arange(24, dtype=np.float32).reshape(4, 2, 3)
    np.testing.assert_array_equal(m.run({"x": x})["y"], x.reshape(4, 6))
    jaxpr = jax.make_jaxpr(m.fn)(m.params, {"x": x})
    assert "reshape" in str(jaxpr) and "gather" not in str(jaxpr)
    assert m.value_inputs == ()


def test_shape_input_from_graph_input_compiles_per_value():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [6]),
         helper.make_tensor_value_info("shape", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    m = jaxinfer.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert m.value_inputs == ("shape",)
    x = np.arange(6, dtype=np.float32)
    assert m.run({"x": x, "shape": np.array([2, 3])})["y"].shape == (2, 3)
    assert m.run({"x": x, "shape": np.array([3, 2])})["y"].shape == (3, 2)
    assert m.run({"x": x + 1, "shape": np.array([2, 3])})["y"].shape == (2, 3)
    assert m.stats.compiles == 2
    assert any("compiles once" in n for n in m.info()["notes"])


def test_load_passes_format_options_and_rejects_unknown_ones(tmp_path):
    proto = mlp_model()
    raw = jaxinfer.load(proto, optimize=False)
    opt = jaxinfer.load(proto)
    x = np.random.default_rng(1).standard_normal((2, 4)).astype(np.float32)
    assert len(raw.graph.nodes) > len(opt.graph.nodes)  # MatMul+Add fused only when optimizing
    np.testing.assert_allclose(raw.run({"x": x})["y"], opt.run({"x": x})["y"], rtol=1e-6)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['requant'\] for a onnx model"):
        jaxinfer.load(proto, requant="builtin")
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    assert jaxinfer.load(path, optimize=False).graph.nodes == raw.graph.nodes
    with pytest.raises(TypeError, match="not to a saved directory"):
        jaxinfer.load(tmp_path, optimize=False)


def test_arithmetic_scalars_are_constants_and_quantizer_scales_params():
    """pow(x, 3.0) sees its exponent at compile time (XLA makes it x*x*x, as in GPT-2's tanh GELU);
    a QuantizeLinear scale and a Div's divisor stay params (folded, XLA would multiply by a reciprocal)."""
    scalar = {n: numpy_helper.from_array(np.asarray(v, np.float32), n)
              for n, v in (("three", 3.0), ("half", 0.5), ("scale", 0.37), ("d", 7.0))}
    nodes = [
        helper.make_node("Pow", ["x", "three"], ["p"]),
        helper.make_node("Mul", ["p", "half"], ["y"]),
        helper.make_node("QuantizeLinear", ["x", "scale"], ["q"]),
        helper.make_node("Div", ["x", "d"], ["z"]),
    ]
    graph = helper.make_graph(
        nodes, "scalars", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64]),
         helper.make_tensor_value_info("q", TensorProto.UINT8, [64]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [64])], list(scalar.values()))
    m = jaxinfer.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert {"three", "half"} <= set(m._constants) and {"scale", "d"} <= set(m.params)
    x = np.linspace(-4, 4, 64, dtype=np.float32)
    out = m.run({"x": x})
    np.testing.assert_allclose(out["y"], 0.5 * x ** 3, rtol=1e-6)
    np.testing.assert_array_equal(out["q"], np.clip(np.round(x / np.float32(0.37)), 0, 255).astype(np.uint8))
    np.testing.assert_allclose(out["z"], x / np.float32(7.0), rtol=1e-6)
    hlo = m._fast_exe({"x": x}).as_text()
    assert " power(" not in hlo and " divide(" in hlo
