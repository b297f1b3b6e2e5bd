"""The kernel's zero-point form, ``sum_k (x - zp[row]) * w``: the same int32 sums as int64 numpy (wrapping
like XLA's), for every shape and any zero point; quantized models with activation zero points (onnxruntime's
dynamic quantization, QDQ, TFLite asymmetric hybrid) take it and answer bit for bit as before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer import cpu_kernels

from .test_cpu_kernels import kernel_isa  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernels on this machine "
                                "(not x86-64 with AVX2, or no C++ compiler)")


def _want(x: np.ndarray, zp: np.ndarray, w: np.ndarray) -> np.ndarray:
    """int64 reference, wrapped to int32 as the kernel and XLA's dot wrap."""
    s = np.einsum("...k,nk->...n", x.astype(np.int64) - zp.astype(np.int64)[..., None], w.astype(np.int64))
    return ((s + 2**31) % 2**32 - 2**31).astype(np.int32)


def _ints(rng: np.random.Generator, shape: tuple[int, ...], lo: int = -128, hi: int = 128) -> np.ndarray:
    return rng.integers(lo, hi, shape, dtype=np.int8)


@pytest.mark.parametrize("lead,k,n", [((8,), 1024, 4096), ((9,), 100, 33), ((1,), 17, 5), ((2, 3), 33, 17),
                                      ((48,), 64, 64), ((49,), 64, 64), ((3, 1, 4), 48, 5), ((5,), 1, 1)])
def test_same_sums_as_int64(lead, k, n, kernel_isa):
    rng = np.random.default_rng(k * n + len(lead))
    x, w = _ints(rng, lead + (k,)), _ints(rng, (n, k))
    zp = rng.integers(-128, 128, lead, dtype=np.int32)
    got = jax.jit(cpu_kernels.int8_dot_zp)(x, zp, w)
    assert got.dtype == jnp.int32 and got.shape == lead + (n,)
    np.testing.assert_array_equal(np.asarray(got), _want(x, zp, w))


@pytest.mark.parametrize("lead,k,n", [((8,), 256, 64), ((3, 5), 70, 10), ((40,), 1100, 30), ((128,), 64, 64)])
def test_uint8_x_read_as_it_is(lead, k, n, kernel_isa):
    """A uint8 x (DynamicQuantizeLinear's) with its own zero point: the kernel reads its bytes (the AVX2 path shifts
    them to int8 first), the same sums as int64, under jit and vmap, and through XLA's dot past the kernel's rows."""
    rng = np.random.default_rng(k + n)
    x = rng.integers(0, 256, lead + (k,), dtype=np.uint8)
    w = _ints(rng, (n, k))
    zp = rng.integers(0, 256, lead, dtype=np.int32)
    zp.reshape(-1)[0] = 70000  # a row whose x - zp leaves int16: taken off after the pass
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.int8_dot_zp)(x, zp, w)), _want(x, zp, w))
    both = np.asarray(jax.vmap(cpu_kernels.int8_dot_zp, in_axes=(0, 0, None))(np.stack([x, x]), np.stack([zp, zp]), w))
    np.testing.assert_array_equal(both[1], _want(x, zp, w))
    many = np.tile(x.reshape(-1, k), (cpu_kernels.MAX_ROWS, 1))  # past the kernel's rows where it must stop
    zps = np.tile(zp.reshape(-1), cpu_kernels.MAX_ROWS)
    np.testing.assert_array_equal(np.asarray(cpu_kernels.int8_dot_zp(many, zps, w)), _want(many, zps, w))


@pytest.mark.cpu_program
def test_dynamic_quantized_matmul_reads_the_uint8_activation():
    """No XLA loop between DynamicQuantizeLinear and the product: the kernel takes its uint8 output."""
    data, _ = _dynamic_matmul_model(256, 192, 5)
    m = jaxinfer.load(data)
    hlo = m.compiled({"x": np.zeros((8, 256), np.float32)}).as_text()
    entry = hlo.split("ENTRY")[1]
    assert "u8[8,256]" in entry.split(cpu_kernels.TARGET_ZP)[0] and "s8[8,256]" not in entry


@pytest.mark.cpu_program
def test_taken_for_few_rows_only():
    rng = np.random.default_rng(0)
    w = _ints(rng, (cpu_kernels.VNNI_MAX_N + 1, 16))  # wider than a conv's patch product, K < VNNI_MIN_K
    text = {m: jax.jit(cpu_kernels.int8_dot_zp).lower(_ints(rng, (m, 16)), np.zeros(m, np.int32), w).as_text()
            for m in (cpu_kernels.MAX_ROWS, cpu_kernels.MAX_ROWS + 1)}
    assert cpu_kernels.TARGET_ZP in text[cpu_kernels.MAX_ROWS]
    assert cpu_kernels.TARGET not in text[cpu_kernels.MAX_ROWS + 1]


@pytest.mark.parametrize("zp", [[-128, 127, 0, -1], [30000, -32640, 32639, 5],
                                [40000, -2**31, 2**31 - 1, 5], [-32641, 32640, 0, 0]])
@pytest.mark.parametrize("repeat", [1, 10])  # 40 rows: the VNNI path's column panels
def test_extreme_zero_points(zp, repeat, kernel_isa):
    """Zero points near and past where x - zp leaves int16: the kernel folds the ones that fit into x
    and takes the others off afterwards (a second pass over w), wrapping like int32 either way."""
    x = np.full((4, 70), -128, np.int8)
    x[1] = 127
    x, zp = np.tile(x, (repeat, 1)), np.tile(np.asarray(zp, np.int32), repeat)
    w = np.full((300, 70), -128, np.int8)
    w[::3] = 127
    zp = np.asarray(zp, np.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.int8_dot_zp)(x, zp, w)), _want(x, zp, w))


def test_wide_zero_point_with_many_rows_split_over_threads():
    rng = np.random.default_rng(3)
    x, w = _ints(rng, (6, 1000)), _ints(rng, (3000, 1000))
    zp = np.array([1, 2**30, -7, -2**31, 0, 127], np.int32)
    np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.int8_dot_zp)(x, zp, w)), _want(x, zp, w))


@pytest.mark.parametrize("axes", [(0, 0, None), (0, None, None), (None, 0, None), (0, 0, 0), (1, 0, None)])
def test_vmap(axes):
    rng = np.random.default_rng(4)
    x = _ints(rng, (3, 4, 32)) if axes[0] == 0 else (_ints(rng, (4, 3, 32)) if axes[0] == 1 else _ints(rng, (4, 32)))
    zp = rng.integers(-128, 128, (3, 4) if axes[1] == 0 else (4,), dtype=np.int32)
    w = _ints(rng, (3, 5, 32)) if axes[2] == 0 else _ints(rng, (5, 32))
    got = np.asarray(jax.jit(jax.vmap(cpu_kernels.int8_dot_zp, in_axes=axes))(x, zp, w))

    def pick(a, ax, i):
        return a if ax is None else np.take(a, i, axis=ax)

    want = np.stack([_want(pick(x, axes[0], i), pick(zp, axes[1], i), pick(w, axes[2], i)) for i in range(3)])
    np.testing.assert_array_equal(got, want)


def test_other_backends_lower_to_xla_dot():
    x, zp, w = jnp.zeros((8, 64), jnp.int8), jnp.zeros((8,), jnp.int32), jnp.zeros((32, 64), jnp.int8)
    text = export.export(jax.jit(cpu_kernels.int8_dot_zp), platforms=["cuda"])(x, zp, w).mlir_module()
    assert cpu_kernels.TARGET not in text and "dot_general" in text


@pytest.mark.parametrize("x,zp,w,what", [
    (np.zeros((2, 4), np.int8), np.zeros((3,), np.int32), np.zeros((3, 4), np.int8), r"zp int32\[3\]"),
    (np.zeros((2, 4), np.int8), np.zeros((2,), np.float32), np.zeros((3, 4), np.int8), "float32"),
    (np.zeros((2, 4), np.int16), np.zeros((2,), np.int32), np.zeros((3, 4), np.int8), "int16"),
    (np.zeros((2, 4), np.int8), np.zeros((2,), np.int32), np.zeros((3, 4), np.uint8), "uint8"),
])
def test_wrong_operands_named(x, zp, w, what):
    with pytest.raises(ValueError, match=what):
        cpu_kernels.int8_dot_zp(x, zp, w)


def _dynamic_matmul_model(k: int, n: int, seed: int) -> tuple[bytes, np.ndarray]:
    """onnxruntime's dynamic quantization pattern: DynamicQuantizeLinear (u8 activations with a run-time
    zero point) -> MatMulInteger against a constant int8 [K, N] weight."""
    w = np.random.default_rng(seed).integers(-127, 128, (k, n), dtype=np.int8)
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
             helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["y"])]
    graph = helper.make_graph(nodes, "dq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, ["m", n])],
                              [numpy_helper.from_array(w, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString(), w


@pytest.mark.cpu_program
def test_dynamic_quantized_matmul_takes_it_exactly():
    """The u8 activation with its zero point: one kernel pass (no row of ones), the exact integer sums."""
    data, w = _dynamic_matmul_model(256, 192, 5)
    m = jaxinfer.load(data)
    x = np.random.default_rng(6).standard_normal((8, 256)).astype(np.float32) * 3
    text = jax.jit(lambda p, x: m.fn(p, {"x": x})).lower(m.params, x).as_text()
    assert cpu_kernels.TARGET_ZP in text
    got = m.run({"x": x})["y"]
    scale = (max(x.max(), 0) - min(x.min(), 0)) / 255
    zp = np.clip(np.round(-min(x.min(), 0) / scale), 0, 255)
    q = np.clip(np.round(x / scale) + zp, 0, 255)  # DynamicQuantizeLinear (ties to even, as np.round)
    want = (q.astype(np.int64) - zp) @ w.astype(np.int64)
    np.testing.assert_array_equal(got, want)


_WITHOUT = textwrap.dedent("""
    import sys, numpy as np, jaxinfer
    from tests.test_cpu_kernels_zp import _dynamic_matmul_model
    data, _ = _dynamic_matmul_model(256, 192, 5)
    x = np.random.default_rng(6).standard_normal((8, 256)).astype(np.float32) * 3
    np.save(sys.argv[1], jaxinfer.load(data).run({"x": x})["y"])
""")


def test_same_answers_without_the_kernel(tmp_path):
    """Bit-identical outputs with the kernel and with XLA's dot (``JAXINFER_CPU_KERNELS=0``)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outs = {}
    for flag in ("1", "0"):
        out = tmp_path / f"y{flag}.npy"
        env = {**os.environ, "JAXINFER_CPU_KERNELS": flag, "PYTHONPATH": root}
        done = subprocess.run([sys.executable, "-c", _WITHOUT, str(out)], capture_output=True, text=True,
                              timeout=300, env=env, cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
        outs[flag] = np.load(out)
    np.testing.assert_array_equal(outs["1"], outs["0"])
