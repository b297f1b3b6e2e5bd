"""onnxruntime contrib ops (com.microsoft), each compared with onnxruntime on a one-node graph."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from jaxinfer.converters.onnx.ops import FAMILIES
from jaxinfer.converters.onnx.ops import contrib, contrib_attention, contrib_quant
from jaxinfer.converters.onnx.reader import read_model
from jaxinfer.model import Model
from jaxinfer.registry import Registry

REGISTRY = Registry.merge(*(m.OPS for m in FAMILIES if m not in (contrib, contrib_attention, contrib_quant)),
                          contrib.OPS, contrib_attention.OPS, contrib_quant.OPS)
MS = "com.microsoft"
RNG = np.random.default_rng(0)


def randn(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


def model(op: str, inputs: dict[str, np.ndarray | None], n_out: int = 1, consts: dict[str, np.ndarray] | None = None,
          domain: str = MS, opset: int = 17, **attrs: Any) -> onnx.ModelProto:
    """One node; ``None`` inputs are omitted optional inputs; ``consts`` become initializers."""
    consts = consts or {}
    names = [*inputs, *consts]
    node = helper.make_node(op, [k if (inputs.get(k, 0) is not None) else "" for k in names],
                            [f"y{i}" for i in range(n_out)], domain=domain, **attrs)
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in inputs.items() if v is not None]
    outs = [helper.make_value_info(f"y{i}", onnx.TypeProto()) for i in range(n_out)]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    g = helper.make_graph([node], op.lower(), ins, outs, initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS, 1)])


def feeds(inputs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    return {k: v for k, v in inputs.items() if v is not None}


def ours(m: onnx.ModelProto, inputs: dict) -> list[np.ndarray]:
    mod = Model(read_model(m), REGISTRY)
    out = mod.run(feeds(inputs))
    return [np.asarray(out[s.name]) for s in mod.outputs]


def ort_run(m: onnx.ModelProto, inputs: dict, n_out: int = 1) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run([f"y{i}" for i in range(n_out)], feeds(inputs))


def check(op: str, inputs: dict, n_out: int = 1, consts: dict | None = None, rtol: float = 1e-4,
          atol: float = 1e-5, compare: tuple[int, ...] | None = None, lsb: bool = False, **attrs: Any) -> None:
    m = model(op, inputs, n_out, consts, **attrs)
    got = ours(m, inputs)
    ref = ort_run(m, inputs, n_out)
    for i in compare if compare is not None else range(n_out):
        a, b = got[i], np.asarray(ref[i])
        assert a.dtype == b.dtype, (i, a.dtype, b.dtype)
        assert a.shape == b.shape, (i, a.shape, b.shape)
        if lsb:
            diff = np.abs(a.astype(np.int64) - b.astype(np.int64))
            assert diff.max() <= 1, (i, diff.max())
        else:
            np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------ activations


@pytest.mark.parametrize("op", ["Gelu", "QuickGelu"])
def test_unary_activation(op):
    check(op, {"x": randn(2, 3, 8)})


def test_quick_gelu_alpha():
    check("QuickGelu", {"x": randn(4, 8)}, alpha=1.5)


@pytest.mark.parametrize("with_bias", [False, True])
def test_fast_gelu(with_bias):
    check("FastGelu", {"x": randn(2, 3, 8), "b": randn(8) if with_bias else None})


def test_bias_gelu():
    check("BiasGelu", {"a": randn(2, 3, 8), "b": randn(8)})


def test_bias_add():  # onnxruntime implements BiasAdd on CUDA only: compare with the spec's formula
    inputs = {"x": randn(2, 4, 8), "b": randn(8), "s": randn(2, 4, 8)}
    (got,) = ours(model("BiasAdd", inputs), inputs)
    np.testing.assert_allclose(got, inputs["x"] + inputs["b"] + inputs["s"], rtol=1e-6)


@pytest.mark.parametrize("axis,inner,bshape", [(-1, 0, (1, 1, 4, 6)), (2, 0, (1, 3, 4, 6)), (3, 1, (2, 1, 1, 6))])
def test_bias_softmax(axis, inner, bshape):  # CUDA-only in onnxruntime: compare with the formula
    inputs = {"x": randn(2, 3, 4, 6), "b": randn(*bshape)}
    (got,) = ours(model("BiasSoftmax", inputs, axis=axis, is_inner_broadcast=inner), inputs)
    z = inputs["x"] + inputs["b"]
    ax = axis % 4
    flat = z.reshape(z.shape[:ax] + (-1,)).astype(np.float64)
    e = np.exp(flat - flat.max(-1, keepdims=True))
    np.testing.assert_allclose(got, (e / e.sum(-1, keepdims=True)).reshape(z.shape), rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- matmuls


@pytest.mark.parametrize("attrs,ashape,bshape", [
    ({}, (2, 3, 4), (4, 5)),
    ({"transA": 1, "alpha": 0.5}, (2, 4, 3), (4, 5)),
    ({"transB": 1}, (2, 3, 4), (2, 5, 4)),
    ({"transBatchA": 1}, (3, 2, 4), (2, 4, 5)),
    ({"transBatchB": 1, "transB": 1}, (2, 3, 4), (5, 2, 4)),
    ({"transBatchA": 1, "transA": 1}, (4, 2, 3), (2, 4, 5)),
])
def test_fused_matmul(attrs, ashape, bshape):
    check("FusedMatMul", {"a": randn(*ashape), "b": randn(*bshape)}, **attrs)


# -------------------------------------------------------------- normalizations


@pytest.mark.parametrize("beta,bias", [(True, True), (False, False), (True, False)])
def test_skip_layer_norm(beta, bias):
    inputs = {"x": randn(2, 3, 8), "s": randn(2, 3, 8), "g": randn(8), "be": randn(8) if beta else None,
              "bi": randn(8) if bias else None}
    check("SkipLayerNormalization", inputs, n_out=4, compare=(0, 3), epsilon=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_skip_simplified_layer_norm(bias):
    inputs = {"x": randn(2, 3, 8), "s": randn(2, 3, 8), "g": randn(8), "bi": randn(8) if bias else None}
    check("SkipSimplifiedLayerNormalization", inputs, n_out=4, compare=(0, 3), epsilon=1e-5)


def test_simplified_layer_norm_onnx_domain():
    check("SimplifiedLayerNormalization", {"x": randn(2, 3, 8), "g": randn(8)}, domain="", epsilon=1e-5)


def test_layer_norm_contrib_onnx_domain():
    check("LayerNormalization", {"x": randn(2, 3, 8), "g": randn(8), "b": randn(8)}, domain="", opset=13,
          epsilon=1e-5)


@pytest.mark.parametrize("with_seg,with_mask,with_pos", [(True, True, False), (False, False, False),
                                                          (True, False, True)])
def test_embed_layer_norm(with_seg, with_mask, with_pos):
    b, s, h = 2, 5, 8
    ids = RNG.integers(0, 20, (b, s)).astype(np.int32)
    inputs = {"ids": ids, "seg": RNG.integers(0, 2, (b, s)).astype(np.int32) if with_seg else None,
              "we": randn(20, h), "pe": randn(16, h), "se": randn(2, h) if with_seg else None, "g": randn(h),
              "be": randn(h), "mask": (np.arange(s)[None] < np.array([[3], [5]])).astype(np.int32) if with_mask else None,
              "pos": np.array([[4, 3, 2, 1, 0]] * b, np.int32) if with_pos else None}
    check("EmbedLayerNormalization", inputs, n_out=3, compare=(0, 1, 2) if with_mask else (0, 2),
          epsilon=1e-5)


# ---------------------------------------------------------------------- rotary


@pytest.mark.parametrize("layout,interleaved,pos_kind", [(3, 0, "full"), (3, 1, "offset"), (4, 0, "offset"),
                                                         (4, 1, "full")])
def test_rotary_embedding(layout, interleaved, pos_kind):
    b, s, n, d = 2, 4, 2, 8
    x = randn(b, s, n * d) if layout == 3 else randn(b, n, s, d)
    pos = np.array([2], np.int64) if pos_kind == "offset" else RNG.integers(0, 10, (b, s)).astype(np.int64)
    check("RotaryEmbedding", {"x": x, "p": pos, "c": randn(16, d // 2), "s": randn(16, d // 2)},
          interleaved=interleaved, num_heads=n if layout == 3 else 0)


# -------------------------------------------------------------------- attention


@pytest.mark.parametrize("mask_kind,uni,past", [(None, 0, False), ("1d", 0, False), ("2d", 0, False),
                                                ("3d", 1, False), (None, 1, True), ("2d", 0, True)])
def test_attention(mask_kind, uni, past):
    b, s, h, n = 2, 3, 8, 2
    p = 2 if past else 0
    t = s + p
    masks = {None: None, "1d": np.array([t, t - 1], np.int32),
             "2d": (RNG.random((b, t)) > 0.3).astype(np.int32),
             "3d": (RNG.random((b, s, t)) > 0.3).astype(np.int32)}
    mk = masks[mask_kind]
    if mk is not None and mk.ndim > 1:
        mk[..., 0] = 1
    inputs = {"x": randn(b, s, h), "w": randn(h, 3 * h), "bias": randn(3 * h), "mask": mk,
              "past": randn(2, b, n, p, h // n) if past else None}
    check("Attention", inputs, n_out=2 if past else 1, num_heads=n, unidirectional=uni)


def test_attention_attention_bias_and_qkv_sizes():
    b, s, n = 2, 3, 2
    inputs = {"x": randn(b, s, 6), "w": randn(6, 4 + 4 + 8), "bias": randn(16), "mask": None, "past": None,
              "ab": randn(1, n, s, s)}
    check("Attention", inputs, num_heads=n, qkv_hidden_sizes=[4, 4, 8])


@pytest.mark.parametrize("kind", ["plain", "past", "packed_qkv", "packed_kv", "cross_bnsh", "mask"])
def test_multi_head_attention(kind):
    b, s, L, n, d = 2, 3, 4, 2, 4
    h = n * d
    inputs: dict[str, Any] = {"q": randn(b, s, h), "k": randn(b, L, h), "v": randn(b, L, h), "bias": randn(3 * h),
                              "kpm": None, "ab": None, "pk": None, "pv": None}
    n_out = 1
    if kind == "past":
        inputs.update(pk=randn(b, n, 2, d), pv=randn(b, n, 2, d), k=randn(b, s, h), v=randn(b, s, h))
        n_out = 3
    elif kind in ("packed_qkv", "packed_kv"):  # CPU onnxruntime lacks packed forms: compare with unpacked
        if kind == "packed_qkv":
            packed, L = randn(b, s, n, 3, d), s
            unpacked = dict(q=packed[:, :, :, 0].reshape(b, s, h), k=packed[:, :, :, 1].reshape(b, s, h),
                            v=packed[:, :, :, 2].reshape(b, s, h))
            inputs.update(q=packed, k=None, v=None, bias=None)
        else:
            packed = randn(b, L, n, 2, d)
            unpacked = dict(k=packed[:, :, :, 0].reshape(b, L, h), v=packed[:, :, :, 1].reshape(b, L, h))
            inputs.update(k=packed, v=None, bias=None)
        got = ours(model("MultiHeadAttention", inputs, num_heads=n), inputs)
        ref_in = {**inputs, **unpacked}
        ref = ort_run(model("MultiHeadAttention", ref_in, num_heads=n), ref_in)
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-5)
        return
    elif kind == "cross_bnsh":
        inputs.update(k=randn(b, n, L, d), v=randn(b, n, L, d), bias=None)
    elif kind == "mask":
        inputs.update(kpm=np.array([[1, 1, 1, 0], [1, 1, 0, 0]], np.int32), ab=randn(1, n, s, L))
    check("MultiHeadAttention", inputs, n_out=n_out, num_heads=n)


def _gqa_inputs(b, s, n, kvn, d, past_len, seqlens, total, rotary=False):
    return {"q": randn(b, s, n * d), "k": randn(b, s, kvn * d), "v": randn(b, s, kvn * d),
            "pk": randn(b, kvn, past_len, d), "pv": randn(b, kvn, past_len, d),
            "sk": np.asarray(seqlens, np.int32), "tot": np.array(total, np.int32),
            "cos": np.cos(randn(32, d // 2)) if rotary else None, "sin": np.sin(randn(32, d // 2)) if rotary else None}


@pytest.mark.parametrize("case", ["prompt", "decode", "decode_ragged", "rotary", "window", "softcap", "shared"])
def test_group_query_attention(case):
    b, n, kvn, d = 2, 4, 2, 8
    attrs: dict[str, Any] = {}
    if case == "prompt":
        inputs = _gqa_inputs(b, 5, n, kvn, d, 0, [4, 4], 5)
    elif case == "decode":
        inputs = _gqa_inputs(b, 1, n, kvn, d, 6, [6, 6], 7)
    elif case == "decode_ragged":
        inputs = _gqa_inputs(b, 1, n, kvn, d, 6, [6, 3], 7)
    elif case == "rotary":
        inputs = _gqa_inputs(b, 1, n, kvn, 16, 6, [6, 4], 7, rotary=True)
        attrs = {"do_rotary": 1}
    elif case == "window":
        inputs = _gqa_inputs(b, 1, n, kvn, d, 6, [6, 6], 7)
        attrs = {"local_window_size": 3}
    elif case == "softcap":
        inputs = _gqa_inputs(b, 5, n, kvn, d, 0, [4, 4], 5)
        attrs = {"softcap": 2.0}
    else:  # shared buffer: past holds max length 8
        inputs = _gqa_inputs(b, 1, n, kvn, d, 8, [5, 5], 6)
    m = model("GroupQueryAttention", inputs, 3, num_heads=n, kv_num_heads=kvn, **attrs)
    got, ref = ours(m, inputs), ort_run(m, inputs, 3)
    sk = inputs["sk"]
    for bi in range(b):
        total = int(sk[bi]) + 1
        np.testing.assert_allclose(got[0][bi], ref[0][bi], rtol=1e-4, atol=1e-5)
        for i in (1, 2):
            assert got[i].shape == ref[i].shape
            np.testing.assert_allclose(got[i][bi, :, :total], ref[i][bi, :, :total], rtol=1e-5, atol=1e-6)


def test_group_query_attention_packed_qkv():
    b, s, n, kvn, d = 1, 4, 4, 2, 8
    inputs = _gqa_inputs(b, s, n, kvn, d, 0, [3], 4)
    inputs.update(q=randn(b, s, (n + 2 * kvn) * d), k=None, v=None)
    check("GroupQueryAttention", inputs, n_out=3, num_heads=n, kv_num_heads=kvn)


# ---------------------------------------------------------------- MatMulNBits


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """(..., n) values < 2**bits -> (..., n*bits/8) bytes, lowest bits first."""
    per = 8 // bits
    q = q.reshape(q.shape[:-1] + (-1, per)).astype(np.uint16)
    out = np.zeros(q.shape[:-1], np.uint16)
    for i in range(per):
        out |= q[..., i] << (i * bits)
    return out.astype(np.uint8)


@pytest.mark.parametrize("bits,zp_kind,K", [(4, "none", 64), (4, "packed", 48), (4, "float", 64), (8, "packed", 32),
                                            (2, "packed", 64)])
def test_matmul_nbits(bits, zp_kind, K):
    N, bs = 6, 16
    kb = -(-K // bs)
    q = RNG.integers(0, 1 << bits, (N, kb, bs))
    consts = {"B": _pack(q, bits), "scales": (RNG.random((N, kb)) * 0.1 + 0.01).astype(np.float32)}
    if zp_kind == "packed":
        zq = RNG.integers(0, 1 << bits, (N, kb))
        pad = (-kb) % (8 // bits)
        consts["zp"] = _pack(np.pad(zq, ((0, 0), (0, pad))), bits)
    elif zp_kind == "float":
        consts["zp"] = RNG.random((N, kb)).astype(np.float32) * (1 << bits)
    consts["bias"] = randn(N)
    inputs = {"A": randn(2, 3, K)}
    m = model("MatMulNBits", inputs, consts=consts, K=K, N=N, block_size=bs, bits=bits)
    if zp_kind == "none":  # keep bias at slot 5: insert empty zero_points/g_idx names
        node = m.graph.node[0]
        del node.input[:]
        node.input.extend(["A", "B", "scales", "", "", "bias"])
    else:
        node = m.graph.node[0]
        del node.input[:]
        node.input.extend(["A", "B", "scales", "zp", "", "bias"])
    got, ref = ours(m, inputs), ort_run(m, inputs)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("act,k,norm,fc3", [("relu", 1, 0, False), ("gelu", 2, 1, False), ("silu", 2, 0, False),
                                            ("identity", 2, 0, False)])
def test_moe(act, k, norm, fc3):
    E, H, I, T = 4, 8, 16, 6
    inputs = {"x": randn(T, H), "r": randn(T, E)}
    consts = {"w1": randn(E, I, H) * 0.3, "b1": randn(E, I), "w2": randn(E, H, I) * 0.3, "b2": randn(E, H)}
    if fc3:
        consts.update(w3=randn(E, I, H) * 0.3, b3=randn(E, I))
    check("MoE", inputs, consts=consts, k=k, activation_type=act, normalize_routing_weights=norm, rtol=1e-4,
          atol=1e-4)


def test_moe_swiglu_interleaved():
    E, H, I, T = 3, 8, 8, 5
    inputs = {"x": randn(T, H), "r": randn(T, E)}
    consts = {"w1": randn(E, 2 * I, H) * 0.3, "b1": randn(E, 2 * I), "w2": randn(E, H, I) * 0.3, "b2": randn(E, H)}
    check("MoE", inputs, consts=consts, k=2, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.702,
          activation_beta=1.0, swiglu_limit=7.0, normalize_routing_weights=1, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------- quantized ops


def q8(*shape: int, dtype: Any = np.uint8) -> np.ndarray:
    info = np.iinfo(dtype)
    return RNG.integers(info.min, info.max + 1, shape).astype(dtype)


def w7(*shape: int) -> np.ndarray:
    """int8 weights in 7 bits: onnxruntime's AVX2 (non-VNNI) u8s8 kernels saturate pair sums of
    full-range int8 weights (its reduce_range advice), which would make it an inexact oracle."""
    return RNG.integers(-64, 64, shape).astype(np.int8)


def f(v: float) -> np.ndarray:
    return np.array(v, np.float32)


@pytest.mark.parametrize("bdt,per_col", [(np.int8, False), (np.uint8, True)])
def test_matmul_integer_to_float(bdt, per_col):
    n = 5
    inputs = {"a": q8(2, 3, 4), "b": w7(4, n) if bdt == np.int8 else q8(4, n, dtype=bdt), "as": f(0.02),
              "bs": (RNG.random(n) * 0.05 + 0.01).astype(np.float32) if per_col else f(0.03),
              "az": np.array(128, np.uint8), "bz": (q8(n, dtype=bdt) if per_col else np.array(3, bdt)),
              "bias": randn(n)}
    check("MatMulIntegerToFloat", inputs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_col", [False, True])
def test_dynamic_quantize_matmul(per_col):
    n = 6
    inputs = {"a": randn(3, 8), "b": w7(8, n),
              "bs": (RNG.random(n) * 0.05 + 0.01).astype(np.float32) if per_col else f(0.03),
              "bz": np.zeros(n if per_col else (), np.int8), "bias": randn(n)}
    check("DynamicQuantizeMatMul", inputs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("quant_out", [False, True])
def test_qgemm(quant_out):
    inputs = {"a": q8(3, 8), "as": f(0.02), "az": np.array(120, np.uint8), "b": w7(5, 8),
              "bs": f(0.01), "bz": np.array(0, np.int8), "c": RNG.integers(-500, 500, 5).astype(np.int32),
              "ys": f(0.05) if quant_out else None, "yz": np.array(100, np.uint8) if quant_out else None}
    check("QGemm", inputs, transB=1, alpha=1.0, lsb=quant_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["QLinearAdd", "QLinearMul"])
@pytest.mark.parametrize("dt", [np.uint8, np.int8])
def test_qlinear_binary(op, dt):
    inputs = {"a": q8(2, 3, 4, dtype=dt), "as": f(0.05), "az": np.array(3, dt), "b": q8(4, dtype=dt),
              "bs": f(0.03), "bz": np.array(-2 if dt == np.int8 else 130, dt), "cs": f(0.08 if op == "QLinearAdd" else 0.5),
              "cz": np.array(5, dt)}
    check(op, inputs, lsb=True)


@pytest.mark.parametrize("dt", [np.uint8, np.int8])
def test_qlinear_unary(dt):
    x = np.arange(np.iinfo(dt).min, np.iinfo(dt).max + 1).astype(dt).reshape(16, 16)
    check("QLinearSigmoid", {"x": x, "xs": f(0.05), "xz": np.array(10, dt), "ys": f(1 / 256), "yz": np.array(0, dt)},
          lsb=True)
    check("QLinearLeakyRelu", {"x": x, "xs": f(0.05), "xz": np.array(10, dt), "ys": f(0.04), "yz": np.array(3, dt)},
          lsb=True, alpha=0.1)


def test_qlinear_concat():
    inputs = {"ys": f(0.05), "yz": np.array(128, np.uint8), "a": q8(2, 3), "as": f(0.02), "az": np.array(100, np.uint8),
              "b": q8(2, 4), "bs": f(0.05), "bz": np.array(128, np.uint8)}
    check("QLinearConcat", inputs, lsb=True, axis=1)


@pytest.mark.parametrize("dt", [np.uint8, np.int8])
def test_qlinear_softmax(dt):
    inputs = {"x": q8(3, 10, dtype=dt), "xs": f(0.1), "xz": np.array(0, dt), "ys": f(1 / 256),
              "yz": np.array(0 if dt == np.uint8 else -128, dt)}
    m = model("QLinearSoftmax", inputs, axis=-1)
    m.graph.node[0].attribute.append(helper.make_attribute("opset", 13))  # clashes with model()'s opset
    got, ref = ours(m, inputs)[0], ort_run(m, inputs)[0]
    assert got.dtype == ref.dtype and got.shape == ref.shape
    assert np.abs(got.astype(np.int64) - ref.astype(np.int64)).max() <= 1


@pytest.mark.parametrize("channels_last", [0, 1])
def test_qlinear_pools(channels_last):
    x = q8(1, 4, 6, 6)
    if channels_last:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    qp = {"xs": f(0.1), "xz": np.array(120, np.uint8), "ys": f(0.07), "yz": np.array(125, np.uint8)}
    check("QLinearGlobalAveragePool", {"x": x, **qp}, lsb=True, channels_last=channels_last)
    check("QLinearAveragePool", {"x": x, **qp}, lsb=True, channels_last=channels_last, kernel_shape=[3, 3],
          strides=[2, 2], pads=[1, 1, 1, 1])
