"""Infer answered from uvicorn's parser callbacks (``http_fast``): same answers as the ASGI path, and
HTTP/1.1 kept whole: pipelining, ``Expect: 100-continue``, body limits, clients that go away, HTTP/1.0."""

from __future__ import annotations

import gzip
import json
import socket
import time

import httpx
import numpy as np
import pytest

from jaxinfer.serve import serve
from jaxinfer.serve import server as server_mod
from jaxinfer.serve.protocol import HEADER

from .test_malformed import CASES, _json


@pytest.fixture(scope="module")
def asgi_server(repo_dir):
    with serve(repo_dir, port=0, compilation_cache=False, fast_http=False) as s:
        yield s


def _exchange(url: str, data: bytes, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    """Send ``data`` on one connection; read until ``n`` whole responses came (or the server closed it)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    raw = b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        while len(got := _responses(raw)) < n or len(got[-1][2]) < int(got[-1][1].get("content-length", 0)):
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    return _responses(raw)


def _responses(raw: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Split a byte stream of Content-Length HTTP/1.1 responses into (status, headers, body)."""
    out = []
    while b"\r\n\r\n" in raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
        n = int(headers.get("content-length", "0"))
        out.append((int(lines[0].split()[1]), headers, rest[:n]))
        raw = rest[n:]
    return out


def _post(path: str, body: bytes, extra: str = "", version: str = "1.1") -> bytes:
    return (f"POST {path} HTTP/{version}\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n{extra}\r\n").encode() + body


def test_server_uses_the_fast_path(server):
    assert server_mod.supported()
    assert server._uvicorn.config.http.__name__ == "InferProtocol"


def test_fast_and_asgi_paths_answer_alike(server, asgi_server):
    good = json.dumps(_json(id="same")).encode()
    x = np.arange(8, dtype=np.float32).reshape(1, 8)
    head = json.dumps({"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 32}}],
                       "outputs": [{"name": "y", "parameters": {"binary_data": False}}]}).encode()
    cases = [*CASES.values(), (good, {}), (gzip.compress(good), {"content-encoding": "gzip"}),
             (head + x.tobytes(), {HEADER: str(len(head))}), (b"x", {"content-encoding": "br"})]
    for body, headers, *_ in cases:
        fast = httpx.post(f"{server.url}/v2/models/mlp/infer", content=body, headers=headers)
        slow = httpx.post(f"{asgi_server.url}/v2/models/mlp/infer", content=body, headers=headers)
        assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())
        assert fast.headers["content-type"] == slow.headers["content-type"]
    for path in ("/v2/models/nope/infer", "/v2/models/mlp/versions/1/infer", "/v2/models/mlp/versions/7/infer"):
        fast = httpx.post(server.url + path, content=good)
        slow = httpx.post(asgi_server.url + path, content=good)
        assert (fast.status_code, fast.json()) == (slow.status_code, slow.json())


def test_pipelined_requests_are_answered_in_order(server):
    a, b = (json.dumps(_json(id=i)).encode() for i in "ab")
    data = (_post("/v2/models/mlp/infer", a) + b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
            + _post("/v2/models/mlp/infer", b) + _post("/v2/models/mlp/infer", b"{bad"))
    got = _exchange(server.url, data, 4)
    assert [s for s, *_ in got] == [200, 200, 200, 400]
    assert json.loads(got[0][2])["id"] == "a" and json.loads(got[2][2])["id"] == "b"
    assert json.loads(got[1][2]) == {"ready": True}


def test_expect_100_continue(server):
    body = json.dumps(_json(id="cont")).encode()
    host, port = server.url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(_post("/v2/models/mlp/infer", b"", "Expect: 100-continue\r\n").replace(
            b"Content-Length: 0", f"Content-Length: {len(body)}".encode()))
        assert s.recv(1024).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(body)
        time.sleep(0.3)
        reply = s.recv(65536)
    [(status, _, payload)] = _responses(reply)
    assert status == 200 and json.loads(payload)["id"] == "cont"


def test_declared_oversize_body_is_refused_and_the_connection_closed(server):
    limit = server.state.max_body_bytes
    server.state.max_body_bytes = 1024
    try:
        head = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        [(status, headers, payload)] = _exchange(server.url, head + b"0" * 2048, 1)
        assert status == 413 and "exceeds the limit" in json.loads(payload)["error"]
        assert headers["connection"] == "close"
        chunked = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                   + b"".join(b"400\r\n" + b"0" * 1024 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n")
        [(status, headers, payload)] = _exchange(server.url, chunked, 1)
        assert status == 413 and headers["connection"] == "close"
    finally:
        server.state.max_body_bytes = limit


def test_http10_request_is_answered_and_closed(server):
    body = json.dumps(_json(id="old")).encode()
    [(status, headers, payload)] = _exchange(server.url, _post("/v2/models/mlp/infer", body, version="1.0"), 1)
    assert status == 200 and headers["connection"] == "close" and json.loads(payload)["id"] == "old"


def test_client_gone_mid_request_leaves_the_server_healthy(server):
    body = json.dumps(_json(id="gone")).encode()
    host, port = server.url.split("//", 1)[1].rsplit(":", 1)
    for cut in (len(body) // 2, len(body)):  # mid-body, and after the whole request
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(_post("/v2/models/mlp/infer", body)[:-len(body) + cut or None])
    time.sleep(0.2)
    r = httpx.post(f"{server.url}/v2/models/mlp/infer", json=_json(id="after"))
    assert r.status_code == 200 and r.json()["id"] == "after"
    assert server.state.in_progress == 0


def _status_count(server, status: str) -> float:
    """``jaxinfer_requests_total`` of the mlp model for one status, summed over versions."""
    total = 0.0
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("jaxinfer_requests_total{") and 'model="mlp"' in line and f'status="{status}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_client_gone_during_a_big_decode_is_dropped_and_counted_499(server, monkeypatch):
    """A body decoded in a worker thread whose client leaves: the request is dropped, counted as 499
    (not 200), and nothing is left in progress."""
    from jaxinfer.serve import app

    begin = app.begin_infer
    monkeypatch.setattr(app, "begin_infer", lambda *a: (time.sleep(0.3), begin(*a))[1])  # a slow decode
    x = np.zeros((3000, 8), np.float32)
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    assert len(body) > app.OFFLOAD_BYTES
    host, port = server.url.split("//", 1)[1].rsplit(":", 1)
    gone, ok = _status_count(server, "499"), _status_count(server, "200")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(_post("/v2/models/mlp/infer", body))
    deadline = time.monotonic() + 10
    while _status_count(server, "499") < gone + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _status_count(server, "499") == gone + 3
    assert _status_count(server, "200") == ok
    assert server.state.in_progress == 0


def test_big_bodies_and_replies_leave_the_event_loop(server, asgi_server, monkeypatch):
    """Bodies above OFFLOAD_BYTES are decoded, and JSON replies above it encoded, in a worker thread."""
    from jaxinfer.serve import app

    from ..batching.models import mlp_proto, mlp_reference

    x = np.random.default_rng(3).standard_normal((3000, 8)).astype(np.float32)  # ~0.5 MB of JSON
    body = json.dumps({"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    assert len(body) > app.OFFLOAD_BYTES
    fast = httpx.post(f"{server.url}/v2/models/mlp/infer", content=body, timeout=60)
    slow = httpx.post(f"{asgi_server.url}/v2/models/mlp/infer", content=body, timeout=60)
    assert fast.status_code == 200 and fast.json() == slow.json()
    got = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in fast.json()["outputs"]}
    np.testing.assert_allclose(got["z"], mlp_reference(mlp_proto(seed=1), x)["z"], rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(app, "OFFLOAD_BYTES", 16)  # a small body whose JSON reply counts as big
    small = json.dumps(_json(id="enc")).encode()
    r = httpx.post(f"{server.url}/v2/models/mlp/infer", content=small)
    assert r.status_code == 200 and r.json() == httpx.post(f"{asgi_server.url}/v2/models/mlp/infer",
                                                           content=small).json()


def test_only_much_json_or_many_binary_bytes_leave_the_event_loop():
    """Binary tensors cost the loop a frombuffer: a 128 KB binary request stays on it (a worker thread
    would cost two hand-offs); a big JSON body, or megabytes of binary data, go to a worker thread."""
    from jaxinfer.serve.app import HEADER_KEY, OFFLOAD_BINARY_BYTES, OFFLOAD_BYTES, worth_offloading

    head = b'{"inputs": []}'
    binary = head + bytes(128 * 1024)
    assert not worth_offloading({HEADER_KEY: str(len(head))}, binary)
    assert worth_offloading({HEADER_KEY: str(len(head))}, head + bytes(OFFLOAD_BINARY_BYTES))
    assert worth_offloading({}, binary)  # no binary header: all of it is JSON
    assert worth_offloading({HEADER_KEY: "not a number"}, binary)  # begin_infer refuses it; decoding is cheap either way
    assert worth_offloading({HEADER_KEY: str(len(binary) + 1)}, binary)
    assert not worth_offloading({}, bytes(OFFLOAD_BYTES))


def test_binary_tensors_are_views_of_the_body_and_run_as_given(server):
    """Binary inputs are read in place (no copy), also at an odd offset (unaligned), and a request that
    fills its bucket runs without being copied into a batch buffer; the answers stay exact."""
    from jaxinfer.serve.protocol import decode_infer

    from ..batching.models import mlp_proto, mlp_reference

    x = np.random.default_rng(5).standard_normal((8, 8)).astype(np.float32)  # 8 rows: a whole bucket
    for pad in ("", " "):  # an odd-length JSON header puts the floats at an unaligned offset
        head = json.dumps({"inputs": [{"name": "x", "shape": [8, 8], "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": False}}).encode() + pad.encode()
        req = decode_infer(head + x.tobytes(), len(head))
        assert not req.inputs["x"].flags.writeable and req.inputs["x"].base is not None
        r = httpx.post(f"{server.url}/v2/models/mlp/infer", content=head + x.tobytes(),
                       headers={"Inference-Header-Content-Length": str(len(head))})
        assert r.status_code == 200, r.text
        got = {o["name"]: np.asarray(o["data"], np.float32).reshape(o["shape"]) for o in r.json()["outputs"]}
        np.testing.assert_allclose(got["z"], mlp_reference(mlp_proto(seed=1), x)["z"], rtol=1e-5, atol=1e-5)
