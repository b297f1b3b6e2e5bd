"""cpu_kernels.layer_norm and cpu_kernels.softmax (norm.cc): float32 row normalizations over the last axis,
one kernel call each. Their values match float64 references to float32 rounding for any row length; they run
under vmap (of x in the kernel, of parameters in XLA); NaN and infinities come out as XLA's; ONNX
LayerNormalization / Softmax over the last axis take them and answer as onnxruntime does."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer import cpu_kernels

AVX512 = cpu_kernels.available() and cpu_kernels.isa() == 2
needs_kernels = pytest.mark.skipif(not AVX512, reason="the layer norm kernel needs AVX-512")


def _xla(x, g, b, eps=1e-5):
    m = jnp.mean(x, -1, keepdims=True)
    c = x - m
    y = c * jax.lax.rsqrt(jnp.mean(c * c, -1, keepdims=True) + eps) * g
    return y if b is None else y + b


def _ref(x, g, b, eps=1e-5):
    x = x.astype(np.float64)
    m = x.mean(-1, keepdims=True)
    y = (x - m) / np.sqrt(((x - m) ** 2).mean(-1, keepdims=True) + eps) * g
    return y if b is None else y + b


@needs_kernels
@pytest.mark.parametrize("shape", [(8, 16, 64), (3, 5, 37), (200, 768), (4, 1), (2, 17)])
@pytest.mark.parametrize("with_beta", [True, False])
def test_matches_float64(shape, with_beta):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3 + 1).astype(np.float32)
    g = rng.standard_normal(shape[-1]).astype(np.float32)
    b = rng.standard_normal(shape[-1]).astype(np.float32) if with_beta else None
    fn = jax.jit(lambda x, g: cpu_kernels.layer_norm(x, g, b, 1e-5, _xla))
    assert cpu_kernels.TARGET_LAYER_NORM in fn.lower(x, g).as_text()
    got = np.asarray(fn(x, g))
    np.testing.assert_allclose(got, _ref(x, g, b), rtol=1e-5, atol=2e-6 * np.sqrt(shape[-1]))


@needs_kernels
def test_vmap_of_x_is_more_rows_and_of_gamma_is_xla():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 6, 32)).astype(np.float32)
    g = rng.standard_normal(32).astype(np.float32)
    b = rng.standard_normal(32).astype(np.float32)
    got = jax.vmap(lambda x: cpu_kernels.layer_norm(x, g, b, 1e-5, _xla))(x)
    np.testing.assert_allclose(np.asarray(got), _ref(x, g, b), rtol=1e-5, atol=1e-5)
    gs = np.stack([g, 2 * g])
    got = jax.vmap(lambda g: cpu_kernels.layer_norm(x[0], g, b, 1e-5, _xla))(gs)
    np.testing.assert_allclose(np.asarray(got), np.stack([_ref(x[0], g, b), _ref(x[0], 2 * g, b)]), rtol=1e-5,
                               atol=1e-5)


def test_other_dtypes_and_shapes_take_the_fallback():
    x16 = np.ones((2, 8), np.float16)
    assert np.asarray(cpu_kernels.layer_norm(x16, np.ones(8, np.float16), None, 1e-5, lambda x, g, b: x * 0 + 7)
                      ).tolist() == [[7.0] * 8] * 2
    x = np.ones((2, 8), np.float32)
    got = cpu_kernels.layer_norm(x, np.ones(4, np.float32), None, 1e-5, lambda x, g, b: x * 0 + 5)  # gamma [4]
    assert float(np.asarray(got)[0, 0]) == 5.0


def _ln_model(axis: int, shape: list[int]) -> bytes:
    c = shape[-1] if axis == -1 else int(np.prod(shape[axis:]))
    rng = np.random.default_rng(2)
    pshape = [c] if axis == -1 else shape[axis:]
    g = helper.make_graph(
        [helper.make_node("LayerNormalization", ["x", "s", "b"], ["y"], axis=axis, epsilon=1e-5)], "ln",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)],
        initializer=[numpy_helper.from_array(rng.standard_normal(pshape).astype(np.float32), "s"),
                     numpy_helper.from_array(rng.standard_normal(pshape).astype(np.float32), "b")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


@needs_kernels
@pytest.mark.parametrize("axis,takes", [(-1, True), (1, False)])
def test_onnx_layer_normalization_over_the_last_axis_takes_it(axis, takes):
    shape = [2, 5, 48]
    data = _ln_model(axis, shape)
    m = jaxinfer.load(data)
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    assert (cpu_kernels.TARGET_LAYER_NORM in m.compiled({"x": x}).as_text()) == takes
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.asarray(m.run({"x": x})["y"]), want, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("shape", [(8, 4, 16, 16), (3, 37), (5, 1), (2, 1000)])
def test_softmax_matches_xla(shape):
    x = (np.random.default_rng(sum(shape)).standard_normal(shape) * 5).astype(np.float32)
    fn = jax.jit(lambda x: cpu_kernels.softmax(x, jax.nn.softmax))
    assert cpu_kernels.TARGET_SOFTMAX in fn.lower(x).as_text()
    got = np.asarray(fn(x))
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    np.testing.assert_allclose(got, e / e.sum(-1, keepdims=True), rtol=2e-6, atol=1e-7)
    np.testing.assert_allclose(got, np.asarray(jax.nn.softmax(x)), rtol=2e-6, atol=1e-7)


@needs_kernels
def test_softmax_masks_nan_and_infinities_as_xla():
    x = np.array([[0, -np.inf, 1, 2], [np.nan, 0, 1, 2], [-np.inf] * 4, [np.inf, 0, 1, 2], [-200, 0, -100, -90]],
                 np.float32)
    got = np.asarray(jax.jit(lambda x: cpu_kernels.softmax(x, jax.nn.softmax))(x))
    np.testing.assert_allclose(got, np.asarray(jax.nn.softmax(x)), rtol=2e-6, atol=0)
    got = jax.vmap(lambda r: cpu_kernels.softmax(r, jax.nn.softmax))(x[:1])
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.nn.softmax(x[:1])), rtol=2e-6)


@needs_kernels
@pytest.mark.parametrize("opset,axis,takes", [(13, -1, True), (13, 1, False), (11, 1, True)])
def test_onnx_softmax_over_the_last_axis_takes_it(opset, axis, takes):
    """Opset 13 over the last axis; opset 11's 2-D coercion makes any axis the last of its [rows, rest]."""
    g = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"], axis=axis)], "sm",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 8])])
    data = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)]).SerializeToString()
    m = jaxinfer.load(data)
    x = np.random.default_rng(4).standard_normal((2, 3, 8)).astype(np.float32)
    assert (cpu_kernels.TARGET_SOFTMAX in m.compiled({"x": x}).as_text()) == takes
    want = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.asarray(m.run({"x": x})["y"]), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------------ GELU
def _gelu64(v: np.ndarray, approximate: str) -> np.ndarray:
    v = v.astype(np.float64)
    if approximate == "tanh":
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3)))
    from math import erfc, sqrt
    return v * 0.5 * np.vectorize(lambda t: erfc(-t / sqrt(2)))(v)


def _gelu_xla(v, approximate):
    if approximate == "tanh":
        return 0.5 * v * (1 + jnp.tanh(0.7978845608 * (v + 0.044715 * v * v * v)))
    return v * 0.5 * (1 + jax.lax.erf(v * 0.70710677))


@needs_kernels
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape, with_bias", [((8, 32, 256), True), ((3, 37), False), ((1, 5), True),
                                              ((1000, 20), False)])
def test_gelu_matches_float64(approximate, shape, with_bias):
    """Over +-12, of float64's GELU: the tanh form within 4e-7 absolutely and 2e-6 relatively (|y| > 1e-6); the erf
    form within 2.5e-7 max(1, |v|) (XLA's: 2.1e-7) and 1e-6 relatively from v = -1 (below, 1 + erf cancels, as in
    XLA's and onnxruntime's erf forms)."""
    rng = np.random.default_rng(shape[-1])
    x = (rng.standard_normal(shape) * 4).astype(np.float32)
    x.reshape(-1)[:3] = [-12.0, 12.0, 0.0]
    bias = rng.standard_normal(shape[-1]).astype(np.float32) if with_bias else None
    got = np.asarray(jax.jit(lambda x, b: cpu_kernels.gelu(x, b, approximate, lambda v: _gelu_xla(v, approximate)))(
        x, bias))
    want = _gelu64(x if bias is None else x + bias, approximate)  # the float32 sum, as the kernel takes it
    err = np.abs(got - want)
    if approximate == "tanh":
        assert err.max() < 6e-7 and (err / np.abs(want))[np.abs(want) > 1e-6].max() < 3e-6
    else:
        v = (x if bias is None else x + bias).astype(np.float64)
        assert (err / np.maximum(1, np.abs(v))).max() < 2.5e-7
        assert (err / np.abs(want))[(v >= -1) & (want != 0)].max() < 1e-6
    hlo = jax.jit(lambda x: cpu_kernels.gelu(x, bias, approximate, lambda v: _gelu_xla(v, approximate))).lower(
        x).as_text()
    assert cpu_kernels.TARGET_GELU in hlo


@needs_kernels
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_specials_as_the_formula(approximate):
    """NaN stays NaN, +inf gives +inf, -inf NaN (-inf times 0), as the composition of XLA's ops gives them."""
    x = np.array([[np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30]], np.float32)
    got = np.asarray(cpu_kernels.gelu(x, None, approximate, lambda v: _gelu_xla(v, approximate)))
    want = np.asarray(_gelu_xla(jnp.asarray(x), approximate))
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)], atol=1e-37)


@needs_kernels
def test_gelu_vmap_and_fallbacks():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 16)).astype(np.float32)
    b = rng.standard_normal((2, 16)).astype(np.float32)
    def fn(x, b):
        return cpu_kernels.gelu(x, b, "none", lambda v: _gelu_xla(v, "none"))
    both = np.asarray(jax.vmap(fn)(x, b))  # a batch of biases: XLA per member
    np.testing.assert_allclose(both, np.asarray(_gelu_xla(x + b[:, None], "none")), rtol=3e-6, atol=1e-6)
    rows = np.asarray(jax.vmap(lambda x: fn(x, b[0]))(x))  # a batch of x: more rows for the kernel
    np.testing.assert_allclose(rows, np.asarray(_gelu_xla(x + b[0], "none")), rtol=3e-6, atol=1e-6)
    half = x.astype(np.float16)
    assert cpu_kernels.gelu(half, None, "none", lambda v: _gelu_xla(v, "none")).dtype == np.float16
    with pytest.raises(ValueError, match="'none' or 'tanh'"):
        cpu_kernels.gelu(x, None, "exact", None)


@needs_kernels
@pytest.mark.parametrize("op, domain, attrs, inputs", [
    ("Gelu", "", {}, ["x"]), ("Gelu", "", {"approximate": "tanh"}, ["x"]), ("Gelu", "com.microsoft", {}, ["x"]),
    ("BiasGelu", "com.microsoft", {}, ["x", "b"]), ("FastGelu", "com.microsoft", {}, ["x", "b"]),
])
def test_onnx_gelus_take_it_and_answer_as_onnxruntime(op, domain, attrs, inputs):
    rng = np.random.default_rng(7)
    b = numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")
    graph = helper.make_graph([helper.make_node(op, inputs, ["y"], domain=domain, **attrs)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [b])
    opsets = [helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets)
    m = jaxinfer.load(proto)
    x = (rng.standard_normal((12, 64)) * 3).astype(np.float32)
    assert cpu_kernels.TARGET_GELU in m.compiled({"x": x}).as_text()
    want = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(m.run({"x": x})["y"], want, rtol=1e-5, atol=1e-6)
