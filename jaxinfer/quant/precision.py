"""bf16 / fp16 / mixed precision as a graph rewrite plus cast params; no op file changes.

* ``bf16`` / ``fp16``: float params and float constants are stored in the low precision,
  float graph inputs are cast down on entry and outputs back to float32 on exit, so
  activations flow in the low precision. The numerically sensitive ops (softmax, the
  normalizations, mean-like reductions) get their inputs cast up to float32 and their
  first output cast back down: float32 accumulation where it matters.
* ``mixed``: only the products (MatMul/Gemm/Conv/Einsum; TFLite FULLY_CONNECTED, CONV_2D, ...)
  run in the low precision: their weights are stored low, their activation inputs cast down at
  the op and the result cast back to float32; everything else stays float32.

The casts are ONNX ``Cast`` nodes (TFLite ``CAST`` in a TFLite graph), so the same tracer and ops run
the result.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from onnx import TensorProto

from ..graph import Graph, Node
from ..tracer import static_names

#: Ops whose float inputs are computed in float32 in bf16/fp16 graphs.
SENSITIVE = frozenset({"Softmax", "LogSoftmax", "LayerNormalization", "InstanceNormalization",
                       "GroupNormalization", "BatchNormalization", "RMSNormalization",
                       "SimplifiedLayerNormalization", "SkipLayerNormalization", "ReduceMean",
                       "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare"})
PRODUCTS = frozenset({"MatMul", "Gemm", "Conv", "Einsum", "ConvTranspose"})
#: The same for TFLite graphs (their float kernels widen a narrower weight to the activation's dtype).
TFLITE_SENSITIVE = frozenset({"SOFTMAX", "LOG_SOFTMAX", "L2_NORMALIZATION", "LOCAL_RESPONSE_NORMALIZATION", "MEAN",
                              "SUM"})
TFLITE_PRODUCTS = frozenset({"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL", "TRANSPOSE_CONV",
                             "CONV_3D"})


def _tflite_float(node: Node) -> bool:
    """A TFLite node without quantized tensors (an int8 or hybrid kernel keeps its own arithmetic)."""
    return all(q is None for key in ("in_q", "out_q") for q in (node.attrs.get(key) or ()))


def is_sensitive(node: Node) -> bool:
    """An op computed in float32 inside a bf16/fp16 graph."""
    if node.domain == "tflite":
        return node.op_type in TFLITE_SENSITIVE and _tflite_float(node)
    return node.domain in ("", "ai.onnx") and node.op_type in SENSITIVE


def is_product(node: Node) -> bool:
    """A float matmul/conv: what ``mixed`` runs in the low precision."""
    if node.domain == "tflite":
        return node.op_type in TFLITE_PRODUCTS and _tflite_float(node)
    return node.domain in ("", "ai.onnx") and node.op_type in PRODUCTS

_ONNX = {"bf16": TensorProto.BFLOAT16, "fp16": TensorProto.FLOAT16}
_NP = {"bf16": jnp.bfloat16, "fp16": np.float16}


def low_dtype(kind: str) -> Any:
    return np.dtype(_NP[kind])


_NP_OF_ONNX = {TensorProto.FLOAT: np.dtype(np.float32), TensorProto.BFLOAT16: np.dtype(jnp.bfloat16),
               TensorProto.FLOAT16: np.dtype(np.float16)}


def _cast(src: str, dst: str, to: int, tag: str, fmt: str = "onnx") -> Node:
    """A cast node in the graph's own op set: ONNX ``Cast``, or TFLite ``CAST`` in a TFLite graph."""
    if fmt == "tflite":
        return Node("CAST", (src,), (dst,), {"out_dtype": _NP_OF_ONNX[to]}, f"{tag}/cast:{src}->{dst}", "tflite")
    return Node("Cast", (src,), (dst,), {"to": to}, f"{tag}/cast:{src}->{dst}", "")


def _is_float(a: Any) -> bool:
    return np.issubdtype(np.asarray(a).dtype if not hasattr(a, "dtype") else np.dtype(a.dtype), np.floating)


def rewrite(graph: Graph, registry: Any, kind: str, mode: str, skip: Iterable[str] = ()) -> Graph:
    """The graph with Cast nodes for ``mode`` ("full" = bf16/fp16, "mixed")."""
    lo, f32 = _ONNX[kind], TensorProto.FLOAT
    static = static_names(graph, registry)
    skip = set(skip)
    nodes: list[Node] = []
    tag = f"{kind}"
    if mode == "full":
        renames: dict[str, str] = {}
        for v in graph.inputs:
            if v.dtype is not None and v.dtype == np.float32 and v.name not in static:
                renames[v.name] = f"{v.name}__{kind}"
                nodes.append(_cast(v.name, renames[v.name], lo, tag, graph.fmt))
        tail: list[Node] = []
        out_renames: dict[str, str] = {}
        for v in graph.outputs:
            if v.dtype is not None and v.dtype == np.float32:
                out_renames[v.name] = f"{v.name}__{kind}"
                tail.append(_cast(out_renames[v.name], v.name, f32, tag, graph.fmt))
        for node in graph.nodes:
            ins = tuple(renames.get(i, i) for i in node.inputs)
            outs = tuple(out_renames.get(o, o) for o in node.outputs)
            if is_sensitive(node) and node.name not in skip:
                opdef = registry.resolve(node.domain, node.op_type, graph.opsets.get(node.domain, 1))
                new_ins = list(ins)
                for i, name in enumerate(ins):
                    if name and not (opdef is not None and opdef.is_static_slot(i)) and name not in static:
                        up = f"{name}__f32@{node.name}"
                        nodes.append(_cast(name, up, f32, tag, graph.fmt))
                        new_ins[i] = up
                first = outs[0]
                hi = f"{first}__f32"
                nodes.append(Node(node.op_type, tuple(new_ins), (hi,) + outs[1:], node.attrs, node.name, node.domain))
                nodes.append(_cast(hi, first, lo, tag, graph.fmt))
            elif node.op_type == "Constant" and "value" in node.attrs and _is_float(node.attrs["value"]) \
                    and node.outputs[0] not in static and np.asarray(node.attrs["value"]).dtype == np.float32:
                attrs = dict(node.attrs)
                attrs["value"] = np.asarray(attrs["value"]).astype(low_dtype(kind))
                nodes.append(Node(node.op_type, ins, outs, attrs, node.name, node.domain))
            else:
                nodes.append(Node(node.op_type, ins, outs, node.attrs, node.name, node.domain))
        # Outputs that are graph inputs or initializers directly: route through an Identity (a CAST in TFLite).
        produced = {o for n in nodes for o in n.outputs}
        for v in graph.outputs:
            if v.name in out_renames and out_renames[v.name] not in produced:
                src = renames.get(v.name, v.name)
                nodes.append(Node("Identity", (src,), (out_renames[v.name],), {}, f"{tag}/id:{v.name}", "")
                             if graph.fmt != "tflite" else _cast(src, out_renames[v.name], lo, f"{tag}/id", graph.fmt))
        nodes.extend(tail)
        inits = {k: (np.asarray(v).astype(low_dtype(kind)) if np.asarray(v).dtype == np.float32 and k not in static
                     else v) for k, v in graph.initializers.items()}
        return graph.replace(nodes=tuple(nodes), initializers=inits)
    # mixed: low precision inside the products only
    for node in graph.nodes:
        if is_product(node) and node.name not in skip:
            new_ins = list(node.inputs)
            for i, name in enumerate(node.inputs):
                if name and name not in graph.initializers and name not in static:
                    down = f"{name}__{kind}@{node.name}"
                    nodes.append(_cast(name, down, lo, tag, graph.fmt))
                    new_ins[i] = down
            first = node.outputs[0]
            low = f"{first}__{kind}"
            nodes.append(Node(node.op_type, tuple(new_ins), (low,) + node.outputs[1:], node.attrs, node.name, node.domain))
            nodes.append(_cast(low, first, f32, tag, graph.fmt))
        else:
            nodes.append(node)
    return graph.replace(nodes=tuple(nodes))


def cast_params(params: Mapping[str, Any], kind: str, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Float32 params (all, or ``names``) stored in the low precision."""
    dt = _NP[kind]
    wanted = None if names is None else set(names)
    out = {}
    for k, v in params.items():
        if (wanted is None or k in wanted) and hasattr(v, "dtype") and np.dtype(v.dtype) == np.float32:
            out[k] = jnp.asarray(v).astype(dt)
        else:
            out[k] = v
    return out
