"""The patch lowering of small narrow-input convolutions gives lax.conv_general_dilated's answer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxinfer import conv_lowering
from jaxinfer.conv_lowering import conv_general_dilated, use_patches

HIGHEST = lax.Precision.HIGHEST
pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="the patch lowering is for XLA CPU only")


def _both(x, w, strides, padding, **kw):
    want = lax.conv_general_dilated(x, w, strides, padding, precision=HIGHEST, **kw)
    got = jax.jit(lambda a, b: conv_general_dilated(a, b, strides, padding, precision=HIGHEST, **kw))(x, w)
    return np.asarray(got), np.asarray(want)


@pytest.mark.parametrize("dims", [("NHWC", "OHWI", "NHWC"), ("NCHW", "OIHW", "NCHW"), ("NHWC", "HWIO", "NHWC"),
                                  ("NCHW", "HWIO", "NHWC")])
@pytest.mark.parametrize("strides, padding, dilation", [((1, 1), "SAME", (1, 1)), ((2, 2), "SAME", (1, 1)),
                                                        ((1, 2), "VALID", (1, 1)), ((2, 1), ((2, 0), (1, 3)), (2, 1)),
                                                        ((1, 1), ((0, 0), (0, 0)), (1, 1))])
def test_patches_match_lax(dims, strides, padding, dilation):
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


def test_integer_valued_operands_stay_exact():
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
def test_other_convolutions_stay_with_xla(x_shape, groups, lhs_dilation):
    dn = lax.conv_dimension_numbers(x_shape, (8, 3, 3, x_shape[-1] // groups), ("NHWC", "OHWI", "NHWC"))
    out = (x_shape[0], x_shape[1], x_shape[2], 8)
    assert not use_patches(x_shape, (8, 3, 3, x_shape[-1] // groups), out, dn, groups, lhs_dilation)


def test_lowering_is_a_patch_dot_in_the_hlo(monkeypatch):
    x = jnp.ones((1, 32, 32, 3), jnp.float32)
    k = jnp.ones((16, 3, 3, 3), jnp.float32)

    def hlo() -> str:
        f = jax.jit(lambda a, b: conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "OHWI", "NHWC")))
        return f.lower(x, k).as_text()

    assert "convolution" not in hlo() and "dot_general" in hlo()
    monkeypatch.setattr(conv_lowering, "PATCH_MAX_IN_CHANNELS", 0)
    assert "convolution" in hlo()
