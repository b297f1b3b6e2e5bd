"""Sharding imported graphs over device meshes (tensor, data, pipeline, expert parallelism; chunk_size).

Expert parallelism splits ``com.microsoft.MoE`` ops and, via ``fuse_moe`` (a ``Graph -> Graph``
pass), MoE layers exported without the op (router -> softmax -> top-k -> experts -> combine).

Example:
    >>> m = jaxinfer.load("gpt2.onnx")                                # doctest: +SKIP
    >>> sm = sharding.shard(m, {"tensor_parallel": 4, "data_parallel": 2})  # doctest: +SKIP
    >>> sm.run({"input_ids": ids})                                   # doctest: +SKIP
    >>> p = sharding.plan(m, devices=8, batch=8); p.best               # doctest: +SKIP
"""

from __future__ import annotations

from . import distributed
from .config import AXES, MeshConfig, ShardingConfigError, build_mesh, enumerate_configs, parse_config
from .hlo import Collectives, collectives
from .moe_pattern import MoeMatch, find_moe, fuse_moe
from .pipeline import PipelineModel, Profile, StageSplit, split_stages
from .plan import Plan, PlanRow, measure, plan
from .rules import Analysis, analyze, format_rules, specs_from_rules
from .sharded import ShardedModel, place, shard

__all__ = [
    "AXES", "Analysis", "Collectives", "MeshConfig", "MoeMatch", "PipelineModel", "Plan", "PlanRow", "Profile", "StageSplit",
    "measure", "ShardedModel", "ShardingConfigError", "analyze", "split_stages",
    "build_mesh", "collectives", "distributed", "enumerate_configs", "find_moe", "format_rules", "fuse_moe",
    "parse_config", "place",
    "plan", "shard", "specs_from_rules",
]
