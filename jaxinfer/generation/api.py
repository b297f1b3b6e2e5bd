"""``generate`` and ``generate_stream``: the one-call Python API over Decoder + Engine.

Both take a Model, a model path, a Decoder or a running Engine. What they build (a Decoder for a
Model/path, an Engine for a Model/path/Decoder) they also close; a given Engine, or the Engine already
running over a given Decoder, is used and left running.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..model import Model
from .decoder import MIN_BUCKET, Decoder
from .engine import Engine
from .sampling import SamplingParams
from .stream import Stream

#: Default slot count when generate() builds the Decoder itself.
MAX_DEFAULT_SLOTS = 8

ModelLike = Any  # Model | str | os.PathLike | Decoder | Engine


def _is_batch(prompt_ids: Any) -> bool:
    """True for a list of prompts, False for one prompt (a flat list of ids)."""
    if isinstance(prompt_ids, np.ndarray):
        return prompt_ids.ndim == 2
    if isinstance(prompt_ids, (str, bytes)) or not isinstance(prompt_ids, Sequence) or len(prompt_ids) == 0:
        return False
    return not isinstance(prompt_ids[0], (int, np.integer))


def _default_max_len(needed: int) -> int:
    """The smallest power of two (at least the smallest bucket) holding ``needed`` tokens."""
    n = MIN_BUCKET
    while n < needed:
        n *= 2
    return n


def _open(model: ModelLike, prompts: Sequence[Sequence[int]], max_new_tokens: int, slots: int | None,
          max_len: int | None) -> tuple[Engine, list[Any]]:
    """An Engine for ``model`` and the objects this call made (to close afterwards)."""
    if isinstance(model, Engine):
        return model, []
    if isinstance(model, Decoder):
        running = getattr(model, "_engine", None)
        if running is not None and not running._closed:  # the decoder's cache has one owner: share its engine
            return running, []
        engine = Engine(model)
        return engine, [engine]
    if not isinstance(model, (Model, str, os.PathLike)):
        raise InputError(f"generate needs a Model, a model path, a Decoder or an Engine, got {type(model).__name__}")
    longest = max((len(p) for p in prompts), default=1)
    decoder = Decoder(model, slots=slots or max(1, min(len(prompts), MAX_DEFAULT_SLOTS)),
                      max_len=max_len or _default_max_len(longest + max(1, int(max_new_tokens))))
    engine = Engine(decoder)
    return engine, [engine]


def _close(made: list[Any]) -> None:
    for obj in reversed(made):
        obj.close()


def generate(model: ModelLike, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int = 64, *,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_ids: Sequence[int] = (), slots: int | None = None,
             max_len: int | None = None) -> list[int] | list[list[int]]:
    """Generate new token ids after one prompt, or after each of many prompts decoded together.

    Args:
        model: a Model, a model path, a Decoder, or an Engine (which is used and left running).
        prompt_ids: one list of ids (returns the new ids) or a list of such lists (returns one list each).
        max_new_tokens: the most ids generated per prompt.
        temperature, top_k, top_p, seed: sampling (temperature 0 = greedy). Every prompt gets ``seed``,
            so a prompt's tokens do not depend on the other prompts in the call.
        stop_ids: ids that end a prompt's generation (the stop id is included in its result).
        slots, max_len: the Decoder's geometry when one is built here (default: min(prompts, 8) slots;
            max_len the smallest power of two >= longest prompt + max_new_tokens).

    Example:
        >>> jaxinfer.generate("gpt2_tiny.onnx", [1, 2, 3], max_new_tokens=8)       # doctest: +SKIP
        [81, 256, 120, 411, 20, 264, 266, 139]
    """
    batch = _is_batch(prompt_ids)
    prompts = [list(p) for p in prompt_ids] if batch else [prompt_ids]  # type: ignore[list-item]
    if not prompts:
        raise InputError("prompt_ids is an empty list; expected one prompt (list of ids) or a list of prompts")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop_ids=tuple(int(t) for t in stop_ids))
    engine, made = _open(model, prompts, max_new_tokens, slots, max_len)
    try:
        streams: list[Stream] = [engine.submit(p, params) for p in prompts]
        results = [s.result() for s in streams]
    finally:
        _close(made)
    return results if batch else results[0]


def generate_stream(model: ModelLike, prompt_ids: Sequence[int], max_new_tokens: int = 64,
                    **kw: Any) -> Iterator[int]:
    """Yield new ids for one prompt as they are generated (keywords as :func:`generate`).

    The request is validated and queued before this returns, so bad input raises here, not at the first
    ``next``. What was built for the call is closed when the iterator ends or is dropped.

    Example:
        >>> for token in jaxinfer.generate_stream("gpt2_tiny.onnx", [1, 2, 3], 8): print(token)   # doctest: +SKIP
    """
    geometry = {k: kw.pop(k) for k in ("slots", "max_len") if k in kw}
    stop_ids = tuple(int(t) for t in kw.pop("stop_ids", ()))
    params = SamplingParams(max_new_tokens=max_new_tokens, stop_ids=stop_ids, **kw)
    if _is_batch(prompt_ids):
        raise InputError("generate_stream takes one prompt (a flat list of ids); use generate for many")
    engine, made = _open(model, [prompt_ids], max_new_tokens, geometry.get("slots") or 1, geometry.get("max_len"))
    try:
        stream = engine.submit(prompt_ids, params)
    except BaseException:
        _close(made)
        raise
    return _drain(stream, made)


def _drain(stream: Stream, made: list[Any]) -> Iterator[int]:
    try:
        yield from stream
    finally:
        _close(made)
