"""A real CNN (the onnx wheel's light SqueezeNet, exported with a fixed batch of 1) served batched."""

from __future__ import annotations

import numpy as np
import tritonclient.http as th

import jaxinfer
from jaxinfer.bench import light_models
from jaxinfer.serve import default_model_path, serve


def test_squeezenet_restamped_and_batched_over_http():
    model = jaxinfer.load(next(p for p in light_models() if p.name == "light_squeezenet.onnx"))
    assert model.inputs[0].shape == (1, 3, 224, 224)
    x = np.random.default_rng(0).random((3, 3, 224, 224), dtype=np.float32)
    with serve({"squeezenet": model}, port=0, max_batch=2, compilation_cache=False) as s:
        mv = s.repo.get("squeezenet")
        assert mv.bucketed.layout == "fixed1" and mv.compiles == 2
        meta = th.InferenceServerClient(s.url.removeprefix("http://")).get_model_metadata("squeezenet")
        assert meta["inputs"][0]["shape"] == [-1, 3, 224, 224]
        inp = th.InferInput("data_0", [3, 3, 224, 224], "FP32")
        inp.set_data_from_numpy(x)
        got = th.InferenceServerClient(s.url.removeprefix("http://")).infer("squeezenet", [inp]).as_numpy(
            "softmaxout_1")
        assert got.shape == (3, 1000, 1, 1)
        assert mv.compiles == 2  # batch 3 ran as 2 + 1 without compiling
    for i in range(3):
        np.testing.assert_allclose(got[i:i + 1], model.run({"data_0": x[i:i + 1]})["softmaxout_1"],
                                   rtol=1e-4, atol=1e-6)


def test_default_model_is_a_real_cnn_from_the_onnx_wheel():
    path = default_model_path()
    assert path.is_file() and path.name == "light_resnet50.onnx"
