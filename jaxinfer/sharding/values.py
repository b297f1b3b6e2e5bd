"""Abstract shape, dtype and traced-ness of every value of a graph, for given input shapes.

Pipeline stage splitting (which values cross a cut, what each node costs) and
row chunking (which nodes act row by row) both decide from these; nothing runs,
``jax.eval_shape`` walks the graph once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from ..graph import Graph
from ..registry import Registry
from ..tracer import is_concrete, run_node, static_names


@dataclass(frozen=True)
class Abstract:
    """One value: ``shape``, ``dtype``; ``traced`` when it depends on params or inputs
    (a trace-time constant otherwise, whose ``value`` is kept); ``param`` when it is a param itself."""

    shape: tuple[int, ...]
    dtype: np.dtype
    traced: bool
    param: bool = False
    value: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


def abstract_inputs(model: Any, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Input placeholders with every symbolic/unknown dim set to ``batch``."""
    out = {}
    for sig in model.inputs:
        if sig.kind != "tensor":
            raise ValueError(f"input '{sig.name}' is a {sig.kind}; only tensor inputs have an abstract shape here")
        shape = tuple(d if isinstance(d, int) and d > 0 else batch for d in (sig.shape or ()))
        out[sig.name] = jax.ShapeDtypeStruct(shape, sig.dtype or np.float32)
    return out


def abstract_values(model: Any, inputs: Mapping[str, Any]) -> dict[str, Abstract]:
    """Every value of ``model.graph`` (params and inputs included) for these input shapes.

    ``inputs`` maps every dynamic input to an array or ``jax.ShapeDtypeStruct``;
    inputs read at trace time (``model.value_inputs``) must be concrete arrays.
    """
    graph, registry = model.graph, model.registry
    static = {k: np.asarray(v) for k, v in inputs.items() if k in model.value_inputs}
    dynamic = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in inputs.items() if k not in static}
    params = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in model.params.items()}
    return _walk(graph, registry, static_names(graph, registry), model._constants, params, dynamic, static)


def graph_shapes(graph: Graph, registry: Registry, dim: int) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape and dtype of every value of ``graph`` with each symbolic/unknown input dim set to ``dim``.

    Raises:
      ValueError: an input is read at trace time (its value, not only its shape, sets shapes).
    """
    from ..model import split_initializers

    keep = static_names(graph, registry)
    if any(v.name in keep for v in graph.inputs):
        raise ValueError("graph inputs read at trace time: shapes depend on their values")
    consts, params = split_initializers(graph, registry)
    inputs = {v.name: jax.ShapeDtypeStruct(tuple(d if isinstance(d, int) and d > 0 else dim for d in (v.shape or ())),
                                           v.dtype or np.float32) for v in graph.inputs}
    avals = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in params.items()}
    found = _walk(graph, registry, keep, consts, avals, inputs, {})
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in found.items()}


def _walk(graph: Graph, registry: Registry, keep: set[str], constants: Mapping[str, Any],
          params: Mapping[str, Any], dynamic: Mapping[str, Any], static: Mapping[str, Any]) -> dict[str, Abstract]:
    """One ``jax.eval_shape`` walk of ``graph`` recording every value (``params``/``dynamic`` abstract)."""
    found: dict[str, Abstract] = {}

    def record(name: str, value: Any) -> None:
        if hasattr(value, "shape") and hasattr(value, "dtype"):
            concrete = is_concrete(value)
            found[name] = Abstract(tuple(value.shape), np.dtype(value.dtype), not concrete, name in params,
                                   np.asarray(value) if concrete else None)

    def walk(p: Any, x: Any) -> int:
        env: dict[str, Any] = dict(constants)
        env.update(p)
        env.update(x)
        env.update(static)
        for name, value in graph.initializers.items():
            env.setdefault(name, value)
        for name, value in env.items():
            record(name, value)
        for node in graph.nodes:
            run_node(node, env, registry, graph.opsets, keep)
            for o in node.outputs:
                if o and o in env:
                    record(o, env[o])
        return 0

    jax.eval_shape(walk, dict(params), dict(dynamic))
    return found
