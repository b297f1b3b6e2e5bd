"""Misused quantize arguments and unusable calibration data get errors naming them, never a wrong model."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer import arith
from jaxinfer.quant.calibrate import CalibrationError, Observer, act_scales
from jaxinfer.quant.facade import ManagedModel

from .conftest import D


@pytest.mark.parametrize("where", ["input", "model"])
@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_non_finite_calibration_is_refused(encoder, calib, where, bad):
    batches = [dict(b) for b in calib]
    if where == "input":
        x = batches[1]["x"].copy()
        x[0, 0, 0] = bad
        batches[1] = {**batches[1], "x": x}
        match = r"calibration batch 1, input 'x': 1 non-finite"
    else:  # finite inputs whose values overflow inside the model
        batches[2] = {**batches[2], "x": np.full_like(batches[2]["x"], 3e38)}
        match = "calibration batch 2: the model's value .* holds inf/nan"
    with pytest.raises(CalibrationError, match=match):
        jaxinfer.quantize(encoder, "int8-static", calibration=batches)


@pytest.mark.parametrize("calibration,match", [
    ("/data/calib", "is a path"),
    ([np.zeros((2, 8, D), np.float32)], "batch 0 is a ndarray; expected a dict"),
])
def test_calibration_in_another_layout_is_refused(encoder, calibration, match):
    with pytest.raises(CalibrationError, match=match):
        jaxinfer.quantize(encoder, "int8-static", calibration=calibration)


def test_argument_misuse_is_named(encoder, calib):
    with pytest.raises(TypeError, match="takes a jaxinfer Model"):
        jaxinfer.quantize("model.onnx", "int8-dynamic")
    with pytest.raises(TypeError, match="exclude must hold glob strings"):
        jaxinfer.quantize(encoder, "int8-dynamic", exclude=[1])
    with pytest.raises(ValueError, match="budget 'cosine' must be a number"):
        jaxinfer.quantize(encoder, "auto", calibration=calib, budget={"cosine": "high"})
    q = jaxinfer.quantize(encoder, "int8-dynamic", exclude=None)  # None: nothing excluded
    with pytest.raises(ValueError, match="quantized already .*int8-dynamic"):
        jaxinfer.quantize(q, "int8-weight")


# --- the tester's cases on the exported CNN, the facade and prune ------------------------------------------

CNN = Path(__file__).resolve().parents[1] / "fixtures" / "onnx" / "cnn.onnx"


@pytest.fixture(scope="module")
def cnn():
    return jaxinfer.load(CNN)


@pytest.fixture(scope="module")
def cnn_calib():
    rng = np.random.default_rng(1)
    return [{"x": rng.standard_normal((1, 3, 32, 32)).astype(np.float32)} for _ in range(4)]


@pytest.mark.parametrize("bad", [np.inf, -np.inf, np.nan])
def test_one_non_finite_pixel_in_cnn_calibration_is_refused(cnn, cnn_calib, bad):
    batches = [dict(b) for b in cnn_calib]
    x = batches[3]["x"].copy()
    x[0, 0, 0, 0] = bad
    batches[3] = {"x": x}
    with pytest.raises(CalibrationError, match=r"calibration batch 3, input 'x': 1 non-finite value\(s\) \(inf/nan\); "
                                               "calibration data must be finite"):
        jaxinfer.quantize(cnn, "int8-static", calibration=batches, measure=False)


def test_finite_cnn_calibration_gives_finite_scales(cnn, cnn_calib):
    q = jaxinfer.quantize(cnn, "int8-static", calibration=cnn_calib, measure=False)
    scales = [float(np.max(v.act_scale)) for v in q.params.values() if isinstance(v, arith.W8A8)]
    assert scales and all(np.isfinite(s) and s > 0 for s in scales)


def _overflowing_model() -> bytes:
    """x -> Mul by 1e30 -> MatMul 'fc': finite inputs near 1e10 overflow to inf before 'fc'."""
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "w")
    big = numpy_helper.from_array(np.array(1e30, np.float32), "big")
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "big"], ["h"], name="scale"),
         helper.make_node("MatMul", ["h", "w"], ["y"], name="fc")],
        "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], initializer=[w, big])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def test_overflow_inside_the_model_names_the_layer():
    m = jaxinfer.load(_overflowing_model())
    ok = {"x": np.ones((2, 4), np.float32)}
    jaxinfer.quantize(m, "int8-static", calibration=[ok], measure=False)  # finite ranges: fine
    with pytest.raises(CalibrationError, match=r"calibration batch 1: the model's value 'h' \(input of layer 'fc'\) "
                                               "holds inf/nan"):
        jaxinfer.quantize(m, "int8-static", calibration=[ok, {"x": np.full((2, 4), 1e10, np.float32)}],
                          measure=False)


def test_non_finite_observed_range_never_becomes_a_scale():
    o = Observer(np.random.default_rng(0))
    o.update(np.array([1e300]))  # finite float64, inf once held as float32
    with pytest.raises(CalibrationError, match=r"value 'h' \(input of layer 'fc'\) gave int8 activation scale inf"):
        act_scales({"h": o}, "minmax", readers={"h": ["fc"]})


@pytest.mark.parametrize("calibration,match", [
    ("/path/to/calib_dir", r"calibration='/path/to/calib_dir' is a path; pass batches"),
    (Path("/path/to/calib_dir"), "is a path"),
    ([np.zeros((1, 3, 32, 32), np.float32)], r"calibration batch 0 is a ndarray; expected a dict \{input name: array\}"),
    (5, r"calibration must be an iterable of \{input name: array\} dicts, got int"),
])
def test_cnn_calibration_in_another_layout_is_refused(cnn, calibration, match):
    with pytest.raises(CalibrationError, match=match):
        jaxinfer.quantize(cnn, "int8-static", calibration=calibration, measure=False)


@pytest.mark.parametrize("exclude,match", [
    ([1], r"exclude must hold glob strings .*got \[1\]"),
    (["fc*", 2.5], r"got \[2.5\]"),
    (5, r"exclude must be a glob string or a list of them .*got int 5"),
])
def test_exclude_that_is_not_globs_is_refused(cnn, exclude, match):
    with pytest.raises(TypeError, match=match):
        jaxinfer.quantize(cnn, "int8-dynamic", exclude=exclude)


def test_exclude_none_and_one_string_are_accepted(cnn):
    none = jaxinfer.quantize(cnn, "int8-dynamic", exclude=None, measure=False)
    assert sum(arith.is_quantized(v) for v in none.params.values()) == 4
    one = jaxinfer.quantize(cnn, "int8-dynamic", exclude="op:Gemm", measure=False)
    assert sum(arith.is_quantized(v) for v in one.params.values()) == 3


@pytest.mark.parametrize("model", ["model.onnx", CNN, None, {"x": 1}])
def test_quantize_takes_a_model_not_a_path(model):
    with pytest.raises(TypeError, match=r"quantize\(\) takes a jaxinfer Model \(e.g. jaxinfer.load\(path\)\), got"):
        jaxinfer.quantize(model, "int8-dynamic")


@pytest.mark.parametrize("first", ["int8-dynamic", "int8-weight"])
@pytest.mark.parametrize("second", ["bf16", "int8-dynamic"])
def test_requantizing_names_the_method_it_holds(cnn, first, second):
    q = jaxinfer.quantize(cnn, first, measure=False)
    with pytest.raises(ValueError, match=rf"quantized already \({first} weights\); quantize the float model"):
        jaxinfer.quantize(q, second)


@pytest.mark.parametrize("budget,err,match", [
    ({"cosine": "high"}, ValueError, r"budget 'cosine' must be a number in \(0, 1\], got 'high'"),
    ({"cosine": 2.0}, ValueError, r"budget 'cosine' must be a number in \(0, 1\], got 2.0"),
    ({"top1_agreement": float("nan")}, ValueError, "budget 'top1_agreement' must be a number"),
    ({"cosine": True}, ValueError, "budget 'cosine' must be a number"),
    (0.999, TypeError, r"budget must be a dict like \{'cosine': 0.999\}, got float"),
])
def test_budget_values_must_be_numbers(cnn, cnn_calib, budget, err, match):
    with pytest.raises(err, match=match):
        jaxinfer.quantize(cnn, "auto", calibration=cnn_calib, budget=budget)


@pytest.mark.parametrize("kwargs,err,match", [
    ({"method": ["int8-dynamic"]}, TypeError, r"method must be a string.*got list"),
    ({"method": "int9"}, ValueError, "unknown quantization method 'int9'"),
    ({"method": "int8-static", "observer": "nope"}, ValueError, r"unknown observer 'nope'; choose one of"),
    ({"method": "int8-static", "observer": "percentile", "percentile": 200}, ValueError,
     r"percentile must be a number in \(0, 100\]"),
    ({"method": "int8-static", "observer": "percentile", "percentile": float("nan")}, ValueError, "percentile must be"),
    ({"method": "int8-static", "percentile": "99"}, ValueError, "percentile must be a number"),
])
def test_method_observer_and_percentile_are_checked_before_calibrating(cnn, cnn_calib, kwargs, err, match):
    with pytest.raises(err, match=match):
        jaxinfer.quantize(cnn, calibration=cnn_calib, measure=False, **kwargs)


def test_facade_passes_misuse_through_to_named_errors(cnn, cnn_calib):
    h = ManagedModel(cnn, jax.devices("cpu")[0])
    with pytest.raises(CalibrationError, match="is a path"):
        h.quantize("static_int8", calibration_dataset="/path/to/calib_dir")
    with pytest.raises(CalibrationError, match="calibration must be an iterable"):
        h.quantize("static_int8", calibration_dataset=5)
    with pytest.raises(TypeError, match="exclude must hold glob strings"):
        h.quantize("int8-dynamic", exclude_layers=[1])
    with pytest.raises(ValueError, match="budget 'cosine' must be a number"):
        h.quantize("auto", calibration_dataset=cnn_calib, budget={"cosine": "high"})
    bad = cnn_calib[0]["x"].copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match=r"calibration batch 1, input 'x': 1 non-finite"):
        h.quantize("static_int8", calibration_dataset=[cnn_calib[0]["x"], bad])
    assert h.history == [] and h.model is cnn  # nothing swapped in by the failed calls
    h.quantize("int8-dynamic", exclude_layers=None)  # None: nothing excluded
    h.quantize("static_int8", calibration_dataset=[b["x"] for b in cnn_calib], measure=False)  # bare arrays
    assert h.history == ["int8-dynamic", "static_int8"]


def test_prune_refuses_the_same_misuse(cnn):
    with pytest.raises(TypeError, match=r"prune\(\) takes a jaxinfer Model"):
        jaxinfer.prune("model.onnx", 0.3)
    with pytest.raises(TypeError, match="exclude must hold glob strings"):
        jaxinfer.prune(cnn, 0.3, exclude=[1])
    with pytest.raises(ValueError, match=r"sparsity must be a number in \[0, 1\).*got '0.3'"):
        jaxinfer.prune(cnn, "0.3")
    with pytest.raises(CalibrationError, match="is a path"):
        jaxinfer.prune(cnn, 0.3, calibration="/path/to/calib_dir")
