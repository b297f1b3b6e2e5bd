"""Model repository: config.yaml, version policy, load/unload over HTTP, reload under load, stop while busy."""

from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.http as th

from jaxinfer.serve import ConfigError, ModelConfig, VersionPolicy, serve

from ..batching.models import mlp_proto, mlp_reference
from .conftest import write_version


def test_version_policy_and_config_parsing():
    assert VersionPolicy.parse({"latest": 2}).select([1, 3, 2]) == [2, 3]
    assert VersionPolicy.parse({"specific": [1, 3]}).select([1, 2, 3]) == [1, 3]
    assert VersionPolicy.parse("all").select([2, 1]) == [1, 2]
    with pytest.raises(ConfigError, match="version_policy"):
        VersionPolicy.parse({"newest": 1})
    cfg = ModelConfig.from_dict({"batch_buckets": [4, 1, 2], "sla_ms": 40, "response_cache": True})
    assert cfg.max_batch == 4 and cfg.buckets().batch_sizes == (1, 2, 4) and cfg.response_cache == 1024
    with pytest.raises(ConfigError, match="unknown key"):
        ModelConfig.from_dict({"max_btach": 4})
    with pytest.raises(ConfigError, match="queue_size"):
        ModelConfig.from_dict({"queue_size": 0})


def _infer(url: str, x: np.ndarray, model: str = "m", version: str = "") -> tuple[int, dict]:
    body = {"inputs": [{"name": "x", "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    r = httpx.post(url + path, json=body, timeout=30)
    return r.status_code, r.json()


def test_versions_load_unload_and_bad_model(tmp_path):
    write_version(tmp_path, "m", 1, mlp_proto(seed=1))
    write_version(tmp_path, "m", 2, mlp_proto(seed=2))
    (tmp_path / "m" / "config.yaml").write_text("max_batch: 2\nversion_policy: {latest: 2}\n")
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "1" / "model.onnx").write_bytes(b"not a model")
    with serve(tmp_path, port=0, compilation_cache=False) as s:
        c = th.InferenceServerClient(s.url.removeprefix("http://"))
        index = {(r["name"], r["version"]): r["state"] for r in c.get_model_repository_index()}
        assert index[("m", "1")] == index[("m", "2")] == "READY" and index[("broken", "")] == "UNAVAILABLE"
        x = np.ones((1, 8), np.float32)
        for v, seed in (("1", 1), ("2", 2), ("", 2)):  # no version: the latest
            status, out = _infer(s.url, x, version=v)
            assert status == 200 and out["model_version"] == (v or "2")
            np.testing.assert_allclose(out["outputs"][0]["data"], mlp_reference(mlp_proto(seed=seed), x)["y"].ravel(),
                                       rtol=1e-5)
        r = httpx.post(f"{s.url}/v2/repository/models/broken/load")
        assert r.status_code == 400 and "broken" in r.json()["error"]
        c.unload_model("m")
        assert _infer(s.url, x)[0] == 404
        assert not c.is_model_ready("m")
        c.load_model("m")
        assert _infer(s.url, x)[0] == 200
        assert httpx.post(f"{s.url}/v2/repository/models/nothere/load").status_code == 404


def test_reload_under_load_loses_nothing(tmp_path):
    write_version(tmp_path, "m", 1, mlp_proto(seed=1))
    (tmp_path / "m" / "config.yaml").write_text("max_batch: 4\n")
    stop = threading.Event()
    seen: dict[str, int] = {}
    failures: list[str] = []
    counts = [0]
    lock = threading.Lock()
    with serve(tmp_path, port=0, compilation_cache=False) as s:
        def worker(seed: int):
            rng = np.random.default_rng(seed)
            with httpx.Client(timeout=30) as h:
                while not stop.is_set():
                    x = rng.standard_normal((1, 8)).astype(np.float32)
                    body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32",
                                        "data": x.ravel().tolist()}]}
                    r = h.post(f"{s.url}/v2/models/m/infer", json=body)
                    with lock:
                        counts[0] += 1
                        if r.status_code != 200:
                            failures.append(f"{r.status_code} {r.text}")
                            continue
                        out = r.json()
                        v = out["model_version"]
                        seen[v] = seen.get(v, 0) + 1
                    ref = mlp_reference(mlp_proto(seed=int(v)), x)["y"]
                    if not np.allclose(np.reshape(out["outputs"][0]["data"], ref.shape), ref, rtol=1e-4, atol=1e-5):
                        failures.append(f"wrong result from version {v}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        write_version(tmp_path, "m", 2, mlp_proto(seed=2))
        assert httpx.post(f"{s.url}/v2/repository/models/m/load", timeout=120).status_code == 200
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
        assert s.repo.loaded_versions("m") == [2]
    assert not failures, failures[:5]
    assert seen.get("1", 0) > 0 and seen.get("2", 0) > 0, seen
    assert counts[0] > 50


def test_overload_timeout_and_stop_while_busy(tmp_path):
    write_version(tmp_path, "m", 1, mlp_proto(seed=1))
    s = serve(tmp_path, port=0, compilation_cache=False, max_batch=1, queue_size=4, max_in_flight=1,
              max_queue_delay_ms=1)
    mv = s.repo.get("m")
    real = mv.bucketed.dispatch
    gate = threading.Event()
    # a slow device, held until the test lets it go (a bounded wait let it go by itself on a loaded runner
    # before the queue was checked, so the 6th request found room and timed out instead of a 429)
    mv.bucketed.dispatch = lambda parts: (gate.wait(120), real(parts))[1]
    results: list[int] = []
    lock = threading.Lock()

    def call(**params):
        x = np.ones((1, 8), np.float32)
        body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": x.ravel().tolist()}],
                "parameters": params}
        r = httpx.post(f"{s.url}/v2/models/m/infer", json=body, timeout=30)
        with lock:
            results.append(r.status_code)
        return r

    try:
        busy = [threading.Thread(target=call) for _ in range(5)]  # 1 on the device + 4 queued = full
        for t in busy:
            t.start()
        deadline = time.time() + 10
        while mv.batcher.queued() < 4 and time.time() < deadline:
            time.sleep(0.01)
        r = call()
        assert r.status_code == 429 and "queue is full" in r.json()["error"]
        # stop while busy: the 5 accepted requests complete
        stopper = threading.Thread(target=s.stop)
        stopper.start()
        time.sleep(0.2)
        gate.set()
        stopper.join(30)
        for t in busy:
            t.join(30)
        assert sorted(results) == [200] * 5 + [429], results
    finally:
        gate.set()
        s.stop()


def test_request_timeout_answers_504(tmp_path):
    write_version(tmp_path, "m", 1, mlp_proto(seed=1))
    with serve(tmp_path, port=0, compilation_cache=False, max_batch=1, max_in_flight=1) as s:
        mv = s.repo.get("m")
        real = mv.bucketed.dispatch
        gate = threading.Event()
        mv.bucketed.dispatch = lambda parts: (gate.wait(10), real(parts))[1]
        try:
            slow = threading.Thread(target=_infer, args=(s.url, np.ones((1, 8), np.float32)))
            slow.start()
            time.sleep(0.1)
            x = np.ones((1, 8), np.float32)
            body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": x.ravel().tolist()}],
                    "parameters": {"timeout_ms": 100}}
            r = httpx.post(f"{s.url}/v2/models/m/infer", json=body, timeout=30)
            assert r.status_code == 504 and "timed out" in r.json()["error"]
        finally:
            gate.set()
            slow.join(10)


def test_identical_weights_are_shared_and_poll_picks_up_new_versions(tmp_path):
    write_version(tmp_path, "m", 1, mlp_proto(seed=1))
    write_version(tmp_path, "m", 2, mlp_proto(seed=1))  # same weights
    (tmp_path / "m" / "config.yaml").write_text("max_batch: 2\nversion_policy: all\n")
    with serve(tmp_path, port=0, compilation_cache=False, poll_s=0.2) as s:
        v1, v2 = s.repo.get("m", 1), s.repo.get("m", 2)
        assert v1.source.params["W"] is v2.source.params["W"]
        assert s.repo.pool.shared_bytes >= 8 * 4 * 4
        write_version(tmp_path, "m", 3, mlp_proto(seed=3))
        deadline = time.time() + 60
        while s.repo.loaded_versions("m") != [1, 2, 3] and time.time() < deadline:
            time.sleep(0.1)
        assert s.repo.loaded_versions("m") == [1, 2, 3]
        status, out = _infer(s.url, np.ones((1, 8), np.float32))
        assert status == 200 and out["model_version"] == "3"
