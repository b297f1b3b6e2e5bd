"""A model with an input read on the host (its value sets a shape) serves: it is not warmed up with zeros,
each distinct value compiles on its first request, and a value asking for more memory than the machine has
answers 507 naming the sizes, while the server goes on serving."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
from onnx import TensorProto, helper

import jaxinfer
from jaxinfer import tracer
from jaxinfer.batching import BucketedModel, BucketError, BucketPolicy


def _expand_model() -> jaxinfer.Model:
    """y = Expand(x, s): the shape ``s`` is a graph input, so it is read on the host."""
    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Expand", ["x", "s"], ["y"], name="grow")], "grow",
                              [vi("x", TensorProto.FLOAT, ["b", 1]), vi("s", TensorProto.INT64, [3])],
                              [vi("y", TensorProto.FLOAT, None)])
    return jaxinfer.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _body(shape: list[int]) -> dict:
    return {"inputs": [{"name": "x", "shape": [1, 1], "datatype": "FP32", "data": [2.0]},
                       {"name": "s", "shape": [3], "datatype": "INT64", "data": shape}]}


def test_unbucketed_leading_symbol_is_named():
    """No batch dim here (an input is read on the host), so dim 0's symbol 'b' needs a dim bucket."""
    with pytest.raises(BucketError, match=r"dynamic dims \['b'\] without buckets"):
        BucketedModel(_expand_model(), BucketPolicy((1,))).warmup()


def test_host_value_input_model_is_served_and_a_huge_value_is_507():
    model = _expand_model()
    assert model.value_inputs == ("s",)
    limit = tracer.memory_limit()
    if limit is None:
        pytest.skip("this OS does not say how much memory the machine has")
    huge = limit[0] // 4 + 1
    if huge > tracer.MAX_ELEMENTS:
        pytest.skip("this machine holds more than MAX_ELEMENTS float32 values")
    with jaxinfer.serve(model, port=0, name="grow", max_batch=1, dim_buckets={"b": [1]},
                        compilation_cache=False) as server:  # on, it would leak into later tests counting traces
        url = f"{server.url}/v2/models/grow/infer"
        r = httpx.post(url, json=_body([1, 2, 3]), timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["shape"] == [1, 2, 3] and out["data"] == [2.0] * 6
        r = httpx.post(url, json=_body([1, huge, 1]), timeout=120)
        assert r.status_code == 507, r.text
        assert "more than this machine can hold" in r.json()["error"]
        r = httpx.post(url, json=_body([2, 1, 2]), timeout=120)
        assert r.status_code == 200, r.text
        assert np.array_equal(np.asarray(r.json()["outputs"][0]["data"]), np.full(4, 2.0))
