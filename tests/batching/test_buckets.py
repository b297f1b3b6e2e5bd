"""Shape buckets: warm-up compiles every bucket, nothing compiles afterwards, oversize splits."""

from __future__ import annotations

import numpy as np
import pytest

import jaxinfer
from jaxinfer.batching import BucketedModel, BucketError, BucketPolicy, batch_layout, default_batch_sizes

from .models import fixed_reshape_proto, mlp_proto, mlp_reference, seq_proto


def test_default_batch_sizes():
    assert default_batch_sizes(32) == (1, 2, 4, 8, 16, 32)
    assert default_batch_sizes(12) == (1, 2, 4, 8, 12)
    assert default_batch_sizes(1) == (1,)
    with pytest.raises(BucketError, match="max_batch"):
        default_batch_sizes(0)


def test_no_compile_after_warmup_and_split():
    proto = mlp_proto()
    bm = BucketedModel(jaxinfer.load(proto), BucketPolicy.for_max_batch(8))
    timings = bm.warmup()
    assert sorted(timings) == [1, 2, 4, 8]
    after = bm.compiles
    assert after == 4
    rng = np.random.default_rng(1)
    for rows in (1, 3, 5, 8, 19, 2, 7):  # 19 > 8: split into 8 + 8 + 3
        x = rng.standard_normal((rows, 8)).astype(np.float32)
        out = bm.run({"x": x})
        ref = mlp_reference(proto, x)
        np.testing.assert_allclose(out["y"], ref["y"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(out["z"], ref["z"], rtol=1e-5, atol=1e-5)
    assert bm.compiles == after and bm.late_compiles == 0


def test_restamp_fixed_batch_one_with_reshape():
    m = jaxinfer.load(fixed_reshape_proto())
    assert batch_layout(m) == "fixed1"
    bm = BucketedModel(m, BucketPolicy((1, 2, 4)))
    assert bm.model.inputs[0].shape == ("batch", 3, 4)
    bm.warmup()
    x = np.arange(36, dtype=np.float32).reshape(3, 3, 4)
    np.testing.assert_array_equal(bm.run({"x": x})["y"], -x.reshape(3, 12))
    assert bm.compiles == 3


def test_dim_buckets_pad_and_slice_back():
    bm = BucketedModel(jaxinfer.load(seq_proto()), BucketPolicy((1, 2), {"seq": (4, 8)}))
    bm.warmup()
    assert bm.compiles == 4
    for seq in (1, 3, 4, 6, 8):
        x = np.ones((2, seq, 4), np.float32) * seq
        np.testing.assert_array_equal(bm.run({"x": x})["y"], x * 2)
    assert bm.compiles == 4
    with pytest.raises(jaxinfer.InputError, match="exceeds the largest configured bucket"):
        bm.prepare({"x": np.ones((1, 9, 4), np.float32)})
    with pytest.raises(jaxinfer.InputError, match="dim 'seq' .* is 0"):  # not a made-up bucket of padding
        bm.prepare({"x": np.ones((1, 0, 4), np.float32)})


def test_dynamic_dim_without_bucket_is_a_clear_error():
    bm = BucketedModel(jaxinfer.load(seq_proto()), BucketPolicy((1, 2)))
    with pytest.raises(BucketError, match="without buckets"):
        bm.warmup()
    with pytest.raises(BucketError, match="name no symbolic dim"):
        BucketedModel(jaxinfer.load(seq_proto()), BucketPolicy((1,), {"nope": (4,)}))


def test_bad_inputs_raise_input_error():
    bm = BucketedModel(jaxinfer.load(mlp_proto()), BucketPolicy((1, 2)))
    with pytest.raises(jaxinfer.InputError, match="dtype"):
        bm.prepare({"x": np.ones((1, 8), np.float64)})
    with pytest.raises(jaxinfer.InputError, match="unknown input"):
        bm.prepare({"q": np.ones((1, 8), np.float32)})
    with pytest.raises(jaxinfer.InputError, match="dim 1"):
        bm.prepare({"x": np.ones((1, 7), np.float32)})


def test_buckets_larger_than_memory_are_refused_before_warm_up():
    """max_batch 2**40 once allocated its way up through every bucket until memory ran out (minutes)."""
    from jaxinfer.tracer import memory_limit

    limit = memory_limit()
    if limit is None or limit[0] >= 2**40 * 8 * 4:
        pytest.skip("this machine's memory limit is unknown or holds the test's largest bucket")
    bm = BucketedModel(jaxinfer.load(mlp_proto()), BucketPolicy.for_max_batch(2**40))
    with pytest.raises(BucketError, match=r"for its inputs alone, more than .*lower max_batch"):
        bm.warmup()
    assert bm.model.stats.compiles == 0  # refused before compiling any bucket
