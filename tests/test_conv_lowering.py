"""Our lowerings of convolutions give lax.conv_general_dilated's answer: the patch dot of small narrow-input
convolutions, and on AVX-512 CPUs our kernel's float32 patch product (cpu_kernels.f32_conv)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxinfer import arith, conv_lowering, cpu_kernels
from jaxinfer.conv_lowering import conv_general_dilated, use_patches

HIGHEST = lax.Precision.HIGHEST
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the patch lowering is for XLA CPU only")


LOWERINGS = ["xla"] + (["kernel"] if cpu_kernels.isa() == 2 else [])


@pytest.fixture(params=LOWERINGS)
def lowering(request, monkeypatch):
    """XLA's lowerings (our kernel off), and our float32 kernel where this CPU has it."""
    monkeypatch.setattr(conv_lowering, "F32_KERNEL", request.param == "kernel")
    return request.param


@pytest.fixture
def xla_lowerings(monkeypatch):
    monkeypatch.setattr(conv_lowering, "F32_KERNEL", False)


def _both(x, w, strides, padding, **kw):
    want = lax.conv_general_dilated(x, w, strides, padding, precision=HIGHEST, **kw)
    got = jax.jit(lambda a, b: conv_general_dilated(a, b, strides, padding, precision=HIGHEST, **kw))(x, w)
    return np.asarray(got), np.asarray(want)


@pytest.mark.parametrize("dims", [("NHWC", "OHWI", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC"),
                                  ("NCHW", "HWIO", "NHWC")])
@pytest.mark.parametrize("strides, padding, dilation", [((1, 1), "SAME", (1, 1)), ((2, 2), "SAME", (1, 1)),
                                                        ((1, 2), "VALID", (1, 1)), ((2, 1), ((2, 0), (1, 3)), (2, 1)),
                                                        ((1, 1), ((0, 0), (0, 0)), (1, 1))])
def test_patches_match_lax(dims, strides, padding, dilation, lowering):
    rng = np.random.default_rng(0)
    n, c, h, w, o, kh, kw = 2, 3, 13, 11, 5, 3, 2  # 2 x 143 output pixels at most: within PATCH_MAX_ROWS
    shapes = {"N": n, "C": c, "H": h, "W": w}
    x = rng.standard_normal([shapes[a] for a in dims[0]]).astype(np.float32)
    kshape = {"O": o, "I": c, "H": kh, "W": kw}
    k = rng.standard_normal([kshape[a] for a in dims[1]]).astype(np.float32)
    dn = lax.conv_dimension_numbers(x.shape, k.shape, dims)
    out = jax.eval_shape(lambda a, b: lax.conv_general_dilated(a, b, strides, padding, rhs_dilation=dilation,
                                                               dimension_numbers=dn), x, k).shape
    assert use_patches(x.shape, k.shape, out, dn, 1, None)
    got, want = _both(x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=dims)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_integer_valued_operands_stay_exact(lowering):
    rng = np.random.default_rng(1)
    x = rng.integers(-255, 256, (1, 32, 32, 3)).astype(np.float32)
    k = rng.integers(-127, 128, (16, 3, 3, 3)).astype(np.float32)
    got, want = _both(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "OHWI", "NHWC"))
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("x_shape, groups, lhs_dilation", [
    ((1, 32, 32, 16), 1, None),   # 16 input channels: XLA's convolution
    ((1, 64, 64, 3), 1, None),    # 64x64 output pixels: too large
    ((8, 32, 32, 3), 1, None),    # 8 images of 32x32: too many patch rows
    ((1, 32, 32, 4), 2, None),    # grouped
    ((1, 16, 16, 3), 1, (2, 2)),  # transposed-conv style input dilation
])
def test_other_convolutions_stay_with_xla(x_shape, groups, lhs_dilation, xla_lowerings):
    dn = lax.conv_dimension_numbers(x_shape, (8, 3, 3, x_shape[-1] // groups), ("NHWC", "OHWI", "NHWC"))
    out = (x_shape[0], x_shape[1], x_shape[2], 8)
    assert not use_patches(x_shape, (8, 3, 3, x_shape[-1] // groups), out, dn, groups, lhs_dilation)


def test_lowering_is_a_patch_dot_in_the_hlo(monkeypatch, xla_lowerings):
    x = jnp.ones((1, 32, 32, 3), jnp.float32)
    k = jnp.ones((16, 3, 3, 3), jnp.float32)

    def hlo() -> str:
        f = jax.jit(lambda a, b: conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "OHWI", "NHWC")))
        return f.lower(x, k).as_text()

    assert "convolution" not in hlo() and "dot_general" in hlo()
    monkeypatch.setattr(conv_lowering, "PATCH_MAX_IN_CHANNELS", 0)
    assert "convolution" in hlo()


@pytest.mark.skipif(cpu_kernels.isa() != 2, reason="the float32 kernel runs on AVX-512 CPUs")
@pytest.mark.parametrize("x_shape, w_shape, strides, padding, dilation", [
    ((2, 9, 7, 5), (6, 3, 2, 5), (1, 2), ((2, 0), (1, 1)), (2, 1)),
    ((1, 8, 8, 70), (130, 1, 1, 70), (1, 1), "VALID", (1, 1)),    # N over two panel groups, 2 partial
    ((3, 20, 20, 3), (17, 5, 5, 3), (2, 2), "SAME", (1, 1)),
    ((1, 2, 2, 4), (3, 3, 3, 4), (1, 1), ((3, 3), (3, 3)), (1, 1)),  # windows mostly padding
])
def test_f32_kernel_matches_lax_and_batches_under_vmap(x_shape, w_shape, strides, padding, dilation):
    rng = np.random.default_rng(2)
    x = rng.standard_normal(x_shape).astype(np.float32)
    k = rng.standard_normal(w_shape).astype(np.float32)
    dims = ("NHWC", "OHWI", "NHWC")
    f = jax.jit(lambda a, b: conv_general_dilated(a, b, strides, padding, rhs_dilation=dilation,
                                                  dimension_numbers=dims))
    assert cpu_kernels.TARGET_F32_CONV in f.lower(x, k).as_text()
    want = lax.conv_general_dilated(x, k, strides, padding, rhs_dilation=dilation, dimension_numbers=dims,
                                    precision=HIGHEST)
    np.testing.assert_allclose(np.asarray(f(x, k)), np.asarray(want), rtol=1e-5, atol=1e-5)
    xs = np.stack([x, 2 * x])
    got = jax.jit(jax.vmap(lambda a: conv_general_dilated(a, k, strides, padding, rhs_dilation=dilation,
                                                          dimension_numbers=dims)))(xs)
    np.testing.assert_allclose(np.asarray(got[1]), 2 * np.asarray(want), rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(cpu_kernels.isa() != 2, reason="the float32 kernel runs on AVX-512 CPUs")
@pytest.mark.parametrize("c, n, width", [(3, 16, 37), (3, 32, 16), (3, 64, 33), (3, 48, 5), (2, 32, 20),
                                         (5, 70, 19)])
def test_f32_kernel_nchw_images_and_filters_read_in_place(c, n, width):
    """An NCHW image of 3 channels is interleaved 16 pixels a step (tails alone); an HWIO filter whose N is a
    multiple of 16 is read as it is, others (70) packed: both as lax's convolution."""
    rng = np.random.default_rng(c * n + width)
    x = rng.standard_normal((2, c, 9, width)).astype(np.float32)
    w = rng.standard_normal((3, 3, c, n)).astype(np.float32)
    got = jax.jit(lambda a, b: cpu_kernels.f32_conv(a, b, (1, 1), (1, 1), ((1, 1), (1, 1)), w_layout="HWIO",
                                                    x_layout="NCHW"))(x, w)
    want = lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), precision=HIGHEST,
                                    dimension_numbers=("NCHW", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    nhwc = np.transpose(x, (0, 2, 3, 1))
    got = jax.jit(lambda a, b: cpu_kernels.f32_conv(a, b, (2, 1), (1, 1), ((0, 1), (2, 0)), w_layout="HWIO"))(nhwc, w)
    want = lax.conv_general_dilated(nhwc, w, (2, 1), ((0, 1), (2, 0)), precision=HIGHEST,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_f32_conv_names_what_it_takes():
    with pytest.raises(ValueError, match=r"float32 x \[B, H, W, C\]"):
        cpu_kernels.f32_conv(np.zeros((1, 4, 4, 3), np.float16), np.zeros((2, 3, 3, 3), np.float32), (1, 1), (1, 1),
                             ((1, 1), (1, 1)))


def test_a_convolution_of_no_input_channels_is_zero():
    x = np.zeros((1, 6, 6, 0), np.float32)
    k = np.zeros((20, 3, 3, 0), np.float32)
    dims = ("NHWC", "OHWI", "NHWC")
    got = jax.jit(lambda a, b: conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=dims))(x, k)
    np.testing.assert_array_equal(np.asarray(got), np.zeros((1, 6, 6, 20), np.float32))


@pytest.mark.skipif(cpu_kernels.isa() != 2, reason="the float32 kernel runs on AVX-512 CPUs")
@pytest.mark.parametrize("a_shape, b_shape, takes", [
    ((8, 32, 64), (64, 256), True),     # a transformer's FFN at batch 8: 256 rows, the weight read in place
    ((256, 256), (256, 64), True),
    ((136, 64), (64, 40), True),        # 136 = 8 x 17 rows; 40 columns: packed panels, the last one partial
    ((32, 64), (64, 64), False),        # too few rows
    ((67, 64), (64, 64), False),        # no image width in 8..64 divides 67 rows
    ((128, 512), (512, 256), False),    # a weight past F32_KERNEL_MAX_WEIGHTS
])
def test_f32_matmul_takes_the_kernel_where_it_pays(a_shape, b_shape, takes):
    rng = np.random.default_rng(len(a_shape) + b_shape[1])
    a = rng.standard_normal(a_shape).astype(np.float32)
    b = rng.standard_normal(b_shape).astype(np.float32)
    f = jax.jit(arith.matmul)
    assert (cpu_kernels.TARGET_F32_CONV in f.lower(a, b).as_text()) == takes
    np.testing.assert_allclose(np.asarray(f(a, b)), a.astype(np.float64) @ b, rtol=1e-4, atol=1e-4)
    if takes:  # a batch of weights under vmap: XLA's product per member
        got = jax.jit(jax.vmap(arith.matmul, in_axes=(None, 0)))(a, np.stack([b, -b]))
        np.testing.assert_allclose(np.asarray(got[1]), -(a.astype(np.float64) @ b), rtol=1e-4, atol=1e-4)


def test_f32_matmul_leaves_other_operands_to_xla():
    a = np.ones((64, 16), np.float32)
    assert conv_lowering.f32_matmul(jnp.asarray(a), jnp.ones((16, 16), jnp.float16)) is None
    assert conv_lowering.f32_matmul(jnp.asarray(a), jnp.ones((2, 16, 16), jnp.float32)) is None
    assert conv_lowering.f32_matmul(jnp.asarray(a[0]), jnp.ones((16, 16), jnp.float32)) is None
