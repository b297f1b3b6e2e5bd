"""buffers.cc: cpu_kernels.row_absmax, each leading index's max |x| of a float32 tensor, exactly, with x itself back
from the call (aliased), which int8-dynamic convolutions take their per-sample scales from, channels-last, with
the same numbers as XLA's reduction; and cpu_kernels.keep, x through a call, which ONNX models apply to values a
convolution reads together with other nodes (passes.layout.shared_conv_inputs) without changing an output."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxinfer
from jaxinfer import arith, conv_lowering, cpu_kernels
from jaxinfer.passes.layout import shared_conv_inputs

from .quant.cnn import images, small_cnn

AVX512 = cpu_kernels.available() and cpu_kernels.isa() == 2
needs_kernels = pytest.mark.skipif(not AVX512, reason="the row absmax kernel needs AVX-512")
needs_library = pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernels here")
TARGET = cpu_kernels.TARGET_ROW_ABSMAX


def _xla(x):
    return jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim)))


def _call():
    return jax.jit(lambda v: cpu_kernels.row_absmax(v, _xla))


@needs_kernels
@pytest.mark.parametrize("shape", [(8, 200704), (1, 1 << 14), (3, 70001), (8, 55, 55, 64), (2, 16, 33, 33)])
def test_exact_and_x_back_unchanged(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(shape[0], -1)
    flat[0, 7] = -40.0                    # the largest magnitude negative
    flat[-1, -1] = 17.5                   # ... in the very last value (a chunk's tail)
    fn = _call()
    assert TARGET in fn.lower(x).as_text()
    back, amax = fn(x)
    np.testing.assert_array_equal(np.asarray(back), x)
    np.testing.assert_array_equal(np.asarray(amax), np.abs(flat).max(1))
    assert amax.shape == (shape[0],) and amax.dtype == jnp.float32


@needs_kernels
def test_nan_inf_and_signed_zero():
    x = np.zeros((4, 1 << 15), np.float32)
    x[0, 3] = np.nan
    x[1, 9] = -np.inf
    x[2, :] = -0.0
    x[3, 5], x[3, 1 << 14] = np.nan, np.inf    # a NaN wins over an infinity, whichever chunk holds it
    _, amax = _call()(x)
    amax = np.asarray(amax)
    assert np.isnan(amax[0]) and amax[1] == np.inf and np.isnan(amax[3])
    assert amax[2] == 0.0 and not np.signbit(amax[2])


@needs_kernels
def test_small_rows_other_dtypes_and_vmap():
    rng = np.random.default_rng(0)
    small = rng.standard_normal((8, 100)).astype(np.float32)     # a product's rows: XLA's reduction
    assert TARGET not in _call().lower(small).as_text()
    half = small.astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.row_absmax(half, _xla)[1]), np.asarray(_xla(half)))
    batch = rng.standard_normal((3, 2, 1 << 14)).astype(np.float32)   # vmap of the rows: one call of 6 rows
    fn = jax.jit(jax.vmap(lambda v: cpu_kernels.row_absmax(v, _xla)[1]))
    assert fn.lower(batch).as_text().count(TARGET) == 1
    np.testing.assert_array_equal(np.asarray(fn(batch)), np.abs(batch).max(2))
    with cpu_kernels.suppressed():
        assert TARGET not in _call().lower(batch[0]).as_text()


@needs_kernels
def test_quantize_rows_per_sample_matches_xla():
    x = np.random.default_rng(1).standard_normal((4, 16, 32, 32)).astype(np.float32) * 3
    x[2] = 0.0                                                      # an all-zero sample: scale 1
    fn = lambda v: (lambda q: (q.qvalue, q.scale))(arith.quantize_rows(v, (1, 2, 3)))  # noqa: E731
    assert TARGET in jax.jit(fn).lower(x).as_text()
    q, s = jax.jit(fn)(x)
    with cpu_kernels.suppressed():
        q0, s0 = jax.jit(fn)(x)
    np.testing.assert_array_equal(np.asarray(q), np.asarray(q0))
    np.testing.assert_array_equal(np.asarray(s), np.asarray(s0))
    assert float(s[2].reshape(())) == 1.0


@needs_kernels
@pytest.mark.parametrize("batch", [1, 3])
def test_int8_dynamic_cnn_takes_it_and_answers_as_xla(batch):
    """A CNN of 16 x 32 x 32 activations (a residual join, a depthwise conv, one value read by two convs),
    int8-dynamic: its per-sample scales come from the kernel, and its outputs are those of the same model
    traced without our kernels."""
    proto, feeds = small_cnn(c=16, hw=32), images(batch, seed=3, hw=32)
    q = jaxinfer.quantize(jaxinfer.load(proto), "int8-dynamic", measure=False)
    assert TARGET in q.compiled(feeds).as_text()
    got = q.run(feeds)["y"]
    with cpu_kernels.suppressed():
        ref = jaxinfer.quantize(jaxinfer.load(proto), "int8-dynamic", measure=False).run(feeds)["y"]
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------------------- keep
@needs_library
@pytest.mark.parametrize("dtype", [np.float32, np.int8, jnp.bfloat16])
def test_keep_hands_x_back(dtype):
    x = (np.random.default_rng(0).standard_normal((2, 5, 7, 3)) * 50).astype(dtype)
    fn = jax.jit(lambda v: cpu_kernels.keep(v + v) - v)   # a value XLA would otherwise fuse into its reader
    assert cpu_kernels.TARGET_KEEP in fn.lower(x).as_text()
    np.testing.assert_array_equal(np.asarray(fn(x)), np.asarray(jax.jit(lambda v: v + v - v)(x)))
    batched = jax.jit(jax.vmap(cpu_kernels.keep))
    assert batched.lower(x).as_text().count(cpu_kernels.TARGET_KEEP) == 1
    np.testing.assert_array_equal(np.asarray(batched(x)), np.asarray(x))
    with cpu_kernels.suppressed():
        assert cpu_kernels.TARGET_KEEP not in jax.jit(cpu_kernels.keep).lower(x).as_text()


@needs_library
def test_kept_channels_last_is_x():
    x = np.random.default_rng(1).standard_normal((2, 4, 6, 5)).astype(np.float32)
    fn = jax.jit(conv_lowering.kept_channels_last)
    assert cpu_kernels.TARGET_KEEP in fn.lower(x).as_text()
    np.testing.assert_array_equal(np.asarray(fn(x)), x)
    assert conv_lowering.kept_channels_last(x) is x                  # host values are left alone
    v = jnp.ones((3, 4))                                              # no channels to put last
    assert conv_lowering.kept_channels_last(v) is v


def test_shared_conv_inputs_names_values_a_conv_reads_with_other_nodes():
    g = jaxinfer.load(small_cnn(c=16, hw=32)).graph
    # r2 feeds two convolutions; c1 a relu and an add (no conv); the graph input x only its stem conv
    assert shared_conv_inputs(g) == {"r2"}


@needs_library
def test_models_keep_them_and_answer_the_same():
    import jaxinfer.model as jm

    proto, feeds = small_cnn(c=16, hw=32), images(2, seed=4, hw=32)
    m = jaxinfer.load(proto)
    assert cpu_kernels.TARGET_KEEP in m.compiled(feeds).as_text()
    got = m.run(feeds)["y"]
    original = jm.shared_conv_inputs
    try:
        jm.shared_conv_inputs = lambda graph: frozenset()
        plain = jaxinfer.load(proto)
    finally:
        jm.shared_conv_inputs = original
    assert cpu_kernels.TARGET_KEEP not in plain.compiled(feeds).as_text()
    np.testing.assert_allclose(got, plain.run(feeds)["y"], rtol=1e-6, atol=1e-6)


@needs_kernels
def test_wrong_operands_named():
    """Called with operands the wrappers never pass, the kernels answer with an error naming what they expect."""
    x = np.ones((2, 1 << 14), np.float32)
    bad_y = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct((3,), jnp.float32))
    expected = r"jaxinfer_f32_row_absmax: expected x \[R, \.\.\.\], x_out of x's shape and y \[R\]"
    with pytest.raises(Exception, match=expected):
        jax.block_until_ready(jax.jit(lambda v: jax.ffi.ffi_call(TARGET, bad_y)(v))(x))
    with pytest.raises(Exception, match=r"jaxinfer_keep: expected y of x's type and size"):
        out = jax.ShapeDtypeStruct(x.shape, jnp.int32)
        jax.block_until_ready(jax.jit(lambda v: jax.ffi.ffi_call(cpu_kernels.TARGET_KEEP, out)(v))(x))
