"""Process-wide JAX settings jaxinfer needs, applied once on import.

ONNX computes shapes and indices in int64 and has float64 tensors, so 64-bit
types are enabled (``jax_enable_x64``); ops keep float32 models in float32.

Setting ``JAXINFER_CACHE_DIR`` turns on JAX's persistent compilation cache in that folder
for every process that imports jaxinfer (``jaxinfer.serve`` turns it on by default, in
``~/.cache/jaxinfer/xla`` unless the variable names another folder).

CPU computations run inline on the calling thread (``jax_cpu_enable_async_dispatch`` off),
unless ``JAXINFER_CPU_ASYNC_DISPATCH=1`` is set or JAX's backend had already started. Async dispatch
hands each call to a worker thread and wakes the caller when it ends; on the 2-core
development machine those two thread hand-offs cost about as much as a small model's whole
run (exported fixtures at batch 1, ``benchmarks/onnx_vs_ort.py``: BERT 0.44 -> 0.36 ms, the
quantized CNN 0.68 -> 0.41 ms; batch 8 unchanged). The GIL is released while a computation
runs either way, and computations over several devices stay asynchronous.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("jaxinfer")

jax.config.update("jax_enable_x64", True)


def _cpu_dispatch_inline() -> None:
    """Run single-device CPU computations on the calling thread (see the module docstring)."""
    from jax._src import xla_bridge

    if os.environ.get("JAXINFER_CPU_ASYNC_DISPATCH") == "1" or xla_bridge.backends_are_initialized():
        return
    jax.config.update("jax_cpu_enable_async_dispatch", False)


_cpu_dispatch_inline()


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn on JAX's persistent compilation cache (unless the user already set one)."""
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = path or os.environ.get("JAXINFER_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "jaxinfer", "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache disabled: cannot create %s: %s", path, e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


if os.environ.get("JAXINFER_CACHE_DIR"):
    enable_compilation_cache()
