"""Structured channel pruning: smaller params, consistent residual groups, exact rewrites."""

from __future__ import annotations

import numpy as np
import pytest

import jaxinfer
from jaxinfer.quant import QuantizedModel
from jaxinfer.quant.prune import _product_axes, channel_scores, choose, kept_indices, trace_channels

from .cnn import images, small_cnn


@pytest.fixture(scope="module")
def cnn():
    return jaxinfer.load(small_cnn().SerializeToString())


@pytest.fixture(scope="module")
def cnn_calib():
    return [images(4, s) for s in range(2)]


def _consts(model):
    const = {k: np.asarray(v) for k, v in model.graph.initializers.items()}
    const.update({k: np.asarray(v) for k, v in model.params.items()})
    return const


def _zeroed_reference(model, sparsity, criterion="l1"):
    """The original model with the dropped channels' *consumer* weights zeroed: removing a channel
    and making every reader ignore it must compute the same thing."""
    const = _consts(model)
    an = trace_channels(model.graph, const)
    keep = choose(an, channel_scores(an, const, criterion), sparsity)
    params = dict(model.params)
    for e in an.edits:
        node = model.graph.nodes[e.node]
        w = const[node.inputs[1]]
        axes = _product_axes(node, w)
        if e.slot == 1 and axes is not None and e.axis == axes[1]:
            mask = np.zeros(w.shape[e.axis], np.float32)
            mask[kept_indices(an, keep, e.layout, e.repeat)] = 1.0
            shape = [1] * w.ndim
            shape[e.axis] = -1
            params[node.inputs[1]] = np.asarray(params[node.inputs[1]]) * mask.reshape(shape)
    return model.with_params(params)


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_pruned_cnn_equals_original_with_dropped_channels_ignored(cnn, cnn_calib, criterion):
    p = jaxinfer.prune(cnn, 0.5, criterion=criterion)
    ref = _zeroed_reference(cnn, 0.5, criterion)
    for feeds in cnn_calib:
        np.testing.assert_allclose(p.run(feeds)["y"], ref.run(feeds)["y"], rtol=1e-4, atol=1e-5)


def test_cnn_report_channels_bytes_and_groups(cnn, cnn_calib):
    p = jaxinfer.prune(cnn, 0.5, calibration=cnn_calib)
    assert isinstance(p, QuantizedModel) and p is not cnn
    rows = {r["layer"]: r for r in p.report().rows}
    # c1 and c2 meet in a residual Add: one group, pruned alike; the concat halves both sides
    assert rows["c1"]["channels_after"] == rows["c2"]["channels_after"] == 8
    assert rows["c3"]["channels_after"] == rows["c4"]["channels_after"] == 8
    assert rows["fc1"]["channels_after"] == 16
    assert rows["out"]["channels_after"] == 10 and rows["out"]["method"] == "kept" and "graph output" in rows["out"]["why"]
    assert rows["c2"]["bytes_after"] * 4 == rows["c2"]["bytes_before"]  # half in, half out
    t = p.report().totals
    assert t["params_bytes"] < t["params_bytes_f32"] / 3
    assert sum(np.asarray(v).nbytes for v in p.params.values()) == t["params_bytes"]  # measured, not estimated
    assert rows["c1"]["cosine"] > 0.9999  # c1's kept channels see the unchanged input
    assert 0 < t["cosine"] <= 1 and "top1_agreement" in t
    bn = next(n for n in p.graph.nodes if n.op_type == "BatchNormalization")
    assert p.params[bn.inputs[1]].shape == (8,)
    dw = next(n for n in p.graph.nodes if n.name == "dw")
    assert dw.attrs["group"] == 8
    text = str(p.report())
    assert "pruning: prune-l1" in text and "16->8" in text


def test_sparsity_zero_changes_nothing(cnn, cnn_calib):
    p = jaxinfer.prune(cnn, 0.0)
    np.testing.assert_array_equal(p.run(cnn_calib[0])["y"], cnn.run(cnn_calib[0])["y"])


def test_sensitivity_needs_calibration_and_uses_it(cnn, cnn_calib):
    with pytest.raises(ValueError, match="calibration"):
        jaxinfer.prune(cnn, 0.3, criterion="sensitivity")
    p = jaxinfer.prune(cnn, 0.5, criterion="sensitivity", calibration=cnn_calib)
    assert p.report().method == "prune-sensitivity" and p.report().totals["pruned_layers"] == 5


def test_exclude_keeps_the_whole_group(cnn):
    p = jaxinfer.prune(cnn, 0.5, exclude=["c2"])
    rows = {r["layer"]: r for r in p.report().rows}
    assert rows["c1"]["channels_after"] == rows["c2"]["channels_after"] == 16  # c1 shares c2's group
    assert rows["c3"]["channels_after"] == 8


def test_bad_arguments(cnn):
    with pytest.raises(ValueError, match="sparsity"):
        jaxinfer.prune(cnn, 1.0)
    with pytest.raises(ValueError, match="criterion"):
        jaxinfer.prune(cnn, 0.3, criterion="l7")
    with pytest.raises(ValueError, match="prune a float model"):
        jaxinfer.prune(jaxinfer.quantize(cnn, "int8-weight"), 0.3)


def test_encoder_ffn_pruned_attention_kept(encoder, calib):
    """Transformer: the FFN's hidden width shrinks (GELU is channel-wise); q/k/v feed a head
    reshape and the residual stream is a graph input's: those keep every channel."""
    p = jaxinfer.prune(encoder, 0.25, calibration=calib)
    rows = {r["layer"]: r for r in p.report().rows}
    assert rows["l0/ffn/up/matmul"]["channels_after"] == 384
    assert rows["l0/attn/q/matmul"]["method"] == "kept" and "Reshape" in rows["l0/attn/q/matmul"]["why"]
    assert rows["l1/ffn/down/matmul"]["method"] == "kept"
    ref = _zeroed_reference(encoder, 0.25)
    np.testing.assert_allclose(p.run(calib[0])["y"], ref.run(calib[0])["y"], rtol=1e-4, atol=1e-4)


def test_save_load_round_trip_of_pruned_model(cnn, cnn_calib, tmp_path):
    p = jaxinfer.prune(cnn, 0.5)
    jaxinfer.save(p, tmp_path / "pruned")
    r = jaxinfer.load(tmp_path / "pruned")
    assert np.array_equal(p.run(cnn_calib[1])["y"], r.run(cnn_calib[1])["y"])
    assert r.report().method == "prune-l1" and r.report().rows[0]["channels_after"] == 8
    # and a pruned model quantizes like any float model
    q = jaxinfer.quantize(r, "int8-weight")
    assert np.isfinite(q.run(cnn_calib[0])["y"]).all()


def _light(name):
    from jaxinfer.bench import light_models

    return jaxinfer.load(next(p for p in light_models() if name in p.name))


def test_light_squeezenet_concat_fire_modules():
    m = _light("squeezenet")
    p = jaxinfer.prune(m, 0.3)
    t = p.report().totals
    assert t["pruned_layers"] == 25 and t["params_bytes"] < 0.8 * t["params_bytes_f32"]
    assert [s["why"] for s in t["skipped"]] == ["Softmax 'n65' reads them and is not channel-wise"]
    x = {m.inputs[0].name: np.random.default_rng(0).random((1, 3, 224, 224)).astype(np.float32)}
    assert p.run(x)[m.outputs[0].name].shape == (1, 1000, 1, 1)


def test_light_resnet50_residual_groups_pruned_alike():
    import jax

    m = _light("resnet50")
    p = jaxinfer.prune(m, 0.3)
    by_out = {n.outputs[0]: n for n in m.graph.nodes}
    kept = {r["layer"]: (r["channels_before"], r["channels_after"]) for r in p.report().rows}

    def conv_of(name):
        n = by_out[name]
        return n if n.op_type == "Conv" else conv_of(n.inputs[0])

    sums = [n for n in m.graph.nodes if n.op_type == "Sum"]
    assert len(sums) == 16
    for s in sums:  # both branches of every residual join keep the same channels
        a, b = (kept[conv_of(i).label] for i in s.inputs)
        assert a == b and a[1] < a[0]
    t = p.report().totals
    assert t["params_bytes"] < 0.6 * t["params_bytes_f32"] and t["pruned_layers"] == 53
    x = {m.inputs[0].name: jax.ShapeDtypeStruct((1, 3, 224, 224), np.float32)}
    assert jax.eval_shape(p.fn, p.params, x)[m.outputs[0].name].shape == (1, 1000)  # shapes agree end to end
