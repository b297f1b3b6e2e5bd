"""ONNX ``ModelProto`` (path, bytes or proto) -> the neutral, frozen :class:`Graph`.

External data is read only from inside the model's folder: absolute paths,
``..`` and symlinks that leave the folder are refused (onnx itself had
CVE-2024-27318 and CVE-2024-5187 here). Corrupt or truncated files raise
:class:`ModelLoadError`, never a raw protobuf trace.
"""

from __future__ import annotations

import functools
import math
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


def _text(value: str | bytes, what: str) -> str:
    """``value`` as ``str``: protobuf hands back ``bytes`` for a string field that is not valid UTF-8."""
    if isinstance(value, bytes):
        raise ModelLoadError(f"{what} is not valid UTF-8 ({value[:60]!r}); ONNX names and strings are UTF-8 text "
                             "(a corrupt or damaged file?)")
    return value


def _texts(values: Any, what: str) -> tuple[str, ...]:
    return tuple(_text(v, what) for v in values)


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
                    dims.append(_text(d.dim_param, f"a symbolic dim of '{name}'"))
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


def _external_int(info: dict[str, str], key: str, tensor: str) -> int | None:
    """The ``offset``/``length`` entry of a tensor's external data, a non-negative integer (None when absent)."""
    text = info.get(key)
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ModelLoadError(f"initializer '{tensor}': external data {key} '{text}' is not a non-negative integer")
    return value


#: Element types stored several to a byte in raw_data.
_PACKED_DTYPES = frozenset({"int4", "uint4", "float4_e2m1fn", "int2", "uint2"})


def _raw_size_problem(t: TensorProto, dtype: np.dtype) -> str | None:
    """Why ``t.raw_data`` cannot hold ``t.dims`` of ``dtype`` (None when it can, or for packed 4-bit types)."""
    if dtype.kind == "O" or dtype.name in _PACKED_DTYPES:
        return None
    count = math.prod(t.dims)
    if len(t.raw_data) == count * dtype.itemsize:
        return None
    return (f"{len(t.raw_data)} bytes of raw_data; expected {count} x {dtype.itemsize} = {count * dtype.itemsize} "
            f"bytes for dims {list(t.dims)} of {dtype.name}")


def _tensor_to_numpy(t: TensorProto, base: Path | None) -> np.ndarray:
    if any(d < 0 for d in t.dims):
        raise ModelLoadError(f"tensor '{t.name}' has negative dims {list(t.dims)}; expected sizes >= 0")
    if t.data_location == TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        path = _safe_external_path(base, info.get("location", ""), t.name)
        offset = _external_int(info, "offset", t.name) or 0
        length = _external_int(info, "length", t.name)
        with open(path, "rb") as f:
            f.seek(offset)
            raw = f.read(length) if length is not None else f.read()
        copy = TensorProto()
        copy.CopyFrom(t)
        del copy.external_data[:]
        copy.data_location = TensorProto.DEFAULT
        copy.raw_data = raw
        t = copy
    dtype = onnx_dtype(t.data_type)  # names an unknown element type
    problem = _raw_size_problem(t, dtype) if t.HasField("raw_data") else None
    if problem:
        raise ModelLoadError(f"tensor '{t.name}' has {problem}")
    try:
        return numpy_helper.to_array(t)
    except Exception as e:
        raise ModelLoadError(f"tensor '{t.name}' ({dtype.name}, dims {list(t.dims)}) cannot be "
                             f"decoded: {type(e).__name__}: {e}; expected data holding {math.prod(t.dims)} values of "
                             "its element type") from e


def _sparse_to_numpy(sp: onnx.SparseTensorProto, base: Path | None) -> np.ndarray:
    values = _tensor_to_numpy(sp.values, base)
    indices = _tensor_to_numpy(sp.indices, base).astype(np.int64)
    dims = tuple(int(d) for d in sp.dims)
    _check_sparse(sp.values.name, dims, values, indices)
    try:
        dense = np.zeros(dims, dtype=values.dtype)
    except (MemoryError, ValueError) as e:
        raise ModelLoadError(f"sparse tensor '{sp.values.name}': its dense shape {list(dims)} of {values.dtype} cannot "
                             f"be allocated ({type(e).__name__}: {e}); expected a shape that fits in memory") from e
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def _check_sparse(name: str, dims: tuple[int, ...], values: np.ndarray, indices: np.ndarray) -> None:
    """ModelLoadError unless ``values``/``indices`` fit a sparse tensor of shape ``dims`` (the ONNX spec's layout:
    ``values`` [NNZ]; ``indices`` [NNZ] linear or [NNZ, rank] per-dim)."""
    where = f"sparse tensor '{name}' (dims {list(dims)})"
    if any(d < 0 for d in dims):
        raise ModelLoadError(f"{where} has negative dims; expected sizes >= 0")
    if values.ndim != 1:
        raise ModelLoadError(f"{where}: values have shape {list(values.shape)}; expected one dimension [NNZ]")
    nnz = values.shape[0]
    if indices.ndim == 1:
        size = math.prod(dims)
        if size > np.iinfo(np.int64).max:
            raise ModelLoadError(f"{where} has {size} elements, more than int64 indices can address")
        bounds = np.array([size], np.int64)
        column_bounds = np.broadcast_to(bounds, (nnz, 1))
        expected = f"[{nnz}] linear indices"
    elif indices.ndim == 2 and indices.shape[1] == len(dims):
        column_bounds = np.broadcast_to(np.array(dims, np.int64), indices.shape)
        expected = f"[{nnz}, {len(dims)}] per-dim indices"
    else:
        raise ModelLoadError(f"{where}: indices have shape {list(indices.shape)}; expected [{nnz}] or [{nnz}, {len(dims)}]")
    if indices.shape[0] != nnz:
        raise ModelLoadError(f"{where}: {indices.shape[0]} indices for {nnz} values; expected {expected}")
    flat = indices.reshape(nnz, -1)
    bad = (flat < 0) | (flat >= column_bounds)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise ModelLoadError(f"{where}: index {flat[row].tolist()} (entry {row}) is out of range; expected each index "
                             f"in [0, dim) of its dimension (linear indices in [0, {math.prod(dims)}))")


def _attr_value(a: AttributeProto, base: Path | None, opsets: dict[str, int]) -> Any:
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
        return read_graph(a.g, opsets, base)
    if t == AttributeProto.FLOATS:
        return tuple(float(x) for x in a.floats)
    if t == AttributeProto.INTS:
        return tuple(int(x) for x in a.ints)
    if t == AttributeProto.STRINGS:
        return tuple(s.decode("utf-8", errors="replace") for s in a.strings)
    if t == AttributeProto.TENSORS:
        return tuple(_tensor_to_numpy(x, base) for x in a.tensors)
    if t == AttributeProto.GRAPHS:
        return tuple(read_graph(g, opsets, base) for g in a.graphs)
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


@functools.lru_cache(maxsize=None)
def _schema(op_type: str, domain: str, opset: int) -> onnx.defs.OpSchema | None:
    """The ONNX schema of this op at this opset (None: onnx knows none, e.g. contrib domains)."""
    if not 0 < opset < 2**31:  # get_schema takes a C int; an opset out of that range has no schema anyway
        return None
    try:
        return onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return None


def _attr_type_name(code: int) -> str:
    return AttributeProto.AttributeType.Name(code) if code in AttributeProto.AttributeType.values() else str(code)


def _check_against_schema(n: onnx.NodeProto, op_type: str, domain: str, label: str, opsets: dict[str, int]) -> None:
    """ModelLoadError for a node the op's ONNX schema rules out: an attribute of another type than declared (an
    ``axis`` holding a graph would reach the ops and passes, which read it as an int), a required attribute
    missing (a Loop without its ``body``), fewer inputs than required, or a required input left empty (``""``,
    which the ops would receive as None)."""
    domain = "" if domain in ("", "ai.onnx") else domain
    opset = opsets.get(domain)
    schema = _schema(op_type, domain, opset) if opset is not None else None
    if schema is None:
        return
    for a in n.attribute:
        declared = schema.attributes.get(a.name)
        if declared is not None and a.type != int(declared.type.value):
            raise ModelLoadError(f"{op_type} node '{label}': attribute '{a.name}' has type {_attr_type_name(a.type)}; "
                                 f"the ONNX schema of {op_type} (opset {opset}) declares "
                                 f"{_attr_type_name(int(declared.type.value))}")
    given = {a.name for a in n.attribute}
    missing = sorted(name for name, declared in schema.attributes.items() if declared.required and name not in given)
    if missing:
        raise ModelLoadError(f"{op_type} node '{label}': required attribute(s) {missing} missing; the ONNX schema "
                             f"of {op_type} (opset {opset}) requires them")
    if len(n.input) < schema.min_input:
        raise ModelLoadError(f"{op_type} node '{label}' has {len(n.input)} input(s); the ONNX schema of {op_type} "
                             f"(opset {opset}) requires at least {schema.min_input}")
    formal = schema.inputs
    for slot, name in enumerate(n.input):
        param = formal[min(slot, len(formal) - 1)] if formal else None
        if not name and param is not None and param.option == onnx.defs.OpSchema.FormalParameterOption.Single:
            raise ModelLoadError(f"{op_type} node '{label}': input #{slot} ('{param.name}') is empty, but the ONNX "
                                 f"schema of {op_type} (opset {opset}) requires it; expected a value name")


def read_graph(g: GraphProto, opsets: dict[str, int], base: Path | None) -> Graph:
    """Convert one ``GraphProto`` (top level or a subgraph)."""
    inits: dict[str, np.ndarray] = {}
    graph_name = _text(g.name, "a graph name")
    for t in g.initializer:
        inits[_text(t.name, f"an initializer name in graph '{graph_name}'")] = _tensor_to_numpy(t, base)
    for sp in g.sparse_initializer:
        inits[_text(sp.values.name, f"a sparse initializer name in graph '{graph_name}'")] = _sparse_to_numpy(sp, base)
    nodes: list[Node] = []
    for i, n in enumerate(g.node):
        where = f"node #{i} of graph '{graph_name}'"
        op_type, domain = _text(n.op_type, f"the op type of {where}"), _text(n.domain, f"the domain of {where}")
        name = _text(n.name, f"the name of {where}")
        ins, outs = _texts(n.input, f"an input name of {where}"), _texts(n.output, f"an output name of {where}")
        _check_against_schema(n, op_type, domain, name or f"{op_type}_{i}", opsets)
        attrs = {_text(a.name, f"an attribute name of {where}"): _attr_value(a, base, opsets) for a in n.attribute}
        for a in n.attribute:
            if a.ref_attr_name:
                raise ModelLoadError(f"node '{n.name}': attribute references ('{a.ref_attr_name}') only occur inside functions")
        if op_type == "Constant" and domain in ("", "ai.onnx") and len(outs) == 1:
            value = _constant_value(attrs)
            if value is not None and value.dtype.kind in "fc" and value.size > CONSTANT_PARAM_LIMIT:
                inits[outs[0]] = value  # a weight stored as a Constant node: make it a param
                continue
        nodes.append(Node(op_type, ins, outs, attrs, name or f"{op_type}_{i}", domain))
    init_names = set(inits)
    inputs = tuple(_type_info(_text(v.name, f"an input name of graph '{graph_name}'"), v.type)
                   for v in g.input if v.name not in init_names)
    outputs = tuple(_type_info(_text(v.name, f"an output name of graph '{graph_name}'"), v.type) for v in g.output)
    value_info = {v.name: _type_info(_text(v.name, f"a value_info name of graph '{graph_name}'"), v.type)
                  for v in g.value_info}
    return Graph(tuple(nodes), inputs, outputs, inits, opsets, graph_name or "graph", value_info)


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
    domains = [_text(o.domain, "an opset_import domain") for o in proto.opset_import]
    opsets = {("" if d in ("", "ai.onnx") else d): int(o.version) for d, o in zip(domains, proto.opset_import)}
    opsets.setdefault("", 1)
    graph = read_graph(proto.graph, opsets, base)
    problems = structure_problems(graph)
    if problems:
        raise ModelLoadError("invalid ONNX graph: " + "; ".join(problems[:5]))
    meta = {_text(p.key, "a metadata_props key"): _text(p.value, f"metadata_props '{p.key}'") for p in proto.metadata_props}
    producer = f"{_text(proto.producer_name, 'producer_name')} {_text(proto.producer_version, 'producer_version')}"
    meta.update(producer=producer.strip(), ir_version=str(proto.ir_version))
    return graph.replace(opsets=opsets, metadata=meta, name=proto.graph.name or "model")
