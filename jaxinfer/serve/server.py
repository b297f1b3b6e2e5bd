"""``jaxinfer.serve``: a non-blocking KServe v2 server on a real socket, and ``jaxinfer serve``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from .._config import enable_compilation_cache
from ..errors import JaxinferError
from ..model import Model
from .app import InferFastPath, ServerState, build_app
from .http_fast import protocol_for, supported
from .metrics import Metrics
from .repository import ModelLoadFailed, ModelRepository

log = logging.getLogger("jaxinfer.serve")

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024


class Server:
    """A running server: ``.url``, ``.stop()``, a context manager; ``load``/``unload`` models.

    Example:
        >>> with jaxinfer.serve({"mlp": model}, port=0) as server:      # doctest: +SKIP
        ...     print(server.url)                                       # http://127.0.0.1:54321
    """

    def __init__(self, repo: ModelRepository, *, host: str = "127.0.0.1", port: int = 8000,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, poll_s: float | None = None,
                 metrics: Metrics | None = None, graceful_timeout_s: float = 30.0, fast_http: bool = True):
        from .. import __version__

        self.repo = repo
        self.metrics = metrics or Metrics(repo.versions, lambda: repo.retired_compiles)
        self.state = ServerState(repo, self.metrics, max_body_bytes, __version__)
        self.app = InferFastPath(build_app(self.state), self.state)
        self.host = host
        # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted sockets only when the proto says TCP (else +40 ms
        # per response from Nagle + delayed ACK)
        self._sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM,
                                   socket.IPPROTO_TCP)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._sock.bind((host, port))
        except OSError as e:
            self._sock.close()
            raise JaxinferError(f"cannot listen on {host}:{port}: {e}") from e
        self._sock.listen(2048)
        self.port = self._sock.getsockname()[1]
        # proxy_headers off: nothing reads the client address, so X-Forwarded-* parsing is pure per-request cost
        # infer requests are answered from the HTTP parser's callbacks where this uvicorn allows (http_fast)
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off", proxy_headers=False,
                                timeout_graceful_shutdown=graceful_timeout_s, timeout_keep_alive=30,
                                backlog=2048, http=protocol_for(self.state) if fast_http and supported() else "auto")
        self._uvicorn = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="jaxinfer-http", daemon=True)
        self._poll_s = poll_s
        self._poll_stop = threading.Event()
        self._poll_thread: threading.Thread | None = None
        self._stopped = False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _run(self) -> None:
        """The HTTP thread: uvicorn on uvloop where installed (its socket I/O and cross-thread wake-ups
        cost less per request than asyncio's selector loop), else on asyncio's own loop."""
        try:
            import uvloop
        except ImportError:
            factory = None
        else:
            factory = uvloop.new_event_loop
        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(self._uvicorn.serve(sockets=[self._sock]))

    def start(self, timeout: float = 30.0) -> Server:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise JaxinferError(f"HTTP server did not start on {self.url}")
            time.sleep(0.01)
        if self._poll_s:
            self._poll_thread = threading.Thread(target=self._poll, name="jaxinfer-poll", daemon=True)
            self._poll_thread.start()
        return self

    def _poll(self) -> None:
        while not self._poll_stop.wait(self._poll_s):
            try:
                names = self.repo.changed()
            except OSError as e:  # a directory vanished mid-scan: look again next time
                log.warning("poll: %s", e)
                continue
            for name in names:
                try:
                    self.repo.load(name)
                except JaxinferError as e:  # e.g. a file still being written: retried when it changes again
                    log.error("poll: %s", e)

    def load(self, name: str) -> list[int]:
        """(Re)load a model from the repository; the old version serves until the new one is warm."""
        return self.repo.load(name)

    def unload(self, name: str) -> None:
        self.repo.unload(name)

    def stop(self, *, drain: bool = True, timeout: float | None = 60.0) -> None:
        """Stop accepting connections, let in-flight requests finish, then stop the batchers."""
        if self._stopped:
            return
        self._stopped = True
        self._poll_stop.set()
        # in-flight HTTP requests keep waiting on live batchers while uvicorn shuts down gracefully
        self._uvicorn.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.state.stopping = True
        self.repo.stop(drain=drain)
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"Server({self.url}, models={[v['name'] for v in self.repo.index(ready_only=True)]})"


def serve(target: str | os.PathLike[str] | Model | Mapping[str, Model], *, host: str = "127.0.0.1",
          port: int = 8000, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, poll_s: float | None = None,
          progress: bool = False, compilation_cache: bool | str = True, name: str = "model",
          fast_http: bool = True, **config: Any) -> Server:
    """Serve a model repository, a Model, or ``{name: Model}`` over KServe v2 HTTP; returns at once.

    Args:
      target: a repository directory (``repo/<model>/<version>/model.onnx`` plus an
        optional ``repo/<model>/config.yaml``), a model file, a :class:`Model`, or ``{name: Model}``.
      host: interface to bind; ``127.0.0.1`` (local only) by default.
      port: TCP port; ``0`` picks a free one (read it from ``server.url``).
      max_body_bytes: larger request bodies answer 413.
      poll_s: re-scan the repository every ``poll_s`` seconds and reload changed models.
      progress: show a warm-up progress bar on stderr.
      compilation_cache: keep compiled buckets on disk between runs (a path, or True for the default).
      name: the model name when ``target`` is one Model or file.
      fast_http: answer infer requests straight from the HTTP parser (:mod:`~jaxinfer.serve.http_fast`;
        less CPU per request); False sends them through ASGI like every other route. Same answers.
      **config: options of :class:`~jaxinfer.serve.config.ModelConfig` applied to every model
        (``max_batch``, ``batch_buckets``, ``dim_buckets``, ``sla_ms``, ``max_queue_delay_ms``,
        ``queue_size``, ``timeout_ms``, ``response_cache``, ``version_policy``).

    Returns:
      A started :class:`Server` (every model warmed up): ``.url``, ``.stop()``, a context manager.

    Example:
      >>> server = jaxinfer.serve("model_repo/", port=8000, sla_ms=50)   # doctest: +SKIP
      >>> server.url                                                      # doctest: +SKIP
      'http://127.0.0.1:8000'
      >>> server.stop()                                                   # doctest: +SKIP
    """
    from .config import ModelConfig

    ModelConfig().merged(**config)  # a bad option fails here, before anything loads
    if compilation_cache:
        enable_compilation_cache(compilation_cache if isinstance(compilation_cache, str) else None)
    root = None
    models: dict[str, Model] = {}
    if isinstance(target, Model):
        models = {name: target}
    elif isinstance(target, Mapping):
        bad = [k for k, v in target.items() if not isinstance(v, Model)]
        if bad:
            raise TypeError(f"serve(): values must be jaxinfer.Model, not for {bad}")
        models = dict(target)
    elif isinstance(target, (str, os.PathLike)):
        path = Path(target)
        if path.is_dir():
            root = path
        elif path.is_file():
            import jaxinfer

            models = {name if name != "model" else path.stem: jaxinfer.load(path)}
        else:
            raise ModelLoadFailed(f"serve(): {path} is neither a model repository directory nor a model file")
    else:
        raise TypeError(f"serve() takes a repository path, a Model or {{name: Model}}, not {type(target).__name__}")
    holder: dict[str, Server] = {}

    def on_batch(model: str, version: str, report: Any) -> None:
        if "server" in holder:
            holder["server"].metrics.on_batch(model, version, report)

    repo = ModelRepository(root, models, overrides=config, progress=progress, on_batch=on_batch)
    server = Server(repo, host=host, port=port, max_body_bytes=max_body_bytes, poll_s=poll_s, fast_http=fast_http)
    holder["server"] = server
    try:
        failed = repo.load_all()
        if failed and not repo.versions():
            raise ModelLoadFailed("no model could be loaded:\n  " + "\n  ".join(failed.values()))
        return server.start()
    except BaseException:
        server.stop(drain=False)
        raise


def default_model_path() -> Path:
    """The light ResNet-50 that ships inside the onnx wheel: a real CNN on any machine."""
    import onnx

    path = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light" / "light_resnet50.onnx"
    if not path.exists():
        raise ModelLoadFailed(f"the default model {path} is missing from the onnx package; give a REPO")
    return path


def wait_for_stop_signal(poll_s: float = 0.2) -> int:
    """Block the main thread until SIGINT or SIGTERM arrives; returns the signal's number.

    The handler only appends to a list. It must not take a lock: a process-directed signal
    can land on another thread, and Python then runs the handler in the main thread at its next
    bytecode, which may be inside ``threading.Event.wait`` with the event's lock held (setting
    the event there deadlocked ``jaxinfer serve`` on SIGTERM).
    """
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    while not received:
        time.sleep(poll_s)
    return received[0]


def main(argv: Sequence[str] | None = None) -> int:
    """``jaxinfer serve [REPO] [--host H] [--port P] ...``: serve until Ctrl-C."""
    p = argparse.ArgumentParser(prog="jaxinfer serve", description="Serve models over KServe v2 HTTP.")
    p.add_argument("repo", nargs="?", help="model repository dir or model file (default: the onnx wheel's "
                                           "light ResNet-50 as model 'resnet50')")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: local only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, help="largest batch bucket (default 32; 1 disables batching)")
    p.add_argument("--sla-ms", type=float, help="latency target the batcher dispatches for")
    p.add_argument("--max-queue-delay-ms", type=float, help="longest a request waits for a batch to fill")
    p.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_BYTES / 2**20)
    p.add_argument("--poll-s", type=float, help="re-scan the repository this often and reload changes")
    p.add_argument("--response-cache", type=int, help="LRU response cache entries per model (0: off)")
    args = p.parse_args(list(argv) if argv is not None else None)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config: dict[str, Any] = {}
    for key in ("max_batch", "sla_ms", "max_queue_delay_ms", "response_cache"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    target: Any = args.repo
    name = "model"
    if target is None:
        target, name = default_model_path(), "resnet50"
        config.setdefault("max_batch", 8)
    try:
        server = serve(target, host=args.host, port=args.port, max_body_bytes=int(args.max_body_mb * 2**20),
                       poll_s=args.poll_s, progress=True, name=name, **config)
    except (JaxinferError, OSError) as e:
        print(f"jaxinfer serve: {e}")
        return 1
    print(f"serving {[r['name'] for r in server.repo.index(ready_only=True)]} at {server.url} "
          f"(KServe v2; metrics at {server.url}/metrics); Ctrl-C stops")
    wait_for_stop_signal()
    print("draining and stopping...")
    server.stop()
    return 0
