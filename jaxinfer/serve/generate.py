"""Generation in the server: a served decoder version and Triton's generate extension.

``POST /v2/models/{m}[/versions/{v}]/generate`` answers one JSON object;
``…/generate_stream`` answers server-sent events, one ``data: {...}`` per token
and a last one carrying ``finish_reason``. The request is Triton's generate
schema (https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/protocol/extension_generate.html)::

    {"id": "r1", "text_input": "Hello", "parameters": {"max_tokens": 16, "temperature": 0.7, "seed": 3}}
    {"input_ids": [1, 2, 3], "parameters": {"max_new_tokens": 16, "stop_ids": [0]}}

Sampling fields may also sit at the top level (TensorRT-LLM's style). The
answer is ``{"id", "model_name", "model_version", "output_ids", "text_output",
"finish_reason"}`` (``text_output`` when the model has a tokenizer). Every
device step happens in the model's :class:`~jaxinfer.generation.Engine`
thread; the HTTP handlers only validate, enqueue and relay tokens.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..batching import BatcherStoppedError, QueueFullError
from ..errors import InputError, JaxinferError
from ..generation import Decoder, Engine, SamplingParams, Stream
from ..model import Model
from .config import GenerationConfig, ModelConfig
from .protocol import ProtocolError

if TYPE_CHECKING:
    from .app import ServerState

log = logging.getLogger("jaxinfer.serve")

TOKENIZER_FILE = "tokenizer.json"

#: Parameter names accepted for each SamplingParams field (Triton / TensorRT-LLM / vLLM spellings).
ALIASES: dict[str, tuple[str, ...]] = {
    "max_new_tokens": ("max_tokens", "max_new_tokens"),
    "temperature": ("temperature",),
    "top_k": ("top_k",),
    "top_p": ("top_p",),
    "seed": ("seed", "random_seed"),
    "stop": ("stop", "stop_ids", "end_id"),
}
#: Accepted and ignored: the endpoint, not a flag, decides streaming.
IGNORED = ("stream",)
KNOWN = {a for names in ALIASES.values() for a in names} | set(IGNORED)


def is_decoder_model(model: Model) -> bool:
    """Whether ``model`` looks like an exported past-KV decoder (``input_ids`` + ``past_*`` inputs)."""
    names = [s.name for s in model.inputs]
    return "input_ids" in names and any("past" in n for n in names)


def wants_generation(model: Model, config: ModelConfig) -> bool:
    """Serve ``model`` through a Decoder: asked for in config.yaml, or recognised and not turned off."""
    if config.generation is not None:
        return config.generation.enabled
    return is_decoder_model(model)


# --------------------------------------------------------------- tokenizer
class Tokenizer:
    """A ``tokenizer.json`` through the optional ``tokenizers`` package: text <-> ids."""

    def __init__(self, path: Path):
        try:
            import tokenizers
        except ImportError as e:
            raise JaxinferError(f"{path} needs the 'tokenizers' package for text in/out: "
                                f"pip install 'jaxinfer[text]'") from e
        self.path = path
        self._tok = tokenizers.Tokenizer.from_file(str(path))
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def find_tokenizer(folders: Sequence[Path], explicit: str | None) -> Path | None:
    """The tokenizer.json to use: the configured path (relative to the model folder), else the
    version folder's, else the model folder's."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_absolute() and folders:
            p = folders[-1] / p
        if not p.is_file():
            raise JaxinferError(f"generation.tokenizer {explicit!r}: no such file {p}")
        return p
    for folder in folders:
        if (folder / TOKENIZER_FILE).is_file():
            return folder / TOKENIZER_FILE
    return None


class TextDelta:
    """Turns a growing id sequence into text pieces, holding back an unfinished UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer, self.ids, self.sent = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # a byte-level token split a character: wait for the rest
            return ""
        # byte-level BPE decodes prefix-stably; for others, the tail past what was sent is the best piece
        piece, self.sent = text[len(self.sent):], text
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        piece, self.sent = text[len(self.sent):], text
        return piece


# ----------------------------------------------------------- served version
class DecoderVersion:
    """One served decoder version: a Decoder warmed at load, its Engine, an optional tokenizer.

    Has the surface the repository, the app and the metrics use on a
    :class:`~jaxinfer.serve.repository.ModelVersion` (start/stop, compiles,
    metadata, queued...); ``/infer`` on it answers 400 pointing at ``/generate``.
    """

    kind = "decoder"

    def __init__(self, name: str, version: int, model: Model, config: ModelConfig, *, stamp: float = 0.0,
                 folders: Sequence[Path] = ()):
        self.name, self.version, self.config, self.stamp = name, version, config, stamp
        self.gen = config.generation if config.generation is not None else GenerationConfig()
        self.source = model
        self.decoder = Decoder(model, slots=self.gen.slots, max_len=self.gen.max_len,
                               prefill_buckets=self.gen.prefill_buckets or None)
        self.tokenizer: Tokenizer | None = None
        self.tokenizer_error: str | None = None
        path = find_tokenizer(folders, self.gen.tokenizer)
        if path is not None:
            try:
                self.tokenizer = Tokenizer(path)
            except JaxinferError as e:  # text requests say why; id requests still work
                self.tokenizer_error = str(e)
                log.warning("%s/%s: %s", name, version, e)
        if self.tokenizer is not None and self.tokenizer.vocab_size > self.decoder.vocab_size:
            log.warning("%s/%s: tokenizer has %d tokens but the model's vocabulary is %d", name, version,
                        self.tokenizer.vocab_size, self.decoder.vocab_size)
        self.engine: Engine | None = None
        self.cache = None
        self.state = "LOADING"
        self.warmup_s = 0.0
        self.warm_compiles = 0
        self._in_flight = 0
        self._lock = threading.Lock()

    # ---------------------------------------------------------- lifecycle
    def start(self, progress: bool = False) -> DecoderVersion:
        """Compile every prefill bucket and the decode step, then start the engine thread."""
        t = time.perf_counter()
        self.decoder.warmup()
        self.warm_compiles = self.compiles
        self.engine = Engine(self.decoder, policy=self.gen.policy, max_waiting=self.gen.max_waiting)
        self.warmup_s = time.perf_counter() - t
        self.state = "READY"
        log.info("%s/%s ready (decoder): %d compiles in %.1fs, %d slots x %d, prefill buckets %s", self.name,
                 self.version, self.compiles, self.warmup_s, self.decoder.slots, self.decoder.max_len,
                 list(self.decoder.prefill_buckets))
        return self

    def stop(self, drain: bool = True, timeout_s: float = 120.0) -> None:
        """Refuse new requests; with ``drain``, let running streams finish (bounded), then close the engine."""
        self.state = "UNLOADING"
        if drain and self.engine is not None:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                s = self.engine.stats()
                with self._lock:
                    busy = self._in_flight
                if not busy and not s.get("active_slots") and not s.get("waiting"):
                    break
                time.sleep(0.01)
        if self.engine is not None:
            self.engine.close()
        self.state = "UNAVAILABLE"

    # ------------------------------------------------------------ requests
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams) -> Stream:
        """Queue one generation; raises InputError (400), or QueueFullError (429) when the queue is full."""
        if self.state != "READY" or self.engine is None:
            raise BatcherStoppedError(f"model '{self.name}' version {self.version} is {self.state.lower()}")
        if self.engine.stats().get("waiting", 0) >= self.gen.max_waiting:
            raise QueueFullError(f"model '{self.name}' has {self.gen.max_waiting} generations waiting for a slot "
                                 f"(the limit); retry later")
        try:
            return self.engine.submit(prompt_ids, params)
        except (InputError, QueueFullError):
            raise
        except JaxinferError as e:  # the engine closed between the state check and submit (a reload)
            raise BatcherStoppedError(f"model '{self.name}' version {self.version}: {e}") from e

    def track(self, delta: int) -> None:
        with self._lock:
            self._in_flight += delta

    def prepare(self, feeds: Mapping[str, Any], sequence: Any = None) -> Any:
        raise InputError(f"model '{self.name}' is a generative decoder served through Triton's generate "
                         f"extension: POST /v2/models/{self.name}/generate (or /generate_stream) with "
                         f"{{\"input_ids\": [...]}}" + (" or {\"text_input\": \"...\"}" if self.tokenizer else "")
                         + ", not /infer")

    # ---------------------------------------------------------- reporting
    @property
    def compiles(self) -> int:
        return self.decoder.compiles

    @property
    def late_compiles(self) -> int:
        """Compiles after warm-up: a request shape the buckets missed (should stay 0)."""
        return self.compiles - self.warm_compiles if self.state != "LOADING" else 0

    def stats(self) -> dict[str, Any]:
        return self.engine.stats() if self.engine is not None else {}

    def queued(self) -> int:
        return int(self.stats().get("waiting", 0))

    def utilization(self) -> float:
        """Fraction of the KV slots in use now (the decoder's busy share)."""
        return float(self.stats().get("active_slots", 0)) / self.decoder.slots

    def metadata(self, versions: list[int]) -> dict[str, Any]:
        inputs = [{"name": "input_ids", "datatype": "INT64", "shape": [-1]}]
        outputs = [{"name": "output_ids", "datatype": "INT64", "shape": [-1]}]
        if self.tokenizer is not None:
            inputs.append({"name": "text_input", "datatype": "BYTES", "shape": [1]})
            outputs.append({"name": "text_output", "datatype": "BYTES", "shape": [1]})
        return {"name": self.name, "versions": [str(v) for v in versions],
                "platform": f"jaxinfer_{self.source.graph.fmt}_decoder", "inputs": inputs, "outputs": outputs}

    def triton_config(self) -> dict[str, Any]:
        d = self.decoder
        return {
            "name": self.name,
            "platform": f"jaxinfer_{self.source.graph.fmt}_decoder",
            "max_batch_size": 0,
            "model_transaction_policy": {"decoupled": True},  # Triton's mark of a streaming model
            "generation": {"slots": d.slots, "max_len": d.max_len, "prefill_buckets": list(d.prefill_buckets),
                           "vocab_size": d.vocab_size, "policy": self.gen.policy, "max_waiting": self.gen.max_waiting,
                           "default_max_new_tokens": self.gen.max_new_tokens,
                           "tokenizer": str(self.tokenizer.path) if self.tokenizer else None},
        }


# ------------------------------------------------------------ request parsing
@dataclass(frozen=True)
class GenerateRequest:
    """A validated generate request."""

    id: str | None
    prompt_ids: tuple[int, ...]
    params: SamplingParams


def _int(value: Any, key: str, lo: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"parameter '{key}' must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise ProtocolError(f"parameter '{key}' must be >= {lo}, got {value}")
    return value


def _number(value: Any, key: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ProtocolError(f"parameter '{key}' must be a finite number, got {value!r}")
    return float(value)


def _ids(value: Any, key: str, vocab: int) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ProtocolError(f"'{key}' must be a list of integer token ids, got {_short(value)}")
    bad = [t for t in value if not 0 <= t < vocab]
    if bad:
        raise ProtocolError(f"'{key}' has token id(s) {bad[:5]} outside the model's vocabulary [0, {vocab})")
    return tuple(value)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _sampling_fields(body: Mapping[str, Any]) -> dict[str, Any]:
    """Sampling fields from ``parameters`` and the top level, each under one canonical name."""
    params = body.get("parameters", {})
    if not isinstance(params, Mapping):
        raise ProtocolError(f"'parameters' must be a JSON object, got {_short(params)}")
    top = {k: v for k, v in body.items() if k not in ("id", "text_input", "input_ids", "parameters")}
    unknown = sorted((set(params) | set(top)) - KNOWN)
    if unknown:
        raise ProtocolError(f"unknown generate field(s) {unknown}; expected 'text_input' or 'input_ids', 'id', "
                            f"and parameters {sorted(KNOWN)}")
    merged = {**top, **params}
    out: dict[str, Any] = {}
    for canonical, names in ALIASES.items():
        given = [n for n in names if n in merged]
        if len(given) > 1:
            raise ProtocolError(f"parameters {given} mean the same thing; give one of them")
        if given:
            out[canonical] = (given[0], merged[given[0]])
    return out


def _stop_ids(key: str, value: Any, vocab: int, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    """Stop tokens: ids (an int or a list), or strings that the tokenizer maps to one token each."""
    items = value if isinstance(value, list) else [value]
    ids: list[int] = []
    for item in items:
        if isinstance(item, int) and not isinstance(item, bool):
            ids += _ids([item], key, vocab)
        elif isinstance(item, str):
            if tokenizer is None:
                raise ProtocolError(f"'{key}' has the string {item!r} but this model has no tokenizer.json; "
                                    "give stop token ids instead")
            enc = tokenizer.encode(item)
            if len(enc) != 1:
                raise ProtocolError(f"'{key}' string {item!r} is {len(enc)} tokens {enc}; only single-token "
                                    "stop strings are supported, or give stop token ids")
            ids += _ids(enc, key, vocab)
        else:
            raise ProtocolError(f"'{key}' must be token id(s) or string(s), got {_short(value)}")
    return tuple(dict.fromkeys(ids))


def parse_generate(body: bytes, mv: DecoderVersion) -> GenerateRequest:
    """A generate request body -> prompt ids and sampling params; ProtocolError (400) names the problem."""
    try:
        data = json.loads(body)
    except RecursionError:
        raise ProtocolError("generate body is nested too deeply; expected a JSON object like "
                            "{\"input_ids\": [1, 2, 3]}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, or an integer of over 4300 digits
        raise ProtocolError(f"generate body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"generate body must be a JSON object like {{\"text_input\": \"...\"}} or "
                            f"{{\"input_ids\": [...]}}, got {_short(data)}")
    rid = data.get("id")
    if rid is not None and not isinstance(rid, str):
        raise ProtocolError(f"'id' must be a string, got {_short(rid)}")
    vocab = mv.decoder.vocab_size
    has_text, has_ids = "text_input" in data, "input_ids" in data
    if has_text == has_ids:
        raise ProtocolError("generate needs exactly one of 'text_input' (a string, with a tokenizer.json) or "
                            "'input_ids' (a list of token ids)" + ("; both were given" if has_text else ""))
    if has_text:
        text = data["text_input"]
        if not isinstance(text, str):
            raise ProtocolError(f"'text_input' must be a string, got {_short(text)}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate escape such as "\ud800": the tokenizer refuses it
            raise ProtocolError(f"'text_input' is not valid Unicode text: {e}") from None
        if mv.tokenizer is None:
            why = mv.tokenizer_error or f"model '{mv.name}' has no {TOKENIZER_FILE} in its model or version folder"
            raise ProtocolError(f"'text_input' needs a tokenizer: {why}; send 'input_ids' instead")
        prompt = _ids(mv.tokenizer.encode(text), "text_input (tokenized)", vocab)
    else:
        prompt = _ids(data["input_ids"], "input_ids", vocab)
    if not prompt:
        raise ProtocolError("the prompt is empty: give at least one token")
    f = _sampling_fields(data)
    kw: dict[str, Any] = {"max_new_tokens": mv.gen.max_new_tokens}
    if "max_new_tokens" in f:
        kw["max_new_tokens"] = _int(f["max_new_tokens"][1], f["max_new_tokens"][0], lo=1)
    if "temperature" in f:
        kw["temperature"] = _number(f["temperature"][1], "temperature")
        if kw["temperature"] < 0:
            raise ProtocolError(f"parameter 'temperature' must be >= 0 (0 is greedy), got {kw['temperature']}")
    if "top_k" in f:
        kw["top_k"] = min(_int(f["top_k"][1], "top_k", lo=0), vocab)  # top_k >= vocab keeps every token
    if "top_p" in f:
        kw["top_p"] = _number(f["top_p"][1], "top_p")
        if not 0 < kw["top_p"] <= 1:
            raise ProtocolError(f"parameter 'top_p' must be in (0, 1], got {kw['top_p']}")
    if "seed" in f:
        kw["seed"] = _int(f["seed"][1], f["seed"][0])
    if "stop" in f:
        kw["stop_ids"] = _stop_ids(f["stop"][0], f["stop"][1], vocab, mv.tokenizer)
    limit = mv.decoder.max_len
    if len(prompt) + kw["max_new_tokens"] > limit:
        raise ProtocolError(f"prompt of {len(prompt)} tokens + max_tokens {kw['max_new_tokens']} = "
                            f"{len(prompt) + kw['max_new_tokens']} exceeds the model's max_len {limit}; "
                            "shorten the prompt or ask for fewer tokens")
    return GenerateRequest(rid, prompt, SamplingParams(**kw))


# ------------------------------------------------------------------ routes
def _sse(obj: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def generate_routes(state: ServerState) -> list[Route]:
    """The generate and generate_stream routes, with and without a version."""
    from .app import OFFLOAD_BYTES, ClientGone, error, read_body, status_of  # app mounts these routes: imported by now

    repo, metrics = state.repo, state.metrics

    def lookup(name: str, pinned: str | None) -> DecoderVersion:
        mv = repo.get(name, pinned)
        if not isinstance(mv, DecoderVersion):
            raise ProtocolError(f"model '{name}' is not a generative decoder (its inputs are "
                                f"{[s.name for s in mv.source.inputs]}); use /v2/models/{name}/infer, or serve "
                                "a past-KV decoder (input_ids, past_key_values.*) or set 'generation' in its "
                                "config.yaml")
        return mv

    async def begin(request: Request) -> tuple[DecoderVersion, GenerateRequest, Stream]:
        """Read, validate and enqueue; a retired version (reload) hands over to the new one."""
        if state.stopping:
            raise BatcherStoppedError("server is shutting down")
        name, pinned = request.path_params["model"], request.path_params.get("version")
        try:
            body = await read_body(request, state.max_body_bytes)
        except ClientDisconnect:
            raise ClientGone() from None  # 499, not a logged 500: nobody is left to answer
        for attempt in range(3):
            mv = lookup(name, pinned)
            if len(body) > OFFLOAD_BYTES:  # a long text_input takes ~1 s per MB to tokenize: not on the event loop
                req = await anyio.to_thread.run_sync(parse_generate, body, mv)
            else:
                req = parse_generate(body, mv)
            try:
                return mv, req, mv.submit(req.prompt_ids, req.params)
            except BatcherStoppedError:
                if pinned or state.stopping or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def head(mv: DecoderVersion, req: GenerateRequest) -> dict[str, Any]:
        out: dict[str, Any] = {"id": req.id} if req.id is not None else {}
        out.update(model_name=mv.name, model_version=str(mv.version))
        return out

    def failed(name: str, version: str, exc: BaseException, start: float) -> Response:
        code = status_of(exc)
        if code >= 500 and not isinstance(exc, (JaxinferError, ProtocolError)):
            log.exception("generate on '%s' failed", name)
        metrics.observe_request(name, version, code, time.perf_counter() - start)
        return error(exc, code)

    async def generate(request: Request) -> Response:
        start = time.perf_counter()
        name = request.path_params["model"]
        version = request.path_params.get("version") or ""
        state.in_progress += 1
        try:
            mv, req, stream = await begin(request)
            version = str(mv.version)
            mv.track(+1)
            try:
                ids = [tok async for tok in stream]
            finally:
                stream.cancel()  # no-op once finished; frees the slot if this handler was cancelled
                mv.track(-1)
            metrics.observe_generation(name, version, stream, len(ids))
            out = head(mv, req)
            out["output_ids"] = ids
            if mv.tokenizer is not None:
                out["text_output"] = mv.tokenizer.decode(ids)
            out["finish_reason"] = stream.finish_reason
        except Exception as exc:  # noqa: BLE001  (every failure answers {"error": ...})
            return failed(name, version, exc, start)
        finally:
            state.in_progress -= 1
        metrics.observe_request(name, version, 200, time.perf_counter() - start)
        return JSONResponse(out)

    async def generate_stream(request: Request) -> Response:
        start = time.perf_counter()
        name = request.path_params["model"]
        version = request.path_params.get("version") or ""
        try:
            mv, req, stream = await begin(request)
        except Exception as exc:  # noqa: BLE001  (errors before the first event are plain HTTP errors)
            return failed(name, str(version), exc, start)
        return StreamingResponse(_events(mv, req, stream, start), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def _events(mv: DecoderVersion, req: GenerateRequest, stream: Stream, start: float) -> AsyncIterator[bytes]:
        name, version = mv.name, str(mv.version)
        text = TextDelta(mv.tokenizer) if mv.tokenizer is not None else None
        n, status = 0, 200
        state.in_progress += 1
        mv.track(+1)  # counted from here: a response never started leaves only the engine's own work
        try:
            async for tok in stream:
                n += 1
                metrics.count_tokens(name, version, 1)
                event = head(mv, req)
                event["output_ids"] = [tok]
                if text is not None:
                    event["text_output"] = text.push(tok)
                event["finish_reason"] = None
                yield _sse(event)
            event = head(mv, req)
            event["output_ids"] = []
            if text is not None:
                event["text_output"] = text.flush()
            event["finish_reason"] = stream.finish_reason
            yield _sse(event)
        except Exception as exc:  # noqa: BLE001  (after the 200 header an error is an event: Triton's way)
            status = status_of(exc)
            if status >= 500 and not isinstance(exc, JaxinferError):
                log.exception("generate_stream on '%s' failed", name)
            yield _sse({"error": str(exc) or type(exc).__name__})
        finally:
            # A client that went away lands here too (the generator is closed): cancel its request so the
            # engine frees the slot before the next step (a finished stream ignores the cancel).
            stream.cancel()
            state.in_progress -= 1
            mv.track(-1)
            metrics.observe_generation(name, version, stream, n, count_tokens=False)
            metrics.observe_request(name, version, status, time.perf_counter() - start)

    base = "/v2/models/{model}"
    vbase = base + "/versions/{version}"
    return [
        Route(base + "/generate", generate, methods=["POST"]),
        Route(vbase + "/generate", generate, methods=["POST"]),
        Route(base + "/generate_stream", generate_stream, methods=["POST"]),
        Route(vbase + "/generate_stream", generate_stream, methods=["POST"]),
    ]

