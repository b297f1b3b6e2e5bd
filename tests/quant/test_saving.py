import numpy as np
import pytest

import jaxinfer
from jaxinfer import saving
from jaxinfer.quant import QuantizedModel, quantize


@pytest.mark.parametrize("method", [None, "int8-static", "int8-dynamic", "int8-weight", "bf16"])
def test_round_trip_bit_identical(encoder, calib, method, tmp_path):
    m = encoder if method is None else quantize(encoder, method, calibration=calib)
    saving.save(m, tmp_path / "saved")
    assert saving.is_saved_dir(tmp_path / "saved")
    r = jaxinfer.load(tmp_path / "saved")
    assert np.array_equal(m.run(calib[1])["y"], r.run(calib[1])["y"])
    for k, v in m.params.items():
        import jax
        for a, b in zip(jax.tree_util.tree_leaves(v), jax.tree_util.tree_leaves(r.params[k])):
            assert a.dtype == b.dtype and np.array_equal(np.asarray(a), np.asarray(b))
    if method:
        assert isinstance(r, QuantizedModel) and r.report().method == method
    if method and method.startswith("int8-") and method != "int8-weight":  # MatMul weights stored [N, K]
        stored = [v for v in m.params.values() if getattr(v, "transposed", False)]
        assert stored and all(getattr(r.params[k], "transposed", False) == getattr(v, "transposed", False)
                              for k, v in m.params.items())


def test_not_a_saved_dir(tmp_path):
    assert not saving.is_saved_dir(tmp_path)
