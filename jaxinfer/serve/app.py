"""The HTTP app: KServe v2 inference, Triton's repository and generate extensions, Prometheus metrics.

Every error answers ``{"error": "..."}``: 400 bad request (name, shape, dtype,
JSON, byte sizes), 404 unknown model/version, 413 body over the limit, 429
queue full, 503 stopping/not ready, 504 timed out, 500 a model failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..batching import BatcherStoppedError, QueueFullError, RequestTimeoutError, SequenceLimitError, stream_of
from ..errors import InputError, JaxinferError, OutOfMemoryError
from .generate import generate_routes
from .metrics import Metrics
from .protocol import HEADER, InferRequest, ProtocolError, decode_infer, encode_infer
from .repository import ModelLoadFailed, ModelNotFoundError, ModelRepository

log = logging.getLogger("jaxinfer.serve")

HEADER_KEY = HEADER.lower()

#: Bodies above this many bytes are decoded/encoded in a worker thread, off the event loop.
OFFLOAD_BYTES = 64 * 1024
#: Binary tensor bytes from which a request is decoded off the event loop all the same (copying them
#: takes ~0.1 ms per MB here). Under it binary data costs the loop little, so only JSON counts.
OFFLOAD_BINARY_BYTES = 1 << 20


class ClientGone(ProtocolError):
    """The client closed its connection before its answer was ready; counted as nginx's 499."""

    def __init__(self) -> None:
        super().__init__("client closed the connection before the answer was ready", 499)


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception answers with."""
    if isinstance(exc, ProtocolError):
        return exc.status
    if isinstance(exc, (InputError, ModelLoadFailed)):
        return 400
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, (QueueFullError, SequenceLimitError)):
        return 429
    if isinstance(exc, BatcherStoppedError):
        return 503
    if isinstance(exc, (RequestTimeoutError, asyncio.TimeoutError, TimeoutError)):
        return 504
    if isinstance(exc, OutOfMemoryError):  # the message names the inputs and the sizes; smaller ones run
        return 507
    return 500


def error(exc: BaseException | str, status: int | None = None) -> JSONResponse:
    msg = exc if isinstance(exc, str) else (str(exc) or type(exc).__name__)
    code = status if status is not None else status_of(exc)  # type: ignore[arg-type]
    return JSONResponse({"error": msg}, status_code=code)


class ServerState:
    """What the handlers share: the repository, metrics, limits and the stopping flag."""

    def __init__(self, repo: ModelRepository, metrics: Metrics, max_body_bytes: int, version: str):
        self.repo, self.metrics, self.max_body_bytes, self.version = repo, metrics, max_body_bytes, version
        self.stopping = False
        self.in_progress = 0


async def read_body(request: Request, limit: int) -> bytes:
    """A Starlette request's body, refusing more than ``limit`` bytes (413) and decoding gzip/deflate."""
    return await read_stream(request.headers, request.stream(), limit)


async def read_stream(headers: Mapping[str, str], chunks: AsyncIterator[bytes], limit: int) -> bytes:
    """A body from its (lower-case) ``headers`` and ``chunks``, refusing more than ``limit`` bytes (413)
    and decoding gzip/deflate."""
    check_declared_length(headers, limit)
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise ProtocolError(f"request body exceeds the limit of {limit} bytes", 413)
        parts.append(chunk)
    return decode_body(headers, parts[0] if len(parts) == 1 else b"".join(parts), limit)


def check_declared_length(headers: Mapping[str, str], limit: int) -> None:
    """Refuse (413) a Content-Length above ``limit`` before reading the body; 400 for a bad one."""
    declared = headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ProtocolError(f"bad Content-Length {declared!r}") from None
        if size > limit:
            raise ProtocolError(f"request body of {declared} bytes exceeds the limit of {limit} bytes", 413)


def worth_offloading(headers: Mapping[str, str], body: bytes) -> bool:
    """Whether decoding ``body`` should leave the event loop: much JSON to parse, or many binary bytes.

    A worker thread costs two thread hand-offs (~0.2 ms here), more than decoding a small JSON header
    and frombuffer-ing 128 KB of binary tensors takes.
    """
    raw = headers.get(HEADER_KEY)
    json_bytes = int(raw) if raw is not None and raw.isdigit() and int(raw) <= len(body) else len(body)
    return json_bytes > OFFLOAD_BYTES or len(body) > OFFLOAD_BINARY_BYTES


def decode_body(headers: Mapping[str, str], body: bytes, limit: int) -> bytes:
    """``body`` with its Content-Encoding (gzip/deflate/identity) undone, at most ``limit`` bytes decoded."""
    encoding = headers.get("content-encoding", "").lower()
    if encoding in ("gzip", "deflate"):
        d = zlib.decompressobj(zlib.MAX_WBITS | 16 if encoding == "gzip" else zlib.MAX_WBITS)
        try:
            body = d.decompress(body, limit + 1)
        except zlib.error as e:
            raise ProtocolError(f"body is not valid {encoding}: {e}") from None
        if len(body) > limit or d.unconsumed_tail:
            raise ProtocolError(f"decompressed body exceeds the limit of {limit} bytes", 413)
    elif encoding not in ("", "identity"):
        raise ProtocolError(f"unsupported Content-Encoding {encoding!r}; use gzip, deflate or none")
    return body


class InferCall:
    """One infer request from its body to its answer; filled in as it goes (the version label for metrics
    is known once the model version is)."""

    __slots__ = ("future", "label_version", "mv", "name", "out_names", "pinned", "req", "start", "wait")

    def __init__(self, name: str, pinned: str | None):
        self.name, self.pinned, self.start = name, pinned, time.perf_counter()
        self.label_version = pinned or ""
        self.mv: Any = None
        self.req: InferRequest | None = None
        self.future: Future | None = None
        self.wait: float | None = None  # seconds the caller waits for the result; None: no limit
        self.out_names: list[str] = []


def begin_infer(state: ServerState, call: InferCall, headers: Mapping[str, str], body: bytes) -> None:
    """Decode, check and queue ``call``'s request (its decoded ``body``): sets ``call.future``.

    Raises what the request did wrong (:func:`status_of` maps it to a status).
    """
    if state.stopping:
        raise BatcherStoppedError("server is shutting down")
    raw_len = headers.get(HEADER_KEY)
    try:
        header_len = int(raw_len) if raw_len is not None else None
    except ValueError:
        raise ProtocolError(f"{HEADER} must be an integer, got {raw_len!r}") from None
    repo, name = state.repo, call.name
    mv = call.mv = repo.get(name, call.pinned)
    call.label_version = str(mv.version)
    req = call.req = decode_infer(body, header_len)
    sequence = stream_of(req.parameters)
    prepared = mv.prepare(req.inputs, sequence)
    call.out_names = [s.name for s in mv.bucketed.outputs]
    if req.outputs is not None:
        unknown = [o.name for o in req.outputs if o.name not in call.out_names]
        if unknown:
            raise ProtocolError(f"unknown requested output(s) {unknown}; model '{name}' has {call.out_names}")
    timeout_s = _timeout_of(req.parameters)
    for attempt in range(3):
        try:
            fut, hit = mv.submit(prepared, timeout_s=timeout_s)
            break
        except BatcherStoppedError:
            # the version was retired between lookup and submit (a reload): use the new one
            if call.pinned or state.stopping or attempt == 2:
                raise
            mv = call.mv = repo.get(name)
            call.label_version = str(mv.version)
            prepared = mv.prepare(req.inputs, sequence)
    if hit:
        state.metrics.cache_hits.labels(name, call.label_version).inc()
    elif mv.cache is not None:
        state.metrics.cache_misses.labels(name, call.label_version).inc()
    call.future = fut
    call.wait = timeout_s
    if call.wait is None and mv.config.timeout_ms is not None:
        call.wait = mv.config.timeout_ms / 1000.0


def chosen_outputs(call: InferCall, result: Mapping[str, Any]) -> list[tuple[str, Any, bool]]:
    """(name, array, binary) for each output the request asked for (all of them when it named none)."""
    req = call.req
    assert req is not None
    if req.outputs is None:
        return [(n, result[n], req.binary_default) for n in call.out_names]
    return [(o.name, result[o.name], o.binary) for o in req.outputs]


def big_reply(chosen: list[tuple[str, Any, bool]]) -> bool:
    """Whether encoding ``chosen`` as JSON is worth a worker thread (off the event loop)."""
    return sum(a.nbytes for _, a, b in chosen if not b) > OFFLOAD_BYTES


def finish_infer(state: ServerState, call: InferCall,
                 chosen: list[tuple[str, Any, bool]]) -> tuple[int, bytes, dict[str, str]]:
    """The 200 answer to ``call`` from its ``chosen`` outputs, counted in the metrics."""
    payload, out_headers = encode_infer(call.name, str(call.mv.version), call.req.id, chosen)  # type: ignore[union-attr]
    state.metrics.observe_request(call.name, call.label_version, 200, time.perf_counter() - call.start)
    return 200, payload, out_headers


def failure_reply(state: ServerState, call: InferCall, exc: BaseException) -> tuple[int, bytes, dict[str, str]]:
    """The ``{"error": ...}`` answer to ``call`` for ``exc``, counted in the metrics (5xx surprises logged)."""
    code = status_of(exc)
    if code >= 500 and not isinstance(exc, (JaxinferError, TimeoutError, asyncio.TimeoutError)):
        log.error("infer on '%s' failed", call.name, exc_info=exc)
    if isinstance(exc, asyncio.TimeoutError) and not str(exc):
        exc = RequestTimeoutError(f"request to '{call.name}' timed out")
    state.metrics.observe_request(call.name, call.label_version, code, time.perf_counter() - call.start)
    return code, json.dumps({"error": str(exc) or type(exc).__name__}).encode(), {"content-type": "application/json"}


def timed_out(call: InferCall) -> RequestTimeoutError:
    """The 504 of ``call``; a stream's request says that its stream did not move (it may be sent again)."""
    stream = stream_of(call.req.parameters) if call.req is not None else None
    note = (f"; stream {stream.id!r} was not stepped by it (its state is as before: send it again)"
            if stream is not None and call.mv is not None and call.mv.bucketed.sequences is not None else "")
    return RequestTimeoutError(f"request to '{call.name}' timed out after {call.wait:.3f}s{note}")


async def await_result(call: InferCall) -> Any:
    """``call.future``'s result on this event loop, raising :func:`timed_out` after ``call.wait`` seconds.

    One cross-thread wake-up and one timer: lighter than ``asyncio.wait_for(asyncio.wrap_future(f))``,
    which adds a task and two futures per request. A timed-out or cancelled wait cancels the request
    (the batcher drops it from its queue).
    """
    fut = call.future
    assert fut is not None
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()

    def settle() -> None:
        if not waiter.done():
            exc = fut.exception() if not fut.cancelled() else asyncio.CancelledError()
            if exc is None:
                waiter.set_result(fut.result())
            else:
                waiter.set_exception(exc)

    def wake(_: Future) -> None:  # on the batcher's completion thread
        if not loop.is_closed():
            try:
                loop.call_soon_threadsafe(settle)
            except RuntimeError:  # the loop closed meanwhile: nobody waits any more
                pass

    def expire() -> None:
        # a request the batcher has claimed (a stream's step being stored) or answered is not timed out:
        # its answer is on its way, and a 504 would tell the caller its stream did not move
        if not waiter.done() and fut.cancel():
            waiter.set_exception(timed_out(call))

    fut.add_done_callback(wake)
    timer = loop.call_later(call.wait, expire) if call.wait is not None else None
    try:
        return await waiter
    except BaseException:
        fut.cancel()
        raise
    finally:
        if timer is not None:
            timer.cancel()


async def infer_reply(state: ServerState, name: str, pinned: str | None, headers: Mapping[str, str],
                      chunks: AsyncIterator[bytes]) -> tuple[int, bytes, dict[str, str]]:
    """One KServe v2 infer request, independent of the HTTP layer: (status, payload, response headers).

    ``headers`` are the request's, keyed in lower case; ``chunks`` its body. Every failure is an
    ``{"error": ...}`` answer with the status :func:`status_of` gives. Bodies and JSON replies above
    ``OFFLOAD_BYTES`` are decoded and encoded in a worker thread, off the event loop.
    """
    state.in_progress += 1
    call = InferCall(name, pinned)
    try:
        body = await read_stream(headers, chunks, state.max_body_bytes)
        return await answer(state, call, headers, body)
    except Exception as exc:  # noqa: BLE001  (every failure answers {"error": ...})
        return failure_reply(state, call, exc)
    finally:
        state.in_progress -= 1


async def answer(state: ServerState, call: InferCall, headers: Mapping[str, str],
                 body: bytes) -> tuple[int, bytes, dict[str, str]]:
    """``call``'s answer once its body is read: begin, wait, finish (big ones in a worker thread)."""
    try:
        if worth_offloading(headers, body):
            await anyio.to_thread.run_sync(begin_infer, state, call, headers, body)
        else:
            begin_infer(state, call, headers, body)
        chosen = chosen_outputs(call, await await_result(call))
        if big_reply(chosen):
            return await anyio.to_thread.run_sync(finish_infer, state, call, chosen)
        return finish_infer(state, call, chosen)
    except Exception as exc:  # noqa: BLE001  (every failure answers {"error": ...})
        return failure_reply(state, call, exc)


#: ``POST /v2/models/{model}[/versions/{version}]/infer``: the path the fast path serves.
_INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


class InferFastPath:
    """ASGI app that answers infer requests itself and hands everything else to ``app``.

    Infer is the hot path: on a small model Starlette's routing, middleware and Request/Response
    objects cost about as much CPU per request as the inference itself. The answer is the same
    :func:`infer_reply` the Starlette route gives.
    """

    def __init__(self, app: Starlette, state: ServerState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        raw_path = (scope.get("raw_path") or b"") if scope["type"] == "http" else b""
        if b"%2f" in raw_path.lower():  # an encoded '/' would split a model name into path segments
            name = raw_path.decode("latin-1")
            await JSONResponse({"error": f"no route {scope['method']} {name}: a model name or version cannot "
                                         "contain '/'"}, status_code=404)(scope, receive, send)
            return
        if scope["type"] == "http" and scope["method"] == "POST":
            match = _INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
                status, payload, out = await infer_reply(self.state, match[1], match[2], headers,
                                                         _asgi_chunks(receive))
                raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in out.items()]
                raw.append((b"content-length", str(len(payload)).encode()))
                await send({"type": "http.response.start", "status": status, "headers": raw})
                await send({"type": "http.response.body", "body": payload})
                return
        await self.app(scope, receive, send)


async def _asgi_chunks(receive: Any) -> AsyncIterator[bytes]:
    """An ASGI request body as chunks; a client that goes away mid-body is a 400."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ProtocolError("client disconnected before the request body was complete")
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


def build_app(state: ServerState) -> Starlette:
    repo, metrics = state.repo, state.metrics

    async def server_meta(_: Request) -> Response:
        return JSONResponse({"name": "jaxinfer", "version": state.version,
                             "extensions": ["binary_tensor_data", "model_repository", "parameters", "generate"]})

    async def live(_: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(_: Request) -> Response:
        ok = repo.ready() and not state.stopping
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    async def model_meta(request: Request) -> Response:
        p = request.path_params
        try:
            mv = repo.get(p["model"], p.get("version"))
        except ModelNotFoundError as e:
            return error(e)
        return JSONResponse(mv.metadata(repo.loaded_versions(mv.name)))

    async def model_config(request: Request) -> Response:
        p = request.path_params
        try:
            mv = repo.get(p["model"], p.get("version"))
        except ModelNotFoundError as e:
            return error(e)
        return JSONResponse(mv.triton_config())

    async def model_ready(request: Request) -> Response:
        p = request.path_params
        try:
            mv = repo.get(p["model"], p.get("version"))
        except ModelNotFoundError as e:
            return error(e)
        ok = mv.state == "READY" and not state.stopping
        return JSONResponse({"name": mv.name, "ready": ok}, status_code=200 if ok else 503)

    async def infer(request: Request) -> Response:
        # reached only when the app is mounted without InferFastPath in front; the same answer
        p = request.path_params
        status, payload, headers = await infer_reply(state, p["model"], p.get("version"), request.headers,
                                                     request.stream())
        media = headers.pop("content-type")
        return Response(payload, status_code=status, media_type=media, headers=headers)

    async def repo_index(request: Request) -> Response:
        try:
            body = await read_body(request, state.max_body_bytes)
        except ProtocolError as e:
            return error(e)
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is left to read it
        ready_only = False
        if body.strip():
            try:
                ready_only = json.loads(body).get("ready", False)
            except (ValueError, RecursionError, AttributeError):  # bad JSON or UTF-8, ints of > 4300 digits
                return error("repository index body must be a JSON object like {\"ready\": true}", 400)
            if not isinstance(ready_only, bool):
                return error(f"repository index 'ready' must be true or false, got {ready_only!r}", 400)
        return JSONResponse(repo.index(ready_only))

    async def repo_load(request: Request) -> Response:
        name = request.path_params["model"]
        try:
            await anyio.to_thread.run_sync(repo.load, name)
        except (ModelLoadFailed, ModelNotFoundError) as e:
            return error(e)
        return JSONResponse({})

    async def repo_unload(request: Request) -> Response:
        name = request.path_params["model"]
        try:
            await anyio.to_thread.run_sync(repo.unload, name)
        except ModelNotFoundError as e:
            return error(e)
        return JSONResponse({})

    async def prometheus(_: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    base = "/v2/models/{model}"
    vbase = base + "/versions/{version}"
    routes = [
        Route("/v2", server_meta, methods=["GET"]),
        Route("/v2/health/live", live, methods=["GET"]),
        Route("/v2/health/ready", ready, methods=["GET"]),
        Route(base, model_meta, methods=["GET"]),
        Route(vbase, model_meta, methods=["GET"]),
        Route(base + "/config", model_config, methods=["GET"]),
        Route(vbase + "/config", model_config, methods=["GET"]),
        Route(base + "/ready", model_ready, methods=["GET"]),
        Route(vbase + "/ready", model_ready, methods=["GET"]),
        Route(base + "/infer", infer, methods=["POST"]),
        Route(vbase + "/infer", infer, methods=["POST"]),
        Route("/v2/repository/index", repo_index, methods=["POST"]),
        Route("/v2/repository/models/{model}/load", repo_load, methods=["POST"]),
        Route("/v2/repository/models/{model}/unload", repo_unload, methods=["POST"]),
        Route("/metrics", prometheus, methods=["GET"]),
        *generate_routes(state),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(f"no route {request.method} {request.url.path}", getattr(exc, "status_code", 404))

    return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_found})


def _timeout_of(params: dict[str, Any]) -> float | None:
    """Per-request timeout from ``parameters``: ``timeout_ms``, or Triton's ``timeout`` in microseconds."""
    if "timeout_ms" in params:
        value, scale = params["timeout_ms"], 1e-3
    elif "timeout" in params:
        value, scale = params["timeout"], 1e-6
    else:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ProtocolError(f"timeout parameter must be a positive finite number, got {value!r}")
    return float(value) * scale
