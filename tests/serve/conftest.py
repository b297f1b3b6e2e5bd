"""Fixtures: a model repository on disk with tiny real ONNX models, and a server on an ephemeral port."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from jaxinfer.serve import serve

from ..batching.models import mlp_proto


def write_version(repo: Path, name: str, version: int, proto: onnx.ModelProto) -> Path:
    d = repo / name / str(version)
    d.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, d / "model.onnx")
    return d


@pytest.fixture(scope="module")
def repo_dir(tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    write_version(repo, "mlp", 1, mlp_proto(seed=1))
    (repo / "mlp" / "config.yaml").write_text("max_batch: 8\nmax_queue_delay_ms: 2\nresponse_cache: {size: 16}\n")
    return repo


@pytest.fixture(scope="module")
def server(repo_dir):
    with serve(repo_dir, port=0, compilation_cache=False) as s:
        yield s
