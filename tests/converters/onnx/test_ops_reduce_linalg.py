"""Single-node checks against onnxruntime for reductions, matrix products, normalization and losses.

They cover forms the backend suite leaves thin: attribute-era versions, zero points,
ties, per-activation batch norm, opset-18 group norm, integer inputs, ignore_index.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import jaxinfer

RNG = np.random.default_rng(0)


def _node_model(op_type: str, inputs: dict[str, np.ndarray | None], n_outputs: int, opset: int,
                initializers: dict[str, np.ndarray] | None = None, **attrs) -> onnx.ModelProto:
    """One ``op_type`` node; ``None`` inputs are omitted optional slots; initializers stay constants."""
    initializers = initializers or {}
    names = [n if v is not None else "" for n, v in inputs.items()]
    outs = [f"y{i}" for i in range(n_outputs)]
    node = helper.make_node(op_type, names + list(initializers), outs, **attrs)
    graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
                    for n, v in inputs.items() if v is not None]
    graph_outputs = [onnx.ValueInfoProto(name=o) for o in outs]  # types left to the runtimes
    graph = helper.make_graph([node], "g", graph_inputs, graph_outputs,
                              [numpy_helper.from_array(v, n) for n, v in initializers.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _check(op_type: str, inputs: dict[str, np.ndarray | None], *, opset: int, n_outputs: int = 1,
           initializers: dict[str, np.ndarray] | None = None, rtol: float = 1e-5, atol: float = 1e-6, **attrs):
    model = _node_model(op_type, inputs, n_outputs, opset, initializers, **attrs)
    feeds = {n: v for n, v in inputs.items() if v is not None}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    got = jaxinfer.load(model).run(feeds)
    assert len(got) == len(want)
    for (name, g), w in zip(got.items(), want):
        g = np.asarray(g)
        assert g.dtype == w.dtype, f"{name}: dtype {g.dtype} != {w.dtype}"
        assert g.shape == w.shape, f"{name}: shape {g.shape} != {w.shape}"
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=name)


def _run(op_type: str, inputs: dict[str, np.ndarray], *, opset: int, **attrs) -> np.ndarray:
    """jaxinfer's single output, for forms onnxruntime does not implement (checked against numpy)."""
    (out,) = jaxinfer.load(_node_model(op_type, inputs, 1, opset, **attrs)).run(inputs).values()
    return np.asarray(out)


def _f32(*shape):
    return RNG.standard_normal(shape).astype(np.float32)


# --- reductions ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op_type", ["ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
                                     "ReduceL2", "ReduceLogSumExp", "ReduceSumSquare"])
@pytest.mark.parametrize("opset", [11, 18])
def test_reduce_axes_forms(op_type, opset):
    x = _f32(2, 3, 4)
    input_form = opset >= 18 or (op_type == "ReduceSum" and opset >= 13)
    if input_form:
        _check(op_type, {"x": x}, opset=opset, initializers={"axes": np.array([0, -1], np.int64)}, keepdims=0)
    else:
        _check(op_type, {"x": x}, opset=opset, axes=[0, -1], keepdims=0)


def test_reduce_log_sum_positive():
    _check("ReduceLogSum", {"x": np.abs(_f32(3, 4)) + 0.1}, opset=13, axes=[1])


@pytest.mark.parametrize("op_type", ["ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd"])
def test_reduce_integers_keep_dtype(op_type):
    x = RNG.integers(-5, 6, (3, 4)).astype(np.int32)
    _check(op_type, {"x": x}, opset=13, **({} if op_type == "ReduceSum" else {"axes": [1]}))


def test_reduce_log_sum_exp_large_values_stay_finite():
    x = (_f32(2, 5) * 100 + 500).astype(np.float32)
    _check("ReduceLogSumExp", {"x": x}, opset=18, initializers={"axes": np.array([1], np.int64)})


def test_reduce_sum_noop_with_empty_axes_is_identity():
    x = _f32(2, 3)
    _check("ReduceSum", {"x": x}, opset=13, initializers={"axes": np.zeros((0,), np.int64)}, noop_with_empty_axes=1)


@pytest.mark.parametrize("op_type", ["ArgMax", "ArgMin"])
@pytest.mark.parametrize("select_last_index", [0, 1])
def test_arg_reduce_ties(op_type, select_last_index):
    x = np.array([[1, 3, 3, 0], [2, 2, 0, 0]], np.float32)
    _check(op_type, {"x": x}, opset=13, axis=1, keepdims=0, select_last_index=select_last_index)


@pytest.mark.parametrize("exclusive", [0, 1])
@pytest.mark.parametrize("reverse", [0, 1])
def test_cumsum_3d(exclusive, reverse):
    _check("CumSum", {"x": _f32(2, 3, 4)}, opset=14, initializers={"axis": np.array(1, np.int32)},
           exclusive=exclusive, reverse=reverse)


# --- matrix products ------------------------------------------------------------------------------


@pytest.mark.parametrize("with_c", [True, False])
def test_gemm_transposed_scaled(with_c):
    inputs = {"a": _f32(4, 3), "b": _f32(5, 4), "c": _f32(5) if with_c else None}
    _check("Gemm", inputs, opset=13, alpha=0.5, beta=2.0, transA=1, transB=1)


def test_gemm_opset6_broadcast():
    a, b, c = _f32(3, 4), _f32(4, 5), _f32(1, 5)
    got = _run("Gemm", {"a": a, "b": b, "c": c}, opset=6, broadcast=1, beta=0.25)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, a @ b + 0.25 * c, rtol=1e-5, atol=1e-6)


def test_matmul_batched_broadcast():
    _check("MatMul", {"a": _f32(2, 1, 3, 4), "b": _f32(5, 4, 6)}, opset=13)


@pytest.mark.parametrize("dtype", [np.uint8, np.int8])
def test_matmul_integer_per_row_and_column_zero_points(dtype):
    info = np.iinfo(dtype)
    a = RNG.integers(info.min, info.max, (4, 3)).astype(dtype)
    b = RNG.integers(info.min, info.max, (3, 5)).astype(dtype)
    azp = RNG.integers(info.min, info.max, (4,)).astype(dtype)
    bzp = RNG.integers(info.min, info.max, (5,)).astype(dtype)
    got = _run("MatMulInteger", {"a": a, "b": b, "azp": azp, "bzp": bzp}, opset=10)
    want = (a.astype(np.int32) - azp.astype(np.int32)[:, None]) @ (b.astype(np.int32) - bzp.astype(np.int32))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)


def test_matmul_integer_scalar_zero_point_against_ort():
    a = RNG.integers(0, 255, (2, 4, 3)).astype(np.uint8)
    b = RNG.integers(0, 255, (3, 5)).astype(np.uint8)
    _check("MatMulInteger", {"a": a, "b": b, "azp": np.array(7, np.uint8), "bzp": np.array([200], np.uint8)},
           opset=10)


@pytest.mark.parametrize("equation,shapes", [
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)]),
    ("ij,jk", [(3, 4), (4, 5)]),
    ("Ab,bc->cA", [(3, 4), (4, 2)]),
    ("...ij->...ji", [(2, 3, 4)]),
    ("ii->i", [(4, 4)]),
])
def test_einsum(equation, shapes):
    _check("Einsum", {f"x{i}": _f32(*s) for i, s in enumerate(shapes)}, opset=12, equation=equation)


def test_det_batched():
    _check("Det", {"x": _f32(2, 3, 4, 4)}, opset=11, rtol=1e-4, atol=1e-5)


# --- normalization --------------------------------------------------------------------------------


def test_batchnorm_opset9_inference():
    c = 3
    inputs = {"x": _f32(2, c, 4), "s": _f32(c), "b": _f32(c), "m": _f32(c), "v": np.abs(_f32(c)) + 0.5}
    _check("BatchNormalization", inputs, opset=9, epsilon=1e-3)


def test_batchnorm_opset15_training_outputs():
    c = 3
    inputs = {"x": _f32(4, c, 5), "s": _f32(c), "b": _f32(c), "m": _f32(c), "v": np.abs(_f32(c)) + 0.5}
    _check("BatchNormalization", inputs, opset=15, n_outputs=3, training_mode=1, momentum=0.8)


def test_layer_norm_no_bias_all_outputs():
    _check("LayerNormalization", {"x": _f32(2, 3, 4), "w": _f32(3, 4)}, opset=17, n_outputs=3, axis=1, epsilon=1e-3)


def test_group_norm_opset18_per_group_affine():
    inputs = {"x": _f32(2, 6, 3, 3), "s": _f32(3), "b": _f32(3)}
    _check("GroupNormalization", inputs, opset=18, num_groups=3, rtol=1e-4, atol=1e-5)


def test_group_norm_opset21_per_channel_affine():
    inputs = {"x": _f32(2, 6, 5), "s": _f32(6), "b": _f32(6)}
    _check("GroupNormalization", inputs, opset=21, num_groups=2, rtol=1e-4, atol=1e-5)


def test_instance_norm_3d():
    _check("InstanceNormalization", {"x": _f32(2, 3, 7), "s": _f32(3), "b": _f32(3)}, opset=6, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("p", [1, 2])
def test_lp_normalization(p):
    _check("LpNormalization", {"x": _f32(3, 4)}, opset=1, axis=0, p=p)


def test_mvn_custom_axes():
    _check("MeanVarianceNormalization", {"x": _f32(2, 3, 4)}, opset=13, axes=[1, 2], rtol=1e-4, atol=1e-5)


# --- losses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_nll_loss_weight_and_ignore_index(reduction):
    target = np.array([[0, 2, 1], [3, 1, 3]], np.int64)
    inputs = {"x": _f32(2, 4, 3), "t": target, "w": np.abs(_f32(4)) + 0.1}
    _check("NegativeLogLikelihoodLoss", inputs, opset=13, reduction=reduction, ignore_index=3)


def test_softmax_cross_entropy_log_prob():
    inputs = {"x": _f32(3, 5, 2), "t": RNG.integers(0, 5, (3, 2)).astype(np.int64)}
    _check("SoftmaxCrossEntropyLoss", inputs, opset=13, n_outputs=2, reduction="mean")


# --- dtypes ---------------------------------------------------------------------------------------


def test_reduce_mean_int_truncates_like_ort():
    x = np.array([[-3, -4, 2], [5, 6, 8]], np.int32)
    _check("ReduceMean", {"x": x}, opset=13, axes=[1])


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_layer_norm_dtypes(dtype):
    inputs = {"x": _f32(2, 5).astype(dtype), "w": _f32(5).astype(dtype), "b": _f32(5).astype(dtype)}
    _check("LayerNormalization", inputs, opset=17, n_outputs=1, rtol=2e-3, atol=2e-3)


def test_batchnorm_float64():
    c = 2
    inputs = {k: v.astype(np.float64) for k, v in
              {"x": _f32(2, c, 3, 3), "s": _f32(c), "b": _f32(c), "m": _f32(c), "v": np.abs(_f32(c)) + 0.5}.items()}
    _check("BatchNormalization", inputs, opset=15)


def test_cumsum_int64_reverse_exclusive():
    x = RNG.integers(-9, 9, (3, 4)).astype(np.int64)
    _check("CumSum", {"x": x}, opset=14, initializers={"axis": np.array([-1], np.int64)}, exclusive=1, reverse=1)
