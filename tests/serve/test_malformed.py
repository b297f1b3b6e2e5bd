"""Malformed requests answer 4xx with {"error": ...}; the server stays healthy afterwards."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from jaxinfer.serve.protocol import HEADER


def _json(name="x", shape=(1, 8), datatype="FP32", data=None, **extra):
    t = {"name": name, "shape": list(shape), "datatype": datatype,
         "data": data if data is not None else [0.5] * int(np.prod(shape))}
    return {"inputs": [t], **extra}


def _binary(arr: np.ndarray, size: int | None = None, cut: int = 0, datatype: str = "FP32"):
    raw = arr.tobytes()
    head = json.dumps({"inputs": [{"name": "x", "shape": list(arr.shape), "datatype": datatype,
                                   "parameters": {"binary_data_size": len(raw) if size is None else size}}]}).encode()
    body = head + raw[:len(raw) - cut]
    return body, {HEADER: str(len(head)), "content-type": "application/octet-stream"}


CASES = {
    "bad json": (b"{not json", {}, 400, "not valid JSON"),
    "not an object": (b"[1, 2]", {}, 400, "JSON object"),
    "no inputs": (json.dumps({"inputs": []}).encode(), {}, 400, "non-empty"),
    "wrong name": (json.dumps(_json(name="q")).encode(), {}, 400, "unknown input"),
    "wrong shape": (json.dumps(_json(shape=(1, 7))).encode(), {}, 400, "dim 1 must be 8"),
    "wrong rank": (json.dumps(_json(shape=(8,))).encode(), {}, 400, "rank"),
    "wrong dtype": (json.dumps(_json(datatype="FP64")).encode(), {}, 400, "dtype"),
    "unknown datatype": (json.dumps(_json(datatype="FP128")).encode(), {}, 400, "unknown datatype"),
    "data count": (json.dumps(_json(data=[1.0, 2.0])).encode(), {}, 400, "needs 8 elements"),
    "string data": (json.dumps(_json(data=["a"] * 8)).encode(), {}, 400, "does not hold FP32"),
    "negative shape": (json.dumps(_json(shape=(-1, 8))).encode(), {}, 400, "non-negative"),
    "unknown output": (json.dumps(_json(outputs=[{"name": "nope"}])).encode(), {}, 400, "unknown requested output"),
    "byte size": (*_binary(np.ones((1, 8), np.float32), size=16), 400, "needs 32 bytes"),
    "truncated binary": (*_binary(np.ones((1, 8), np.float32), cut=5), 400, "truncated"),
    "extra binary": (_binary(np.ones((1, 8), np.float32))[0] + b"xx", _binary(np.ones((1, 8), np.float32))[1],
                     400, "no input claims"),
    "header too long": (b"{}", {HEADER: "99"}, 400, HEADER),
    "header not int": (b"{}", {HEADER: "abc"}, 400, "integer"),
    "bad timeout": (json.dumps(_json(parameters={"timeout_ms": "soon"})).encode(), {}, 400, "timeout"),
    "empty batch": (json.dumps(_json(shape=(0, 8), data=[])).encode(), {}, 400, "0 rows"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_request(server, case):
    body, headers, status, message = CASES[case]
    r = httpx.post(f"{server.url}/v2/models/mlp/infer", content=body, headers=headers)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_unknown_model_version_route(server):
    body = json.dumps(_json()).encode()
    for path, status in (("/v2/models/nope/infer", 404), ("/v2/models/mlp/versions/9/infer", 404),
                         ("/v2/models/mlp/versions/x/infer", 404), ("/v2/models/nope", 404),
                         ("/v2/nowhere", 404)):
        r = httpx.post(server.url + path, content=body) if path.endswith("infer") else httpx.get(server.url + path)
        assert r.status_code == status, (path, r.text)
        assert "error" in r.json()


def test_huge_body_refused(server):
    limit = server.state.max_body_bytes
    server.state.max_body_bytes = 1024
    try:
        r = httpx.post(f"{server.url}/v2/models/mlp/infer", content=b"0" * 4096)
        assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    finally:
        server.state.max_body_bytes = limit


def test_healthy_after_malformed(server):
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    r = httpx.post(f"{server.url}/v2/models/mlp/infer", json=_json(id="after"))
    assert r.status_code == 200 and r.json()["id"] == "after"
    assert server.repo.get("mlp").late_compiles == 0


def test_starlette_route_answers_as_the_fast_path(server):
    """The server answers infer in InferFastPath; the Starlette route alone gives the same answers."""
    from starlette.testclient import TestClient

    from jaxinfer.serve.app import build_app

    good = json.dumps(_json(id="same")).encode()
    with TestClient(build_app(server.state)) as plain:
        for body, headers, *_ in [*CASES.values(), (good, {})]:
            fast = httpx.post(f"{server.url}/v2/models/mlp/infer", content=body, headers=headers)
            slow = plain.post("/v2/models/mlp/infer", content=body, headers=headers)
            assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())


def test_infer_path_with_other_methods(server):
    r = httpx.get(f"{server.url}/v2/models/mlp/infer")
    assert r.status_code == 405 and "no route GET" in r.json()["error"]
    r = httpx.post(f"{server.url}/v2/models/mlp/infer/extra", content=b"{}")
    assert r.status_code == 404 and "error" in r.json()
