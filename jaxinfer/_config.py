"""Process-wide JAX settings jaxinfer needs, applied once on import.

ONNX computes shapes and indices in int64 and has float64 tensors, so 64-bit
types are enabled (``jax_enable_x64``); ops keep float32 models in float32.
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)
