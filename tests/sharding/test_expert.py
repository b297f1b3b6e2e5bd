"""Expert parallelism: com.microsoft MoE with experts split over `expert`, all-to-all dispatch, vs onnxruntime."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest

import jaxinfer
from jaxinfer.sharding import ShardingConfigError, collectives, shard
from jaxinfer.sharding.expert import dispatch_tensors


@pytest.fixture(scope="module")
def moe(fm):
    proto = fm.moe_like(experts=8, d=32, inter=64, k=2)
    x = {"hidden": np.random.RandomState(5).randn(4, 8, 32).astype(np.float32)}
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return jaxinfer.load(proto), x, sess.run(None, x)[0]


def _rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / max(np.abs(np.asarray(b)).max(), 1e-30))


def test_ep8_matches_onnxruntime_and_splits_experts(moe):
    m, x, ref = moe
    sm = shard(m, {"expert_parallel": {"world_size": 8}})
    assert _rel(sm.run(x)["out"], ref) <= 1e-5
    expert_params = [k for k in m.params if k.startswith("experts.")]
    total = sum(m.params[k].nbytes for k in expert_params)
    per: dict[int, int] = {}
    for k in expert_params:
        for s in sm.params[k].addressable_shards:
            per[s.device.id] = per.get(s.device.id, 0) + s.data.nbytes
    assert len(per) == 8 and max(per.values()) <= 1.05 * total / 8
    c = collectives(sm.compiled(sm._check_inputs(x)))
    assert c.counts["all-to-all"] == 2, str(c)  # dispatch and return


def test_ep_dp_and_errors(fm, moe, gpt2):
    m, x, ref = moe
    assert _rel(shard(m, {"expert": 4, "data": 2}).run(x)["out"], ref) <= 1e-5
    with pytest.raises(ShardingConfigError, match=r"expert=4 does not divide the 6 experts.*\[1, 2, 3, 6\]"):
        shard(jaxinfer.load(fm.moe_like(experts=6)), {"expert": 4})
    with pytest.raises(ShardingConfigError, match="no com.microsoft MoE op"):
        shard(gpt2, {"expert": 2})


def test_dispatch_capacity_drops_overflow():
    ids = jnp.array([[0], [0], [0], [1]])
    gates = jnp.ones((4, 1))
    dispatch, combine = dispatch_tensors(gates, ids, jnp.ones(4), experts=2, cap=2)
    assert dispatch.shape == (4, 2, 2)
    np.testing.assert_array_equal(np.asarray(dispatch.sum(axis=(1, 2))), [1, 1, 0, 1])  # third token to expert 0 dropped
    np.testing.assert_array_equal(np.asarray(dispatch[:, 0].argmax(-1))[:2], [0, 1])  # slots in token order
