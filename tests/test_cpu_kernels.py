"""Our XLA CPU int8 dot kernel: the same int32 sums as XLA's dot, for every shape; used only where it
may be (few rows, the CPU program); a machine without it gets XLA's dot and the same answers."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

import jaxinfer
from jaxinfer import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernels on this machine "
                                "(not x86-64 with AVX2, or no C++ compiler)")


#: The kernel's paths this CPU has (AVX2 always; AVX-512 VNNI where the CPU has it).
ISAS = [i for i in (1, 2) if i <= cpu_kernels.isa()]


@contextlib.contextmanager
def narrowed(path: int):
    """The kernel narrowed to ``path`` (an :data:`ISAS` number) inside the block, restored after."""
    best = cpu_kernels.isa()
    cpu_kernels.isa(path)
    try:
        yield cpu_kernels.isa()
    finally:
        cpu_kernels.isa(best)


@pytest.fixture(params=ISAS, ids=[cpu_kernels.ISAS[i] for i in ISAS])
def kernel_isa(request):
    """Runs a test on each of the kernel's paths (narrowed for the test, restored after)."""
    with narrowed(request.param) as path:
        assert path == request.param
        yield path


def _xla(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.asarray(lax.dot_general(jnp.asarray(x), jnp.asarray(w), (((x.ndim - 1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.int32))


def _ints(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.integers(-128, 128, shape, dtype=np.int8)


@pytest.mark.parametrize("lead,k,n", [((1,), 1024, 4096), ((8,), 1024, 1024), ((2, 3), 33, 17), ((5,), 1, 1),
                                      ((7,), 15, 9), ((64,), 100, 300), ((3, 1, 4), 48, 5), ((9,), 17, 65)])
def test_same_sums_as_xla(lead, k, n, kernel_isa):
    rng = np.random.default_rng(k * n)
    x, w = _ints(rng, lead + (k,)), _ints(rng, (n, k))
    got = jax.jit(cpu_kernels.int8_dot)(x, w)
    assert got.dtype == jnp.int32 and got.shape == lead + (n,)
    if jax.default_backend() != "gpu":  # an H200's XLA gave twice these sums for (2, 3) x 33 x 17
        np.testing.assert_array_equal(np.asarray(got), _xla(x, w))
    want = np.einsum("...k,nk->...n", x.astype(np.int64), w.astype(np.int64))
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("n", [40, 70, 100])
def test_panels_over_slices_of_long_k(n, kernel_isa):
    """Many rows at a K longer than one slice of the packed panels (kPanelSliceBytes: K 4096 at 4 panels,
    5460 at 3, 8192 at 2): the sums carried in y from slice to slice, masked past N, come out exact, with a
    zero point per row too."""
    rng = np.random.default_rng(n)
    x, w, zp = _ints(rng, (40, 9000)), _ints(rng, (n, 9000)), rng.integers(-128, 128, 40).astype(np.int32)
    got = np.asarray(jax.jit(cpu_kernels.int8_dot)(x, w))
    np.testing.assert_array_equal(got, x.astype(np.int64) @ w.astype(np.int64).T)
    got = np.asarray(jax.jit(cpu_kernels.int8_dot_zp)(x, zp, w))
    np.testing.assert_array_equal(got, (x.astype(np.int64) - zp[:, None]) @ w.astype(np.int64).T)


def test_extremes_and_int32_wraparound_match_xla(kernel_isa):
    """-128 x -128 everywhere (the one product vpmaddubsw-style kernels saturate) and a K long enough for
    the sums to pass 2**31: both wrap like XLA's int32 dot."""
    x = np.full((3, 140_000), -128, np.int8)
    w = np.full((2, 140_000), -128, np.int8)
    w[1, ::2] = 127
    got = np.asarray(jax.jit(cpu_kernels.int8_dot)(x, w))
    np.testing.assert_array_equal(got, _xla(x, w))
    assert got[0, 0] == np.int64(16384 * 140_000).astype(np.int32)  # wrapped


@pytest.mark.cpu_program
def test_taken_for_few_rows_only():
    rng = np.random.default_rng(0)
    w = _ints(rng, (cpu_kernels.VNNI_MAX_N + 1, 16))  # wider than a conv's patch product, K < VNNI_MIN_K
    few = jax.jit(cpu_kernels.int8_dot).lower(_ints(rng, (cpu_kernels.MAX_ROWS, 16)), w).as_text()
    many = jax.jit(cpu_kernels.int8_dot).lower(_ints(rng, (cpu_kernels.MAX_ROWS + 1, 16)), w).as_text()
    assert cpu_kernels.TARGET in few and cpu_kernels.TARGET not in many
    empty = cpu_kernels.int8_dot(np.zeros((0, 16), np.int8), w)
    assert empty.shape == (0, cpu_kernels.VNNI_MAX_N + 1) and empty.dtype == jnp.int32


@pytest.mark.cpu_program
def test_many_rows_at_long_k_or_narrow_n_take_the_vnni_path_only():
    """With AVX-512 VNNI the kernel beats XLA's int8 dot at any number of rows once K >= VNNI_MIN_K or
    N <= VNNI_MAX_N (benchmarks/int8_dot.py); on the AVX2 path, and at short K with wider N, many rows
    stay with XLA."""
    rng = np.random.default_rng(1)
    rows, k = 4 * cpu_kernels.MAX_ROWS, cpu_kernels.VNNI_MIN_K

    def takes(k: int, n: int = 2 * cpu_kernels.VNNI_MAX_N) -> bool:
        lowered = jax.jit(lambda x, w: cpu_kernels.int8_dot(x, w)).lower(_ints(rng, (rows, k)), _ints(rng, (n, k)))
        return cpu_kernels.TARGET in lowered.as_text()

    assert takes(k) == (cpu_kernels.isa() == 2)
    assert not takes(k // 2)
    assert takes(k // 2, n=cpu_kernels.VNNI_MAX_N) == (cpu_kernels.isa() == 2)  # a convolution's patches
    with narrowed(1):
        assert not takes(k) and not takes(k // 2, n=cpu_kernels.VNNI_MAX_N)


def test_isa_cannot_be_raised_past_the_cpu():
    best = cpu_kernels.isa()
    assert best in (1, 2) and cpu_kernels.ISAS[best]
    with narrowed(1) as path:
        assert path == 1
        assert cpu_kernels.isa(7) == best  # narrowing back up stops at what the CPU has


def test_other_backends_lower_to_xla_dot():
    """A program traced here and exported for a GPU carries XLA's dot, not the CPU custom call."""
    x, w = jnp.zeros((8, 64), jnp.int8), jnp.zeros((32, 64), jnp.int8)
    exp = export.export(jax.jit(cpu_kernels.int8_dot), platforms=["cuda"])(x, w)
    text = exp.mlir_module()
    assert cpu_kernels.TARGET not in text and "dot_general" in text
    # XLA GPU's int8 dot gave wrong sums on an H200: the GPU program multiplies float32 chunks
    assert "xi8>, tensor<" not in "".join(line for line in text.splitlines() if "dot_general" in line)
    tpu = export.export(jax.jit(cpu_kernels.int8_dot), platforms=["tpu"])(x, w).mlir_module()
    assert any("dot_general" in line and "xi8>, tensor<" in line for line in tpu.splitlines())


@pytest.mark.parametrize("x,w,what", [
    (np.zeros((2, 4), np.float32), np.zeros((3, 4), np.int8), "float32"),
    (np.zeros((2, 4), np.int8), np.zeros((3, 5), np.int8), r"\[3, 5\]"),
    (np.zeros((2, 4), np.int8), np.zeros((2, 3, 4), np.int8), r"\[2, 3, 4\]"),
    (np.zeros((2, 4), np.uint8), np.zeros((3, 4), np.int8), "uint8"),
])
def test_wrong_operands_named(x, w, what):
    with pytest.raises(ValueError, match=what):
        cpu_kernels.int8_dot(x, w)


def in_threads(call, n: int) -> None:
    """``call(i)`` for i in range(n), each on its own thread, all at once; returns when all are done."""
    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_concurrent_calls_each_get_their_own_sums():
    rng = np.random.default_rng(1)
    w = _ints(rng, (2048, 512))
    xs = [_ints(rng, (8, 512)) for _ in range(6)]
    f = jax.jit(cpu_kernels.int8_dot)
    f(xs[0], w).block_until_ready()
    got: dict[int, np.ndarray] = {}

    def call(i: int) -> None:
        for _ in range(5):
            got[i] = np.asarray(f(xs[i], w))

    in_threads(call, len(xs))
    for i, x in enumerate(xs):
        np.testing.assert_array_equal(got[i], _xla(x, w))


@pytest.mark.cpu_program
def test_int8_models_take_it():
    """The TFLite hybrid MLP (int8 weights, [N, K]) runs its products through the kernel."""
    m = jaxinfer.load(Path(__file__).parent / "fixtures" / "tflite" / "hybrid_mlp.tflite")
    x = np.ones((1, 256), np.float32)
    fn = jax.jit(lambda p, x: m.fn(p, {"x": x}))
    assert cpu_kernels.TARGET in fn.lower(m.params, x).as_text()


_WITHOUT = textwrap.dedent("""
    import logging, sys, numpy as np, jax
    logging.basicConfig(level=logging.INFO, stream=sys.stdout)
    from jaxinfer import cpu_kernels
    x = np.arange(-64, 64, dtype=np.int8).reshape(4, 32)
    w = np.arange(32 * 5, dtype=np.int64).astype(np.int8).reshape(5, 32)
    got = np.asarray(jax.jit(cpu_kernels.int8_dot)(x, w))
    want = x.astype(np.int64) @ w.astype(np.int64).T
    print("available", cpu_kernels.available(), "exact", bool((got == want).all()))
""")


@pytest.mark.parametrize("env,says", [
    ({"JAXINFER_CPU_KERNELS": "0"}, None),
    ({"CXX": "/bin/false"}, "jaxinfer CPU kernels unavailable"),
    ({"CXX": "/nonexistent/g++", "PATH": "/nonexistent"}, "no C++ compiler"),
])
def test_without_the_kernel_the_same_answers(tmp_path, env, says):
    """Disabled, a failing compiler, no compiler: XLA's dot, the same numbers, and a log line saying why."""
    full = {**os.environ, "JAXINFER_KERNEL_DIR": str(tmp_path / "kernels"), **env}
    done = subprocess.run([sys.executable, "-c", _WITHOUT], capture_output=True, text=True, timeout=300, env=full)
    assert done.returncode == 0, done.stderr
    assert "available False exact True" in done.stdout, done.stdout + done.stderr
    if says:
        assert says in done.stdout + done.stderr


@pytest.mark.parametrize("kernel_isa", ISAS)
@pytest.mark.parametrize("code", [np.uint8, np.int8])
@pytest.mark.parametrize("entry", [np.uint8, np.int8, np.float16, np.int32, np.float32, np.float64])
def test_lookup8_reads_each_codes_entry(code, entry, kernel_isa):
    """Every code in every position of a 64-element step and its tails, 1- to 8-byte entries, both paths
    (AVX-512 VBMI for 1-byte entries, entry by entry otherwise)."""
    rng = np.random.default_rng(0)
    info = np.iinfo(code)
    table = (rng.standard_normal(256) * 50).astype(entry)
    fn = jax.jit(cpu_kernels.lookup8)
    with narrowed(kernel_isa):
        for n in (1, 63, 64, 65, 127, 1000, 4099):
            x = rng.integers(info.min, info.max + 1, n).astype(code)
            if n == 4099:
                x[:256] = np.arange(info.min, info.max + 1)
            got = np.asarray(fn(table, x.reshape(1, n, 1)))
            assert got.dtype == entry and got.shape == (1, n, 1)
            np.testing.assert_array_equal(got.reshape(-1), table[x.astype(np.int32) - info.min])
    assert "jaxinfer_lookup8" in fn.lower(table, x).as_text()


def test_lookup8_under_vmap_and_wrong_operands():
    table = np.arange(256, dtype=np.int32) * 3
    x = np.random.default_rng(1).integers(0, 256, (4, 33)).astype(np.uint8)
    got = jax.vmap(cpu_kernels.lookup8, in_axes=(None, 0))(table, x)
    np.testing.assert_array_equal(np.asarray(got), table[x])
    tables = np.stack([table, table + 1])
    got = jax.vmap(cpu_kernels.lookup8)(tables, x[:2])
    np.testing.assert_array_equal(np.asarray(got), np.stack([table[x[0]], table[x[1]] + 1]))
    with pytest.raises(ValueError, match="8-bit codes and a \\[256\\] table"):
        cpu_kernels.lookup8(table, x.astype(np.int16))
    with pytest.raises(ValueError, match="8-bit codes and a \\[256\\] table"):
        cpu_kernels.lookup8(table[:128], x)


AVX512 = cpu_kernels.isa() == 2


@pytest.mark.skipif(not AVX512, reason="the 8-bit max pool kernel needs AVX-512")
@pytest.mark.parametrize("dtype", [np.int8, np.uint8])
@pytest.mark.parametrize("geometry", [
    ((2, 8, 8, 16), (2, 2), (2, 2), (1, 1), ((0, 0), (0, 0))),
    ((1, 11, 13, 150), (3, 3), (2, 2), (1, 1), ((1, 1), (1, 1))),  # 3 vectors of channels, the last partial
    ((3, 7, 5, 5), (3, 2), (1, 2), (2, 1), ((2, 0), (1, 1))),  # dilated rows, windows starting in the padding
    ((1, 3, 3, 64), (3, 3), (1, 1), (1, 1), ((2, 2), (2, 2))),  # windows wholly in the padding at the corners
])
def test_max_pool8_matches_xla(dtype, geometry):
    shape, window, strides, dilation, pads = geometry
    info = np.iinfo(dtype)
    x = np.random.default_rng(3).integers(info.min, info.max + 1, shape).astype(dtype)

    def xla(x):
        return lax.reduce_window(x, jnp.asarray(info.min, dtype), lax.max, (1, *window, 1), (1, *strides, 1),
                                 [(0, 0), *pads, (0, 0)], window_dilation=(1, *dilation, 1))

    fn = jax.jit(lambda x: cpu_kernels.max_pool8(x, window, strides, dilation, pads, xla))
    assert "jaxinfer_max_pool8" in fn.lower(x).as_text()
    np.testing.assert_array_equal(np.asarray(fn(x)), np.asarray(xla(x)))
    got = jax.vmap(lambda x: cpu_kernels.max_pool8(x, window, strides, dilation, pads, xla))(np.stack([x, x[::-1]]))
    np.testing.assert_array_equal(np.asarray(got), np.stack([np.asarray(xla(x)), np.asarray(xla(x[::-1]))]))
    with pytest.raises(ValueError, match="int8 or uint8 x"):
        cpu_kernels.max_pool8(x.astype(np.int16), window, strides, dilation, pads, xla)


def test_large_jobs_offered_to_xlas_pool_give_the_same_sums():
    """ShareWith hands a large job's items to XLA's pool workers too: whoever takes an item, the sums are the
    same as with our helpers alone (and as XLA's int8 dot)."""
    rng = np.random.default_rng(9)
    x = rng.integers(-128, 128, (40, 1024)).astype(np.int8)
    w = rng.integers(-128, 128, (512, 1024)).astype(np.int8)  # 21M multiply-adds: offered
    fn = jax.jit(cpu_kernels.int8_dot)
    was = cpu_kernels.offer_to_xla_pool()
    try:
        cpu_kernels.offer_to_xla_pool(True)
        offered = [np.asarray(fn(x, w)) for _ in range(5)]
        cpu_kernels.offer_to_xla_pool(False)
        helpers = np.asarray(fn(x, w))
    finally:
        cpu_kernels.offer_to_xla_pool(was)
    want = x.astype(np.int32) @ w.T.astype(np.int32)
    for got in offered + [helpers]:
        np.testing.assert_array_equal(got, want)


def test_programs_traced_while_suppressed_take_xlas_routes():
    """Inside cpu_kernels.suppressed() (what sharded programs are traced under) no kernel custom call is
    emitted, and the values are the same."""
    table = np.arange(256, dtype=np.int32) * 7
    x = np.random.default_rng(2).integers(0, 256, (3, 50)).astype(np.uint8)
    fn = jax.jit(lambda t, x: cpu_kernels.lookup8(t, x))  # a fresh function: traced here, not taken from a cache
    with cpu_kernels.suppressed():
        assert not cpu_kernels.available() and cpu_kernels.isa() == 0
        text = fn.lower(table, x).as_text()
        got = np.asarray(fn(table, x))
    assert "jaxinfer_lookup8" not in text and cpu_kernels.available()
    np.testing.assert_array_equal(got, table[x])
