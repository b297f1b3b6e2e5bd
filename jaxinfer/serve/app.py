"""The HTTP app: KServe v2 inference, Triton's repository and generate extensions, Prometheus metrics.

Every error answers ``{"error": "..."}``: 400 bad request (name, shape, dtype,
JSON, byte sizes), 404 unknown model/version, 413 body over the limit, 429
queue full, 503 stopping/not ready, 504 timed out, 500 a model failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..batching import BatcherStoppedError, QueueFullError, RequestTimeoutError
from ..errors import InputError, JaxinferError
from .generate import generate_routes
from .metrics import Metrics
from .protocol import HEADER, ProtocolError, decode_infer, encode_infer
from .repository import ModelLoadFailed, ModelNotFoundError, ModelRepository

log = logging.getLogger("jaxinfer.serve")

HEADER_KEY = HEADER.lower()

#: Bodies above this many bytes are decoded/encoded in a worker thread, off the event loop.
OFFLOAD_BYTES = 64 * 1024


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception answers with."""
    if isinstance(exc, ProtocolError):
        return exc.status
    if isinstance(exc, (InputError, ModelLoadFailed)):
        return 400
    if isinstance(exc, ModelNotFoundError):
        return 404
    if isinstance(exc, QueueFullError):
        return 429
    if isinstance(exc, BatcherStoppedError):
        return 503
    if isinstance(exc, (RequestTimeoutError, asyncio.TimeoutError, TimeoutError)):
        return 504
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
    declared = headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise ProtocolError(f"request body of {declared} bytes exceeds the limit of {limit} bytes", 413)
        except ValueError:
            raise ProtocolError(f"bad Content-Length {declared!r}") from None
    parts, total = [], 0
    async for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise ProtocolError(f"request body exceeds the limit of {limit} bytes", 413)
        parts.append(chunk)
    body = parts[0] if len(parts) == 1 else b"".join(parts)
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


async def infer_reply(state: ServerState, name: str, pinned: str | None, headers: Mapping[str, str],
                      chunks: AsyncIterator[bytes]) -> tuple[int, bytes, dict[str, str]]:
    """One KServe v2 infer request, independent of the HTTP layer: (status, payload, response headers).

    ``headers`` are the request's, keyed in lower case; ``chunks`` its body. Every failure is an
    ``{"error": ...}`` answer with the status :func:`status_of` gives.
    """
    repo, metrics = state.repo, state.metrics
    state.in_progress += 1
    start = time.perf_counter()
    label_version = pinned or ""
    try:
        if state.stopping:
            raise BatcherStoppedError("server is shutting down")
        body = await read_stream(headers, chunks, state.max_body_bytes)
        raw_len = headers.get(HEADER_KEY)
        try:
            header_len = int(raw_len) if raw_len is not None else None
        except ValueError:
            raise ProtocolError(f"{HEADER} must be an integer, got {raw_len!r}") from None
        mv = repo.get(name, pinned)
        label_version = str(mv.version)
        if len(body) > OFFLOAD_BYTES:
            req = await anyio.to_thread.run_sync(decode_infer, body, header_len)
            prepared = await anyio.to_thread.run_sync(mv.prepare, req.inputs)
        else:
            req = decode_infer(body, header_len)
            prepared = mv.prepare(req.inputs)
        out_names = [s.name for s in mv.bucketed.outputs]
        if req.outputs is not None:
            unknown = [o.name for o in req.outputs if o.name not in out_names]
            if unknown:
                raise ProtocolError(f"unknown requested output(s) {unknown}; model '{name}' has {out_names}")
        timeout_s = _timeout_of(req.parameters)
        for attempt in range(3):
            try:
                fut, hit = mv.submit(prepared, timeout_s=timeout_s)
                break
            except BatcherStoppedError:
                # the version was retired between lookup and submit (a reload): use the new one
                if pinned or state.stopping or attempt == 2:
                    raise
                mv = repo.get(name)
                label_version = str(mv.version)
                prepared = mv.prepare(req.inputs)
        if hit:
            metrics.cache_hits.labels(name, label_version).inc()
        elif mv.cache is not None:
            metrics.cache_misses.labels(name, label_version).inc()
        wait = timeout_s
        if wait is None and mv.config.timeout_ms is not None:
            wait = mv.config.timeout_ms / 1000.0
        waiter = asyncio.wrap_future(fut)
        result = await (waiter if wait is None else asyncio.wait_for(waiter, wait))
        if req.outputs is None:
            chosen = [(n, result[n], req.binary_default) for n in out_names]
        else:
            chosen = [(o.name, result[o.name], o.binary) for o in req.outputs]
        big = sum(a.nbytes for _, a, b in chosen if not b) > OFFLOAD_BYTES
        if big:
            payload, out_headers = await anyio.to_thread.run_sync(
                encode_infer, name, str(mv.version), req.id, chosen)
        else:
            payload, out_headers = encode_infer(name, str(mv.version), req.id, chosen)
    except Exception as exc:  # noqa: BLE001  (every failure answers {"error": ...})
        code = status_of(exc)
        if code >= 500 and not isinstance(exc, (JaxinferError, TimeoutError, asyncio.TimeoutError)):
            log.exception("infer on '%s' failed", name)
        if isinstance(exc, asyncio.TimeoutError) and not str(exc):
            exc = RequestTimeoutError(f"request to '{name}' timed out")
        metrics.observe_request(name, label_version, code, time.perf_counter() - start)
        return code, json.dumps({"error": str(exc) or type(exc).__name__}).encode(), \
            {"content-type": "application/json"}
    finally:
        state.in_progress -= 1
    metrics.observe_request(name, label_version, 200, time.perf_counter() - start)
    return 200, payload, out_headers


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
        body = await request.body()
        ready_only = False
        if body.strip():
            try:
                ready_only = bool(json.loads(body).get("ready", False))
            except (json.JSONDecodeError, AttributeError):
                return error("repository index body must be a JSON object like {\"ready\": true}", 400)
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
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
        raise ProtocolError(f"timeout parameter must be a positive number, got {value!r}")
    return float(value) * scale
