"""Random ops (ai.onnx): RandomNormal/Uniform(Like), Bernoulli, Multinomial.

A ``seed`` attribute gives a deterministic ``jax.random`` key. The spec leaves
the generator unspecified, so values differ from numpy's or onnxruntime's
streams for the same seed. Without a seed, one is drawn from the host when the
graph is traced, so each compiled executable repeats its draws (the function
stays pure); give the model a seed input or re-load it for fresh draws.
"""

from __future__ import annotations

import secrets

import jax
import jax.numpy as jnp

from ....registry import OpDef, registrar
from ._util import dtype_of, ints

OPS: list[OpDef] = []
op = registrar(OPS)


def _key(seed: float | None) -> jax.Array:
    value = secrets.randbits(31) if seed is None else int(seed) & 0x7FFFFFFF
    return jax.random.PRNGKey(value)


@op("RandomNormal", 1, random=True)
def random_normal(*, shape, dtype: int = 1, mean: float = 0.0, scale: float = 1.0, seed: float | None = None):
    """https://onnx.ai/onnx/operators/onnx__RandomNormal.html"""
    dt = dtype_of(dtype)
    return (jax.random.normal(_key(seed), ints(shape), jnp.float32) * scale + mean).astype(dt)


@op("RandomUniform", 1, random=True)
def random_uniform(*, shape, dtype: int = 1, low: float = 0.0, high: float = 1.0, seed: float | None = None):
    """https://onnx.ai/onnx/operators/onnx__RandomUniform.html"""
    dt = dtype_of(dtype)
    return jax.random.uniform(_key(seed), ints(shape), jnp.float32, low, high).astype(dt)


@op("RandomNormalLike", 1, random=True, value_free=(0,))
def random_normal_like(x, *, dtype: int | None = None, mean: float = 0.0, scale: float = 1.0,
                       seed: float | None = None):
    """https://onnx.ai/onnx/operators/onnx__RandomNormalLike.html"""
    dt = jnp.result_type(x) if dtype is None else dtype_of(dtype)
    return (jax.random.normal(_key(seed), jnp.shape(x), jnp.float32) * scale + mean).astype(dt)


@op("RandomUniformLike", 1, random=True, value_free=(0,))
def random_uniform_like(x, *, dtype: int | None = None, low: float = 0.0, high: float = 1.0,
                        seed: float | None = None):
    """https://onnx.ai/onnx/operators/onnx__RandomUniformLike.html"""
    dt = jnp.result_type(x) if dtype is None else dtype_of(dtype)
    return jax.random.uniform(_key(seed), jnp.shape(x), jnp.float32, low, high).astype(dt)


@op(("Bernoulli",), 15, random=True)
def bernoulli(x, *, dtype: int | None = None, seed: float | None = None):
    """https://onnx.ai/onnx/operators/onnx__Bernoulli.html: 1 with probability x."""
    dt = jnp.result_type(x) if dtype is None else dtype_of(dtype)
    return jax.random.bernoulli(_key(seed), x).astype(dt)


@op("Multinomial", 7, random=True)
def multinomial(x, *, dtype: int = 6, sample_size: int = 1, seed: float | None = None):
    """https://onnx.ai/onnx/operators/onnx__Multinomial.html: x holds unnormalized log-probabilities."""
    draws = jax.random.categorical(_key(seed), x[:, None, :], axis=-1, shape=(x.shape[0], sample_size))
    return draws.astype(dtype_of(dtype))
