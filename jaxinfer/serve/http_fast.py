"""Infer requests answered straight from uvicorn's HTTP parser callbacks, without the ASGI round trip.

On a small model the HTTP layer is most of a request's CPU: per request, uvicorn's ASGI cycle starts
a task, wakes it through an ``asyncio.Event`` for the body, validates every response header with a
regex and writes the head and the body as two socket writes. :class:`InferProtocol` is uvicorn's
``httptools`` protocol with one change: a ``POST .../infer`` that arrives on an idle connection is
decoded and queued from ``on_message_complete``, and its answer is written in one ``transport.write``
from the batcher's completion (a loop callback, no coroutine). Everything else, including an infer
request pipelined behind another on the same connection, goes through ASGI as before, and the answers
are the same: both paths call :func:`~jaxinfer.serve.app.begin_infer` and
:func:`~jaxinfer.serve.app.finish_infer`. Bytes that are not HTTP/1.1 at all get uvicorn's 400 with a
``{"error": ...}`` body instead of its plain text.

Bodies with much JSON or many binary bytes (:func:`~jaxinfer.serve.app.worth_offloading`) and JSON replies
above ``OFFLOAD_BYTES`` take the coroutine path (:func:`~jaxinfer.serve.app.answer`), which decodes and
encodes them in a worker thread. The subclass leans on uvicorn's protocol internals
(``cycle``, ``pipeline``, ``on_response_complete``); :func:`supported` checks that they are there, and
the server falls back to plain uvicorn where they are not.
"""

from __future__ import annotations

import asyncio
import http
import json
import urllib.parse
from concurrent.futures import Future
from typing import Any

from .app import (
    _INFER_PATH,
    worth_offloading,
    ClientGone,
    InferCall,
    ServerState,
    answer,
    begin_infer,
    big_reply,
    check_declared_length,
    chosen_outputs,
    decode_body,
    failure_reply,
    finish_infer,
    timed_out,
)
from .protocol import ProtocolError

try:
    import httptools
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover  (httptools is a dependency; plain uvicorn serves without it)
    httptools = None
    HttpToolsProtocol = object  # type: ignore[assignment,misc]

_STATUS = {s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in http.HTTPStatus}

#: What :class:`InferProtocol` uses of uvicorn's protocol; checked by :func:`supported`.
_NEEDED = ("on_headers_complete", "on_body", "on_message_complete", "on_response_complete", "connection_lost",
           "shutdown", "data_received", "send_400_response")


def supported() -> bool:
    """Whether this uvicorn's ``httptools`` protocol has the hooks :class:`InferProtocol` overrides."""
    return httptools is not None and all(callable(getattr(HttpToolsProtocol, n, None)) for n in _NEEDED)


class _NoEvent:
    """Stands in for the cycle's ``asyncio.Event`` (uvicorn sets it when the connection drops)."""

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


class _FastCycle:
    """One infer request on the fast path; quacks like uvicorn's ``RequestResponseCycle`` where uvicorn
    looks at ``self.cycle`` (pipelining, shutdown, connection loss)."""

    def __init__(self, call: InferCall, keep_alive: bool):
        self.call = call
        self.keep_alive = keep_alive
        self.disconnected = False
        self.response_complete = False
        self.body = bytearray()
        self.message_event = _NO_EVENT
        self.timer: asyncio.TimerHandle | None = None
        self.counted = False  # in ServerState.in_progress
        self.task: asyncio.Task | None = None  # a worker-thread step in flight (held: the loop keeps weak refs)
        self.headers: dict[str, str] = {}


class InferProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
    """uvicorn's ``httptools`` protocol, answering infer requests itself (see the module docstring)."""

    jx_state: ServerState  # set on the per-server subclass :func:`protocol_for` makes

    # ------------------------------------------------------------------ parser callbacks
    def on_headers_complete(self) -> None:
        cycle = self._fast_cycle()
        if cycle is None:
            super().on_headers_complete()
            return
        self.cycle = cycle
        try:
            check_declared_length(cycle.headers, self.jx_state.max_body_bytes)
        except ProtocolError as exc:
            cycle.keep_alive = False  # the body that follows is not read
            self._answer(cycle, *failure_reply(self.jx_state, cycle.call, exc))
            return
        if self.expect_100_continue:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        cycle = self.cycle
        if not isinstance(cycle, _FastCycle):
            super().on_body(body)
            return
        if cycle.response_complete:
            return
        cycle.body += body
        if len(cycle.body) > self.jx_state.max_body_bytes:
            cycle.keep_alive = False
            exc = ProtocolError(f"request body exceeds the limit of {self.jx_state.max_body_bytes} bytes", 413)
            self._answer(cycle, *failure_reply(self.jx_state, cycle.call, exc))

    def on_message_complete(self) -> None:
        cycle = self.cycle
        if not isinstance(cycle, _FastCycle):
            super().on_message_complete()
            return
        if cycle.response_complete:
            return
        state, call = self.jx_state, cycle.call
        state.in_progress += 1
        cycle.counted = True
        try:
            body = decode_body(cycle.headers, bytes(cycle.body), state.max_body_bytes)
            if worth_offloading(cycle.headers, body):  # decode it in a worker thread: the coroutine path
                cycle.task = self.loop.create_task(self._answer_later(cycle, body))
                cycle.task.add_done_callback(lambda t: self._after_decode(cycle, t))
                return
            begin_infer(state, call, cycle.headers, body)
        except Exception as exc:  # noqa: BLE001  (every failure answers {"error": ...})
            self._answer(cycle, *failure_reply(state, call, exc))
            return
        if call.wait is not None:
            cycle.timer = self.loop.call_later(call.wait, self._expire, cycle)
        call.future.add_done_callback(lambda _f: self._wake(cycle))  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        if isinstance(cycle, _FastCycle) and not cycle.response_complete:
            if cycle.call.future is not None:
                cycle.call.future.cancel()  # nobody will read the answer: the batcher drops it if still queued
            elif cycle.task is not None:
                cycle.task.cancel()  # still decoding in a worker thread: _after_decode drops it after
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes its parser refused (``msg`` names no detail): the same 400, as
        ``{"error": ...}`` like every other refusal, and the connection closed (its framing is lost)."""
        error = (f"malformed HTTP request ({msg.rstrip('.')}): expected HTTP/1.1, e.g. 'POST "
                 "/v2/models/<model>/infer HTTP/1.1', header lines 'Name: value', and a body of "
                 "Content-Length bytes or valid chunked encoding")
        payload = json.dumps({"error": error}).encode()
        self.transport.write(self._response(400, payload, {"content-type": "application/json"}, keep_alive=False))
        self.transport.close()

    def _response(self, status: int, payload: bytes, headers: dict[str, str], keep_alive: bool) -> bytes:
        """One whole HTTP/1.1 response: status line, uvicorn's default headers, ``headers``, the body."""
        parts = [_STATUS.get(status) or f"HTTP/1.1 {status} \r\n".encode()]
        for name, value in self.server_state.default_headers:
            parts += [name, b": ", value, b"\r\n"]
        for name, value in headers.items():
            parts.append(f"{name}: {value}\r\n".encode("latin-1"))
        parts.append(b"content-length: %d\r\n" % len(payload))
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts += [b"\r\n", payload]
        return b"".join(parts)

    # ------------------------------------------------------------------ the fast path
    def _fast_cycle(self) -> _FastCycle | None:
        """A fast-path cycle for the request whose headers just ended, or None for the ASGI path."""
        if self.parser.get_method() != b"POST" or self.pipeline:
            return None
        if self.cycle is not None and not self.cycle.response_complete:
            return None  # pipelined behind a request still being answered: uvicorn queues it
        if self.parser.should_upgrade():
            return None
        path = httptools.parse_url(self.url).path.decode("latin-1")
        match = _INFER_PATH.fullmatch(path)  # on the encoded path: an encoded '/' stays inside its segment
        if match is None:
            return None
        model, version = (None if g is None else urllib.parse.unquote(g) for g in match.groups())
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        cycle = _FastCycle(InferCall(model, version), keep_alive)
        cycle.headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in self.headers}
        return cycle

    def _wake(self, cycle: _FastCycle) -> None:
        """The batcher's completion thread: hand the result to the event loop."""
        loop = self.loop
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._complete, cycle)
            except RuntimeError:  # the loop closed meanwhile
                pass

    def _complete(self, cycle: _FastCycle) -> None:
        if cycle.response_complete:  # timed out meanwhile
            return
        state, call = self.jx_state, cycle.call
        fut: Future = call.future  # type: ignore[assignment]
        try:
            if fut.cancelled():
                raise ClientGone() if cycle.disconnected else ProtocolError("request was cancelled", 503)
            chosen = chosen_outputs(call, fut.result())
            if big_reply(chosen):  # encode it in a worker thread
                cycle.task = self.loop.create_task(self._encode_later(cycle, chosen))
                return
            reply = finish_infer(state, call, chosen)
        except Exception as exc:  # noqa: BLE001
            reply = failure_reply(state, call, exc)
        self._answer(cycle, *reply)

    def _expire(self, cycle: _FastCycle) -> None:
        # a request the batcher has claimed (a stream's step being stored) or answered cannot be cancelled:
        # its answer is on its way (see app.await_result)
        if not cycle.response_complete and cycle.call.future.cancel():  # type: ignore[union-attr]
            self._answer(cycle, *failure_reply(self.jx_state, cycle.call, timed_out(cycle.call)))

    async def _answer_later(self, cycle: _FastCycle, body: bytes) -> None:
        self._answer(cycle, *await answer(self.jx_state, cycle.call, cycle.headers, body))

    def _after_decode(self, cycle: _FastCycle, task: asyncio.Task) -> None:
        """A decode task cancelled because the client went away (:meth:`connection_lost`), maybe before it
        started: drop the request if it got queued, and count it (the answer is not written)."""
        if task.cancelled():
            if cycle.call.future is not None:
                cycle.call.future.cancel()
            self._answer(cycle, *failure_reply(self.jx_state, cycle.call, ClientGone()))

    async def _encode_later(self, cycle: _FastCycle, chosen: list[tuple[str, Any, bool]]) -> None:
        try:
            reply = await asyncio.to_thread(finish_infer, self.jx_state, cycle.call, chosen)
        except Exception as exc:  # noqa: BLE001
            reply = failure_reply(self.jx_state, cycle.call, exc)
        self._answer(cycle, *reply)

    def _answer(self, cycle: _FastCycle, status: int, payload: bytes, headers: dict[str, str]) -> None:
        """Write one response (head and body in one write) and let uvicorn go on with the connection."""
        if cycle.response_complete:
            return
        cycle.response_complete = True
        if cycle.timer is not None:
            cycle.timer.cancel()
        if cycle.counted:
            self.jx_state.in_progress -= 1
        if cycle.disconnected or self.transport.is_closing():
            return
        self.transport.write(self._response(status, payload, headers, cycle.keep_alive))
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


def protocol_for(state: ServerState) -> type[InferProtocol]:
    """An :class:`InferProtocol` bound to one server's state (uvicorn builds one per connection)."""
    return type("InferProtocol", (InferProtocol,), {"jx_state": state})
