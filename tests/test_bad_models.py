"""Corrupt or hostile models and inputs get a clear jaxinfer error, never a crash or a silent answer."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer.errors import InputError, ModelLoadError, OpError

from .converters.tflite.builder import ModelBuilder


def _model(nodes, inputs, outputs, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _vi(name, dtype=TensorProto.FLOAT, shape=(2, 3)):
    return helper.make_tensor_value_info(name, dtype, shape)


@pytest.mark.parametrize("optimize", [True, False])
def test_huge_constant_shape_is_an_op_error_not_an_abort(optimize):
    """XLA aborts the process on a shape whose element count overflows int64; we refuse it first."""
    shape = numpy_helper.from_array(np.array([2**31, 2**31], np.int64), "s")
    proto = _model([helper.make_node("ConstantOfShape", ["s"], ["c"]), helper.make_node("Add", ["x", "c"], ["y"])],
                   [_vi("x")], [_vi("y", shape=None)], [shape])
    with pytest.raises(OpError, match=r"ConstantOfShape .* would have shape \[2147483648, 2147483648\]"):
        jaxinfer.load(proto, optimize=optimize).run({"x": np.ones((2, 3), np.float32)})


def test_two_producers_of_one_value_are_refused():
    proto = _model([helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["y"])],
                   [_vi("x")], [_vi("y")])
    with pytest.raises(ModelLoadError, match="value 'y' is written by Neg .* and already by Relu"):
        jaxinfer.load(proto)


def test_a_node_without_outputs_is_refused():
    proto = _model([helper.make_node("Relu", ["x"], []), helper.make_node("Neg", ["x"], ["y"])],
                   [_vi("x")], [_vi("y")])
    with pytest.raises(ModelLoadError, match="Relu node .* has no outputs"):
        jaxinfer.load(proto)


def test_missing_required_attributes_and_inputs_are_refused_at_load():
    """What the ONNX schema requires: a Loop without its body, an Add with one input."""
    loop = _model([helper.make_node("Loop", ["m", "", "x"], ["y"], name="loop")],
                  [_vi("m", TensorProto.INT64, ()), _vi("x")], [_vi("y")])
    with pytest.raises(ModelLoadError, match=r"Loop node 'loop': required attribute\(s\) \['body'\] missing"):
        jaxinfer.load(loop)
    add = _model([helper.make_node("Add", ["x"], ["y"], name="add")], [_vi("x")], [_vi("y")])
    with pytest.raises(ModelLoadError, match=r"Add node 'add' has 1 input\(s\); .* requires at least 2"):
        jaxinfer.load(add)


def test_contrib_op_without_a_required_attribute_names_it():
    """Contrib ops have no ONNX schema: the op's own signature says what it requires."""
    w = numpy_helper.from_array(np.zeros((8, 24), np.float32), "w")
    b = numpy_helper.from_array(np.zeros(24, np.float32), "b")
    graph = helper.make_graph([helper.make_node("Attention", ["x", "w", "b"], ["y"], name="att", domain="com.microsoft")],
                              "g", [_vi("x", shape=(1, 4, 8))], [_vi("y", shape=(1, 4, 8))], [w, b])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    with pytest.raises(OpError, match=r"Attention node 'att': required attribute\(s\) \['num_heads'\] missing"):
        jaxinfer.load(proto).run({"x": np.ones((1, 4, 8), np.float32)})


def test_model_proto_without_a_graph_is_refused():
    with pytest.raises(ModelLoadError, match="no graph"):
        jaxinfer.load(helper.make_model(helper.make_graph([], "g", [], [])).__class__())


def test_tflite_tensor_index_out_of_range_is_refused():
    b = ModelBuilder()
    x = b.input("x", (2, 3))
    y = b.tensor("y", (2, 3))
    b.op("RELU", [x], [y])
    b.const("c", np.full((2, 3), 7.0, np.float32))
    b.outputs(-1)  # Python would read the last tensor, the constant
    with pytest.raises(ModelLoadError, match="outputs name tensor index -1"):
        jaxinfer.load(b.finish())


@pytest.fixture(scope="module")
def typed():
    """y = Identity(x) for int64, uint8 and bool inputs, and a float32 input."""
    nodes = [helper.make_node("Identity", [n], [n + "_out"]) for n in ("i", "u", "b", "f")]
    ins = [_vi("i", TensorProto.INT64, [3]), _vi("u", TensorProto.UINT8, [3]), _vi("b", TensorProto.BOOL, [3]),
           _vi("f", TensorProto.FLOAT, [3])]
    outs = [_vi(n + "_out", t.type.tensor_type.elem_type, [3]) for n, t in zip("iubf", ins)]
    return jaxinfer.load(_model(nodes, ins, outs))


GOOD = {"i": np.zeros(3, np.int64), "u": np.zeros(3, np.uint8), "b": np.zeros(3, bool), "f": np.zeros(3, np.float32)}


@pytest.mark.parametrize("name,value,message", [
    ("i", [1.7, 2.2, -0.9], "cannot become int64 without changing them"),
    ("i", [2**70, 1, 2], "cannot become int64"),
    ("u", [-1, 300, 2], "outside uint8's range"),
    ("b", ["False", "0", ""], "cannot become bool"),
    ("f", None, "is None"),
    ("f", [[1.0], [2.0, 3.0]], "cannot convert"),
])
def test_list_inputs_are_converted_only_without_changing_values(typed, name, value, message):
    with pytest.raises(InputError, match=message):
        typed.run({**GOOD, name: value})


def test_list_inputs_that_fit_are_converted(typed):
    out = typed.run({"i": [1, 2, 3], "u": [0, 7, 255], "b": [True, False, True], "f": [1, 2.5, 3]})
    assert out["i_out"].dtype == np.int64 and out["u_out"].tolist() == [0, 7, 255]
    assert out["b_out"].tolist() == [True, False, True] and out["f_out"].dtype == np.float32


def test_byte_swapped_arrays_are_converted_and_non_dict_feeds_refused(typed):
    big = np.array([1.5, 2.5, 3.5], ">f4")
    np.testing.assert_array_equal(typed.run({**GOOD, "f": big})["f_out"], big.astype(np.float32))
    for feeds in ([GOOD["f"]], GOOD["f"]):
        with pytest.raises(InputError, match="must be a dict"):
            typed.run(feeds)
