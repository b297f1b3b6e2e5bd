"""Token sampling on device: greedy, temperature, top-k, top-p, with one PRNG stream per request.

Every argument is per row (one row per slot), so one jitted step samples all slots with their own settings.
A row's key is its request's seed folded with the index of the token being drawn, so a request's tokens
depend only on its own seed and logits, never on which other requests share the step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..checks import is_int, is_real


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded.

    Example:
        >>> SamplingParams(max_new_tokens=32, temperature=0.8, top_p=0.9, seed=7, stop_ids=(0,))
        SamplingParams(max_new_tokens=32, temperature=0.8, top_k=0, top_p=0.9, seed=7, stop_ids=(0,))
    """

    max_new_tokens: int = 64
    temperature: float = 0.0        # 0 -> greedy (argmax)
    top_k: int = 0                  # 0 -> off
    top_p: float = 1.0              # 1 -> off
    seed: int = 0                   # per request; same seed + same prompt -> same tokens
    stop_ids: tuple[int, ...] = ()  # generation ends after emitting one of these (it is included)

    def problems(self) -> list[str]:
        """What is out of range, as sentences (empty when valid)."""
        out = []
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            out.append(f"max_new_tokens must be an int >= 1, got {self.max_new_tokens!r}")
        if not is_real(self.temperature) or not np.isfinite(self.temperature) or \
                not 0 <= self.temperature <= _F32_MAX:
            out.append(f"temperature must be a number in [0, {_F32_MAX:.4g}] (0 = greedy; float32 on the device), "
                       f"got {self.temperature!r}")
        if not is_int(self.top_k) or not 0 <= self.top_k < 2**31:
            out.append(f"top_k must be an int in [0, 2**31) (0 = off; int32 on the device), got {self.top_k!r}")
        if not is_real(self.top_p) or not (0.0 < self.top_p <= 1.0):
            out.append(f"top_p must be a number in (0, 1] (1 = off), got {self.top_p!r}")
        if not is_int(self.seed) or not (0 <= self.seed < 2**63):
            out.append(f"seed must be an int in [0, 2**63), got {self.seed!r}")
        out.extend(_stop_ids_problems(self.stop_ids))
        return out


def _stop_ids_problems(stop_ids: Any) -> list[str]:
    """Why ``stop_ids`` is not a collection of token ids (ints >= 0), as sentences (empty when it is)."""
    if isinstance(stop_ids, (str, bytes)) or not (hasattr(stop_ids, "__len__") and hasattr(stop_ids, "__iter__")):
        return [f"stop_ids must be a tuple or list of token ids (ints >= 0), got {type(stop_ids).__name__} "
                f"{stop_ids!r}"]
    bad = [t for t in stop_ids if not is_int(t) or t < 0]
    if bad:
        return [f"stop_ids must be token ids (ints >= 0), got {len(bad)} other value(s), e.g. {bad[:5]}"]
    return []


#: The largest float32: a temperature above it would reach the device as inf.
_F32_MAX = float(np.finfo(np.float32).max)


def request_key(seed: int) -> np.ndarray:
    """The raw uint32[2] key of a request's seed (host side; a row of the per-slot key array)."""
    return np.asarray(jax.random.key_data(jax.random.key(seed, impl="threefry2x32")), np.uint32)


def sample(logits: Any, temperature: Any, top_k: Any, top_p: Any, keys: Any, counts: Any) -> Any:
    """One token per row: logits (B, V); temperature/top_p float (B,); top_k, counts int (B,); keys uint32 (B, 2).

    Rows with temperature 0 take the argmax. Others sort softmax(logits / T), keep the first top_k tokens
    (0: all) and of those the smallest prefix whose mass reaches top_p (the best token always stays),
    and invert the kept tokens' CDF at one uniform draw from ``fold_in(keys[b], counts[b])`` (counts = tokens
    already drawn). One uniform per row keeps the PRNG work, and its compile time, independent of the vocab.
    """
    logits = logits.astype(jnp.float32)
    vocab = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature.astype(jnp.float32), jnp.float32(1e-6))[:, None]
    order = jnp.argsort(-scaled, axis=-1, stable=True)
    desc = jnp.take_along_axis(scaled, order, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab).astype(jnp.int32)[:, None]
    keep = rank < k
    probs = jax.nn.softmax(jnp.where(keep, desc, -jnp.inf), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)  # the kept set is a prefix of the sorted order, so its CDF is a prefix of this
    keep = keep & ((cdf - probs < top_p.astype(jnp.float32)[:, None]) | (rank == 0))
    n_kept = jnp.sum(keep, axis=-1)
    mass = jnp.take_along_axis(cdf, (n_kept - 1)[:, None], axis=-1)

    def uniform(key: Any, n: Any) -> Any:
        return jax.random.uniform(jax.random.fold_in(jax.random.wrap_key_data(key, impl="threefry2x32"), n))

    u = jax.vmap(uniform)(keys, counts.astype(jnp.int32))
    pick = jnp.sum(cdf <= u[:, None] * mass, axis=-1)  # the first rank whose CDF exceeds u * kept mass
    pick = jnp.minimum(pick, n_kept - 1)
    drawn = jnp.take_along_axis(order, pick[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)
