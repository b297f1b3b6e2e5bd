"""Focused checks of the elementwise, cast and activation ops where the backend suite is thin.

Each graph is one node built with ``onnx.helper``; results are compared with
onnxruntime where it implements the op at that opset, else with the spec's
stated values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from jaxinfer.converters.onnx import load_onnx

from .oracle import run_ort as _ort
from .oracle import run_ours as _run

F = TensorProto.FLOAT


def _model(op: str, inputs: dict[str, np.ndarray], n_out: int = 1, opset: int = 21, **attrs: Any) -> onnx.ModelProto:
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, list(inputs), outs, **attrs)
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in inputs.items()]
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
    graph = helper.make_graph([node], op.lower(), ins, outputs)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _same(ours: Sequence[np.ndarray], ref: Sequence[np.ndarray], rtol: float = 1e-5) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        assert a.shape == b.shape, (a.shape, b.shape)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6)


RNG = np.random.default_rng(0)


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("op,opset,attrs", [
    ("Gelu", 20, {"approximate": "tanh"}),
    ("Gelu", 20, {}),
    ("Celu", 12, {"alpha": 2.0}),
    ("Softplus", 21, {}),
    ("Mish", 21, {}),
    ("HardSwish", 21, {}),
    ("Shrink", 21, {"bias": 0.3, "lambd": 0.7}),
    ("ThresholdedRelu", 21, {"alpha": 0.4}),
    ("Softmax", 11, {"axis": 1}),
    ("LogSoftmax", 11, {"axis": 2}),
    ("Hardmax", 11, {"axis": 1}),
    ("Softmax", 13, {"axis": 1}),
    ("LogSoftmax", 13, {"axis": -2}),
])
def test_activation_matches_onnxruntime(op: str, opset: int, attrs: dict[str, Any]) -> None:
    x = {"x": _randn(2, 3, 4) * 3}
    model = _model(op, x, opset=opset, **attrs)
    _same(_run(model, x), _ort(model, x))


def test_hardmax_picks_first_of_ties() -> None:
    x = {"x": np.array([[1, 3, 3, 0], [2, 2, 2, 2]], np.float32)}
    model = _model("Hardmax", x, opset=13, axis=-1)
    _same(_run(model, x), _ort(model, x))
    np.testing.assert_array_equal(_run(model, x)[0], [[0, 1, 0, 0], [1, 0, 0, 0]])


def test_prelu_slope_broadcasts() -> None:
    x = {"x": _randn(2, 3, 4, 5), "slope": np.array([0.1, 0.2, 0.3], np.float32).reshape(3, 1, 1)}
    model = _model("PRelu", x, opset=16)
    _same(_run(model, x), _ort(model, x))


def test_variadic_max_min_mean_sum_broadcast() -> None:
    x = {"a": _randn(3, 1, 4), "b": _randn(1, 2, 1), "c": _randn(4)}
    for op in ("Max", "Min", "Mean", "Sum"):
        model = _model(op, x, opset=13)
        _same(_run(model, x), _ort(model, x))


def test_pow_keeps_base_type() -> None:
    x = {"x": np.array([1, 2, 3, 4], np.int32), "y": np.array([2.0, 0.5, 3.0, 1.0], np.float32)}
    model = _model("Pow", x, opset=15)
    _same(_run(model, x), _ort(model, x))


def test_mod_float_floor_mode_follows_divisor_sign() -> None:
    x = {"a": np.array([5.5, -5.5, 5.5, -0.0, 3.0], np.float32),
         "b": np.array([2.0, 2.0, -2.0, 2.0, -np.inf], np.float32)}
    (out,) = _run(_model("Mod", x, opset=28), x)
    np.testing.assert_array_equal(out, np.array([1.5, 0.5, -0.5, 0.0, -np.inf], np.float32))
    assert not np.signbit(out[3])


def test_integer_div_and_mod_truncate_and_floor() -> None:
    x = {"a": np.array([7, -7, 7, -7], np.int32), "b": np.array([2, 2, -2, -2], np.int32)}
    _same(_run(_model("Div", x, opset=14), x), _ort(_model("Div", x, opset=14), x))
    model = _model("Mod", x, opset=13, fmod=1)
    _same(_run(model, x), _ort(model, x))


def test_legacy_broadcast_attribute() -> None:
    x = {"a": _randn(2, 3, 4, 5), "b": _randn(3, 4)}
    (out,) = _run(_model("Add", x, opset=6, broadcast=1, axis=1), x)
    np.testing.assert_allclose(out, x["a"] + x["b"][None, :, :, None], rtol=1e-6)


def test_clip_attribute_form_and_omitted_bounds() -> None:
    x = {"x": _randn(3, 4) * 3}
    model = _model("Clip", x, opset=6, min=-1.0, max=0.5)
    _same(_run(model, x), _ort(model, x))
    x_min = {"x": np.array([-5, 0, 5], np.int8), "lo": np.array(-2, np.int8)}
    model = _model("Clip", x_min, opset=13)
    _same(_run(model, x_min), _ort(model, x_min))


def test_bitshift_signed_spec_cases() -> None:
    x = {"x": np.array([-16, -16, 16, 1, -1, 5], np.int32), "y": np.array([2, 40, 40, 31, -1, 33], np.int32)}
    (right,) = _run(_model("BitShift", x, opset=28, direction="RIGHT"), x)
    np.testing.assert_array_equal(right, [-4, -1, 0, 0, -1, 0])
    (left,) = _run(_model("BitShift", x, opset=28, direction="LEFT"), x)
    np.testing.assert_array_equal(left, [-64, 0, 0, np.int32(-2**31), 0, 0])


def test_bitshift_unsigned_matches_onnxruntime() -> None:
    x = {"x": np.array([16, 255, 1], np.uint8), "y": np.array([2, 1, 7], np.uint8)}
    for d in ("LEFT", "RIGHT"):
        model = _model("BitShift", x, opset=11, direction=d)
        _same(_run(model, x), _ort(model, x))


def test_cast_fixed_point_discards_high_bits() -> None:
    x = {"x": np.array([200, -200, 127, 256], np.int16)}
    model = _model("Cast", x, opset=21, to=TensorProto.INT8)
    _same(_run(model, x), _ort(model, x))


def test_cast_to_float8_saturates_from_any_type() -> None:
    x = {"x": np.array([1000, -1000, 3, 0], np.int32)}
    (out,) = _run(_model("Cast", x, opset=21, to=TensorProto.FLOAT8E4M3FN), x)
    np.testing.assert_array_equal(out.astype(np.float32), [448, -448, 3, 0])
    x = {"x": np.array([1e6, -np.inf, np.nan, 0.3], np.float64)}
    (out,) = _run(_model("Cast", x, opset=21, to=TensorProto.FLOAT8E5M2), x)
    ref = np.clip(x["x"], -57344, 57344).astype(ml_dtypes.float8_e5m2)
    nan = np.isnan(ref.astype(np.float32))  # e5m2 has several NaN encodings; XLA GPU picks another one
    np.testing.assert_array_equal(out.view(np.uint8)[~nan], ref.view(np.uint8)[~nan])
    assert np.isnan(out.astype(np.float32)[nan]).all()
    (out,) = _run(_model("Cast", x, opset=21, to=TensorProto.FLOAT8E5M2, saturate=0), x)
    assert np.isinf(out.astype(np.float32)[:2]).all()


def test_cast_strings_both_ways() -> None:
    s = {"x": np.array(["1e-5", "+INF", "-inf", "NaN", "2.5"], dtype=object)}
    (out,) = _run(_model("Cast", s, opset=21, to=TensorProto.FLOAT), s)
    np.testing.assert_array_equal(out, np.array([1e-5, np.inf, -np.inf, np.nan, 2.5], np.float32))
    nodes = [helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", F, [2], [1.5, -2.0])),
             helper.make_node("Cast", ["c"], ["y0"], to=TensorProto.STRING)]
    graph = helper.make_graph(nodes, "g", [], [helper.make_value_info("y0", onnx.TypeProto())])
    (out,) = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), {})
    assert out.dtype == object and list(out) == ["1.5", "-2.0"]
    n = {"x": np.array([1.5, -2.0], np.float32)}
    with pytest.raises(Exception, match="STRING needs its input's value at trace time"):
        _run(_model("Cast", n, opset=21, to=TensorProto.STRING), n)


def test_string_equal_and_where() -> None:
    x = {"a": np.array(["x", "y", "z"], dtype=object), "b": np.array(["x", "q", "z"], dtype=object)}
    _same(_run(_model("Equal", x, opset=19), x), _ort(_model("Equal", x, opset=19), x))
    cond = helper.make_tensor("v", TensorProto.BOOL, [3], [True, False, True])
    nodes = [helper.make_node("Constant", [], ["c"], value=cond), helper.make_node("Where", ["c", "a", "b"], ["y0"])]
    ins = [helper.make_tensor_value_info(k, TensorProto.STRING, [3]) for k in x]
    graph = helper.make_graph(nodes, "g", ins, [helper.make_value_info("y0", onnx.TypeProto())])
    (out,) = _run(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)]), x)
    assert list(out) == ["x", "q", "z"]
    w = {"c": np.array([True, False, True]), **x}
    with pytest.raises(Exception, match="condition's value at trace time"):
        _run(_model("Where", w, opset=16), w)


def test_bitcast_roundtrip() -> None:
    x = {"x": np.array([1.0, -2.5, np.inf], np.float32)}
    (out,) = _run(_model("BitCast", x, opset=26, to=TensorProto.INT32), x)
    np.testing.assert_array_equal(out, x["x"].view(np.int32))
    with pytest.raises(Exception, match="equal bit widths"):
        _run(_model("BitCast", x, opset=26, to=TensorProto.INT64), x)


def test_dropout_training_mode() -> None:
    x = {"x": _randn(4, 50), "r": np.array(0.5, np.float32), "t": np.array(True)}
    model = _model("Dropout", x, n_out=2, opset=13, seed=3)
    y, mask = _run(model, x)
    assert mask.dtype == np.bool_ and 0 < mask.mean() < 1
    np.testing.assert_allclose(y, np.where(mask, x["x"] * 2, 0), rtol=1e-6)
    y2, mask2 = _run(model, x)
    np.testing.assert_array_equal(mask, mask2)
    zero = {**x, "r": np.array(0.0, np.float32)}
    y0, m0 = _run(model, zero)
    np.testing.assert_array_equal(y0, x["x"])
    assert m0.all()
    with pytest.raises(Exception, match="seed"):
        _run(_model("Dropout", x, n_out=2, opset=13), x)


def test_ops_trace_under_jit() -> None:
    x = {"x": _randn(3, 4)}
    m = load_onnx(_model("Gelu", x, opset=20, approximate="tanh"))
    out = jax.jit(m.fn)(m.params, x)
    assert out["y0"].shape == (3, 4)
