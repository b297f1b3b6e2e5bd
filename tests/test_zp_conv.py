"""intmath.zp_conv: 8-bit convolutions with zero points as our CPU kernel's patch product (AVX-512 VNNI
hosts) give the same int32 sums as the exact float32 convolution of the shifted values, for every layout,
stride, dilation, padding and zero-point form; elsewhere they are that convolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer import cpu_kernels, intmath

from .test_cpu_kernels import ISAS, narrowed

PATHS = ISAS or [0]  # 0: no kernel on this machine (the float route only)


@pytest.fixture(params=PATHS, ids=[cpu_kernels.ISAS.get(i, "no-kernel") for i in PATHS])
def kernel_isa(request):
    """Each of the kernel's paths this CPU has, traced narrowed (the patch route needs VNNI; AVX2 keeps
    the float route)."""
    if not request.param:
        yield 0
        return
    with narrowed(request.param) as path:
        yield path


def _want(x, x_zp, w, w_zp, strides, padding, dn, dil, o_axis):
    xi = x.astype(np.int32) - (0 if x_zp is None else np.int32(x_zp))
    wi = w.astype(np.int32)
    if w_zp is not None:
        shape = [1] * w.ndim
        shape[o_axis] = -1
        wi = wi - np.asarray(w_zp, np.int32).reshape(shape if np.size(w_zp) > 1 else ())
    return np.asarray(intmath.exact_conv(jnp.asarray(xi), jnp.asarray(wi), strides, padding, bound=255 * 255,
                                         dimension_numbers=dn, rhs_dilation=dil))


CASES = [  # x shape, w shape, dimension numbers, strides, padding, dilation
    ((2, 9, 9, 5), (7, 3, 3, 5), ("NHWC", "OHWI", "NHWC"), (1, 1), "SAME", (1, 1)),
    ((1, 4, 10, 11), (6, 4, 3, 3), ("NCHW", "OIHW", "NCHW"), (2, 1), ((1, 2), (0, 1)), (1, 2)),
    ((3, 16, 16, 3), (16, 5, 5, 3), ("NHWC", "OHWI", "NHWC"), (2, 2), "VALID", (1, 1)),
    ((1, 32, 32, 32), (32, 3, 3, 32), ("NHWC", "OHWI", "NHWC"), (1, 1), "SAME", (1, 1)),
    ((2, 3, 12, 12), (70, 3, 1, 1), ("NCHW", "OIHW", "NCHW"), (1, 1), "VALID", (1, 1)),  # N > VNNI_MAX_N
    ((1, 2, 20), (4, 2, 3), ("NCH", "OIH", "NCH"), (1,), ((1, 1),), (2,)),  # 1-D
    ((1, 3, 3, 128), (16, 3, 3, 128), ("NHWC", "OHWI", "NHWC"), (1, 1), "SAME", (1, 1)),  # 9 rows, K 1152
    ((1, 8, 8, 130), (20, 3, 3, 130), ("NHWC", "OHWI", "NHWC"), (1, 1), ((2, 0), (0, 2)), (2, 1)),  # K 1170
    ((2, 30, 30, 64), (130, 3, 3, 64), ("NHWC", "OHWI", "NHWC"), (1, 1), "SAME", (1, 1)),  # row x column items
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("dtype,x_zp,w_zp", [(np.int8, None, None), (np.int8, -128, None), (np.uint8, 131, None),
                                             (np.int8, 3, "per_channel"), (np.uint8, 0, 5)])
def test_same_sums_as_the_exact_convolution(case, dtype, x_zp, w_zp, kernel_isa):
    xs, ws, dn, strides, padding, dil = CASES[case]
    rng = np.random.default_rng(case)
    info = np.iinfo(dtype)
    x = rng.integers(info.min, info.max + 1, xs).astype(dtype)
    w = rng.integers(-128, 128, ws).astype(np.int8)
    o_axis = dn[1].index("O")
    if w_zp == "per_channel":
        w_zp = rng.integers(-5, 6, ws[o_axis]).astype(np.int32)
    got = jax.jit(lambda x, w: intmath.zp_conv(x, x_zp, w, w_zp, strides, padding, bound=255 * 255,
                                                dimension_numbers=dn, rhs_dilation=dil))(x, w)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), _want(x, x_zp, w, w_zp, strides, padding, dn, dil, o_axis))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_a_program_traced_for_the_patch_product_runs_on_every_path(case):
    """Compiled with VNNI and then narrowed (cpu_kernels.isa), the kernel writes the patches out for its
    row paths: same sums as the panels."""
    if cpu_kernels.isa() != 2:
        pytest.skip("the patch product is traced on AVX-512 VNNI CPUs only")
    xs, ws, dn, strides, padding, dil = CASES[case]
    rng = np.random.default_rng(10 + case)
    x = rng.integers(-128, 128, xs).astype(np.int8)
    w = rng.integers(-128, 128, ws).astype(np.int8)
    f = jax.jit(lambda x, w: intmath.zp_conv(x, -9, w, None, strides, padding, bound=255 * 128,
                                              dimension_numbers=dn, rhs_dilation=dil))
    compiled = f.lower(x, w).compile()
    want = _want(x, -9, w, None, strides, padding, dn, dil, dn[1].index("O"))
    for path in ISAS:
        with narrowed(path):
            np.testing.assert_array_equal(np.asarray(compiled(x, w)), want)


def test_traced_zero_points_of_the_activations_type():
    """A zero point that is a run-time input (an ONNX initializer in the params) of x's own dtype."""
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (2, 8, 8, 4)).astype(np.uint8)
    w = rng.integers(-128, 128, (8, 3, 3, 4)).astype(np.int8)
    dn = ("NHWC", "OHWI", "NHWC")
    f = jax.jit(lambda x, zx, zw: intmath.zp_conv(x, zx, w, zw, (1, 1), "SAME", bound=255 * 128,
                                                  dimension_numbers=dn))
    zw = rng.integers(-3, 4, 8).astype(np.int32)
    got = f(x, np.uint8(200), zw)
    np.testing.assert_array_equal(np.asarray(got), _want(x, 200, w, zw, (1, 1), "SAME", dn, (1, 1), 0))


@pytest.mark.cpu_program
def test_patch_product_takes_the_kernel_on_vnni_only():
    x = np.zeros((1, 16, 16, 8), np.int8)
    w = np.zeros((16, 3, 3, 8), np.int8)
    dn = ("NHWC", "OHWI", "NHWC")

    def text() -> str:
        return jax.jit(lambda x, w: intmath.zp_conv(x, 3, w, None, (1, 1), "SAME", bound=255 * 128,
                                                    dimension_numbers=dn)).lower(x, w).as_text()

    if not cpu_kernels.available():
        pytest.skip("no CPU kernels on this machine")
    best = cpu_kernels.isa()
    assert (cpu_kernels.TARGET_CONV in text()) == (best == 2)
    cpu_kernels.isa(1)
    try:
        assert cpu_kernels.TARGET_CONV not in text()
    finally:
        cpu_kernels.isa(best)


def test_grouped_and_out_of_range_zero_points_keep_the_float_route():
    """Grouped convolutions and a zero point that is no value of x's type never take the patches (which
    are padded with the zero point in 8 bits); the sums are still exact."""
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, (1, 4, 6, 6)).astype(np.int8)
    w = rng.integers(-128, 128, (4, 2, 3, 3)).astype(np.int8)
    got = intmath.zp_conv(x, None, w, None, (1, 1), "SAME", bound=128 * 128, feature_group_count=2)
    want = intmath.exact_conv(x.astype(np.int32), w.astype(np.int32), (1, 1), "SAME", bound=128 * 128,
                              feature_group_count=2)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not intmath._zp_fits(np.int32(300), np.int8) and intmath._zp_fits(np.int32(-128), np.int8)
    w1 = rng.integers(-128, 128, (4, 4, 3, 3)).astype(np.int8)
    got = intmath.zp_conv(x, np.int32(300), w1, None, (1, 1), "SAME", bound=428 * 128)
    want = intmath.exact_conv(x.astype(np.int32) - 300, w1.astype(np.int32), (1, 1), "SAME", bound=428 * 128)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_int8_conv_checks_its_operands_and_batches_under_vmap():
    """cpu_kernels.int8_conv names what it takes; under vmap a batch of images is more images for the same
    filter, and a zero point outside int8 is refused by the kernel, not read as padding."""
    rng = np.random.default_rng(11)
    w = rng.integers(-128, 128, (8, 3, 3, 4)).astype(np.int8)
    geometry = ((1, 1), (1, 1), ((1, 1), (1, 1)))

    def ref(x, zp, w):
        return intmath.exact_conv(x.astype(jnp.int32) - zp, w.astype(jnp.int32), (1, 1), ((1, 1), (1, 1)),
                                  bound=256 * 128, dimension_numbers=("NHWC", "OHWI", "NHWC"))

    with pytest.raises(ValueError, match=r"int8 or uint8 x \[B, H, W, C\]"):
        cpu_kernels.int8_conv(np.zeros((1, 4, 4, 4), np.int16), np.int32(0), w, *geometry, ref)
    xs = rng.integers(-128, 128, (3, 2, 6, 6, 4)).astype(np.int8)
    got = jax.jit(jax.vmap(lambda x: cpu_kernels.int8_conv(x, jnp.int32(5), w, *geometry, ref)))(xs)
    want = np.stack([np.asarray(ref(jnp.asarray(x), 5, w)) for x in xs])
    np.testing.assert_array_equal(np.asarray(got), want)
    if cpu_kernels.isa() == 2:
        f = jax.jit(lambda x, zp: cpu_kernels.int8_conv(x, zp, w, *geometry, ref))
        with pytest.raises(Exception, match="zp must be an int8 value"):
            jax.block_until_ready(f(xs[0], jnp.int32(300)))
        np.testing.assert_array_equal(np.asarray(f(xs[0], jnp.int32(-128))), np.asarray(ref(xs[0], -128, w)))
        xu = rng.integers(0, 256, (2, 6, 6, 4)).astype(np.uint8)  # read as it is: x - 128 with zp - 128
        for zp in (0, 131, 255):
            np.testing.assert_array_equal(np.asarray(f(xu, jnp.int32(zp))), np.asarray(ref(xu, zp, w)))
        with pytest.raises(Exception, match="zp must be an int8 value"):
            jax.block_until_ready(f(xu, jnp.int32(256)))


def test_a_convolution_of_no_input_channels_sums_to_zero():
    """C = 0 (K = 0 for the kernel): every sum is empty."""
    x = np.zeros((1, 6, 6, 0), np.int8)
    w = np.zeros((20, 3, 3, 0), np.int8)
    got = jax.jit(lambda x, w: intmath.zp_conv(x, 3, w, None, (1, 1), "SAME", bound=256 * 128,
                                               dimension_numbers=("NHWC", "OHWI", "NHWC")))(x, w)
    np.testing.assert_array_equal(np.asarray(got), np.zeros((1, 6, 6, 20), np.int32))
