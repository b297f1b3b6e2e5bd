"""2 processes x 4 CPU devices over loopback (gloo): TPxDP outputs match one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxinfer.sharding.distributed import free_port

WORKER = Path(__file__).with_name("_mp_worker.py")


def test_two_processes_match_single_process(gpt2, gpt2_feeds, gpt2_ref, tmp_path):
    np.savez(tmp_path / "feeds.npz", **gpt2_feeds)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=240)
            logs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail("multi-process workers timed out:\n" + "\n".join(logs))
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    ref = gpt2_ref["logits"]
    for i in range(2):
        got = np.load(tmp_path / f"{i}.npz")
        for name in ("tp2_dp4", "tp8"):
            rel = np.abs(got[name] - ref).max() / np.abs(ref).max()
            assert rel <= 1e-5, (i, name, rel)
