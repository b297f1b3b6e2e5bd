"""Reading a program's dots from StableHLO, and the rule that picks XLA's own loops for few-row float dots."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer import conv_lowering
from jaxinfer import model as model_mod
from jaxinfer.xla_dots import (BIG_WEIGHT, FEW_ROWS, SMALL_CONV_MACS, DotShape, conv_macs, dot_shapes,
                                prefers_library_convs, prefers_xla_loops)


def _text(fn, *shapes_dtypes):
    return jax.jit(fn).lower(*(jnp.zeros(s, d) for s, d in shapes_dtypes)).as_text()


def test_dot_shapes_reads_rows_and_weight():
    attn = lambda q, k: lax.dot_general(q, k, (((3,), (3,)), ((0, 1), (0, 1))))  # noqa: E731
    text = _text(attn, ((2, 4, 16, 8), jnp.float32), ((2, 4, 16, 8), jnp.float32))
    assert list(dot_shapes(text)) == [DotShape("f32", 16, 16 * 8)]
    text = _text(lambda x, w: x @ w, ((3, 5, 512), jnp.float32), ((512, 1024), jnp.float32))
    assert list(dot_shapes(text)) == [DotShape("f32", 15, 512 * 1024)]
    text = _text(lambda x, w: lax.dot(x, w, preferred_element_type=jnp.int32), ((4, 64), jnp.int8),
                 ((64, 32), jnp.int8))
    assert list(dot_shapes(text)) == [DotShape("i8", 4, 64 * 32)]


@pytest.mark.parametrize(("rows", "k", "n", "dtype", "want"), [
    (8, 1024, 1024, jnp.float32, True),           # few rows, a 4 MB weight: the loops stream it faster
    (FEW_ROWS + 1, 1024, 1024, jnp.float32, False),  # many rows: the library
    (8, 64, 64, jnp.float32, False),              # a tiny weight: no reason to move off the default
    (8, 1024, 1024, jnp.int8, False),             # integer dots need the library
])
def test_prefers_xla_loops(rows, k, n, dtype, want):
    assert (k * n >= BIG_WEIGHT) or not want
    text = _text(lambda x, w: lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32),
                 ((rows, k), dtype), ((k, n), dtype))
    assert prefers_xla_loops(text) is want


def test_one_many_row_dot_keeps_the_library():
    def two(x, w, y):
        return x @ w, y @ w
    text = _text(two, ((8, 1024), jnp.float32), ((1024, 1024), jnp.float32), ((512, 1024), jnp.float32))
    assert not prefers_xla_loops(text)
    assert not prefers_xla_loops("no dots here")


def _mlp(k: int, n: int):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32) / np.sqrt(k), "W")
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "mm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n])], [w])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_model_applies_the_rule_to_its_default_options_only(monkeypatch):
    chosen = []
    real = model_mod.options_for
    monkeypatch.setattr(model_mod, "options_for", lambda low, opts: chosen.append(real(low, opts)) or chosen[-1])
    m = jaxinfer.load(_mlp(1024, 1024))
    x = np.random.default_rng(1).standard_normal((4, 1024)).astype(np.float32)
    want = x @ np.asarray(m.params["W"])
    np.testing.assert_allclose(m.run({"x": x})["y"], want, rtol=1e-4, atol=1e-4)
    if model_mod._options_apply():
        assert chosen[-1][model_mod.YNN_FUSION_FLAG] == ""  # few rows, 4 MB weight: XLA's loops
        m.run({"x": np.repeat(x, 32, axis=0)})
        assert chosen[-1][model_mod.YNN_FUSION_FLAG] == model_mod.YNN_FUSION_TYPES  # 128 rows: the library
    custom = jaxinfer.load(_mlp(1024, 1024))
    custom.compiler_options = {model_mod.YNN_FUSION_FLAG: "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,"
                               "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"} if model_mod._options_apply() else {}
    custom.run({"x": x})
    assert chosen[-1] == custom.compiler_options  # options a user set are used as set


def test_a_program_with_convolutions_keeps_the_library():
    def conv_then_fc(x, k, w):
        y = lax.conv_general_dilated(x, k, (1, 1), "SAME")
        return y.reshape(y.shape[0], -1) @ w
    text = _text(conv_then_fc, ((8, 4, 16, 16), jnp.float32), ((8, 4, 1, 1), jnp.float32),
                 ((8 * 16 * 16, 1024), jnp.float32))
    assert [d.rows for d in dot_shapes(text)] == [8]
    assert not prefers_xla_loops(text)


def test_a_dot_it_cannot_read_keeps_the_library():
    text = _text(lambda x, w: x @ w, ((8, 1024), jnp.float32), ((1024, 1024), jnp.float32))
    assert prefers_xla_loops(text)
    odd = text + "\n    %9 = stablehlo.dot_general %a, %b : (tensor<8x4xcomplex<f32>>, tensor<4x4xcomplex<f32>>) -> x\n"
    assert not prefers_xla_loops(odd)


def _conv_text(x_shape, w_shape, groups=1):
    conv = lambda x, w: lax.conv_general_dilated(x, w, (1, 1), "SAME", feature_group_count=groups)  # noqa: E731
    return _text(conv, (x_shape, jnp.float32), (w_shape, jnp.float32))


def test_conv_macs_counts_output_elements_times_taps():
    assert conv_macs(_conv_text((1, 3, 32, 32), (16, 3, 3, 3))) == 32 * 32 * 16 * 3 * 3 * 3
    assert conv_macs(_conv_text((2, 8, 16, 16), (12, 2, 3, 3), groups=4)) == 2 * 12 * 16 * 16 * 2 * 3 * 3
    assert conv_macs("no convolutions") == 0


@pytest.mark.parametrize(("x_shape", "w_shape", "want"), [
    ((1, 3, 32, 32), (16, 3, 3, 3), True),      # 0.4 M multiply-adds: the library, on the calling thread
    ((8, 32, 32, 32), (32, 32, 3, 3), False),   # 75 M: XLA's own convolution
])
def test_prefers_library_convs(x_shape, w_shape, want):
    assert (conv_macs(_conv_text(x_shape, w_shape)) <= SMALL_CONV_MACS) is want
    assert prefers_library_convs(_conv_text(x_shape, w_shape)) is want
    assert not prefers_library_convs(_text(lambda x, w: x @ w, ((8, 64), jnp.float32), ((64, 64), jnp.float32)))


def test_model_runs_small_convolutions_in_the_library(monkeypatch):
    monkeypatch.setattr(conv_lowering, "F32_KERNEL", False)  # XLA's convolutions (our CPU kernel's are no XLA ops)
    chosen = []
    real = model_mod.options_for
    monkeypatch.setattr(model_mod, "options_for", lambda low, opts: chosen.append(real(low, opts)) or chosen[-1])
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 8, 3, 3)).astype(np.float32), "W")  # 8 channels in: a
    # real convolution (a first layer of <= 4 channels becomes a patch-matrix dot, jaxinfer/conv_lowering.py)
    g = helper.make_graph([helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])], "conv",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8, "h", "h"])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8, "h", "h"])], [w])
    m = jaxinfer.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    small = rng.standard_normal((1, 8, 16, 16)).astype(np.float32)  # 0.15 M multiply-adds
    big = rng.standard_normal((4, 8, 64, 64)).astype(np.float32)  # 9.4 M
    w_np = numpy_helper.to_array(w)
    ref = jax.jit(lambda x: lax.conv_general_dilated(x, jnp.asarray(w_np), (1, 1), "SAME", precision=lax.Precision.HIGHEST))
    for x, library in ((small, True), (big, False)):
        np.testing.assert_allclose(m.run({"x": x})["y"], ref(x), rtol=1e-4, atol=1e-4)
        if model_mod._options_apply():
            assert (chosen[-1][model_mod.YNN_FUSION_FLAG] == model_mod.TUNE_CANDIDATES["dot+conv"][
                model_mod.YNN_FUSION_FLAG]) is library
