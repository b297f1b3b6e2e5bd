"""Shared helpers for op tests: run a model through jaxinfer and through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from jaxinfer.converters.onnx import load_onnx


def run_ours(model: onnx.ModelProto, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of ``model`` run by jaxinfer, in graph output order."""
    m = load_onnx(model)
    out = m.run(inputs)
    return [np.asarray(out[s.name]) for s in m.outputs]


def run_ort(model: onnx.ModelProto, inputs: dict[str, np.ndarray], n_out: int = 1) -> list[np.ndarray]:
    """Outputs ``y0..y{n_out-1}`` of ``model`` run by onnxruntime on CPU."""
    model = onnx.shape_inference.infer_shapes(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([f"y{i}" for i in range(n_out)], inputs)
