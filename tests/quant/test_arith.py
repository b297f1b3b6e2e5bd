import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from jax import lax

from jaxinfer import arith, cpu_kernels, intmath
from jaxinfer.quant.report import cosine

from ..jaxprs import all_eqns

rng = np.random.default_rng(0)
X = rng.standard_normal((3, 5, 64)).astype(np.float32)
W = (rng.standard_normal((64, 48)) / 8).astype(np.float32)


def q8(w, axes=(1,)):
    return qwix.quantize(jnp.asarray(w), jnp.int8, channelwise_axes=axes)


def test_plain_matmul_is_highest_precision_jnp():
    np.testing.assert_array_equal(arith.matmul(X, W), jnp.matmul(X, W, precision=lax.Precision.HIGHEST))


@pytest.mark.parametrize("weight", ["int8-weight", "int8-dynamic", "int8-static"])
def test_quantized_matmul_close_to_float(weight):
    w = {"int8-weight": q8(W), "int8-dynamic": arith.W8A8(q8(W)),
         "int8-static": arith.W8A8(q8(W), jnp.float32(np.abs(X).max() / 127))}[weight]
    assert arith.kind(w) == weight
    y = arith.matmul(X, w)
    assert y.shape == (3, 5, 48) and y.dtype == jnp.float32
    assert cosine(y, X @ W) > 0.999


@pytest.mark.skipif(not intmath.native_int8_dots(), reason="int8 dots are not used on this backend")
def test_w8a8_runs_int8_dot_with_int32_accumulation():
    jaxpr = str(jax.make_jaxpr(lambda x, w: arith.matmul(x, w))(X, arith.W8A8(q8(W))))
    assert "preferred_element_type=int32" in jaxpr and "i8[" in jaxpr


def test_weight_only_keeps_int8_inside_the_dot():
    """The int8 weight goes into the product as int8 (XLA's dot, or on CPU our kernel that widens it in
    registers): no float32 copy of the weight anywhere in the program."""
    jaxpr = jax.make_jaxpr(lambda x, w: arith.matmul(x, w))(X, q8(W))
    eqns = list(all_eqns(jaxpr))
    dots = [e for e in eqns if e.primitive.name == "dot_general"]
    assert dots and all(e.invars[1].aval.dtype == jnp.int8 for e in dots)
    assert not [e for e in eqns if e.primitive.name == "convert_element_type"
                and e.invars[0].aval.dtype == jnp.int8 and e.invars[0].aval.shape == W.shape]


def test_gemm_trans_b_layout():
    wt = W.T.copy()
    y = arith.dot_general(X[0], q8(wt, axes=(0,)), (((1,), (1,)), ((), ())))
    assert cosine(y, X[0] @ W) > 0.999


@pytest.mark.cpu_program
@pytest.mark.parametrize("static", [False, True])
def test_w8a8_transposed_storage_gives_the_same_products(static):
    """A [K, N] weight stored [N, K] (scales on axis 0): same int8 values, same results, logical shape."""
    act = jnp.float32(np.abs(X).max() / 127) if static else None
    plain = arith.W8A8(q8(W), act)
    stored = arith.W8A8(q8(W.T.copy(), axes=(0,)), act, transposed=True)
    assert stored.shape == (64, 48) and stored.w.shape == (48, 64)
    np.testing.assert_array_equal(np.asarray(stored.w.qvalue).T, np.asarray(plain.w.qvalue))
    np.testing.assert_array_equal(np.asarray(arith.matmul(X, stored)), np.asarray(arith.matmul(X, plain)))
    gemm = (((1,), (0,)), ((), ()))
    np.testing.assert_array_equal(np.asarray(jax.jit(arith.dot_general, static_argnums=2)(X[0], stored, gemm)),
                                  np.asarray(arith.dot_general(X[0], plain, gemm)))
    np.testing.assert_array_equal(np.asarray(arith.einsum("bsd,dh->bsh", X, stored)),
                                  np.asarray(arith.einsum("bsd,dh->bsh", X, plain)))
    jaxpr = jax.make_jaxpr(lambda x, w: arith.matmul(x, w))(X, stored)
    if cpu_kernels.available():  # few rows on this CPU: our kernel, which takes the [N, K] weight as it is
        assert cpu_kernels.TARGET in str(jaxpr)
    else:
        dot = next(e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general")
        assert dot.params["dimension_numbers"][0][1] == (1,)  # contracts the stored weight's last axis


def test_bf16_weight_widened_for_f32_activation():
    y = arith.matmul(X, jnp.asarray(W, jnp.bfloat16))
    assert y.dtype == jnp.float32 and cosine(y, X @ W) > 0.9999


def test_einsum_quantized_operand():
    y = arith.einsum("bsd,dh->bsh", X, q8(W))
    assert cosine(y, np.einsum("bsd,dh->bsh", X, W)) > 0.999
    y = arith.einsum("bsd,dh->bsh", X, arith.W8A8(q8(W)))
    assert cosine(y, np.einsum("bsd,dh->bsh", X, W)) > 0.999


@pytest.mark.parametrize("how", ["weight", "dynamic", "static"])
def test_conv_quantized_kernel(how):
    x = rng.standard_normal((2, 8, 12, 12)).astype(np.float32)
    k = (rng.standard_normal((16, 8, 3, 3)) / 8).astype(np.float32)
    dn = ("NCHW", "OIHW", "NCHW")
    ref = lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=dn, precision=lax.Precision.HIGHEST)
    qk = q8(k, axes=(0,))
    w = {"weight": qk, "dynamic": arith.W8A8(qk), "static": arith.W8A8(qk, jnp.float32(np.abs(x).max() / 127))}[how]
    y = arith.conv(x, w, (1, 1), "SAME", dimension_numbers=dn)
    assert y.shape == ref.shape and cosine(y, ref) > 0.999


def test_nbytes_int8_is_about_4x_smaller():
    w = np.ones((1024, 256), np.float32)  # ratio 4K/(K+4): the per-channel f32 scales cost K<~512
    assert arith.nbytes(w) / arith.nbytes(q8(w)) > 3.9
