"""Resource-variable state: CALL_ONCE init subgraphs run at load to give variables their initial values."""

from __future__ import annotations

import numpy as np

from ...errors import ModelLoadError
from ...graph import Graph
from ...tracer import evaluate


def run_call_once(graph: Graph) -> Graph:
    """Evaluate each top-level CALL_ONCE init subgraph now; its final variable values become ``state_init``.

    Variables no init subgraph assigns start as zeros of the shape/dtype of the
    first value assigned to them (LiteRT would fail reading them before an assign).
    """
    from .ops import REGISTRY

    init: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in graph.state_init.items()}
    nodes = []
    for node in graph.nodes:
        if node.op_type != "CALL_ONCE" or node.domain != "tflite":
            nodes.append(node)
            continue
        sub: Graph = node.attrs["init"]
        env = {k: v for k, v in init.items()}
        for var in sub.state_vars:
            env.setdefault(var, np.zeros((), np.float32))
        names = tuple(sub.state_vars.values())
        values = evaluate(sub, REGISTRY, env, sub.opsets, names=names)
        for var, value in zip(sub.state_vars, values):
            init[var] = np.asarray(value)
    graph = graph.replace(nodes=tuple(nodes))
    for node, g in graph.walk():
        if g is not graph and g.state_vars:
            raise ModelLoadError(f"resource variables inside the subgraph '{g.name}' (WHILE/IF bodies) are not "
                                 "supported; only the main subgraph's variables become state")
    if not graph.state_vars:
        return graph
    vi = graph.value_info
    for var, last in graph.state_vars.items():
        if var in init:
            continue
        first = next((n.inputs[1] for n in nodes if n.op_type == "ASSIGN_VARIABLE" and n.inputs[0] == var), None)
        info = vi.get(first) if first else None
        if info is None or info.shape is None or any(not isinstance(d, int) for d in info.shape):
            raise ModelLoadError(f"resource variable '{var}' has no initial value (no CALL_ONCE assigns it) and "
                                 "its shape is not static; expected an init subgraph or a statically shaped assign")
        init[var] = np.zeros(info.shape, info.dtype)
    return graph.replace(nodes=tuple(nodes), state_init={k: init[k] for k in graph.state_vars})
