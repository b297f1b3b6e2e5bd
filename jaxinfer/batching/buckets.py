"""Shape buckets: a model compiled once per bucket, requests padded up and sliced back.

A :class:`BucketPolicy` lists the batch sizes (default 1, 2, 4, ... up to
``max_batch``) and, optionally, sizes for other symbolic dims (``{"seq": [16,
32, 64]}``). :class:`BucketedModel` wraps a :class:`~jaxinfer.Model`: it finds
the batch axis (dim 0 shared by every input; a fixed batch of 1 is re-stamped
to a symbolic ``batch``), compiles every bucket at warm-up, and afterwards
never compiles again: each batch of requests is concatenated, zero-padded up to
its bucket, run, and sliced back per request. A request larger than the largest
bucket is split into chunks by :meth:`BucketedModel.split`.

Padding a non-batch dim is only correct for graphs that treat padded positions
as absent (position-wise ops, or a mask input: zero padding writes 0 = "absent"
into an attention mask), so dim buckets are opt-in.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import InputError, JaxinferError
from ..graph import Graph, Node, ValueInfo, values_flowing_from
from ..model import Model, Signature
from ..tracer import memory_limit
from .sequences import SequenceError, SequencePolicy, SequenceTable, StreamRef, stateless_view

log = logging.getLogger("jaxinfer.batching")

BATCH = "batch"
DEFAULT_MAX_BATCH = 32


class BucketError(JaxinferError):
    """A bucket policy that does not fit the model, or a warm-up that failed."""


def default_batch_sizes(max_batch: int) -> tuple[int, ...]:
    """Powers of two up to ``max_batch``, with ``max_batch`` itself last."""
    if max_batch < 1:
        raise BucketError(f"max_batch must be >= 1, got {max_batch}")
    sizes = [1]
    while sizes[-1] * 2 < max_batch:
        sizes.append(sizes[-1] * 2)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return tuple(sizes)


@dataclass(frozen=True)
class BucketPolicy:
    """Batch sizes and per-symbol dim sizes to compile; requests are padded up to them."""

    batch_sizes: tuple[int, ...] = default_batch_sizes(DEFAULT_MAX_BATCH)
    dims: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sizes = tuple(sorted(set(int(b) for b in self.batch_sizes)))
        if not sizes or sizes[0] < 1:
            raise BucketError(f"batch_sizes must be positive integers, got {list(self.batch_sizes)}")
        object.__setattr__(self, "batch_sizes", sizes)
        dims: dict[str, tuple[int, ...]] = {}
        for sym, values in dict(self.dims).items():
            vals = tuple(sorted(set(int(v) for v in values)))
            if not vals or vals[0] < 1:
                raise BucketError(f"dim bucket '{sym}' needs positive sizes, got {list(values)}")
            dims[str(sym)] = vals
        object.__setattr__(self, "dims", dims)

    @classmethod
    def for_max_batch(cls, max_batch: int, dims: Mapping[str, Sequence[int]] | None = None) -> BucketPolicy:
        return cls(default_batch_sizes(max_batch), {k: tuple(v) for k, v in (dims or {}).items()})

    @property
    def max_batch(self) -> int:
        return self.batch_sizes[-1]

    def batch_bucket(self, n: int) -> int:
        """The smallest batch bucket holding ``n`` rows (``n`` <= max_batch)."""
        for b in self.batch_sizes:
            if b >= n:
                return b
        raise BucketError(f"batch of {n} exceeds the largest bucket {self.max_batch}; split it first")

    def dim_bucket(self, sym: str, size: int) -> int:
        for b in self.dims[sym]:
            if b >= size:
                return b
        raise InputError(f"dim '{sym}' = {size} exceeds the largest configured bucket {self.dims[sym][-1]} "
                         f"(buckets {list(self.dims[sym])})")


# --------------------------------------------------------------- re-stamping
def _reads_inputs(graph: Graph) -> set[str]:
    """Values computed from the graph inputs (not through Shape/Size)."""
    return values_flowing_from({v.name for v in graph.inputs},
                               [(n.op_type, n.inputs, n.outputs) for n in graph.nodes])


def restamp_graph_batch(graph: Graph, symbol: str = BATCH) -> Graph:
    """A graph whose fixed batch of 1 (dim 0 of inputs/outputs) is the symbolic ``symbol``.

    Reshapes fed by the inputs whose constant target shape starts with 1 copy
    dim 0 from their data instead (target ``0``), so ``[1, 9216]`` becomes ``[0, 9216]``.
    """
    def stamp(v: ValueInfo) -> ValueInfo:
        if v.shape and v.shape[0] == 1:
            return ValueInfo(v.name, (symbol,) + tuple(v.shape[1:]), v.dtype, v.kind, v.elem)
        return v

    flowing = _reads_inputs(graph)
    inits = dict(graph.initializers)
    nodes: list[Node] = []
    for node in graph.nodes:
        if (node.op_type == "Reshape" and len(node.inputs) > 1 and node.inputs[0] in flowing
                and node.inputs[1] in inits and not node.attrs.get("allowzero", 0)):
            target = np.asarray(inits[node.inputs[1]])
            if target.ndim == 1 and target.size and int(target[0]) == 1:
                fixed = target.astype(np.int64).copy()
                fixed[0] = 0
                name = f"{node.inputs[1]}__{symbol}"
                inits[name] = fixed
                node = Node(node.op_type, (node.inputs[0], name) + node.inputs[2:], node.outputs,
                            dict(node.attrs), node.name, node.domain)
        nodes.append(node)
    return graph.replace(nodes=tuple(nodes), inputs=tuple(stamp(v) for v in graph.inputs),
                         outputs=tuple(stamp(v) for v in graph.outputs), initializers=inits, value_info={})


def _tensor_inputs(model: Model) -> list[Signature]:
    return [s for s in model.inputs if s.kind == "tensor"]


def batch_layout(model: Model) -> str:
    """'symbolic' (dim 0 of every input is one shared symbol), 'fixed1' (all 1), or 'none'."""
    ins = _tensor_inputs(model)
    if not ins or len(ins) != len(model.inputs) or any(s.shape is None or not s.shape for s in ins):
        return "none"
    if any(s.name in model.value_inputs for s in ins):
        return "none"
    lead = {s.shape[0] for s in ins}
    if len(lead) == 1 and isinstance(next(iter(lead)), str):
        return "symbolic"
    if lead == {1}:
        return "fixed1"
    return "none"


def batchable(model: Model, max_batch: int) -> Model:
    """``model`` itself, or a re-stamped copy (sharing params) when its batch is a fixed 1."""
    layout = batch_layout(model)
    if max_batch <= 1 or layout == "symbolic":
        return model
    if layout == "fixed1":
        graph = restamp_graph_batch(model.graph)
        return Model(graph, model.registry, params=model.params, source=model.source, check=False)
    raise BucketError(
        f"model {model.source or model.graph.name!r} has no batch dim to bucket: inputs "
        f"{[str(s) for s in model.inputs]} need one shared symbolic (or fixed 1) dim 0; "
        "set max_batch: 1 to serve it unbatched")


# ------------------------------------------------------------------ requests
@dataclass(frozen=True)
class Prepared:
    """A validated request: numpy inputs padded on bucketed dims, its rows and dim key."""

    feeds: Mapping[str, np.ndarray]
    rows: int
    key: tuple  # (dim symbol, bucket size) pairs: requests batch together only with equal keys
    sizes: Mapping[str, int]  # original sizes of bucketed symbols, to slice outputs back
    sequence: StreamRef | None = None  # a stateful model's stream (see :mod:`.sequences`)


@dataclass
class Batch:
    """A padded batch on its way through the device: the parts and their row offsets."""

    parts: list[Prepared]
    bucket: int
    rows: int
    outputs: Any  # device arrays, not yet on the host
    started: float


ProgressFn = Callable[[int, int, str], None]


def stderr_progress(done: int, total: int, label: str) -> None:
    """A one-line progress bar on stderr for warm-up."""
    width = 24
    filled = int(width * done / max(total, 1))
    sys.stderr.write(f"\rwarm-up {label}: [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


class BucketedModel:
    """A model run only at bucket shapes: warm up once, then pad, run and slice.

    Example:
        >>> bm = BucketedModel(jaxinfer.load("mlp.onnx"), BucketPolicy.for_max_batch(8))  # doctest: +SKIP
        >>> bm.warmup()                                    # compiles buckets 1, 2, 4, 8   # doctest: +SKIP
        >>> out = bm.run({"x": np.ones((3, 16), np.float32)})   # runs bucket 4, returns 3 rows  # doctest: +SKIP
    """

    def __init__(self, model: Model, policy: BucketPolicy | None = None,
                 sequences: SequencePolicy | None = None):
        policy = policy or BucketPolicy()
        self.source_model = model
        #: a stateful model's streams (one state each); None for a stateless model
        self.sequences: SequenceTable | None = None
        self._next_state: dict[str, str] = {}  # state value -> the output holding its next contents
        if model.stateful:
            self.sequences = SequenceTable(model.graph.state_init, sequences, name=model.source or model.graph.name)
            model, self._next_state = stateless_view(model)
        self.layout = batch_layout(model)
        if self.layout == "none" and policy.max_batch > 1:
            log.warning("model %s has no batch dim; serving it unbatched (max_batch 1)", model.source)
            policy = BucketPolicy((1,), policy.dims)
        self.policy = policy
        self.model = batchable(model, policy.max_batch)
        #: every input of the program run: the request's, then a stateful model's state values
        self.run_inputs = list(self.model.inputs)
        self.inputs = [s for s in self.run_inputs if s.name not in self._next_state]
        self.outputs = list(self.model.outputs[:len(self.source_model.outputs)])  # the state's come after
        self._check_dim_symbols()
        self.batched_outputs: set[str] = {s.name for s in self.model.outputs
                                          if s.shape and isinstance(s.shape[0], str)}
        self.warm_keys: set[tuple] = set()
        self.compiles_at_warmup: int | None = None
        self.late_compiles = 0

    # ---------------------------------------------------------------- shapes
    def _dim_symbols(self) -> set[str]:
        """The inputs' symbolic dims that take dim buckets: all but the batch dim (dim 0 too when the
        model has no batch dim, e.g. one with an input read on the host)."""
        first = 1 if self.layout != "none" else 0
        return {d for s in self.inputs if s.shape for d in s.shape[first:] if not isinstance(d, int)}

    def _check_dim_symbols(self) -> None:
        present = self._dim_symbols()
        unknown = sorted(set(self.policy.dims) - present)
        if unknown:
            raise BucketError(f"dim buckets {unknown} name no symbolic dim of the inputs; "
                              f"the inputs are {[str(s) for s in self.inputs]}")

    def _bucket_shapes(self) -> list[dict[str, tuple[int, ...]]]:
        """Every input shape combination to compile: batch sizes x dim buckets."""
        combos: list[dict[str, int]] = [{}]
        for sym, sizes in self.policy.dims.items():
            combos = [{**c, sym: s} for c in combos for s in sizes]
        unresolved = sorted(self._dim_symbols() - set(self.policy.dims))
        if unresolved:
            raise BucketError(f"inputs have dynamic dims {unresolved} without buckets; add them to the "
                              f"policy's dims (config 'dim_buckets'), e.g. {{{unresolved[0]!r}: [16, 32, 64]}}")
        out = []
        batch_sizes = self.policy.batch_sizes if self.layout != "none" else (None,)
        for b in batch_sizes:
            for combo in combos:
                shapes = {}
                for s in self.run_inputs:
                    dims = []
                    for axis, d in enumerate(s.shape or ()):
                        if axis == 0 and b is not None:
                            dims.append(b)
                        elif isinstance(d, int):
                            dims.append(d)
                        else:
                            dims.append(combo[d])
                    shapes[s.name] = tuple(dims)
                out.append(shapes)
        return out

    def _check_fits(self, shapes: Sequence[Mapping[str, tuple[int, ...]]]) -> None:
        """BucketError for a bucket whose inputs alone exceed the machine's memory (e.g. ``max_batch: 2**40``),
        before warm-up allocates its way up to it."""
        limit = memory_limit()
        if limit is None:
            return
        dtypes = {s.name: np.dtype(s.dtype if s.dtype is not None else np.float32) for s in self.run_inputs}
        for shape in shapes:
            need = sum(int(np.prod(dims, dtype=object)) * dtypes[name].itemsize for name, dims in shape.items())
            if need > limit[0]:
                raise BucketError(
                    f"bucket {dict(shape)} needs {need / 2**30:.1f} GiB for its inputs alone, more than "
                    f"{limit[0] / 2**30:.1f} GiB ({limit[1]}); lower max_batch (largest batch bucket "
                    f"{self.policy.max_batch}) or the dim buckets")

    def example_feeds(self, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        return {s.name: np.zeros(shapes[s.name], s.dtype) for s in self.run_inputs}

    # ---------------------------------------------------------------- warm-up
    def warmup(self, progress: ProgressFn | None = None, *, timing_runs: int = 2,
               label: str = "") -> dict[int, float]:
        """Compile every bucket and time it; returns {batch bucket: seconds} (the slowest dim combo)."""
        shapes = self._bucket_shapes()
        self._check_fits(shapes)
        timings: dict[int, float] = {}
        if self.model.value_inputs:  # zeros are no stand-in for a value that picks the program's shapes
            log.warning("model %s reads inputs %s on the host: each distinct value compiles on its first "
                        "request, so it is not warmed up", self.model.source or self.model.graph.name,
                        list(self.model.value_inputs))
            self.compiles_at_warmup = self.model.stats.compiles
            return timings
        for i, shape in enumerate(shapes):
            feeds = self.example_feeds(shape)
            outs = self.model.run(feeds)  # compiles
            self._learn_batched_outputs(shape, outs)
            best = float("inf")
            for _ in range(timing_runs):
                t = time.perf_counter()
                self.model.run(feeds)
                best = min(best, time.perf_counter() - t)
            bucket = self._rows_of(shape)
            timings[bucket] = max(timings.get(bucket, 0.0), best)
            self.warm_keys.add(self._shape_key(feeds))
            if progress:
                progress(i + 1, len(shapes), label or self.model.source or "model")
        self.compiles_at_warmup = self.model.stats.compiles
        return timings

    def _rows_of(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        if self.layout == "none":
            return 1
        return next(iter(shapes.values()))[0]

    def _learn_batched_outputs(self, shapes: Mapping[str, tuple[int, ...]], outs: Mapping[str, Any]) -> None:
        if self.layout == "none":
            return
        rows = self._rows_of(shapes)
        for s in self.model.outputs:  # a stateful model's next states too: a row per stream
            arr = outs[s.name]
            lead = np.shape(arr)[0] if np.ndim(arr) else None
            if s.name in self.batched_outputs and lead != rows:
                raise BucketError(f"output '{s.name}' should have batch {rows} at bucket {rows} but has shape "
                                  f"{np.shape(arr)}: the graph fixes its batch; set max_batch: 1")
            if s.shape is None and lead == rows and len(self.policy.batch_sizes) > 1:
                self.batched_outputs.add(s.name)

    @staticmethod
    def _shape_key(feeds: Mapping[str, np.ndarray]) -> tuple:
        return tuple((k, np.shape(v), np.asarray(v).dtype) for k, v in feeds.items())

    # --------------------------------------------------------------- requests
    def prepare(self, feeds: Mapping[str, Any], sequence: StreamRef | None = None) -> Prepared:
        """Validate one request against the signature and pad its bucketed dims; raises InputError.

        A stateful model's request names its stream (``sequence``); it carries one row, the stream's.
        """
        if self.sequences is not None:
            feeds = self._with_state_stand_in(feeds)
        checked = self.model._check_inputs(feeds)  # names, dtypes, ranks, fixed dims
        ordered: dict[str, np.ndarray] = {}
        rows = None
        sizes: dict[str, int] = {}
        for s in self.inputs:
            arr = np.asarray(checked[s.name])
            if self.layout != "none":
                if arr.ndim == 0:
                    raise InputError(f"input '{s.name}': expected a batch dim ({s}), got a scalar")
                if rows is None:
                    rows = arr.shape[0]
                elif arr.shape[0] != rows:
                    raise InputError(f"input '{s.name}' has batch {arr.shape[0]} but another input has {rows}")
            for axis, d in enumerate(s.shape or ()):
                if axis > 0 and isinstance(d, str) and d in self.policy.dims:
                    if arr.shape[axis] == 0:  # padding it would make up a whole bucket of padding
                        raise InputError(f"input '{s.name}': dim '{d}' (axis {axis}) is 0; a bucketed dim "
                                         "needs at least 1 element")
                    sizes[d] = arr.shape[axis]
            ordered[s.name] = arr
        if rows == 0:
            raise InputError("empty batch: inputs have 0 rows")
        key = tuple((sym, self.policy.dim_bucket(sym, n)) for sym, n in sorted(sizes.items()))
        if key:
            target = dict(key)
            for s in self.inputs:
                pads = [(0, 0)] * ordered[s.name].ndim
                for axis, d in enumerate(s.shape or ()):
                    if axis > 0 and isinstance(d, str) and d in target:
                        pads[axis] = (0, target[d] - ordered[s.name].shape[axis])
                if any(p[1] for p in pads):
                    ordered[s.name] = np.pad(ordered[s.name], pads)
        if self.sequences is None:
            return Prepared(ordered, rows if rows is not None else 1, key, sizes)
        if sequence is None:
            raise SequenceError(
                f"model '{self.sequences.name}' is stateful: each request needs a sequence_id parameter naming its "
                "stream (sequence_start=true on the stream's first request, sequence_end=true on its last)")
        return Prepared(ordered, 1, key, sizes, sequence)

    def _with_state_stand_in(self, feeds: Mapping[str, Any]) -> Any:
        """``feeds`` plus the initial state, so the program's signature check sees every input it takes."""
        assert self.sequences is not None
        if not isinstance(feeds, Mapping):
            return feeds  # the signature check says what inputs are
        takes = [s.name for s in self.inputs]
        clash = sorted(k for k in feeds if k in self._next_state)
        if clash:
            raise InputError(f"{clash} are the model's state, kept by the server for each sequence; send only "
                             f"the inputs {takes}")
        unknown = [k for k in feeds if k not in takes]
        if unknown:  # before the state joins in, so the message lists only what a caller sends
            raise InputError(f"unknown input name(s) {unknown}; this model takes {takes}")
        if self.layout != "none":
            for name, value in feeds.items():
                if np.ndim(value) and np.shape(value)[0] != 1:
                    raise InputError(f"input '{name}' has {np.shape(value)[0]} rows; a request of a stateful "
                                     "model's sequence carries one row (the stream's state is one row): send "
                                     "each stream as its own sequence_id")
        return {**feeds, **self.sequences.init}

    def split(self, prepared: Prepared) -> list[Prepared]:
        """Chunks of at most ``max_batch`` rows (a request larger than the largest bucket)."""
        step = self.policy.max_batch
        if self.layout == "none" or prepared.rows <= step:
            return [prepared]
        return [Prepared({k: v[i:i + step] for k, v in prepared.feeds.items()}, min(step, prepared.rows - i),
                         prepared.key, prepared.sizes) for i in range(0, prepared.rows, step)]

    def dispatch(self, parts: Sequence[Prepared]) -> Batch:
        """Concatenate, pad to the bucket and start the device run (inline on CPU); see :meth:`collect`."""
        rows = sum(p.rows for p in parts)
        if self.layout == "none":
            if len(parts) != 1:
                raise BucketError("an unbatched model runs one request at a time")
            feeds = dict(parts[0].feeds)
            bucket = 1
        else:
            bucket = self.policy.batch_bucket(rows)
            feeds = {}
            for s in self.inputs:
                first = parts[0].feeds[s.name]
                if len(parts) == 1 and first.shape[0] == bucket:  # fills its bucket: no copy needed
                    feeds[s.name] = first
                    continue
                buf = np.zeros((bucket,) + first.shape[1:], first.dtype)
                off = 0
                for p in parts:
                    buf[off:off + p.rows] = p.feeds[s.name]
                    off += p.rows
                feeds[s.name] = buf
        if self.sequences is not None:
            feeds.update(self._state_feeds(parts, bucket))
        key = self._shape_key(feeds)
        if key not in self.warm_keys:
            self.late_compiles += 1
            log.warning("shape %s was not warmed up; compiling now", key)
            self.warm_keys.add(key)
        started = time.perf_counter()
        outs = self.model.run_device(feeds)
        return Batch(list(parts), bucket, rows, outs, started)

    def _state_feeds(self, parts: Sequence[Prepared], bucket: int) -> dict[str, np.ndarray]:
        """Each part's stream state, stacked a row per part (the initial state in the padding rows)."""
        assert self.sequences is not None
        states = [self._run_state(p.sequence) for p in parts]  # type: ignore[arg-type]
        if self.layout == "none":
            return dict(states[0])
        feeds = {}
        for name, init in self.sequences.init.items():
            buf = np.empty((bucket,) + init.shape[1:], init.dtype)
            for i, state in enumerate(states):
                buf[i] = state[name][0]
            buf[len(states):] = init[0]
            feeds[name] = buf
        return feeds

    def _run_state(self, ref: StreamRef) -> dict[str, np.ndarray]:
        """The state ``ref``'s request runs on. A stream gone since the batcher checked it is one whose
        callers all gave up (a stream with one waiting is never dropped): its row runs on the initial
        state and is not stored, rather than failing the other streams of the batch."""
        assert self.sequences is not None
        try:
            return self.sequences.state(ref)
        except SequenceError:
            if self.sequences.waiting(ref):
                raise
            return self.sequences.init

    def _store_states(self, batch: Batch, gone: Collection[int]) -> None:
        """Keep each stream's next state (a copied row: the batch's arrays are not held on to), except for
        the parts in ``gone``: their callers gave up, so their streams stay where they were."""
        assert self.sequences is not None
        host = {var: np.asarray(batch.outputs[out]) for var, out in self._next_state.items()}
        for i, p in enumerate(batch.parts):
            if i in gone:
                continue
            if self.layout == "none":
                state = {var: arr.copy() for var, arr in host.items()}
            else:
                state = {var: arr[i:i + 1].copy() for var, arr in host.items()}
            self.sequences.store(p.sequence, state)  # type: ignore[arg-type]

    def collect(self, batch: Batch, gone: Collection[int] = ()) -> list[dict[str, np.ndarray]]:
        """Wait for the device, copy to host and slice each part's rows (and dims) back. A stateful model
        stores each part's next stream state, except for the parts (indices) in ``gone``."""
        if self.sequences is not None:
            self._store_states(batch, gone)
        host = {s.name: np.asarray(batch.outputs[s.name]) for s in self.outputs}
        results = []
        off = 0
        for p in batch.parts:
            one: dict[str, np.ndarray] = {}
            for s in self.outputs:
                arr = host[s.name]
                if s.name in self.batched_outputs:
                    arr = arr[off:off + p.rows]
                if p.sizes and s.shape:
                    index = [slice(None)] * arr.ndim
                    for axis, d in enumerate(s.shape):
                        if axis > 0 and isinstance(d, str) and d in p.sizes and axis < arr.ndim:
                            index[axis] = slice(0, p.sizes[d])
                    arr = arr[tuple(index)]
                one[s.name] = arr
            results.append(one)
            off += p.rows
        return results

    def run(self, feeds: Mapping[str, Any], sequence: StreamRef | None = None) -> dict[str, np.ndarray]:
        """Run one request synchronously through the buckets (split when oversize); a stateful model's
        request names its stream."""
        prepared = self.prepare(feeds, sequence)
        if self.sequences is None or prepared.sequence is None:
            return self._run_chunks(prepared)
        self.sequences.admit(prepared.sequence)
        try:
            return self._run_chunks(prepared)
        finally:
            self.sequences.release(prepared.sequence)

    def _run_chunks(self, prepared: Prepared) -> dict[str, np.ndarray]:
        outs = [self.collect(self.dispatch([c]))[0] for c in self.split(prepared)]
        return merge_rows(outs, self.batched_outputs)

    @property
    def compiles(self) -> int:
        return self.model.stats.compiles


def merge_rows(parts: Sequence[Mapping[str, np.ndarray]], batched: set[str]) -> dict[str, np.ndarray]:
    """Join the chunks of a split request back along the batch dim."""
    if len(parts) == 1:
        return dict(parts[0])
    return {k: (np.concatenate([p[k] for p in parts]) if k in batched else parts[0][k]) for k in parts[0]}
