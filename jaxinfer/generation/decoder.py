"""``Decoder``: an imported decoder graph as two compiled functions over a fixed-shape KV cache.

prefill(bucket): one prompt, right-padded to its bucket, run with an empty past; its K/V rows go into one
slot's cache row and the first new token is sampled at its last real position.
decode: every slot at once, one token each. The graph sees the whole cache row as its past and an
attention_mask whose past part marks only the slot's valid rows, so stale or padded rows contribute exactly
nothing; the step's new K/V rows are cut from ``present`` and written at each slot's length.
Both are built from the Model's pure ``fn``, jitted once per shape with the cache donated, and sample on
device so only the token ids come back to the host.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ..checks import is_int
from ..errors import InputError, OutOfMemoryError
from ..model import Model
from ..tracer import is_out_of_memory, memory_limit
from . import cache as kv
from .layout import DecoderLayout, recognise_layout
from .sampling import SamplingParams, request_key, sample

#: The smallest default prefill bucket (prompts shorter than this are padded up to it).
MIN_BUCKET = 16

#: Executables per Model, shared by every Decoder over it with the same geometry, so that repeated
#: ``generate(model, ...)`` calls (each building a Decoder) compile once.
_EXECUTABLES: weakref.WeakKeyDictionary[Model, dict[tuple, Any]] = weakref.WeakKeyDictionary()
_EXECUTABLES_LOCK = threading.Lock()


class SlotSampling(NamedTuple):
    """Per-slot sampling settings of one step: temperature, top_k, top_p, raw keys (S, 2), tokens drawn so far."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    keys: np.ndarray
    counts: np.ndarray

    @staticmethod
    def empty(slots: int) -> SlotSampling:
        return SlotSampling(np.zeros(slots, np.float32), np.zeros(slots, np.int32), np.ones(slots, np.float32),
                            np.zeros((slots, 2), np.uint32), np.zeros(slots, np.int32))

    @staticmethod
    def of(params: SamplingParams, count: int = 0) -> SlotSampling:
        """One row for one request."""
        return SlotSampling(np.asarray([params.temperature], np.float32), np.asarray([params.top_k], np.int32),
                            np.asarray([params.top_p], np.float32), request_key(params.seed)[None],
                            np.asarray([count], np.int32))

    def set_row(self, slot: int, params: SamplingParams, count: int) -> None:
        self.temperature[slot] = params.temperature
        self.top_k[slot] = params.top_k
        self.top_p[slot] = params.top_p
        self.keys[slot] = request_key(params.seed)
        self.counts[slot] = count


def default_buckets(max_len: int) -> tuple[int, ...]:
    """Powers of two from 16 up to ``max_len`` (``max_len`` itself closes the list)."""
    out, b = [], MIN_BUCKET
    while b < max_len:
        out.append(b)
        b *= 2
    out.append(max_len)
    return tuple(out)


def graph_feeds(layout: DecoderLayout, dtypes: dict[str, Any], ids: Any, mask: Any, positions: Any,
                past_k: Sequence[Any], past_v: Sequence[Any]) -> dict[str, Any]:
    """The decoder graph's inputs, each cast to the dtype its signature declares (int64 when it declares none)."""
    def cast(name: str, value: Any) -> Any:
        return value.astype(dtypes.get(name) or jnp.int64)

    feeds = {layout.input_ids: cast(layout.input_ids, ids)}
    if layout.attention_mask is not None:
        feeds[layout.attention_mask] = cast(layout.attention_mask, mask)
    if layout.position_ids is not None:
        feeds[layout.position_ids] = cast(layout.position_ids, positions)
    feeds.update(zip(layout.past_keys, past_k))
    feeds.update(zip(layout.past_values, past_v))
    return feeds


def _as_model(model: Model | str | os.PathLike) -> Model:
    if isinstance(model, Model):
        return model
    if isinstance(model, (str, os.PathLike)):
        from ..loading import load

        loaded = load(model)
        if not isinstance(loaded, Model):
            raise InputError(f"{model!s} did not load as one Model (got {type(loaded).__name__}); a Decoder needs "
                             "a single decoder graph")
        return loaded
    raise InputError(f"Decoder needs a Model or a model path, got {type(model).__name__}")


class Decoder:
    """An imported decoder (ONNX with past KV) as two compiled functions over a fixed-shape KV cache.

    Example:
        >>> dec = Decoder("gpt2_tiny.onnx", slots=4, max_len=128)      # doctest: +SKIP
        >>> dec.warmup()                                                # doctest: +SKIP
        >>> jaxinfer.generate(dec, [[1, 2, 3], [4, 5]], max_new_tokens=8)  # doctest: +SKIP
    """

    def __init__(self, model: Model | str | os.PathLike, *, slots: int = 8, max_len: int = 256,
                 prefill_buckets: Sequence[int] | None = None, layout: DecoderLayout | None = None):
        self.model = _as_model(model)
        if not is_int(slots) or not is_int(max_len) or slots < 1 or max_len < 2:
            raise InputError(f"Decoder: slots must be an int >= 1 and max_len an int >= 2, got slots={slots!r}, "
                             f"max_len={max_len!r}")
        self.layout = layout if layout is not None else recognise_layout(self.model)
        self.layout.check(self.model)
        if self.layout.kv_write == "append" and (self.layout.attention_mask is None or
                                                  self.layout.position_ids is None):
            raise InputError(
                "this decoder appends new K/V after its whole past, so it needs an attention_mask input (to mask "
                "the cache rows a slot has not filled) and a position_ids input (positions are not the past's "
                f"length here); the layout has attention_mask={self.layout.attention_mask!r}, "
                f"position_ids={self.layout.position_ids!r}")
        traced = sorted(set(self.model.value_inputs) & set(self.layout.input_names()))
        if traced:
            raise InputError(f"decoder inputs {traced} are read on the host at trace time (they set shapes), so "
                             "they cannot change inside a compiled decode step; re-export the decoder so that "
                             "they are data")
        self.slots, self.max_len = int(slots), int(max_len)
        buckets = default_buckets(self.max_len) if prefill_buckets is None else tuple(sorted(set(prefill_buckets)))
        bad = [b for b in buckets if not (is_int(b) and 1 <= b <= self.max_len)]
        if not buckets or bad:
            raise InputError(f"prefill_buckets must be ints in [1, max_len={self.max_len}], got {list(buckets)}")
        self.prefill_buckets: tuple[int, ...] = tuple(int(b) for b in buckets)
        self._dtypes = {s.name: s.dtype for s in self.model.inputs}
        self.vocab_size = self._vocab_size()
        self.stats: dict[str, Any] = {"prefill_compiles": 0, "decode_compiles": 0, "compile_seconds": 0.0,
                                      "prefills": 0, "decode_steps": 0, "compiles_at_warmup": 0}
        with _EXECUTABLES_LOCK:
            self._exes: dict[tuple, Any] = _EXECUTABLES.setdefault(self.model, {})
        self.cache = self._allocate()

    # ------------------------------------------------------------ geometry
    def _allocate(self) -> kv.KVCache:
        """A zeroed cache; :class:`OutOfMemoryError` naming the geometry when it cannot exist here."""
        lay = self.layout
        nbytes = 2 * lay.n_layers * int(np.prod(kv.cache_shape(lay, self.slots, self.max_len))) * lay.kv_dtype.itemsize
        why = (f"the KV cache of slots={self.slots} x max_len={self.max_len} ({lay.n_layers} layers, kv_heads="
               f"{lay.kv_heads}, head_dim={lay.head_dim}, {lay.kv_dtype.name}) needs {nbytes} bytes")
        limit = memory_limit()
        if limit is not None and nbytes > limit[0]:
            raise OutOfMemoryError(f"{why}, more than this machine can hold ({limit[0]} bytes, {limit[1]}); use "
                                   "fewer slots or a smaller max_len")
        try:
            return kv.allocate(lay, self.slots, self.max_len)
        except jax.errors.JaxRuntimeError as e:
            if is_out_of_memory(e):
                raise OutOfMemoryError(f"{why}, more than the device has: {str(e).strip().splitlines()[0]}; use "
                                       "fewer slots or a smaller max_len") from e
            raise

    def _vocab_size(self) -> int:
        """The logits' last dim: from the signature, else from an abstract one-token prefill (no compile)."""
        sig = next(s for s in self.model.outputs if s.name == self.layout.logits)
        last = sig.shape[-1] if sig.shape else None
        if isinstance(last, int) and last > 0:
            return last
        lay = self.layout
        one = jnp.ones((1, 1), jnp.int32)
        empty = jnp.zeros((1, lay.kv_heads, 0, lay.head_dim), lay.kv_dtype)
        past = [empty] * lay.n_layers
        feeds = graph_feeds(lay, self._dtypes, one, one, one - 1, past, past)
        logits = jax.eval_shape(lambda p: self.model.fn(p, feeds)[lay.logits], self.model.params)
        return int(logits.shape[-1])

    @property
    def compiles(self) -> int:
        """Executables built so far (prefill buckets + decode)."""
        return int(self.stats["prefill_compiles"] + self.stats["decode_compiles"])

    def bucket_for(self, n: int) -> int:
        """The smallest prefill bucket holding ``n`` tokens (raises :class:`InputError` past the largest)."""
        for b in self.prefill_buckets:
            if n <= b:
                return b
        raise InputError(f"prompt of {n} tokens is longer than the largest prefill bucket "
                         f"({self.prefill_buckets[-1]}); buckets are {list(self.prefill_buckets)}")

    def request_problems(self, prompt_ids: Sequence[int], params: SamplingParams) -> list[str]:
        """Why this request cannot run here, as sentences (empty when it can)."""
        invalid = params.problems()
        out = list(invalid)
        n = len(prompt_ids)
        if n == 0:
            out.append("prompt_ids is empty; expected at least one token id")
            return out
        bad = [t for t in prompt_ids if not isinstance(t, (int, np.integer)) or not (0 <= t < self.vocab_size)]
        if bad:
            out.append(f"prompt_ids holds {len(bad)} id(s) outside [0, vocab_size={self.vocab_size}) or not ints, "
                       f"e.g. {bad[:5]}")
        stop = [] if invalid else [t for t in params.stop_ids if t >= self.vocab_size]
        if stop:
            out.append(f"stop_ids {stop[:5]} are outside [0, vocab_size={self.vocab_size}): they could never stop "
                       "a request")
        if n > self.prefill_buckets[-1]:
            out.append(f"prompt of {n} tokens is longer than the largest prefill bucket {self.prefill_buckets[-1]}")
        if isinstance(params.max_new_tokens, (int, np.integer)) and n + params.max_new_tokens > self.max_len:
            out.append(f"prompt ({n} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                       f"{n + params.max_new_tokens} exceeds max_len={self.max_len}")
        return out

    # ------------------------------------------------------- graph feeding
    def _prefill_fn(self, bucket: int) -> Callable[..., Any]:
        lay, fn, dtypes = self.layout, self.model.fn, self._dtypes

        def prefill(params: Any, cache: kv.KVCache, ids: Any, n_real: Any, slot: Any,
                    samp: SlotSampling) -> tuple[Any, kv.KVCache]:
            real = jnp.arange(bucket, dtype=jnp.int32)[None, :] < n_real
            empty = jnp.zeros((1, lay.kv_heads, 0, lay.head_dim), lay.kv_dtype)
            past = [empty] * lay.n_layers
            outs = fn(params, graph_feeds(lay, dtypes, ids, real, jnp.arange(bucket)[None, :], past, past))
            last = lax.dynamic_index_in_dim(outs[lay.logits], n_real - 1, axis=1, keepdims=False)  # (1, V)
            keys = tuple(kv.insert_rows(c, outs[n][:, :, :bucket], slot)
                         for c, n in zip(cache.keys, lay.present_keys))
            values = tuple(kv.insert_rows(c, outs[n][:, :, :bucket], slot)
                           for c, n in zip(cache.values, lay.present_values))
            return sample(last, *samp), kv.KVCache(keys, values)

        return prefill

    def _decode_fn(self) -> Callable[..., Any]:
        lay, fn, max_len, dtypes = self.layout, self.model.fn, self.max_len, self._dtypes

        def decode(params: Any, cache: kv.KVCache, tokens: Any, lens: Any,
                   samp: SlotSampling) -> tuple[Any, kv.KVCache]:
            lens = jnp.asarray(lens, jnp.int32)
            valid = jnp.arange(max_len, dtype=jnp.int32)[None, :] < lens[:, None]
            mask = jnp.concatenate([valid, jnp.ones((lens.shape[0], 1), bool)], axis=1)
            outs = fn(params, graph_feeds(lay, dtypes, tokens[:, None], mask, lens[:, None], cache.keys, cache.values))
            start = jnp.full_like(lens, max_len) if lay.kv_write == "append" else lens

            def updated(layers: Sequence[Any], names: Sequence[str]) -> tuple[Any, ...]:
                return tuple(kv.append_rows(c, kv.take_rows(outs[n], start, 1), lens) for c, n in zip(layers, names))

            new = kv.KVCache(updated(cache.keys, lay.present_keys), updated(cache.values, lay.present_values))
            return sample(outs[lay.logits][:, -1], *samp), new

        return decode

    def _prefill_abstract_args(self, bucket: int) -> tuple:
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        samp = SlotSampling(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in SlotSampling.empty(1)))
        return (jax.ShapeDtypeStruct((1, bucket), jnp.int32), i32, i32, samp)

    def _decode_abstract_args(self) -> tuple:
        s = self.slots
        vec = jax.ShapeDtypeStruct((s,), jnp.int32)
        samp = SlotSampling(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in SlotSampling.empty(s)))
        return (vec, vec, samp)

    # ---------------------------------------------------------- compiling
    def _compiled(self, kind: tuple) -> Any:
        key = (*kind, self.slots, self.max_len, self.layout)
        exe = self._exes.get(key)
        if exe is not None:
            return exe
        start = time.perf_counter()
        abstract_cache = kv.abstract(self.layout, self.slots, self.max_len)
        if key[0] == "prefill":
            fn, args, counter = self._prefill_fn(key[1]), self._prefill_abstract_args(key[1]), "prefill_compiles"
        else:
            fn, args, counter = self._decode_fn(), self._decode_abstract_args(), "decode_compiles"
        # the model's options and its few-row rule (a decode step is few rows through every weight)
        lowered = jax.jit(fn, donate_argnums=(1,)).lower(self.model.params, abstract_cache, *args)
        exe = self.model.compile_lowered(lowered)
        self._exes[key] = exe
        self.stats[counter] += 1
        self.stats["compile_seconds"] += time.perf_counter() - start
        return exe

    def warmup(self) -> None:
        """Compile every prefill bucket and the decode step (nothing runs; the cache is untouched)."""
        for b in self.prefill_buckets:
            self._compiled(("prefill", b))
        self._compiled(("decode",))
        self.stats["compiles_at_warmup"] = self.compiles

    # ------------------------------------------------------------ running
    def reset(self) -> None:
        """A fresh zeroed cache (after a failed call may have consumed the donated one)."""
        self.cache = self._allocate()

    def prefill(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams) -> int:
        """Run ``prompt_ids`` into ``slot``'s cache row; returns the first new token (sampled with ``params``)."""
        n = len(prompt_ids)
        if not is_int(slot) or not 0 <= slot < self.slots:
            raise InputError(f"slot must be an int in [0, slots={self.slots}), got {slot!r}")
        bad = [t for t in prompt_ids if not is_int(t) or not 0 <= t < self.vocab_size]
        if n == 0 or bad:
            raise InputError(f"prompt_ids must be 1 or more token ids in [0, vocab_size={self.vocab_size}), got "
                             f"{n} ids" + (f", e.g. bad {bad[:5]}" if bad else ""))
        bucket = self.bucket_for(n)
        exe = self._compiled(("prefill", bucket))
        ids = np.zeros((1, bucket), np.int32)
        ids[0, :n] = prompt_ids
        token, self.cache = exe(self.model.params, self.cache, ids, np.int32(n), np.int32(slot),
                                SlotSampling.of(params))
        self.stats["prefills"] += 1
        return int(np.asarray(token)[0])

    def decode(self, tokens: np.ndarray, lens: np.ndarray, sampling: SlotSampling) -> np.ndarray:
        """One step for every slot: ``tokens[s]`` sits at position ``lens[s]``; returns the next token per slot."""
        exe = self._compiled(("decode",))
        out, self.cache = exe(self.model.params, self.cache, np.asarray(tokens, np.int32),
                              np.asarray(lens, np.int32), sampling)
        self.stats["decode_steps"] += 1
        return np.asarray(out)

    def cache_deleted(self) -> bool:
        """True when a failed call consumed the donated cache (call :meth:`reset`)."""
        return any(getattr(a, "is_deleted", lambda: False)() for a in (*self.cache.keys, *self.cache.values))

    def __repr__(self) -> str:
        lay = self.layout
        return (f"Decoder({self.model.source or self.model.graph.name!r}, layers={lay.n_layers}, "
                f"kv_heads={lay.kv_heads}, head_dim={lay.head_dim}, slots={self.slots}, max_len={self.max_len}, "
                f"buckets={list(self.prefill_buckets)})")
