"""Focused checks of the string, training and ai.onnx.ml ops where the backend suite is thin.

Each graph is one node built with ``onnx.helper``; results are compared with
onnxruntime where it implements the op, else with values worked out from the spec.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from jaxinfer.converters.onnx import load_onnx

from .oracle import run_ort as _ort
from .oracle import run_ours as _run

F = TensorProto.FLOAT
ML = "ai.onnx.ml"
TRAINING = "ai.onnx.preview.training"


def _model(op: str, inputs: dict[str, np.ndarray], n_out: int = 1, domain: str = "",
           domain_opset: int = 1, **attrs: Any) -> onnx.ModelProto:
    outs = [f"y{i}" for i in range(n_out)]
    node = helper.make_node(op, list(inputs), outs, domain=domain, **attrs)
    ins = []
    for k, v in inputs.items():
        elem = TensorProto.STRING if v.dtype == object else helper.np_dtype_to_tensor_dtype(v.dtype)
        ins.append(helper.make_tensor_value_info(k, elem, v.shape))
    outputs = [helper.make_value_info(o, onnx.TypeProto()) for o in outs]
    graph = helper.make_graph([node], op.lower(), ins, outputs)
    opsets = [helper.make_opsetid("", 21)]
    if domain:
        opsets.append(helper.make_opsetid(domain, domain_opset))
    return helper.make_model(graph, opset_imports=opsets)


def _same(ours: list[np.ndarray], ref: list[np.ndarray], rtol: float = 1e-5) -> None:
    assert len(ours) == len(ref)
    for a, b in zip(ours, ref):
        b = np.asarray(b)
        assert a.dtype == b.dtype, (a.dtype, b.dtype)
        assert a.shape == b.shape, (a.shape, b.shape)
        if a.dtype == object:
            assert a.tolist() == b.tolist()
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6)


def _check(op: str, inputs: dict[str, np.ndarray], n_out: int = 1, **kw: Any) -> None:
    model = _model(op, inputs, n_out, **kw)
    _same(_run(model, inputs), _ort(model, inputs, n_out))


# ------------------------------------------------------------------ strings


def _s(*items: Any) -> np.ndarray:
    return np.array(items, dtype=object)


@pytest.mark.parametrize("delimiter,maxsplit", [(None, None), (None, 1), (",", None), (",", 1), ("ab", 2)])
def test_string_split(delimiter: str | None, maxsplit: int | None) -> None:
    # "" with a delimiter: onnx's reference (Python's str.split) gives [""], onnxruntime gives []; we
    # follow the reference, so the comparison with onnxruntime leaves that case out.
    x = _s(["  a b  c ", "x,,y,"], [" " if delimiter else "", "abcabab"])
    attrs = {k: v for k, v in (("delimiter", delimiter), ("maxsplit", maxsplit)) if v is not None}
    _check("StringSplit", {"x": x}, 2, **attrs)


@pytest.mark.parametrize("action,sensitive", [("LOWER", 0), ("UPPER", 1), ("NONE", 0)])
def test_string_normalizer(action: str, sensitive: int) -> None:
    x = _s(["Monday", "TUESDAY", "monday", "Friday"])
    # onnxruntime's default locale (en_US.UTF-8) may be missing on the host; ASCII cases agree in C.UTF-8.
    _check("StringNormalizer", {"x": x}, case_change_action=action, is_case_sensitive=sensitive,
           stopwords=["monday", "tuesday"], locale="C.UTF-8")


def test_string_normalizer_unicode_case() -> None:
    (y,) = _run(_model("StringNormalizer", {"x": _s("Straße", "ÉTÉ")}, case_change_action="LOWER"),
                {"x": _s("Straße", "ÉTÉ")})
    assert y.tolist() == ["straße", "été"]


def test_string_normalizer_all_removed_keeps_rank() -> None:
    x = _s(["a", "A"])
    _check("StringNormalizer", {"x": x}, stopwords=["a"], locale="C.UTF-8")
    x2 = _s(["a", "A"])
    _check("StringNormalizer", {"x": x2}, stopwords=["a"], locale="C.UTF-8")


def test_string_concat_broadcasts() -> None:
    _check("StringConcat", {"a": _s(["x", "é"], ["", "z"]), "b": _s("1", "2")})


def test_regex_full_match_posix_class_and_refusals() -> None:
    x = _s("abc", "ab1", "ABC")
    model = _model("RegexFullMatch", {"x": x}, pattern="[[:lower:]]+")
    _same(_run(model, {"x": x}), _ort(model, {"x": x}))
    with pytest.raises(Exception, match="lookahead"):
        _run(_model("RegexFullMatch", {"x": x}, pattern="a(?=b)bc"), {"x": x})


@pytest.mark.parametrize("mode", ["TF", "IDF", "TFIDF"])
def test_tfidf_int_weights_and_skips(mode: str) -> None:
    x = np.array([[1, 2, 3, 2, 3, 1], [3, 3, 2, 1, 2, 3]], np.int32)
    attrs = dict(mode=mode, min_gram_length=1, max_gram_length=3, max_skip_count=2,
                 ngram_counts=[0, 3, 7], ngram_indexes=[4, 0, 2, 1, 3, 5],
                 pool_int64s=[1, 2, 3, 2, 3, 3, 1, 1, 2, 3], weights=[0.5, 2, 3, 1, 1.5, 4])
    _check("TfIdfVectorizer", {"x": x}, **attrs)


def test_tfidf_strings_1d() -> None:
    x = _s("a", "b", "c", "a", "b", "z")
    attrs = dict(mode="TF", min_gram_length=2, max_gram_length=2, max_skip_count=1,
                 ngram_counts=[0, 2], ngram_indexes=[0, 2, 1], pool_strings=["a", "b", "a", "c"])
    _check("TfIdfVectorizer", {"x": x}, **attrs)


def test_tfidf_int_input_jits() -> None:
    attrs = dict(mode="TF", min_gram_length=1, max_gram_length=2, max_skip_count=0,
                 ngram_counts=[0, 2], ngram_indexes=[0, 1, 2], pool_int64s=[5, 6, 5, 6])
    x = np.array([[5, 6, 5, 6]], np.int64)
    m = load_onnx(_model("TfIdfVectorizer", {"x": x}, **attrs))
    y = jax.jit(lambda v: m.fn(m.params, {"x": v}))(x)["y0"]
    np.testing.assert_array_equal(np.asarray(y), [[2, 2, 2]])


# ------------------------------------------------------------------ ai.onnx.ml


def test_label_encoder_float_to_int_with_nan_key() -> None:
    x = np.array([[1.5, np.nan], [2.0, 7.0]], np.float32)
    _check("LabelEncoder", {"x": x}, domain=ML, domain_opset=4, keys_floats=[1.5, 2.0, np.nan],
           values_int64s=[10, 20, 30], default_int64=-7)


def test_label_encoder_int_to_string_needs_a_concrete_input() -> None:
    x = np.array([3, 1, 9], np.int64)
    attrs = dict(keys_int64s=[1, 3], values_strings=["one", "three"])
    node = helper.make_node("LabelEncoder", ["k"], ["y0"], domain=ML, **attrs)
    const = helper.make_node("Constant", [], ["k"], value=helper.make_tensor("k", TensorProto.INT64, (3,), x))
    graph = helper.make_graph([const, node], "g", [], [helper.make_value_info("y0", onnx.TypeProto())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(ML, 2)])
    _same(_run(model, {}), [np.array(["three", "one", "_Unused"], object)])
    with pytest.raises(Exception, match="needs its input at trace time"):
        _run(_model("LabelEncoder", {"x": x}, domain=ML, domain_opset=2, **attrs), {"x": x})


def test_label_encoder_numeric_jits() -> None:
    x = np.array([3, 1, 9], np.int64)
    m = load_onnx(_model("LabelEncoder", {"x": x}, domain=ML, domain_opset=2, keys_int64s=[1, 3],
                         values_floats=[0.5, 1.5]))
    y = jax.jit(lambda v: m.fn(m.params, {"x": v}))(x)["y0"]
    np.testing.assert_array_equal(np.asarray(y), np.array([1.5, 0.5, -0.0], np.float32))


def test_array_feature_extractor_1d_and_strings() -> None:
    _check("ArrayFeatureExtractor", {"x": np.arange(5, dtype=np.float32), "i": np.array([4, 0], np.int64)},
           domain=ML)
    _check("ArrayFeatureExtractor", {"x": _s(["a", "b", "c"], ["d", "e", "f"]), "i": np.array([2], np.int64)},
           domain=ML)


def test_binarizer() -> None:
    _check("Binarizer", {"x": np.array([[-1, 0.5, 0.2]], np.float32)}, domain=ML, threshold=0.3)


def _tree_attrs(aggregate: int, post: int) -> dict[str, Any]:
    """Two trees over 2 features, 3 targets; target 0 is reached by tree 0 only."""
    return dict(
        n_targets=3, aggregate_function=aggregate, post_transform=post, tree_roots=[0, 3],
        nodes_modes=helper.make_tensor("m", TensorProto.UINT8, (4,), [0, 3, 0, 1]),
        nodes_featureids=[0, 1, 0, 1],
        nodes_splits=helper.make_tensor("s", F, (4,), [0.5, 0.1, 0.0, 0.2]),
        nodes_truenodeids=[1, 0, 0, 2], nodes_trueleafs=[0, 1, 0, 1],
        nodes_falsenodeids=[2, 1, 0, 3], nodes_falseleafs=[1, 1, 0, 1],
        nodes_missing_value_tracks_true=[1, 0, 0, 0],
        leaf_targetids=[0, 1, 2, 1, 2],
        leaf_weights=helper.make_tensor("w", F, (5,), [1.0, 2.0, 3.0, -4.0, 0.5]))


@pytest.mark.parametrize("aggregate", [0, 1, 2, 3])
def test_tree_ensemble_aggregates(aggregate: int) -> None:
    x = np.array([[0, 0], [1, 1], [0.3, 0.5], [np.nan, 0.1], [0.7, 0.15]], np.float32)
    _check("TreeEnsemble", {"x": x}, domain=ML, domain_opset=5, **_tree_attrs(aggregate, 0))


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _softmax_zero(v: np.ndarray) -> np.ndarray:
    e = np.where(v == 0, 0, np.exp(v - v.max(-1, keepdims=True)))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("post,fn", [(1, _softmax), (2, lambda v: 1 / (1 + np.exp(-v))), (3, _softmax_zero)])
def test_tree_ensemble_post_transforms(post: int, fn: Any) -> None:
    # The spec numbers SOFTMAX 1 and LOGISTIC 2; onnxruntime 1.32 reads them the other way round,
    # so the reference here is the raw (post_transform=0, checked against onnxruntime) scores.
    x = np.array([[0, 0], [1, 1], [0.3, 0.5]], np.float32)
    (raw,) = _run(_model("TreeEnsemble", {"x": x}, domain=ML, domain_opset=5, **_tree_attrs(1, 0)), {"x": x})
    (y,) = _run(_model("TreeEnsemble", {"x": x}, domain=ML, domain_opset=5, **_tree_attrs(1, post)), {"x": x})
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, fn(raw.astype(np.float64)), rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------ training (no onnxruntime kernels)


def test_momentum_after_first_step_uses_beta() -> None:
    r, t = np.array(0.1, np.float32), np.array(3, np.int64)
    x, g, v = (np.array([1.0, -2.0], np.float32), np.array([0.5, 0.25], np.float32), np.array([0.2, 0.4], np.float32))
    model = _model("Momentum", {"r": r, "t": t, "x": x, "g": g, "v": v}, 2, domain=TRAINING,
                   alpha=0.9, beta=0.5, mode="nesterov", norm_coefficient=0.01)
    x_new, v_new = _run(model, {"r": r, "t": t, "x": x, "g": g, "v": v})
    g_reg = 0.01 * x + g
    want_v = 0.9 * v + 0.5 * g_reg
    np.testing.assert_allclose(v_new, want_v, rtol=1e-6)
    np.testing.assert_allclose(x_new, x - 0.1 * (g_reg + 0.9 * want_v), rtol=1e-6)
    assert x_new.dtype == np.float32


def test_adam_bias_correction() -> None:
    r, t = np.array(0.01, np.float32), np.array(2, np.int64)
    x, g = np.array([1.0], np.float32), np.array([0.3], np.float32)
    v, h = np.array([0.1], np.float32), np.array([0.02], np.float32)
    feeds = {"r": r, "t": t, "x": x, "g": g, "v": v, "h": h}
    model = _model("Adam", feeds, 3, domain=TRAINING, alpha=0.8, beta=0.9, epsilon=1e-6, norm_coefficient_post=0.1)
    x_new, v_new, h_new = _run(model, feeds)
    want_v, want_h = 0.8 * v + 0.2 * g, 0.9 * h + 0.1 * g * g
    rate = 0.01 * np.sqrt(1 - 0.9 ** 2) / (1 - 0.8 ** 2)
    np.testing.assert_allclose(x_new, 0.9 * (x - rate * want_v / (np.sqrt(want_h) + 1e-6)), rtol=1e-5)
    np.testing.assert_allclose(v_new, want_v, rtol=1e-6)
    np.testing.assert_allclose(h_new, want_h, rtol=1e-6)


def _legacy_regressor_attrs(aggregate: str, post: str) -> dict[str, Any]:
    """Tree 0: depth 2 with a NaN-tracking root; tree 1: one split; leaves carry 1-2 target weights."""
    return dict(
        n_targets=2, aggregate_function=aggregate, post_transform=post, base_values=[0.5, -0.25],
        nodes_treeids=[0, 0, 0, 0, 0, 1, 1, 1], nodes_nodeids=[0, 1, 2, 3, 4, 0, 1, 2],
        nodes_featureids=[0, 1, 0, 0, 0, 1, 0, 0],
        nodes_modes=["BRANCH_LEQ", "BRANCH_GT", "LEAF", "LEAF", "LEAF", "BRANCH_LT", "LEAF", "LEAF"],
        nodes_values=[0.5, 0.1, 0, 0, 0, 0.2, 0, 0],
        nodes_truenodeids=[1, 2, 0, 0, 0, 1, 0, 0], nodes_falsenodeids=[4, 3, 0, 0, 0, 2, 0, 0],
        nodes_missing_value_tracks_true=[1, 0, 0, 0, 0, 0, 0, 0],
        target_treeids=[0, 0, 0, 0, 1, 1, 1], target_nodeids=[2, 2, 3, 4, 1, 2, 2],
        target_ids=[0, 1, 1, 0, 0, 0, 1], target_weights=[1.0, 2.0, 3.0, -4.0, 0.5, 1.5, -2.0])


@pytest.mark.parametrize("aggregate,post", [("SUM", "NONE"), ("AVERAGE", "NONE"), ("MIN", "NONE"),
                                            ("MAX", "NONE"), ("SUM", "LOGISTIC"), ("SUM", "SOFTMAX")])
def test_tree_ensemble_regressor(aggregate: str, post: str) -> None:
    # every row reaches every target: onnxruntime leaves out base_values for a target no tree reaches
    # (the spec adds them always, as we do)
    x = np.array([[0, 0], [1, 1], [0.3, 0.5], [np.nan, 0.1], [0.7, 0.3]], np.float32)
    _check("TreeEnsembleRegressor", {"x": x}, domain=ML, domain_opset=3, **_legacy_regressor_attrs(aggregate, post))


def test_scaler_normalizer_imputer() -> None:
    x = np.array([[1.0, -2.0, np.nan], [0.5, 4.0, 3.0]], np.float32)
    _check("Scaler", {"x": np.nan_to_num(x)}, domain=ML, offset=[0.5, 1.0, -1.0], scale=[2.0, 0.5, 1.0])
    _check("Scaler", {"x": np.array([[1, 2], [3, 4]], np.int64)}, domain=ML, offset=[1.0], scale=[0.5])
    for norm in ("MAX", "L1", "L2"):
        _check("Normalizer", {"x": np.nan_to_num(x)}, domain=ML, norm=norm)
    _check("Imputer", {"x": x}, domain=ML, imputed_value_floats=[9.0, 8.0, 7.0], replaced_value_float=float("nan"))
    _check("Imputer", {"x": np.array([[1, 0, 3]], np.int64)}, domain=ML, imputed_value_int64s=[5],
           replaced_value_int64=0)


@pytest.mark.parametrize("post", ["NONE", "LOGISTIC", "SOFTMAX"])
def test_linear_regressor_and_classifier(post: str) -> None:
    x = np.array([[1.0, -2.0, 0.5], [0.5, 4.0, 3.0]], np.float32)
    coef = [0.1, 0.2, -0.3, 1.0, 0.0, 0.5, -0.5, 0.25, 0.75]
    _check("LinearRegressor", {"x": x}, domain=ML, coefficients=coef, intercepts=[0.1, -0.2, 0.3], targets=3,
           post_transform=post)
    _check("LinearClassifier", {"x": x}, 2, domain=ML, coefficients=coef, intercepts=[0.1, -0.2, 0.3],
           classlabels_ints=[7, 8, 9], post_transform=post)


@pytest.mark.parametrize("post", ["NONE", "SOFTMAX", "LOGISTIC"])
def test_tree_ensemble_classifier(post: str) -> None:
    attrs = _legacy_regressor_attrs("SUM", post)
    for k in ("n_targets", "aggregate_function"):
        attrs.pop(k)
    attrs.update({k.replace("target_", "class_"): attrs.pop(k) for k in
                  ("target_treeids", "target_nodeids", "target_ids", "target_weights")})
    # three classes: onnxruntime's two-class path has its own label rules the spec does not state
    attrs["class_ids"] = [0, 1, 2, 0, 2, 0, 1]
    attrs["base_values"] = [0.5, -0.25, 0.0]
    attrs["classlabels_int64s"] = [3, 5, 7]
    x = np.array([[0, 0], [1, 1], [0.3, 0.5], [np.nan, 0.1], [0.7, 0.3]], np.float32)
    _check("TreeEnsembleClassifier", {"x": x}, 2, domain=ML, domain_opset=3, **attrs)


def test_feature_vectorizer_and_one_hot_encoder() -> None:
    a, b = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32), np.array([[5, 6, 7], [8, 9, 10]], np.float32)
    _check("FeatureVectorizer", {"a": a, "b": b}, domain=ML, inputdimensions=[3, 2])
    _check("OneHotEncoder", {"x": np.array([[2, 5], [9, 2]], np.int64)}, domain=ML, cats_int64s=[2, 5, 7])
    _check("OneHotEncoder", {"x": _s(["a", "c"], ["b", "z"])}, domain=ML, cats_strings=["a", "b", "c"])
