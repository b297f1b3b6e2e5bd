"""The fused dynamic-quantization products: float32 rows quantized to int8 inside the kernel, then the int8
product, in one call (``cpu_kernels.int8_dot_dyn`` for jaxinfer's int8-dynamic, ``int8_dot_hybrid`` for
TFLite dynamic-range models), with the very numbers of the XLA compositions they replace, so a model
answers the same to the last bit with the kernel or without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import jaxinfer
from jaxinfer import arith, cpu_kernels
from jaxinfer.quant import fixtures

from .test_cpu_kernels import kernel_isa, narrowed  # noqa: F401 (kernel_isa: a fixture, each of the kernel's paths)

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernels on this machine "
                                "(not x86-64 with AVX2, or no C++ compiler)")


def _composition(x: jax.Array, w: jax.Array) -> jax.Array:
    """The XLA steps the kernel replaces, with XLA's own int8 dot (no kernel anywhere)."""
    xq = arith.quantize_rows(x, (x.ndim - 1,))
    acc = jax.lax.dot_general(xq.qvalue, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.int32)
    return jnp.multiply(acc, xq.scale)


def _fused(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.asarray(jax.jit(lambda x, w: cpu_kernels.int8_dot_dyn(x, w, _composition))(x, w))


def _rows(rng: np.random.Generator, m: int, k: int) -> np.ndarray:
    """Rows of very different magnitudes, one all zero, one under the smallest scale."""
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.choice([1e-3, 1.0, 50.0], (m, 1)).astype(np.float32)
    if m > 2:
        x[1] = 0.0
        x[2] *= np.float32(1e-30)
    return x


@pytest.mark.parametrize("m,k,n", [(1, 5, 1), (3, 64, 7), (8, 1024, 4096), (17, 100, 100), (64, 1030, 65),
                                   (130, 1024, 260), (48, 7, 9), (2, 8, 16)])
def test_same_numbers_as_the_xla_composition(kernel_isa, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x, w = _rows(rng, m, k), rng.integers(-128, 128, (n, k), dtype=np.int8)
    np.testing.assert_array_equal(_fused(x, w), np.asarray(jax.jit(_composition)(x, w)))


def test_rounding_boundaries_round_half_to_even(kernel_isa):
    """x * (1 / scale) landing on .5 (and on the clip edges) rounds as jnp.round does: half to even."""
    x = np.array([[127.5, 0.5, 1.5, 2.5, -0.5, -1.5, -127.5, 126.5, 3.5, -2.5, 0.25, 64.5]], np.float32)
    w = np.eye(12, dtype=np.int8)
    got = _fused(x, w)
    np.testing.assert_array_equal(got, np.asarray(jax.jit(_composition)(x, w)))
    np.testing.assert_array_equal(got[0], np.clip(np.round(x[0]), -128, 127))  # scale 1: the int8 values


@pytest.mark.parametrize("m", [6, 40])  # the row path; the panels (rows quantized as each thread packs them)
def test_non_finite_rows_stay_in_their_row(kernel_isa, m):
    """A row holding inf or NaN comes out non-finite; the other rows are exact."""
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((m, 40)).astype(np.float32), rng.integers(-128, 128, (24, 40), dtype=np.int8)
    x[2, 5], x[4, 0] = np.inf, np.nan
    got, want = _fused(x, w), np.asarray(jax.jit(_composition)(x, w))
    assert np.isnan(got[4]).all() and not np.isfinite(got[2]).all()
    keep = [i for i in range(m) if i not in (2, 4)]
    np.testing.assert_array_equal(got[keep], want[keep])


def test_batched_rows_and_vmap():
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((3, 5, 64)).astype(np.float32), rng.integers(-128, 128, (32, 64), dtype=np.int8)
    want = np.asarray(jax.jit(_composition)(x, w))
    np.testing.assert_array_equal(_fused(x, w), want)
    got = jax.jit(jax.vmap(lambda xi: cpu_kernels.int8_dot_dyn(xi, w, _composition)))(x)
    np.testing.assert_array_equal(np.asarray(got), want)
    ws = np.stack([w, w[::-1]])  # a batch of weights: the composition per member
    got = jax.jit(jax.vmap(lambda xi, wi: cpu_kernels.int8_dot_dyn(xi, wi, _composition)))(x[:2], ws)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.vmap(_composition)(x[:2], ws)))


def test_declined_shapes_take_the_composition():
    """Where :func:`cpu_kernels.takes` declines the product (the AVX2 path past MAX_ROWS), XLA's steps run."""
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((cpu_kernels.MAX_ROWS + 1, 32)).astype(np.float32), np.ones((8, 32), np.int8)
    fn = jax.jit(lambda x, w: cpu_kernels.int8_dot_dyn(x, w, _composition))
    with narrowed(1):
        assert cpu_kernels.TARGET_DYN not in fn.lower(x, w).as_text()
        np.testing.assert_array_equal(np.asarray(fn(x, w)), np.asarray(jax.jit(_composition)(x, w)))


def test_other_backends_lower_to_the_composition():
    x, w = jnp.zeros((8, 64), jnp.float32), jnp.zeros((32, 64), jnp.int8)
    fn = jax.jit(lambda x, w: cpu_kernels.int8_dot_dyn(x, w, _composition))
    for platform in ("cuda", "tpu"):
        text = export.export(fn, platforms=[platform])(x, w).mlir_module()
        assert cpu_kernels.TARGET_DYN not in text and "dot_general" in text


@pytest.mark.parametrize("x,w,what", [
    (np.zeros((2, 4), np.int8), np.zeros((3, 4), np.int8), "float32 x"),
    (np.zeros((2, 4), np.float32), np.zeros((3, 5), np.int8), r"\[3, 5\]"),
    (np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32), "int8 w"),
])
def test_bad_operands_are_named(x, w, what):
    with pytest.raises(ValueError, match=what):
        cpu_kernels.int8_dot_dyn(x, w, _composition)


def test_int8_dynamic_encoder_takes_the_fused_kernel_and_keeps_its_answers(monkeypatch):
    """Every w8a8 product of an int8-dynamic encoder is one fused call, and its output is bit-identical to
    the program built without our kernels (the weight scales and bias stay in XLA's fusion in both)."""
    proto = fixtures.encoder(64, 128, 1)
    base = jaxinfer.load(proto.SerializeToString())
    feeds = fixtures.inputs(2, 8, 64, seed=1)
    fused = jaxinfer.quantize(base, "int8-dynamic")
    text = fused.compiled(feeds)
    text = getattr(text, "exe", text).as_text()
    assert text.count(f'custom_call_target="{cpu_kernels.TARGET_DYN}"') == 6  # q, k, v, o, ffn up, ffn down
    assert f'custom_call_target="{cpu_kernels.TARGET}"' not in text
    got = fused.run(feeds)["y"]
    monkeypatch.setattr(cpu_kernels, "takes", lambda *a: False)  # XLA's dots and fusions only
    plain = jaxinfer.quantize(base, "int8-dynamic")
    np.testing.assert_array_equal(got, plain.run(feeds)["y"])


# ------------------------------------------------------------------ TFLite dynamic-range (hybrid) rows
def _hybrid_composition(asymmetric: bool):
    from jaxinfer.converters.tflite import quant as Q
    from jaxinfer.intmath import zp_matmul

    def f(x, w):
        q, sf, off = Q.dynamic_quantize_rows(x, asymmetric)
        return zp_matmul(q, off[:, None] if asymmetric else None, w, None, trans_b=True), sf
    return f


def _hybrid_layer(asymmetric: bool, scales, bias=None, clamp=None):
    """The converter's hybrid layer in XLA: sums * (row scale * scales) + bias, clipped."""
    fn = _hybrid_composition(asymmetric)

    def f(x, w):
        acc, sf = fn(x, w)
        y = acc.astype(np.float32) * (sf[:, None] * jnp.asarray(scales, jnp.float32))
        if bias is not None or clamp is not None:
            y = y + (0.0 if bias is None else jnp.asarray(bias))
        return y if clamp is None else jnp.clip(y, *clamp)
    return f


FINISHES = {"plain": (False, None), "bias": (True, None), "bias_relu": (True, (0.0, np.inf)),
            "relu6": (False, (0.0, 6.0)), "bias_n1_to_1": (True, (-1.0, 1.0))}


@pytest.mark.parametrize("finish", list(FINISHES))
@pytest.mark.parametrize("asymmetric", [True, False], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("m,k,n", [(1, 256, 512), (8, 512, 512), (3, 13, 7), (17, 100, 33), (2, 8, 10)])
def test_hybrid_layer_same_numbers_as_the_converter(kernel_isa, asymmetric, m, k, n, finish):
    """The layer equals the converter's composition bit for bit (float64 scale and zero point, round half
    away from zero, the multiply-adds XLA contracts, the clamp) for rows of one sign, both signs, and all
    zeros, with one weight scale and with one per output."""
    rng = np.random.default_rng(m + k + n)
    fn = _hybrid_composition(asymmetric)
    with_bias, clamp = FINISHES[finish]
    for trial in range(4):
        x = (rng.standard_normal((m, k)) * rng.choice([1e-3, 1.0, 30.0])).astype(np.float32)
        x = np.abs(x) if trial == 1 else -np.abs(x) if trial == 2 else x
        if trial == 3:
            x[0] = 0.0
        w = rng.integers(-127, 128, (n, k), dtype=np.int8)
        scales = np.float32(0.01) if trial % 2 else rng.uniform(1e-3, 0.1, n).astype(np.float32)
        bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
        got = jax.jit(lambda x, w: cpu_kernels.int8_dot_hybrid(x, w, asymmetric, scales, fn, bias=bias,
                                                               clamp=clamp))(x, w)
        want = jax.jit(_hybrid_layer(asymmetric, scales, bias, clamp))(x, w)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_hybrid_lowering_and_vmap():
    fn = _hybrid_composition(True)
    x, w = np.ones((4, 16), np.float32), np.ones((8, 16), np.int8)
    bias = np.arange(8, dtype=np.float32) - 4

    def layer(x, w):
        return cpu_kernels.int8_dot_hybrid(x, w, True, 0.5, fn, bias=bias, clamp=(0.0, 6.0))

    call = jax.jit(layer)
    assert cpu_kernels.TARGET_HYBRID in call.lower(x, w).as_text()
    text = export.export(call, platforms=["cuda"])(x, w).mlir_module()
    assert cpu_kernels.TARGET_HYBRID not in text
    xs = np.random.default_rng(0).standard_normal((3, 4, 16)).astype(np.float32)
    got = jax.jit(jax.vmap(lambda xi: layer(xi, w)))(xs)
    want = jax.jit(jax.vmap(lambda xi: _hybrid_layer(True, 0.5, bias, (0.0, 6.0))(xi, w)))(xs)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    with pytest.raises(ValueError, match="float32 x"):
        cpu_kernels.int8_dot_hybrid(x.astype(np.int8), w, True, 0.5, fn)


def test_hybrid_tflite_model_answers_the_same_without_the_kernel(monkeypatch):
    from tests.fixtures.tflite.make_fixtures import build_hybrid_mlp

    data = build_hybrid_mlp(4)
    m = jaxinfer.load(data)
    feeds = {m.inputs[0].name: np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)}
    text = m.compiled(feeds)
    assert getattr(text, "exe", text).as_text().count(cpu_kernels.TARGET_HYBRID) >= 3
    got = np.asarray(next(iter(m.run(feeds).values())))
    monkeypatch.setattr(cpu_kernels, "takes", lambda *a: False)
    plain = jaxinfer.load(data)
    np.testing.assert_array_equal(got, np.asarray(next(iter(plain.run(feeds).values()))))


@pytest.mark.parametrize("asymmetric", [True, False], ids=["asymmetric", "symmetric"])
def test_hybrid_rows_with_nan_or_inf_leave_the_other_rows_alone(asymmetric):
    rng = np.random.default_rng(7)
    x, w = rng.standard_normal((5, 40)).astype(np.float32), rng.integers(-127, 128, (9, 40), dtype=np.int8)
    x[1, 3], x[3, 0] = np.nan, -np.inf
    bias = rng.standard_normal(9).astype(np.float32)
    fn = _hybrid_composition(asymmetric)
    got = jax.jit(lambda x, w: cpu_kernels.int8_dot_hybrid(x, w, asymmetric, 0.02, fn, bias=bias,
                                                           clamp=(0.0, np.inf)))(x, w)
    want = jax.jit(_hybrid_layer(asymmetric, 0.02, bias, (0.0, np.inf)))(x, w)
    keep = [0, 2, 4]
    np.testing.assert_array_equal(np.asarray(got)[keep], np.asarray(want)[keep])


# ------------------------------------------------------------------ ONNX DynamicQuantizeLinear
def _dql():
    from jaxinfer.converters.onnx.ops import quant as onnx_quant

    return onnx_quant._dynamic_quantize


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (8, 16, 128), (2, 64, 33)])
def test_dynamic_quantize_linear_same_numbers_as_the_converter(shape):
    """uint8 values, scale and zero point equal the converter's XLA composition (float64 quotients, true
    division, round half to even) for mixed, one-signed, all-zero and tie-laden tensors."""
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    fn = _dql()
    for trial in range(5):
        x = (rng.standard_normal(shape) * rng.choice([1e-4, 1.0, 100.0])).astype(np.float32)
        x = np.abs(x) if trial == 1 else -np.abs(x) if trial == 2 else x
        if trial == 3:
            x[...] = 0.0
        if trial == 4:
            x = np.round(x * 4) / 4  # many values on .5 steps of the scale
        got = jax.jit(lambda x: cpu_kernels.dynamic_quantize_u8(x, fn))(x)
        want = jax.jit(fn)(x)
        for g, e in zip(got, want):
            assert np.asarray(g).dtype == np.asarray(e).dtype and np.shape(g) == np.shape(e)
            np.testing.assert_array_equal(np.asarray(g), np.asarray(e))


def test_dynamic_quantize_linear_onnx_tie_case_and_routes():
    fn = _dql()
    tie = np.array([0, 2, -3, -2.5, 1.34, 0.5], np.float32)  # the ONNX backend case: -2.5 / (5 / 255)
    call = jax.jit(lambda x: cpu_kernels.dynamic_quantize_u8(x, fn))
    assert list(np.asarray(call(tie)[0])) == [153, 255, 0, 26, 221, 179]
    assert cpu_kernels.TARGET_DQL in call.lower(tie).as_text()
    big = np.ones(cpu_kernels.DQL_MAX_ELEMENTS + 1, np.float32)
    assert cpu_kernels.TARGET_DQL not in call.lower(big).as_text()  # XLA's parallel loops
    assert cpu_kernels.TARGET_DQL not in export.export(call, platforms=["cuda"])(tie).mlir_module()
    xs = np.random.default_rng(1).standard_normal((3, 10)).astype(np.float32)
    got = jax.jit(jax.vmap(lambda x: cpu_kernels.dynamic_quantize_u8(x, fn)))(xs)
    for g, e in zip(got, jax.vmap(fn)(xs)):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
