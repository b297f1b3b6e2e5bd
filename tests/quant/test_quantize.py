import numpy as np
import pytest

import jaxinfer
from jaxinfer import arith
from jaxinfer.quant import QuantizedModel, quantize


@pytest.mark.parametrize("method", ["int8-weight", "int8-dynamic", "dynamic_int8"])
def test_int8_numerics_and_size(encoder, calib, method):
    before = dict(encoder.params)
    q = quantize(encoder, method, calibration=calib)
    assert isinstance(q, QuantizedModel) and q is not encoder
    assert all(encoder.params[k] is v for k, v in before.items())  # the old model is untouched
    t = q.report().totals
    assert t["cosine"] >= 0.999
    assert t["quantized_weights_ratio"] >= 3.9
    assert t["params_bytes"] < t["params_bytes_f32"] / 3
    assert len(q.report().rows) == 12
    y = q.run(calib[0])["y"]
    assert y.dtype == np.float32 and y.shape == calib[0]["x"].shape


@pytest.mark.parametrize("observer", ["minmax", "percentile", "mse"])
def test_int8_static_observers(encoder, calib, observer):
    q = quantize(encoder, "int8-static", calibration=calib, observer=observer)
    kinds = {arith.kind(v) for v in q.params.values()}
    assert "int8-static" in kinds
    assert q.report().totals["cosine"] >= 0.995


def test_int8_static_needs_calibration(encoder):
    with pytest.raises(ValueError, match="calibration"):
        quantize(encoder, "int8-static")


def test_exclude_globs(encoder):
    q = quantize(encoder, "int8-dynamic", exclude=["*ffn*", "l1.attn.q.w"])
    quantized = {k for k, v in q.params.items() if arith.is_quantized(v)}
    assert quantized == {f"l{i}.attn.{n}.w" for i in (0, 1) for n in "qkvo"} - {"l1.attn.q.w"}
    assert not any(arith.is_quantized(v) for v in quantize(encoder, "int8-weight", exclude=["op:MatMul"]).params.values())


@pytest.mark.parametrize("method", ["bf16", "fp16", "mixed"])
def test_low_precision(encoder, calib, method):
    q = quantize(encoder, method, calibration=calib)
    out = q.run(calib[0])["y"]
    assert out.dtype == np.float32
    assert q.report().totals["cosine"] >= 0.999
    assert q.report().totals["quantized_weights_ratio"] == 2.0


def test_bf16_activations_flow_in_bf16_with_f32_softmax(encoder):
    q = quantize(encoder, "bf16")
    ops = [(n.op_type, n.attrs.get("to")) for n in q.graph.nodes if n.op_type == "Cast"]
    assert (("Cast", 16) in ops) and (("Cast", 1) in ops)
    soft = [n for n in q.graph.nodes if n.op_type == "Softmax"]
    assert all(i.endswith(f"__f32@{n.name}") for n in soft for i in n.inputs)


def test_report_text(encoder, calib):
    text = str(quantize(encoder, "int8-dynamic", calibration=calib).report())
    assert "l0/ffn/up/matmul" in text and "end to end: cosine" in text


def test_unknown_method(encoder):
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize(encoder, "int3")


def test_auto_meets_budget(encoder, calib):
    q = quantize(encoder, "auto", calibration=calib, budget={"cosine": 0.9999})
    t = q.report().totals
    assert t["budget_met"] and t["cosine"] >= 0.9999
    methods = {r["method"] for r in q.report().rows}
    assert methods <= {"int8-dynamic", "bf16", "f32"}


def test_light_cnn_convs_quantize_int8_and_keep_top1():
    """The spatial-first jaxinfer::Conv weights (passes.layout) quantize per output channel."""
    import numpy as np

    from jaxinfer.bench import light_models

    path = next(p for p in light_models() if "squeezenet" in p.name)
    m = jaxinfer.load(path)
    q = jaxinfer.quantize(m, "int8-weight")
    x = {m.inputs[0].name: np.random.default_rng(0).random((1, 3, 224, 224)).astype(np.float32) * 1e-3}
    convs = [n for n in m.graph.nodes if n.op_type == "Conv"]
    assert convs and all(n.domain == "jaxinfer" for n in convs)
    rows = q.report().rows  # convs whose (deduplicated) weight is shared with another conv are skipped, and said so
    assert rows and all(r["bytes_after"] * 3 < r["bytes_before"] for r in rows)
    a, b = m.run(x)[m.outputs[0].name], q.run(x)[q.outputs[0].name]
    assert a.shape == b.shape and np.isfinite(b).all()


@pytest.mark.parametrize("method", ["int8-dynamic", "int8-static"])
def test_w8a8_conv_filters_are_stored_as_the_kernel_reads_them(method):
    """An ungrouped conv's HWIO filter is held OHWI (output channels first, as the int8 kernel reads it), so the
    program copies no filter per call; a depthwise one stays HWIO; shapes and outputs speak of HWIO."""
    import re

    from .cnn import images, small_cnn

    m = jaxinfer.load(small_cnn(c=16, hw=32))
    feeds = images(2, seed=5, hw=32)
    q = quantize(m, method, calibration=[images(2, seed=6, hw=32)] if method == "int8-static" else None,
                 measure=False)
    convs = {k: v for k, v in q.params.items() if isinstance(v, arith.W8A8) and v.ndim == 4}
    assert convs
    for name, w in convs.items():
        hwio = np.asarray(m.params[name]).shape
        assert w.shape == hwio
        assert w.transposed == (hwio[2] != 1), name                     # the depthwise filter (I = 1) as it was
        if w.transposed:
            assert w.w.qvalue.shape == (hwio[3], *hwio[:3]) and w.w.scale.shape == (hwio[3], 1, 1, 1)
            np.testing.assert_array_equal(np.asarray(arith.untransposed(w).qvalue).shape, hwio)
    text = q.compiled(feeds).as_text()
    filter_copy = r"= s8\[[\d,]+\]\{[\d,]+\} (fusion|copy|transpose)\(%params_[^,)]*qvalue"
    assert not re.search(filter_copy, text)
    ref = m.run(feeds)["y"]
    got = q.run(feeds)["y"]
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.999


def _grouped_cnn():
    """x [N, 8, 16, 16] -> Conv group 2 (8 -> 16) -> Relu -> Conv group 4 (16 -> 16, 3x3) -> y."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(21)
    w1 = (rng.standard_normal((16, 4, 1, 1)) / 2).astype(np.float32)
    w2 = (rng.standard_normal((16, 4, 3, 3)) / 6).astype(np.float32)
    b2 = (rng.standard_normal(16) / 10).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="g2", group=2),
             helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["y"], name="g4", group=4, pads=[1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "grouped",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16, 16, 16])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
                               numpy_helper.from_array(b2, "b2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("method", ["int8-weight", "int8-dynamic", "int8-static"])
def test_grouped_convs_run_per_group(method):
    """Quantized grouped convolutions run as one ungrouped product per group (the int8 kernel where there is one),
    never as XLA's grouped convolution, and stay close to the float model; each group keeps its own scales."""
    m = jaxinfer.load(_grouped_cnn())
    feeds = {"x": np.random.default_rng(22).standard_normal((2, 8, 16, 16)).astype(np.float32)}
    cal = [{"x": np.random.default_rng(23 + i).standard_normal((2, 8, 16, 16)).astype(np.float32)} for i in range(2)]
    q = quantize(m, method, calibration=cal if method == "int8-static" else None, measure=False)
    assert {r["layer"] for r in q.report().rows} == {"g2", "g4"}
    assert "feature_group_count" not in q.compiled(feeds).as_text()
    ref, got = m.run(feeds)["y"], q.run(feeds)["y"]
    cos = float((got * ref).sum() / np.linalg.norm(got) / np.linalg.norm(ref))
    assert cos > 0.999, cos


@pytest.mark.parametrize("transposed", [False, True])
def test_split_channels_keeps_each_parts_scales(transposed):
    import jax.numpy as jnp

    rng = np.random.default_rng(24)
    w = rng.standard_normal((3, 3, 4, 12)).astype(np.float32)          # HWIO, 12 output channels
    q = arith.QArray(jnp.asarray(np.round(w * 20).astype(np.int8)), jnp.asarray(rng.random((1, 1, 1, 12)),
                     jnp.float32), None, jnp.int8)
    stored = arith.QArray(jnp.moveaxis(q.qvalue, -1, 0), jnp.moveaxis(q.scale, -1, 0), None, jnp.int8)
    w8 = arith.W8A8(stored if transposed else q, jnp.float32(0.5), transposed=transposed)
    parts = arith.split_channels(w8, 3, 3)
    assert len(parts) == 3 and all(p.shape == (3, 3, 4, 4) and p.act_scale == 0.5 for p in parts)
    for i, p in enumerate(parts):
        u = arith.untransposed(p)
        np.testing.assert_array_equal(np.asarray(u.qvalue), np.asarray(q.qvalue)[..., 4 * i:4 * i + 4])
        np.testing.assert_array_equal(np.asarray(u.scale), np.asarray(q.scale)[..., 4 * i:4 * i + 4])
    plain = arith.split_channels(w, 2, 3)
    np.testing.assert_array_equal(np.asarray(plain[1]), w[..., 6:])
