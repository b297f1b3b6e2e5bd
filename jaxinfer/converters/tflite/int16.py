"""TFLite's int16 LOGISTIC and TANH: linear interpolation in a 256-entry sigmoid table.

The int16 kernels ("16x8" quantization) rescale the input to steps of 1/(3 * 4096) (a
power-of-two input scale needs only a shift), then interpolate sigmoid(|x|) between
entries of a table of sigmoid(i / 24) in unsigned 0.16 fixed point, using the identities
sigmoid(-x) = 1 - sigmoid(x) and tanh(x) = 2 * sigmoid(2x) - 1. Outputs have scale
2**-15 and zero point 0.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from .quant import QParams

#: sigmoid(i / 24) for i = 0..255 in unsigned 0.16 fixed point: the constant table of
#: TFLite's int16 kernels (its entries are tuned for interpolation, not plain roundings).
#: Source: TensorFlow Lite's ``sigmoid_table_uint16`` (tensorflow/lite/kernels/internal/common.h),
#: carried over as figures because bit-exactness needs its exact values; 44 of the 256 entries
#: are one above round(65536 * sigmoid(i / 24)), the rest equal it (checked in the tests).
SIGMOID_TABLE_U16 = np.array([
    32768, 33451, 34133, 34813, 35493, 36169, 36843, 37513, 38180, 38841, 39498, 40149, 40794, 41432, 42064, 42688,
    43304, 43912, 44511, 45102, 45683, 46255, 46817, 47369, 47911, 48443, 48964, 49475, 49975, 50464, 50942, 51409,
    51865, 52311, 52745, 53169, 53581, 53983, 54374, 54755, 55125, 55485, 55834, 56174, 56503, 56823, 57133, 57433,
    57724, 58007, 58280, 58544, 58800, 59048, 59288, 59519, 59743, 59959, 60168, 60370, 60565, 60753, 60935, 61110,
    61279, 61441, 61599, 61750, 61896, 62036, 62172, 62302, 62428, 62549, 62666, 62778, 62886, 62990, 63090, 63186,
    63279, 63368, 63454, 63536, 63615, 63691, 63765, 63835, 63903, 63968, 64030, 64090, 64148, 64204, 64257, 64308,
    64357, 64405, 64450, 64494, 64536, 64576, 64614, 64652, 64687, 64721, 64754, 64786, 64816, 64845, 64873, 64900,
    64926, 64950, 64974, 64997, 65019, 65039, 65060, 65079, 65097, 65115, 65132, 65149, 65164, 65179, 65194, 65208,
    65221, 65234, 65246, 65258, 65269, 65280, 65291, 65301, 65310, 65319, 65328, 65337, 65345, 65352, 65360, 65367,
    65374, 65381, 65387, 65393, 65399, 65404, 65410, 65415, 65420, 65425, 65429, 65433, 65438, 65442, 65445, 65449,
    65453, 65456, 65459, 65462, 65465, 65468, 65471, 65474, 65476, 65479, 65481, 65483, 65485, 65488, 65489, 65491,
    65493, 65495, 65497, 65498, 65500, 65501, 65503, 65504, 65505, 65507, 65508, 65509, 65510, 65511, 65512, 65513,
    65514, 65515, 65516, 65517, 65517, 65518, 65519, 65520, 65520, 65521, 65522, 65522, 65523, 65523, 65524, 65524,
    65525, 65525, 65526, 65526, 65526, 65527, 65527, 65528, 65528, 65528, 65529, 65529, 65529, 65529, 65530, 65530,
    65530, 65530, 65531, 65531, 65531, 65531, 65531, 65532, 65532, 65532, 65532, 65532, 65532, 65533, 65533, 65533,
    65533, 65533, 65533, 65533, 65533, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65534, 65535,
], np.int64)

_INPUT_INTEGER_BITS = 3  # int16 inputs are read as Q3.12 when their scale is 2**-12


def _checked_log2(x: float) -> tuple[int, bool]:
    """TFLite's CheckedLog2: (rounded log2 of ``x``, whether ``x`` is a power of two within 1e-3)."""
    v = np.float32(math.log(np.float32(x))) * np.float32(1.0 / math.log(2.0))
    r = float(np.sign(v) * np.floor(np.abs(v) + np.float32(0.5)))
    return int(r), abs(float(v) - r) < 1e-3


def input_rescale(scale: float, tanh: bool) -> tuple[int, int]:
    """(input_multiplier, input_left_shift) of TFLite's int16 LOGISTIC/TANH prepare step.

    A power-of-two scale of 2**-12 (or 2**-11 for TANH) needs no multiplier (0 is returned);
    any other scale gets a multiplier to 1/(3 * 4096) steps, doubled until it exceeds 2**14.
    """
    log2, pot = _checked_log2(scale)
    left_shift = (15 - _INPUT_INTEGER_BITS) + log2
    pot = pot and (left_shift in ((0, 1) if tanh else (0,)))
    if pot:
        return 0, left_shift
    multiplier = float(np.float32(scale)) * 4096.0 * 3.0
    left_shift = 0
    while multiplier <= 32767.0 / 2.0 and left_shift <= 30:
        left_shift += 1
        multiplier *= 2.0
    return int(multiplier), left_shift


def _check(qi: QParams, qo: QParams, op: str) -> None:
    if qi.zp != 0 or qo.zp != 0:
        raise ValueError(f"int16 {op} needs zero points of 0 (got input {qi.zp}, output {qo.zp})")
    log2, pot = _checked_log2(qo.s)
    if not pot or log2 != -15:
        raise ValueError(f"int16 {op} needs an output scale of 2**-15 (got {qo.s})")


def _scaled_input(x, multiplier: int, left_shift: int):
    if multiplier == 0:
        multiplier, left_shift = 3 << left_shift, 0
    rnd = (1 << (left_shift - 1)) if left_shift > 0 else 0
    return (jnp.asarray(x, jnp.int64) * multiplier + rnd) >> left_shift


def _interpolate(mag, frac_bits: int):
    """sigmoid(|x|) interpolated between table entries, scaled by 2**frac_bits; saturates past the table."""
    table = jnp.asarray(SIGMOID_TABLE_U16)
    uh = mag >> frac_bits
    idx = jnp.minimum(uh, 254)
    ua = jnp.take(table, idx)
    ub = jnp.take(table, idx + 1)
    ut = mag & ((1 << frac_bits) - 1)
    return uh, (ua << frac_bits) + ut * (ub - ua)


def logistic16(x, qi: QParams, qo: QParams):
    """int16 LOGISTIC as TFLite's reference integer kernel."""
    _check(qi, qo, "LOGISTIC")
    v = _scaled_input(x, *input_rescale(qi.s, tanh=False))
    uh, r = _interpolate(jnp.abs(v), 9)
    r = jnp.where(uh >= 255, 0x7FFF << 10, r)
    r = jnp.where(v >= 0, r + (1 << 9), (1 << 25) - r + (1 << 9) - 1)
    return (r >> 10).astype(jnp.int16)


def tanh16(x, qi: QParams, qo: QParams):
    """int16 TANH as TFLite's reference integer kernel."""
    _check(qi, qo, "TANH")
    v = _scaled_input(x, *input_rescale(qi.s, tanh=True))
    uh, r = _interpolate(jnp.abs(v), 8)
    r = jnp.where(uh >= 255, 0xFFFF << 8, r)
    r = jnp.where(v >= 0, r - (1 << 23) + (1 << 7), -r + (1 << 23) + (1 << 7) - 1)
    return (r >> 8).astype(jnp.int16)
