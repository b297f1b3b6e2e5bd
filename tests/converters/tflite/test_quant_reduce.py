"""Quantized MEAN / SUM / REDUCE_PROD vs each of LiteRT's CPU kernel sets, over random sweeps.

Every case draws a shape, an axis set (negative and repeated axes included), keep_dims,
input/output scales and zero points (equal ones included), int8 or uint8, and runs three
consecutive random inputs through one interpreter and one Model. jaxinfer follows the
kernel set with the matching ``requant`` mode: LiteRT's reference kernels ("reference"),
its optimized builtin kernels ("builtin") and its default XNNPACK delegate ("xnnpack").
"""

from __future__ import annotations

import numpy as np
import pytest

from .builder import ModelBuilder
from .harness import compare

F32 = np.float32
#: LiteRT kernel set (harness name) -> the jaxinfer requant mode that follows it.
MODES = {"reference": "reference", "builtin": "builtin", "auto": "xnnpack"}


def _out_shape(shape, axes, keep):
    ax = {a % len(shape) for a in axes}
    if keep:
        return tuple(1 if i in ax else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in ax)


def _model(op, shape, axes, keep, dtype, qi, qo):
    b = ModelBuilder()
    x = b.input("x", shape, dtype, qi)
    y = b.tensor("y", _out_shape(shape, axes, keep), dtype, qo)
    b.op(op, [x, b.const("axes", np.array(axes, np.int32))], [y], "ReducerOptions", keep_dims=keep)
    b.outputs(y)
    return b.finish()


def _draw_case(rng, dtype, spatial: bool, same_q: bool, out_scale_growth: float = 1.0):
    """A random (shape, axes, keep, qi, qo) for a MEAN/SUM-like reduction."""
    info = np.iinfo(dtype)
    if spatial:  # the rank-4 NHWC global pool: the optimized kernels' special path
        shape = (int(rng.integers(1, 3)), int(rng.integers(1, 10)), int(rng.integers(1, 10)), int(rng.integers(1, 40)))
        axes, keep = [[1, 2], [2, 1], [-3, 2], [1, 2, 2]][int(rng.integers(4))], True
    else:
        rank = int(rng.integers(1, 5))
        shape = tuple(int(d) for d in rng.integers(1, 8, rank))
        count = int(rng.integers(1, rank + 1))
        axes = [int(a) - (rank if rng.random() < 0.3 else 0) for a in rng.choice(rank, count, replace=False)]
        if axes and rng.random() < 0.2:
            axes.append(axes[0])  # a repeated axis counts once
        keep = bool(rng.integers(2))
    n = int(np.prod([shape[a % len(shape)] for a in {a % len(shape) for a in axes}]))
    si = float(F32(rng.uniform(0.002, 0.2)))
    zi = int(rng.integers(info.min // 2, info.max // 2 + 1)) + (64 if dtype == np.uint8 else 0)
    if same_q:
        return shape, axes, keep, (si, zi), (si, zi)
    so = float(F32(si * rng.uniform(0.3, 2.5) * n ** out_scale_growth))
    zo = int(rng.integers(info.min // 2, info.max // 2 + 1)) + (64 if dtype == np.uint8 else 0)
    return shape, axes, keep, (si, zi), (so, zo)


def _feeds(rng, shape, dtype, n=3):
    info = np.iinfo(dtype)
    return [{"x": rng.integers(info.min, info.max + 1, shape).astype(dtype)} for _ in range(n)]


def _sweep(op, kernels, cases, seed, dtypes=(np.int8, np.uint8), growth=0.0):
    rng = np.random.default_rng(seed)
    exact = total = worst = 0
    for i in range(cases):
        dtype = dtypes[i % len(dtypes)]
        shape, axes, keep, qi, qo = _draw_case(rng, dtype, spatial=op == "MEAN" and i % 3 == 0,
                                               same_q=i % 4 == 1, out_scale_growth=growth)
        stats = compare(_model(op, shape, axes, keep, dtype, qi, qo), _feeds(rng, shape, dtype), kernels=kernels,
                        requant=MODES[kernels])
        for frac, lsb in stats:
            size = int(np.prod(_out_shape(shape, axes, keep)))
            exact += round(frac * size)
            total += size
            worst = max(worst, lsb)
    return exact / total, worst, total


@pytest.mark.parametrize("kernels", sorted(MODES))
def test_mean_sweep_bit_exact(kernels):
    """24 random MEANs x 3 inputs per kernel set: every output element bit-exact."""
    exact, worst, total = _sweep("MEAN", kernels, 24, seed=100 + sorted(MODES).index(kernels))
    assert (exact, worst) == (1.0, 0), f"{exact:.4%} of {total} exact, max {worst} LSB"


@pytest.mark.parametrize("kernels", sorted(MODES))
def test_sum_sweep_bit_exact(kernels):
    """12 random SUMs x 3 inputs per kernel set (output scale grown with the count so sums fit).

    LiteRT's reference SUM on int8 reads the data as uint8 (it returns e.g. 127 for the sum
    of 5 and -3 at equal scales), so the reference kernels are checked on uint8 only.
    """
    dtypes = (np.uint8,) if kernels == "reference" else (np.int8, np.uint8)
    exact, worst, total = _sweep("SUM", kernels, 12, seed=200 + sorted(MODES).index(kernels), dtypes=dtypes,
                                 growth=0.5)
    assert (exact, worst) == (1.0, 0), f"{exact:.4%} of {total} exact, max {worst} LSB"


@pytest.mark.parametrize("kernels", sorted(MODES))
def test_reduce_prod_int8(kernels):
    """REDUCE_PROD int8: the product rescaled after every factor, in the kernels' visiting order."""
    rng = np.random.default_rng(300)
    for shape, axes, keep in [((2, 3, 4), [1], False), ((3, 4), [0, 1], True), ((2, 2, 3), [-1, 0], False),
                              ((4, 5), [1], True)]:
        n = int(np.prod([shape[a % len(shape)] for a in axes]))
        qi = (float(F32(rng.uniform(0.01, 0.05))), int(rng.integers(-20, 20)))
        qo = (float(F32((qi[0] * 25) ** n / rng.uniform(20, 60))), int(rng.integers(-10, 10)))  # products ~ +-50 LSB
        feeds = [{"x": rng.integers(-60, 60, shape).astype(np.int8)} for _ in range(3)]
        stats = compare(_model("REDUCE_PROD", shape, axes, keep, np.int8, qi, qo), feeds, kernels=kernels,
                        requant=MODES[kernels])
        assert all(s == (1.0, 0) for s in stats), stats


def test_mean_spatial_ties():
    """MEAN over H, W with power-of-two counts and equal scales: every other sum is a rounding tie.

    The optimized kernel rounds ties up in its 16-channel SIMD blocks and away from zero in
    the remaining channels; the reference kernel always away from zero. 40 channels cover both.
    """
    rng = np.random.default_rng(400)
    for hw in [(2, 2), (4, 4), (1, 2)]:
        shape = (2,) + hw + (40,)
        data = _model("MEAN", shape, [1, 2], True, np.int8, (0.05, 0), (0.05, 0))
        feeds = [{"x": rng.integers(-6, 6, shape).astype(np.int8)} for _ in range(2)]
        for kernels, mode in MODES.items():
            assert compare(data, feeds, kernels=kernels, requant=mode) == [(1.0, 0)] * 2, (hw, kernels)


def test_quant_kernel_is_checked():
    from jaxinfer.converters.tflite.ops.reduce import mean
    from jaxinfer.converters.tflite.quant import QParams

    q = QParams(np.array([0.1], F32), np.array([0]), 0, np.dtype(np.int8))
    with pytest.raises(ValueError, match="quant_kernel"):
        mean(np.zeros((2, 3), np.int8), np.array([1]), quant_kernel="fast", in_q=(q, None), out_q=(q,))


@pytest.mark.parametrize("kernels", sorted(MODES))
def test_int16_reductions(kernels):
    """int16 (zero point 0): MEAN always takes the reference integer path (XNNPACK does not take
    int16), SUM the float one in the builtin kernels; REDUCE_PROD as for int8. LiteRT's reference
    SUM mis-reads int16 data as it does int8, so SUM is checked against the other kernel sets."""
    rng = np.random.default_rng(500)
    for shape, axes, keep in [((2, 5, 5, 8), [1, 2], True), ((2, 3, 4), [0, -1], False)]:
        n = int(np.prod([shape[a] for a in axes]))
        cases = {"MEAN": 1.3e-3, "SUM": 1.3e-3 * n ** 0.5, "REDUCE_PROD": 3.0 ** n / 3000}
        for op, so in cases.items():
            if op == "SUM" and kernels == "reference":
                continue
            feeds = [{"x": rng.integers(-3000, 3000, shape).astype(np.int16)} for _ in range(2)]
            stats = compare(_model(op, shape, axes, keep, np.int16, (1e-3, 0), (so, 0)), feeds, kernels=kernels,
                            requant=MODES[kernels])
            assert stats == [(1.0, 0)] * 2, (op, shape, stats)
