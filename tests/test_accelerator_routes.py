"""What jaxinfer does differently where XLA CPU's guarantees do not hold, checked here on CPU.

An H200 run of the suite (benchmarks/gpu_check.sh, docs/status.md) found two things:

* float32 dots and convs without a precision ran in TF32 there (LSTM/GRU/RNN 2e-4..1e-3 off
  onnxruntime): every model function now traces under full float32 precision, which shows in the
  program's text on any backend;
* XLA GPU's int8 x int8 -> int32 dots returned wrong sums and it has no integer convolutions: where
  :func:`jaxinfer.intmath.native_int8_dots` says no, integer products take the exact float route.
  Here that route is forced on CPU (the predicate patched) and must give the same numbers, with no
  integer dot or convolution left in the program.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer import arith, cpu_kernels, intmath

from .jaxprs import all_eqns

RNG = np.random.default_rng(7)


def _model(nodes, inputs, outputs, inits=(), opset=17):
    g = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])


def _program(m: jaxinfer.Model, feeds: dict) -> str:
    return jax.jit(m.fn).lower(m.params, feeds).as_text()


def _ops(text: str, op: str) -> list[str]:
    return [line for line in text.splitlines() if f"stablehlo.{op}" in line]


def _lstm_and_conv_model():
    hidden, n_in = 8, 6
    w = numpy_helper.from_array(RNG.standard_normal((1, 4 * hidden, n_in)).astype(np.float32), "W")
    r = numpy_helper.from_array(RNG.standard_normal((1, 4 * hidden, hidden)).astype(np.float32), "R")
    k = numpy_helper.from_array(RNG.standard_normal((4, 5, 3)).astype(np.float32), "K")
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["y", "", ""], hidden_size=hidden),
             helper.make_node("Squeeze", ["y", "one"], ["ys"]),
             helper.make_node("Transpose", ["ys"], ["yt"], perm=[1, 0, 2]),
             helper.make_node("Conv", ["yt", "K"], ["c"], pads=[1, 1])]
    one = numpy_helper.from_array(np.array([1], np.int64), "one")
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 1, n_in])],
                  [helper.make_tensor_value_info("c", TensorProto.FLOAT, None)], [w, r, k, one])


def test_every_float_dot_and_conv_asks_for_full_float32():
    m = jaxinfer.load(_lstm_and_conv_model())
    text = _program(m, {"x": RNG.standard_normal((5, 1, 6)).astype(np.float32)})
    products = _ops(text, "dot_general") + _ops(text, "convolution")
    assert len(products) >= 3  # input and recurrent projections, the conv
    assert all("HIGHEST" in line for line in products), [p for p in products if "HIGHEST" not in p]


def test_the_precision_is_inside_fn_whatever_the_callers_default():
    """``jax.jit(model.fn)`` under a caller's lower default still gets full float32 products."""
    m = jaxinfer.load(_lstm_and_conv_model())
    with jax.default_matmul_precision("tensorfloat32"):
        text = _program(m, {"x": RNG.standard_normal((5, 1, 6)).astype(np.float32)})
    assert all("HIGHEST" in line for line in _ops(text, "dot_general") + _ops(text, "convolution"))


@pytest.fixture
def float_int8_route(monkeypatch):
    """The route taken where int8 dots are not trusted (GPU), forced on CPU."""
    monkeypatch.setattr(intmath, "native_int8_dots", lambda: False)


def _integer_products(text: str) -> list[str]:
    """Integer dots and convolutions, and calls of our CPU int8 kernel (jaxinfer.cpu_kernels)."""
    return [line for line in _ops(text, "dot_general") + _ops(text, "convolution")
            if re.search(r"tensor<[0-9x]*(i8|ui8|i32)>", line.split("->")[0])] + \
        [line for line in _ops(text, "custom_call") if cpu_kernels.TARGET in line]


def _matmul_integer(a, b, azp, bzp):
    m = _model([helper.make_node("MatMulInteger", ["a", "b", "azp", "bzp"], ["y"])],
               [helper.make_tensor_value_info(n, TensorProto.UINT8, None) for n in ("a", "b", "azp", "bzp")],
               [helper.make_tensor_value_info("y", TensorProto.INT32, None)], opset=10)
    return jaxinfer.load(m)


@pytest.mark.parametrize("shape", [((4, 3), (3, 2)), ((2, 4, 300), (300, 5))])
def test_matmul_integer_is_exact_on_the_float_route(float_int8_route, shape):
    """The ONNX backend case that came out 1844 instead of -38 on the GPU, and a reduction longer
    than one exact float32 chunk (300 x 255 x 255 > 2**24)."""
    a = RNG.integers(0, 256, shape[0]).astype(np.uint8)
    b = RNG.integers(0, 256, shape[1]).astype(np.uint8)
    azp, bzp = np.array(12, np.uint8), np.array(200, np.uint8)
    m = _matmul_integer(a, b, azp, bzp)
    feeds = {"a": a, "b": b, "azp": azp, "bzp": bzp}
    want = (a.astype(np.int64) - 12) @ (b.astype(np.int64) - 200)
    np.testing.assert_array_equal(m.run(feeds)["y"], want)
    assert not _integer_products(_program(m, feeds))


def test_matmul_integer_known_case(float_int8_route):
    a = np.array([[11, 7, 3], [10, 6, 2], [9, 5, 1], [8, 4, 0]], np.uint8)
    b = np.array([[1, 4], [2, 5], [3, 6]], np.uint8)
    m = _matmul_integer(a, b, np.array(12, np.uint8), np.array(0, np.uint8))
    got = m.run({"a": a, "b": b, "azp": np.array(12, np.uint8), "bzp": np.array(0, np.uint8)})["y"]
    np.testing.assert_array_equal(got, [[-38, -83], [-44, -98], [-50, -113], [-56, -128]])


X = RNG.standard_normal((3, 5, 64)).astype(np.float32)
W = (RNG.standard_normal((64, 48)) / 8).astype(np.float32)


def _q8(w, axes):
    return qwix.quantize(jnp.asarray(w), jnp.int8, channelwise_axes=axes)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("transposed", [False, True])
def test_w8a8_dot_and_einsum_match_the_int8_route(monkeypatch, static, transposed):
    act = jnp.float32(np.abs(X).max() / 127) if static else None
    w = (arith.W8A8(_q8(W.T.copy(), (0,)), act, transposed=True) if transposed else arith.W8A8(_q8(W, (1,)), act))
    native = np.asarray(arith.matmul(X, w)), np.asarray(arith.einsum("bsd,dh->bsh", X, w))
    monkeypatch.setattr(intmath, "native_int8_dots", lambda: False)
    for got, want in zip((arith.matmul(X, w), arith.einsum("bsd,dh->bsh", X, w)), native):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    text = jax.jit(lambda x, w: arith.matmul(x, w)).lower(X, w).as_text()
    assert not [line for line in _ops(text, "dot_general") if "xi8>, tensor<" in line and "xi32>" in line]
    jaxpr = jax.make_jaxpr(lambda x, w: arith.matmul(x, w))(X, w)
    dots = [e for e in all_eqns(jaxpr) if e.primitive.name == "dot_general"]  # (on CPU also our kernel's route)
    assert dots and all(d.invars[1].aval.dtype == jnp.int8 for d in dots)  # the weight still goes in as int8


@pytest.mark.parametrize("exact", [True, False])
def test_w8a8_conv_without_integer_convolutions(float_int8_route, monkeypatch, exact):
    """The exact float32 conv, and (where it does not apply) the float conv of the int8 values."""
    x = RNG.standard_normal((2, 8, 12, 12)).astype(np.float32)
    k = (RNG.standard_normal((16, 8, 3, 3)) / 8).astype(np.float32)
    dn = ("NCHW", "OIHW", "NCHW")
    w = arith.W8A8(_q8(k, (0,)))
    want = np.asarray(arith.conv(x, w, (1, 1), "SAME", dimension_numbers=dn))
    if not exact:
        monkeypatch.setattr(arith, "_exact_w8a8_conv", lambda *a, **kw: None)
    conv = jax.jit(lambda x, w: arith.conv(x, w, (1, 1), "SAME", dimension_numbers=dn))
    np.testing.assert_allclose(np.asarray(conv(x, w)), want, rtol=1e-5, atol=1e-5)
    assert not _integer_products(conv.lower(x, w).as_text())


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def _feeds(m: jaxinfer.Model, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    feeds = {}
    for s in m.inputs:
        shape = [d if isinstance(d, int) and d > 0 else (2 if k == 0 else 8) for k, d in enumerate(s.shape)]
        dt = np.dtype(s.dtype)
        if dt.kind in "iu":
            feeds[s.name] = (rng.integers(0, 100, shape) if "mask" not in s.name else np.ones(shape)).astype(dt)
        else:
            feeds[s.name] = rng.standard_normal(shape).astype(dt)
    return feeds


@pytest.mark.cpu_program
@pytest.mark.parametrize("path", ["onnx/cnn_qdq.onnx", "onnx/cnn_qoperator.onnx", "onnx/cnn_dynamic.onnx",
                                  "onnx/bert_qoperator.onnx", "tflite/hybrid_mlp.tflite"])
def test_quantized_fixtures_are_bit_identical_on_the_float_route(monkeypatch, path):
    """Whole pre-quantized models: the integer products the GPU route computes in float are the same
    integers, so every output is the same bits as on the int8-dot route."""
    native = jaxinfer.load(FIXTURES / path)
    feeds = _feeds(native, 0)
    want = native.run(feeds)
    assert _integer_products(_program(native, native.check_inputs(feeds)))  # traced before the patch
    monkeypatch.setattr(intmath, "native_int8_dots", lambda: False)
    m = jaxinfer.load(FIXTURES / path)
    got = m.run(feeds)
    assert not _integer_products(_program(m, m.check_inputs(feeds)))
    for name, value in want.items():
        np.testing.assert_array_equal(got[name], value, err_msg=f"{path}: {name}")


def _dynamic_quantize_model() -> jaxinfer.Model:
    return jaxinfer.load(_model([helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "s", "z"])],
                                [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                                [helper.make_tensor_value_info(n, t, None) for n, t in
                                 (("y", TensorProto.UINT8), ("s", TensorProto.FLOAT), ("z", TensorProto.UINT8))],
                                opset=11))


def _dynamic_quantize(x):
    return _dynamic_quantize_model().run({"x": x})


def _quantize_linear(x, scale):
    m = _model([helper.make_node("QuantizeLinear", ["x", "s", "z"], ["y"])],
               [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
               [helper.make_tensor_value_info("y", TensorProto.INT8, None)],
               [numpy_helper.from_array(np.float32(scale), "s"), numpy_helper.from_array(np.int8(3), "z")], opset=13)
    return jaxinfer.load(m).run({"x": x})["y"]


def test_quantizers_divide_as_float32_on_the_gpu_route(monkeypatch):
    """Where XLA may turn ``x / scale`` into ``x * (1 / scale)`` (GPU) quantizers divide in float64:
    forced here, the same bits as float32 division, the H200's tie case included."""
    tie = np.array([0, 2, -3, -2.5, 1.34, 0.5], np.float32)  # the ONNX backend case: -2.5 / (5/255)
    x = (RNG.standard_normal(4096) * 3).astype(np.float32)
    scale = np.float32(5) / np.float32(255)

    def run():
        return [_dynamic_quantize(tie), _dynamic_quantize(x), {"y": _quantize_linear(x, scale)}]

    want = run()
    assert list(want[0]["y"]) == [153, 255, 0, 26, 221, 179]
    monkeypatch.setattr(intmath, "ieee_division", lambda: False)
    assert any("xf64>" in line for line in _ops(_program(_dynamic_quantize_model(), {"x": tie}), "divide"))
    for got, ref in zip(run(), want):
        for name in ref:
            np.testing.assert_array_equal(got[name], ref[name])
    reciprocal = np.clip(np.round(tie * (np.float32(1) / scale)) + 153, 0, 255)
    assert reciprocal[3] == 25  # what the GPU gave: the rounding this route avoids


def test_dynamic_quantize_scale_is_the_float32_quotient():
    """``(max - min) / 255`` as onnxruntime divides: XLA turned the division by the constant 255 into
    a multiplication by ``1 / 255``, 1 ulp off the quotient for most inputs, on CPU too."""
    m = _dynamic_quantize_model()
    for seed in range(20):
        x = (np.random.default_rng(seed).standard_normal(64) * 3).astype(np.float32)
        hi, lo = np.float32(max(x.max(), 0)), np.float32(min(x.min(), 0))
        assert m.run({"x": x})["s"] == (hi - lo) / np.float32(255), seed


def test_divide_matches_float32_division():
    x = RNG.standard_normal(100_000).astype(np.float32) * np.float32(1e3)
    s = np.abs(RNG.standard_normal(100_000)).astype(np.float32) + np.float32(1e-3)
    f64 = (x.astype(np.float64) / s.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(f64, x / s)  # the identity the GPU route rests on
