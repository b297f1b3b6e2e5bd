"""Process-wide JAX settings jaxinfer needs, applied once on import.

ONNX computes shapes and indices in int64 and has float64 tensors, so 64-bit
types are enabled (``jax_enable_x64``); ops keep float32 models in float32.

Setting ``JAXINFER_CACHE_DIR`` turns on JAX's persistent compilation cache in that folder
for every process that imports jaxinfer (``jaxinfer.serve`` turns it on by default, in
``~/.cache/jaxinfer/xla`` unless the variable names another folder).
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("jaxinfer")

jax.config.update("jax_enable_x64", True)


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
