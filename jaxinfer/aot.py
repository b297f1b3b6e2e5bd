"""Exported programs on disk beside JAX's persistent compilation cache, so a warm process skips tracing.

JAX's persistent cache keys compiled executables by the lowered program, so a second process
still traces the whole graph (our tracer, op by op, in Python) and lowers it before the cache
can answer; for an exported BERT that is most of a warm start. Here each compiled shape
signature's program is also kept as a serialized ``jax.export.Exported`` under
``<cache dir>/jaxinfer-exports/``, named by a digest of everything the program depends on:
the graph (nodes, attributes, constants), the abstract params and inputs, jaxinfer's own
source, the jax version, the backend and the compiler options. A later process deserializes
it and compiles ``exported.call`` -- the same program the first process compiled, so the
persistent cache hits -- without tracing.

Only while a persistent cache directory is set (``JAXINFER_CACHE_DIR`` or ``jaxinfer.serve``),
and only for stateless programs without host-computed outputs. Anything that cannot be
exported or serialized (e.g. custom pytree nodes in quantized params) compiles as before.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax import export

from .graph import Graph

log = logging.getLogger("jaxinfer.aot")


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
    if isinstance(value, (np.ndarray, np.generic)) or isinstance(value, jax.Array):
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
    return h.hexdigest()


def compile_exported(fn: Callable[..., Any], args: tuple, digest: str, options: Mapping[str, Any],
                     may_save: Callable[[], bool]) -> Any | None:
    """The compiled program for ``fn(*args)`` through a stored export, or None to compile the usual way.

    A stored export (named ``digest``) is used without calling ``fn``; otherwise ``fn`` is exported
    (traced once), saved when ``may_save()`` says so after tracing, and its ``call`` compiled.
    """
    folder = export_dir()
    if folder is None:
        return None
    path = folder / f"{digest}.jaxexport"
    exported = None
    if path.exists():
        try:
            exported = export.deserialize(bytearray(path.read_bytes()))
        except Exception as e:  # noqa: BLE001 - a damaged or foreign file: export anew
            log.warning("ignoring unreadable exported program %s: %s", path, e)
    if exported is None:
        try:
            exported = export.export(jax.jit(fn))(*abstract(args))
        except Exception as e:  # noqa: BLE001 - not exportable: the caller compiles directly
            log.debug("program not exportable (%s); compiling directly", e)
            return None
        if may_save():
            _save(path, exported)
    return jax.jit(exported.call).lower(*args).compile(dict(options) or None)


def _save(path: Path, exported: Any) -> None:
    try:
        data = exported.serialize()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old state or the whole file
    except Exception as e:  # noqa: BLE001 - custom pytree nodes, a read-only disk: just don't keep it
        log.debug("exported program not saved (%s)", e)
