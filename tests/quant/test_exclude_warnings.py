"""An ``exclude`` glob of quantize/prune that matches nothing is warned about (a typo would quantize the
layer meant to stay float), naming the glob and names it may have meant; globs that match stay silent."""

from __future__ import annotations

import warnings

import pytest

import jaxinfer
from jaxinfer.errors import UnmatchedExcludeWarning
from jaxinfer.quant.layers import unmatched_patterns

from .cnn import small_cnn


@pytest.fixture(scope="module")
def cnn():
    return jaxinfer.load(small_cnn().SerializeToString())


def _one_warning(record) -> str:
    texts = [str(w.message) for w in record if issubclass(w.category, UnmatchedExcludeWarning)]
    assert len(texts) == 1, texts
    assert record[0].filename == __file__  # points at the caller's line, not into jaxinfer
    return texts[0]


def test_a_typo_warns_naming_it_and_the_names_it_may_have_meant(encoder):
    with pytest.warns(UnmatchedExcludeWarning) as record:
        q = jaxinfer.quantize(encoder, "int8-dynamic", exclude=["l0/ffn/upp*", "op:Softmaxx", "l1/attn/q/*"])
    text = _one_warning(record)
    assert "2 exclude pattern(s) matched no node name, 'op:' type or initializer name of model 'encoder'" in text
    assert "'l0/ffn/upp*' (names here like 'l0/ffn/up/" in text
    assert "'op:Softmaxx' (names here like 'op:Softmax')" in text
    assert "l1/attn/q/*" not in text  # it matched
    rows = {r["layer"]: r["method"] for r in q.report().rows}
    assert rows["l0/ffn/up/matmul"] == "int8-dynamic"  # what the typo failed to keep
    assert issubclass(UnmatchedExcludeWarning, UserWarning)


@pytest.mark.parametrize("exclude", [
    ["l0/ffn/up/matmul"],  # a node name
    ["l1/*"],  # a node-name glob
    ["op:MatMul"],  # an op type
    ["l0.attn.q.w", "l0.ffn.*.b"],  # initializer names
    [],
])
def test_globs_that_match_stay_silent(encoder, exclude):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedExcludeWarning)
        jaxinfer.quantize(encoder, "bf16", exclude=exclude, measure=False)


def test_prune_warns_too(cnn):
    with pytest.warns(UnmatchedExcludeWarning) as record:
        jaxinfer.prune(cnn, 0.25, exclude=["c1", "op:Gemn", "FC1"])
    text = _one_warning(record)
    assert "'op:Gemn' (names here like 'op:Gemm')" in text
    assert "'FC1' (names here like 'fc1'" in text  # globs are case-sensitive
    assert "'c1' (" not in text  # it matched


def test_suggestions_fall_back_to_example_names(encoder):
    found = unmatched_patterns(["zzzz", "op:Qqqq", "l0/ln1"], encoder.graph, encoder.params)
    assert list(found) == ["zzzz", "op:Qqqq"]
    assert len(found["zzzz"]) == 3 and all(isinstance(n, str) for n in found["zzzz"])
    assert all(n.startswith("op:") for n in found["op:Qqqq"])


def test_a_conv_weight_is_excluded_by_the_name_the_model_file_gave_it(cnn):
    """The load passes store Conv weights spatial-first under a new name (w1 -> w1__hwio); a glob naming
    the ONNX initializer still excludes that conv, and is not warned about."""
    assert "w1__hwio" in cnn.params and "w1" not in cnn.params
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnmatchedExcludeWarning)
        q = jaxinfer.quantize(cnn, "int8-weight", exclude=["w1", "w3*"])
        pruned = jaxinfer.prune(cnn, 0.25, exclude=["w2"])
    rows = {r["layer"]: r["method"] for r in q.report().rows}
    assert "c1" not in rows and "c3" not in rows and rows["c2"] == "int8-weight", rows  # excluded: left float
    assert pruned.params["w2__hwio"].shape[-1] == cnn.params["w2__hwio"].shape[-1]  # c2 kept every channel
