"""ONNX ``ModelProto`` (path, bytes or proto) -> the neutral, frozen :class:`Graph`.

External data is read only from inside the model's folder: absolute paths,
``..`` and symlinks that leave the folder are refused (onnx itself had
CVE-2024-27318 and CVE-2024-5187 here). Corrupt or truncated files raise
:class:`ModelLoadError`, never a raw protobuf trace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, ModelProto, TensorProto, TypeProto, numpy_helper

from ...errors import ModelLoadError
from ...graph import Graph, Node, ValueInfo, structure_problems

#: Constant nodes holding more float elements than this become params (weights
#: are arguments, never closure constants).
CONSTANT_PARAM_LIMIT = 1024


def onnx_dtype(elem_type: int) -> np.dtype:
    """numpy dtype (ml_dtypes for bfloat16/float8/int4) of an ONNX element type."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError) as e:
        raise ModelLoadError(f"unknown ONNX element type {elem_type}") from e


def _type_info(name: str, tp: TypeProto) -> ValueInfo:
    which = tp.WhichOneof("value")
    if which == "tensor_type" or which == "sparse_tensor_type":
        tt = tp.tensor_type if which == "tensor_type" else tp.sparse_tensor_type
        dtype = onnx_dtype(tt.elem_type) if tt.elem_type else None
        shape = None
        if tt.HasField("shape"):
            dims: list[int | str | None] = []
            for d in tt.shape.dim:
                if d.HasField("dim_value"):
                    dims.append(int(d.dim_value))
                elif d.HasField("dim_param"):
                    dims.append(d.dim_param)
                else:
                    dims.append(None)
            shape = tuple(dims)
        return ValueInfo(name, shape, dtype)
    if which == "sequence_type":
        return ValueInfo(name, None, None, "sequence", _type_info(name, tp.sequence_type.elem_type))
    if which == "optional_type":
        return ValueInfo(name, None, None, "optional", _type_info(name, tp.optional_type.elem_type))
    if which == "map_type":
        return ValueInfo(name, None, None, "map")
    return ValueInfo(name)


def _safe_external_path(base: Path | None, location: str, tensor: str) -> Path:
    if base is None:
        raise ModelLoadError(
            f"initializer '{tensor}' uses external data '{location}' but the model was not "
            "loaded from a path; load it from its file so the data can be found beside it"
        )
    if os.path.isabs(location) or Path(location).drive:
        raise ModelLoadError(f"initializer '{tensor}': external data path '{location}' is absolute; only paths inside the model's folder are allowed")
    if ".." in Path(location).parts:
        raise ModelLoadError(f"initializer '{tensor}': external data path '{location}' leaves the model's folder ('..'); refused")
    root = base.resolve()
    target = (base / location).resolve()
    if root not in target.parents and target != root:
        raise ModelLoadError(f"initializer '{tensor}': external data '{location}' resolves outside the model's folder (symlink?); refused")
    if not target.is_file():
        raise ModelLoadError(f"initializer '{tensor}': external data file '{location}' not found in {base}")
    return target


def _tensor_to_numpy(t: TensorProto, base: Path | None) -> np.ndarray:
    if any(d < 0 for d in t.dims):
        raise ModelLoadError(f"tensor '{t.name}' has negative dims {list(t.dims)}; expected sizes >= 0")
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        path = _safe_external_path(base, info.get("location", ""), t.name)
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(int(length)) if length else f.read()
        copy = TensorProto()
        copy.CopyFrom(t)
        del copy.external_data[:]
        copy.data_location = TensorProto.DEFAULT
        copy.raw_data = raw
        t = copy
    try:
        return numpy_helper.to_array(t)
    except Exception as e:
        raise ModelLoadError(f"tensor '{t.name}' cannot be decoded: {e}") from e


def _sparse_to_numpy(sp: onnx.SparseTensorProto, base: Path | None) -> np.ndarray:
    values = _tensor_to_numpy(sp.values, base)
    indices = _tensor_to_numpy(sp.indices, base).astype(np.int64)
    dense = np.zeros(tuple(sp.dims), dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _attr_value(a: AttributeProto, base: Path | None) -> Any:
    t = a.type
    if t == AttributeProto.FLOAT:
        return float(a.f)
    if t == AttributeProto.INT:
        return int(a.i)
    if t == AttributeProto.STRING:
        return a.s.decode("utf-8", errors="replace")
    if t == AttributeProto.TENSOR:
        return _tensor_to_numpy(a.t, base)
    if t == AttributeProto.SPARSE_TENSOR:
        return _sparse_to_numpy(a.sparse_tensor, base)
    if t == AttributeProto.GRAPH:
        return read_graph(a.g, {}, base)
    if t == AttributeProto.FLOATS:
        return tuple(float(x) for x in a.floats)
    if t == AttributeProto.INTS:
        return tuple(int(x) for x in a.ints)
    if t == AttributeProto.STRINGS:
        return tuple(s.decode("utf-8", errors="replace") for s in a.strings)
    if t == AttributeProto.TENSORS:
        return tuple(_tensor_to_numpy(x, base) for x in a.tensors)
    if t == AttributeProto.GRAPHS:
        return tuple(read_graph(g, {}, base) for g in a.graphs)
    if t == AttributeProto.TYPE_PROTO:
        return _type_info(a.name, a.tp)
    raise ModelLoadError(f"attribute '{a.name}' has unsupported type {t}")


def _constant_value(attrs: dict[str, Any]) -> np.ndarray | None:
    """The value of a ``Constant`` node, whatever attribute carries it."""
    if "value" in attrs:
        return np.asarray(attrs["value"])
    if "sparse_value" in attrs:
        return np.asarray(attrs["sparse_value"])
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64), ("value_string", object)):
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64), ("value_strings", object)):
        if key in attrs:
            return np.array(list(attrs[key]), dtype=dtype)
    return None


def read_graph(g: GraphProto, opsets: dict[str, int], base: Path | None) -> Graph:
    """Convert one ``GraphProto`` (top level or a subgraph)."""
    inits: dict[str, np.ndarray] = {}
    for t in g.initializer:
        inits[t.name] = _tensor_to_numpy(t, base)
    for sp in g.sparse_initializer:
        inits[sp.values.name] = _sparse_to_numpy(sp, base)
    nodes: list[Node] = []
    for i, n in enumerate(g.node):
        attrs = {a.name: _attr_value(a, base) for a in n.attribute}
        for a in n.attribute:
            if a.ref_attr_name:
                raise ModelLoadError(f"node '{n.name}': attribute references ('{a.ref_attr_name}') only occur inside functions")
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and len(n.output) == 1:
            value = _constant_value(attrs)
            if value is not None and value.dtype.kind in "fc" and value.size > CONSTANT_PARAM_LIMIT:
                inits[n.output[0]] = value  # a weight stored as a Constant node: make it a param
                continue
        nodes.append(Node(n.op_type, tuple(n.input), tuple(n.output), attrs, n.name or f"{n.op_type}_{i}", n.domain))
    init_names = set(inits)
    inputs = tuple(_type_info(v.name, v.type) for v in g.input if v.name not in init_names)
    outputs = tuple(_type_info(v.name, v.type) for v in g.output)
    value_info = {v.name: _type_info(v.name, v.type) for v in g.value_info}
    return Graph(tuple(nodes), inputs, outputs, inits, opsets, g.name or "graph", value_info)


def load_proto(source: str | os.PathLike[str] | bytes | ModelProto) -> tuple[ModelProto, Path | None]:
    """Parse a model from a path, raw bytes or a proto, without external data yet."""
    if isinstance(source, ModelProto):
        if not source.HasField("graph"):
            raise ModelLoadError("not a valid ONNX model: the ModelProto has no graph")
        return source, None
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, base = bytes(source), None
    else:
        path = Path(source)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}" if not path.exists() else
                                 f"{path} is not a regular file; expected an .onnx model file")
        data, base = path.read_bytes(), path.parent
    if not data:
        raise ModelLoadError("model is empty (0 bytes)")
    proto = ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf raises DecodeError and others
        raise ModelLoadError(f"not a valid ONNX model ({len(data)} bytes): {type(e).__name__}: {e}") from e
    if not proto.HasField("graph") or proto.ir_version == 0:
        raise ModelLoadError(f"not a valid ONNX model ({len(data)} bytes): no graph or IR version; truncated or another format?")
    return proto, base


def _inline_functions(proto: ModelProto) -> ModelProto:
    if not proto.functions:
        return proto
    try:
        from onnx import inliner

        return inliner.inline_local_functions(proto)
    except Exception as e:
        raise ModelLoadError(f"model-local functions could not be inlined: {e}") from e


def read_model(source: str | os.PathLike[str] | bytes | ModelProto) -> Graph:
    """Read an ONNX model into a :class:`Graph` (opsets per domain, metadata kept)."""
    proto, base = load_proto(source)
    proto = _inline_functions(proto)
    opsets = {("" if o.domain in ("", "ai.onnx") else o.domain): int(o.version) for o in proto.opset_import}
    opsets.setdefault("", 1)
    graph = read_graph(proto.graph, opsets, base)
    problems = structure_problems(graph)
    if problems:
        raise ModelLoadError("invalid ONNX graph: " + "; ".join(problems[:5]))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update(producer=f"{proto.producer_name} {proto.producer_version}".strip(), ir_version=str(proto.ir_version))
    return graph.replace(opsets=opsets, metadata=meta, name=proto.graph.name or "model")
