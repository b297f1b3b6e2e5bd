"""``Stream``: one request's tokens as they come, readable from threads (iteration, ``result``) and asyncio.

The engine thread is the only writer (``_emit``, ``_finish``); readers wait on a condition, and asyncio
readers get each event through ``loop.call_soon_threadsafe`` into their own queue.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

_DONE = object()


class Stream:
    """One request's tokens as they come. Thread-safe; produced by ``Engine.submit``.

    Example:
        >>> stream = engine.submit([1, 2, 3], SamplingParams(max_new_tokens=8))   # doctest: +SKIP
        >>> for token in stream: ...                                              # doctest: +SKIP
        >>> async for token in stream: ...                                        # doctest: +SKIP
    """

    def __init__(self, prompt_len: int):
        self.prompt_len = prompt_len
        self.finish_reason: str | None = None  # "stop" | "length" | "error" | "cancelled" | None while running
        self.ttft_s: float | None = None
        self.token_times: list[float] = []
        self.submitted_at = time.monotonic()
        self._tokens: list[int] = []
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._listeners: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = []
        self._cancelled = False

    def cancel(self) -> None:
        """Stop this request: the engine frees its slot (or drops it from the queue) before its next step.

        The stream then finishes with ``finish_reason == "cancelled"``, keeping the tokens it had.
        """
        with self._cond:
            self._cancelled = True

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # ------------------------------------------------------------ writer side
    def _emit(self, token: int) -> None:
        now = time.monotonic()
        with self._cond:
            if self.ttft_s is None:
                self.ttft_s = now - self.submitted_at
            self._tokens.append(token)
            self.token_times.append(now)
            listeners = list(self._listeners)
            self._cond.notify_all()
        for loop, queue in listeners:
            _post(loop, queue, token)

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
        with self._cond:
            if self.finish_reason is not None:
                return
            self.finish_reason, self._error = reason, error
            listeners = list(self._listeners)
            self._cond.notify_all()
        for loop, queue in listeners:
            _post(loop, queue, _DONE)

    # ------------------------------------------------------------ reader side
    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def tokens(self) -> list[int]:
        """The ids emitted so far (a copy)."""
        with self._cond:
            return list(self._tokens)

    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            with self._cond:
                self._cond.wait_for(lambda: len(self._tokens) > i or self.finish_reason is not None)
                if len(self._tokens) > i:
                    token = self._tokens[i]
                elif self._error is not None:
                    raise self._error
                else:
                    return
            i += 1
            yield token

    def __aiter__(self) -> AsyncIterator[int]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[int]:
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        with self._cond:
            for token in self._tokens:
                queue.put_nowait(token)
            if self.finish_reason is not None:
                queue.put_nowait(_DONE)
            else:
                self._listeners.append((loop, queue))
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    if self._error is not None:
                        raise self._error
                    return
                yield item
        finally:
            with self._cond:
                if (loop, queue) in self._listeners:
                    self._listeners.remove((loop, queue))

    def result(self, timeout: float | None = None) -> list[int]:
        """All new ids once the request is done; raises the request's error, or TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.finish_reason is not None, timeout):
                raise TimeoutError(f"request not finished after {timeout} s ({len(self._tokens)} tokens so far)")
            if self._error is not None:
                raise self._error
            return list(self._tokens)

    def __repr__(self) -> str:
        return f"Stream(tokens={len(self._tokens)}, finish_reason={self.finish_reason!r})"


def _post(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, item: Any) -> None:
    try:
        loop.call_soon_threadsafe(queue.put_nowait, item)
    except RuntimeError:  # the reader's loop is closed: nobody is listening any more
        pass
