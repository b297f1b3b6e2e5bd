"""Stored programs beside the persistent cache: a second process runs a model without tracing, lowering or compiling it."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer import aot, cpu_kernels
from jaxinfer.graph import Graph, Node, ValueInfo

# Counts, after loading, what the first run traced (our tracer), lowered (JAX's MLIR lowering) and
# compiled (XLA, or a persistent-cache load), and what aot.py did with the stored files.
CHILD = """
import json, os, sys, numpy as np, jax, jaxinfer
import jaxinfer
from jaxinfer import aot, cpu_kernels
if os.environ.get("TEST_AOT_STORE_FROM_JAX_CACHE"):  # what aot.py did before it watched JAX's cache hits
    aot._cache_hits = lambda: 0
m = jaxinfer.load(sys.argv[1])
if len(sys.argv) > 2:
    m = jaxinfer.quantize(m, sys.argv[2])
events = {"lowerings": 0, "backend_compiles": 0}
names = {"/jax/core/compile/jaxpr_to_mlir_module_duration": "lowerings",
         "/jax/core/compile/backend_compile_duration": "backend_compiles"}
def on(event, secs, **_):
    if event in names:
        events[names[event]] += 1
jax.monitoring.register_event_duration_secs_listener(on)
y = m.run({"x": np.arange(8, dtype=np.float32).reshape(2, 4)})["y"]
print(json.dumps({"traces": m.stats.traces, "compiles": m.stats.compiles, "y": y.tolist(), **events,
                  "aot": dict(aot.COUNTS)}))
"""


def _model(path: Path, alpha: float) -> None:
    w = numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("LeakyRelu", ["h"], ["y"], alpha=alpha)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def _expected(alpha: float) -> list:
    h = np.arange(8, dtype=np.float32).reshape(2, 4) @ np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    return np.where(h >= 0, h, alpha * h).tolist()


def _run(model: Path, cache: Path, *extra: str, **env: str) -> dict:
    env = {**os.environ, "JAXINFER_CACHE_DIR": str(cache), **env}
    out = subprocess.run([sys.executable, "-c", CHILD, str(model), *extra], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _stored(cache: Path, suffix: str) -> list[Path]:
    return sorted((cache / "jaxinfer-exports").glob(f"*{suffix}"))


def _close(got: list, want: list) -> bool:
    return np.allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_second_process_runs_the_stored_executable_without_tracing_lowering_or_compiling(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _model(a, 0.1)
    _model(b, 0.2)  # differs only in an attribute: must not reuse a's program
    cold = _run(a, cache)
    assert cold["traces"] == 1 and cold["aot"] == {"exported": 1, "executable_saved": 1}
    assert _close(cold["y"], _expected(0.1))
    assert len(_stored(cache, ".jaxexport")) == 1 and len(_stored(cache, ".jaxexec")) == 1
    warm = _run(a, cache)
    assert warm["aot"] == {"executable_loaded": 1}
    assert (warm["traces"], warm["lowerings"], warm["backend_compiles"], warm["compiles"]) == (0, 0, 0, 1)
    assert warm["y"] == cold["y"]
    other = _run(b, cache)
    assert other["traces"] == 1 and other["aot"] == {"exported": 1, "executable_saved": 1}
    assert _close(other["y"], _expected(0.2)) and other["y"] != cold["y"]
    assert len(_stored(cache, ".jaxexport")) == 2 and len(_stored(cache, ".jaxexec")) == 2


def test_damaged_or_misplaced_executable_falls_back_to_the_export_and_is_rewritten(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _model(a, 0.1)
    _model(b, 0.2)
    cold = _run(a, cache)
    (exe,) = _stored(cache, ".jaxexec")
    data = bytearray(exe.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the compiled code
    exe.write_bytes(bytes(data))
    damaged = _run(a, cache)
    assert damaged["aot"] == {"executable_rejected": 1, "export_loaded": 1, "executable_saved": 1}
    assert damaged["traces"] == 0 and damaged["y"] == cold["y"]
    healed = _run(a, cache)  # the fallback stored a good executable again
    assert healed["aot"] == {"executable_loaded": 1} and healed["lowerings"] == 0 and healed["y"] == cold["y"]

    _run(b, cache)  # b's executable, intact, copied over a's: stored under another key, so not used
    (exe_b,) = [p for p in _stored(cache, ".jaxexec") if p != exe]
    shutil.copyfile(exe_b, exe)
    misplaced = _run(a, cache)
    assert misplaced["aot"]["executable_rejected"] == 1 and misplaced["y"] == cold["y"]

    exe.write_bytes(b"")  # both files unreadable: traced and compiled afresh
    next(p for p in _stored(cache, ".jaxexport") if exe.name.startswith(p.stem)).write_bytes(b"junk")
    fresh = _run(a, cache)
    assert fresh["aot"] == {"executable_rejected": 1, "exported": 1, "executable_saved": 1}
    assert fresh["traces"] == 1 and fresh["y"] == cold["y"]


@pytest.mark.cpu_program
def test_program_from_jax_cache_is_not_stored_as_an_executable(tmp_path):
    # XLA CPU re-serializes an executable loaded from JAX's cache without its kernels; storing one
    # made the next process fail its first run ("Function bitcast_bitcast_fusion not found").
    cache = tmp_path / "cache"
    a = tmp_path / "a.onnx"
    _model(a, 0.1)
    # JAX's cache keeps even this tiny program (set by the user, jaxinfer leaves the cache's settings alone)
    everything = {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    cold = _run(a, cache, **everything)
    assert cold["aot"] == {"exported": 1, "executable_saved": 1}
    for exe in _stored(cache, ".jaxexec"):
        exe.unlink()
    from_jax_cache = _run(a, cache, **everything)
    assert from_jax_cache["aot"] == {"export_loaded": 1, "executable_not_saved": 1}
    assert from_jax_cache["traces"] == 0 and from_jax_cache["y"] == cold["y"]
    assert not _stored(cache, ".jaxexec")
    again = _run(a, cache, **everything)
    assert again["aot"] == {"export_loaded": 1, "executable_not_saved": 1} and again["y"] == cold["y"]

    # Were one stored anyway, it loads but fails its first run: a fresh compile answers instead.
    _run(a, cache, TEST_AOT_STORE_FROM_JAX_CACHE="1", **everything)
    assert len(_stored(cache, ".jaxexec")) == 1
    broken = _run(a, cache, **everything)
    assert broken["aot"] == {"executable_loaded": 1, "executable_failed": 1, "export_loaded": 1,
                             "executable_not_saved": 1}
    assert broken["y"] == cold["y"] and not _stored(cache, ".jaxexec")


def test_another_device_count_gets_its_own_executable_from_the_same_export(tmp_path):
    cache = tmp_path / "cache"
    a = tmp_path / "a.onnx"
    _model(a, 0.1)
    cold = _run(a, cache, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    other = _run(a, cache, XLA_FLAGS="--xla_force_host_platform_device_count=3")
    assert other["aot"] == {"export_loaded": 1, "executable_saved": 1}
    assert other["traces"] == 0 and other["y"] == cold["y"]
    assert len(_stored(cache, ".jaxexport")) == 1 and len(_stored(cache, ".jaxexec")) == 2


def test_quantized_params_warm_start_from_the_executable_alone(tmp_path):
    # qwix's QArray pytree nodes cannot go into a jax.export file, but the executable keeps them.
    cache = tmp_path / "cache"
    a = tmp_path / "a.onnx"
    _model(a, 0.1)
    cold = _run(a, cache, "int8-weight")
    assert cold["traces"] == 1 and cold["aot"] == {"exported": 1, "executable_saved": 1}
    assert not _stored(cache, ".jaxexport") and len(_stored(cache, ".jaxexec")) == 1
    warm = _run(a, cache, "int8-weight")
    assert warm["aot"] == {"executable_loaded": 1} and (warm["traces"], warm["lowerings"]) == (0, 0)
    assert warm["y"] == cold["y"]
    plain = _run(a, cache)  # the float model: another program
    assert plain["traces"] == 1 and _close(plain["y"], _expected(0.1)) and plain["y"] != cold["y"]


def _int8_model(path: Path) -> None:
    """y = float(MatMulInteger(DynamicQuantizeLinear(x), w)): an int8 product our CPU kernel computes."""
    w = numpy_helper.from_array(np.array([[1, -2, 3], [-4, 5, -6], [7, -8, 9], [-10, 11, -127]], np.int8), "w")
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("MatMulInteger", ["q", "w", "z"], ["acc"]),
             helper.make_node("Cast", ["acc"], ["y"], to=TensorProto.FLOAT)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)]), path)


@pytest.mark.cpu_program
def test_programs_calling_our_int8_kernel_are_stored_and_reloaded(tmp_path):
    """The kernel's custom call goes into the export and the executable; a later process registers the
    kernel before loading either, and gets the same answer."""
    if not cpu_kernels.available():
        pytest.skip("no CPU int8 kernel on this machine")
    cache = tmp_path / "cache"
    a = tmp_path / "q.onnx"
    _int8_model(a)
    m = jaxinfer.load(a)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert cpu_kernels.TARGET_ZP in jax.jit(m.fn).lower(m.params, {"x": x}).as_text()  # u8 activations: zp form
    want = m.run({"x": x})["y"].tolist()
    cold = _run(a, cache)
    assert cold["aot"] == {"exported": 1, "executable_saved": 1} and cold["y"] == want
    warm = _run(a, cache)
    assert warm["aot"] == {"executable_loaded": 1} and warm["traces"] == 0 and warm["y"] == want
    for exe in _stored(cache, ".jaxexec"):
        exe.unlink()
    from_export = _run(a, cache)
    assert from_export["aot"] == {"export_loaded": 1, "executable_saved": 1} and from_export["traces"] == 0
    assert from_export["y"] == want


# ------------------------------------------------------------------ in process

def _program(device: jax.Device, donate: bool = False):
    """A compiled (params, inputs) program whose params live on ``device``, and its args."""
    params = {"w": jax.device_put(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), device),
              "b": jax.device_put(np.arange(3, dtype=np.float32), device)}
    inputs = {"x": jax.device_put(np.arange(8, dtype=np.float32).reshape(2, 4), device)}

    def fn(p, i):
        return {"y": i["x"] @ p["w"] + p["b"], "x1": i["x"] + 1, "none": None}  # x1 can take x's buffer

    jitted = jax.jit(fn, donate_argnums=(1,) if donate else ())
    return jitted.lower(params, inputs).compile(), (params, inputs)


def _fresh_inputs(args: tuple, device: jax.Device) -> tuple:
    return args[0], {"x": jax.device_put(np.arange(8, dtype=np.float32).reshape(2, 4), device)}


def test_stored_executable_keeps_its_device_pytrees_and_donation(tmp_path):
    device = jax.devices()[-1]  # not the default device: the executable must be loaded onto this one
    compiled, args = _program(device, donate=True)
    want = np.asarray(compiled(*_fresh_inputs(args, device))["y"])
    path = tmp_path / "p.jaxexec"
    assert aot.save_executable(path, "k", compiled)
    loaded = aot.load_executable(path, "k", args)
    assert loaded is not None
    assert loaded.in_tree == compiled.in_tree and loaded.out_tree == compiled.out_tree
    assert [a.donated for a in jax.tree.leaves(loaded.args_info)] == [False, False, True]
    out = loaded(*_fresh_inputs(args, device))
    assert out["none"] is None and out["y"].devices() == {device}
    np.testing.assert_array_equal(np.asarray(out["y"]), want)


def test_first_call_failure_of_a_loaded_executable_compiles_anew(tmp_path):
    calls = []

    def broken(*args):
        calls.append("broken")
        raise jax.errors.JaxRuntimeError("NOT_FOUND: Function fusion not found")

    def fresh(*args):
        calls.append("fresh")
        return sum(args)

    path = tmp_path / "p.jaxexec"
    path.write_bytes(b"stored")
    before = aot.COUNTS["executable_failed"]
    exe = aot.FirstCallChecked(broken, lambda: fresh, path)
    assert exe(1, 2) == 3 and exe(3, 4) == 7
    assert calls == ["broken", "fresh", "fresh"] and not path.exists()
    assert aot.COUNTS["executable_failed"] == before + 1

    def wrong_args(*args):
        raise TypeError("argument shapes differ")  # the caller's error, not the file's: no fallback

    path.write_bytes(b"stored")
    with pytest.raises(TypeError):
        aot.FirstCallChecked(wrong_args, lambda: fresh, path)(1)
    assert path.exists()

    compiled, args = _program(jax.devices()[0])
    checked = aot.FirstCallChecked(compiled, lambda: None, path)
    assert checked.in_tree == compiled.in_tree  # the executable's own attributes show through
    np.testing.assert_array_equal(np.asarray(checked(*args)["y"]), np.asarray(compiled(*args)["y"]))


def test_out_of_memory_on_the_first_call_keeps_the_stored_executable(tmp_path):
    """Too-big inputs are not a broken file: the error is raised, the file kept, the next call checked."""
    state = {"oom": True}

    def exe(*args):
        if state["oom"]:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 274877906944 bytes")
        return sum(args)

    path = tmp_path / "p.jaxexec"
    path.write_bytes(b"stored")
    before = aot.COUNTS["executable_failed"]
    checked = aot.FirstCallChecked(exe, lambda: pytest.fail("no recompile for an out-of-memory"), path)
    with pytest.raises(jax.errors.JaxRuntimeError, match="RESOURCE_EXHAUSTED"):
        checked(1, 2)
    assert path.exists() and aot.COUNTS["executable_failed"] == before
    state["oom"] = False
    assert checked(1, 2) == 3


def _reseal(path: Path, **changes: object) -> None:
    """Rewrite a stored executable with ``changes`` to its contents and a valid checksum."""
    data = path.read_bytes()
    head = len(aot.EXECUTABLE_MAGIC)
    stored = {**pickle.loads(data[head + 32:]), **changes}
    body = pickle.dumps(stored)
    path.write_bytes(aot.EXECUTABLE_MAGIC + hashlib.sha256(body).digest() + body)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "not ours", "other key", "missing device",
                                    "other payload", "other shapes"])
def test_unusable_stored_executable_is_rejected_not_raised(tmp_path, damage):
    compiled, args = _program(jax.devices()[0])
    path = tmp_path / "p.jaxexec"
    assert aot.save_executable(path, "k", compiled)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":
        path.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    elif damage == "not ours":
        path.write_bytes(b"\x80\x04junk" + data[10:])
    elif damage == "other key":
        _reseal(path, key="another program")
    elif damage == "missing device":
        _reseal(path, devices=[10_000])
    elif damage == "other payload":
        _reseal(path, payload=b"not an executable")
    else:
        args = (args[0], {"x": np.zeros((5, 4), np.float32)})
    before = aot.COUNTS["executable_rejected"]
    assert aot.load_executable(path, "k", args) is None
    assert aot.COUNTS["executable_rejected"] == before + 1
    assert aot.load_executable(tmp_path / "absent.jaxexec", "k", args) is None  # no file: quietly None


def test_machine_digest_follows_argument_placement():
    host = ({}, {"x": np.zeros((2, 3), np.float32)})
    devs = jax.devices()
    on = [({}, {"x": jax.device_put(np.zeros((2, 3), np.float32), d)}) for d in (devs[0], devs[-1])]
    assert aot.machine_digest(host) == aot.machine_digest(host)
    assert len({aot.machine_digest(host), *(aot.machine_digest(a) for a in on)}) == (3 if len(devs) > 1 else 2)


def test_digest_follows_attributes_constants_shapes_and_options():
    def graph(alpha: float) -> Graph:
        return Graph(nodes=(Node("LeakyRelu", ("x",), ("y",), {"alpha": alpha}),),
                     inputs=(ValueInfo("x", np.dtype(np.float32), ("batch", 3)),),
                     outputs=(ValueInfo("y", np.dtype(np.float32), ("batch", 3)),))

    args = ({}, {"x": np.zeros((2, 3), np.float32)})
    base = aot.program_digest(graph(0.1), {}, args, {})
    assert base == aot.program_digest(graph(0.1), {}, args, {})
    assert base != aot.program_digest(graph(0.2), {}, args, {})
    assert base != aot.program_digest(graph(0.1), {"c": np.array([1, 2])}, args, {})
    assert base != aot.program_digest(graph(0.1), {}, ({}, {"x": np.zeros((4, 3), np.float32)}), {})
    assert base != aot.program_digest(graph(0.1), {}, args, {"xla_flag": "x"})
