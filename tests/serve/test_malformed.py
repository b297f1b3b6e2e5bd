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


def _bytes_claim(count: int):
    """A BYTES input whose shape claims ``count`` elements with 4 bytes of data."""
    head = json.dumps({"inputs": [{"name": "x", "shape": [count], "datatype": "BYTES",
                                   "parameters": {"binary_data_size": 4}}]}).encode()
    return head + b"\0\0\0\0", {HEADER: str(len(head))}


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
    "string data": (json.dumps(_json(data=["a"] * 8)).encode(), {}, 400, "list of FP32 numbers"),
    "numbers as strings": (json.dumps(_json(data=["1.5"] * 8)).encode(), {}, 400, "list of FP32 numbers"),
    "bool data": (json.dumps(_json(data=[True] * 8)).encode(), {}, 400, "cannot hold true/false"),
    "deep nesting": (b'{"inputs": ' + b"[" * 100_000, {}, 400, "not valid JSON"),
    "huge shape with a zero": (json.dumps(_json(shape=(0, 10**30), data=[])).encode(), {}, 400, "too large"),
    "too many dims": (json.dumps(_json(shape=(1,) * 40, data=[0.5])).encode(), {}, 400, "at most 32"),
    "BYTES count past the data": (*_bytes_claim(300_000_000), 400, "need at least 1200000000 bytes"),
    "nan timeout": (json.dumps(_json(parameters={"timeout_ms": float("nan")})).encode(), {}, 400, "finite"),
    "infinite timeout": (json.dumps(_json(parameters={"timeout": float("inf")})).encode(), {}, 400, "finite"),
    "binary flag as string": (json.dumps(_json(parameters={"binary_data_output": "false"})).encode(), {}, 400,
                              "true or false"),
    "output parameters not an object": (json.dumps(_json(outputs=[{"name": "y", "parameters": [1]}])).encode(),
                                        {}, 400, "must be an object"),
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


def test_encoded_slash_is_not_a_path_separator(server):
    """``cnn%2Fversions%2F1`` names a model with '/' in it (none exists), not version 1 of mlp."""
    body = json.dumps(_json()).encode()
    for path in ("/v2/models/mlp%2Fversions%2F1/infer", "/v2/models/mlp%2fversions%2f1"):
        r = httpx.post(server.url + path, content=body) if path.endswith("infer") else httpx.get(server.url + path)
        assert r.status_code == 404, (path, r.text)
        assert "/" in r.json()["error"]


def test_repository_index_body_is_checked(server):
    url = f"{server.url}/v2/repository/index"
    for body, message in ((b"\xff", "JSON object"), (b"[" * 100_000, "JSON object"),
                          (b'{"ready": "no"}', "true or false"), (b'{"ready": 1' + b"0" * 5000 + b"}", "JSON object")):
        r = httpx.post(url, content=body)
        assert r.status_code == 400 and message in r.json()["error"], r.text
    limit = server.state.max_body_bytes
    server.state.max_body_bytes = 1024
    try:
        r = httpx.post(url, content=b" " * 4096)
        assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    finally:
        server.state.max_body_bytes = limit
    assert httpx.post(url, json={"ready": True}).status_code == 200


def test_invented_model_and_version_names_do_not_grow_metrics(server):
    """404s are counted, but under model="" / version="": a client inventing names cannot add series."""
    def series() -> list[str]:
        return [ln for ln in httpx.get(f"{server.url}/metrics").text.splitlines()
                if ln.startswith("jaxinfer_requests_total{")]

    with httpx.Client() as c:
        c.post(f"{server.url}/v2/models/nosuch-warmup/infer", content=b"{}")
        c.post(f"{server.url}/v2/models/mlp/versions/977/infer", content=b"{}")
        before = series()
        for i in range(40):
            assert c.post(f"{server.url}/v2/models/nosuch{i}/infer", content=b"{}").status_code == 404
            assert c.post(f"{server.url}/v2/models/mlp/versions/{1000 + i}/infer", content=b"{}").status_code == 404
    after = series()
    assert len(after) == len(before)
    assert not any("nosuch" in ln or '"10' in ln for ln in after)
    count = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in after}
    assert count['jaxinfer_requests_total{model="",status="404",version=""}'] >= 41
    assert count['jaxinfer_requests_total{model="mlp",status="404",version=""}'] >= 41


def _raw_exchange(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as raw bytes on a fresh socket; (status, headers, body) of the answer."""
    import socket

    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, f"connection closed without an answer: {data!r}"
            data += chunk
        head, body = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        while len(body) < int(headers["content-length"]):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(lines[0].split(" ", 2)[1]), headers, body


FRAMING = {
    "not http": b"HELLO THERE\r\n\r\n",
    "bad content-length": b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    "bad chunk size": b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "space in header name": b"GET /v2 HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n",
}


@pytest.mark.parametrize("case", sorted(FRAMING))
def test_malformed_http_framing_answers_json(server, case):
    """Bytes that are not HTTP/1.1 get a 400 whose body is {"error": ...} like every other refusal,
    then the connection closes (its framing is lost); the server goes on serving."""
    status, headers, body = _raw_exchange(server.url, FRAMING[case])
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert "malformed HTTP request" in json.loads(body)["error"]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
