"""Focused checks of the attention-family and quantization ops where the backend suite is thin.

Each graph is one node built with ``onnx.helper``; results are compared with
onnxruntime where it implements the op at that opset, else with a small numpy
statement of the spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from jaxinfer.converters.onnx import load_onnx


def _model(op: str, inputs: dict[str, np.ndarray | None], n_out: int = 1, opset: int = 21,
           consts: dict[str, np.ndarray] | None = None, **attrs: Any) -> onnx.ModelProto:
    """One node; a ``None`` input is an omitted optional input; ``consts`` become initializers."""
    consts = consts or {}
    outs = [f"y{i}" for i in range(n_out)]
    names = [*inputs, *consts]
    node = helper.make_node(op, [k if inputs.get(k, 0) is not None else "" for k in names], outs, **attrs)
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in inputs.items() if v is not None]
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
    inits = [numpy_helper.from_array(v, k) for k, v in consts.items()]
    graph = helper.make_graph([node], op.lower(), ins, outputs, initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _feeds(inputs: dict[str, np.ndarray | None]) -> dict[str, np.ndarray]:
    return {k: v for k, v in inputs.items() if v is not None}


def _run(model: onnx.ModelProto, inputs: dict[str, np.ndarray | None]) -> list[np.ndarray]:
    m = load_onnx(model)
    out = m.run(_feeds(inputs))
    return [np.asarray(out[s.name]) for s in m.outputs]


def _ort(model: onnx.ModelProto, inputs: dict[str, np.ndarray | None], n_out: int = 1) -> list[np.ndarray]:
    model = onnx.shape_inference.infer_shapes(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([f"y{i}" for i in range(n_out)], _feeds(inputs))


def _same(ours: Sequence[np.ndarray], ref: Sequence[np.ndarray], rtol: float = 1e-5, atol: float = 1e-6) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        b = np.asarray(b)
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        assert a.shape == b.shape, (a.shape, b.shape)
        np.testing.assert_allclose(a.astype(np.float64), b.astype(np.float64), rtol=rtol, atol=atol)


RNG = np.random.default_rng(0)


def _randn(*shape: int, dtype: Any = np.float32) -> np.ndarray:
    return RNG.standard_normal(shape).astype(dtype)


# ---------------------------------------------------------------- quantization


def test_quantize_rounds_half_to_even_and_saturates():
    x = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 1000.0, -1000.0], np.float32)
    inputs = {"x": x, "s": np.array(1.0, np.float32), "zp": np.array(0, np.int8)}
    m = _model("QuantizeLinear", inputs)
    (y,) = _run(m, inputs)
    np.testing.assert_array_equal(y, np.array([-2, -2, 0, 0, 2, 2, 4, 127, -128], np.int8))
    _same([y], _ort(m, inputs))


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_quantize_per_axis_uint8(axis: int):
    x = _randn(3, 4) * 20
    n = x.shape[axis]
    inputs = {"x": x, "s": np.linspace(0.1, 0.5, n).astype(np.float32),
              "zp": np.arange(n, dtype=np.uint8) * 40}
    m = _model("QuantizeLinear", inputs, axis=axis)
    _same(_run(m, inputs), _ort(m, inputs), atol=0)


def test_quantize_blocked_int4():
    """(onnxruntime cannot hand int4 outputs to numpy; the spec's formula is the reference.)"""
    x = _randn(2, 8) * 3
    inputs = {"x": x, "s": np.abs(_randn(2, 4)) + 0.1}
    zp = np.array([[1, -1, 0, 2], [0, 0, -3, 1]], ml_dtypes.int4)
    (y,) = _run(_model("QuantizeLinear", inputs, consts={"zp": zp}, axis=1, block_size=2), inputs)
    assert y.dtype == ml_dtypes.int4
    ref = np.rint(x / np.repeat(inputs["s"], 2, axis=1)) + np.repeat(zp.astype(np.int32), 2, axis=1)
    np.testing.assert_array_equal(y.astype(np.int32), np.clip(ref, -8, 7))


def test_quantize_blocked_remainder_block():
    """A last, shorter block (dim 5, block 2) uses the last scale."""
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    s = np.array([[1.0, 2.0, 4.0], [0.5, 1.0, 2.0]], np.float32)
    inputs = {"x": x, "s": s}
    (y,) = _run(_model("QuantizeLinear", inputs, axis=1, block_size=2), inputs)
    full = np.repeat(s, 2, axis=1)[:, :5]
    np.testing.assert_array_equal(y, np.clip(np.rint(x / full), 0, 255).astype(np.uint8))


def test_quantize_output_dtype_float8_saturates():
    x = np.array([1000.0, -1000.0, 0.3, np.nan], np.float32)
    inputs = {"x": x, "s": np.array(1.0, np.float32)}
    (y,) = _run(_model("QuantizeLinear", inputs, output_dtype=onnx.TensorProto.FLOAT8E4M3FN), inputs)
    assert y.dtype == ml_dtypes.float8_e4m3fn
    assert y[0] == 448 and y[1] == -448 and np.isnan(y[3].astype(np.float32))
    (y,) = _run(_model("QuantizeLinear", inputs, output_dtype=onnx.TensorProto.FLOAT8E4M3FN, saturate=0), inputs)
    assert np.isnan(y[0].astype(np.float32))


def test_dequantize_blocked_int4_matches_ort():
    consts = {"x": RNG.integers(-8, 8, (4, 6)).astype(ml_dtypes.int4), "s": np.abs(_randn(2, 6)) + 0.1,
              "zp": RNG.integers(-2, 2, (2, 6)).astype(ml_dtypes.int4)}
    inputs: dict[str, np.ndarray | None] = {}
    m = _model("DequantizeLinear", inputs, consts=consts, axis=0, block_size=2)
    _same(_run(m, inputs), _ort(m, inputs))


def test_dequantize_int32_per_axis_and_output_dtype():
    x = RNG.integers(-1000, 1000, (2, 3, 4)).astype(np.int32)
    inputs = {"x": x, "s": np.array([0.5, 0.25, 2.0], np.float32)}
    m = _model("DequantizeLinear", inputs, axis=1)
    _same(_run(m, inputs), _ort(m, inputs))
    (y,) = _run(_model("DequantizeLinear", inputs, opset=23, axis=1, output_dtype=onnx.TensorProto.FLOAT16), inputs)
    assert y.dtype == np.float16
    np.testing.assert_allclose(y, (x * inputs["s"].reshape(1, 3, 1)).astype(np.float16))


def test_dynamic_quantize_linear_matches_ort():
    inputs = {"x": _randn(3, 7) * 4 + 1}
    m = _model("DynamicQuantizeLinear", inputs, n_out=3, opset=11)
    _same(_run(m, inputs), _ort(m, inputs, n_out=3), atol=0)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_qlinear_matmul_batched_matches_ort(dtype: Any):
    info = np.iinfo(dtype)
    inputs = {
        "a": RNG.integers(info.min, info.max, (2, 3, 5)).astype(dtype), "a_s": np.array(0.05, np.float32),
        "a_zp": np.array(3, dtype), "b": RNG.integers(info.min, info.max, (5, 4)).astype(dtype),
        "b_s": np.array(0.02, np.float32), "b_zp": np.array(-2 if dtype == np.int8 else 7, dtype),
        "y_s": np.array(0.9, np.float32), "y_zp": np.array(5, dtype),
    }
    m = _model("QLinearMatMul", inputs, opset=21)
    _same(_run(m, inputs), _ort(m, inputs), atol=0)


def test_qlinear_conv_per_channel_bias_pads_matches_ort():
    inputs = {
        "x": RNG.integers(0, 255, (1, 4, 7, 6)).astype(np.uint8), "x_s": np.array(0.02, np.float32),
        "x_zp": np.array(120, np.uint8), "w": RNG.integers(-60, 60, (6, 2, 3, 3)).astype(np.int8),
        "w_s": (np.abs(_randn(6)) * 0.01 + 0.005).astype(np.float32), "w_zp": np.zeros(6, np.int8),
        "y_s": np.array(0.05, np.float32), "y_zp": np.array(100, np.uint8),
        "B": RNG.integers(-500, 500, (6,)).astype(np.int32),
    }
    m = _model("QLinearConv", inputs, opset=10, group=2, pads=[1, 0, 1, 2], strides=[2, 1])
    _same(_run(m, inputs), _ort(m, inputs), atol=1)  # ORT's fixed-point requantize may differ by one step


# ---------------------------------------------------------------- attention family


def _np_attention(q, k, v, mask=None, past_k=None, past_v=None, causal=False, scale=None, softcap=0.0):
    """The spec's 4-D attention in float64 numpy (bool mask, causal offset by the past length)."""
    if past_k is not None:
        k, v = np.concatenate([past_k, k], 2), np.concatenate([past_v, v], 2)
    rep = q.shape[1] // k.shape[1]
    kr, vr = np.repeat(k, rep, 1), np.repeat(v, rep, 1)
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("bhqd,bhkd->bhqk", q.astype(np.float64), kr) * scale
    if softcap:
        s = softcap * np.tanh(s / softcap)
    allowed = np.ones(s.shape[-2:], bool)
    if causal:
        off = 0 if past_k is None else past_k.shape[2]
        allowed = np.arange(s.shape[-1])[None, :] <= np.arange(s.shape[-2])[:, None] + off
    if mask is not None:
        allowed = allowed & mask
    s = np.where(allowed, s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bhkd->bhqd", p, vr), k, v


def test_attention_4d_bool_mask_causal_past_gqa():
    q, k, v = _randn(2, 4, 3, 8), _randn(2, 2, 3, 8), _randn(2, 2, 3, 5)
    pk, pv = _randn(2, 2, 4, 8), _randn(2, 2, 4, 5)
    mask = RNG.random((3, 7)) > 0.3
    mask[:, 0] = True
    inputs = {"Q": q, "K": k, "V": v, "attn_mask": mask, "past_key": pk, "past_value": pv}
    y, pk2, pv2 = _run(_model("Attention", inputs, n_out=3, opset=23, is_causal=1), inputs)
    ry, rk, rv = _np_attention(q, k, v, mask, pk, pv, causal=True)
    np.testing.assert_allclose(y, ry, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pk2, rk)
    np.testing.assert_array_equal(pv2, rv)


def test_attention_3d_softcap_scale_matches_numpy():
    q, k, v = _randn(1, 5, 12), _randn(1, 6, 12), _randn(1, 6, 6)
    inputs = {"Q": q, "K": k, "V": v}
    (y,) = _run(_model("Attention", inputs, opset=23, q_num_heads=3, kv_num_heads=3, scale=0.3, softcap=2.0), inputs)
    split = lambda a: a.reshape(1, a.shape[1], 3, -1).transpose(0, 2, 1, 3)  # noqa: E731
    ry, _, _ = _np_attention(split(q), split(k), split(v), scale=0.3, softcap=2.0)
    np.testing.assert_allclose(y, ry.transpose(0, 2, 1, 3).reshape(1, 5, 6), rtol=1e-5, atol=1e-6)


def test_attention_fully_masked_row_is_zero_and_mode3():
    q, k, v = _randn(1, 1, 2, 4), _randn(1, 1, 3, 4), _randn(1, 1, 3, 4)
    mask = np.array([[True, False, True], [False, False, False]])
    inputs = {"Q": q, "K": k, "V": v, "attn_mask": mask}
    y, _, _, probs = _run(_model("Attention", inputs, n_out=4, opset=23, qk_matmul_output_mode=3), inputs)
    assert np.all(y[0, 0, 1] == 0) and np.all(probs[0, 0, 1] == 0)
    np.testing.assert_allclose(probs[0, 0, 0].sum(), 1.0, rtol=1e-6)
    assert probs[0, 0, 0, 1] == 0


def test_attention_nonpad_kv_seqlen_runtime_values():
    """nonpad_kv_seqlen is a runtime input: one compiled function serves every value."""
    q, k, v = _randn(2, 2, 1, 4), _randn(2, 2, 5, 4), _randn(2, 2, 5, 4)
    lens = np.array([3, 5], np.int64)
    inputs = {"Q": q, "K": k, "V": v, "attn_mask": None, "past_key": None, "past_value": None, "nonpad_kv_seqlen": lens}
    m = load_onnx(_model("Attention", inputs, opset=24, is_causal=1))
    for n in ([3, 5], [1, 2]):
        feeds = {"Q": q, "K": k, "V": v, "nonpad_kv_seqlen": np.array(n, np.int64)}
        y = np.asarray(next(iter(m.run(feeds).values())))
        for b in range(2):
            ry, _, _ = _np_attention(q[b:b + 1], k[b:b + 1, :, :n[b]], v[b:b + 1, :, :n[b]])
            np.testing.assert_allclose(y[b:b + 1], ry, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("rot_dim", [0, 4])
def test_rotary_embedding_3d_position_ids_matches_ort(interleaved: int, rot_dim: int):
    b, s, heads, head = 2, 3, 2, 8
    half = (rot_dim or head) // 2
    inputs = {"X": _randn(b, s, heads * head), "cos": _randn(10, half), "sin": _randn(10, half),
              "pos": RNG.integers(0, 10, (b, s)).astype(np.int64)}
    m = _model("RotaryEmbedding", inputs, opset=23, interleaved=interleaved, num_heads=heads,
               rotary_embedding_dim=rot_dim)
    _same(_run(m, inputs), _ort(m, inputs))


def test_swiglu_alpha():
    a, bb = _randn(3, 4), _randn(3, 4)
    inputs = {"A": a, "B": bb}
    (y,) = _run(_model("SwiGLU", inputs, opset=28, alpha=1.702), inputs)
    np.testing.assert_allclose(y, a / (1 + np.exp(-1.702 * a)) * bb, rtol=1e-5, atol=1e-6)


def test_linear_attention_gqa_gated_delta_chunks_match_one_pass():
    """Running T steps at once equals two calls threading present_state -> past_state."""
    b, t, hq, hkv, dk, dv = 1, 6, 4, 2, 3, 2
    q, k, v = _randn(b, t, hq * dk), _randn(b, t, hkv * dk), _randn(b, t, hkv * dv)
    g = -np.abs(_randn(b, t, hkv))
    beta = 1 / (1 + np.exp(-_randn(b, t, hkv)))
    kw = dict(opset=27, q_num_heads=hq, kv_num_heads=hkv)
    full = {"q": q, "k": k, "v": v, "s": None, "g": g, "beta": beta}
    y, state = _run(_model("LinearAttention", full, n_out=2, **kw), full)
    first = {"q": q[:, :4], "k": k[:, :4], "v": v[:, :4], "s": None, "g": g[:, :4], "beta": beta[:, :4]}
    y1, s1 = _run(_model("LinearAttention", first, n_out=2, **kw), first)
    rest = {"q": q[:, 4:], "k": k[:, 4:], "v": v[:, 4:], "s": s1, "g": g[:, 4:], "beta": beta[:, 4:]}
    y2, s2 = _run(_model("LinearAttention", rest, n_out=2, **kw), rest)
    np.testing.assert_allclose(np.concatenate([y1, y2], 1), y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s2, state, rtol=1e-5, atol=1e-6)
