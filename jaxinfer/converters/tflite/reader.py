"""TFLite flatbuffer -> neutral :class:`Graph`, through the ``tflite`` package's generated code.

Every subgraph, buffer (including buffers stored past the flatbuffer, by offset),
tensor quantization (per tensor and per axis), sparse constants, SignatureDefs
and custom-op names are read here. Quantization travels with each node as the
``in_q``/``out_q`` attributes (a :class:`~.quant.QParams` or ``None`` per
input/output) so ops choose the integer kernel when their tensors are affine.
Resource variables become explicit graph state (see :func:`_lower_variables`).
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import tflite
from tflite.BuiltinOperator import BuiltinOperator
from tflite.BuiltinOptions import BuiltinOptions
from tflite.BuiltinOptions2 import BuiltinOptions2

from ...errors import ModelLoadError
from ...graph import Graph, Node, ValueInfo, structure_problems
from .quant import QParams, check_kernel

DOMAIN = "tflite"
CUSTOM_DOMAIN = "tflite.custom"
OPSETS = {DOMAIN: 1, CUSTOM_DOMAIN: 1}

_BUILTIN_NAMES = {v: k for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
_OPTION_NAMES = {v: k for k, v in vars(BuiltinOptions).items() if not k.startswith("_")}
_OPTION2_NAMES = {v: k for k, v in vars(BuiltinOptions2).items() if not k.startswith("_")}

#: TensorType enum -> numpy dtype (None: not representable as an array).
_DTYPES: dict[int, Any] = {
    0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 5: object, 6: np.bool_,
    7: np.int16, 8: np.complex64, 9: np.int8, 10: np.float64, 11: np.complex128, 12: np.uint64,
    13: None, 14: None, 15: np.uint32, 16: np.uint16,
}
_TYPE_NAMES = {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_")}
_PADDING = {0: "SAME", 1: "VALID"}
_ACTIVATION = {0: "NONE", 1: "RELU", 2: "RELU_N1_TO_1", 3: "RELU6", 4: "TANH", 5: "SIGN_BIT"}
_ENUM_FIELDS = {"padding": _PADDING, "fused_activation_function": _ACTIVATION}
#: Option fields holding subgraph indices: replaced by the subgraph itself.
_SUBGRAPH_FIELDS = {
    "cond_subgraph_index": "cond", "body_subgraph_index": "body",
    "then_subgraph_index": "then_branch", "else_subgraph_index": "else_branch",
    "init_subgraph_index": "init", "subgraph": "subgraph",
    "decomposition_subgraph_index": "decomposition",
}
_GETTER_SKIP = re.compile(r"^(GetRootAs.*|Init|.*AsNumpy|.*Length|.*IsNone|.*BufferHasIdentifier)$")


def tensor_dtype(code: int) -> np.dtype:
    """numpy dtype of a TensorType code; raises for types jaxinfer cannot hold."""
    dt = _DTYPES.get(code)
    if dt is None:
        raise ModelLoadError(f"tensor type {_TYPE_NAMES.get(code, code)} is not supported (expected a numeric, bool or string type)")
    return np.dtype(dt)


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", name).lower()


def _options_dict(table: Any, cls_name: str) -> dict[str, Any]:
    """A builtin options table as ``{snake_case_field: python value}``."""
    mod = __import__(f"tflite.{cls_name}", fromlist=[cls_name])
    cls = getattr(mod, cls_name)
    opts = cls()
    opts.Init(table.Bytes, table.Pos)
    out: dict[str, Any] = {}
    for meth, fn in inspect.getmembers(cls, inspect.isfunction):
        if _GETTER_SKIP.match(meth):
            continue
        params = inspect.signature(fn).parameters
        if len(params) == 1:
            value = getattr(opts, meth)()
        elif hasattr(opts, meth + "AsNumpy"):
            arr = getattr(opts, meth + "AsNumpy")()
            value = tuple(int(v) for v in arr) if isinstance(arr, np.ndarray) else ()
        else:
            continue  # nested table vectors (StableHLO) are not needed by any supported op
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        key = _snake(meth)
        if key in _ENUM_FIELDS:
            value = _ENUM_FIELDS[key].get(value, value)
        out[key] = value
    return out


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    signature: tuple[int, ...]
    dtype: np.dtype | None
    type_code: int
    buffer: int
    q: QParams | None
    is_variable: bool
    sparsity: Any


def _qparams(t: Any, dtype: np.dtype | None) -> QParams | None:
    q = t.Quantization()
    if q is None or q.ScaleLength() == 0 or dtype is None or dtype.kind not in "iu":
        return None
    scale = np.asarray(q.ScaleAsNumpy(), np.float32)
    zp = np.asarray(q.ZeroPointAsNumpy(), np.int64) if q.ZeroPointLength() else np.zeros(scale.shape, np.int64)
    return QParams(scale=scale, zero_point=zp, axis=int(q.QuantizedDimension()), dtype=dtype)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        if len(data) < 8 or not tflite.Model.ModelBufferHasIdentifier(data, 0):
            raise ModelLoadError("not a TFLite model: the flatbuffer identifier 'TFL3' is missing at bytes 4..8")
        self.model = tflite.Model.GetRootAs(data, 0)
        self._buffers: dict[int, np.ndarray | None] = {}
        #: What is being read now, for the error when a corrupt offset or length makes the read fail.
        self.where = "the model table"

    # ----------------------------------------------------------- buffers
    def buffer_bytes(self, index: int) -> bytes | None:
        if index <= 0 or index >= self.model.BuffersLength():
            return None
        self.where = f"buffer {index}"
        buf = self.model.Buffers(index)
        offset, size = buf.Offset(), buf.Size()
        if offset > 1:
            if offset + size > len(self.data):
                raise ModelLoadError(f"buffer {index} points past the end of the file ({offset}+{size} > {len(self.data)})")
            return self.data[offset: offset + size]
        if buf.DataLength() == 0:
            return None
        return buf.DataAsNumpy().tobytes()

    # ----------------------------------------------------------- tensors
    def tensors(self, sg: Any, label: str = "subgraph") -> list[_Tensor]:
        out = []
        for i in range(sg.TensorsLength()):
            self.where = f"{label} tensor {i}"
            t = sg.Tensors(i)
            code = t.Type()
            dtype = None if _DTYPES.get(code) is None else np.dtype(_DTYPES[code])
            shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
            sig = tuple(int(d) for d in t.ShapeSignatureAsNumpy()) if t.ShapeSignatureLength() else shape
            name = (t.Name() or b"").decode("utf-8", "replace")
            out.append(_Tensor(name, shape, sig, dtype, code, t.Buffer(), _qparams(t, dtype), bool(t.IsVariable()), t.Sparsity()))
        return out

    def constant(self, t: _Tensor) -> np.ndarray | None:
        raw = self.buffer_bytes(t.buffer)
        if raw is None:
            return None
        if t.dtype is None or t.dtype == np.dtype(object):
            if t.dtype == np.dtype(object):
                return _decode_strings(raw, t.shape)
            raise ModelLoadError(f"constant tensor '{t.name}' has type {_TYPE_NAMES.get(t.type_code)}, which jaxinfer cannot hold")
        arr = np.frombuffer(raw, dtype=t.dtype)
        if t.sparsity is not None:
            from .sparse import densify

            return densify(arr, t.shape, t.sparsity)
        if arr.size != int(np.prod(t.shape, dtype=np.int64)):
            raise ModelLoadError(f"constant tensor '{t.name}': buffer holds {arr.size} elements, shape {t.shape} needs "
                                 f"{int(np.prod(t.shape))}")
        return arr.reshape(t.shape).copy()

    # ----------------------------------------------------------- operators
    def op_name(self, index: int) -> tuple[str, str]:
        self.where = f"operator code {index}"
        code = self.model.OperatorCodes(index)
        builtin = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        if builtin == BuiltinOperator.CUSTOM:
            return CUSTOM_DOMAIN, (code.CustomCode() or b"?").decode("utf-8", "replace")
        return DOMAIN, _BUILTIN_NAMES.get(builtin, f"BUILTIN_{builtin}")

    def options(self, op: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        kind = op.BuiltinOptionsType()
        if kind and op.BuiltinOptions() is not None:
            out.update(_options_dict(op.BuiltinOptions(), _OPTION_NAMES[kind]))
        kind2 = op.BuiltinOptions2Type()
        if kind2 and op.BuiltinOptions2() is not None:
            out.update(_options_dict(op.BuiltinOptions2(), _OPTION2_NAMES[kind2]))
        return out


def _decode_strings(raw: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """TFLite's string tensor layout: count, offsets[count + 1], bytes."""
    n = int(np.frombuffer(raw[:4], np.int32)[0])
    offs = np.frombuffer(raw[4: 8 + 4 * n], np.int32)
    items = [raw[offs[i]: offs[i + 1]].decode("utf-8", "replace") for i in range(n)]
    return np.array(items, dtype=object).reshape(shape)


def _dim(d: int) -> int | None:
    return None if d < 0 else d


@dataclass
class _Converted:
    graph: Graph
    notes: tuple[str, ...]


class _SubgraphBuilder:
    """Converts one TFLite subgraph (and, recursively, the subgraphs its ops call)."""

    def __init__(self, reader: _Reader, cache: dict[int, Graph], hybrid: str = "xnnpack", requant: str = "reference"):
        self.r = reader
        self.cache = cache
        self.hybrid = hybrid
        self.requant = requant

    def convert(self, index: int, rename: Mapping[int, str] | None = None,
                out_rename: Mapping[int, str] | None = None) -> Graph:
        key = index if not rename and not out_rename else None
        if key is not None and key in self.cache:
            return self.cache[key]
        if index < 0 or index >= self.r.model.SubgraphsLength():
            raise ModelLoadError(f"subgraph index {index} out of range (the model has {self.r.model.SubgraphsLength()})")
        self.r.where = f"subgraph {index}"
        sg = self.r.model.Subgraphs(index)
        tensors = self.r.tensors(sg, f"subgraph {index}")
        self.r.where = f"subgraph {index}"
        sg_name = (sg.Name() or b"").decode() or f"subgraph{index}"
        names = _unique_names(tensors, sg_name, {**(rename or {}), **(out_rename or {})})
        inputs_idx = [int(i) for i in sg.InputsAsNumpy()] if sg.InputsLength() else []
        outputs_idx = [int(i) for i in sg.OutputsAsNumpy()] if sg.OutputsLength() else []
        _check_indices(inputs_idx, len(tensors), f"{sg_name} inputs")
        _check_indices(outputs_idx, len(tensors), f"{sg_name} outputs")

        state_slots = _variable_state_slots(self.r, sg, tensors)
        initializers: dict[str, np.ndarray] = {}
        state_init: dict[str, np.ndarray] = {}
        for i, t in enumerate(tensors):
            if i in inputs_idx:
                continue
            if i in state_slots.values_set:
                value = self.r.constant(t)
                state_init[names[i]] = value if value is not None else np.zeros(t.shape, t.dtype or np.float32)
                continue
            value = self.r.constant(t)
            if value is not None:
                initializers[names[i]] = value

        nodes: list[Node] = []
        current: dict[str, str] = {}  # variable tensor -> its latest version
        for k in range(sg.OperatorsLength()):
            self.r.where = f"subgraph {index} operator {k}"
            op = sg.Operators(k)
            domain, op_type = self.r.op_name(op.OpcodeIndex())
            self.r.where = f"subgraph {index} operator {k} ({op_type})"
            ins = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
            outs = [int(i) for i in op.OutputsAsNumpy()] if op.OutputsLength() else []
            _check_indices(ins, len(tensors), f"{sg_name} operator {k} ({op_type}) inputs", absent_ok=True)
            _check_indices(outs, len(tensors), f"{sg_name} operator {k} ({op_type}) outputs")
            attrs: dict[str, Any] = {} if domain == CUSTOM_DOMAIN else self.r.options(op)
            for field, attr in _SUBGRAPH_FIELDS.items():
                if field in attrs and op_type in ("WHILE", "IF", "CALL_ONCE", "CALL", "STABLEHLO_COMPOSITE"):
                    attrs[attr] = self.convert(int(attrs.pop(field)))
            in_q = tuple(tensors[i].q if i >= 0 else None for i in ins)
            out_q = tuple(tensors[i].q for i in outs)
            if any(q is not None for q in in_q + out_q):
                attrs["in_q"] = in_q
                attrs["out_q"] = out_q
            if domain == DOMAIN and op_type in _HYBRID_OPS and self.hybrid == "xnnpack":
                attrs["hybrid_asymmetric"] = True
            if domain == DOMAIN and op_type in _QUANT_KERNEL_OPS and in_q and in_q[0] is not None:
                attrs["quant_kernel"] = self.requant
            if domain == DOMAIN and op_type in _WANTS_OUT_DTYPE:
                attrs["out_dtype"] = tensors[outs[0]].dtype
            if domain == DOMAIN and op_type in _WANTS_OUT_SHAPE:
                attrs["out_shape"] = tuple(_dim(d) for d in tensors[outs[0]].signature)
            in_names = [names[i] if i >= 0 else "" for i in ins]
            out_names = [names[i] for i in outs]
            slots = state_slots.by_op.get(k, ())
            if slots:
                attrs["state_outputs"] = slots
                for slot in slots:
                    var = names[ins[slot]]
                    in_names[slot] = current.get(var, var)
                    new = f"{var}@{k}"
                    out_names.append(new)
                    current[var] = new
            nodes.append(Node(op_type, tuple(in_names), tuple(out_names), attrs, name=f"{op_type}_{k}", domain=domain))

        def info(i: int) -> ValueInfo:
            t = tensors[i]
            dtype = t.dtype if t.dtype is not None else np.dtype(object)
            return ValueInfo(names[i], tuple(_dim(d) for d in t.signature), dtype)

        graph = Graph(
            nodes=tuple(nodes),
            inputs=tuple(info(i) for i in inputs_idx),
            outputs=tuple(info(i) for i in outputs_idx),
            initializers=initializers,
            opsets=OPSETS,
            name=sg_name,
            value_info={names[i]: info(i) for i in range(len(tensors)) if tensors[i].dtype is not None},
            fmt="tflite",
            state_vars={var: current.get(var, var) for var in state_init},
            state_init=state_init,
        )
        graph = _lower_variables(graph, [t for t in tensors], names)
        if key is not None:
            self.cache[key] = graph
        return graph


#: Ops told their output tensor's dtype / declared shape (TFLite stores them on the tensor).
_WANTS_OUT_DTYPE = {"CAST", "DEQUANTIZE", "QUANTIZE", "SHAPE", "ARG_MAX", "ARG_MIN", "ZEROS_LIKE", "ONES_LIKE", "FILL",
                    "RANGE", "READ_VARIABLE", "VAR_HANDLE"}
_WANTS_OUT_SHAPE = {"RESHAPE", "VAR_HANDLE"}
#: Ops whose dynamic-range (hybrid) kernels quantize inputs asymmetrically under XNNPACK.
_HYBRID_OPS = {"FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"}
HYBRID_MODES = ("xnnpack", "builtin")
#: Quantized ops whose integer arithmetic differs between LiteRT's kernel sets (told ``quant_kernel``):
#: reductions (ops/reduce.py), the conv/FC requantization (ops/nn.py ``requant_rule``) and ADD's
#: vector lanes (ops/elementwise.py).
_QUANT_KERNEL_OPS = {"MEAN", "SUM", "REDUCE_PROD", "CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "ADD"}


#: Builtins whose state inputs are TFLite variable tensors (LiteRT keeps them across invocations).
_STATE_SLOTS = {
    "UNIDIRECTIONAL_SEQUENCE_LSTM": (18, 19),
    "BIDIRECTIONAL_SEQUENCE_LSTM": (35, 36, 37, 38),
    "UNIDIRECTIONAL_SEQUENCE_RNN": (4,),
    "SVDF": (4,),
}


@dataclass
class _StateSlots:
    by_op: dict[int, tuple[int, ...]]  # operator index -> its input slots holding variable tensors
    values_set: set[int]  # those tensors' indices


def _variable_state_slots(reader: _Reader, sg: Any, tensors: list[_Tensor]) -> _StateSlots:
    """Which inputs of the recurrent builtins are variable tensors: they become graph state."""
    by_op: dict[int, tuple[int, ...]] = {}
    values: set[int] = set()
    for k in range(sg.OperatorsLength()):
        op = sg.Operators(k)
        domain, op_type = reader.op_name(op.OpcodeIndex())
        if domain != DOMAIN or op_type not in _STATE_SLOTS:
            continue
        ins = [int(i) for i in op.InputsAsNumpy()] if op.InputsLength() else []
        slots = tuple(s for s in _STATE_SLOTS[op_type] if s < len(ins) and ins[s] >= 0 and tensors[ins[s]].is_variable)
        if slots:
            by_op[k] = slots
            values.update(ins[s] for s in slots)
    return _StateSlots(by_op, values)


def _unique_names(tensors: list[_Tensor], sg_name: str, rename: Mapping[int, str]) -> list[str]:
    taken = set(rename.values())
    seen: set[str] = set(taken)
    out = []
    for i, t in enumerate(tensors):
        if i in rename:
            out.append(rename[i])
            continue
        base = t.name or f"{sg_name}_t{i}"
        name = base if base not in seen else f"{base}#{i}"
        seen.add(name)
        out.append(name)
    return out


def _lower_variables(graph: Graph, tensors: list[_Tensor], names: list[str]) -> Graph:
    """Resource variables -> explicit state.

    ``VAR_HANDLE`` nodes name a variable (``container/shared_name``); each
    ``READ_VARIABLE`` becomes an identity of the variable's current value and
    each ``ASSIGN_VARIABLE`` a new version of it. The graph then reads the
    variable as state ``var:<name>`` and hands back its last version.
    """
    handles: dict[str, str] = {}
    for node in graph.nodes:
        if node.op_type == "VAR_HANDLE" and node.domain == DOMAIN:
            key = "/".join(p for p in (node.attrs.get("container", ""), node.attrs.get("shared_name", "")) if p)
            handles[node.outputs[0]] = "var:" + (key or node.outputs[0])
    if not handles:
        return graph
    current: dict[str, str] = {}
    versions: dict[str, int] = {}
    nodes: list[Node] = []
    for node in graph.nodes:
        if node.op_type == "VAR_HANDLE" and node.domain == DOMAIN:
            continue
        if node.op_type == "READ_VARIABLE" and node.inputs and node.inputs[0] in handles:
            var = handles[node.inputs[0]]
            nodes.append(Node("READ_VARIABLE", (current.get(var, var),), node.outputs, {}, node.name, DOMAIN))
            continue
        if node.op_type == "ASSIGN_VARIABLE" and node.inputs and node.inputs[0] in handles:
            var = handles[node.inputs[0]]
            versions[var] = versions.get(var, 0) + 1
            new = f"{var}@{versions[var]}"
            nodes.append(Node("ASSIGN_VARIABLE", (current.get(var, var), node.inputs[1]), (new,), {}, node.name, DOMAIN))
            current[var] = new
            continue
        if any(i in handles for i in node.inputs):
            raise ModelLoadError(f"{node.op_type} node '{node.label}' takes a resource handle; only READ_VARIABLE and "
                                 "ASSIGN_VARIABLE may (resource handles cannot flow into other ops or subgraphs)")
        nodes.append(node)
    state_vars = {**graph.state_vars, **{var: current.get(var, var) for var in sorted(set(handles.values()))}}
    return graph.replace(nodes=tuple(nodes), state_vars=state_vars)


def read_bytes(source: str | os.PathLike[str] | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    try:
        with open(source, "rb") as f:
            return f.read()
    except OSError as e:
        raise ModelLoadError(f"cannot read TFLite file {source}: {e}") from e


def _signature(model: Any) -> tuple[int, dict[int, str], dict[int, str], str] | None:
    if model.SignatureDefsLength() == 0:
        return None
    sig = model.SignatureDefs(0)
    ins = {sig.Inputs(i).TensorIndex(): sig.Inputs(i).Name().decode() for i in range(sig.InputsLength())}
    outs = {sig.Outputs(i).TensorIndex(): sig.Outputs(i).Name().decode() for i in range(sig.OutputsLength())}
    return sig.SubgraphIndex(), ins, outs, (sig.SignatureKey() or b"").decode()


def _check_indices(indices: list[int], n: int, where: str, absent_ok: bool = False) -> None:
    """ModelLoadError for a tensor index outside ``[0, n)`` (``-1`` allowed where it means "absent")."""
    for i in indices:
        if not (0 <= i < n or (absent_ok and i == -1)):
            raise ModelLoadError(f"corrupt TFLite model: {where} name tensor index {i}; the subgraph has {n} "
                                 f"tensors (valid 0..{n - 1}{', or -1 for an absent optional input' if absent_ok else ''})")


def read_model(source: str | os.PathLike[str] | bytes, *, hybrid: str = "xnnpack",
               requant: str = "reference") -> Graph:
    """Read a ``.tflite`` file (path or bytes) into a :class:`Graph`.

    The main graph is the first SignatureDef's subgraph (subgraph 0 without
    one); with a signature, inputs and outputs carry its keys as names.
    ``CALL_ONCE`` init subgraphs run here, at load, to set variables' initial values.
    ``hybrid``, ``requant``: see :func:`~jaxinfer.converters.tflite.load_tflite`.
    """
    if hybrid not in HYBRID_MODES:
        raise ValueError(f"hybrid={hybrid!r}: expected one of {HYBRID_MODES}")
    check_kernel(requant, "requant")
    data = read_bytes(source)
    reader: _Reader | None = None
    try:
        reader = _Reader(data)
        reader.where = "signature def 0"
        sig = _signature(reader.model)
        builder = _SubgraphBuilder(reader, {}, hybrid, requant)
        if sig is None:
            graph = builder.convert(0)
        else:
            index, ins, outs, key = sig
            graph = builder.convert(index, ins, outs)
            graph = graph.replace(metadata={"signature_key": key})
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - corrupt flatbuffers fail anywhere inside the generated code
        where = reader.where if reader is not None else "the model table"
        raise ModelLoadError(
            f"corrupt TFLite model ({len(data)} bytes): reading {where} failed ({type(e).__name__}: {e}): a "
            "flatbuffer offset, length or value there is out of range for the file; expected an intact .tflite "
            "file (is it truncated or damaged?)") from e
    problems = structure_problems(graph, outputs_required=False)  # ASSIGN_VARIABLE has no outputs
    if problems:
        raise ModelLoadError("corrupt TFLite model: " + "; ".join(problems[:5]))
    from .state import run_call_once

    return run_call_once(graph)
