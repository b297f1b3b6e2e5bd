"""The few-rows products of ``few_rows.cc``: cpu_kernels.f32_int8w_dot, float32 rows times an int8 [K, N] weight
widened in registers (the int8-weight method's MatMul product); cpu_kernels.f32_rows_dot, float32 rows times a
float32, bfloat16 or float16 [K, N] weight (a float MatMul's); cpu_kernels.f32_rows_dot_nk, the same of an [N, K]
weight (Gemm with transB, TFLite FULLY_CONNECTED): float32 accuracy against a float64 reference for odd sizes (K
and N not multiples of 16 or 64, N over many 64-column work items with a partial last one, one row, 1-7 leftover
rows, leading dims), NaN and infinities kept, the XLA route past the row bound and under vmap of the weight,
operands of the wrong kind named, the routes arith takes to them, and models taking them with the answers they
give without the kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxinfer import cpu_kernels

AVX512 = cpu_kernels.available() and cpu_kernels.isa() == 2
needs_kernels = pytest.mark.skipif(not AVX512, reason="the few-rows kernels need AVX-512")


class Kind:
    """One of the [K, N] products: its function, weight dtype, custom-call target and row bound."""

    def __init__(self, name, fn, dtype, target, max_rows):
        self.name, self.fn, self.dtype, self.target, self.max_rows = name, fn, dtype, target, max_rows

    def __repr__(self):
        return self.name


KINDS = [Kind("f32_int8w_dot", cpu_kernels.f32_int8w_dot, np.int8, cpu_kernels.TARGET_F32_I8W,
              cpu_kernels.INT8W_MAX_ROWS),
         Kind("f32_rows_dot", cpu_kernels.f32_rows_dot, np.float32, cpu_kernels.TARGET_F32_ROWS,
              cpu_kernels.F32_ROWS_MAX_ROWS),
         Kind("f32_rows_dot[bfloat16]", cpu_kernels.f32_rows_dot, jnp.bfloat16, cpu_kernels.TARGET_F32_BF16W,
              cpu_kernels.HALF_ROWS_MAX_ROWS),
         Kind("f32_rows_dot[float16]", cpu_kernels.f32_rows_dot, np.float16, cpu_kernels.TARGET_F32_F16W,
              cpu_kernels.HALF_ROWS_MAX_ROWS)]
kinds = pytest.mark.parametrize("kind", KINDS, ids=repr)


def _xla(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)


def _operands(rng, lead, k, n, kind=KINDS[0]):
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    if kind.dtype == np.int8:
        return x, rng.integers(-128, 128, (k, n)).astype(np.int8)
    return x, (rng.standard_normal((k, n)) * 50).astype(kind.dtype)  # 16-bit weights: exact in float32 and float64


def _check(x, w, got):
    w = np.asarray(w).astype(np.float64)
    want = x.astype(np.float64) @ w
    bound = np.abs(x.astype(np.float64)) @ np.abs(w)  # float32 rounding of k terms
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.all(np.abs(got - want) <= 4 * x.shape[-1] * np.finfo(np.float32).eps * bound + 1e-30)


def _takes_kernel(x, w, kind=KINDS[0]) -> bool:
    text = jax.jit(lambda x, w: kind.fn(x, w, _xla)).lower(x, w).as_text()
    return kind.target in text


@needs_kernels
@pytest.mark.parametrize("lead,k,n", [((1,), 1, 1), ((1,), 1024, 4096), ((8,), 4096, 1024), ((3,), 17, 5),
                                      ((5,), 33, 70), ((9,), 100, 129), ((13,), 64, 64), ((2, 3), 47, 200),
                                      ((64,), 300, 65), ((7,), 2, 1000), ((16,), 129, 31), ((1,), 1500, 1100),
                                      ((9,), 600, 1300), ((13,), 1025, 2049), ((48,), 70, 90), ((), 40, 33)])
@kinds
def test_matches_float64(kind, lead, k, n):
    rng = np.random.default_rng(k * 7 + n)
    x, w = _operands(rng, lead, k, n, kind)
    if lead[:1] == (64,) and kind.max_rows < 64:
        lead, x = (kind.max_rows,), x[:kind.max_rows]
    assert _takes_kernel(x, w, kind)
    got = np.asarray(jax.jit(lambda x, w: kind.fn(x, w, _xla))(x, w))
    _check(x, w, got)
    _check(x, w, np.asarray(jax.jit(_xla)(x, w)))  # XLA's float32 sums are as far from float64 as ours


@needs_kernels
@kinds
def test_extreme_weights_nan_and_inf(kind):
    rng = np.random.default_rng(3)
    x, w = _operands(rng, (6,), 80, 40, kind)
    w[:, :3] = -128
    w[:, 3:6] = 127
    x[1, 5] = np.nan
    x[2, 7] = np.inf
    x[4] *= 1e30
    got = np.asarray(jax.jit(lambda x, w: kind.fn(x, w, _xla))(x, w))
    assert np.isnan(got[1]).all()
    want = x.astype(np.float64) @ np.asarray(w).astype(np.float64)
    np.testing.assert_array_equal(np.isinf(got[2]), np.isinf(want[2]))
    np.testing.assert_array_equal(np.sign(got[2]), np.sign(want[2]))
    for r in (0, 3, 4, 5):
        _check(x[r:r + 1], w, got[r:r + 1])


@kinds
def test_many_rows_and_vmap_of_the_weight_take_xla(kind):
    rng = np.random.default_rng(4)
    x, w = _operands(rng, (kind.max_rows + 1,), 64, 32, kind)
    assert not _takes_kernel(x, w, kind)
    got = np.asarray(jax.jit(lambda x, w: kind.fn(x, w, _xla))(x, w))
    np.testing.assert_array_equal(got, np.asarray(jax.jit(_xla)(x, w)))
    ws = np.stack([w, -w])
    xs = x[:4]
    got = np.asarray(jax.jit(jax.vmap(lambda w: kind.fn(xs, w, _xla)))(ws))
    for i in range(2):
        _check(xs, ws[i], got[i])


@needs_kernels
@kinds
def test_vmap_of_the_rows_is_one_call(kind):
    rng = np.random.default_rng(5)
    x, w = _operands(rng, (3, 4), 50, 20, kind)
    f = jax.jit(jax.vmap(lambda x: kind.fn(x, w, _xla)))
    assert f.lower(x).as_text().count(kind.target) >= 1
    _check(x, w, np.asarray(f(x)))


@kinds
def test_no_rows_and_no_k(kind):
    rng = np.random.default_rng(6)
    x, w = _operands(rng, (0,), 8, 4, kind)
    assert np.asarray(kind.fn(x, w, _xla)).shape == (0, 4)
    x, w = _operands(rng, (3,), 0, 4, kind)
    np.testing.assert_array_equal(np.asarray(kind.fn(x, w, _xla)), np.zeros((3, 4), np.float32))


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
    if what == "int8 w":
        return
    with pytest.raises(ValueError, match="f32_rows_dot") as e:  # the float32 weight's twin, a float32 w
        cpu_kernels.f32_rows_dot(x, w.astype(np.float32), _xla)
    assert what in str(e.value)
    with pytest.raises(ValueError, match="bfloat16 or float16 w"):
        cpu_kernels.f32_rows_dot(np.zeros((2, 3), np.float32), np.zeros((3, 4), np.int8), _xla)


@needs_kernels
def test_float_matmul_takes_it_for_few_rows_by_a_large_weight():
    """arith.matmul (ONNX MatMul, Gemm without transB) of a float32 weight: few rows by a large weight take the
    few-rows kernel; more rows, or a small weight, do not; the answers stay those of a float32 dot."""
    from jaxinfer import arith, conv_lowering

    rng = np.random.default_rng(8)
    k, n = 256, conv_lowering.F32_ROWS_MIN_WEIGHTS // 256
    for lead, takes in [((1,), True), ((2, 8), True), ((cpu_kernels.F32_ROWS_MAX_ROWS,), True),
                        ((cpu_kernels.F32_ROWS_MAX_ROWS + 1,), False), ((), True)]:
        x, w = _operands(rng, lead, k, n, KINDS[1])
        f = jax.jit(arith.matmul)
        assert (cpu_kernels.TARGET_F32_ROWS in f.lower(x, w).as_text()) == takes, lead
        _check(x, w, np.asarray(f(x, w)))
    x, w = _operands(rng, (4,), 64, 64, KINDS[1])  # 4K values: XLA's dot
    assert cpu_kernels.TARGET_F32_ROWS not in jax.jit(arith.matmul).lower(x, w).as_text()


@needs_kernels
@pytest.mark.parametrize("method,target,d,ffn,tol", [("int8-weight", cpu_kernels.TARGET_F32_I8W, 64, 128, 1e-5),
                                                      (None, cpu_kernels.TARGET_F32_ROWS, 256, 1024, 1e-4)])
def test_models_take_them_and_answer_as_xla_does(tmp_path, method, target, d, ffn, tol):
    """An encoder at 8 tokens, int8-weight or float32, takes the kernel and answers as the same model does with
    our kernels off (XLA's dots, a fresh process with JAXINFER_CPU_KERNELS=0)."""
    import subprocess
    import sys

    from jaxinfer import load, quantize
    from jaxinfer.quant import fixtures

    proto = fixtures.encoder(d, ffn, 2)
    path = tmp_path / "enc.onnx"
    path.write_bytes(proto.SerializeToString())
    feeds = fixtures.inputs(1, 8, d, seed=3)
    m = load(str(path))
    m = quantize(m, method) if method else m
    assert target in m.compiled(feeds).as_text()
    got = m.run(feeds)["y"]
    np.save(tmp_path / "x.npy", feeds["x"])
    code = ("import sys, numpy as np, jaxinfer; m = jaxinfer.load(sys.argv[1]); "
            "m = jaxinfer.quantize(m, sys.argv[4]) if sys.argv[4] else m; "
            "np.save(sys.argv[3], m.run({'x': np.load(sys.argv[2])})['y'])")
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                    method or ""], check=True, env={**__import__("os").environ, "JAXINFER_CPU_KERNELS": "0"},
                   timeout=300)
    np.testing.assert_allclose(got, np.load(tmp_path / "y.npy"), rtol=tol, atol=tol)


@needs_kernels
@pytest.mark.parametrize("nk", [False, True], ids=["MatMul", "Gemm-transB"])
@pytest.mark.parametrize("a_dtype,b_dtype", [(jnp.bfloat16, jnp.bfloat16), (np.float16, np.float16),
                                             (np.float32, jnp.bfloat16), (np.float32, np.float16)])
def test_half_precision_matmuls_take_it(a_dtype, b_dtype, nk):
    """jaxinfer.quantize's bf16/fp16 models (16-bit activations and weights) and auto's middle rung (float32
    activations, bf16 weights), through arith.matmul ([K, N] weights) and arith.dot_general of a [N, K] weight: the
    few-row products read the 16-bit weight in the kernel and answer as the plain product does, in the plain
    product's dtype (float32 sums rounded once)."""
    from jaxinfer import arith

    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.standard_normal((2, 5, 512)), a_dtype)
    w = jnp.asarray(rng.standard_normal((256, 512) if nk else (512, 256)), b_dtype)
    if nk:
        f = jax.jit(lambda x, w: arith.dot_general(x, w, (((2,), (1,)), ((), ()))))
        targets = (cpu_kernels.TARGET_F32_BF16W_NK, cpu_kernels.TARGET_F32_F16W_NK)
    else:
        f = jax.jit(arith.matmul)
        targets = (cpu_kernels.TARGET_F32_BF16W, cpu_kernels.TARGET_F32_F16W)
    target = targets[0] if b_dtype == jnp.bfloat16 else targets[1]
    assert target in f.lower(x, w).as_text()
    got = f(x, w)
    want = jnp.matmul(x.astype(jnp.float32), (w.T if nk else w).astype(jnp.float32), precision=lax.Precision.HIGHEST)
    assert got.dtype == jnp.dtype(a_dtype) and got.shape == (2, 5, 256)
    tol = 1e-5 if a_dtype == np.float32 else 2 ** -7  # float32 sums; rounded to the 16-bit result
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want.astype(a_dtype), np.float32),
                               rtol=tol, atol=tol * float(jnp.abs(want).max()))


def _xla_nk(x, w):
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST)


@needs_kernels
@pytest.mark.parametrize("lead,k,n", [((1,), 1, 1), ((1,), 9216, 512), ((8,), 1024, 300), ((3,), 17, 5), ((5,), 33, 70),
                                      ((2, 3), 47, 200), ((48,), 100, 129), ((4,), 16, 64), ((7,), 2000, 7),
                                      ((), 40, 33)])
def test_nk_weights_match_float64(lead, k, n):
    """cpu_kernels.f32_rows_dot_nk: x @ w.T of a [N, K] weight (K tails of 1-15, 1-3 leftover rows of x and of w)."""
    rng = np.random.default_rng(k * 3 + n)
    x = rng.standard_normal((*lead, k)).astype(np.float32)
    w = (rng.standard_normal((n, k)) * 50).astype(np.float32)
    f = jax.jit(lambda x, w: cpu_kernels.f32_rows_dot_nk(x, w, _xla_nk))
    assert cpu_kernels.TARGET_F32_ROWS_NK in f.lower(x, w).as_text()
    _check(x, w.T, np.asarray(f(x, w)))


@needs_kernels
def test_nk_weights_nan_inf_and_the_xla_routes():
    rng = np.random.default_rng(11)
    x, w = rng.standard_normal((6, 80)).astype(np.float32), rng.standard_normal((40, 80)).astype(np.float32)
    x[1, 5], x[2, 7] = np.nan, np.inf
    got = np.asarray(jax.jit(lambda x, w: cpu_kernels.f32_rows_dot_nk(x, w, _xla_nk))(x, w))
    assert np.isnan(got[1]).all() and not np.isfinite(got[2]).any()
    _check(x[[0, 3, 4, 5]], w.T, got[[0, 3, 4, 5]])
    many = rng.standard_normal((cpu_kernels.F32_ROWS_MAX_ROWS + 1, 80)).astype(np.float32)
    f = jax.jit(lambda x, w: cpu_kernels.f32_rows_dot_nk(x, w, _xla_nk))
    assert cpu_kernels.TARGET_F32_ROWS_NK not in f.lower(many, w).as_text()
    np.testing.assert_array_equal(np.asarray(f(many, w)), np.asarray(jax.jit(_xla_nk)(many, w)))
    got = np.asarray(jax.jit(jax.vmap(lambda w: cpu_kernels.f32_rows_dot_nk(x[:1], w, _xla_nk)))(np.stack([w, -w])))
    np.testing.assert_array_equal(np.asarray(got[0]), -np.asarray(got[1]))
    with pytest.raises(ValueError, match=r"f32_rows_dot_nk takes float32 x \[..., K\] and float32, bfloat16 or float16 "
                       r"w \[N, K\]"):
        cpu_kernels.f32_rows_dot_nk(x, w.T, _xla_nk)


@needs_kernels
def test_gemm_with_transposed_weight_takes_it():
    """arith.dot_general of x [.., K] with a [N, K] float32 weight contracted on its axis 1 (ONNX Gemm transB=1,
    TFLite FULLY_CONNECTED): few rows by a large weight take the kernel; the answers are a float32 dot's."""
    from jaxinfer import arith, conv_lowering

    rng = np.random.default_rng(12)
    n, k = 300, conv_lowering.F32_ROWS_MIN_WEIGHTS // 300 + 1
    w = rng.standard_normal((n, k)).astype(np.float32)
    for rows, takes in [(1, True), (16, True), (cpu_kernels.F32_ROWS_MAX_ROWS + 1, False)]:
        x = rng.standard_normal((rows, k)).astype(np.float32)
        f = jax.jit(lambda x, w: arith.dot_general(x, w, (((1,), (1,)), ((), ()))))
        assert (cpu_kernels.TARGET_F32_ROWS_NK in f.lower(x, w).as_text()) == takes
        _check(x, w.T, np.asarray(f(x, w)))


@needs_kernels
@pytest.mark.parametrize("nk", [False, True], ids=["MatMul", "Gemm-transB"])
def test_half_precision_weights_take_it_up_to_their_own_row_bound(nk):
    """16-bit weights take the kernel up to HALF_ROWS_MAX_ROWS rows (XLA CPU's 16-bit dots lose at any count),
    float32 ones only up to F32_ROWS_MAX_ROWS."""
    from jaxinfer import arith

    rng = np.random.default_rng(13)
    w32 = rng.standard_normal((256, 512) if nk else (512, 256)).astype(np.float32)
    f = (jax.jit(lambda x, w: arith.dot_general(x, w, (((1,), (1,)), ((), ())))) if nk else jax.jit(arith.matmul))
    half = cpu_kernels.TARGET_F32_BF16W_NK if nk else cpu_kernels.TARGET_F32_BF16W
    full = cpu_kernels.TARGET_F32_ROWS_NK if nk else cpu_kernels.TARGET_F32_ROWS
    assert cpu_kernels.F32_ROWS_MAX_ROWS < 100 < cpu_kernels.HALF_ROWS_MAX_ROWS
    for rows, w, target, takes in [(100, w32.astype(jnp.bfloat16), half, True),
                                   (cpu_kernels.HALF_ROWS_MAX_ROWS + 1, w32.astype(jnp.bfloat16), half, False),
                                   (100, w32, full, False)]:
        x = rng.standard_normal((rows, 512)).astype(np.float32)
        assert (target in f.lower(x, w).as_text()) == takes, (rows, w.dtype)
        got = np.asarray(f(x, w))
        wf = np.asarray(jnp.asarray(w, jnp.float32), np.float64)
        want = np.asarray(x, np.float64) @ (wf.T if nk else wf)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
