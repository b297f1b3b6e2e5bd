"""A small TFLite model builder for tests, on the ``tflite`` package's flatbuffer builder functions.

    b = ModelBuilder()
    x = b.input("x", (1, 8, 8, 3))
    w = b.const("w", weights)
    y = b.tensor("y", (1, 8, 8, 4))
    b.op("CONV_2D", [x, w, -1], [y], "Conv2DOptions", padding=0, stride_w=1, stride_h=1)
    data = b.finish(outputs=[y])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np
import tflite
from tflite.BuiltinOperator import BuiltinOperator
from tflite.BuiltinOptions import BuiltinOptions
from tflite.BuiltinOptions2 import BuiltinOptions2

_TYPE = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int32): 2, np.dtype(np.uint8): 3,
         np.dtype(np.int64): 4, np.dtype(np.bool_): 6, np.dtype(np.int16): 7, np.dtype(np.int8): 9,
         np.dtype(np.float64): 10}
RESOURCE = 13
_VERSION = {"BROADCAST_TO": 2}  # builtins LiteRT registers only from a later version
PADDING = {"SAME": 0, "VALID": 1}
ACT = {"NONE": 0, "RELU": 1, "RELU_N1_TO_1": 2, "RELU6": 3, "TANH": 4}


def _camel(name: str) -> str:
    return "".join(p[:1].upper() + p[1:] for p in name.split("_"))


@dataclass
class _T:
    name: str
    shape: tuple[int, ...]
    type_code: int
    buffer: int = 0
    q: tuple | None = None  # (scales, zero_points, axis)
    signature: tuple[int, ...] | None = None
    is_variable: bool = False
    sparsity: tuple | None = None  # (traversal_order, block_map, [(format, dense_size, segments, indices)])


@dataclass
class _Op:
    code: int
    inputs: list[int]
    outputs: list[int]
    options: str | None
    fields: dict[str, Any]
    custom: str | None = None


@dataclass
class _Sub:
    name: str
    tensors: list[_T] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)


class ModelBuilder:
    """Collects subgraphs, tensors, buffers and ops; ``finish`` serializes the model."""

    def __init__(self) -> None:
        self.buffers: list[bytes] = [b""]
        self.subgraphs: list[_Sub] = [_Sub("main")]
        self.cur = 0
        self.opcodes: list[tuple[int, str | None]] = []
        self.signature: tuple[dict[str, int], dict[str, int]] | None = None

    # ---------------------------------------------------------------- subgraphs
    def subgraph(self, name: str) -> int:
        self.subgraphs.append(_Sub(name))
        self.cur = len(self.subgraphs) - 1
        return self.cur

    def use(self, index: int) -> None:
        self.cur = index

    @property
    def sg(self) -> _Sub:
        return self.subgraphs[self.cur]

    # ---------------------------------------------------------------- tensors
    def tensor(self, name: str, shape, dtype=np.float32, q=None, signature=None, type_code=None,
               variable: bool = False) -> int:
        code = _TYPE[np.dtype(dtype)] if type_code is None else type_code
        if q is not None:
            scales, zps, *axis = q
            q = (np.atleast_1d(np.asarray(scales, np.float32)), np.atleast_1d(np.asarray(zps, np.int64)),
                 axis[0] if axis else 0)
        self.sg.tensors.append(_T(name, tuple(int(d) for d in shape), code, 0, q,
                                  None if signature is None else tuple(signature), variable))
        return len(self.sg.tensors) - 1

    def input(self, name: str, shape, dtype=np.float32, q=None, signature=None) -> int:
        t = self.tensor(name, shape, dtype, q, signature)
        self.sg.inputs.append(t)
        return t

    def const(self, name: str, value: np.ndarray, q=None) -> int:
        value = np.array(value, order="C")
        t = self.tensor(name, value.shape, value.dtype, q)
        self.buffers.append(value.tobytes())
        self.sg.tensors[t].buffer = len(self.buffers) - 1
        return t

    def sparse_const(self, name: str, shape, values: np.ndarray, sparsity: tuple, q=None) -> int:
        """A sparse constant of dense ``shape``: ``values`` stored in walk order, ``sparsity`` as on ``_T``."""
        values = np.ascontiguousarray(values)
        t = self.tensor(name, shape, values.dtype, q)
        self.buffers.append(values.tobytes())
        self.sg.tensors[t].buffer = len(self.buffers) - 1
        self.sg.tensors[t].sparsity = sparsity
        return t

    # ---------------------------------------------------------------- ops
    def op(self, name: str, inputs, outputs, options: str | None = None, /, **fields: Any) -> None:
        code = getattr(BuiltinOperator, name)
        key = (code, _VERSION.get(name))
        if key not in self.opcodes:
            self.opcodes.append(key)
        self.sg.ops.append(_Op(self.opcodes.index(key), list(inputs), list(outputs), options, fields))

    def custom(self, name: str, inputs, outputs) -> None:
        key = (BuiltinOperator.CUSTOM, name)
        if key not in self.opcodes:
            self.opcodes.append(key)
        self.sg.ops.append(_Op(self.opcodes.index(key), list(inputs), list(outputs), None, {}))

    def outputs(self, *ts: int) -> None:
        self.sg.outputs.extend(ts)

    def sign(self, inputs: dict[str, int], outputs: dict[str, int]) -> None:
        self.signature = (inputs, outputs)

    # ---------------------------------------------------------------- serialize
    def finish(self) -> bytes:
        b = flatbuffers.Builder(1024)

        def ivec(start, values):
            start(b, len(values))
            for v in reversed(values):
                b.PrependInt32(int(v))
            return b.EndVector()

        def offvec(start, offs):
            start(b, len(offs))
            for o in reversed(offs):
                b.PrependUOffsetTRelative(o)
            return b.EndVector()

        buf_offs = []
        for data in self.buffers:
            vec = None
            if data:
                b.StartVector(1, len(data), 16)
                b.head = b.head - len(data)
                b.Bytes[b.head: b.head + len(data)] = data
                vec = b.EndVector()
            tflite.BufferStart(b)
            if vec is not None:
                tflite.BufferAddData(b, vec)
            buf_offs.append(tflite.BufferEnd(b))

        sub_offs = []
        for sg in self.subgraphs:
            t_offs = [self._tensor(b, t, ivec) for t in sg.tensors]
            o_offs = [self._operator(b, o, ivec) for o in sg.ops]
            tv = offvec(tflite.SubGraphStartTensorsVector, t_offs)
            ov = offvec(tflite.SubGraphStartOperatorsVector, o_offs)
            iv = ivec(tflite.SubGraphStartInputsVector, sg.inputs)
            outv = ivec(tflite.SubGraphStartOutputsVector, sg.outputs)
            name = b.CreateString(sg.name)
            tflite.SubGraphStart(b)
            tflite.SubGraphAddTensors(b, tv)
            tflite.SubGraphAddOperators(b, ov)
            tflite.SubGraphAddInputs(b, iv)
            tflite.SubGraphAddOutputs(b, outv)
            tflite.SubGraphAddName(b, name)
            sub_offs.append(tflite.SubGraphEnd(b))

        code_offs = []
        for code, custom in self.opcodes:
            version = custom if isinstance(custom, int) else 1
            custom = custom if isinstance(custom, str) else None
            cname = b.CreateString(custom) if custom else None
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
            tflite.OperatorCodeAddBuiltinCode(b, code)
            tflite.OperatorCodeAddVersion(b, version)
            if cname is not None:
                tflite.OperatorCodeAddCustomCode(b, cname)
            code_offs.append(tflite.OperatorCodeEnd(b))

        sig_vec = None
        if self.signature is not None:
            def tmaps(m):
                offs = []
                for k, idx in m.items():
                    s = b.CreateString(k)
                    tflite.TensorMapStart(b)
                    tflite.TensorMapAddName(b, s)
                    tflite.TensorMapAddTensorIndex(b, idx)
                    offs.append(tflite.TensorMapEnd(b))
                return offs
            ins = offvec(tflite.SignatureDefStartInputsVector, tmaps(self.signature[0]))
            outs = offvec(tflite.SignatureDefStartOutputsVector, tmaps(self.signature[1]))
            key = b.CreateString("serving_default")
            tflite.SignatureDefStart(b)
            tflite.SignatureDefAddInputs(b, ins)
            tflite.SignatureDefAddOutputs(b, outs)
            tflite.SignatureDefAddSignatureKey(b, key)
            tflite.SignatureDefAddSubgraphIndex(b, 0)
            sig_vec = offvec(tflite.ModelStartSignatureDefsVector, [tflite.SignatureDefEnd(b)])

        codes = offvec(tflite.ModelStartOperatorCodesVector, code_offs)
        subs = offvec(tflite.ModelStartSubgraphsVector, sub_offs)
        bufs = offvec(tflite.ModelStartBuffersVector, buf_offs)
        desc = b.CreateString("jaxinfer test")
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, codes)
        tflite.ModelAddSubgraphs(b, subs)
        tflite.ModelAddBuffers(b, bufs)
        tflite.ModelAddDescription(b, desc)
        if sig_vec is not None:
            tflite.ModelAddSignatureDefs(b, sig_vec)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())

    @staticmethod
    def _tensor(b, t: _T, ivec) -> int:
        shape = ivec(tflite.TensorStartShapeVector, t.shape)
        sig = ivec(tflite.TensorStartShapeSignatureVector, t.signature) if t.signature is not None else None
        name = b.CreateString(t.name)
        qoff = None
        if t.q is not None:
            scales, zps, axis = t.q
            b.StartVector(4, len(scales), 4)
            for s in reversed(scales):
                b.PrependFloat32(float(s))
            sv = b.EndVector()
            b.StartVector(8, len(zps), 8)
            for z in reversed(zps):
                b.PrependInt64(int(z))
            zv = b.EndVector()
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, sv)
            tflite.QuantizationParametersAddZeroPoint(b, zv)
            tflite.QuantizationParametersAddQuantizedDimension(b, axis)
            qoff = tflite.QuantizationParametersEnd(b)
        sp = ModelBuilder._sparsity(b, t.sparsity, ivec) if t.sparsity is not None else None
        tflite.TensorStart(b)
        if sp is not None:
            tflite.TensorAddSparsity(b, sp)
        tflite.TensorAddShape(b, shape)
        if sig is not None:
            tflite.TensorAddShapeSignature(b, sig)
        tflite.TensorAddType(b, t.type_code)
        tflite.TensorAddBuffer(b, t.buffer)
        tflite.TensorAddName(b, name)
        if qoff is not None:
            tflite.TensorAddQuantization(b, qoff)
        tflite.TensorAddIsVariable(b, t.is_variable)
        return tflite.TensorEnd(b)

    @staticmethod
    def _sparsity(b, sparsity: tuple, ivec) -> int:
        order, block_map, levels = sparsity
        kinds = {np.dtype(np.int32): (1, "Int32Vector"), np.dtype(np.uint16): (2, "Uint16Vector"),
                 np.dtype(np.uint8): (3, "Uint8Vector")}

        def index_vec(arr):
            arr = np.asarray(arr)
            code, name = kinds[arr.dtype]
            getattr(tflite, f"{name}StartValuesVector")(b, len(arr))
            for v in reversed(arr.tolist()):
                {1: b.PrependInt32, 2: b.PrependUint16, 3: b.PrependUint8}[code](int(v))
            vec = b.EndVector()
            getattr(tflite, f"{name}Start")(b)
            getattr(tflite, f"{name}AddValues")(b, vec)
            return code, getattr(tflite, f"{name}End")(b)

        dm_offs = []
        for fmt, size, seg, idx in levels:
            seg_t = index_vec(seg) if fmt == 1 else None
            idx_t = index_vec(idx) if fmt == 1 else None
            tflite.DimensionMetadataStart(b)
            tflite.DimensionMetadataAddFormat(b, fmt)
            tflite.DimensionMetadataAddDenseSize(b, size)
            if seg_t is not None:
                tflite.DimensionMetadataAddArraySegmentsType(b, seg_t[0])
                tflite.DimensionMetadataAddArraySegments(b, seg_t[1])
                tflite.DimensionMetadataAddArrayIndicesType(b, idx_t[0])
                tflite.DimensionMetadataAddArrayIndices(b, idx_t[1])
            dm_offs.append(tflite.DimensionMetadataEnd(b))
        tflite.SparsityParametersStartDimMetadataVector(b, len(dm_offs))
        for o in reversed(dm_offs):
            b.PrependUOffsetTRelative(o)
        dmv = b.EndVector()
        ov = ivec(tflite.SparsityParametersStartTraversalOrderVector, order)
        bm = ivec(tflite.SparsityParametersStartBlockMapVector, block_map) if block_map else None
        tflite.SparsityParametersStart(b)
        tflite.SparsityParametersAddTraversalOrder(b, ov)
        if bm is not None:
            tflite.SparsityParametersAddBlockMap(b, bm)
        tflite.SparsityParametersAddDimMetadata(b, dmv)
        return tflite.SparsityParametersEnd(b)

    @staticmethod
    def _operator(b, o: _Op, ivec) -> int:
        opt_off = None
        opt_type = 0
        second = False
        if o.options:
            mod = __import__(f"tflite.{o.options}", fromlist=[o.options])
            pre: dict[str, int] = {}
            for k, v in o.fields.items():
                camel = _camel(k)
                if isinstance(v, str):
                    pre[camel] = b.CreateString(v)
                elif isinstance(v, (bytes, bytearray)):
                    pre[camel] = b.CreateByteVector(v)
                elif isinstance(v, (list, tuple)):
                    pre[camel] = ivec(getattr(mod, f"{o.options}Start{camel}Vector"), v)
            getattr(mod, f"{o.options}Start")(b)
            for k, v in o.fields.items():
                camel = _camel(k)
                getattr(mod, f"{o.options}Add{camel}")(b, pre.get(camel, v))
            opt_off = getattr(mod, f"{o.options}End")(b)
            if hasattr(BuiltinOptions, o.options):
                opt_type = getattr(BuiltinOptions, o.options)
            else:
                opt_type = getattr(BuiltinOptions2, o.options)
                second = True
        iv = ivec(tflite.OperatorStartInputsVector, o.inputs)
        ov = ivec(tflite.OperatorStartOutputsVector, o.outputs)
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, o.code)
        tflite.OperatorAddInputs(b, iv)
        tflite.OperatorAddOutputs(b, ov)
        if opt_off is not None:
            if second:
                tflite.OperatorAddBuiltinOptions2Type(b, opt_type)
                tflite.OperatorAddBuiltinOptions2(b, opt_off)
            else:
                tflite.OperatorAddBuiltinOptionsType(b, opt_type)
                tflite.OperatorAddBuiltinOptions(b, opt_off)
        return tflite.OperatorEnd(b)


def accumulator_model(state_shape: tuple[int, ...] = (1, 4), start: float = 0.5) -> bytes:
    """A streaming model with a resource variable: ``acc += x; return acc``, ``acc`` set to ``start`` by a
    CALL_ONCE init subgraph (its output says which state a call ran on)."""
    b = ModelBuilder()
    x = b.input("x", state_shape)
    h = b.tensor("h", (), type_code=RESOURCE)
    v, s = b.tensor("v", state_shape), b.tensor("s", state_shape)
    b.op("CALL_ONCE", [], [], "CallOnceOptions", init_subgraph_index=1)
    b.op("VAR_HANDLE", [], [h], "VarHandleOptions", shared_name="acc")
    b.op("READ_VARIABLE", [h], [v])
    b.op("ADD", [v, x], [s], "AddOptions", fused_activation_function=0)
    b.op("ASSIGN_VARIABLE", [h, s], [])
    b.outputs(s)
    b.subgraph("init")
    h2 = b.tensor("h", (), type_code=RESOURCE)
    first = b.const("start", np.full(state_shape, start, np.float32))
    b.op("VAR_HANDLE", [], [h2], "VarHandleOptions", shared_name="acc")
    b.op("ASSIGN_VARIABLE", [h2, first], [])
    return b.finish()
