"""A transformer-encoder ONNX fixture built in code (MatMul/Add/LayerNormalization/Softmax).

``encoder(d_model=1024, ffn=4096, layers=4)`` is the ~50M-param model the quantization
benchmark uses; tests build a small one. Weights are seeded Gaussians scaled like a trained
model's (1/sqrt(fan_in)), so int8 errors are representative.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def encoder(d_model: int = 1024, ffn: int = 4096, layers: int = 4, heads: int = 16, seed: int = 0,
            opset: int = 17) -> onnx.ModelProto:
    """input ``x`` float32[batch, seq, d_model] -> ``y`` float32[batch, seq, d_model]."""
    rng = np.random.default_rng(seed)
    dh = d_model // heads
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def w(name: str, *shape: int, scale: float | None = None) -> str:
        s = scale if scale is not None else 1.0 / np.sqrt(shape[0])
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * s).astype(np.float32), name))
        return name

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(op: str, ins: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, ins, [out], name=out, **attrs))
        return out

    const("shape_heads", np.array([0, 0, heads, dh], np.int64))
    const("shape_merge", np.array([0, 0, d_model], np.int64))
    const("attn_scale", np.array(1.0 / np.sqrt(dh), np.float32))
    const("half", np.array(0.5, np.float32))
    const("one", np.array(1.0, np.float32))
    const("rsqrt2", np.array(1.0 / np.sqrt(2.0), np.float32))
    x = "x"
    for i in range(layers):
        p = f"l{i}"
        g1 = const(f"{p}.ln1.g", np.ones(d_model, np.float32))
        b1 = const(f"{p}.ln1.b", np.zeros(d_model, np.float32))
        h = node("LayerNormalization", [x, g1, b1], f"{p}/ln1", axis=-1, epsilon=1e-5)
        qkv = []
        for n in ("q", "k", "v"):
            m = node("MatMul", [h, w(f"{p}.attn.{n}.w", d_model, d_model)], f"{p}/attn/{n}/matmul")
            a = node("Add", [m, w(f"{p}.attn.{n}.b", d_model, scale=0.02)], f"{p}/attn/{n}/add")
            r = node("Reshape", [a, "shape_heads"], f"{p}/attn/{n}/reshape")
            perm = [0, 2, 3, 1] if n == "k" else [0, 2, 1, 3]
            qkv.append(node("Transpose", [r], f"{p}/attn/{n}/transpose", perm=perm))
        s = node("MatMul", [qkv[0], qkv[1]], f"{p}/attn/scores")
        s = node("Mul", [s, "attn_scale"], f"{p}/attn/scaled")
        s = node("Softmax", [s], f"{p}/attn/softmax", axis=-1)
        c = node("MatMul", [s, qkv[2]], f"{p}/attn/context")
        c = node("Transpose", [c], f"{p}/attn/context_t", perm=[0, 2, 1, 3])
        c = node("Reshape", [c, "shape_merge"], f"{p}/attn/merge")
        o = node("MatMul", [c, w(f"{p}.attn.o.w", d_model, d_model)], f"{p}/attn/o/matmul")
        o = node("Add", [o, w(f"{p}.attn.o.b", d_model, scale=0.02)], f"{p}/attn/o/add")
        x = node("Add", [x, o], f"{p}/res1")
        g2 = const(f"{p}.ln2.g", np.ones(d_model, np.float32))
        b2 = const(f"{p}.ln2.b", np.zeros(d_model, np.float32))
        h = node("LayerNormalization", [x, g2, b2], f"{p}/ln2", axis=-1, epsilon=1e-5)
        f = node("MatMul", [h, w(f"{p}.ffn.up.w", d_model, ffn)], f"{p}/ffn/up/matmul")
        f = node("Add", [f, w(f"{p}.ffn.up.b", ffn, scale=0.02)], f"{p}/ffn/up/add")
        e = node("Mul", [f, "rsqrt2"], f"{p}/ffn/gelu/div")
        e = node("Erf", [e], f"{p}/ffn/gelu/erf")
        e = node("Add", [e, "one"], f"{p}/ffn/gelu/add")
        e = node("Mul", [f, e], f"{p}/ffn/gelu/mul")
        f = node("Mul", [e, "half"], f"{p}/ffn/gelu/half")
        f = node("MatMul", [f, w(f"{p}.ffn.down.w", ffn, d_model)], f"{p}/ffn/down/matmul")
        f = node("Add", [f, w(f"{p}.ffn.down.b", d_model, scale=0.02)], f"{p}/ffn/down/add")
        x = node("Add", [x, f], f"{p}/res2")
    nodes[-1].output[0] = "y"
    nodes[-1].name = "y"
    graph = helper.make_graph(
        nodes, "encoder",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", d_model])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", d_model])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def inputs(batch: int, seq: int, d_model: int = 1024, seed: int = 1) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((batch, seq, d_model)).astype(np.float32)}
