"""cpu_kernels.f32_int8w_dot, float32 rows times an int8 [K, N] weight widened in registers (the int8-weight
method's MatMul product): float32 accuracy against a float64 reference for odd sizes (K and N not multiples of
16 or 64, N over many 64-column work items with a partial last one, one row, 1-7 leftover rows, leading dims), NaN and infinities kept, the XLA route past
INT8W_MAX_ROWS and under vmap of the weight, operands of the wrong kind named, and an int8-weight model
taking it with the same answers as without the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxinfer import cpu_kernels

AVX512 = cpu_kernels.available() and cpu_kernels.isa() == 2
needs_kernels = pytest.mark.skipif(not AVX512, reason="the weight-only kernel needs AVX-512")


def _xla(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _operands(rng, lead, k, n):
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    w = rng.integers(-128, 128, (k, n)).astype(np.int8)
    return x, w


def _check(x, w, got):
    want = x.astype(np.float64) @ w.astype(np.float64)
    bound = np.abs(x.astype(np.float64)) @ np.abs(w.astype(np.float64))  # float32 rounding of k terms
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= 4 * x.shape[-1] * np.finfo(np.float32).eps * bound + 1e-30)


def _takes_kernel(x, w) -> bool:
    text = jax.jit(lambda x, w: cpu_kernels.f32_int8w_dot(x, w, _xla)).lower(x, w).as_text()
    return cpu_kernels.TARGET_F32_I8W in text


@needs_kernels
@pytest.mark.parametrize("lead,k,n", [((1,), 1, 1), ((1,), 1024, 4096), ((8,), 4096, 1024), ((3,), 17, 5),
                                      ((5,), 33, 70), ((9,), 100, 129), ((13,), 64, 64), ((2, 3), 47, 200),
                                      ((64,), 300, 65), ((7,), 2, 1000), ((16,), 129, 31), ((1,), 1500, 1100),
                                      ((9,), 600, 1300), ((13,), 1025, 2049)])
def test_matches_float64(lead, k, n):
    rng = np.random.default_rng(k * 7 + n)
    x, w = _operands(rng, lead, k, n)
    assert _takes_kernel(x, w)
    got = np.asarray(jax.jit(lambda x, w: cpu_kernels.f32_int8w_dot(x, w, _xla))(x, w))
    _check(x, w, got)
    _check(x, w, np.asarray(jax.jit(_xla)(x, w)))  # XLA's float32 sums are as far from float64 as ours


@needs_kernels
def test_extreme_weights_nan_and_inf():
    rng = np.random.default_rng(3)
    x, w = _operands(rng, (6,), 80, 40)
    w[:, :3] = -128
    w[:, 3:6] = 127
    x[1, 5] = np.nan
    x[2, 7] = np.inf
    x[4] *= 1e30
    got = np.asarray(jax.jit(lambda x, w: cpu_kernels.f32_int8w_dot(x, w, _xla))(x, w))
    assert np.isnan(got[1]).all()
    want = x.astype(np.float64) @ w.astype(np.float64)
    np.testing.assert_array_equal(np.isinf(got[2]), np.isinf(want[2]))
    np.testing.assert_array_equal(np.sign(got[2]), np.sign(want[2]))
    for r in (0, 3, 4, 5):
        _check(x[r:r + 1], w, got[r:r + 1])


def test_many_rows_and_vmap_of_the_weight_take_xla():
    rng = np.random.default_rng(4)
    x, w = _operands(rng, (cpu_kernels.INT8W_MAX_ROWS + 1,), 64, 32)
    assert not _takes_kernel(x, w)
    got = np.asarray(jax.jit(lambda x, w: cpu_kernels.f32_int8w_dot(x, w, _xla))(x, w))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(_xla)(x, w)))
    ws = np.stack([w, -w])
    xs = x[:4]
    got = np.asarray(jax.jit(jax.vmap(lambda w: cpu_kernels.f32_int8w_dot(xs, w, _xla)))(ws))
    for i in range(2):
        _check(xs, ws[i], got[i])


@needs_kernels
def test_vmap_of_the_rows_is_one_call():
    rng = np.random.default_rng(5)
    x, w = _operands(rng, (3, 4), 50, 20)
    f = jax.jit(jax.vmap(lambda x: cpu_kernels.f32_int8w_dot(x, w, _xla)))
    assert f.lower(x).as_text().count(cpu_kernels.TARGET_F32_I8W) >= 1
    _check(x, w, np.asarray(f(x)))


def test_no_rows_and_no_k():
    rng = np.random.default_rng(6)
    x, w = _operands(rng, (0,), 8, 4)
    assert np.asarray(cpu_kernels.f32_int8w_dot(x, w, _xla)).shape == (0, 4)
    x, w = _operands(rng, (3,), 0, 4)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.f32_int8w_dot(x, w, _xla)), np.zeros((3, 4), np.float32))


@pytest.mark.parametrize("x,w,what", [
    (np.zeros((2, 3), np.float64), np.zeros((3, 4), np.int8), "float32 x"),
    (np.zeros((2, 3), np.float32), np.zeros((3, 4), np.uint8), "int8 w"),
    (np.zeros((2, 3), np.float32), np.zeros((4, 4), np.int8), "[K, N]"),
    (np.zeros((2, 3), np.float32), np.zeros((3,), np.int8), "[K, N]"),
])
def test_wrong_operands_named(x, w, what):
    with pytest.raises(ValueError, match="f32_int8w_dot") as e:
        cpu_kernels.f32_int8w_dot(x, w, _xla)
    assert what in str(e.value)


@needs_kernels
def test_int8_weight_model_takes_it_and_answers_as_xla_does(tmp_path):
    import subprocess
    import sys

    from jaxinfer import load, quantize
    from jaxinfer.quant import fixtures

    proto = fixtures.encoder(64, 128, 2)
    path = tmp_path / "enc.onnx"
    path.write_bytes(proto.SerializeToString())
    feeds = fixtures.inputs(1, 8, 64, seed=3)
    q = quantize(load(str(path)), "int8-weight")
    assert cpu_kernels.TARGET_F32_I8W in q.compiled(feeds).as_text()
    got = q.run(feeds)["y"]
    np.save(tmp_path / "x.npy", feeds["x"])
    # the same quantized model without our kernels (XLA's dot of the int8 weights), in a fresh process
    code = ("import sys, numpy as np, jaxinfer; from jaxinfer import quantize; "
            "q = quantize(jaxinfer.load(sys.argv[1]), 'int8-weight'); "
            "np.save(sys.argv[3], q.run({'x': np.load(sys.argv[2])})['y'])")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True, env={**__import__("os").environ, "JAXINFER_CPU_KERNELS": "0"}, timeout=300)
    np.testing.assert_allclose(got, np.load(tmp_path / "y.npy"), rtol=1e-5, atol=1e-5)
