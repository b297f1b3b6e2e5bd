"""Our own XLA CPU kernels (XLA FFI custom calls), built from source on first use.

The first is :func:`int8_dot`, int8 x int8 -> int32 against a ``[N, K]`` weight
(``int8_dot.cc`` says how), with an AVX-512 VNNI path and an AVX2 one (:func:`isa`). XLA CPU's int8
library dot is compute-bound far below the memory's speed at few rows; this one is faster at 1-48 rows
(~20-50x at one row; with VNNI ~2.5-3x at 8 rows), and with VNNI at any number of rows from K >= 128 or
N <= 64 (1.4-2.9x at 32-8192 rows: ``benchmarks/int8_dot.py``). It is exact: bit-identical int32 sums, so
every quantized program gives the same answer with it or without. The same product also serves
:func:`int8_dot_zp` (a zero point per row), :func:`int8_dot_dyn` (float rows quantized inside the call),
:func:`int8_dot_hybrid` (a whole TFLite dynamic-range layer: rows quantized, the product, the weight
scales, bias and fused clamp), :func:`int8_conv` (an image's patches) and :func:`int8_conv_requant` (a
TFLite int8 convolution finished by the fixed-point :class:`OutputStage` to int8). :func:`int8_depthwise`
and :func:`f32_depthwise` are depthwise convolutions (``depthwise.cc``), :func:`f32_conv` a float32
convolution with an optional bias and clamp (``f32_conv.cc``), :func:`f32_lstm` a whole float32 LSTM layer
(``lstm.cc``), :func:`f32_int8w_dot`, :func:`f32_rows_dot` and :func:`f32_rows_dot_nk` products of a few float32
rows that stream an int8, float32 or 16-bit weight from memory once (``few_rows.cc``). Every finish reproduces the numbers of
the XLA composition it replaces bit for bit (the tests compare both routes), so a layer answers the same
with the kernels or without; the float convolutions sum in their own order (the last bits may differ).

The kernel is compiled with the host's C++ compiler (``CXX`` or ``g++``) against the XLA FFI headers
that jaxlib ships, once per source/jax/jaxlib/compiler, into ``$JAXINFER_KERNEL_DIR`` (default
``~/.cache/jaxinfer/kernels``); later processes load the built library once its sha256 matches the one
written beside it at build time (a damaged file is rebuilt, never opened). Only the :data:`KEEP_BUILDS`
most recently used builds are kept. Under ``jax.vmap`` a batch of
activations is more rows for the kernel; a batch of weights takes XLA's batched dot. Where it cannot be had (not
x86-64 with AVX2, no compiler, a failed build: logged once) or ``JAXINFER_CPU_KERNELS=0``, callers get
``lax.dot_general``: the same numbers, XLA's speed. On other backends the program lowers to
``lax.dot_general`` (``lax.platform_dependent``; on GPU, whose int8 dot gave wrong sums, the exact
float32 route), so a program traced here runs anywhere.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

__all__ = ["ISAS", "MAX_ROWS", "VNNI_MAX_N", "VNNI_MIN_K", "ZP_RANGE", "OutputStage", "available",
           "dynamic_quantize_u8", "f32_conv", "f32_conv_direct", "f32_depthwise", "f32_int8w_dot", "f32_lstm",
           "f32_rows_dot", "f32_rows_dot_nk", "int8_conv", "int8_conv_requant", "int8_conv_requant_f32",
           "int8_depthwise", "int8_dot", "int8_dot_dyn", "int8_dot_hybrid", "int8_dot_zp", "isa", "keep", "kernel_dir",
           "layer_norm", "lookup8", "max_pool8", "offer_to_xla_pool", "row_absmax", "softmax", "suppressed",
           "takes"]

log = logging.getLogger(__name__)

#: Rows (the product of ``x``'s leading dims) up to which :func:`int8_dot` takes the kernel. Measured
#: here against XLA's int8 dot, [rows, 1024] x [1024, 4096] (``benchmarks/int8_dot.py``), on the AVX2
#: path: 1 row 0.26 vs 8.7 ms, 8 rows 0.48 vs 0.81 ms, 32 rows 1.51 vs 2.06 ms, 64 rows 3.76 vs 3.72 ms
#: (from there XLA's library, which blocks large products better, is as fast or faster).
MAX_ROWS = 48
#: On the AVX-512 VNNI path the kernel takes any number of rows once K is at least this (from 16 rows
#: at K < 1024 it packs the weight into column panels): 12 distinct weights per call, kernel vs XLA's
#: int8 dot (session 19): [2048, 768] x [768, 768] 3.59 vs 7.93 ms, [256, 768] x [768, 3072] 1.92 vs
#: 3.90, [128, 512] x [512, 128] 0.052 vs 0.095, [256, 128] x [128, 128] 0.031 vs 0.045,
#: [512, 1024] x [1024, 4096] 9.1 vs 14.3; even at [1024, 128] x [128, 512] (1.09 vs 1.05). Session 19
#: had it slower at [4096, 64] x [64, 1000] (5.5 vs 4.8 ms), hence a bound of 128 then; with session 24's
#: panel packing (vector transposes) it is 2.16 vs 5.70 ms there (session 26, uint8 with a zero point
#: against an [N, K] weight: [128, 64] x [64, 256] 26 vs 44 us, [1024, 64] x [64, 256] 0.15 vs 0.37 ms,
#: [512, 32] x [32, 128] 51 vs 158 us, [4096, 32] x [32, 128] 0.31 vs 0.41 ms). Below 32 it is mixed:
#: [4096, 16] x [16, 256] 0.54 vs 0.63 ms, but [2048, 16] x [16, 2048] 3.15 vs 2.79.
VNNI_MIN_K = 32
#: ... or any number of rows against at most this many weight rows (N), whatever K: the shape of
#: convolutions' patch products ([4096, 16] x [16, 32] 0.026 vs 0.041 ms, [1024, 64] x [64, 64] 0.026
#: vs 0.043).
VNNI_MAX_N = 64
#: Builds kept in :func:`kernel_dir` (the most recently used ones); older ones are removed after a build.
KEEP_BUILDS = 4
TARGET = "jaxinfer_int8_dot"
TARGET_ZP = "jaxinfer_int8_dot_zp"
TARGET_CONV = "jaxinfer_int8_conv"
TARGET_CONV_RQ = "jaxinfer_int8_conv_requant"
TARGET_CONV_RQF = "jaxinfer_int8_conv_requant_f32"
TARGET_DEPTHWISE = "jaxinfer_int8_depthwise"
TARGET_F32_DEPTHWISE = "jaxinfer_f32_depthwise"
TARGET_F32_LSTM = "jaxinfer_f32_lstm"
TARGET_F32_CONV = "jaxinfer_f32_conv"
TARGET_F32_I8W = "jaxinfer_f32_int8w_dot"
TARGET_F32_ROWS = "jaxinfer_f32_rows_dot"
TARGET_F32_BF16W = "jaxinfer_f32_bf16w_dot"
TARGET_F32_F16W = "jaxinfer_f32_f16w_dot"
TARGET_F32_ROWS_NK = "jaxinfer_f32_rows_dot_nk"
TARGET_F32_BF16W_NK = "jaxinfer_f32_bf16w_dot_nk"
TARGET_F32_F16W_NK = "jaxinfer_f32_f16w_dot_nk"
TARGET_DYN = "jaxinfer_int8_dot_dyn"
TARGET_HYBRID = "jaxinfer_int8_dot_hybrid"
TARGET_DQL = "jaxinfer_dynamic_quantize"
TARGET_LOOKUP8 = "jaxinfer_lookup8"
TARGET_CONV_DIRECT = "jaxinfer_int8_conv_direct_f32"
TARGET_MAX_POOL8 = "jaxinfer_max_pool8"
TARGET_LAYER_NORM = "jaxinfer_f32_layer_norm"
TARGET_SOFTMAX = "jaxinfer_f32_softmax"
TARGET_GELU = "jaxinfer_f32_gelu"
TARGET_ROW_ABSMAX = "jaxinfer_f32_row_absmax"
TARGET_KEEP = "jaxinfer_keep"
#: Each custom-call target the kernels register -> the library's handler symbol.
_HANDLERS = {
    TARGET: "JaxinferInt8Dot", TARGET_ZP: "JaxinferInt8DotZp", TARGET_DYN: "JaxinferInt8DotDyn",
    TARGET_HYBRID: "JaxinferInt8DotHybrid", TARGET_DQL: "JaxinferDynamicQuantize", TARGET_CONV: "JaxinferInt8Conv",
    TARGET_CONV_RQ: "JaxinferInt8ConvRequant", TARGET_CONV_RQF: "JaxinferInt8ConvRequantFloat",
    TARGET_DEPTHWISE: "JaxinferInt8Depthwise", TARGET_F32_CONV: "JaxinferF32Conv",
    TARGET_F32_DEPTHWISE: "JaxinferF32Depthwise", TARGET_F32_LSTM: "JaxinferF32Lstm",
    TARGET_F32_I8W: "JaxinferF32Int8wDot", TARGET_F32_ROWS: "JaxinferF32RowsDot",
    TARGET_F32_BF16W: "JaxinferF32Bf16wDot", TARGET_F32_F16W: "JaxinferF32F16wDot",
    TARGET_F32_ROWS_NK: "JaxinferF32RowsDotNK", TARGET_F32_BF16W_NK: "JaxinferF32Bf16wDotNK",
    TARGET_F32_F16W_NK: "JaxinferF32F16wDotNK", TARGET_LOOKUP8: "JaxinferLookup8",
    TARGET_CONV_DIRECT: "JaxinferInt8ConvDirectF32", TARGET_MAX_POOL8: "JaxinferMaxPool8",
    TARGET_LAYER_NORM: "JaxinferF32LayerNorm", TARGET_SOFTMAX: "JaxinferF32Softmax", TARGET_GELU: "JaxinferF32Gelu",
    TARGET_ROW_ABSMAX: "JaxinferF32RowAbsMax", TARGET_KEEP: "JaxinferKeep",
}
#: Every custom-call target the kernels register (an export must allow each).
TARGETS = tuple(_HANDLERS)
#: Zero points :func:`int8_dot_zp`'s kernel folds into ``x`` (``x - zp`` fits int16 for every int8 ``x``).
ZP_RANGE = (-32768 + 128, 32767 - 128)
#: The kernels' sources, built into one library (``patches.h`` is shared by the convolutions).
_SOURCES = tuple(Path(__file__).with_name(n)
                 for n in ("int8_dot.cc", "depthwise.cc", "f32_conv.cc", "lstm.cc", "few_rows.cc", "lookup.cc",
                           "pool.cc", "norm.cc", "buffers.cc"))
_HEADERS = tuple(Path(__file__).with_name(n) for n in ("fma_tile.h", "helpers.h", "patches.h", "requant.h",
                                                         "vmath.h"))
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-w")

_lock = threading.Lock()
_available: bool | None = None  # known after the first available()
_library: ctypes.CDLL | None = None  # the loaded kernels, once available()


def kernel_dir() -> Path:
    """Where built kernels are kept (``$JAXINFER_KERNEL_DIR``, else ``~/.cache/jaxinfer/kernels``)."""
    env = os.environ.get("JAXINFER_KERNEL_DIR")
    return Path(env) if env else Path.home() / ".cache" / "jaxinfer" / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")


def _build(compiler: str) -> Path:
    """The shared library for this source, jaxlib and compiler: built unless already there."""
    include = jax.ffi.include_dir()
    parts = [*(f.read_bytes() for f in _SOURCES + _HEADERS), jax.__version__.encode(), jaxlib.__version__.encode(),
             compiler.encode(),
             " ".join(_FLAGS).encode(), str(include).encode()]
    key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
    out = kernel_dir() / f"int8_dot-{key}.so"
    digest = out.with_suffix(".sha256")
    if _intact(out, digest):
        _touch(digest)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *_FLAGS, f"-I{include}", *map(str, _SOURCES), "-o", tmp],
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        sha = hashlib.sha256(Path(tmp).read_bytes()).hexdigest()
        os.replace(tmp, out)  # atomic: a concurrent process sees no half-written library
        fd, tmp_digest = tempfile.mkstemp(suffix=".sha256", dir=out.parent)
        with os.fdopen(fd, "w") as f:
            f.write(sha)
        os.replace(tmp_digest, digest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _prune(out.parent, keep=KEEP_BUILDS)
    return out


def _touch(path: Path) -> None:
    """Mark a build as used now (its digest's mtime), so pruning keeps what is in use."""
    try:
        os.utime(path)
    except OSError:
        pass


def _prune(directory: Path, keep: int) -> list[Path]:
    """Remove all but the ``keep`` most recently used builds (each jax/jaxlib/compiler/source change
    leaves one behind). Another process still running a removed library keeps its mapping; its next
    start rebuilds. Returns the libraries removed; files that vanish meanwhile are skipped."""
    def used(digest: Path) -> float:
        try:
            return digest.stat().st_mtime
        except OSError:
            return 0.0

    digests = sorted(directory.glob("int8_dot-*.sha256"), key=used, reverse=True)
    # A library without a digest is never loaded (builds from before digests, or a crashed build); one
    # written in the last hour may be a concurrent build about to write its digest.
    orphans = [lib for lib in directory.glob("int8_dot-*.so")
               if not lib.with_suffix(".sha256").exists() and used(lib) < time.time() - 3600]
    gone = []
    for library, digest in [(d.with_suffix(".so"), d) for d in digests[keep:]] + [(o, None) for o in orphans]:
        for f in (library, digest):
            try:
                if f is not None:
                    f.unlink()
            except OSError:
                pass
        gone.append(library)
    return gone


def _intact(library: Path, digest: Path) -> bool:
    """Whether ``library`` is there and matches the digest written beside it when it was built. Opening a
    damaged library (a truncated copy of the cache, say) can kill the process, so it is rebuilt instead."""
    try:
        return hashlib.sha256(library.read_bytes()).hexdigest() == digest.read_text().strip()
    except OSError:
        return False


def _load() -> bool:
    if os.environ.get("JAXINFER_CPU_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    compiler = _compiler()
    if compiler is None:
        log.info("jaxinfer CPU kernels: no C++ compiler found (set CXX); using XLA's int8 dot")
        return False
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
        if not lib.jaxinfer_int8_dot_supported():
            log.info("jaxinfer CPU kernels: this CPU lacks AVX2; using XLA's int8 dot")
            return False
        for target, symbol in _HANDLERS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        global _library
        _library = lib
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as e:
        log.warning("jaxinfer CPU kernels unavailable, using XLA's int8 dot: %s", e)
        return False
    return True


#: Set inside :func:`suppressed`: kernels report themselves unavailable while programs are traced there.
_SUPPRESSED: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxinfer_cpu_kernels_suppressed", default=False)


@contextlib.contextmanager
def suppressed() -> Any:
    """Programs traced inside this block take XLA's routes, as on a machine without the kernels: for programs
    partitioned over several devices, where XLA's SPMD partitioner gathers a custom call's operands whole onto
    every device (a tensor-parallel GPT-2 went from 0 to 9 all-gathers with the layer norm and softmax kernels)."""
    token = _SUPPRESSED.set(True)
    try:
        yield
    finally:
        _SUPPRESSED.reset(token)


def available() -> bool:
    """Whether the CPU kernels are built and registered (building them on the first call); False inside
    :func:`suppressed`."""
    if _SUPPRESSED.get():
        return False
    global _available
    with _lock:
        if _available is None:
            _available = _load()
        return _available


#: The kernel's paths by :func:`isa`'s number.
ISAS = {1: "avx2", 2: "avx512-vnni"}


def isa(want: int | None = None) -> int:
    """The instruction set the kernel runs on: 2 (AVX-512 VNNI), 1 (AVX2), 0 (no kernel). ``want`` narrows
    it to a path this CPU has, for calls from then on (compiled programs included): how tests cover both
    paths on one machine, and how to compare them."""
    if not available() or _library is None:
        return 0
    return int(_library.jaxinfer_int8_dot_isa(-1 if want is None else int(want)))


def _xla_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """XLA's int8 dot where it is right (CPU, TPU); on GPU the exact float32 route (:func:`_batched_dot`)."""
    return _batched_dot(x, w, (((x.ndim - 1,), (1,)), ((), ())))


def _batched_dot(x: jax.Array, w: jax.Array, dims: tuple) -> jax.Array:
    """int8 x int8 -> int32 ``dot_general`` over one contracted axis, right on every platform.

    XLA GPU's int8 dot is not: on an H200 (jax 0.11.2, CUDA 13) a [2, 3, 33] x [17, 33] product came out
    exactly twice the right sums (a [1, 1024] x [4096, 1024] one was right). There the sums are taken
    in float32 chunks that stay exact (:func:`jaxinfer.intmath.exact_dot`), as the rest of jaxinfer does.
    """
    def native(x: jax.Array, w: jax.Array) -> jax.Array:
        return lax.dot_general(x, w, dims, preferred_element_type=jnp.int32)

    def exact(x: jax.Array, w: jax.Array) -> jax.Array:
        from .. import intmath  # intmath imports this module

        (kx,), (kw,) = dims[0]
        return intmath.exact_dot(x, w, dims, kx, kw, 128 * 128)

    return lax.platform_dependent(x, w, cuda=exact, rocm=exact, default=native)


def int8_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """``sum_k x[..., k] * w[n, k]`` as int32 (``x`` [..., K], ``w`` [N, K], both int8) -> [..., N].

    The CPU kernel where it is available and ``x`` has at most :data:`MAX_ROWS` rows; otherwise
    ``lax.dot_general``. Both give the same int32 sums.
    """
    x, w = _rows_operands("int8_dot", x, w, jnp.int8)
    lead, rows, k, n, kernel = _shape(x, w)
    if not kernel:
        return _xla_dot(x, w)
    return _kernel_dot(x.reshape(rows, k), w).reshape(*lead, n)


def _rows_operands(fn: str, x: jax.Array, w: jax.Array, x_dtype: Any) -> tuple[jax.Array, jax.Array]:
    """``x`` [..., K] of ``x_dtype`` and an int8 weight ``w`` [N, K] as arrays, or ValueError naming ``fn``."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    if x.dtype != x_dtype or w.dtype != jnp.int8 or w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"{fn} takes {jnp.dtype(x_dtype).name} x [..., K] and int8 w [N, K]; got x "
                         f"{x.dtype}{list(x.shape)} and w {w.dtype}{list(w.shape)}")
    return x, w


def _shape(x: jax.Array, w: jax.Array) -> tuple[tuple[int, ...], int, int, int, bool]:
    """x's leading dims, their product (rows), K, N, and whether the kernel takes the product."""
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[0]
    rows = math.prod(lead)
    return lead, rows, k, n, takes(rows, k, n)


def takes(rows: int, k: int, n: int) -> bool:
    """Whether :func:`int8_dot` / :func:`int8_dot_zp` run a ``[rows, k] x [n, k]`` product in the kernel
    (else XLA's dot): at most :data:`MAX_ROWS` rows, or on the VNNI path K >= :data:`VNNI_MIN_K` or
    N <= :data:`VNNI_MAX_N`."""
    if rows <= 0 or k <= 0 or n <= 0 or not available():
        return False
    return rows <= MAX_ROWS or (isa() == 2 and (k >= VNNI_MIN_K or n <= VNNI_MAX_N))


@jax.custom_batching.custom_vmap
def _kernel_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """[M, K] x [N, K] -> [M, N] through the kernel on CPU, :func:`_xla_dot` on any other platform."""
    kernel = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.int32))
    return lax.platform_dependent(x, w, cpu=kernel, default=_xla_dot)


@_kernel_dot.def_vmap
def _kernel_dot_vmap(axis_size: int, in_batched: list[bool], x: jax.Array, w: jax.Array) -> tuple[jax.Array, bool]:
    """Under ``jax.vmap``: a batch of x is more rows for the same weight (the kernel while they are few);
    a batch of weights is XLA's batched dot."""
    x_batched, w_batched = in_batched
    if not w_batched:
        return int8_dot(x, w), True
    if not x_batched:
        x = jnp.broadcast_to(x, (axis_size,) + x.shape)
    return _batched_dot(x, w, (((2,), (2,)), ((0,), (0,)))), True


def _xla_dot_zp(x: jax.Array, zp: jax.Array, w: jax.Array) -> jax.Array:
    """[M, K], [M], [N, K] -> [M, N] with XLA's dot: a row of ones appended to ``x`` gives the column
    sums of ``w`` in the same pass (int32 wraps alike, so the sums equal the kernel's). A uint8 ``x`` is taken
    as the kernel takes it, x - 128 against a zero point already shifted down by 128."""
    if x.dtype == jnp.uint8:
        x = (x.astype(jnp.int16) - 128).astype(jnp.int8)
    lhs = jnp.concatenate([x, jnp.ones((1, x.shape[1]), jnp.int8)])
    out = _xla_dot(lhs, w)
    return out[:-1] - zp.astype(jnp.int32)[:, None] * out[-1:]


def int8_dot_zp(x: jax.Array, zp: jax.Array, w: jax.Array) -> jax.Array:
    """``sum_k (x[..., k] - zp[...]) * w[n, k]`` as int32 (wrapping): :func:`int8_dot` with a zero point per
    row of ``x`` (``zp`` with ``x``'s leading shape, taken as int32). Rows whose zero point lies outside
    :data:`ZP_RANGE` (never those of 8-bit tensors) cost the kernel an extra pass over ``w``.

    The kernel subtracts the zero point while it widens ``x``, so this costs one pass over ``w``; XLA's
    dot (more rows, no kernel) appends a row of ones to ``x`` for the column sums of ``w``. Same sums.
    ``x`` may be uint8 (an activation quantized by ONNX DynamicQuantizeLinear, say): the kernel reads its
    bytes as they are, where converting it to int8 first had cost XLA a loop of its own per product.
    """
    x, zp, w = jnp.asarray(x), jnp.asarray(zp), jnp.asarray(w)
    if (x.dtype not in (jnp.int8, jnp.uint8) or w.dtype != jnp.int8 or w.ndim != 2 or x.ndim < 1
            or x.shape[-1] != w.shape[1] or not jnp.issubdtype(zp.dtype, jnp.integer) or zp.shape != x.shape[:-1]):
        raise ValueError(f"int8_dot_zp takes int8 or uint8 x [..., K], integer zp [...] and int8 w [N, K]; got x "
                         f"{x.dtype}{list(x.shape)}, zp {zp.dtype}{list(zp.shape)} and w {w.dtype}{list(w.shape)}")
    zp = zp.astype(jnp.int32)
    # uint8 x: the int8 domain's zero point, x - zp = (x - 128) - (zp - 128)
    return _dot_zp(x, zp - 128 if x.dtype == jnp.uint8 else zp, w)


def _dot_zp(x: jax.Array, zp: jax.Array, w: jax.Array) -> jax.Array:
    """:func:`int8_dot_zp` with ``zp`` int32 in the int8 domain (shifted down by 128 for a uint8 ``x``)."""
    lead, rows, k, n, kernel = _shape(x, w)
    return (_kernel_dot_zp if kernel else _xla_dot_zp)(x.reshape(rows, k), zp.reshape(rows), w).reshape(*lead, n)


@jax.custom_batching.custom_vmap
def _kernel_dot_zp(x: jax.Array, zp: jax.Array, w: jax.Array) -> jax.Array:
    """[M, K], [M], [N, K] -> [M, N] through the kernel on CPU, :func:`_xla_dot_zp` on any other platform."""
    kernel = jax.ffi.ffi_call(TARGET_ZP, jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.int32))
    return lax.platform_dependent(x, zp, w, cpu=kernel, default=_xla_dot_zp)


@_kernel_dot_zp.def_vmap
def _kernel_dot_zp_vmap(axis_size: int, in_batched: list[bool], x: jax.Array, zp: jax.Array,
                        w: jax.Array) -> tuple[jax.Array, bool]:
    """Under ``jax.vmap``: batches of x and zp are more rows for the same weight; a batch of weights
    is XLA's dot per member."""
    x_batched, zp_batched, w_batched = in_batched
    if not x_batched:
        x = jnp.broadcast_to(x, (axis_size,) + x.shape)
    if not zp_batched:
        zp = jnp.broadcast_to(zp, (axis_size,) + zp.shape)
    if not w_batched:
        return _dot_zp(x, zp, w), True
    return jax.vmap(_xla_dot_zp)(x, zp, w), True


def int8_dot_dyn(x: jax.Array, w: jax.Array, otherwise: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """float32 ``x`` [..., K] quantized to int8 per row at run time, times an int8 weight ``w`` [N, K] ->
    float32 [..., N]: ``sum_k q[..., k] w[n, k] * sx[...]``, where ``q`` and ``sx`` are ``x``'s rows and
    their scales as :func:`jaxinfer.arith.quantize_rows` makes them (the weight's scales are the caller's).

    The kernel quantizes the rows, multiplies and scales in one call, where XLA ran ~5 small fusions per
    product around :func:`int8_dot` (absmax in two stages, the scale, the int8 values, the row scales).
    ``otherwise(x, w)`` must give the same numbers (the caller's composition of those steps): it runs where
    :func:`takes` declines the product, on other platforms and under ``jax.vmap`` of ``w``. A row holding
    NaN gives NaN here; XLA's max over such a row keeps or drops the NaN depending on how it fused it.
    """
    x, w = _rows_operands("int8_dot_dyn", x, w, jnp.float32)
    lead, rows, k, n, kernel = _shape(x, w)
    if not kernel:
        return otherwise(x, w)

    def call(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.ffi.ffi_call(TARGET_DYN, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, w)

    return _on_cpu(call, otherwise, x.reshape(rows, k), w, leading=True).reshape(*lead, n)


def int8_dot_hybrid(x: jax.Array, w: jax.Array, asymmetric: bool, scales: Any,
                    otherwise: Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]], *,
                    bias: Any = None, clamp: tuple[float, float] | None = None) -> jax.Array:
    """A TFLite dynamic-range (hybrid) layer: float32 ``x`` [M, K], each row quantized to int8 on the fly as
    :func:`jaxinfer.converters.tflite.quant.dynamic_quantize_rows` does (``asymmetric``: a zero point per
    row), times an int8 weight ``w`` [N, K] with zero point 0 and float32 ``scales`` (one, or one per
    output) -> float32 [M, N] ``sums * (row scale * scales)``, plus ``bias`` [N] and clipped to ``clamp``
    (lo, hi: a fused activation) where given, NaN kept.

    One kernel call where XLA ran ~10 small fusions before the dot (min and max in two stages, the float64
    scale and zero point, the int8 values) and one after it. ``otherwise(x, w)`` gives the int32 sums and the
    row scales; the same finish applied to them in XLA (FMA-contracted, as XLA compiles it) is the answer
    where :func:`takes` declines the product, on other platforms and under ``jax.vmap``: bit for bit.
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    if x.dtype != jnp.float32 or w.dtype != jnp.int8 or x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"int8_dot_hybrid takes float32 x [M, K] and int8 w [N, K]; got x {x.dtype}{list(x.shape)} "
                         f"and w {w.dtype}{list(w.shape)}")
    m, k, n = x.shape[0], x.shape[1], w.shape[0]
    # One scale goes as [1] (the kernel broadcasts it): XLA would run a broadcast of it as a thunk every call.
    ws = jnp.asarray(scales, jnp.float32).reshape(-1)
    if ws.shape[0] not in (1, n):
        raise ValueError(f"int8_dot_hybrid takes one weight scale or {n} (one per output); got {ws.shape[0]}")
    if ws.shape[0] == n and isinstance(scales, np.ndarray) and np.all(scales == scales.flat[0]):
        ws = ws[:1]
    b, finish = _finish_operands(bias, clamp, n)
    if bias is None:
        b = b[:1]  # likewise

    def xla(x: jax.Array, w: jax.Array, ws: jax.Array, b: jax.Array) -> jax.Array:
        acc, sf = otherwise(x, w)
        y = acc.astype(jnp.float32) * (sf[:, None] * jnp.broadcast_to(ws, (n,))[None, :])
        return _xla_finish(y, jnp.broadcast_to(b, (n,)), clamp, bool(finish["finish"]))

    if not takes(m, k, n):
        return xla(x, w, ws, b)

    def kernel(x: jax.Array, w: jax.Array, ws: jax.Array, b: jax.Array) -> jax.Array:
        out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
        return jax.ffi.ffi_call(TARGET_HYBRID, out)(x, w, ws, b, asymmetric=np.int64(bool(asymmetric)), **finish)

    return _on_cpu(kernel, xla, x, w, ws, b, leading=True)


#: Largest tensor :func:`dynamic_quantize_u8` quantizes in the kernel (one thread, two passes); XLA's
#: parallel loops take larger ones.
DQL_MAX_ELEMENTS = 1 << 18


def dynamic_quantize_u8(x: jax.Array, otherwise: Callable[[jax.Array], tuple[jax.Array, jax.Array, jax.Array]]
                        ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """ONNX ``DynamicQuantizeLinear`` of a float32 tensor -> (uint8 values, float32 scale, uint8 zero point),
    the numbers of ``otherwise(x)`` (the converter's XLA composition, which runs on other platforms, under
    ``jax.vmap``, and for tensors past :data:`DQL_MAX_ELEMENTS` or empty): one kernel call where XLA ran the
    range as two two-stage reductions, the scale and zero point, and the values (~6 thunks)."""
    x = jnp.asarray(x)
    if x.dtype != jnp.float32 or not 0 < x.size <= DQL_MAX_ELEMENTS or not available():
        return otherwise(x)

    def kernel(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        # x in its own shape: flattened, XLA made the fusion producing it 1-D too, and a 1-D loop that
        # broadcasts a bias along the last axis ran 5x slower (bert_dynamic's GELU at batch 8: 153 vs 27 us)
        out = (jax.ShapeDtypeStruct(x.shape, jnp.uint8), jax.ShapeDtypeStruct((1,), jnp.float32),
               jax.ShapeDtypeStruct((1,), jnp.uint8))
        y, s, z = jax.ffi.ffi_call(TARGET_DQL, out)(x)
        return y, s.reshape(()), z.reshape(())

    return _on_cpu(kernel, otherwise, x)


def lookup8(table: jax.Array, x: jax.Array) -> jax.Array:
    """``table[code]`` for each element of an 8-bit ``x`` (code: ``x`` for uint8, ``x + 128`` for int8), in
    ``table``'s dtype and ``x``'s shape: one kernel read of a [256] table of 1-, 2-, 4- or 8-byte entries
    (64 bytes per AVX-512 VBMI step for 1-byte entries). XLA's gather, which runs elsewhere and under
    ``jax.vmap``, fused the table's computation into its operand, recomputing an entry per element."""
    x = jnp.asarray(x)
    table = jnp.asarray(table)
    if x.dtype not in (jnp.int8, jnp.uint8) or table.shape != (256,):
        raise ValueError(f"lookup8: expected 8-bit codes and a [256] table, got {x.dtype} codes and a "
                         f"{table.shape} table")
    lo = int(np.iinfo(x.dtype).min)

    def otherwise(table: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.take(table, x.astype(jnp.int32) - lo, axis=0, mode="clip")

    if x.size == 0 or table.dtype.itemsize not in (1, 2, 4, 8) or not available():
        return otherwise(table, x)

    def kernel(table: jax.Array, x: jax.Array) -> jax.Array:
        return jax.ffi.ffi_call(TARGET_LOOKUP8, jax.ShapeDtypeStruct(x.shape, table.dtype))(table, x)

    return _on_cpu(kernel, otherwise, table, x)


def int8_conv(x: jax.Array, zp: jax.Array, w: jax.Array, strides: Sequence[int], dilation: Sequence[int],
              pads: Sequence[tuple[int, int]], otherwise: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
              ) -> jax.Array:
    """``sum (x - zp) * w`` over each window, as int32: NHWC int8 or uint8 ``x`` [B, H, W, C], a zero point
    ``zp`` (an int32 scalar in ``x``'s range: the padding holds it, so padding adds nothing), an OHWI int8
    filter ``w`` [N, KH, KW, C]; ``strides``, ``dilation`` and ``pads`` ((top, bottom), (left, right))
    of the two spatial dims -> [B, OH, OW, N]. The kernel reads a uint8 image as it is (no shifted copy).

    The kernel multiplies ``x``'s patch matrix by the flattened filter without XLA writing the patches
    out (it packs them as it widens ``x``); its VNNI panels are what pay, so callers check :func:`isa`
    first (``intmath.zp_conv``). ``otherwise(x, zp, w)`` must give the same sums and runs on other
    platforms, and under ``jax.vmap`` of ``w`` or ``zp``.
    """
    x, zp, w = jnp.asarray(x), jnp.asarray(zp), jnp.asarray(w)
    if (x.dtype not in (jnp.int8, jnp.uint8) or w.dtype != jnp.int8 or x.ndim != 4 or w.ndim != 4
            or x.shape[3] != w.shape[3]):
        raise ValueError(f"int8_conv takes int8 or uint8 x [B, H, W, C] and int8 w [N, KH, KW, C]; got x "
                         f"{x.dtype}{list(x.shape)} and w {w.dtype}{list(w.shape)}")
    geometry = _conv_geometry(x.shape, w.shape, strides, dilation, pads)
    if geometry is None:
        return otherwise(x, zp, w)
    (oh, ow), attrs = geometry
    n, kh, kw, c = w.shape

    def kernel(x: jax.Array, zp: jax.Array, w: jax.Array) -> jax.Array:
        out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, n), jnp.int32)
        return jax.ffi.ffi_call(TARGET_CONV, out)(x, _kernel_zp(x, zp), w.reshape(n, kh * kw * c), **attrs)

    return _on_cpu(kernel, otherwise, x, zp.astype(jnp.int32), w, leading=True)


def _kernel_zp(x: jax.Array, zp: jax.Array) -> jax.Array:
    """An image's zero point as the int8 convolution kernels take it: [1] int32 in int8's range (a uint8
    image is read as x - 128, so its zero point moves down by 128 too)."""
    return (zp - 128 if x.dtype == jnp.uint8 else zp).reshape(1)


@dataclass(frozen=True)
class OutputStage:
    """int32 sums to int8 by fixed-point requantization, per output channel ``n`` (``requant.h``)::

        v = (acc + bias[n]) << max(shift[n], 0)                 (int32, wrapping)
        h = (v * multiplier[n] + 2**30) >> 31                   (SaturatingRoundingDoublingHighMul)
        q = h >> max(-shift[n], 0), rounded to nearest: ties away from zero where ties_away[n], else up
        y = clip(q + zero_point, lo, hi)

    TFLite's MultiplyByQuantizedMultiplier and fused activation clamp (the caller's ``otherwise`` computes
    the same numbers in XLA). ``multiplier`` [N] Q31 values other than INT32_MIN, ``shift`` [N] in [-31, 30],
    ``zero_point``/``lo``/``hi`` int8 values with ``lo <= hi``.
    """

    multiplier: np.ndarray
    shift: np.ndarray
    ties_away: np.ndarray
    zero_point: int
    lo: int
    hi: int

    def table(self) -> np.ndarray:
        """The kernels' ``stage`` operand: [3, N] int32 rows multiplier, shift, ties_away."""
        return np.stack([np.asarray(self.multiplier, np.int32), np.asarray(self.shift, np.int32),
                         np.asarray(self.ties_away, np.int32)])

    def attrs(self) -> dict[str, np.int64]:
        return dict(ozp=np.int64(self.zero_point), lo=np.int64(self.lo), hi=np.int64(self.hi))

    def fits(self, channels: int) -> bool:
        """Whether the kernels take this stage for ``channels`` output channels."""
        m, s, t = (np.asarray(v).reshape(-1) for v in (self.multiplier, self.shift, self.ties_away))
        return (m.size == s.size == t.size == channels and bool(np.all(m > np.iinfo(np.int32).min))
                and bool(np.all(m <= np.iinfo(np.int32).max)) and bool(np.all((s >= -31) & (s <= 30)))
                and -128 <= self.zero_point <= 127 and -128 <= self.lo <= self.hi <= 127)


def _stage_operands(bias: Any, channels: int) -> jax.Array:
    return jnp.zeros((channels,), jnp.int32) if bias is None else jnp.asarray(bias).astype(jnp.int32).reshape(channels)


def int8_conv_requant(x: jax.Array, zp: jax.Array, w: jax.Array, bias: Any, stage: OutputStage,
                      strides: Sequence[int], dilation: Sequence[int], pads: Sequence[tuple[int, int]],
                      otherwise: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """:func:`int8_conv`'s sums plus ``bias`` [N] (int32, or None) through ``stage``: int8 [B, OH, OW, N] in
    one kernel call, where XLA took the int32 sums through two or three fusions. Callers check :func:`isa`
    (``2``) and :meth:`OutputStage.fits`; ``otherwise(x, zp, w, bias)`` gives the same int8 values (XLA) and
    runs on other platforms and under ``jax.vmap`` of anything but ``x``."""
    x, zp, w = jnp.asarray(x), jnp.asarray(zp), jnp.asarray(w)
    n, c = w.shape[0], w.shape[-1]
    if (x.dtype != jnp.int8 or w.dtype != jnp.int8 or x.ndim != 4 or w.ndim != 4 or x.shape[3] != c
            or not stage.fits(n)):
        raise ValueError(f"int8_conv_requant takes int8 x [B, H, W, C], int8 w [N, KH, KW, C] and a stage for N "
                         f"channels; got x {x.dtype}{list(x.shape)}, w {w.dtype}{list(w.shape)}")
    return _staged_window(TARGET_CONV_RQ, x, zp, w, bias, stage, w.shape, n, strides, dilation, pads, otherwise)


#: :func:`int8_conv_requant_f32` of images with at most this many channels runs as exact float32 sums on the float
#: kernel's direct path (``jaxinfer_int8_conv_direct_f32``): a 3-channel stem at batch 8, 148 -> ~50 us (session 27).
INT8_DIRECT_MAX_CHANNELS = 4


def int8_conv_requant_f32(x: jax.Array, zp: jax.Array, w: jax.Array, bias: Any, scale: jax.Array,
                          out_zp: jax.Array, out_dtype: Any, relu: bool, strides: Sequence[int],
                          dilation: Sequence[int], pads: Sequence[tuple[int, int]],
                          otherwise: Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array],
                                              jax.Array]) -> jax.Array:
    """:func:`int8_conv`'s sums (int8 or uint8 ``x``) requantized as ONNX does, in the same kernel call: per
    output channel ``n``,
    ``clip(round_half_even(float32(acc + bias[n]) * scale[n]) + out_zp, out_dtype's range)``, clipped at
    ``out_zp`` from below too where ``relu``; ``out_dtype`` int8 or uint8, [B, OH, OW, N]. ``bias`` [N]
    int32 or None, ``scale`` [N] float32 and ``out_zp`` may be traced (an ONNX model's values). Callers
    check :func:`isa` (``2``); ``otherwise(x, zp, w, bias, scale, out_zp)`` gives the same values (XLA) and
    runs on other platforms and under ``jax.vmap`` of anything but ``x``."""
    x, zp, w = jnp.asarray(x), jnp.asarray(zp), jnp.asarray(w)
    n, c = w.shape[0], w.shape[-1]
    out_dtype = np.dtype(out_dtype)
    if (x.dtype not in (jnp.int8, jnp.uint8) or w.dtype != jnp.int8 or x.ndim != 4 or w.ndim != 4
            or x.shape[3] != c or out_dtype not in (np.dtype(np.int8), np.dtype(np.uint8))):
        raise ValueError(f"int8_conv_requant_f32 takes 8-bit x [B, H, W, C], int8 w [N, KH, KW, C] and an int8 or "
                         f"uint8 output; got x {x.dtype}{list(x.shape)}, w {w.dtype}{list(w.shape)}, {out_dtype}")
    bias = _stage_operands(bias, n)
    scale = jnp.broadcast_to(jnp.asarray(scale, jnp.float32).reshape(-1), (n,))
    out_zp = jnp.asarray(out_zp).astype(jnp.int32).reshape(1)
    geometry = _conv_geometry(x.shape, w.shape, strides, dilation, pads)
    if geometry is None:
        return otherwise(x, zp, w, bias, scale, out_zp)
    (oh, ow), attrs = geometry
    k = w.size // max(n, 1)
    # few input channels (a stem: 27-byte patch rows cost the VNNI kernel more to pack than to multiply) take the
    # float32 kernel's direct path, exact while K 255 128 < 2^24
    direct = 0 < c <= INT8_DIRECT_MAX_CHANNELS and k * 255 * 128 < 2**24 and tuple(dilation)[1] == 1

    def kernel(x, zp, w, bias, scale, out_zp):
        out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, n), out_dtype)
        if direct:
            return jax.ffi.ffi_call(TARGET_CONV_DIRECT, out)(x, zp.reshape(1), w.reshape(n, -1), bias, scale, out_zp,
                                                             **attrs, relu=bool(relu))
        return jax.ffi.ffi_call(TARGET_CONV_RQF, out)(x, _kernel_zp(x, zp), w.reshape(n, -1), bias, scale, out_zp,
                                                      **attrs, relu=bool(relu))

    return _on_cpu(kernel, otherwise, x, zp.astype(jnp.int32), w, bias, scale, out_zp, leading=True)


def int8_depthwise(x: jax.Array, zp: jax.Array, taps: jax.Array, bias: Any, stage: OutputStage,
                   kernel_size: tuple[int, int], strides: Sequence[int], dilation: Sequence[int],
                   pads: Sequence[tuple[int, int]],
                   otherwise: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """Depthwise convolution of int8 NHWC ``x`` [B, H, W, C] less its zero point ``zp`` (an int8 value: the
    padding holds it) with int8 ``taps`` [KH * KW, C] (one filter per channel, window order), plus ``bias``
    [C] (int32, or None), through ``stage`` -> int8 [B, OH, OW, C] in one kernel call (``depthwise.cc``).
    Callers check :func:`isa` (``2``) and :meth:`OutputStage.fits`; ``otherwise(x, zp, taps, bias)`` gives the
    same values (XLA) on other platforms and under ``jax.vmap`` of anything but ``x``."""
    x, zp, taps = jnp.asarray(x), jnp.asarray(zp), jnp.asarray(taps)
    kh, kw = kernel_size
    c = x.shape[-1]
    if (x.dtype != jnp.int8 or taps.dtype != jnp.int8 or x.ndim != 4 or taps.shape != (kh * kw, c)
            or not stage.fits(c)):
        raise ValueError(f"int8_depthwise takes int8 x [B, H, W, C], int8 taps [KH * KW, C] and a stage for C "
                         f"channels; got x {x.dtype}{list(x.shape)}, taps {taps.dtype}{list(taps.shape)}")
    return _staged_window(TARGET_DEPTHWISE, x, zp, taps, bias, stage, (c, kh, kw, 1), c, strides, dilation, pads,
                          otherwise)


def _staged_window(target: str, x: jax.Array, zp: jax.Array, filt: jax.Array, bias: Any, stage: OutputStage,
                   ohwi: Sequence[int], channels: int, strides: Sequence[int], dilation: Sequence[int],
                   pads: Sequence[tuple[int, int]], otherwise: Callable[..., jax.Array]) -> jax.Array:
    """An int8 window kernel finished by ``stage`` (:func:`int8_conv_requant`, :func:`int8_depthwise`): its
    filter ``filt`` goes flattened to [rows, values], the window's geometry from the filter shape ``ohwi``;
    ``otherwise(x, zp, filt, bias)`` where the geometry does not fit, on other platforms and under vmap."""
    bias = _stage_operands(bias, channels)
    geometry = _conv_geometry(x.shape, ohwi, strides, dilation, pads)
    if geometry is None:
        return otherwise(x, zp, filt, bias)
    (oh, ow), attrs = geometry
    table = stage.table()

    def kernel(x: jax.Array, zp: jax.Array, filt: jax.Array, bias: jax.Array) -> jax.Array:
        out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, channels), jnp.int8)
        return jax.ffi.ffi_call(target, out)(x, zp.reshape(1), filt.reshape(filt.shape[0], -1), bias, table,
                                             **attrs, **stage.attrs())

    return _on_cpu(kernel, otherwise, x, zp.astype(jnp.int32), filt, bias, leading=True)


def _on_cpu(kernel: Callable[..., Any], otherwise: Callable[..., Any], *args: jax.Array, leading: bool = False) -> Any:
    """``kernel(*args)`` on CPU, ``otherwise(*args)`` (the same numbers) on other platforms. Under ``jax.vmap``
    ``otherwise`` runs per member, except that with ``leading`` (``args[0]`` holds independent items along its
    leading axis: a convolution's images [B, H, W, C] -> [B, OH, OW, N], a product's rows [M, K] -> [M, N]) a
    batch of ``args[0]`` alone is more items for the same kernel call."""

    @jax.custom_batching.custom_vmap
    def call(*args: jax.Array) -> Any:
        return lax.platform_dependent(*args, cpu=kernel, default=otherwise)

    @call.def_vmap
    def _vmap(axis_size: int, in_batched: list[bool], *args: jax.Array):
        if leading and in_batched[0] and not any(in_batched[1:]):
            x = args[0]
            y = call(x.reshape(-1, *x.shape[2:]), *args[1:])
            y = jax.tree.map(lambda t: t.reshape(axis_size, x.shape[1], *t.shape[1:]), y)
            return y, jax.tree.map(lambda _: True, y)
        full = [v if b else jnp.broadcast_to(v, (axis_size,) + v.shape) for v, b in zip(args, in_batched)]
        out = jax.vmap(otherwise)(*full)
        return out, jax.tree.map(lambda _: True, out)

    return call(*args)


def _conv_geometry(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int], dilation: Sequence[int],
                   pads: Sequence[tuple[int, int]]) -> tuple[tuple[int, int], dict[str, np.int64]] | None:
    """(OH, OW) and the kernels' attributes for an NHWC x OHWI convolution; None where the output is
    empty or a pad is negative (callers leave those to XLA)."""
    (sh, sw), (dh, dw), ((pt, pb), (pl, pr)) = strides, dilation, pads
    _, kh, kw, _ = w_shape
    oh = (x_shape[1] + pt + pb - (kh - 1) * dh - 1) // sh + 1
    ow = (x_shape[2] + pl + pr - (kw - 1) * dw - 1) // sw + 1
    if oh <= 0 or ow <= 0 or min(pt, pb, pl, pr) < 0 or x_shape[0] == 0:
        return None
    attrs = dict(kh=kh, kw=kw, sh=sh, sw=sw, dh=dh, dw=dw, pt=pt, pl=pl)
    return (oh, ow), {k: np.int64(v) for k, v in attrs.items()}


def _finish_operands(bias: Any, clamp: tuple[float, float] | None, channels: int) -> tuple[jax.Array, dict[str, Any]]:
    """The float kernels' finish: bias [N] float32 (zeros when None) and the attributes ``finish``/``lo``/``hi``."""
    lo, hi = clamp if clamp is not None else (-np.inf, np.inf)
    if not lo <= hi:
        raise ValueError(f"clamp {clamp}: expected lo <= hi")
    b = jnp.zeros((channels,), jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32).reshape(channels)
    finish = bias is not None or clamp is not None
    return b, dict(finish=np.int64(finish), lo=np.float32(lo), hi=np.float32(hi))


def _xla_finish(y: jax.Array, bias: jax.Array, clamp: tuple[float, float] | None, finish: bool) -> jax.Array:
    """What the kernels' finish computes, in XLA: ``y + bias`` clipped to ``clamp`` (NaN stays NaN)."""
    if not finish:
        return y
    y = y + bias
    return y if clamp is None else jnp.clip(y, clamp[0], clamp[1])


def _block_max(y: jax.Array, ph: int, pw: int) -> jax.Array:
    """The max over each ph x pw block of NHWC ``y`` (trailing rows and columns dropped), NaN-propagating as
    ``jnp.maximum`` is (XLA CPU's reduce-window max dropped NaNs)."""
    if ph * pw == 1:
        return y
    if y.shape[1] < ph or y.shape[2] < pw:  # no whole block: an empty result of the pooled shape
        return y[:, : y.shape[1] // ph, : y.shape[2] // pw]
    from ..conv_lowering import window_slices  # imported here: conv_lowering imports this module

    return functools.reduce(jnp.maximum, window_slices(y, (1, ph, pw, 1), (1, ph, pw, 1)))


def _switch(symbol: str, want: bool | None) -> bool:
    """A kernel library switch (``extern "C" int symbol(int want)``): set when ``want`` is given; its state."""
    if not available() or _library is None:
        return False
    return bool(getattr(_library, symbol)(-1 if want is None else int(bool(want))))


def offer_to_xla_pool(want: bool | None = None) -> bool:
    """Whether the kernels offer large jobs to XLA's intra-op pool as well as to their own helpers (the default;
    ``helpers.h``'s ShareWith says why); ``want`` sets it for calls from then on: for timings."""
    return _switch("jaxinfer_share_xla", want)


def f32_conv_direct(want: bool | None = None) -> bool:
    """Whether :func:`f32_conv`'s kernel reads undilated layers' images directly (the default) or packs patch
    rows; ``want`` sets it for calls from then on (compiled programs included): how tests cover both and how
    to time them."""
    return _switch("jaxinfer_f32_conv_direct", want)


def f32_conv(x: jax.Array, w: jax.Array, strides: Sequence[int], dilation: Sequence[int],
             pads: Sequence[tuple[int, int]], w_layout: str = "OHWI", bias: Any = None,
             clamp: tuple[float, float] | None = None, x_layout: str = "NHWC",
             pool: tuple[int, int] | None = None) -> jax.Array:
    """``lax.conv_general_dilated`` of float32 NHWC ``x`` [B, H, W, C] with a filter ``w`` laid out as
    ``w_layout`` says ("OHWI" [N, KH, KW, C] or "HWIO" [KH, KW, C, N]: both read as they are, no copy),
    ``strides``, ``dilation``, ``pads`` ((top, bottom), (left, right)) of the two spatial dims, zero
    padding -> [B, OH, OW, N] float32, as our AVX-512 kernel's patch product (``f32_conv.cc``): callers
    check :func:`isa` first (``2``). XLA's convolution on other platforms and under ``jax.vmap`` of ``w``.
    Float32 sums in another order than XLA's: the last bits may differ. With ``bias`` [N] and/or ``clamp``
    (lo, hi: a fused activation), the kernel also adds the bias and clamps, in the same pass. ``x_layout``
    "NCHW" takes x as [B, C, H, W] (undilated along W): the kernel transposes it while it pads, where XLA's
    transpose to NHWC of a model's 3-channel input image cost more than the stem's sums. ``pool`` (PH, PW)
    then takes the max over each PH x PW block of those outputs (a MaxPool with strides equal to its window, no
    padding, floor: trailing rows and columns are dropped, and never computed) -> [B, OH // PH, OW // PW, N]: the
    convolution's full output is never written out (a NaN in a block gives NaN, as XLA's max does).
    """
    x, w = jnp.asarray(x), jnp.asarray(w)
    ph, pw = (int(pool[0]), int(pool[1])) if pool is not None else (1, 1)
    if ph < 1 or pw < 1 or (ph * pw > 1 and tuple(dilation)[1] != 1):
        raise ValueError(f"f32_conv pools windows of at least 1 x 1, undilated along W; not {pool} with dilation "
                         f"{tuple(dilation)}")
    if w_layout not in ("OHWI", "HWIO"):
        raise ValueError(f"f32_conv takes an OHWI or HWIO filter, not {w_layout!r}")
    if x_layout not in ("NHWC", "NCHW") or (x_layout == "NCHW" and tuple(dilation)[1] != 1):
        raise ValueError(f"f32_conv takes an NHWC image, or an NCHW one undilated along W; not {x_layout!r} with "
                         f"dilation {tuple(dilation)}")
    c_axis = 3 if w_layout == "OHWI" else 2
    nhwc = x.shape if x_layout == "NHWC" or x.ndim != 4 else (x.shape[0], x.shape[2], x.shape[3], x.shape[1])
    if x.dtype != jnp.float32 or w.dtype != jnp.float32 or x.ndim != 4 or w.ndim != 4 or nhwc[3] != w.shape[c_axis]:
        raise ValueError(f"f32_conv takes float32 x [B, H, W, C] ({x_layout}) and a float32 {w_layout} filter with "
                         f"C input channels; got x {x.dtype}{list(x.shape)} and w {w.dtype}{list(w.shape)}")
    ohwi = tuple(w.shape) if w_layout == "OHWI" else (w.shape[3], w.shape[0], w.shape[1], w.shape[2])
    dims = (x_layout, w_layout, "NHWC")
    n = ohwi[0]
    b, finish = _finish_operands(bias, clamp, n)
    if not finish["finish"]:
        b = b[:1]  # unread; a literal [1] where XLA runs a zero [N] as a broadcast thunk every call

    def xla(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        y = lax.conv_general_dilated(x, w, tuple(strides), tuple(pads), rhs_dilation=tuple(dilation),
                                     dimension_numbers=dims, precision=lax.Precision.HIGHEST)
        return _block_max(_xla_finish(y, b, clamp, bool(finish["finish"])), ph, pw)

    geometry = _conv_geometry(nhwc, ohwi, strides, dilation, pads)
    if geometry is None or geometry[0][0] < ph or geometry[0][1] < pw:
        return xla(x, w, b)
    (oh, ow), attrs = geometry
    kn = w_layout == "HWIO"

    def kernel(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        out = jax.ShapeDtypeStruct((x.shape[0], oh // ph, ow // pw, n), jnp.float32)
        w2 = w.reshape(-1, n) if kn else w.reshape(n, -1)
        return jax.ffi.ffi_call(TARGET_F32_CONV, out)(x, w2, b, kn=np.int64(kn), nchw=np.int64(x_layout == "NCHW"),
                                                      ph=np.int64(ph), pw=np.int64(pw), **attrs, **finish)

    return _on_cpu(kernel, xla, x, w, b, leading=True)


#: Rows up to which :func:`f32_int8w_dot` takes the kernel. Kernel / XLA's dot of the int8 weight / the float32
#: weight's dot, ms (session 24): [1, 1024] x [1024, 4096] 0.14 / 2.9 / 0.23, 8 rows 0.38 / 4.1 / 0.76,
#: [8, 4096] x [4096, 1024] 0.39 / 2.2 / 0.78, 32 rows 2.05 / 4.9 / 2.4, [64, 1024] x [1024, 1024] 0.77 / 1.19 /
#: 0.81; at 128 rows 9.2 / 7.0 / 6.0 then. Since the kernel asks for its lines into L2 and then L1 (session 31) the
#: int8-weight encoder (4 layers, d 1024) runs faster through the kernel up to 256 rows, Model.run ms, kernel / XLA's
#: int8-operand dot: 72 rows 40 / 53-85, 128 rows 70 / 103-107, 256 rows 141 / 153-157, but 512 rows 281 / 247.
INT8W_MAX_ROWS = 256
#: Rows up to which :func:`f32_rows_dot` and :func:`f32_rows_dot_nk` take the kernel for a float32 weight
#: (``conv_lowering.few_rows_matmul`` has the figures).
F32_ROWS_MAX_ROWS = 48
#: ... for a bfloat16 or float16 weight: XLA CPU's 16-bit dots are slower than its float32 ones at every row count,
#: so the kernel keeps them as far as the int8-weight one. The bf16 encoder (4 layers, d 1024, ``quantize(m,
#: "bf16")``), Model.run ms, up to 48 rows / up to 256 (session 32): 64 rows 87.8 / 44.6, 128 rows 110.7 / 78.4, 256
#: rows 165.5 / 146.8 (float32: 35.9, 56.2, 105.9).
HALF_ROWS_MAX_ROWS = 256


def rows_max_rows(w_dtype: Any) -> int:
    """Rows up to which the few-rows float products take a weight of ``w_dtype``."""
    return F32_ROWS_MAX_ROWS if np.dtype(w_dtype) == np.float32 else HALF_ROWS_MAX_ROWS


def f32_int8w_dot(x: jax.Array, w: jax.Array, otherwise: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """float32 ``x`` [..., K] times an int8 weight ``w`` [K, N] -> float32 [..., N]: the float32 sums of
    ``x[..., k] * w[k, n]`` (the caller applies the weight's scales), each weight value widened in registers by
    our AVX-512 kernel (``few_rows.cc``) for at most :data:`INT8W_MAX_ROWS` rows; ``otherwise(x, w)``
    elsewhere (other platforms, more rows, no AVX-512, ``jax.vmap`` of ``w``). Float32 sums in another order
    than XLA's: the last bits may differ."""
    return _few_rows_dot(TARGET_F32_I8W, "f32_int8w_dot", jnp.int8, INT8W_MAX_ROWS, x, w, otherwise)


#: The few-rows float products' weight dtypes -> their custom-call targets.
_ROWS_TARGETS = {np.dtype(np.float32): TARGET_F32_ROWS, np.dtype(jnp.bfloat16): TARGET_F32_BF16W,
                 np.dtype(np.float16): TARGET_F32_F16W}
_ROWS_NK_TARGETS = {np.dtype(np.float32): TARGET_F32_ROWS_NK, np.dtype(jnp.bfloat16): TARGET_F32_BF16W_NK,
                    np.dtype(np.float16): TARGET_F32_F16W_NK}


def f32_rows_dot(x: jax.Array, w: jax.Array, otherwise: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """float32 ``x`` [..., K] times a float32, bfloat16 or float16 weight ``w`` [K, N] -> float32 [..., N] by our
    AVX-512 kernel (``few_rows.cc``: the weight read once, straight from memory, a 16-bit one widened exactly in
    registers) for at most :func:`rows_max_rows` rows; ``otherwise(x, w)`` elsewhere, as
    :func:`f32_int8w_dot`. Float32 sums in k order: the last bits may differ from XLA's."""
    w = jnp.asarray(w)
    dtype = w.dtype if w.dtype in _ROWS_TARGETS else jnp.float32
    return _few_rows_dot(_ROWS_TARGETS[np.dtype(dtype)], "f32_rows_dot", dtype, rows_max_rows(dtype), x, w, otherwise)


def f32_rows_dot_nk(x: jax.Array, w: jax.Array, otherwise: Callable[[jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """float32 ``x`` [..., K] times a float32, bfloat16 or float16 weight ``w`` stored ``[N, K]`` (an ONNX Gemm's with
    ``transB``, a TFLite FULLY_CONNECTED's) -> float32 [..., N], ``x @ w.T``, by our AVX-512 kernel (``few_rows.cc``:
    each weight row read once, contiguously) for at most :func:`rows_max_rows` rows; ``otherwise(x, w)``
    elsewhere, as :func:`f32_int8w_dot`. Float32 sums in another order than XLA's: the last bits may differ."""
    w = jnp.asarray(w)
    dtype = w.dtype if w.dtype in _ROWS_NK_TARGETS else jnp.float32
    return _few_rows_dot(_ROWS_NK_TARGETS[np.dtype(dtype)], "f32_rows_dot_nk", dtype, rows_max_rows(dtype), x, w,
                         otherwise, nk=True)


def _kinds(name: str, w_dtype: Any) -> str:
    """The weight dtypes ``name`` takes, for its error message."""
    return "float32, bfloat16 or float16" if name.startswith("f32_rows_dot") else np.dtype(w_dtype).name


def _few_rows_dot(target: str, name: str, w_dtype: Any, max_rows: int, x: jax.Array, w: jax.Array,
                  otherwise: Callable[[jax.Array, jax.Array], jax.Array], nk: bool = False) -> jax.Array:
    """The few-rows products' common part: ``w`` is [K, N], or [N, K] with ``nk``."""
    x, w = jnp.asarray(x), jnp.asarray(w)
    k_axis = 1 if nk else 0
    if x.dtype != jnp.float32 or w.dtype != w_dtype or w.ndim != 2 or x.ndim < 1 or x.shape[-1] != w.shape[k_axis]:
        raise ValueError(f"{name} takes float32 x [..., K] and {_kinds(name, w_dtype)} w {'[N, K]' if nk else '[K, N]'}"
                         f"; got x {x.dtype}{list(x.shape)} and w {w.dtype}{list(w.shape)}")
    lead, k, n = x.shape[:-1], x.shape[-1], w.shape[1 - k_axis]
    rows = math.prod(lead)
    if not (0 < rows <= max_rows and k > 0 and n > 0 and isa() == 2):
        return otherwise(x, w)

    def kernel(x: jax.Array, w: jax.Array) -> jax.Array:
        return jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))(x, w)

    return _on_cpu(kernel, otherwise, x.reshape(rows, k), w, leading=True).reshape(*lead, n)


#: Batch rows up to which :func:`f32_lstm` takes the kernel (one thread; rows in pairs, each weight read once per
#: pair). TFLite lstm_stream (10 steps x 64 cells), XLA -> kernel: b1 46 -> 34 us, b2 73 -> 40, b4 87 -> 58,
#: b8 115 -> 95, b16 169 -> 158, b32 300 -> 298 (session 23); past that XLA's threaded batched products.
LSTM_MAX_ROWS = 32


def f32_lstm(x: jax.Array, ws: Sequence[jax.Array], rs: Sequence[jax.Array], bs: Sequence[jax.Array],
             h0: jax.Array, c0: jax.Array, *, time_major: bool, reverse: bool, cell_clip: float,
             otherwise: Callable[..., tuple[jax.Array, jax.Array, jax.Array]]) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A float32 LSTM layer with tanh and no peepholes, projection, layer norm or coupled gates, whole, in one
    kernel call (``lstm.cc``): ``x`` [T, B, I] (``time_major``; else [B, T, I]), per gate i, f, c, o the input
    weights ``ws`` [n, I], recurrent weights ``rs`` [n, n] and biases ``bs`` [n], the state ``h0``/``c0``
    [B, n], ``cell_clip`` (0: none), ``reverse`` (the last step first) -> (ys like x with n features, h_T,
    c_T), for at most :data:`LSTM_MAX_ROWS` batch rows. XLA ran ~6 thunks a step. The kernel's exp and tanh
    are its own: the last bits differ from XLA's. Callers check :func:`isa` (``2``); ``otherwise(x, *ws, *rs,
    *bs, h0, c0)`` (the XLA composition) runs on other platforms, under ``jax.vmap`` and past the row limit."""
    ops = [jnp.asarray(v) for v in (x, *ws, *rs, *bs, h0, c0)]
    x = ops[0]
    n = ops[5].shape[0] if len(ops) == 15 and ops[5].ndim == 2 else -1
    if (len(ops) != 15 or any(v.dtype != jnp.float32 for v in ops) or x.ndim != 3 or n < 0
            or any(v.shape != (n, x.shape[2]) for v in ops[1:5]) or any(v.shape != (n, n) for v in ops[5:9])
            or any(v.shape != (n,) for v in ops[9:13])):
        raise ValueError("f32_lstm takes float32 x [T, B, I], four w [n, I], four r [n, n], four b [n] and h0, c0 "
                         f"[B, n]; got {[f'{v.dtype}{list(v.shape)}' for v in ops]}")
    t, b = (x.shape[0], x.shape[1]) if time_major else (x.shape[1], x.shape[0])
    if any(v.shape != (b, n) for v in ops[13:]):
        raise ValueError(f"f32_lstm takes h0 and c0 [B, n] = {[b, n]}; got {list(ops[13].shape)}, {list(ops[14].shape)}")
    if not t * b * n or b > LSTM_MAX_ROWS:
        return otherwise(*ops)

    def kernel(*ops: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        out = (jax.ShapeDtypeStruct(x.shape[:2] + (n,), jnp.float32), jax.ShapeDtypeStruct((b, n), jnp.float32),
               jax.ShapeDtypeStruct((b, n), jnp.float32))
        return tuple(jax.ffi.ffi_call(TARGET_F32_LSTM, out)(
            *ops, time_major=np.int64(time_major), reverse=np.int64(reverse), clip=np.float32(cell_clip)))

    return _on_cpu(kernel, otherwise, *ops)


def _rows_call(target: str, x: jax.Array, *operands: jax.Array, **attrs: Any) -> jax.Array:
    """``norm.cc``'s kernel ``target`` over the rows of float32 ``x`` viewed as [R, C] (C its last axis), shaped
    back like ``x``."""
    c = x.shape[-1]
    y = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.size // c, c), jnp.float32))(x.reshape(-1, c), *operands,
                                                                                      **attrs)
    return y.reshape(x.shape)


def layer_norm(x: jax.Array, gamma: jax.Array, beta: jax.Array | None, eps: float,
               otherwise: Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]) -> jax.Array:
    """Float32 layer normalization over ``x``'s last axis: ``((x - mean) * inv) * gamma + beta``, ``inv = 1 /
    sqrt(var + eps)`` (biased variance), ``gamma`` / ``beta`` [C] (``beta`` None: none), in one kernel call
    (``norm.cc``) where XLA ran 5-7 small loops; sums in another order than XLA's (the last bits may differ).
    ``otherwise(x, gamma, beta)`` (XLA) runs on other platforms, under ``jax.vmap`` of the parameters, and
    without AVX-512."""
    x = jnp.asarray(x)
    c = x.shape[-1] if x.ndim else 0
    gamma = jnp.asarray(gamma)
    if (x.dtype != jnp.float32 or x.ndim < 1 or c == 0 or x.size == 0 or gamma.shape != (c,)
            or (beta is not None and jnp.shape(beta) != (c,)) or not available() or isa() != 2):
        return otherwise(x, gamma, beta)
    has_beta = beta is not None
    b = jnp.asarray(beta, jnp.float32) if has_beta else jnp.zeros((1,), jnp.float32)

    def kernel(x: jax.Array, gamma: jax.Array, b: jax.Array) -> jax.Array:
        return _rows_call(TARGET_LAYER_NORM, x, gamma.astype(jnp.float32), b, eps=np.float32(eps), has_beta=has_beta)

    def xla(x: jax.Array, gamma: jax.Array, b: jax.Array) -> jax.Array:
        return otherwise(x, gamma, b if has_beta else None)

    return _on_cpu(kernel, xla, x, gamma, b, leading=True)


def softmax(x: jax.Array, otherwise: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Float32 softmax over ``x``'s last axis, ``exp(x - max) / sum(exp(x - max))``, in one kernel call
    (``norm.cc``, ``vmath.h``'s exp: within a few ulp of XLA's) where XLA ran four loops; NaN rows stay NaN, -inf
    entries give 0. ``otherwise(x)`` (``jax.nn.softmax``) runs on other platforms, under ``jax.vmap`` and
    without AVX-512."""
    x = jnp.asarray(x)
    if x.dtype != jnp.float32 or x.ndim < 1 or x.size == 0 or not available() or isa() != 2:
        return otherwise(x)
    return _on_cpu(functools.partial(_rows_call, TARGET_SOFTMAX), otherwise, x, leading=True)


def keep(x: jax.Array) -> jax.Array:
    """``x`` itself, through a call XLA cannot look into (``buffers.cc``; its output aliases its input, nothing
    is copied): XLA writes ``x`` to a buffer once and every reader reads it, where a value read only by fusible
    ops (elementwise, reductions) is otherwise recomputed inside each reader's fusion. On other platforms,
    under ``jax.vmap`` of nothing but ``x`` still one call, and without the kernels: ``x`` as it is."""
    x = jnp.asarray(x)
    if x.size == 0 or not available():
        return x

    def kernel(v: jax.Array) -> jax.Array:
        return jax.ffi.ffi_call(TARGET_KEEP, jax.ShapeDtypeStruct(v.shape, v.dtype), input_output_aliases={0: 0})(v)

    return _on_cpu(kernel, lambda v: v, x, leading=True)


#: Values per row from which :func:`row_absmax` takes the kernel: a per-sample scale of a conv's input (an image's
#: activations, 10^4-10^6 values), not the per-token rows of a product (a hidden size), which XLA's reduction fuses
#: into the quantization well.
ROW_ABSMAX_MIN_VALUES = 1 << 14


def row_absmax(x: jax.Array, otherwise: Callable[[jax.Array], jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(x, max |x[r, ...]|)`` of a float32 ``x`` [R, ...]: ``x`` itself, back from the call (its output aliases
    the input: a buffer XLA writes once and the later readers read), and each leading index's absolute maximum [R],
    exactly (NaN where a row holds one), in one kernel call (``buffers.cc``). ``otherwise(x)`` (XLA's reduction,
    ``x`` as it is) runs for rows under :data:`ROW_ABSMAX_MIN_VALUES`, on other platforms, under ``jax.vmap`` and
    without AVX-512."""
    x = jnp.asarray(x)
    if (x.dtype != jnp.float32 or x.ndim < 2 or x.size < x.shape[0] * ROW_ABSMAX_MIN_VALUES or not available()
            or isa() != 2):
        return x, otherwise(x)

    def kernel(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        out = (jax.ShapeDtypeStruct(x.shape, jnp.float32), jax.ShapeDtypeStruct(x.shape[:1], jnp.float32))
        return tuple(jax.ffi.ffi_call(TARGET_ROW_ABSMAX, out, input_output_aliases={0: 0})(x))

    return _on_cpu(kernel, lambda v: (v, otherwise(v)), x, leading=True)


def gelu(x: jax.Array, bias: Any, approximate: str, otherwise: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Float32 GELU of ``x + bias`` (``bias`` [C] over the last axis, or None): ``approximate`` "none" is
    ``v Phi(v)`` (the erf form), "tanh" ``0.5 v (1 + tanh(sqrt(2 / pi) (v + 0.044715 v^3)))``, in one kernel call
    (``norm.cc``: its own rational erf, within 2e-7 max(1, |v|) of float64's GELU; ``vmath.h``'s exp for tanh),
    where XLA ran a loop split over its pool. ``otherwise(v)`` (XLA's GELU of ``v = x + bias``) runs on other platforms, under
    ``jax.vmap`` of the bias and without AVX-512."""
    x = jnp.asarray(x)
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu's approximate is 'none' or 'tanh', not {approximate!r}")
    c = x.shape[-1] if x.ndim else 0
    has_bias = bias is not None
    b = jnp.asarray(bias) if has_bias else jnp.zeros((1,), jnp.float32)
    bias_ok = not has_bias or (b.shape == (c,) and b.dtype == jnp.float32)
    if x.dtype != jnp.float32 or x.ndim < 1 or x.size == 0 or not bias_ok or not available() or isa() != 2:
        return otherwise(x + b if has_bias else x)

    def kernel(x: jax.Array, b: jax.Array) -> jax.Array:
        return _rows_call(TARGET_GELU, x, b, has_bias=has_bias, approximate=np.int64(approximate == "tanh"))

    def xla(x: jax.Array, b: jax.Array) -> jax.Array:
        return otherwise(x + b if has_bias else x)

    return _on_cpu(kernel, xla, x, b, leading=True)


def max_pool8(x: jax.Array, window: tuple[int, int], strides: Sequence[int], dilation: Sequence[int],
              pads: Sequence[tuple[int, int]], otherwise: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Max pool of an int8 or uint8 NHWC ``x`` [B, H, W, C] over ``window`` (KH, KW) with ``strides``, ``dilation``
    and ``pads`` ((top, bottom), (left, right), padding that never wins) -> [B, OH, OW, C] of x's type, in one
    kernel call (``pool.cc``: 64 channels per vector and tap), where XLA ran a reduce-window loop. Callers check
    :func:`isa` (``2``); ``otherwise(x)`` (XLA, the same values) runs on other platforms and under ``jax.vmap``."""
    x = jnp.asarray(x)
    if x.dtype not in (jnp.int8, jnp.uint8) or x.ndim != 4:
        raise ValueError(f"max_pool8 takes int8 or uint8 x [B, H, W, C]; got {x.dtype}{list(x.shape)}")
    c = x.shape[-1]
    geometry = _conv_geometry(x.shape, (c, *window, 1), strides, dilation, pads)
    if geometry is None or c == 0:
        return otherwise(x)
    (oh, ow), attrs = geometry

    def kernel(x: jax.Array) -> jax.Array:
        return jax.ffi.ffi_call(TARGET_MAX_POOL8, jax.ShapeDtypeStruct((x.shape[0], oh, ow, c), x.dtype))(x, **attrs)

    return _on_cpu(kernel, otherwise, x, leading=True)


def f32_depthwise(x: jax.Array, taps: jax.Array, bias: Any, clamp: tuple[float, float] | None,
                  kernel_size: tuple[int, int], strides: Sequence[int], dilation: Sequence[int],
                  pads: Sequence[tuple[int, int]],
                  otherwise: Callable[[jax.Array, jax.Array, jax.Array], jax.Array]) -> jax.Array:
    """Depthwise convolution of float32 NHWC ``x`` [B, H, W, C] (zero padding) with ``taps`` [KH * KW, C] (one
    filter per channel, window order), plus ``bias`` [C] (or None), clipped to ``clamp`` (lo, hi; None: not
    clipped) -> [B, OH, OW, C] float32 in one kernel call (``depthwise.cc``; sums in window order, so the last
    bits may differ from XLA's). Callers check :func:`isa` (``2``); ``otherwise(x, taps, bias)`` (XLA, bias
    [C] float32) runs on other platforms and under ``jax.vmap`` of anything but ``x``."""
    x, taps = jnp.asarray(x), jnp.asarray(taps)
    kh, kw = kernel_size
    c = x.shape[-1]
    if x.dtype != jnp.float32 or taps.dtype != jnp.float32 or x.ndim != 4 or taps.shape != (kh * kw, c):
        raise ValueError(f"f32_depthwise takes float32 x [B, H, W, C] and float32 taps [KH * KW, C]; got x "
                         f"{x.dtype}{list(x.shape)}, taps {taps.dtype}{list(taps.shape)}")
    b, finish = _finish_operands(bias, clamp, c)
    geometry = _conv_geometry(x.shape, (c, kh, kw, 1), strides, dilation, pads)
    if geometry is None:
        return otherwise(x, taps, b)
    (oh, ow), attrs = geometry

    def kernel(x: jax.Array, taps: jax.Array, b: jax.Array) -> jax.Array:
        out = jax.ShapeDtypeStruct((x.shape[0], oh, ow, c), jnp.float32)
        return jax.ffi.ffi_call(TARGET_F32_DEPTHWISE, out)(x, taps, b, **attrs, lo=finish["lo"], hi=finish["hi"])

    return _on_cpu(kernel, otherwise, x, taps, b, leading=True)
