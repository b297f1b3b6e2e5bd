"""Which weights a quantization method may touch: the quantizable layers of a Graph.

A layer is a MatMul/Gemm/Conv/Einsum node (TFLite: FULLY_CONNECTED/CONV_2D/BATCH_MATMUL) whose
weight input is a param (a float initializer that ``Model.params`` holds). A weight read anywhere
else (a Transpose in front of the MatMul, an embedding Gather sharing it) is left in float: the
other reader would receive an int8 array it does not understand.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UnmatchedExcludeWarning, warn
from ..graph import Graph, Node
from ..model import Model
from ..passes.layout import source_weight_name

#: op type -> the input slots that may hold a weight. Conv routes through ``arith.conv``
#: once conv_pool.py calls it (see ``CONV_VIA_ARITH``); until then it is not quantized.
WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {"MatMul": (1,), "Gemm": (1,), "Conv": (1,), "Einsum": (0, 1)}

#: The same for TFLite float graphs: FULLY_CONNECTED ([N, K] weights), CONV_2D (OHWI) and a
#: BATCH_MATMUL by a constant 2-D matrix, whose float kernels call ``arith`` for a quantized weight.
#: (DEPTHWISE_CONV_2D weights are tiny and its kernel reads them as taps: left in float.)
TFLITE_WEIGHT_SLOTS: dict[str, tuple[int, ...]] = {"FULLY_CONNECTED": (1,), "CONV_2D": (1,), "BATCH_MATMUL": (1,)}


def weight_slots(node: Node) -> tuple[int, ...] | None:
    """The input slots of ``node`` that may hold a quantizable weight (None: not a product we quantize)."""
    if node.domain in ("", "ai.onnx") or (node.domain, node.op_type) == ("jaxinfer", "Conv"):
        return WEIGHT_SLOTS.get(node.op_type)
    if node.domain == "tflite":
        return TFLITE_WEIGHT_SLOTS.get(node.op_type)
    return None


#: The ONNX Conv ops (``Conv`` and the spatial-first ``jaxinfer::Conv``) call ``arith.conv``.
CONV_VIA_ARITH = True


@dataclass(frozen=True)
class Layer:
    """One quantizable product: the node, its weight and the weight's channel (kept) axes."""

    node: str
    op_type: str
    weight: str
    slot: int
    activation_slots: tuple[int, ...]
    channel_axes: tuple[int, ...]
    output: str
    groups: int = 1  # a convolution's group count


def _conv_enabled(registry: Any) -> bool:
    if CONV_VIA_ARITH:
        return True
    try:
        opdef = registry.resolve("", "Conv", 22)
    except Exception:  # noqa: BLE001
        return False
    code = getattr(getattr(opdef, "fn", None), "__code__", None)
    return code is not None and "arith" in code.co_names


def _einsum_axes(equation: str, slot: int) -> tuple[int, ...] | None:
    eq = equation.replace(" ", "")
    if "->" not in eq or "..." in eq:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2 or slot >= len(terms):
        return None
    term = terms[slot]
    return tuple(i for i, c in enumerate(term) if c in out)


def _tflite_channel_axes(node: Node, w: np.ndarray) -> tuple[int, ...] | None:
    if node.op_type == "FULLY_CONNECTED":
        return (0,) if w.ndim == 2 and not node.attrs.get("weights_format", 0) else None
    if node.op_type == "CONV_2D":
        return (0,) if w.ndim == 4 else None
    if node.op_type == "BATCH_MATMUL":  # x @ w, or x @ w.T with adj_y
        return ((0,) if node.attrs.get("adj_y") else (1,)) if w.ndim == 2 else None
    return None


def _depthwise(node: Node, w: Any) -> bool:
    """An ONNX Conv with one input channel per group (OIHW, or ``jaxinfer::Conv``'s spatial..., I, O)."""
    group = int(node.attrs.get("group", 1))
    i_axis = w.ndim - 2 if node.domain == "jaxinfer" else 1
    return group > 1 and w.ndim >= 3 and w.shape[i_axis] == 1


def _channel_axes(node: Node, slot: int, w: np.ndarray) -> tuple[int, ...] | None:
    if node.domain == "tflite":
        return _tflite_channel_axes(node, w)
    if node.op_type == "MatMul":
        return (1,) if w.ndim == 2 else None
    if node.op_type == "Gemm":
        if w.ndim != 2:
            return None
        return (0,) if node.attrs.get("transB", 0) else (1,)
    if node.op_type == "Conv":
        if w.ndim < 3:
            return None
        # ai.onnx Conv weights are O, I, spatial...; jaxinfer::Conv (passes.layout) stores spatial..., I, O
        return (w.ndim - 1,) if node.domain == "jaxinfer" else (0,)
    if node.op_type == "Einsum":
        eq = node.attrs.get("equation", "")
        return _einsum_axes(eq.decode() if isinstance(eq, bytes) else eq, slot)
    return None


def matches(patterns: Sequence[str], node: Node, weight: str) -> bool:
    """``exclude`` globs: node names, ``"op:Type"`` and initializer (weight) names, a weight also by the
    name the model file gave it (a load pass may have renamed it: ``w1`` -> ``w1__hwio``)."""
    source = source_weight_name(weight)
    for p in patterns:
        if p.startswith("op:"):
            if fnmatch.fnmatchcase(node.op_type, p[3:]):
                return True
        elif fnmatch.fnmatchcase(node.name, p) or fnmatch.fnmatchcase(weight, p) or fnmatch.fnmatchcase(source, p):
            return True
    return False


def keeps_model_state(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``quantize``/``prune`` on a stateful model: calibrate and compare from its initial state, leave the
    model's own state as it was, and return the new model at its initial state.

    Their calibration and report runs step a stateful model (a streaming LSTM's state moves on with
    every call); without this the model passed in would come back advanced, and so would the result.
    """
    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(model, Model) and model.stateful):
            return fn(model, *args, **kwargs)
        saved = dict(model.state)
        model.reset_state()
        try:
            result = fn(model, *args, **kwargs)
        finally:
            model.state = saved
        result.reset_state()
        return result

    return wrapper


def require_model(model: Any, fn: str) -> None:
    """TypeError naming ``fn`` for what is not a jaxinfer Model (quantize and prune take one)."""
    if not isinstance(model, Model):
        raise TypeError(f"{fn}() takes a jaxinfer Model (e.g. jaxinfer.load(path)), got {type(model).__name__}")


def exclude_patterns(exclude: Any) -> tuple[str, ...]:
    """``exclude`` as a tuple of glob strings (None: nothing excluded; one string: one glob).

    Raises:
      TypeError: ``exclude`` is not a string or an iterable of strings, naming what was given.
    """
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        return (exclude,)
    if not isinstance(exclude, Iterable) or isinstance(exclude, (bytes, Mapping)):
        raise TypeError(f"exclude must be a glob string or a list of them (node names, 'op:Type', "
                        f"initializer names), got {type(exclude).__name__} {exclude!r}")
    items = tuple(exclude)
    wrong = [p for p in items if not isinstance(p, str)]
    if wrong:
        raise TypeError(f"exclude must hold glob strings (node names, 'op:Type', initializer names), got {wrong!r}")
    return items


def unmatched_patterns(patterns: Sequence[str], graph: Graph, params: Iterable[str] = ()) -> dict[str, list[str]]:
    """``{pattern: a few names it may have meant}`` for each ``exclude`` glob matching nothing in ``graph``.

    ``"op:Type"`` globs are tried on the op types of every node (subgraphs included), the others on
    every node name and initializer name (``params``: the model's weight names, which may not be
    initializers of ``graph``). The suggestions are the closest names (ignoring case) of the kind the
    glob is tried on, or the first few of them when none is close.
    """
    nodes = [node for node, _ in graph.walk()]
    op_types = sorted({n.op_type for n in nodes})
    weights = set(graph.initializers) | set(params)
    names = sorted({n.name for n in nodes if n.name} | weights | {source_weight_name(w) for w in weights})
    found: dict[str, list[str]] = {}
    for p in patterns:
        kind, pool = (p[3:], op_types) if p.startswith("op:") else (p, names)
        if any(fnmatch.fnmatchcase(name, kind) for name in pool):
            continue
        folded = {name.lower(): name for name in pool}  # a wrong case is a likely typo too
        bare = kind.translate(str.maketrans("", "", "*?[]")).lower()
        close = [folded[c] for c in difflib.get_close_matches(bare, list(folded), n=3, cutoff=0.5)] or pool[:3]
        found[p] = [("op:" if p.startswith("op:") else "") + c for c in close]
    return found


def warn_unmatched(patterns: Sequence[str], graph: Graph, params: Iterable[str] = ()) -> None:
    """Warn (:class:`~jaxinfer.errors.UnmatchedExcludeWarning`) naming each ``exclude`` glob that matches
    nothing in ``graph``: a typo would otherwise quantize or prune the layer it meant to keep. A warning,
    not an error, since one exclude list may serve several models."""
    found = unmatched_patterns(patterns, graph, params)
    if not found:
        return
    shown = "; ".join(f"{p!r} (names here like {', '.join(repr(c) for c in close) or 'none'})"
                      for p, close in found.items())
    warn(f"{len(found)} exclude pattern(s) matched no node name, 'op:' type or initializer name of model "
         f"'{graph.name}', so they exclude nothing: {shown}", UnmatchedExcludeWarning)


def find_layers(graph: Graph, params: Mapping[str, Any], registry: Any = None,
                exclude: Iterable[str] = ()) -> tuple[list[Layer], list[tuple[str, str]]]:
    """(layers to quantize, [(node or weight, why skipped)]) for the top-level graph."""
    exclude = exclude_patterns(exclude)
    readers: dict[str, list[tuple[Node, int]]] = {}
    for node, _ in graph.walk():
        for i, name in enumerate(node.inputs):
            if name:
                readers.setdefault(name, []).append((node, i))
    conv_ok = registry is None or _conv_enabled(registry)
    layers: list[Layer] = []
    skipped: list[tuple[str, str]] = []
    taken: set[str] = set()
    for node in graph.nodes:
        slots = weight_slots(node)
        if slots is None:
            continue
        for slot in slots:
            if slot >= len(node.inputs):
                continue
            name = node.inputs[slot]
            if name not in params:
                continue
            w = np.asarray(params[name]) if not hasattr(params[name], "dtype") else params[name]
            if not np.issubdtype(np.dtype(w.dtype), np.floating):
                continue
            if node.op_type == "Conv" and not conv_ok:
                skipped.append((node.name, "Conv does not call jaxinfer.arith.conv yet"))
                continue
            if matches(exclude, node, name):
                skipped.append((node.name, "excluded"))
                continue
            if node.op_type == "Conv" and _depthwise(node, w):
                skipped.append((node.name, "depthwise convolution: kept float (its filter is a few KB, and as a "
                                           "grouped int8 convolution it would run as XLA CPU's grouped one, ~27x "
                                           "slower than the float route's taps)"))
                continue
            if node.op_type == "Einsum" and len(node.inputs) != 2:
                skipped.append((node.name, "Einsum with other than two operands"))
                continue
            others = [(n, i) for n, i in readers.get(name, []) if not (n is node and i == slot)]
            if others:
                skipped.append((node.name, f"weight '{name}' is also read by {others[0][0].op_type} '{others[0][0].name}'"))
                continue
            axes = _channel_axes(node, slot, np.empty(w.shape, np.int8))
            if axes is None:
                skipped.append((node.name, f"weight shape {tuple(w.shape)} not supported for {node.op_type}"))
                continue
            if name in taken:
                continue
            taken.add(name)
            act = tuple(i for i in range(len(node.inputs)) if i != slot and node.inputs[i]
                        and node.inputs[i] not in params and (node.op_type != "Gemm" or i == 0)
                        and (node.op_type != "Conv" or i == 0))
            groups = int(node.attrs.get("group", 1)) if node.op_type == "Conv" else 1
            layers.append(Layer(node.name, node.op_type, name, slot, act, axes, node.outputs[0], groups))
            break
    return layers, skipped
