"""``generate`` and ``generate_stream``: the one-call Python API over Decoder + Engine.

Both take a Model, a model path, a Decoder or a running Engine. What they build (a Decoder for a
Model/path, an Engine for a Model/path/Decoder) they also close; a given Engine, or an Engine the caller
started over a given Decoder, is used and left running. An Engine that generate calls started over a Decoder
is shared by the calls running at the same time (threads) and closed by the last of them.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import InputError
from ..model import Model
from .decoder import MIN_BUCKET, Decoder
from .engine import Engine, _token_list
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
    first = prompt_ids[0]
    return isinstance(first, np.ndarray) or (isinstance(first, Sequence) and not isinstance(first, (str, bytes)))


def _prompt_lists(prompts: Sequence[Any]) -> list[list[int]]:
    """Each prompt as a list of ints (:class:`InputError` naming the first bad prompt)."""
    out = []
    for i, prompt in enumerate(prompts):
        try:
            out.append(_token_list(prompt))
        except InputError as e:
            raise InputError(f"prompt {i}: {e}" if len(prompts) > 1 else str(e)) from None
    return out


def _stop_ids(stop_ids: Any) -> Any:
    """A tuple when ``stop_ids`` is a collection; anything else is left for SamplingParams to report."""
    if isinstance(stop_ids, (list, tuple, set, frozenset, range, np.ndarray)):
        return tuple(stop_ids)
    return stop_ids


def _checked(params: SamplingParams) -> SamplingParams:
    """``params``, or :class:`InputError` before anything is built for a request that cannot run anywhere."""
    problems = params.problems()
    if problems:
        raise InputError("request rejected: " + "; ".join(problems))
    return params


def _default_max_len(needed: int) -> int:
    """The smallest power of two (at least the smallest bucket) holding ``needed`` tokens."""
    n = MIN_BUCKET
    while n < needed:
        n *= 2
    return n


#: Guards the Engines that generate calls start over a given Decoder (shared, closed by the last user).
_SHARED_LOCK = threading.RLock()


class _Lease:
    """One call's use of an Engine that generate started over a Decoder; the last lease closes it."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._released = False

    def close(self) -> None:
        with _SHARED_LOCK:
            if self._released:
                return
            self._released = True
            self.engine._api_users -= 1
            if self.engine._api_users == 0:
                self.engine.close()  # under the lock, so no other call picks up a closing engine


def _open_decoder(decoder: Decoder) -> tuple[Engine, list[Any]]:
    """The Decoder's running Engine (shared; left running unless a generate call started it) or a new one."""
    with _SHARED_LOCK:
        running = getattr(decoder, "_engine", None)
        if running is not None and not running._closed:  # the decoder's cache has one owner: share its engine
            if running._api_users == 0:  # the user's own engine: never closed here
                return running, []
            running._api_users += 1
            return running, [_Lease(running)]
        engine = Engine(decoder)
        engine._api_users = 1
        return engine, [_Lease(engine)]


def _open(model: ModelLike, prompts: Sequence[Sequence[int]], max_new_tokens: int, slots: int | None,
          max_len: int | None) -> tuple[Engine, list[Any]]:
    """An Engine for ``model`` and the objects this call made (to close afterwards)."""
    if isinstance(model, (Engine, Decoder)):
        _check_geometry(model.decoder if isinstance(model, Engine) else model, slots, max_len)
    if isinstance(model, Engine):
        return model, []
    if isinstance(model, Decoder):
        return _open_decoder(model)
    if not isinstance(model, (Model, str, os.PathLike)):
        raise InputError(f"generate needs a Model, a model path, a Decoder or an Engine, got {type(model).__name__}")
    longest = max((len(p) for p in prompts), default=1)
    decoder = Decoder(model, slots=max(1, min(len(prompts), MAX_DEFAULT_SLOTS)) if slots is None else slots,
                      max_len=_default_max_len(longest + max_new_tokens) if max_len is None else max_len)
    engine = Engine(decoder)
    return engine, [engine]


def _check_geometry(decoder: Decoder, slots: int | None, max_len: int | None) -> None:
    """InputError when ``slots``/``max_len`` ask for another geometry than the given Decoder's: they only
    shape a Decoder that generate builds, and would otherwise be ignored without a word."""
    asked = {"slots": slots, "max_len": max_len}
    differ = {k: v for k, v in asked.items() if v is not None and v != getattr(decoder, k)}
    if differ:
        raise InputError(f"{differ} would set the geometry of a Decoder generate builds; the Decoder given has "
                         f"slots={decoder.slots}, max_len={decoder.max_len} (build another Decoder for another "
                         "geometry)")


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
    prompts = _prompt_lists(list(prompt_ids) if batch else [prompt_ids])
    if not prompts:
        raise InputError("prompt_ids is an empty list; expected one prompt (list of ids) or a list of prompts")
    params = _checked(SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                     top_p=top_p, seed=seed, stop_ids=_stop_ids(stop_ids)))
    engine, made = _open(model, prompts, max_new_tokens, slots, max_len)
    streams: list[Stream] = []
    try:
        streams.extend(engine.submit(p, params) for p in prompts)
        results = [s.result() for s in streams]
    finally:
        for s in streams:  # after an error or an interrupt, the others stop too (a given engine keeps running)
            if not s.done:
                s.cancel()
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
    stop_ids = _stop_ids(kw.pop("stop_ids", ()))
    params = _checked(SamplingParams(max_new_tokens=max_new_tokens, stop_ids=stop_ids, **kw))
    if _is_batch(prompt_ids):
        raise InputError("generate_stream takes one prompt (a flat list of ids); use generate for many")
    prompt = _prompt_lists([prompt_ids])[0]
    engine, made = _open(model, [prompt], max_new_tokens, geometry.get("slots"), geometry.get("max_len"))
    try:
        stream = engine.submit(prompt, params)
    except BaseException:
        _close(made)
        raise
    return _TokenIterator(stream, made)


class _TokenIterator(Iterator[int]):
    """The ids of one stream; when it ends, is closed or is dropped (even unstarted), the request is
    cancelled if still running and what the call built is closed, so nothing decodes for nobody."""

    def __init__(self, stream: Stream, made: list[Any]):
        self.stream = stream
        self._tokens = iter(stream)
        self._made: list[Any] | None = made

    def __iter__(self) -> _TokenIterator:
        return self

    def __next__(self) -> int:
        try:
            return next(self._tokens)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the request (its slot is freed before the engine's next step) and close what was built for it."""
        made, self._made = self._made, None
        if made is None:
            return
        if not self.stream.done:
            self.stream.cancel()
        _close(made)

    def __del__(self) -> None:
        self.close()
