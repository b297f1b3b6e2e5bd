"""The tracer: a Graph plus an op registry become one pure JAX function.

Nodes are evaluated in order over an environment of named values. A value is
either *concrete* (numpy or a concrete jax array: constants, shapes, anything
computed only from them) or a tracer. A node whose inputs are all concrete is
evaluated eagerly at trace time (``jax.ensure_compile_time_eval``), so shape
arithmetic folds to Python/numpy values and XLA sees static shapes. Inputs an
op declares static must be concrete; a tracer there is a clear error naming the
node, the slot and where the value came from.

Every dot and convolution in the function asks for full float32 products
(:data:`FLOAT_PRECISION`, a ``jax.default_matmul_precision`` scope around the graph's
evaluation), as ONNX and TFLite define them: XLA GPU otherwise runs precision-less float32
dots in TF32 (an H200 run: ONNX LSTM/GRU/RNN 2e-4..1e-3 off onnxruntime, a TFLite float conv
fixture 8e-3 off LiteRT). The scope is inside ``fn``, so ``jax.jit(model.fn)`` gets it too.
"""

from __future__ import annotations

import functools
import inspect
import keyword
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from .errors import JaxinferError, OpError, OutOfMemoryError, UnsupportedOp, UnsupportedOpsError
from .graph import Graph, Node
from .registry import OpDef, Registry

Env = dict[str, Any]

#: Outputs larger than this (elements) are not embedded as folded constants
#: unless a later op needs their value at trace time.
FOLD_LIMIT = 1 << 16
#: No value may have more elements than this (4 TiB of float32): more is a corrupt or hostile shape,
#: and XLA aborts the process on shapes whose element count overflows int64.
MAX_ELEMENTS = 1 << 40
#: The matmul/conv precision every model function traces under (see the module docstring).
FLOAT_PRECISION = "highest"


def is_concrete(value: Any) -> bool:
    """True when ``value`` (array, list of arrays, None) holds no tracer."""
    if isinstance(value, jax.core.Tracer):
        return False
    if isinstance(value, (list, tuple)):
        return all(is_concrete(v) for v in value)
    return True


def _size(value: Any) -> int:
    if isinstance(value, (list, tuple)):
        return sum(_size(v) for v in value)
    return int(np.size(value)) if value is not None else 0


def _opset_for(opsets: Mapping[str, int], domain: str) -> int:
    d = "" if domain in ("", "ai.onnx") else domain
    if d in opsets:
        return opsets[d]
    return opsets.get("*", 1)


def resolve(node: Node, registry: Registry, opsets: Mapping[str, int]) -> OpDef | None:
    return registry.resolve(node.domain, node.op_type, _opset_for(opsets, node.domain))


def unsupported_ops(graph: Graph, registry: Registry) -> tuple[UnsupportedOp, ...]:
    """Every op in ``graph`` (subgraphs included) the registry cannot run, grouped."""
    missing: dict[tuple[str, str, int], list[str]] = {}
    for node, _ in graph.walk():
        if resolve(node, registry, graph.opsets) is None:
            key = (node.domain, node.op_type, _opset_for(graph.opsets, node.domain))
            missing.setdefault(key, []).append(node.label)
    return tuple(UnsupportedOp(t, d, v, tuple(n)) for (d, t, v), n in sorted(missing.items()))


def static_names(graph: Graph, registry: Registry) -> set[str]:
    """Names whose values must be known at trace time.

    Walks back from every declared-static input slot through producers, except
    through slots of which only the shape is read (``Shape``, ``Size``). Graph
    inputs in the result are "value inputs": compiled per distinct value.
    """
    producers: dict[str, tuple[Node, OpDef | None]] = {}
    needed: list[str] = []
    for node, _ in graph.walk():
        opdef = resolve(node, registry, graph.opsets)
        for out in node.outputs:
            producers[out] = (node, opdef)
        if opdef is None:
            continue
        for i, name in enumerate(node.inputs):
            if name and (opdef.is_static_slot(i) or opdef.host):
                needed.append(name)
    result: set[str] = set()
    while needed:
        name = needed.pop()
        if name in result:
            continue
        result.add(name)
        node_def = producers.get(name)
        if node_def is None:
            continue
        node, opdef = node_def
        free = opdef.value_free if opdef else ()
        needed.extend(n for i, n in enumerate(node.inputs) if n and i not in free)
        for sub in node.subgraphs():
            needed.extend(o.name for o in sub.outputs)
    return result


class Subgraph:
    """A graph-valued attribute (If/Loop/Scan body) as a callable: ``body(*inputs) -> tuple``.

    It closes over the enclosing environment, so bodies may read outer values.
    """

    def __init__(self, graph: Graph, registry: Registry, opsets: Mapping[str, int], outer: Env):
        self.graph = graph
        self._registry = registry
        self._opsets = opsets
        self._outer = outer

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.graph.input_names

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.graph.output_names

    @property
    def n_inputs(self) -> int:
        return len(self.graph.inputs)

    @property
    def n_outputs(self) -> int:
        return len(self.graph.outputs)

    def __call__(self, *args: Any) -> tuple[Any, ...]:
        if len(args) != self.n_inputs:
            raise OpError(f"subgraph '{self.graph.name}' takes {self.n_inputs} inputs, got {len(args)}")
        env = dict(self._outer)
        env.update(zip(self.input_names, args))
        return evaluate(self.graph, self._registry, env, self._opsets)


def _kwarg_name(attr: str) -> str:
    return attr + "_" if keyword.iskeyword(attr) else attr


@functools.lru_cache(maxsize=None)
def _required_attrs(fn: Callable[..., Any]) -> tuple[str, ...]:
    """The attributes ``fn`` cannot do without: its keyword-only parameters without a default."""
    params = inspect.signature(fn).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty)


def _check_required_attrs(node: Node, opdef: OpDef, kwargs: Mapping[str, Any]) -> None:
    """OpError naming the attributes a node lacks that its op requires (a contrib op has no ONNX schema to
    catch it at load, and Python's own message would not say which node)."""
    missing = [name.rstrip("_") for name in _required_attrs(opdef.fn) if name not in kwargs]
    if missing:
        raise OpError(f"{node.op_type} node '{node.label}': required attribute(s) {missing} missing; "
                      f"{node.op_type} needs {list(a.rstrip('_') for a in _required_attrs(opdef.fn))}")


def _static_value(value: Any, node: Node, slot: int) -> Any:
    if value is None:
        return None
    if not is_concrete(value):
        raise OpError(
            f"{node.op_type} node '{node.label}': input #{slot} ('{node.inputs[slot]}') must be known "
            "at trace time (it sets a shape, axis or size) but depends on runtime values. "
            "Feed it from constants/shapes, or run the model through Model.run, which compiles "
            "per distinct value of such inputs."
        )
    if isinstance(value, (list, tuple)):
        return type(value)(np.asarray(v) for v in value)
    return np.asarray(value)


def run_node(node: Node, env: Env, registry: Registry, opsets: Mapping[str, int], keep: set[str], *,
             at_load: bool = False) -> None:
    """Evaluate one node, writing its outputs into ``env`` (``at_load``: by constant folding, once)."""
    opdef = resolve(node, registry, opsets)
    if opdef is None:
        op = UnsupportedOp(node.op_type, node.domain, _opset_for(opsets, node.domain), (node.label,))
        raise UnsupportedOpsError((op,))
    args: list[Any] = []
    for slot, name in enumerate(node.inputs):
        if not name:
            args.append(None)
            continue
        if name not in env:
            raise OpError(f"{node.op_type} node '{node.label}': input '{name}' is not defined before use (no graph "
                          "input, initializer or earlier node gives it: a missing value, a cycle, or nodes out "
                          "of topological order)")
        value = env[name]
        args.append(_static_value(value, node, slot) if opdef.is_static_slot(slot) else value)
    while args and args[-1] is None:
        args.pop()
    kwargs: dict[str, Any] = {}
    for attr, value in node.attrs.items():
        if isinstance(value, Graph):
            value = Subgraph(value, registry, opsets, env)
        kwargs[_kwarg_name(attr)] = value
    context = {
        "_num_outputs": len(node.outputs),
        "_opset": _opset_for(opsets, node.domain),
        "_node_name": node.label,
        "_at_load": at_load,
    }
    kwargs.update({k: context[k] for k in opdef.context if k in context})

    _check_required_attrs(node, opdef, kwargs)
    concrete = not opdef.random and all(is_concrete(a) for a in args)
    try:
        if concrete and not opdef.host and any(opdef.is_static_slot(i) for i in range(len(args))):
            # its output shape comes from input values: check it before anything is allocated
            _check_sizes(node, _abstract(lambda: opdef.fn(*args, **kwargs)))
        if concrete:
            with jax.ensure_compile_time_eval():
                result = opdef.fn(*args, **kwargs)
            if not all(o in keep for o in node.outputs) and _size(result) > FOLD_LIMIT and not opdef.host:
                result = opdef.fn(*args, **kwargs)  # stage it: too big to embed as a constant
        else:
            if opdef.host:
                raise OpError(
                    f"{node.op_type} node '{node.label}': its output shape depends on input values, "
                    "which are not known at trace time here; run it through Model.run (host evaluation) "
                    "or feed it constants."
                )
            result = opdef.fn(*args, **kwargs)
    except JaxinferError:
        raise
    except TypeError as e:
        if "unexpected keyword argument" in str(e):
            raise OpError(f"{node.op_type} node '{node.label}': unsupported attribute: {e}") from e
        raise OpError(f"{node.op_type} node '{node.label}' failed: {e}") from e
    except Exception as e:  # noqa: BLE001 - re-raised with the node named
        if is_out_of_memory(e):  # evaluated eagerly at trace time (its inputs are constants): too big to allocate
            raise OutOfMemoryError(f"{node.op_type} node '{node.label}': evaluating it at trace time ran out of "
                                   f"memory: {e}") from e
        raise OpError(f"{node.op_type} node '{node.label}' failed: {type(e).__name__}: {e}") from e

    _check_sizes(node, result)
    outputs = result if isinstance(result, tuple) else (result,)
    for i, name in enumerate(node.outputs):
        if not name:
            continue
        if i >= len(outputs):
            raise OpError(f"{node.op_type} node '{node.label}' produced {len(outputs)} outputs, graph wants output #{i} '{name}'")
        env[name] = outputs[i]


def _abstract(fn: Callable[[], Any]) -> Any:
    """``fn``'s output shapes without running it; None where it cannot be traced abstractly (an op that
    reads values on the host), which the real evaluation then checks."""
    try:
        return jax.eval_shape(fn)
    except Exception:  # noqa: BLE001 - the op itself runs next and reports its own errors
        return None


def _check_sizes(node: Node, result: Any) -> None:
    """Refuse an output of ``node`` (arrays or shape structs) too large to exist.

    Raises:
      OpError: it has more than :data:`MAX_ELEMENTS` elements.
      OutOfMemoryError: its bytes exceed :func:`memory_limit` (no memory of this machine could hold it).
    """
    outputs = result if isinstance(result, tuple) else (result,)
    for i, out in enumerate(outputs):
        shape = getattr(out, "shape", None)
        if shape is None or not all(isinstance(d, int) for d in shape):
            continue
        n = math.prod(shape)
        name = node.outputs[i] if i < len(node.outputs) else f"#{i}"
        if n > MAX_ELEMENTS:
            raise OpError(f"{node.op_type} node '{node.label}': output '{name}' would have shape {list(shape)} "
                          f"({n} elements); at most {MAX_ELEMENTS} are supported")
        limit = memory_limit()
        dtype = _dtype_or_none(getattr(out, "dtype", None))
        if limit is None or dtype is None or n * dtype.itemsize <= limit[0]:
            continue
        raise OutOfMemoryError(
            f"{node.op_type} node '{node.label}': output '{name}' would have shape {list(shape)} of {dtype.name}, "
            f"{_gib(n * dtype.itemsize)} ({n * dtype.itemsize} bytes), more than this machine can hold: "
            f"{_gib(limit[0])} ({limit[1]}). The inputs' shapes (a smaller batch or shorter inputs) or the "
            "model's own constants set this size.")


def _dtype_or_none(dtype: Any) -> np.dtype | None:
    try:
        return np.dtype(dtype) if dtype is not None else None
    except TypeError:
        return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is XLA's out-of-memory status (compiling, allocating or running)."""
    return isinstance(error, jax.errors.JaxRuntimeError) and "RESOURCE_EXHAUSTED" in str(error)


@functools.cache
def memory_limit() -> tuple[int, str] | None:
    """(bytes, what they are): the most memory any one value on this machine could occupy; None if unknown.

    The larger of the host's (physical memory, capped by this process's cgroup limit, plus swap)
    and the default backend's devices' together (``memory_stats()['bytes_limit']`` summed, for a
    value sharded over all of them), times the number of processes (hosts) JAX runs on. A value
    above it cannot be allocated anywhere, whatever XLA fuses; one below it may still not fit on
    one device, which :class:`~jaxinfer.model.Model` reports when XLA runs out of memory.
    """
    host = _host_bytes()
    devices, count, kind = 0, 0, ""
    try:
        for d in jax.local_devices():
            stats = d.memory_stats() or {}
            if stats.get("bytes_limit"):
                devices += int(stats["bytes_limit"])
                count, kind = count + 1, d.platform
        hosts = max(1, jax.process_count())
    except Exception:  # noqa: BLE001 - a backend without memory stats: the host's memory decides
        hosts = 1
    where = f" on each of {hosts} hosts" if hosts > 1 else ""
    if devices > host:
        return devices * hosts, f"the memory of {count} {kind} device(s) together{where}"
    return (host * hosts, f"host memory plus swap{where}") if host else None


def _host_bytes() -> int:
    """Physical memory (capped by a cgroup memory limit) plus swap; 0 where the OS does not say."""
    try:
        ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return 0
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        cap = _read_int(path)
        if cap:
            ram = min(ram, cap)
    swap = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("SwapTotal:"):
                    swap = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(ram, 0) + swap


def _read_int(path: str) -> int | None:
    """The integer in the file at ``path``; None when it is missing or holds something else ("max")."""
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def evaluate(graph: Graph, registry: Registry, env: Env, opsets: Mapping[str, int] | None = None,
             keep: set[str] | None = None, names: Sequence[str] | None = None,
             after: Mapping[str, Callable[[Any], Any]] | None = None) -> tuple[Any, ...]:
    """Run ``graph`` over ``env`` (inputs and params by name); return ``names``
    (default: the graph's outputs) in order. ``after[name]``, where given, maps a traced value as soon as a
    node produces it (a lowering choice the graph's readers then share; concrete values are left alone)."""
    opsets = graph.opsets if opsets is None else opsets
    env = dict(env)
    for name, value in graph.initializers.items():
        env.setdefault(name, value)
    keep = keep if keep is not None else set()
    for node in graph.nodes:
        run_node(node, env, registry, opsets, keep)
        if after:
            for out in node.outputs:
                if out in after and not is_concrete(env[out]):
                    env[out] = after[out](env[out])
    names = graph.output_names if names is None else names
    missing = [n for n in names if n not in env]
    if missing:
        raise OpError(f"graph '{graph.name}': outputs {missing} are never produced")
    return tuple(env[n] for n in names)


def make_fn(graph: Graph, registry: Registry, constants: Mapping[str, Any],
            on_trace: Callable[[], None] | None = None,
            after: Mapping[str, Callable[[Any], Any]] | None = None) -> Callable[..., Any]:
    """The pure function of ``graph`` (``after``: see :func:`evaluate`).

    Stateless graphs: ``fn(params, inputs) -> {output name: value}``.
    Graphs with ``state_vars``: ``fn(params, state, inputs) -> (outputs, state)``.
    ``constants`` are the initializers kept out of params (shape-like tensors
    needed at trace time); everything in ``params`` is a traced argument.
    """
    keep = static_names(graph, registry)
    out_names = graph.output_names
    state_names = tuple(graph.state_vars)
    next_names = tuple(graph.state_vars[s] for s in state_names)

    def run(params: Mapping[str, Any], state: Mapping[str, Any], inputs: Mapping[str, Any]) -> tuple[dict, dict]:
        if on_trace is not None and not all(is_concrete(v) for v in params.values()):
            on_trace()
        env: Env = dict(constants)
        env.update(params)
        env.update(state)
        env.update(inputs)
        with jax.default_matmul_precision(FLOAT_PRECISION):
            vals = evaluate(graph, registry, env, graph.opsets, keep, out_names + next_names, after)
        outs = dict(zip(out_names, vals[: len(out_names)]))
        return outs, dict(zip(state_names, vals[len(out_names):]))

    if state_names:
        def stateful_fn(params: Mapping[str, Any], state: Mapping[str, Any], inputs: Mapping[str, Any]) -> tuple[dict, dict]:
            return run(params, state, inputs)

        return stateful_fn

    def fn(params: Mapping[str, Any], inputs: Mapping[str, Any]) -> dict[str, Any]:
        return run(params, {}, inputs)[0]

    return fn


def check_names(names: Sequence[str]) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise JaxinferError(f"duplicate value name '{n}'")
        seen.add(n)
