"""Adversarial checks of the CPU int8 dot kernel (jaxinfer.cpu_kernels) and the routes that reach it:
odd shapes, ONNX MatMulInteger rewritten to MatMulIntegerNK, quantized float models bit-identical with
and without the kernel, transformations of m.fn, a bad library in the kernel dir, threads, save/load."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer import cpu_kernels

from .test_cpu_kernels import _WITHOUT, in_threads, kernel_isa  # noqa: F401 (a fixture)

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="no CPU kernels on this machine")


def _ref(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.einsum("...k,nk->...n", x.astype(np.int64), w.astype(np.int64)).astype(np.int32)


def _xla(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return np.asarray(lax.dot_general(jnp.asarray(x), jnp.asarray(w), (((x.ndim - 1,), (1,)), ((), ())),
                                      preferred_element_type=jnp.int32))


def _ints(rng, shape, dtype=np.int8):
    info = np.iinfo(dtype)
    return rng.integers(int(info.min), int(info.max) + 1, shape).astype(dtype)


# ------------------------------------------------------------------ the kernel itself
# Rows 16+ with K < 1024 (24+ at longer K) take the VNNI path's column panels: partial panels (N % 16),
# K % 4 and K % 64 tails (the panels are packed 64 values of K at a time), row remainders (rows % 4) and
# work split by rows where N is narrow.
@pytest.mark.parametrize("rows,k,n", [(16, 3, 17), (100, 289, 64), (1000, 7, 33), (17, 1023, 200), (53, 5, 1),
                                      (4096, 16, 32), (1, 1, 1), (1, 17, 3), (7, 15, 1), (8, 16, 9), (9, 17, 33),
                                      (47, 33, 5), (48, 4097, 3), (49, 31, 7), (1, 4095, 17), (3, 2, 65537),
                                      (5, 4096, 1), (24, 1024, 130), (25, 1090, 47), (64, 2111, 16),
                                      (23, 1024, 33)])
def test_odd_shapes_exact(rows, k, n, kernel_isa):
    rng = np.random.default_rng(rows * 1000 + k + n)
    x, w = _ints(rng, (rows, k)), _ints(rng, (n, k))
    got = np.asarray(jax.jit(cpu_kernels.int8_dot)(x, w))
    np.testing.assert_array_equal(got, _ref(x, w))
    np.testing.assert_array_equal(got, _xla(x, w))


@pytest.mark.parametrize("lead", [(0,), (0, 3), (3, 0), (2, 0, 5), (), (2, 3, 4), (1, 1, 48)])
def test_leading_dims_incl_empty_and_1d(lead):
    rng = np.random.default_rng(len(lead))
    x, w = _ints(rng, lead + (19,)), _ints(rng, (6, 19))
    got = jax.jit(cpu_kernels.int8_dot)(x, w)
    assert got.shape == lead + (6,) and got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), _ref(x, w))


def test_min_values_and_strided_operands_in_jit():
    x = np.full((5, 33), -128, np.int8)
    w = np.full((4, 66), -128, np.int8)
    w[:, 1::2] = 127
    got = jax.jit(lambda x, w: cpu_kernels.int8_dot(x, w[:, ::2]))(x, w)
    np.testing.assert_array_equal(np.asarray(got), np.full((5, 4), 33 * 16384, np.int32))
    got = jax.jit(lambda x, w: cpu_kernels.int8_dot(x.T, w))(x.T.copy(), w[:, :33].copy())
    np.testing.assert_array_equal(np.asarray(got), _ref(x, w[:, :33]))


def test_lax_map_over_the_kernel():
    rng = np.random.default_rng(2)
    x, w = _ints(rng, (4, 3, 32)), _ints(rng, (6, 32))
    np.testing.assert_array_equal(np.asarray(lax.map(lambda xi: cpu_kernels.int8_dot(xi, w), x)), _ref(x, w))


@pytest.mark.parametrize("axes", [(0, None), (None, 0)])
def test_vmap_of_int8_dot(axes):
    rng = np.random.default_rng(3)
    x = _ints(rng, (5, 4, 32)) if axes[0] == 0 else _ints(rng, (4, 32))
    w = _ints(rng, (3, 6, 32)) if axes[1] == 0 else _ints(rng, (6, 32))
    got = np.asarray(jax.jit(jax.vmap(cpu_kernels.int8_dot, in_axes=axes))(x, w))
    want = np.stack([_ref(x[i] if axes[0] == 0 else x, w[i] if axes[1] == 0 else w) for i in range(got.shape[0])])
    np.testing.assert_array_equal(got, want)


def test_many_threads_share_one_program():
    rng = np.random.default_rng(4)
    w = _ints(rng, (3000, 700))
    xs = [_ints(rng, (r, 700)) for r in (1, 3, 8, 13, 48, 1, 9, 47)]
    fns = {}
    for x in xs:
        fns.setdefault(x.shape, jax.jit(cpu_kernels.int8_dot))(x, w).block_until_ready()
    errors: list[str] = []

    def call(i: int) -> None:
        for _ in range(4):
            got = np.asarray(fns[xs[i].shape](xs[i], w))
            if not np.array_equal(got, _ref(xs[i], w)):
                errors.append(f"thread {i}")

    in_threads(call, len(xs))
    assert not errors


# ------------------------------------------------------------------ ONNX MatMulInteger -> MatMulIntegerNK
_ET = {np.int8: TensorProto.INT8, np.uint8: TensorProto.UINT8}


def _matmul_integer(ashape, atype, wtype, azp, bzp, k=19, n=6, seed=0, shared=False):
    rng = np.random.default_rng(seed)
    w = _ints(rng, (k, n), wtype)
    inits = [numpy_helper.from_array(w, "w")]
    ins = ["a", "w"]
    if azp is not None:
        inits.append(numpy_helper.from_array(np.asarray(azp).astype(atype), "azp"))
        ins.append("azp")
    if bzp is not None:
        ins += ([""] if azp is None else []) + ["bzp"]
        inits.append(numpy_helper.from_array(np.asarray(bzp).astype(wtype), "bzp"))
    nodes = [helper.make_node("MatMulInteger", ins, ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.INT32, None)]
    if shared:  # B also feeds a second MatMulInteger (no zero points) and a Cast
        nodes += [helper.make_node("MatMulInteger", ["a", "w"], ["y2"]),
                  helper.make_node("Cast", ["w"], ["wc"], to=TensorProto.INT32)]
        outs += [helper.make_tensor_value_info(o, TensorProto.INT32, None) for o in ("y2", "wc")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("a", _ET[atype], ashape)], outs, inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8), w


def _mmi_ref(a, w, azp, bzp):
    az = 0 if azp is None else np.asarray(azp).astype(np.int64)
    if np.ndim(az) == 1:
        az = az[:, None]
    bz = 0 if bzp is None else np.asarray(bzp).astype(np.int64)
    return ((a.astype(np.int64) - az) @ (w.astype(np.int64) - bz)).astype(np.int32)


@pytest.mark.parametrize("ashape,atype,wtype,azp,bzp", [
    ([19], np.uint8, np.int8, 200, None),                                   # 1-D A
    ([19], np.int8, np.uint8, None, 255),
    ([2, 5, 19], np.uint8, np.int8, np.arange(5) * 50, np.full(6, -128)),   # 3-D A, per-row a_zp, per-col b_zp
    ([47, 19], np.uint8, np.uint8, 255, 255),                               # 47 rows + the colsum row = 48
    ([48, 19], np.int8, np.int8, -128, -128),                               # 49 with the colsum row: XLA
    ([47, 19], np.int8, np.uint8, -128, np.arange(6) * 40),
    ([0, 19], np.uint8, np.int8, 3, 4),
    ([0, 3, 19], np.uint8, np.int8, 3, None),
    ([1, 19], np.uint8, np.int8, None, None),
])
def test_matmul_integer_nk_exact(ashape, atype, wtype, azp, bzp):
    model, w = _matmul_integer(ashape, atype, wtype, azp, bzp)
    m = jaxinfer.load(model)
    assert [nd.op_type for nd in m.graph.nodes] == ["MatMulIntegerNK"]
    a = _ints(np.random.default_rng(9), tuple(ashape), atype)
    got = m.run({"a": a})["y"]
    assert got.shape == tuple(ashape[:-1]) + (6,)
    np.testing.assert_array_equal(got, _mmi_ref(a, w, azp, bzp))


def test_matmul_integer_weight_shared_by_two_nodes_and_a_cast():
    model, w = _matmul_integer([3, 19], np.uint8, np.int8, 7, None, shared=True)
    m = jaxinfer.load(model)
    a = _ints(np.random.default_rng(1), (3, 19), np.uint8)
    out = m.run({"a": a})
    np.testing.assert_array_equal(out["y"], _mmi_ref(a, w, 7, None))
    np.testing.assert_array_equal(out["y2"], _mmi_ref(a, w, None, None))
    np.testing.assert_array_equal(out["wc"], w.astype(np.int32))


# ------------------------------------------------------------------ quantized float models
_MODEL = textwrap.dedent("""
    import numpy as np
    from onnx import TensorProto as TP, helper, numpy_helper as nh
    def mlp():
        rng = np.random.default_rng(0)
        k, h, n = 40, 33, 7
        w1 = rng.standard_normal((k, h)).astype(np.float32)
        w2 = rng.standard_normal((n, h)).astype(np.float32)
        b = rng.standard_normal(n).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("Reshape", ["r", "shp"], ["r2"]),
                 helper.make_node("Gemm", ["r2", "w2", "b"], ["y"], transB=1)]
        g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TP.FLOAT, ["b", 3, k])],
                              [helper.make_tensor_value_info("y", TP.FLOAT, None)],
                              [nh.from_array(w1, "w1"), nh.from_array(w2, "w2"), nh.from_array(b, "b"),
                               nh.from_array(np.array([-1, h], np.int64), "shp")])
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    BATCHES = (1, 5, 16, 17, 40)
    def feeds(b):
        return {"x": np.random.default_rng(b).standard_normal((b, 3, 40)).astype(np.float32)}
    def outputs():
        import jaxinfer
        m = jaxinfer.load(mlp())
        res = {}
        for meth in ("int8-dynamic", "int8-static"):
            q = jaxinfer.quantize(m, meth, calibration=[feeds(5)] if meth == "int8-static" else None)
            for b in BATCHES:
                res[f"{meth}/{b}"] = np.asarray(q.run(feeds(b))["y"])
        return res
""")
_ns: dict = {}
exec(_MODEL, _ns)  # noqa: S102 -- the same model text runs here and in the subprocess


def test_quantized_models_bit_identical_without_the_kernel(tmp_path):
    out = tmp_path / "off.npz"
    code = _MODEL + f"\nimport numpy as np\nnp.savez({str(out)!r}, **outputs())\n"
    env = {**os.environ, "JAXINFER_CPU_KERNELS": "0"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    here = _ns["outputs"]()
    off = np.load(out)
    assert set(off.files) == set(here)
    for key, val in here.items():
        np.testing.assert_array_equal(val, off[key], err_msg=key)


def _quantized():
    return jaxinfer.quantize(jaxinfer.load(_ns["mlp"]()), "int8-dynamic")


@pytest.mark.cpu_program
def test_quantized_model_takes_the_kernel_and_jit_matches_run():
    q = _quantized()
    x = _ns["feeds"](1)["x"]
    fn = jax.jit(lambda p, x: q.fn(p, {"x": x})["y"])
    assert cpu_kernels.TARGET in fn.lower(q.params, x).as_text()
    np.testing.assert_array_equal(np.asarray(fn(q.params, x)), np.asarray(q.run({"x": x})["y"]))


def test_vmap_of_quantized_model_fn():
    q = _quantized()
    x = np.random.default_rng(1).standard_normal((4, 2, 3, 40)).astype(np.float32)
    got = jax.vmap(lambda xi: q.fn(q.params, {"x": xi})["y"])(x)
    want = np.stack([np.asarray(q.run({"x": xi})["y"]) for xi in x])
    # another program than run's (its float ops may round in another order): equal to float rounding
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_quantized_model_from_many_threads():
    q = _quantized()
    feeds = [_ns["feeds"](b) for b in (1, 5, 16, 1, 5, 16)]
    want = [np.asarray(q.run(f)["y"]) for f in feeds]
    bad: list[int] = []

    def call(i: int) -> None:
        for _ in range(3):
            if not np.array_equal(np.asarray(q.run(feeds[i])["y"]), want[i]):
                bad.append(i)

    in_threads(call, len(feeds))
    assert not bad


def test_saved_quantized_model_reloads_bit_identical(tmp_path):
    q = _quantized()
    path = jaxinfer.save(q, tmp_path / "q")
    r = jaxinfer.load(path)
    for b in (1, 17):
        f = _ns["feeds"](b)
        np.testing.assert_array_equal(np.asarray(r.run(f)["y"]), np.asarray(q.run(f)["y"]))


# ------------------------------------------------------------------ a bad library in the kernel dir
_PROBE = _WITHOUT  # the same probe: prints whether the kernel is available and exact


def _probe_with_library(tmp_path, content: bytes) -> subprocess.CompletedProcess:
    built = cpu_kernels._build(cpu_kernels._compiler())  # this process's library: its name is the key
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    (kdir / built.name).write_bytes(content)
    env = {**os.environ, "JAXINFER_KERNEL_DIR": str(kdir)}
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env)


def test_garbage_library_in_kernel_dir_is_rebuilt(tmp_path):
    """A file under the library's name that does not match the digest written when it was built is
    rebuilt, never opened."""
    done = _probe_with_library(tmp_path, b"not an ELF file at all")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "available True exact True" in done.stdout


def test_truncated_library_in_kernel_dir_is_rebuilt(tmp_path):
    """A truncated copy of the library (an interrupted sync of ~/.cache) killed the process with SIGBUS
    inside ctypes.CDLL; now its digest does not match and it is rebuilt."""
    built = cpu_kernels._build(cpu_kernels._compiler())
    done = _probe_with_library(tmp_path, built.read_bytes()[:4000])
    assert done.returncode == 0, f"rc {done.returncode}: {done.stderr[-2000:]}"
    assert "available True exact True" in done.stdout


def test_kernel_dir_that_is_a_file_falls_back(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    env = {**os.environ, "JAXINFER_KERNEL_DIR": str(blocker / "sub")}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "available False exact True" in done.stdout
    assert "Not a directory" in done.stdout + done.stderr


def _fake_builds(kdir, n: int) -> list:
    """``n`` stale builds (library + digest) used 1..n days ago, oldest last."""
    kdir.mkdir(parents=True, exist_ok=True)
    made = []
    for i in range(n):
        lib, digest = kdir / f"int8_dot-old{i:012d}.so", kdir / f"int8_dot-old{i:012d}.sha256"
        lib.write_bytes(b"stale")
        digest.write_text("0" * 64)
        when = time.time() - 86400 * (i + 1)
        os.utime(digest, (when, when))
        made.append(lib)
    return made


def test_stale_builds_pruned_keeping_the_most_recently_used(tmp_path):
    """Every jax/jaxlib/compiler/source change leaves a build behind; a new build keeps the KEEP_BUILDS
    most recently used (itself included) and removes the rest, library and digest."""
    kdir = tmp_path / "kernels"
    stale = _fake_builds(kdir, 6)
    env = {**os.environ, "JAXINFER_KERNEL_DIR": str(kdir)}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "available True exact True" in done.stdout
    libs = sorted(kdir.glob("int8_dot-*.so"))
    assert len(libs) == cpu_kernels.KEEP_BUILDS
    assert set(stale[:cpu_kernels.KEEP_BUILDS - 1]) < set(libs)  # the newest stale ones survive
    assert not any(p.exists() or p.with_suffix(".sha256").exists() for p in stale[cpu_kernels.KEEP_BUILDS - 1:])


def test_a_build_in_use_is_kept_by_its_last_use(tmp_path):
    """Loading an existing build marks it used: an old but current build outlives newer stale ones."""
    built = cpu_kernels._build(cpu_kernels._compiler())
    kdir = tmp_path / "kernels"
    _fake_builds(kdir, 0)
    (kdir / built.name).write_bytes(built.read_bytes())
    (kdir / built.name).with_suffix(".sha256").write_text(built.with_suffix(".sha256").read_text())
    old = time.time() - 86400 * 30
    os.utime((kdir / built.name).with_suffix(".sha256"), (old, old))
    env = {**os.environ, "JAXINFER_KERNEL_DIR": str(kdir)}
    done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert "available True exact True" in done.stdout, done.stderr[-2000:]
    assert (kdir / built.name).with_suffix(".sha256").stat().st_mtime > old + 86400
    _fake_builds(kdir, 6)  # used 1..6 days ago: all older than the build's last use
    assert cpu_kernels._prune(kdir, keep=2) and (kdir / built.name).exists()


def test_prune_tolerates_files_vanishing_and_a_missing_dir(tmp_path):
    assert cpu_kernels._prune(tmp_path / "nowhere", keep=1) == []
    kdir = tmp_path / "kernels"
    _fake_builds(kdir, 3)
    (kdir / "int8_dot-old000000000002.so").unlink()  # a library already gone, its digest left
    gone = cpu_kernels._prune(kdir, keep=1)
    assert len(gone) == 2 and sorted(p.name for p in kdir.iterdir()) == ["int8_dot-old000000000000.sha256",
                                                                         "int8_dot-old000000000000.so"]


def test_orphan_libraries_pruned_once_an_hour_old(tmp_path):
    """A library with no digest is never loaded (an older layout, a crashed build): removed once it is an
    hour old; a fresh one may be a concurrent build about to write its digest, so it stays."""
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    old, fresh = kdir / "int8_dot-orphan00000000.so", kdir / "int8_dot-orphan00000001.so"
    old.write_bytes(b"x")
    fresh.write_bytes(b"x")
    t = time.time() - 7200
    os.utime(old, (t, t))
    assert cpu_kernels._prune(kdir, keep=4) == [old]
    assert fresh.exists() and not old.exists()


@pytest.mark.parametrize("rows,k", [(4096, 2100), (16384, 600)])
def test_packed_x_past_the_kept_scratch_size(rows, k, kernel_isa):
    """Packed x over the kernel's per-thread scratch limit (8 MB) is allocated per call; a small call after
    it reuses the kept scratch, whose padding must be zeroed again."""
    rng = np.random.default_rng(rows)
    w = _ints(rng, (8, k))
    for r, kk in ((rows, k), (20, 67), (3, 65)):
        x = _ints(rng, (r, kk))
        ww = w if kk == k else _ints(rng, (8, kk))
        np.testing.assert_array_equal(np.asarray(jax.jit(cpu_kernels.int8_dot)(x, ww)), _ref(x, ww))
