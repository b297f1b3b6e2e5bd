"""The fixed-shape KV cache: per layer one K and one V array of shape (slots, kv_heads, max_len, head_dim).

It is a plain pytree (``KVCache``: a tuple of keys and a tuple of values), allocated once and donated to every
prefill/decode call, which writes new rows with ``lax.dynamic_update_slice`` so XLA updates it in place.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .layout import DecoderLayout


class KVCache(NamedTuple):
    """Per layer K and V, each (slots, kv_heads, max_len, head_dim)."""

    keys: tuple[Any, ...]
    values: tuple[Any, ...]


def cache_shape(layout: DecoderLayout, slots: int, max_len: int) -> tuple[int, int, int, int]:
    return (slots, layout.kv_heads, max_len, layout.head_dim)


def allocate(layout: DecoderLayout, slots: int, max_len: int) -> KVCache:
    """A zeroed cache on the default device."""
    shape = cache_shape(layout, slots, max_len)
    zeros = lambda: jnp.zeros(shape, layout.kv_dtype)  # noqa: E731
    return KVCache(tuple(zeros() for _ in range(layout.n_layers)), tuple(zeros() for _ in range(layout.n_layers)))


def abstract(layout: DecoderLayout, slots: int, max_len: int) -> KVCache:
    """The cache's shapes/dtypes (for lowering without allocating)."""
    sds = jax.ShapeDtypeStruct(cache_shape(layout, slots, max_len), layout.kv_dtype)
    return KVCache((sds,) * layout.n_layers, (sds,) * layout.n_layers)


def take_rows(present: Any, start: Any, count: int) -> Any:
    """Rows [start_b, start_b + count) of ``present`` (B, H, T, D) for each batch entry b -> (B, H, count, D)."""
    def one(p: Any, s: Any) -> Any:
        return lax.dynamic_slice_in_dim(p, s, count, axis=1)

    return jax.vmap(one)(present, jnp.asarray(start, jnp.int32))


def insert_rows(layer: Any, rows: Any, slot: Any, start: Any = 0) -> Any:
    """``layer`` (S, H, L, D) with ``rows`` (1, H, n, D) written into slot ``slot`` from row ``start`` (a prefill)."""
    zero = jnp.zeros((), jnp.int32)
    index = (jnp.asarray(slot, jnp.int32), zero, jnp.asarray(start, jnp.int32), zero)
    return lax.dynamic_update_slice(layer, rows.astype(layer.dtype), index)


def append_rows(layer: Any, rows: Any, starts: Any) -> Any:
    """``layer`` (S, H, L, D) with ``rows[s]`` (H, n, D) written into every slot s at row ``starts[s]`` (a decode step).

    One ``dynamic_update_slice`` per slot, batched by vmap (XLA makes it one scatter into the donated buffer).
    """
    def one(slot_layer: Any, new: Any, start: Any) -> Any:
        zero = jnp.zeros((), jnp.int32)
        return lax.dynamic_update_slice(slot_layer, new, (zero, start, zero))

    return jax.vmap(one)(layer, rows.astype(layer.dtype), jnp.asarray(starts, jnp.int32))
