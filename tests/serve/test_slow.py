"""Long reliability runs, opt-in with JAXINFER_SLOW=1: the CLI's default model, 10,000 requests with a reload."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from jaxinfer.serve import serve

from ..batching.models import mlp_proto, mlp_reference
from .conftest import write_version

pytestmark = pytest.mark.skipif(not os.environ.get("JAXINFER_SLOW"), reason="slow: set JAXINFER_SLOW=1")
ROOT = Path(__file__).resolve().parents[2]


def test_cli_serves_default_resnet50():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = f"import sys; from jaxinfer.serve import main; sys.exit(main(['--port', '{port}']))"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url + "/v2/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        x = np.zeros((5, 3, 224, 224), np.float32)
        body = {"inputs": [{"name": "gpu_0/data_0", "shape": list(x.shape), "datatype": "FP32",
                            "data": x.ravel().tolist()}],
                "outputs": [{"name": "gpu_0/softmax_1", "parameters": {"binary_data": True}}]}
        r = httpx.post(url + "/v2/models/resnet50/infer", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.headers["inference-header-content-length"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0


def test_10k_requests_concurrency_64_with_reload(tmp_path):
    write_version(tmp_path, "m", 1, mlp_proto(seed=1))
    (tmp_path / "m" / "config.yaml").write_text("max_batch: 32\nqueue_size: 4096\n")
    total, conc = 10_000, 64
    left = [total]
    bad: list[str] = []
    done = [0]
    lock = threading.Lock()
    with serve(tmp_path, port=0, compilation_cache=False) as s:
        def worker(seed):
            rng = np.random.default_rng(seed)
            with httpx.Client(timeout=60) as h:
                while True:
                    with lock:
                        if left[0] == 0:
                            return
                        left[0] -= 1
                    x = rng.standard_normal((1, 8)).astype(np.float32)
                    body = {"inputs": [{"name": "x", "shape": [1, 8], "datatype": "FP32", "data": x.ravel().tolist()}]}
                    try:
                        r = h.post(f"{s.url}/v2/models/m/infer", json=body)
                        ok = r.status_code == 200
                        if ok:
                            out = r.json()
                            ref = mlp_reference(mlp_proto(seed=int(out["model_version"])), x)["y"].ravel()
                            ok = np.allclose(out["outputs"][0]["data"], ref, rtol=1e-4, atol=1e-5)
                        msg = "" if ok else f"{r.status_code} {r.text[:200]}"
                    except httpx.HTTPError as e:
                        msg = f"{type(e).__name__}: {e}"
                    with lock:
                        done[0] += 1
                        if msg:
                            bad.append(msg)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(conc)]
        t0 = time.time()
        for t in threads:
            t.start()
        while done[0] < total // 2:
            time.sleep(0.05)
        write_version(tmp_path, "m", 2, mlp_proto(seed=2))
        s.load("m")
        for t in threads:
            t.join()
        elapsed = time.time() - t0
        assert s.repo.loaded_versions("m") == [2]
    print(f"\n10k: {total} requests at concurrency {conc} in {elapsed:.1f}s ({total / elapsed:.0f}/s), "
          f"{len(bad)} failed")
    assert done[0] == total and not bad, bad[:5]
