"""Mesh configs: the issue's YAML verbatim, short forms, dataclasses, errors."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import pytest

from jaxinfer.sharding import MeshConfig, ShardingConfigError, build_mesh, enumerate_configs, parse_config

ISSUE_YAML = """
distributed:
  strategy: hybrid
  tensor_parallel: {world_size: 8, chunk_size: 4096}
  pipeline_parallel: {stages: 4, micro_batches: 16}
"""


def test_issue_yaml_verbatim(tmp_path):
    path = tmp_path / "mesh.yaml"
    path.write_text(ISSUE_YAML)
    for src in (path, str(path), ISSUE_YAML):
        cfg = parse_config(src)
        assert (cfg.tensor, cfg.stage, cfg.micro_batches, cfg.chunk_size, cfg.strategy) == (8, 4, 16, 4096, "hybrid")
    with pytest.raises(ShardingConfigError, match="does not divide the 8 devices"):
        cfg.resolved(8)  # 8 x 4 = 32 > 8
    assert cfg.resolved(64).data == 2  # leftover devices -> data


def test_short_forms_and_dataclass():
    a = parse_config({"tensor_parallel": 4, "data_parallel": 2})
    b = parse_config({"tp": 4, "dp": 2})
    c = parse_config({"distributed": {"tensor_parallel": {"world_size": 4}, "data_parallel": {"world_size": 2}}})
    d = parse_config(MeshConfig(tensor=4, data=2))

    @dataclass(frozen=True)
    class Mine:
        tensor: int = 4
        data: int = 2

    e = parse_config(Mine())
    assert a == b == c == d == e
    assert parse_config({"expert_parallel": {"world_size": 2}}).expert == 2
    assert parse_config({"tensor": 2}).resolved(8).data == 4


def test_errors_name_the_problem():
    with pytest.raises(ShardingConfigError, match="unknown config key 'tensr'"):
        parse_config({"tensr": 2})
    with pytest.raises(ShardingConfigError, match="does not divide the 8 devices"):
        parse_config({"tensor": 3}).resolved(8)
    with pytest.raises(ShardingConfigError, match="data may be"):
        parse_config({"tensor": 2, "data": 3}).resolved(8)
    with pytest.raises(ShardingConfigError, match="unknown option 'chunk'"):
        parse_config({"tensor_parallel": {"world_size": 2, "chunk": 3}})


def test_mesh_axes_and_enumeration():
    mesh = build_mesh(parse_config({"tensor": 4}))
    assert dict(mesh.shape) == {"data": 2, "stage": 1, "expert": 1, "tensor": 4}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    assert len(enumerate_configs(8)) == 4
    assert len(enumerate_configs(8, allow_stage=True)) == 10
