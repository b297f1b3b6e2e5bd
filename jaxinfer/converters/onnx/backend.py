"""The ``onnx.backend`` API over jaxinfer, shaped like ``onnxruntime.backend``.

``onnx.backend.test.BackendTest(jaxinfer.converters.onnx.backend, __name__)``
runs the ONNX conformance suite against it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto, NodeProto, ValueInfoProto, helper

from ...model import Model
from . import load_onnx


class BackendRep:
    """A prepared model: ``run(inputs)`` takes a list (graph input order) or a dict."""

    def __init__(self, model: Model):
        self.model = model

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        names = [s.name for s in self.model.inputs]
        if isinstance(inputs, Mapping):
            feeds = dict(inputs)
        else:
            if isinstance(inputs, np.ndarray):
                inputs = [inputs]
            inputs = list(inputs)
            if len(inputs) > len(names):
                raise ValueError(f"model takes {len(names)} inputs ({names}), got {len(inputs)}")
            feeds = dict(zip(names, inputs))
            # Trailing optional inputs may be left out by the caller.
            for sig in self.model.inputs[len(inputs):]:
                if sig.kind == "optional":
                    feeds[sig.name] = None
        out = self.model.run(feeds)
        return tuple(out[s.name] for s in self.model.outputs)


def is_compatible(model: ModelProto, device: str = "CPU", **kwargs: Any) -> bool:
    return True


def supports_device(device: str) -> bool:
    """CPU always; GPU/TPU when jax has such a device."""
    d = device.upper()
    if d == "CPU":
        return True
    import jax

    kind = {"CUDA": "gpu", "GPU": "gpu", "TPU": "tpu"}.get(d)
    try:
        return bool(kind and jax.devices(kind))
    except RuntimeError:
        return False


def prepare(model: ModelProto | str | bytes, device: str = "CPU", **kwargs: Any) -> BackendRep:
    """Convert (and validate) a model; returns a :class:`BackendRep`."""
    return BackendRep(load_onnx(model))


def run_model(model: ModelProto | str | bytes, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[Any, ...]:
    return prepare(model, device, **kwargs).run(inputs)


def _value_info(name: str, arr: Any) -> ValueInfoProto:
    if isinstance(arr, (list, tuple)):
        elem = helper.np_dtype_to_tensor_dtype(np.asarray(arr[0]).dtype) if arr else onnx.TensorProto.FLOAT
        return helper.make_value_info(name, helper.make_sequence_type_proto(helper.make_tensor_type_proto(elem, None)))
    a = np.asarray(arr)
    return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)


def run_node(node: NodeProto, inputs: Sequence[Any], device: str = "CPU",
             outputs_info: Sequence[tuple[Any, Any]] | None = None, opset_version: int | None = None,
             **kwargs: Any) -> tuple[Any, ...]:
    """Run one node: it is wrapped in a one-node model at the current opset."""
    present = [n for n in node.input if n]
    ins = [_value_info(n, a) for n, a in zip(present, inputs)]
    outs = [helper.make_value_info(n, onnx.TypeProto()) for n in node.output if n]
    graph = helper.make_graph([node], "run_node", ins, outs)
    opset = opset_version or onnx.defs.onnx_opset_version()
    domains = [helper.make_opsetid("", opset)]
    if node.domain not in ("", "ai.onnx"):
        domains.append(helper.make_opsetid(node.domain, 1))
    model = helper.make_model(graph, opset_imports=domains)
    return run_model(model, list(inputs), device, **kwargs)


__all__ = ["BackendRep", "is_compatible", "prepare", "run_model", "run_node", "supports_device"]
