"""``Model``: a graph made callable. Signature, params, the pure ``fn``, a
compiled-executable cache keyed by input shapes/dtypes, and ``run``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from . import aot, xla_dots
from .call_params import CallParams, LaidOutCall, ParamLayout, param_layout
from .conv_lowering import kept_channels_last
from .errors import InputError, OutOfMemoryError, UnsupportedOpsError, newer_opset_message
from .graph import Dim, Graph, ValueInfo
from .passes.layout import shared_conv_inputs
from .registry import Registry
from .tracer import is_out_of_memory, make_fn, static_names, unsupported_ops

#: Integer/bool initializers up to this many elements stay trace-time constants
#: (shape-like); everything else is a param (a traced argument) ...
SMALL_INT_CONSTANT = 64
#: ... except float scalars (at most this many elements), which are the graph's arithmetic
#: constants, not weights: as params XLA cannot fold them. GPT-2's tanh GELU computes
#: ``pow(x, 3.0)``, and with the exponent a runtime scalar XLA CPU runs the general
#: exp/log power (its two GELU fusions were 0.87 of 1.67 ms at batch 8; as a constant,
#: ``x*x*x``: the whole model 1.74x faster). Only scalars that plain arithmetic reads
#: (:data:`FOLDABLE_READERS`), not Div: XLA turns a division by a constant into a multiplication
#: by its reciprocal, which can round differently from the division (a quantizer's ``x / scale``
#: at a tie, ``floor(x / d)`` at an exact multiple).
SMALL_FLOAT_CONSTANT = 1
#: Op types (ONNX and TFLite names, upper case) whose float scalar inputs become constants.
FOLDABLE_READERS = frozenset({"ADD", "SUB", "MUL", "POW", "MAX", "MIN", "MAXIMUM", "MINIMUM", "CLIP",
                              "WHERE", "SELECT", "SELECT_V2", "SQUARED_DIFFERENCE", "EQUAL", "LESS", "GREATER",
                              "LESSOREQUAL", "GREATEROREQUAL", "LESS_EQUAL", "GREATER_EQUAL"})


@dataclass(frozen=True)
class Signature:
    """A model input or output: name, shape (str for symbolic dims, None unknown), dtype."""

    name: str
    shape: tuple[Dim, ...] | None
    dtype: np.dtype | None
    kind: str = "tensor"

    def __str__(self) -> str:
        shape = "?" if self.shape is None else "[" + ", ".join("?" if d is None else str(d) for d in self.shape) + "]"
        dtype = self.dtype.name if self.dtype is not None else "?"
        return f"{self.name}: {dtype}{shape}" if self.kind == "tensor" else f"{self.name}: {self.kind}"


def _signature(v: ValueInfo) -> Signature:
    return Signature(v.name, v.shape, v.dtype, v.kind)


@dataclass
class CompileStats:
    """Counters a test or a metrics endpoint can read."""

    traces: int = 0
    compiles: int = 0
    compile_seconds: float = 0.0
    cache_hits: int = 0
    keys: list[tuple] = field(default_factory=list)
    #: shape key -> the :data:`TUNE_CANDIDATES` name :attr:`Model.tune` kept for it
    tuned: dict[tuple, str] = field(default_factory=dict)


def _is_value_input(v: ValueInfo, needed: set[str]) -> bool:
    return v.name in needed or (v.dtype is not None and v.dtype == np.dtype(object))


def split_initializers(graph: Graph, registry: Registry) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(constants, params): initializers needed at trace time vs the weights pytree."""
    needed = static_names(graph, registry)
    readers: dict[str, set[str]] = {}
    for node in graph.nodes:
        for name in node.inputs:
            readers.setdefault(name, set()).add(node.op_type.upper() if node.domain in ("", "ai.onnx", "tflite") else "")
    consts: dict[str, np.ndarray] = {}
    params: dict[str, np.ndarray] = {}
    for name, value in graph.initializers.items():
        arr = np.asarray(value)
        small_int = arr.dtype.kind in "iub" and arr.size <= SMALL_INT_CONSTANT
        scalar = (arr.dtype.kind == "f" and arr.size <= SMALL_FLOAT_CONSTANT
                  and bool(readers.get(name)) and readers[name] <= FOLDABLE_READERS)
        if name in needed or small_int or scalar or arr.dtype == np.dtype(object):
            consts[name] = arr
        else:
            params[name] = arr
    return consts, params


#: XLA CPU's YNNPACK fusion, left to its default, can merge a chain of dense layers
#: with the reduction after them (e.g. fc6 -> fc7 -> fc8 -> softmax) into one
#: library fusion that runs ~200x slower than the dots run one by one (AlexNet at
#: batch 8: 4.9 s instead of ~0.1 s). Each dot is offloaded on its own instead: int8
#: dots need the library (XLA's own s8 dot is ~10x slower), and f32 dots gain from it at
#: 128+ rows (they lose at 8-32 rows: see :data:`TUNE_CANDIDATES`). Convolutions stay with
#: XLA: its own were faster than the library's on the light CNNs (1.19x in geomean) and the
#: TFLite conv stacks (benchmarks/profile_ynn_fusion.py).
YNN_FUSION_FLAG = "xla_cpu_experimental_ynn_fusion_type"
YNN_FUSION_TYPES = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"


#: The XLA CPU option sets :attr:`Model.tune` times against each other. Which is fastest
#: depends on the model and the shape: f32 dots at a few rows (8-32) ran ~1.6x faster in
#: XLA's own loops than in the library (the d1024 encoder at 1x8 tokens: 22 vs 36 ms), at
#: 128+ rows ~1.5x slower; small-channel convolutions gain from the library, large ones lose.
#: Elementwise fusions in the library (``dot+eltwise``) are not split over XLA's intra-op pool,
#: which XLA does to loop fusions of as few as 8K values (on 2 cores a jitted ``x + 1`` over 64K
#: int32 values took 35 us split, 12.9 us on one core). Some programs gain: the exported GPT-2 at batch 1 199 -> 128 us, the
#: dynamic-quantized BERT at batch 8 1.04 -> 0.76 ms; most lose at batch 8 (the QDQ BERT 1.46 ->
#: 2.47 ms), hence a candidate, not the default.
TUNE_CANDIDATES: dict[str, dict[str, str]] = {
    "dot": {YNN_FUSION_FLAG: YNN_FUSION_TYPES},
    "none": {YNN_FUSION_FLAG: ""},
    "dot+conv": {YNN_FUSION_FLAG: YNN_FUSION_TYPES + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"},
    "dot+eltwise": {YNN_FUSION_FLAG: YNN_FUSION_TYPES + ",LIBRARY_FUSION_TYPE_ELTWISE"},
}
#: Tuning times each candidate at most this many runs (fewer when one run is slow).
TUNE_RUNS = 5


def _seconds(fn: Any, runs: int, warmup: bool = True) -> float:
    """Fastest of ``runs`` timed calls of ``fn``, after one untimed call unless ``warmup`` is off (results waited for)."""
    if warmup:
        jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def fastest_executable(lowered: Any, args: tuple, candidates: Mapping[str, Mapping[str, Any]],
                       runs: int = TUNE_RUNS, budget_s: float = 2.0) -> tuple[str, Any]:
    """Compile ``lowered`` with each option set, time each on ``args``, return (name, executable) of the fastest.

    Each candidate gets up to ``runs`` timed runs, fewer when one run is slow (about
    ``budget_s`` per candidate); a candidate this backend refuses to compile is skipped.
    """
    best: tuple[float, str, Any] | None = None
    for name, options in candidates.items():
        try:
            exe = lowered.compile(dict(options) or None)
        except Exception:  # noqa: BLE001, S112 - an option set this XLA build lacks is not a candidate
            continue
        call = functools.partial(exe, *args)
        first = _seconds(call, 1)
        n = max(1, min(runs, int(budget_s / max(first, 1e-6))))
        t = min(first, _seconds(call, n - 1, warmup=False))
        if best is None or t < best[0]:
            best = (t, name, exe)
    if best is None:
        raise RuntimeError("no compiler option candidate compiled")
    return best[1], best[2]


def _options_apply() -> bool:
    """Whether our XLA CPU option sets apply: on CPU, unless ``XLA_FLAGS`` names the flag itself."""
    return jax.default_backend() == "cpu" and YNN_FUSION_FLAG not in os.environ.get("XLA_FLAGS", "")


def default_compiler_options() -> dict[str, str]:
    """XLA options each :class:`Model` compile passes (CPU only; ``XLA_FLAGS`` naming the flag wins)."""
    return {YNN_FUSION_FLAG: YNN_FUSION_TYPES} if _options_apply() else {}


def options_for(lowered: Any, options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` for this program. Only the default options are adjusted: the library's dots are turned
    off in a program without convolutions whose dots all have few rows, one streaming a big weight
    (:func:`jaxinfer.xla_dots.prefers_xla_loops`), and its convolutions turned on in a program whose
    convolutions are all small (:func:`jaxinfer.xla_dots.prefers_library_convs`)."""
    if options.get(YNN_FUSION_FLAG) != YNN_FUSION_TYPES:
        return dict(options)
    text = lowered.as_text()
    if xla_dots.prefers_xla_loops(text):
        return {**options, YNN_FUSION_FLAG: TUNE_CANDIDATES["none"][YNN_FUSION_FLAG]}
    if xla_dots.prefers_library_convs(text):
        return {**options, YNN_FUSION_FLAG: TUNE_CANDIDATES["dot+conv"][YNN_FUSION_FLAG]}
    return dict(options)


class Model:
    """A loaded model: ``run`` it, call it, or take its pure ``fn`` and ``params``.

    Example:
        >>> m = jaxinfer.load("squeezenet.onnx")          # doctest: +SKIP
        >>> out = m.run({"data_0": np.zeros((1, 3, 224, 224), np.float32)})  # doctest: +SKIP
        >>> y = jax.jit(m.fn)(m.params, {"data_0": x})     # doctest: +SKIP
    """

    def __init__(self, graph: Graph, registry: Registry, *, params: Mapping[str, Any] | None = None,
                 source: str = "", check: bool = True):
        if check:
            missing = unsupported_ops(graph, registry)
            if missing:
                raise UnsupportedOpsError(missing)
        self.graph = graph
        self.registry = registry
        self.source = source
        self.stats = CompileStats()
        self._lock = threading.Lock()
        consts, params0 = split_initializers(graph, registry)
        self._constants = consts
        if params is None:
            params = {k: jax.device_put(v) for k, v in params0.items()}
        self.params: dict[str, Any] = dict(params)
        needed = static_names(graph, registry)
        self.value_inputs = tuple(v.name for v in graph.inputs if _is_value_input(v, needed))
        self.inputs = [_signature(v) for v in graph.inputs]
        self.outputs = [_signature(v) for v in graph.outputs]
        # values read by a convolution and by other nodes, written once channels-last (conv_lowering)
        kept = dict.fromkeys(shared_conv_inputs(graph), kept_channels_last)
        self.fn = make_fn(graph, registry, consts, after=kept)
        self.stateful = bool(graph.state_vars)
        self.state: dict[str, Any] = {}
        self.reset_state()
        self._cache: dict[tuple, Any] = {}
        self._key_locks: dict[tuple, threading.Lock] = {}
        # (name, shape, dtype) per feed -> executable, for feeds already validated once (see _fast_exe).
        self._fast: dict[tuple, Any] = {}
        # (the params dict it was made from, its layout, the call params so laid out): see _call_params
        self._laid_out: tuple[dict[str, Any], ParamLayout, CallParams] | None = None
        self._output_names = tuple(s.name for s in self.outputs)
        #: passed to ``jax.jit(...).lower(...).compile(compiler_options=...)``; set before the first run to change.
        self.compiler_options: dict[str, Any] = default_compiler_options()
        #: CPU, stateless models: compile each new input shape with every :data:`TUNE_CANDIDATES`
        #: option set, time them on that first input and keep the fastest (``stats.tuned`` says
        #: which). Costs a compile and a few runs per candidate per shape; stored executables
        #: (aot) are not used while tuning.
        self.tune: bool = False

    # ----------------------------------------------------------------- state
    def reset_state(self) -> None:
        """Put every state variable back to its initial value."""
        self.state = {k: jax.device_put(np.asarray(v)) for k, v in self.graph.state_init.items()}

    # ------------------------------------------------------------ validation
    def check_inputs(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Validate and convert ``feeds`` against the signature (raises :class:`InputError`)."""
        return self._check_inputs(feeds)

    def _check_inputs(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(feeds, Mapping):
            raise InputError(f"inputs must be a dict {{input name: array}}, got {type(feeds).__name__}; "
                             f"this model takes {[s.name for s in self.inputs]}")
        known = {s.name: s for s in self.inputs}
        unknown = [k for k in feeds if k not in known]
        if unknown:
            raise InputError(f"unknown input name(s) {unknown}; this model takes {list(known)}")
        missing = [k for k in known if k not in feeds]
        if missing:
            raise InputError(f"missing input(s) {missing}; expected {[str(known[k]) for k in missing]}")
        out: dict[str, Any] = {}
        symbols: dict[str, tuple[int, str]] = {}
        for name, sig in known.items():
            value = feeds[name]
            if sig.kind == "sequence":
                if not isinstance(value, (list, tuple)):
                    raise InputError(f"input '{name}': expected a sequence (list of arrays), got {type(value).__name__}")
                out[name] = [np.asarray(v) for v in value]
                continue
            if sig.kind == "optional":
                out[name] = self._optional_value(name, value)
                continue
            arr = self._as_array(name, value, sig)
            if sig.shape is not None:
                if arr.ndim != len(sig.shape):
                    raise InputError(f"input '{name}': expected rank {len(sig.shape)} {str(sig)}, got shape {arr.shape}")
                for axis, (want, got) in enumerate(zip(sig.shape, arr.shape)):
                    if isinstance(want, int) and want > 0 and want != got:
                        raise InputError(f"input '{name}': dim {axis} must be {want} ({sig}), got shape {arr.shape}")
                    if isinstance(want, str) and want:
                        seen = symbols.setdefault(want, (got, name))
                        if seen[0] != got:
                            raise InputError(
                                f"input '{name}': dim {axis} ('{want}') is {got} but input '{seen[1]}' "
                                f"has '{want}' = {seen[0]}; symbolic dims with one name must agree")
            out[name] = arr
        return out

    def _optional_value(self, name: str, value: Any) -> Any:
        """An optional input: None (empty), a list (optional sequence) or an array (optional tensor)."""
        if value is None:
            return None
        elem = next(v.elem for v in self.graph.inputs if v.name == name)
        if elem is not None and elem.kind == "sequence":
            if not isinstance(value, (list, tuple)):
                raise InputError(f"input '{name}': expected an optional sequence (list of arrays or None), "
                                 f"got {type(value).__name__}")
            return [np.asarray(v) for v in value]
        return np.asarray(value)

    @staticmethod
    def _as_array(name: str, value: Any, sig: Signature) -> np.ndarray:
        """``value`` as the array input ``name`` takes; InputError where that would lose or invent data.

        Arrays must have the input's dtype (a byte-swapped one is converted: no value changes). Lists
        and scalars take numpy's type and then convert only within a kind or upwards (ints to floats,
        floats to a narrower float), integers within the target's range: ``[1.7]`` for an int64 input
        or ``["False"]`` for a bool one is refused rather than truncated or read as true.
        """
        if value is None:
            raise InputError(f"input '{name}' is None; expected an array ({sig})")
        if isinstance(value, jax.Array):
            value = np.asarray(value)
        if isinstance(value, np.ndarray) or isinstance(value, np.generic):
            arr = np.asarray(value)
            if sig.dtype is not None and arr.dtype != sig.dtype:
                if arr.dtype.newbyteorder("=") == sig.dtype:
                    return arr.astype(sig.dtype)
                raise InputError(f"input '{name}': expected dtype {sig.dtype.name}, got {arr.dtype.name} ({sig})")
            if sig.dtype is None and arr.dtype.kind in "OV":  # an untyped input: numbers only
                raise InputError(f"input '{name}': {arr.dtype} arrays are not supported; expected numbers ({sig})")
            return arr
        try:
            raw = np.asarray(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise InputError(f"input '{name}': cannot convert {type(value).__name__} to {sig}: {e}") from e
        if sig.dtype is None or raw.dtype == sig.dtype:
            if raw.dtype.kind in "OV" and sig.dtype is None:
                raise InputError(f"input '{name}': cannot convert {type(value).__name__} to {sig}: ragged, "
                                 "None or non-numeric values")
            return raw
        ints = raw.dtype.kind in "iu" and sig.dtype.kind in "iu"  # checked by range below
        if raw.size and not ints and not np.can_cast(raw.dtype, sig.dtype, casting="same_kind"):
            raise InputError(f"input '{name}': {type(value).__name__} of {raw.dtype.name} values cannot become "
                             f"{sig.dtype.name} without changing them ({sig})")
        if raw.size and ints:
            info = np.iinfo(sig.dtype)
            if raw.min() < info.min or raw.max() > info.max:
                raise InputError(f"input '{name}': values outside {sig.dtype.name}'s range [{info.min}, {info.max}]")
        return raw.astype(sig.dtype)

    # ----------------------------------------------------------- compilation
    def _key(self, feeds: Mapping[str, Any]) -> tuple:
        parts = []
        for name, v in feeds.items():
            if name in self.value_inputs:
                parts.append((name, "value", _value_digest(v)))
            else:
                parts.append((name, _shape_sig(v)))
        return tuple(parts)

    def compiled(self, feeds: Mapping[str, Any]) -> Any:
        """The executable for these inputs' shapes/dtypes (value inputs: values), compiled once."""
        key = self._key(feeds)
        exe = self._cache.get(key)
        if exe is not None:
            self.stats.cache_hits += 1
            return exe
        with self._lock:  # one lock per shape key: different shapes compile in parallel
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:
            exe = self._cache.get(key)
            if exe is None:
                try:
                    exe = self._compile(key, feeds)
                except jax.errors.JaxRuntimeError as e:
                    self._raise_if_out_of_memory(e, "compiling", feeds)
                    raise
                self._cache[key] = exe
        return exe

    def _compile(self, key: tuple, feeds: Mapping[str, Any]) -> Any:
        static = {k: v for k, v in feeds.items() if k in self.value_inputs}
        dynamic = {k: v for k, v in feeds.items() if k not in self.value_inputs}
        fn = self.fn
        host_outputs: dict[str, Any] = {}  # string outputs, computed on the host at trace time

        def split_host(outs: dict[str, Any]) -> dict[str, Any]:
            for k, v in outs.items():
                if isinstance(v, np.ndarray) and v.dtype == np.dtype(object):
                    host_outputs[k] = v
            return {k: (None if k in host_outputs else v) for k, v in outs.items()}

        stats = self.stats
        start = time.perf_counter()
        layout, params = self._call_params()
        if self.stateful:
            def call(params: Any, state: Any, inputs: Any) -> Any:
                stats.traces += 1
                outs, new_state = fn(layout.unpack(params), state, {**inputs, **static})
                return split_host(outs), new_state

            exe = self.compile_lowered(jax.jit(call).lower(params, self.state, dynamic))
        else:
            def call(params: Any, inputs: Any) -> Any:  # type: ignore[misc]
                stats.traces += 1
                return split_host(fn(layout.unpack(params), {**inputs, **static}))

            exe = None
            if self.tune and _options_apply():
                choice, exe = fastest_executable(jax.jit(call).lower(params, dynamic), (params, dynamic),
                                                 TUNE_CANDIDATES)
                self.stats.tuned[key] = choice
            elif not static and aot.export_dir() is not None:  # a warm process skips tracing (see aot.py)
                digest = aot.program_digest(self.graph, self._constants, (params, dynamic), self.compiler_options)
                exe = aot.compile_exported(call, (params, dynamic), digest, self.compile_lowered,
                                           may_save=lambda: not host_outputs)
            if exe is None:
                exe = self.compile_lowered(jax.jit(call).lower(params, dynamic))
        if host_outputs:
            exe = _WithHostOutputs(exe, host_outputs, self.stateful)
        exe = LaidOutCall(exe, layout)
        with self._lock:
            self.stats.compiles += 1
        self.stats.compile_seconds += time.perf_counter() - start
        self.stats.keys.append(key)
        return exe

    def _call_params(self) -> tuple[ParamLayout, CallParams]:
        """How this model's executables take :attr:`params` (:mod:`jaxinfer.call_params`: a tuple, the scalars
        packed) and the params so laid out; made again when :attr:`params` is replaced by another dict."""
        laid_out = self._laid_out
        if laid_out is None or laid_out[0] is not self.params:
            layout = param_layout(self.params)
            laid_out = self._laid_out = (self.params, layout, layout.pack(self.params))
        return laid_out[1], laid_out[2]

    def compile_lowered(self, lowered: Any) -> Any:
        """Compile a lowered program with :attr:`compiler_options` as :func:`options_for` adapts them
        (the Decoder compiles its prefill and decode programs of this model through it too)."""
        return lowered.compile(options_for(lowered, self.compiler_options) or None)

    def warmup(self, feeds: Mapping[str, Any]) -> None:
        """Compile for these inputs' shapes without running."""
        self.compiled(self._check_inputs(feeds))

    # ------------------------------------------------------------- running
    def _fast_exe(self, feeds: Mapping[str, Any]) -> Any:
        """The executable for ``feeds`` when this exact (name, shape, dtype) layout passed the checks before.

        Validation and the cache key depend only on the names, shapes and dtypes of
        plain numpy feeds, so a layout seen once needs neither again: this lookup is
        what keeps ``run``'s fixed cost near the bare jitted call's. None means "take
        the checked path" (other value types, value inputs, a first call).
        """
        if self.value_inputs or type(feeds) is not dict:
            return None
        parts = []
        for name, v in feeds.items():
            if type(v) is not np.ndarray:
                return None
            parts.append((name, v.shape, v.dtype))
        exe = self._fast.get(tuple(parts))
        if exe is not None:
            self.stats.cache_hits += 1
        return exe

    def _remember_fast(self, feeds: Mapping[str, Any], checked: Mapping[str, Any], exe: Any) -> None:
        """Record a validated all-numpy layout of ``feeds`` for :meth:`_fast_exe`.

        Only when the checks passed every feed through unchanged (no cast, no reshape, no
        optional input filled in), so the raw feeds of a later call are what ``exe`` expects.
        """
        if self.value_inputs or type(feeds) is not dict or feeds.keys() != checked.keys():
            return
        if all(type(v) is np.ndarray and type(checked[k]) is np.ndarray and checked[k].shape == v.shape
               and checked[k].dtype == v.dtype for k, v in feeds.items()):
            self._fast[tuple((k, v.shape, v.dtype) for k, v in feeds.items())] = exe

    def run_device(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Like :meth:`run` but returns device arrays (no host copy), for pipelines."""
        exe = self._fast_exe(feeds)
        given = feeds
        if exe is None:
            checked = self._check_inputs(feeds)
            exe = self.compiled(checked)
            self._remember_fast(feeds, checked, exe)
            feeds = {k: v for k, v in checked.items() if k not in self.value_inputs}
        layout, params = self._call_params()
        if exe.layout is not layout:  # params replaced since compiling: the same layout, or (slowly) another
            if exe.layout == layout:
                exe.layout = layout
            else:
                params = exe.layout.pack(self.params)
        try:  # free until something is raised (Python 3.11+): the fast path's cost is unchanged
            if self.stateful:
                outs, self.state = exe.packed(params, self.state, feeds)
                return outs
            return exe.packed(params, feeds)
        except jax.errors.JaxRuntimeError as e:
            self._raise_if_out_of_memory(e, "running", given)
            raise

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Any]:
        """Run on a dict of inputs; returns ``{output name: np.ndarray}`` in graph output order.

        Raises:
          InputError: a feed does not fit the signature.
          OutOfMemoryError: these inputs need more memory than the device has (smaller ones may run).
        """
        outs = self.run_device(feeds)
        try:  # a device reports a failed asynchronous run when its outputs are read
            return {name: _to_host(outs[name]) for name in self._output_names}
        except jax.errors.JaxRuntimeError as e:
            self._raise_if_out_of_memory(e, "running", feeds)
            raise

    def _raise_if_out_of_memory(self, error: jax.errors.JaxRuntimeError, doing: str, feeds: Mapping[str, Any]) -> None:
        """Raise :class:`OutOfMemoryError` from ``error`` when it is XLA's out-of-memory status, naming the
        model, the inputs' shapes and the device; return otherwise (the caller re-raises ``error``)."""
        if not is_out_of_memory(error):
            return
        shown = ", ".join(f"{k}: {_describe(v, k in self.value_inputs)}" for k, v in feeds.items()) or "none"
        device = next((d for v in jax.tree_util.tree_leaves(self.params) if isinstance(v, jax.Array)
                       for d in v.devices()), None) or jax.devices()[0]
        first = (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
        raise OutOfMemoryError(
            f"model '{self.source or self.graph.name}' needs more memory than the device has ({device}) "
            f"{doing} it for inputs {{{shown}}}: {first}. Smaller inputs (a smaller batch, shorter "
            "sequences) may fit; this model and other input shapes stay usable.") from error

    def __call__(self, **feeds: Any) -> dict[str, Any]:
        return self.run(feeds)

    # ------------------------------------------------------------ reporting
    def info(self) -> dict[str, Any]:
        """A summary: signature, opsets, op histogram, params bytes, notes (host-evaluated inputs, opsets
        newer than jaxinfer implements)."""
        params_bytes = int(sum(np.asarray(v).nbytes if not hasattr(v, "nbytes") else v.nbytes
                               for v in jax.tree_util.tree_leaves(self.params)))
        notes = []
        if self.value_inputs:
            notes.append(
                f"inputs {list(self.value_inputs)} set shapes or are strings: their values are read on the host "
                "at trace time and each distinct value compiles once")
        notes.extend(newer_opset_message(*found) for found in self.registry.newer_opsets(self.graph.opsets))
        return {
            "source": self.source,
            "format": self.graph.fmt,
            "inputs": [str(s) for s in self.inputs],
            "outputs": [str(s) for s in self.outputs],
            "opsets": dict(self.graph.opsets),
            "ops": self.graph.op_histogram(),
            "nodes": sum(1 for _ in self.graph.walk()),
            "params": len(self.params),
            "params_bytes": params_bytes,
            "constants": len(self._constants),
            "stateful": self.stateful,
            "notes": notes,
        }

    def shard(self, config: Any = None, **overrides: Any) -> Model:
        """This model over a device mesh: a dict, a dataclass or a YAML path (see jaxinfer.sharding)."""
        from .sharding import shard

        return shard(self, config, **overrides)

    def with_params(self, params: Mapping[str, Any]) -> Model:
        """A new Model sharing this graph with other params (e.g. quantized)."""
        return Model(self.graph, self.registry, params=params, source=self.source, check=False).compiled_like(self)

    def compiled_like(self, other: Model) -> Model:
        """Take ``other``'s compile settings (:attr:`compiler_options`, :attr:`tune`); returns self."""
        self.compiler_options = dict(other.compiler_options)
        self.tune = other.tune
        return self

    def __repr__(self) -> str:
        ins = ", ".join(str(s) for s in self.inputs)
        outs = ", ".join(str(s) for s in self.outputs)
        return f"Model({self.source or self.graph.name!r}: ({ins}) -> ({outs}))"


class _WithHostOutputs:
    """An executable plus outputs that were fully computed on the host (strings)."""

    def __init__(self, exe: Any, host: dict[str, Any], stateful: bool):
        self._exe, self._host, self._stateful = exe, host, stateful

    def __call__(self, *args: Any) -> Any:
        result = self._exe(*args)
        if self._stateful:
            outs, state = result
            return {**outs, **self._host}, state
        return {**result, **self._host}


def _shape_sig(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return tuple(_shape_sig(x) for x in v)
    return (tuple(v.shape), str(v.dtype))


def _value_digest(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return tuple(_value_digest(x) for x in v)
    arr = np.asarray(v)
    return (arr.shape, str(arr.dtype), aot.array_digest(arr))


def _describe(v: Any, value: bool = False) -> str:
    """``float32[8, 3]`` for an array (``value``: with its values when it has at most 8), the same per item
    for a sequence, ``None``, or the type's name."""
    if v is None:
        return "None"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_describe(x, value) for x in v) + "]"
    if not (hasattr(v, "shape") and hasattr(v, "dtype")):
        try:
            v = np.asarray(v)
        except Exception:  # noqa: BLE001 - described by its type alone
            return type(v).__name__
    shown = f"{np.dtype(v.dtype).name}{list(v.shape)}"
    return f"{shown} = {np.asarray(v).tolist()}" if value and np.size(v) <= 8 else shown


def _to_host(v: Any) -> Any:
    if v is None:
        return None
    if isinstance(v, (list, tuple)):
        return [_to_host(x) for x in v]
    return np.asarray(v)


def output_list(model: Model, outs: Mapping[str, Any]) -> list[Any]:
    return [outs[s.name] for s in model.outputs]


def names_of(signatures: Iterable[Signature]) -> list[str]:
    return [s.name for s in signatures]
