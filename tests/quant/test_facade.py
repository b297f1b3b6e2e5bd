"""``ModelManager`` / ``InferenceRequest``: the seed's facade over load / quantize / run."""

from __future__ import annotations

import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer import arith
from jaxinfer.quant import fixtures
from jaxinfer.quant.facade import DeviceUnavailableError, resolve_device

D = 32  # a 2-layer d_model 32 encoder: the facade adds no numerics, only plumbing


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("facade") / "encoder.onnx"
    path.write_bytes(fixtures.encoder(D, 64, layers=2, heads=2).SerializeToString())
    return path


@pytest.fixture(scope="module")
def calib():
    return [fixtures.inputs(2, 4, D, seed=s) for s in range(2)]


def test_load_infer_fp32_matches_run(encoder_file, calib):
    mm = jaxinfer.ModelManager(device="cpu", precision="fp32")
    model = mm.load_model(encoder_file)
    res = mm.infer(jaxinfer.InferenceRequest(inputs=calib[0]))
    with jax.default_device(jax.devices("cpu")[0]):  # the same device as the manager's, so the same program
        want = jaxinfer.load(encoder_file).run(calib[0])["y"]
    np.testing.assert_array_equal(res.output_logits, want)
    assert res.latency_ms > 0 and model.report() is None
    assert all(d.platform == "cpu" for v in jax.tree_util.tree_leaves(model.model.params) for d in v.devices())


@pytest.fixture(scope="module")
def handle(encoder_file):
    return jaxinfer.ModelManager(device="auto").load_model(encoder_file)


@pytest.mark.parametrize("method,kind", [("dynamic_int8", "int8-dynamic"), ("static_int8", "int8-static"),
                                         ("dynamic_fp16", None), ("int8-weight", "int8-weight")])
def test_quantize_methods_and_aliases(handle, calib, method, kind):
    data = calib[:1] if method == "static_int8" else None  # calibration also makes a report: only where needed
    same = handle.quantize(method=method, exclude_layers=["l1/ffn/*"], calibration_dataset=data)
    assert same is handle and handle.history[-1] == method
    params = handle.model.params
    if kind:
        assert {arith.kind(params[f"l0.attn.{n}.w"]) for n in "qkvo"} == {kind}
        assert arith.kind(params["l1.ffn.up.w"]) == "float"  # exclude_layers
    else:
        assert params["l0.attn.q.w"].dtype == np.float16
    ref = handle.float_model.run(calib[1])["y"]  # the float model is kept, not mutated
    got = handle.infer(jaxinfer.InferenceRequest(inputs=calib[1])).output_logits
    assert got.dtype == np.float32 and arith_cos(got, ref) > 0.995


def arith_cos(a, b):
    from jaxinfer.quant.report import cosine

    return cosine(a, b)


@pytest.mark.parametrize("precision,kind", [("int8", "int8-dynamic"), ("bf16", None)])
def test_precision_applies_at_load(encoder_file, calib, precision, kind):
    m = jaxinfer.ModelManager(precision=precision).load_model(encoder_file)
    w = m.model.params["l0.ffn.up.w"]
    assert (arith.kind(w) == kind) if kind else (w.dtype == jax.numpy.bfloat16)
    assert m.report().method == ("int8-dynamic" if kind else "bf16")


def test_static_int8_needs_calibration(encoder_file):
    model = jaxinfer.ModelManager().load_model(encoder_file)
    with pytest.raises(ValueError, match="calibration"):
        model.quantize(method="static_int8")


def test_batch_size_splits_pads_and_rejoins(encoder_file):
    mm = jaxinfer.ModelManager()
    model = mm.load_model(encoder_file)
    x = fixtures.inputs(5, 8, D, seed=3)["x"]
    res = mm.infer(jaxinfer.InferenceRequest(inputs=x, batch_size=2))  # one array: the single input
    assert res.batches == 3 and res.output_logits.shape == (5, 8, D)
    np.testing.assert_allclose(res.output_logits, model.model.run({"x": x})["y"], rtol=1e-4, atol=1e-4)
    assert model.model.stats.compiles == 2  # the padded last chunk reuses the batch-2 executable


def test_errors_name_what_was_wrong():
    have = sorted({d.platform for d in jax.devices()})
    missing = next(k for k in ("gpu", "tpu") if k not in have)
    with pytest.raises(DeviceUnavailableError, match=f"device '{missing}' is not available.*{have[0]}"):
        jaxinfer.ModelManager(device=missing)
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("npu")
    with pytest.raises(ValueError, match="precision must be one of"):
        jaxinfer.ModelManager(precision="int4")
    with pytest.raises(jaxinfer.JaxinferError, match="no model loaded"):
        jaxinfer.ModelManager().infer(jaxinfer.InferenceRequest(inputs={}))
    with pytest.raises(ValueError, match="unknown quantization method"):
        jaxinfer.ModelManager().load_model(fixtures.encoder(32, 64, layers=1, heads=2)).quantize(method="int3")
