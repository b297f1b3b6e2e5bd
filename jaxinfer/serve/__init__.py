"""Serving: KServe v2 over HTTP, a versioned model repository, metrics, a response cache.

Example:
    >>> server = jaxinfer.serve("model_repo/", port=8000)     # doctest: +SKIP
    >>> server.url, server.stop()                              # doctest: +SKIP
"""

from __future__ import annotations

from .config import ConfigError, GenerationConfig, ModelConfig, VersionPolicy
from .protocol import ProtocolError
from .repository import ModelLoadFailed, ModelNotFoundError, ModelRepository, ModelVersion
from .server import Server, default_model_path, main, serve

__all__ = [
    "ConfigError",
    "GenerationConfig",
    "ModelConfig",
    "ModelLoadFailed",
    "ModelNotFoundError",
    "ModelRepository",
    "ModelVersion",
    "ProtocolError",
    "Server",
    "VersionPolicy",
    "default_model_path",
    "main",
    "serve",
]
