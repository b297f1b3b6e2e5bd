"""KServe v2 / Open Inference Protocol codec: JSON tensors and the binary tensor extension.

Spec: https://kserve.github.io/website/latest/modelserving/data_plane/v2_protocol/
and Triton's binary data extension (``Inference-Header-Content-Length``): the
body is a JSON header of that many bytes followed by the raw tensors, in input
order, of every input whose ``parameters.binary_data_size`` is set.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np

HEADER = "Inference-Header-Content-Length"

_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "BYTES": np.dtype(object),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class ProtocolError(Exception):
    """A request the server cannot accept; ``status`` is the HTTP code to answer with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def datatype_of(dtype: np.dtype | None) -> str:
    """The v2 datatype name of a numpy dtype (``FP32``...); strings are ``BYTES``."""
    if dtype is None:
        return "BYTES"
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    if dt not in _NAMES:
        raise ProtocolError(f"dtype {dt} has no KServe v2 datatype", 500)
    return _NAMES[dt]


def dtype_of(datatype: str, where: str) -> np.dtype:
    if not isinstance(datatype, str) or datatype not in _DTYPES:
        raise ProtocolError(f"{where}: unknown datatype {datatype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[datatype]


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    """A decoded ``POST .../infer`` body."""

    id: str | None
    inputs: dict[str, np.ndarray]
    outputs: list[RequestedOutput] | None  # None: all outputs
    binary_default: bool
    parameters: dict[str, Any] = field(default_factory=dict)


#: Largest rank and dim a request may declare (numpy holds at most 64 dims; no model here has more than a few).
MAX_RANK = 32
MAX_ELEMENTS = 2**31 - 1


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise ProtocolError(f"{where}: 'shape' must be a list of non-negative integers, got {value!r}")
    if len(value) > MAX_RANK:
        raise ProtocolError(f"{where}: 'shape' has {len(value)} dims; at most {MAX_RANK} are accepted")
    if math.prod(d for d in value if d) > MAX_ELEMENTS:
        raise ProtocolError(f"{where}: 'shape' {value} is too large; a tensor holds at most {MAX_ELEMENTS} elements")
    return tuple(value)


def _flag(value: Any, where: str) -> bool:
    """A boolean parameter, which must be JSON true/false (``"false"`` would read as true)."""
    if not isinstance(value, bool):
        raise ProtocolError(f"{where} must be true or false, got {value!r}")
    return value


def _decode_bytes_elements(raw: bytes, count: int, where: str) -> np.ndarray:
    if 4 * count > len(raw):  # checked before allocating: each element has a 4-byte length
        raise ProtocolError(f"{where}: {count} BYTES elements need at least {4 * count} bytes "
                            f"(a 4-byte length each), binary_data_size is {len(raw)}")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise ProtocolError(f"{where}: BYTES data truncated at element {i} of {count}")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise ProtocolError(f"{where}: BYTES element {i} claims {n} bytes, only {len(raw) - pos} remain")
        out[i] = raw[pos:pos + n]
        pos += n
    if pos != len(raw):
        raise ProtocolError(f"{where}: {len(raw) - pos} trailing bytes after {count} BYTES elements")
    return out


def _json_tensor(data: Any, shape: tuple[int, ...], dtype: np.dtype, where: str) -> np.ndarray:
    count = math.prod(shape)
    if dtype == np.dtype(object):
        try:
            flat = np.asarray(data, dtype=object).reshape(-1)
        except (TypeError, ValueError, RecursionError) as e:
            raise ProtocolError(f"{where}: BYTES 'data' must be a (nested) list of strings: {e}") from None
        if flat.size != count:
            raise ProtocolError(f"{where}: shape {list(shape)} needs {count} elements, 'data' has {flat.size}")
        return np.array([s.encode() if isinstance(s, str) else s for s in flat], dtype=object).reshape(shape)
    try:
        raw = np.asarray(data)
    except (TypeError, ValueError, OverflowError, RecursionError) as e:
        raise ProtocolError(f"{where}: 'data' must be a (nested) list of numbers: {e}") from None
    if raw.dtype == np.dtype(object) or raw.dtype.kind not in "biuf":
        raise ProtocolError(f"{where}: 'data' must be a (nested) list of {datatype_of(dtype)} numbers; got "
                            "ragged, string, null or out-of-range values")
    want = {"b": "b", "i": "iu", "u": "iu"}.get(dtype.kind, "iuf")
    if raw.size and raw.dtype.kind not in want:
        kind = {"b": "true/false", "f": "fractional numbers"}.get(raw.dtype.kind, "integers")
        raise ProtocolError(f"{where}: {datatype_of(dtype)} data cannot hold {kind} ({raw.dtype.name} values)")
    if dtype.kind in "iu" and raw.size:
        info = np.iinfo(dtype)
        if raw.min() < info.min or raw.max() > info.max:
            raise ProtocolError(f"{where}: values outside {datatype_of(dtype)}'s range [{info.min}, {info.max}]")
    arr = raw.astype(dtype, copy=False)
    if arr.size != count:
        raise ProtocolError(f"{where}: shape {list(shape)} needs {count} elements, 'data' has {arr.size}")
    return arr.reshape(shape)


def decode_infer(body: bytes, header_length: int | None) -> InferRequest:
    """Parse a v2 infer body (JSON, or JSON header + binary tensors); raises ProtocolError (400)."""
    if header_length is not None:
        if header_length < 0 or header_length > len(body):
            raise ProtocolError(f"{HEADER} is {header_length} but the body has {len(body)} bytes")
        head, rest = body[:header_length], memoryview(body)[header_length:]
    else:
        head, rest = body, memoryview(b"")
    try:
        req = json.loads(head)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, an int of > 4300 digits
        raise ProtocolError(f"request body is not valid JSON: {e}") from None
    if not isinstance(req, dict):
        raise ProtocolError(f"request must be a JSON object, got {type(req).__name__}")
    req_id = req.get("id")
    if req_id is not None and not isinstance(req_id, str):
        raise ProtocolError(f"'id' must be a string, got {req_id!r}")
    params = req.get("parameters") or {}
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    raw_inputs = req.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise ProtocolError("'inputs' must be a non-empty list of tensors")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, t in enumerate(raw_inputs):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise ProtocolError(f"inputs[{i}] must be an object with a string 'name'")
        name = t["name"]
        where = f"input '{name}'"
        if name in inputs:
            raise ProtocolError(f"{where} is given twice")
        shape = _shape(t.get("shape"), where)
        dtype = dtype_of(t.get("datatype"), where)
        tparams = t.get("parameters") or {}
        if not isinstance(tparams, dict):
            raise ProtocolError(f"{where}: 'parameters' must be an object")
        size = tparams.get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0:
                raise ProtocolError(f"{where}: binary_data_size must be a non-negative integer, got {size!r}")
            if "data" in t:
                raise ProtocolError(f"{where}: has both 'data' and binary_data_size")
            if offset + size > len(rest):
                raise ProtocolError(f"{where}: binary_data_size {size} runs past the end of the body "
                                    f"({len(rest) - offset} bytes left): truncated binary data")
            start, offset = offset, offset + size
            count = math.prod(shape)
            if dtype == np.dtype(object):
                arr = _decode_bytes_elements(bytes(rest[start:offset]), count, where).reshape(shape)
            else:
                if size != count * dtype.itemsize:
                    raise ProtocolError(f"{where}: shape {list(shape)} of {datatype_of(dtype)} needs "
                                        f"{count * dtype.itemsize} bytes, binary_data_size is {size}")
                # a read-only view of the body (no copy); an odd offset gives an unaligned array, which
                # numpy and device_put handle
                arr = np.frombuffer(rest, dtype=dtype, count=count, offset=start).reshape(shape)
        else:
            if "data" not in t:
                raise ProtocolError(f"{where}: needs 'data' or parameters.binary_data_size")
            arr = _json_tensor(t["data"], shape, dtype, where)
        inputs[name] = arr
    if offset != len(rest):
        raise ProtocolError(f"body has {len(rest) - offset} bytes of binary data no input claims")
    binary_default = _flag(params.get("binary_data_output", False), "parameters.binary_data_output")
    outputs = None
    if req.get("outputs") is not None:
        if not isinstance(req["outputs"], list):
            raise ProtocolError("'outputs' must be a list")
        outputs = []
        for i, o in enumerate(req["outputs"]):
            if not isinstance(o, dict) or not isinstance(o.get("name"), str):
                raise ProtocolError(f"outputs[{i}] must be an object with a string 'name'")
            op = o.get("parameters") or {}
            if not isinstance(op, dict):
                raise ProtocolError(f"outputs[{i}]: 'parameters' must be an object, got {op!r}")
            binary = _flag(op.get("binary_data", binary_default), f"outputs[{i}].parameters.binary_data")
            outputs.append(RequestedOutput(o["name"], binary))
    return InferRequest(req_id, inputs, outputs, binary_default, params)


def _encode_bytes(arr: np.ndarray) -> bytes:
    parts = []
    for v in arr.reshape(-1):
        b = v if isinstance(v, bytes) else str(v).encode()
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def _json_data(arr: np.ndarray) -> list[Any]:
    flat = arr.reshape(-1)
    if arr.dtype == np.dtype(object):
        return [v.decode(errors="replace") if isinstance(v, bytes) else str(v) for v in flat]
    if arr.dtype == np.dtype(ml_dtypes.bfloat16) or arr.dtype == np.float16:
        flat = flat.astype(np.float32)
    return flat.tolist()


def encode_infer(model: str, version: str, req_id: str | None, outputs: Sequence[tuple[str, np.ndarray, bool]],
                 parameters: Mapping[str, Any] | None = None) -> tuple[bytes, dict[str, str]]:
    """A v2 infer response body and its extra headers; binary outputs go after the JSON header."""
    items = []
    blobs: list[bytes] = []
    for name, arr, binary in outputs:
        arr = np.asarray(arr)
        item: dict[str, Any] = {"name": name, "datatype": datatype_of(arr.dtype), "shape": list(arr.shape)}
        if binary:
            blob = _encode_bytes(arr) if arr.dtype == np.dtype(object) else np.ascontiguousarray(arr).tobytes()
            item["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            item["data"] = _json_data(arr)
        items.append(item)
    resp: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": items}
    if req_id is not None:
        resp["id"] = req_id
    if parameters:
        resp["parameters"] = dict(parameters)
    head = json.dumps(resp, separators=(",", ":")).encode()
    if not blobs:
        return head, {"content-type": "application/json"}
    return head + b"".join(blobs), {"content-type": "application/octet-stream", HEADER: str(len(head))}
