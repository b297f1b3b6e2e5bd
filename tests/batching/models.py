"""Tiny real ONNX models for batching and serving tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def mlp_proto(seed: int = 0, batch: str | int = "N", d_in: int = 8, d_out: int = 4) -> onnx.ModelProto:
    """y = relu(x @ W + b), z = sum(y, axis=1): two outputs, a symbolic (or fixed) batch."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((d_in, d_out)).astype(np.float32)
    b = rng.standard_normal((d_out,)).astype(np.float32)
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["a"]),
         helper.make_node("Relu", ["a"], ["y"]), helper.make_node("ReduceSum", ["y", "axes"], ["z"], keepdims=0)],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, d_in])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, d_out]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"), axes])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def mlp_reference(proto: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    y = np.maximum(x @ inits["W"] + inits["b"], 0)
    return {"y": y, "z": y.sum(axis=1)}


def seq_proto() -> onnx.ModelProto:
    """y = x * 2 over [batch, seq, 4]: position-wise, so padding seq is exact."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "seq",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "seq", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "seq", 4])], [two])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def fixed_reshape_proto() -> onnx.ModelProto:
    """A batch-1 export with a constant Reshape [1, 12]: the re-stamp must make it batchable."""
    shape = numpy_helper.from_array(np.array([1, 12], np.int64), "shape")
    g = helper.make_graph([helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Neg", ["r"], ["y"])],
                          "fixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])], [shape])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
