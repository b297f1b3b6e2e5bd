"""Misused quantize arguments and unusable calibration data get errors naming them, never a wrong model."""

from __future__ import annotations

import numpy as np
import pytest

import jaxinfer
from jaxinfer.quant.calibrate import CalibrationError

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
