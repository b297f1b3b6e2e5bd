"""A small CNN built with onnx.helper: conv/BN/relu, a residual join, a depthwise conv, a
channel concat, flatten into a Gemm. Seeded Gaussian weights (1/sqrt(fan_in)), so pruning by
norm has real choices to make."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def small_cnn(seed: int = 0, c: int = 16, hw: int = 8) -> onnx.ModelProto:
    """x float32[N, 3, hw, hw] -> y float32[N, 10]."""
    rng = np.random.default_rng(seed)
    inits: list[onnx.TensorProto] = []

    def t(name: str, *shape: int, scale: float | None = None, offset: float = 0.0) -> str:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        s = scale if scale is not None else 1.0 / np.sqrt(fan_in)
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * s + offset).astype(np.float32), name))
        return name

    def conv(name, x, w, b, pad=1, **kw):
        return helper.make_node("Conv", [x, w, b], [name], name=name, pads=[pad] * 4, **kw)

    flat = c * 2 * (hw // 2) * (hw // 2)
    nodes = [
        conv("c1", "x", t("w1", c, 3, 3, 3), t("b1", c, scale=0.1)),
        helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        # BN after the relu: not folded into the conv, so its params must be sliced
        helper.make_node("BatchNormalization", ["r1", t("g", c, scale=0.1, offset=1.0), t("be", c, scale=0.1),
                                                t("mu", c, scale=0.1), t("var", c, scale=0.1, offset=1.0)],
                         ["bn"], name="bn"),
        conv("c2", "bn", t("w2", c, c, 3, 3), t("b2", c, scale=0.1)),
        helper.make_node("Add", ["c2", "c1"], ["res"], name="res"),           # residual: c1 and c2 pruned alike
        helper.make_node("Mul", ["res", t("chscale", 1, c, 1, 1, scale=0.1, offset=1.0)], ["sc"], name="sc"),
        conv("dw", "sc", t("wdw", c, 1, 3, 3), t("bdw", c, scale=0.1), group=c),   # depthwise: channel-wise
        helper.make_node("Relu", ["dw"], ["r2"], name="r2"),
        conv("c3", "r2", t("w3", c, c, 3, 3), t("b3", c, scale=0.1)),
        conv("c4", "r2", t("w4", c, c, 1, 1), t("b4", c, scale=0.1), pad=0),
        helper.make_node("Concat", ["c3", "c4"], ["cat"], name="cat", axis=1),
        helper.make_node("MaxPool", ["cat"], ["pool"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["pool"], ["flat"], name="flat", axis=1),
        helper.make_node("Gemm", ["flat", t("wfc", 32, flat), t("bfc", 32, scale=0.1)], ["fc1"], name="fc1",
                         transB=1),
        helper.make_node("Relu", ["fc1"], ["r3"], name="r3"),
        helper.make_node("Gemm", ["r3", t("wout", 32, 10), t("bout", 10, scale=0.1)], ["y"], name="out"),
    ]
    graph = helper.make_graph(nodes, "small_cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def images(n: int, seed: int, hw: int = 8) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 3, hw, hw)).astype(np.float32)}
