"""Decomposed MoE layers as exporters write them (no MoE op), built with onnx.helper at test time.

``decomposed_moe(form=...)`` builds ``hidden [batch, seq, d] -> out = hidden + MoE(hidden)``
with a MatMul router -> Softmax -> TopK (-> renormalise) and one FFN per expert
(each with its own initializers), combined in one of these idioms:

- ``"dense"``: the gate matrix ``ScatterElements(zeros, top_idx, top_vals)``, each
  expert's output times ``Slice(gates, e:e+1)``, summed by an ``Add`` chain
  (what ``torch.onnx.export`` writes for ``zeros_like(p).scatter(...)`` + a loop);
- ``"stack"``: ``Unsqueeze``/``Concat`` every expert's output to ``[.., E, d]``,
  times ``Unsqueeze(gates)``, ``ReduceSum`` over experts;
- ``"onehot"``: ``OneHot(top_idx) * top_vals`` summed over k gives the gate matrix,
  ``Gather(gates, e)`` per expert, ``Sum`` of the terms;
- ``"equal"``: ``ReduceSum(top_vals * Cast(Equal(top_idx, e)))`` per expert, an
  ``Add`` chain starting from ``ConstantOfShape(Shape(hidden))`` (torch's mask loop).

``act`` is ``"gelu"`` (erf form, as torch writes nn.GELU), ``"relu"``, or ``"swiglu"``
(``silu(x W1) * (x W3)``, no biases). ``breaks`` makes a graph that matches only
in part: ``"wrong_gate"`` (expert 1 weighted by expert 0's gate), ``"leak"`` (an
expert's hidden activation is also a graph output), ``"mixed_act"`` (one expert
uses another activation), ``"dropped"`` (the last expert's term is never added).

``moe_decoder`` stacks layers of attention + a decomposed MoE (for expert x tensor and
expert x stage meshes); ``torch_moe`` exports a hand-written torch module.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .conftest import fixture_models

OPSET = 17


class _B(fixture_models()._Builder):
    """The sharding fixtures' graph builder; constants here are named by value and dtype."""

    def const(self, value, dtype=np.int64) -> str:  # type: ignore[override]
        return super().const(np.asarray(value, dtype))


def _act(b: _B, h: str, kind: str) -> str:
    if kind == "relu":
        return b.op("Relu", [h])
    if kind == "gelu":  # 0.5 * h * (1 + erf(h / sqrt(2)))
        e = b.op("Erf", [b.op("Div", [h, b.const(1.4142135, np.float32)])])
        return b.op("Mul", [b.op("Mul", [h, b.op("Add", [e, b.const(1.0, np.float32)])]), b.const(0.5, np.float32)])
    if kind == "silu":
        return b.op("Mul", [h, b.op("Sigmoid", [h])])
    raise ValueError(kind)


def _expert(b: _B, x: str, p: str, d: int, inter: int, act: str, leak: list[str]) -> str:
    if act == "swiglu":
        h1 = b.op("MatMul", [x, b.weight(f"{p}.w1", (d, inter), 0.3)])
        h3 = b.op("MatMul", [x, b.weight(f"{p}.w3", (d, inter), 0.3)])
        a = b.op("Mul", [_act(b, h1, "silu"), h3])
        return b.op("MatMul", [a, b.weight(f"{p}.w2", (inter, d), 0.3)])
    h = b.op("Add", [b.op("MatMul", [x, b.weight(f"{p}.fc1.weight", (d, inter), 0.3)]),
                     b.weight(f"{p}.fc1.bias", (inter,), 0.1)])
    leak.append(h)
    a = _act(b, h, act)
    return b.op("Add", [b.op("MatMul", [a, b.weight(f"{p}.fc2.weight", (inter, d), 0.3)]),
                        b.weight(f"{p}.fc2.bias", (d,), 0.1)])


def _moe_block(b: _B, x: str, prefix: str, form: str, experts: int, d: int, inter: int, k: int, normalize: bool,
               act: str, breaks: str | None, leak: list[str]) -> str:
    logits = b.op("MatMul", [x, b.weight(f"{prefix}router.weight", (d, experts), 1.0)])
    probs = b.op("Softmax", [logits], axis=-1)
    vals, idx = b.op("TopK", [probs, b.const([k])], n_out=2, axis=-1)
    if normalize:
        vals = b.op("Div", [vals, b.op("ReduceSum", [vals, b.const([-1])], keepdims=1)])
    ys = [_expert(b, x, f"{prefix}experts.{e}", d, inter, "relu" if breaks == "mixed_act" and e == 3 else act, leak)
          for e in range(experts)]
    col = [0 if breaks == "wrong_gate" and e == 1 else e for e in range(experts)]
    terms = ys if form == "stack" else []
    if form in ("dense", "stack"):
        zeros = b.op("ConstantOfShape", [b.op("Shape", [probs])],
                     value=numpy_helper.from_array(np.zeros(1, np.float32)))
        gates = b.op("ScatterElements", [zeros, idx, vals], axis=-1)
        if form == "dense":
            terms = [b.op("Mul", [b.op("Slice", [gates, b.const([c]), b.const([c + 1]), b.const([-1])]), y])
                     for c, y in zip(col, ys)]
    elif form == "onehot":
        oh = b.op("OneHot", [idx, b.const(experts), b.const([0.0, 1.0], np.float32)], axis=-1)
        gates = b.op("ReduceSum", [b.op("Mul", [oh, b.op("Unsqueeze", [vals, b.const([-1])])]), b.const([-2])],
                     keepdims=0)
        terms = [b.op("Mul", [b.op("Unsqueeze", [b.op("Gather", [gates, b.const(c)], axis=-1), b.const([-1])]), y])
                 for c, y in zip(col, ys)]
    elif form == "equal":
        for c, y in zip(col, ys):
            mask = b.op("Cast", [b.op("Equal", [idx, b.const(c)])], to=TensorProto.FLOAT)
            g = b.op("ReduceSum", [b.op("Mul", [vals, mask]), b.const([-1])], keepdims=1)
            terms.append(b.op("Mul", [g, y]))
    else:
        raise ValueError(form)
    if breaks == "dropped":
        terms = terms[:-1]
    if form == "stack":
        stacked = b.op("Concat", [b.op("Unsqueeze", [y, b.const([-2])]) for y in terms], axis=-2)
        return b.op("ReduceSum", [b.op("Mul", [b.op("Unsqueeze", [gates, b.const([-1])]), stacked]), b.const([-2])],
                    keepdims=0)
    if form == "onehot":
        return b.op("Sum", terms)
    moe = b.op("ConstantOfShape", [b.op("Shape", [x])], value=numpy_helper.from_array(np.zeros(1, np.float32))) \
        if form == "equal" else terms.pop(0)
    for t in terms:
        moe = b.op("Add", [moe, t])
    return moe


def _attention(b: _B, x: str, prefix: str, d: int, heads: int) -> str:
    """Multi-head self-attention (no mask) with biased q/k/v/o projections."""
    dh = d // heads

    def linear(v: str, name: str) -> str:
        return b.op("Add", [b.op("MatMul", [v, b.weight(f"{prefix}{name}.weight", (d, d), 0.3)]),
                            b.weight(f"{prefix}{name}.bias", (d,), 0.05)])

    split = b.const([0, 0, heads, dh])
    q, k, v = (b.op("Reshape", [linear(x, n), split]) for n in ("q", "k", "v"))
    q = b.op("Transpose", [q], perm=[0, 2, 1, 3])
    k = b.op("Transpose", [k], perm=[0, 2, 3, 1])
    v = b.op("Transpose", [v], perm=[0, 2, 1, 3])
    scores = b.op("Mul", [b.op("MatMul", [q, k]), b.const(1.0 / np.sqrt(dh), np.float32)])
    ctx = b.op("Transpose", [b.op("MatMul", [b.op("Softmax", [scores], axis=-1), v])], perm=[0, 2, 1, 3])
    return linear(b.op("Reshape", [ctx, b.const([0, 0, d])]), "o")


def _model(b: _B, name: str, lead: list, d: int, extra: list | None = None) -> onnx.ModelProto:
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, [*lead, d]), *(extra or [])]
    graph = helper.make_graph(b.nodes, name, [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [*lead, d])],
                              outputs, b.inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="jaxinfer-fixtures")
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def decomposed_moe(form: str = "dense", experts: int = 8, d: int = 16, inter: int = 32, k: int = 2,
                   normalize: bool = True, act: str = "gelu", seq: int | None = 4, seed: int = 0,
                   breaks: str | None = None) -> onnx.ModelProto:
    """``out = hidden + MoE(hidden)`` without the MoE op; see the module docstring for ``form``, ``act``, ``breaks``.

    ``seq=None`` makes ``hidden`` ``[batch, d]`` (2-D: the loader then fuses MatMul + Add into Gemm).
    """
    b = _B(seed)
    leak: list[str] = []
    moe = _moe_block(b, "hidden", "", form, experts, d, inter, k, normalize, act, breaks, leak)
    b.nodes.append(helper.make_node("Add", ["hidden", moe], ["out"], name="residual"))
    lead = ["batch"] if seq is None else ["batch", seq]
    extra = [helper.make_tensor_value_info(leak[0], TensorProto.FLOAT, [*lead, inter])] if breaks == "leak" else None
    return _model(b, f"moe_{form}", lead, d, extra)


def moe_decoder(layers: int = 2, experts: int = 4, d: int = 16, heads: int = 4, inter: int = 32, k: int = 2,
                seq: int = 4, form: str = "dense", seed: int = 1) -> onnx.ModelProto:
    """``layers`` x (h + attention(LN(h)); h + MoE(LN(h))) on ``hidden``[batch, seq, d] (decomposed MoE)."""
    b = _B(seed)
    h, leak = "hidden", []
    for i in range(layers):
        for part in ("attn", "moe"):
            ln = b.op("LayerNormalization", [h, b.const(np.ones(d), np.float32), b.const(np.zeros(d), np.float32)],
                      axis=-1, epsilon=1e-5)
            y = _attention(b, ln, f"l{i}.attn.", d, heads) if part == "attn" else \
                _moe_block(b, ln, f"l{i}.moe.", form, experts, d, inter, k, True, "gelu", None, leak)
            h = b.op("Add", [h, y])
    b.nodes.append(helper.make_node("Identity", [h], ["out"], name="out"))
    return _model(b, "moe_decoder", ["batch", seq], d)


def torch_moe(form: str = "mask", experts: int = 8, d: int = 16, inter: int = 32, k: int = 2, seed: int = 0,
              dynamo: bool = False, tokens_2d: bool = False) -> onnx.ModelProto:
    """A hand-written torch MoE module (``form`` "mask": an ``==`` mask loop; "dense": a scattered
    gate matrix) exported with ``torch.onnx.export``. ``tokens_2d``: input ``[tokens, d]`` (the
    TorchScript exporter then writes each nn.Linear as ``Gemm(transB=1)``), else ``[batch, 4, d]``.
    Needs torch (and onnxscript for ``dynamo``)."""
    import io

    import torch
    from torch import nn

    torch.manual_seed(seed)

    class Expert(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(d, inter), nn.GELU(), nn.Linear(inter, d)

        def forward(self, x):
            return self.fc2(self.act(self.fc1(x)))

    class MoE(nn.Module):
        def __init__(self):
            super().__init__()
            self.router = nn.Linear(d, experts, bias=False)
            self.experts = nn.ModuleList([Expert() for _ in range(experts)])

        def forward(self, x):
            probs = torch.softmax(self.router(x), dim=-1)
            vals, idx = probs.topk(k, dim=-1)
            vals = vals / vals.sum(dim=-1, keepdim=True)
            if form == "mask":
                out = torch.zeros_like(x)
                for e, expert in enumerate(self.experts):
                    out = out + (vals * (idx == e)).sum(dim=-1, keepdim=True) * expert(x)
                return x + out
            gates = torch.zeros_like(probs).scatter(-1, idx, vals)
            return x + sum(gates[..., e:e + 1] * expert(x) for e, expert in enumerate(self.experts))

    model = MoE().eval()
    x = torch.randn(8, d) if tokens_2d else torch.randn(2, 4, d)
    buf = io.BytesIO()
    if dynamo:
        prog = torch.onnx.export(model, (x,), input_names=["hidden"], output_names=["out"], dynamo=True,
                                 dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=18)
        return prog.model_proto
    torch.onnx.export(model, (x,), buf, input_names=["hidden"], output_names=["out"], dynamo=False,
                      dynamic_axes={"hidden": {0: "batch"}, "out": {0: "batch"}}, opset_version=17)
    return onnx.load_from_string(buf.getvalue())
