"""Compiled programs on disk beside JAX's persistent compilation cache, so a warm process neither traces nor lowers.

JAX's persistent cache keys compiled executables by the lowered program, so a second process
still traces the whole graph (our tracer, op by op, in Python) and lowers it before the cache
can answer; for an exported BERT that is most of a warm start. Here each compiled shape
signature's program is kept under ``<cache dir>/jaxinfer-exports/`` twice, both named by a digest
of everything the program depends on (the graph's nodes, attributes and constants, the abstract
params and inputs, jaxinfer's own source, the jax version, the backend and the compiler options):

- ``<digest>.jaxexport``: a serialized ``jax.export.Exported``. A later process deserializes it and
  compiles ``exported.call`` -- the same program the first process compiled, so the persistent
  cache hits -- without tracing, on any device layout.
- ``<digest>-<machine>.jaxexec``: the compiled executable itself (``jax.experimental.
  serialize_executable``), ``<machine>`` being a digest of the jax/jaxlib versions, the platform and
  its version, the device kinds and ids, the host CPU, ``XLA_FLAGS`` and where each argument lives.
  A later process on the same machine loads a ready ``Compiled``: no trace, no lowering (lowering
  ``exported.call`` with ResNet-50's 300+ weight arguments alone took ~0.4 s), no XLA compile.
  The file carries a checksum; a damaged, foreign or mismatched one is ignored (logged) and the
  program comes from the export, else from a fresh trace, and the file is written anew -- unless
  that compile was answered by JAX's persistent cache: XLA CPU cannot re-serialize such an
  executable, so that program keeps coming from the export (and the JAX cache).

Only while a persistent cache directory is set (``JAXINFER_CACHE_DIR`` or ``jaxinfer.serve``),
and only for stateless programs without host-computed outputs. Anything that cannot be
exported or serialized (e.g. custom pytree nodes in quantized params) compiles as before;
programs spanning several devices or calling LAPACK are kept as exports only.
Like JAX's own cache, the folder is trusted: loading an executable unpickles it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pickle
import platform
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jaxlib
import numpy as np
from jax import export
from jax.experimental import serialize_executable

from . import cpu_kernels
from .graph import Graph
from .tracer import is_out_of_memory

log = logging.getLogger("jaxinfer.aot")

#: Our XLA CPU kernels (custom calls) may appear in exported programs: jaxinfer registers them itself.
_OUR_KERNELS = tuple(export.DisabledSafetyCheck.custom_call(t) for t in cpu_kernels.TARGETS)


def _register_kernels() -> None:
    """A stored program may call our CPU kernels: have them registered before it is loaded."""
    if jax.default_backend() == "cpu":
        cpu_kernels.available()

#: What this process did with stored programs (a test or a log line can read it): ``executable_loaded``,
#: ``executable_saved``, ``executable_rejected`` (present but unusable), ``executable_not_saved`` (compiled
#: from JAX's persistent cache, which cannot be re-serialized), ``executable_failed`` (loaded, but its first
#: run failed: compiled anew), ``export_loaded``, ``exported``.
COUNTS: Counter[str] = Counter()

#: The first bytes of a stored executable; a format change bumps the number.
EXECUTABLE_MAGIC = b"jaxinfer-executable/1\n"


def export_dir() -> Path | None:
    """Where exported programs live: beside the persistent compilation cache, or None when it is off."""
    cache = jax.config.jax_compilation_cache_dir
    return Path(cache) / "jaxinfer-exports" if cache else None


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """A digest of jaxinfer's own Python source: a changed op must not reuse an old program."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def array_digest(value: Any) -> str:
    """A digest of an array's dtype, shape and contents (object arrays by their values' repr)."""
    arr = np.asarray(value)
    h = hashlib.blake2b(f"{arr.dtype.str}|{arr.shape}|".encode(), digest_size=16)
    h.update(repr(arr.tolist()).encode() if arr.dtype == np.dtype(object) else np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


def _update(h: Any, value: Any) -> None:
    """Feed ``value`` into ``h`` exactly: arrays by dtype, shape and bytes, containers element by element."""
    if isinstance(value, (np.ndarray, np.generic, jax.Array)):
        h.update(f"a{array_digest(value)};".encode())
    elif isinstance(value, Graph):  # a control-flow body: hashed like the top graph
        _update_graph(h, value, initializers=True)
    elif isinstance(value, Mapping):
        h.update(b"{")
        for k in sorted(value, key=str):
            _update(h, k)
            _update(h, value[k])
        h.update(b"}")
    elif isinstance(value, (list, tuple)):
        h.update(b"(" if isinstance(value, tuple) else b"[")
        for v in value:
            _update(h, v)
        h.update(b")")
    else:
        h.update(f"{type(value).__name__}:{value!r};".encode())


def _update_graph(h: Any, graph: Graph, initializers: bool) -> None:
    """Everything of ``graph`` that shapes its traced program (the top graph's weights are arguments)."""
    _update(h, [(n.op_type, n.domain, tuple(n.inputs), tuple(n.outputs), dict(n.attrs)) for n in graph.nodes])
    _update(h, (graph.inputs, graph.outputs, dict(graph.opsets), graph.fmt, dict(graph.value_info)))
    _update(h, (dict(graph.state_vars), dict(graph.state_init)))
    if initializers:
        _update(h, dict(graph.initializers))


def abstract(tree: Any) -> Any:
    """``tree`` with every array replaced by its ShapeDtypeStruct."""
    return jax.tree.map(lambda v: jax.ShapeDtypeStruct(np.shape(v), v.dtype), tree)


def program_digest(graph: Any, constants: Mapping[str, Any], args: tuple, options: Mapping[str, Any]) -> str:
    """The name of one compiled program: graph, constants, abstract args and the toolchain it came from."""
    h = hashlib.sha256()
    _update_graph(h, graph, initializers=False)
    _update(h, dict(constants))
    leaves, treedef = jax.tree.flatten(abstract(args))
    h.update(str(treedef).encode())
    _update(h, [(leaf.shape, str(leaf.dtype)) for leaf in leaves])
    _update(h, (dict(options), jax.__version__, jax.default_backend(), source_digest()))
    _update(h, (jax.config.jax_enable_x64, str(jax.config.jax_default_matmul_precision)))  # change what traces
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _host_cpu() -> str:
    """The host's architecture and CPU feature flags: XLA CPU code is compiled for them."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()}|{flags.strip()}"


def _placement(leaf: Any) -> Any:
    """Where an argument lives at compile time: the executable is built for those devices."""
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        return "host"
    return repr(sharding), sorted(d.id for d in sharding.device_set)


def machine_digest(args: tuple) -> str:
    """What a compiled executable depends on beyond its program: toolchain, devices, host CPU, flags, placement."""
    backend = jax.devices()[0].client
    h = hashlib.sha256()
    _update(h, (jax.__version__, jaxlib.__version__, backend.platform, backend.platform_version,
                [(d.id, d.device_kind, d.process_index) for d in backend.devices()], jax.process_count(),
                str(jax.config.jax_default_device), _host_cpu(), os.environ.get("XLA_FLAGS", ""),
                os.environ.get("LIBTPU_INIT_ARGS", "")))
    _update(h, [_placement(leaf) for leaf in jax.tree.leaves(args)])
    return h.hexdigest()[:32]


def compile_exported(fn: Callable[..., Any], args: tuple, digest: str, compile_lowered: Callable[[Any], Any],
                     may_save: Callable[[], bool]) -> Any | None:
    """The compiled program for ``fn(*args)`` from what is stored, or None to compile the usual way.

    In order: the stored executable for this program on this machine (nothing traced, lowered or
    compiled); the stored export named ``digest`` (compiled without calling ``fn``); else ``fn`` is
    exported (traced once), the export saved when ``may_save()`` says so after tracing, and its
    ``call`` compiled. A program compiled here is stored as an executable too (same ``may_save()``).
    ``compile_lowered`` compiles a lowered program with the model's options.
    """
    folder = export_dir()
    if folder is None:
        return None
    key = f"{digest}-{machine_digest(args)}"
    exe_path = folder / f"{key}.jaxexec"

    def from_export() -> Any | None:
        return _compile_exported(fn, args, folder / f"{digest}.jaxexport", compile_lowered, may_save, exe_path,
                                 key)

    compiled = load_executable(exe_path, key, args)
    if compiled is not None:
        def fallback() -> Any:
            return from_export() or compile_lowered(jax.jit(fn).lower(*args))

        return FirstCallChecked(compiled, fallback, exe_path)
    return from_export()


def _compile_exported(fn: Callable[..., Any], args: tuple, path: Path, compile_lowered: Callable[[Any], Any],
                      may_save: Callable[[], bool], exe_path: Path, key: str) -> Any | None:
    """Compile through the export at ``path`` (made from ``fn`` if need be); keep the executable at ``exe_path``."""
    exported = None
    _register_kernels()
    if path.exists():
        try:
            exported = export.deserialize(bytearray(path.read_bytes()))
            COUNTS["export_loaded"] += 1
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: export anew
            log.warning("ignoring unreadable exported program %s: %s", path, e)
    if exported is None:
        try:
            exported = export.export(jax.jit(fn), disabled_checks=_OUR_KERNELS)(*abstract(args))
        except Exception as e:  # noqa: BLE001 - not exportable: the caller compiles directly
            log.debug("program not exportable (%s); compiling directly", e)
            return None
        COUNTS["exported"] += 1
        if may_save():
            _write(path, exported.serialize, "exported program")
    _watch_cache_hits()
    hits = _cache_hits()
    compiled = compile_lowered(jax.jit(exported.call).lower(*args))
    if _cache_hits() != hits:
        # An executable JAX loaded from its persistent cache serializes without its kernels (XLA CPU:
        # "Function ... not found" on the first run after loading it), so only fresh compiles are kept.
        COUNTS["executable_not_saved"] += 1
        log.debug("%s came from JAX's persistent cache: not stored as an executable", exe_path.name)
    elif may_save():
        save_executable(exe_path, key, compiled)
    return compiled


class FirstCallChecked:
    """A loaded executable whose first call is checked: should it fail, a fresh compile answers instead.

    Some damage only shows when a deserialized executable first runs (a kernel missing from it),
    so the first call waits for its results; on an error the stored file is dropped, ``fallback()``
    compiles the program anew and the call is repeated. Running out of memory is the inputs' doing,
    not the file's: it is raised as it is and the next call is checked again. Later calls go straight to the executable;
    any other attribute is the executable's.
    """

    __slots__ = ("_checked", "_exe", "_fallback", "_lock", "_path")

    def __init__(self, exe: Any, fallback: Callable[[], Any], path: Path):
        self._exe, self._fallback, self._path = exe, fallback, path
        self._checked, self._lock = False, threading.Lock()

    def __call__(self, *args: Any) -> Any:
        if self._checked:
            return self._exe(*args)
        with self._lock:
            if self._checked:
                return self._exe(*args)
            try:
                out = jax.block_until_ready(self._exe(*args))
            except jax.errors.JaxRuntimeError as e:  # the stored executable is broken: compile instead
                if is_out_of_memory(e):  # these inputs are too big, not the file broken: keep it, check again
                    raise
                COUNTS["executable_failed"] += 1
                log.warning("stored executable %s failed its first run (%s); compiling the program anew",
                            self._path, e)
                self._path.unlink(missing_ok=True)
                self._exe = self._fallback()
                out = self._exe(*args)
            self._checked, self._fallback = True, None
            return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._exe, name)


_local = threading.local()


@functools.lru_cache(maxsize=1)
def _watch_cache_hits() -> None:
    """Count JAX persistent-cache hits per thread (listeners run in the thread that compiles)."""
    def on_event(event: str, **_: Any) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            _local.cache_hits = _cache_hits() + 1

    jax.monitoring.register_event_listener(on_event)


def _cache_hits() -> int:
    return getattr(_local, "cache_hits", 0)


def _devices(compiled: Any) -> list[Any]:
    """The devices ``compiled`` runs on, from its argument and result shardings."""
    shardings = jax.tree.leaves((compiled.input_shardings, compiled.output_shardings))
    return sorted({d for s in shardings for d in s.device_set}, key=lambda d: d.id)


def save_executable(path: Path, key: str, compiled: Any) -> bool:
    """Store ``compiled`` (a one-device ``jax.stages.Compiled``) under ``path``; False when it cannot be.

    ``compiled`` must come from a fresh XLA compile, not from JAX's persistent cache (see compile_exported).

    The file is ``EXECUTABLE_MAGIC``, a SHA-256 of the rest, then a pickle of the serialized
    executable, its argument and result pytrees, the id of its device and ``key`` (the program and
    machine digests it was stored under, checked on loading).
    """
    def data() -> bytes:
        devices = _devices(compiled)
        if len(devices) != 1:  # a loaded executable must be given its devices in their assignment order
            raise ValueError(f"runs on {len(devices)} devices")
        text = compiled.as_text()
        if text is None or "lapack" in text:
            # LAPACK kernels are bound when a program using them is lowered (jax.export does it);
            # a loaded executable would call unbound ones: such programs (or any we cannot read) come from the export.
            raise ValueError("calls LAPACK" if text else "no HLO text to check for LAPACK calls")
        payload, in_tree, out_tree = serialize_executable.serialize(compiled)
        body = pickle.dumps({"key": key, "payload": payload, "in_tree": in_tree, "out_tree": out_tree,
                             "devices": [d.id for d in devices]}, protocol=pickle.HIGHEST_PROTOCOL)
        return EXECUTABLE_MAGIC + hashlib.sha256(body).digest() + body

    if not _write(path, data, "compiled executable"):
        return False
    COUNTS["executable_saved"] += 1
    return True


def load_executable(path: Path, key: str, args: tuple) -> Any | None:
    """The executable stored under ``path`` as a ready ``jax.stages.Compiled`` for ``args``, or None.

    None when there is no file, or (logged) when it is damaged, was stored under another key, names
    a device this process lacks, fails to deserialize, or does not take ``args``' pytree, shapes and dtypes.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("cannot read stored executable %s: %s", path, e)
        return None
    _register_kernels()
    try:
        head = len(EXECUTABLE_MAGIC)
        if not data.startswith(EXECUTABLE_MAGIC):
            raise ValueError("not a jaxinfer executable")
        body = data[head + 32:]
        if hashlib.sha256(body).digest() != data[head:head + 32]:
            raise ValueError("checksum mismatch (damaged file)")
        stored = pickle.loads(body)
        if stored["key"] != key:
            raise ValueError(f"stored for {stored['key']}, not {key}")
        by_id = {d.id: d for d in jax.devices()}
        missing = [i for i in stored["devices"] if i not in by_id]
        if missing:
            raise ValueError(f"device ids {missing} are not in this process")
        devices = [by_id[i] for i in stored["devices"]]
        compiled = serialize_executable.deserialize_and_load(
            stored["payload"], stored["in_tree"], stored["out_tree"], backend=devices[0].client,
            execution_devices=devices)
        _check_takes(compiled, args)
    except Exception as e:  # noqa: BLE001 - damaged, foreign or stale: the caller compiles anew
        COUNTS["executable_rejected"] += 1
        log.warning("ignoring stored executable %s: %s", path, e)
        return None
    COUNTS["executable_loaded"] += 1
    return compiled


def _check_takes(compiled: Any, args: tuple) -> None:
    """Raise unless ``compiled`` takes exactly ``args``' pytree, shapes and dtypes."""
    if compiled.in_tree != jax.tree.structure((args, {})):
        raise ValueError("takes another argument pytree")
    got = [(tuple(a.shape), np.dtype(a.dtype)) for a in jax.tree.leaves(compiled.in_avals)]
    have = [(tuple(np.shape(x)), np.dtype(x.dtype)) for x in jax.tree.leaves((args, {}))]
    if got != have:
        bad = next(i for i, (g, h) in enumerate(zip(got, have)) if g != h) if len(got) == len(have) else None
        raise ValueError(f"argument shapes/dtypes differ (first at leaf {bad})")


def _write(path: Path, data: Callable[[], bytes], what: str) -> bool:
    """Write ``data()`` to ``path`` atomically; False (logged at debug) when it cannot be made or written."""
    tmp = path.with_suffix(f".{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        blob = data()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(blob)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    except Exception as e:  # noqa: BLE001 - custom pytree nodes, no serialization, a read-only disk
        log.debug("%s not saved to %s (%s)", what, path, e)
        tmp.unlink(missing_ok=True)
        return False
    return True
