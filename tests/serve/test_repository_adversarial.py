"""Hostile model repositories and control-API races, over a real socket: each answers a clear error, none
takes the server down, and an unload racing a load leaves nothing half-stopped behind."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx
import onnx
import pytest

from jaxinfer.serve import ConfigError, ModelConfig, serve
from jaxinfer.serve.config import MAX_CONFIG_BYTES

from ..batching.models import mlp_proto
from .conftest import write_version

X = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": [1.0] * 8}]}


def _alias_bomb(key: str, levels: int = 7) -> str:
    """A few hundred bytes of YAML whose value under ``key`` is 10**levels integers once expanded."""
    items = ["&x0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"&x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]" for i in range(1, levels)]
    return f"{key}: [" + ", ".join(items) + "]\n"


HOSTILE = {  # config.yaml text -> a fragment of the error that must name what was wrong
    "alias bomb in batch_buckets": (_alias_bomb("batch_buckets"), "batch_buckets must be a list of integers"),
    "alias bomb in version_policy": (_alias_bomb("version_policy"), "version_policy must be"),
    "too deep": ("a: " + "[" * 3000 + "]" * 3000 + "\n", "nested too deeply"),
    "max_batch bool": ("max_batch: true\n", "max_batch must be an integer, got True"),
    "timeout bool": ("timeout_ms: true\n", "timeout_ms must be a number of milliseconds, got True"),
    "timeout nan": ("timeout_ms: .nan\n", "timeout_ms must be a finite number"),
    "sla nan": ("sla_ms: .nan\n", "sla_ms must be a finite number"),
    "queue delay inf": ("max_queue_delay_ms: .inf\n", "max_queue_delay_ms must be a finite number"),
    "queue_size str": ("queue_size: big\n", "queue_size must be an integer, got 'big'"),
    "max_in_flight float": ("max_in_flight: 1.5\n", "max_in_flight must be an integer"),
    "adaptive_cap str": ("adaptive_cap: maybe\n", "adaptive_cap must be true or false"),
    "latest bool": ("version_policy: {latest: true}\n", "positive count"),
    "cache size bool": ("response_cache: {size: true}\n", "response_cache must be"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_config_yaml_is_a_short_clear_error(tmp_path, case):
    text, fragment = HOSTILE[case]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    t = time.perf_counter()
    with pytest.raises(ConfigError) as info:
        ModelConfig.load(path)
    assert fragment in str(info.value), str(info.value)[:300]
    assert len(str(info.value)) < 1000  # an alias bomb's repr used to run to gigabytes
    assert time.perf_counter() - t < 10


def test_oversized_config_is_refused_unread(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("max_batch: 4\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    t = time.perf_counter()
    with pytest.raises(ConfigError, match="over the 1048576-byte limit"):
        ModelConfig.load(path)
    assert time.perf_counter() - t < 1


def _odd_version(repo: Path, name: str, folder: str) -> None:
    (repo / name / folder).mkdir(parents=True)
    onnx.save(mlp_proto(seed=2), repo / name / folder / "model.onnx")


def test_bad_configs_and_odd_version_dirs_over_http(tmp_path):
    write_version(tmp_path, "good", 1, mlp_proto(seed=1))
    (tmp_path / "good" / "config.yaml").write_text("max_batch: 2\n")
    write_version(tmp_path, "nan", 1, mlp_proto(seed=1))  # used to load and answer every infer 400 "malformed HTTP"
    (tmp_path / "nan" / "config.yaml").write_text("max_batch: 2\ntimeout_ms: .nan\n")
    write_version(tmp_path, "bomb", 1, mlp_proto(seed=1))
    (tmp_path / "bomb" / "config.yaml").write_text(_alias_bomb("batch_buckets"))
    write_version(tmp_path, "sup", 1, mlp_proto(seed=1))
    _odd_version(tmp_path, "sup", "²")  # str.isdigit() but not int(): used to crash serve()
    _odd_version(tmp_path, "arabic", "١")  # int('١') == 1, but it is no version directory
    with serve(tmp_path, port=0, compilation_cache=False) as s:
        index = {r["name"]: r for r in httpx.post(f"{s.url}/v2/repository/index").json()}
        assert index["good"]["state"] == index["sup"]["state"] == "READY" and index["sup"]["version"] == "1"
        assert "timeout_ms must be a finite number" in index["nan"]["reason"]
        assert "batch_buckets" in index["bomb"]["reason"] and len(index["bomb"]["reason"]) < 1000
        assert index["arabic"]["state"] == "UNAVAILABLE" and "no version directory" in index["arabic"]["reason"]
        for name in ("nan", "bomb", "arabic"):
            r = httpx.post(f"{s.url}/v2/repository/models/{name}/load", timeout=30)
            assert r.status_code == 400 and len(r.text) < 2000, r.text[:300]
        for name in ("good", "sup"):
            r = httpx.post(f"{s.url}/v2/models/{name}/infer", json=X, timeout=30)
            assert r.status_code == 200 and r.json()["model_version"] == "1", r.text
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200


def test_unload_racing_a_load_leaves_no_stopped_version_behind(tmp_path):
    """An unload that lands while a load warms a changed version used to let the load publish the old,
    already stopped, version 1: it answered 503 and kept /v2/health/ready at 503 until the next change."""
    for v in (1, 2):
        write_version(tmp_path, "m", v, mlp_proto(seed=v))
    (tmp_path / "m" / "config.yaml").write_text("max_batch: 2\nversion_policy: {latest: 2}\n")
    write_version(tmp_path, "other", 1, mlp_proto(seed=3))
    with serve(tmp_path, port=0, compilation_cache=False) as s:
        model = tmp_path / "m" / "2" / "model.onnx"
        later = time.time() + 5
        os.utime(model, (later, later))  # version 2 changed: the load warms it, version 1 is reused
        warming, release = threading.Event(), threading.Event()
        load_one = s.repo._load_one

        def gated(*args, **kw):
            warming.set()
            assert release.wait(30)
            return load_one(*args, **kw)

        s.repo._load_one = gated
        answers: dict[str, int] = {}
        loader = threading.Thread(target=lambda: answers.setdefault(
            "load", httpx.post(f"{s.url}/v2/repository/models/m/load", timeout=60).status_code))
        loader.start()
        assert warming.wait(30)
        unloader = threading.Thread(target=lambda: answers.setdefault(
            "unload", httpx.post(f"{s.url}/v2/repository/models/m/unload", timeout=60).status_code))
        unloader.start()
        time.sleep(0.3)  # the unload is in (it now waits for the load to finish)
        release.set()
        loader.join(60)
        unloader.join(60)
        s.repo._load_one = load_one
        assert answers == {"load": 200, "unload": 200}
        assert all(mv.state == "READY" for mv in s.repo.versions()), [(mv.name, mv.version, mv.state)
                                                                      for mv in s.repo.versions()]
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200
        assert httpx.post(f"{s.url}/v2/models/m/versions/1/infer", json=X).status_code == 404  # unload won
        assert httpx.post(f"{s.url}/v2/repository/models/m/load", timeout=60).status_code == 200
        for v in ("1", "2"):
            assert httpx.post(f"{s.url}/v2/models/m/versions/{v}/infer", json=X).status_code == 200


def test_load_unload_cycles_do_not_grow_threads(tmp_path):
    write_version(tmp_path, "m", 1, mlp_proto(seed=1))
    (tmp_path / "m" / "config.yaml").write_text("max_batch: 2\n")
    with serve(tmp_path, port=0, compilation_cache=False) as s, httpx.Client(timeout=30) as c:
        for _ in range(3):  # let the worker-thread pools reach their size
            c.post(f"{s.url}/v2/repository/models/m/unload")
            c.post(f"{s.url}/v2/repository/models/m/load")
        before = threading.active_count()
        for _ in range(20):
            assert c.post(f"{s.url}/v2/repository/models/m/unload").status_code == 200
            assert c.post(f"{s.url}/v2/repository/models/m/load").status_code == 200
        assert threading.active_count() <= before
        assert c.post(f"{s.url}/v2/repository/models/nosuch/unload").status_code == 404
        assert "nosuch" not in s.repo._load_locks  # an invented name leaves nothing behind
        assert c.post(f"{s.url}/v2/models/m/infer", json=X).status_code == 200
