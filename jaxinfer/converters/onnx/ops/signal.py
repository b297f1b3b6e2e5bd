"""Signal ops (ai.onnx): DFT, STFT, window functions, MelWeightMatrix.

Complex values use ONNX's layout: a trailing dim of 2 (real, imaginary); a
trailing dim of 1 is a real signal.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ....registry import OpDef, registrar
from ._util import dtype_of

OPS: list[OpDef] = []
op = registrar(OPS)


def _to_complex(x):
    if x.shape[-1] == 1:
        return x[..., 0].astype(jnp.complex128)
    return jax_complex(x[..., 0], x[..., 1])


def jax_complex(re, im):
    return re.astype(jnp.complex128) + 1j * im.astype(jnp.complex128)


def _from_complex(z, dtype):
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1).astype(dtype)


def _irfft(x, z, a: int, dft_length):
    """Inverse of a one-sided spectrum: a real signal, trailing dim 1."""
    length = int(np.asarray(dft_length)) if dft_length is not None else 2 * (z.shape[a] - 1)
    return jnp.fft.irfft(z, n=length, axis=a)[..., None].astype(x.dtype)


def _dft(x, dft_length, axis: int, inverse: int, onesided: int):
    rank = x.ndim  # the trailing dim holds (re, im); negative axes count it
    a = axis + rank if axis < 0 else axis
    if not 0 <= a < rank - 1:
        raise ValueError(f"DFT axis {axis} out of range for input rank {rank} (last dim is re/im)")
    z = _to_complex(x)
    if inverse and onesided:
        return _irfft(x, z, a, dft_length)
    n = int(np.asarray(dft_length)) if dft_length is not None else z.shape[a]
    if z.shape[a] != n:
        if z.shape[a] > n:
            z = jnp.take(z, jnp.arange(n), axis=a)
        else:
            pad = [(0, 0)] * z.ndim
            pad[a] = (0, n - z.shape[a])
            z = jnp.pad(z, pad)
    y = jnp.fft.ifft(z, axis=a) if inverse else jnp.fft.fft(z, axis=a)
    if onesided:
        y = jnp.take(y, jnp.arange(n // 2 + 1), axis=a)
    return _from_complex(y, x.dtype)


@op("DFT", 17, static=(1,))
def dft_v17(x, dft_length=None, *, axis: int = 1, inverse: int = 0, onesided: int = 0):
    """https://onnx.ai/onnx/operators/onnx__DFT.html (opset 17: axis attribute)."""
    return _dft(x, dft_length, axis, inverse, onesided)


@op("DFT", 20, static=(1, 2))
def dft(x, dft_length=None, axis=None, *, inverse: int = 0, onesided: int = 0):
    """https://onnx.ai/onnx/operators/onnx__DFT.html (opset 20: axis input, default -2)."""
    a = -2 if axis is None else int(np.asarray(axis))
    return _dft(x, dft_length, a, inverse, onesided)


@op("STFT", 17, static=(1, 3))
def stft(signal, frame_step, window=None, frame_length=None, *, onesided: int = 1):
    """https://onnx.ai/onnx/operators/onnx__STFT.html: frames x bins x (re, im) per batch."""
    step = int(np.asarray(frame_step))
    if frame_length is not None:
        length = int(np.asarray(frame_length))
    elif window is not None:
        length = window.shape[0]
    else:
        raise ValueError("STFT needs a window or a frame_length")
    z = _to_complex(signal)  # [batch, signal_length]
    frames = 1 + (z.shape[1] - length) // step
    idx = np.arange(frames)[:, None] * step + np.arange(length)[None, :]
    framed = z[:, idx]  # [batch, frames, length]
    if window is not None:
        framed = framed * window.astype(framed.real.dtype)
    y = jnp.fft.fft(framed, axis=-1)
    if onesided:
        y = y[..., : length // 2 + 1]
    return _from_complex(y, signal.dtype)


def _window(size, periodic: int, output_datatype: int, coeffs: tuple[float, ...]):
    n = int(np.asarray(size))
    denom = n if periodic else n - 1
    k = np.arange(n, dtype=np.float64)
    w = np.zeros(n, np.float64)
    for i, c in enumerate(coeffs):
        w += c * np.cos(2.0 * np.pi * i * k / denom) * (-1) ** i
    return jnp.asarray(w.astype(dtype_of(output_datatype)))


@op("HannWindow", 17, static=(0,))
def hann_window(size, *, output_datatype: int = 1, periodic: int = 1):
    """https://onnx.ai/onnx/operators/onnx__HannWindow.html"""
    return _window(size, periodic, output_datatype, (0.5, 0.5))


@op("HammingWindow", 17, static=(0,))
def hamming_window(size, *, output_datatype: int = 1, periodic: int = 1):
    """https://onnx.ai/onnx/operators/onnx__HammingWindow.html (alpha = 25/46)."""
    return _window(size, periodic, output_datatype, (25.0 / 46.0, 1.0 - 25.0 / 46.0))


@op("BlackmanWindow", 17, static=(0,))
def blackman_window(size, *, output_datatype: int = 1, periodic: int = 1):
    """https://onnx.ai/onnx/operators/onnx__BlackmanWindow.html"""
    return _window(size, periodic, output_datatype, (0.42, 0.5, 0.08))


@op("MelWeightMatrix", 17, static="all")
def mel_weight_matrix(num_mel_bins, dft_length, sample_rate, lower_edge_hertz, upper_edge_hertz, *,
                      output_datatype: int = 1):
    """https://onnx.ai/onnx/operators/onnx__MelWeightMatrix.html: triangular mel filters."""
    mels, n_fft, rate = int(num_mel_bins), int(dft_length), int(sample_rate)
    ft = np.asarray(lower_edge_hertz).dtype.type  # edges are computed at the inputs' precision
    lo, hi = ft(lower_edge_hertz), ft(upper_edge_hertz)
    to_mel = lambda hz: ft(2595) * np.log10(ft(1) + hz / ft(700))  # noqa: E731
    # The mel step divides the range by mels + 2 (the number of edge points), as the
    # conformance data and onnxruntime define it, so the top edge lies just below ``hi``.
    points = to_mel(lo) + np.arange(mels + 2).astype(ft) * ((to_mel(hi) - to_mel(lo)) / ft(mels + 2))
    hz = ft(700) * (np.power(ft(10), points / ft(2595)) - ft(1))
    bins = (ft(n_fft + 1) * hz // ft(rate)).astype(np.int64)
    out = np.zeros((n_fft // 2 + 1, mels), np.float64)
    j = np.arange(n_fft // 2 + 1)
    for m in range(mels):
        left, center, right = bins[m], bins[m + 1], bins[m + 2]
        if center == left:
            out[center, m] = 1.0
        else:
            rising = (j >= left) & (j <= center)
            out[rising, m] = (j[rising] - left) / (center - left)
        if right > center:
            falling = (j >= center) & (j < right)
            out[falling, m] = (right - j[falling]) / (right - center)
    return jnp.asarray(out.astype(dtype_of(output_datatype)))
