"""A model declaring an opset newer than jaxinfer implements loads with a warning naming it (onnxruntime
refuses such a model); its ops run as their newest known definitions, and ``jaxinfer info`` notes it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import jaxinfer
from jaxinfer.cli import main
from jaxinfer.converters.onnx import REGISTRY
from jaxinfer.errors import NewerOpsetWarning

NEWEST = REGISTRY.newest_opset("")
NEWEST_ML = REGISTRY.newest_opset("ai.onnx.ml")


def _relu(*opsets: tuple[str, int], unsupported: bool = False) -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    if unsupported:
        nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Nope", ["a"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])


def test_registry_knows_its_newest_opsets():
    assert NEWEST >= 21 and NEWEST_ML >= 3
    assert REGISTRY.newest_opset("ai.onnx") == NEWEST
    assert REGISTRY.newest_opset("com.example.none") is None
    assert REGISTRY.newer_opsets({"": NEWEST + 2, "ai.onnx.ml": NEWEST_ML, "com.example.none": 99}) == \
        [("", NEWEST + 2, NEWEST)]


def test_a_newer_opset_warns_naming_domain_and_versions_and_still_runs():
    with pytest.warns(NewerOpsetWarning) as record:
        m = jaxinfer.load(_relu(("", NEWEST + 2), ("ai.onnx.ml", NEWEST_ML + 1)))
    texts = sorted(str(w.message) for w in record)
    assert len(texts) == 2
    assert f"opset {NEWEST + 2} of domain 'ai.onnx', newer than the newest jaxinfer implements ({NEWEST})" in texts[0]
    assert f"opset {NEWEST_ML + 1} of domain 'ai.onnx.ml', newer than the newest jaxinfer implements " \
           f"({NEWEST_ML})" in texts[1]
    assert issubclass(NewerOpsetWarning, UserWarning)
    assert all(w.filename == __file__ for w in record)  # points at the caller's line, not into jaxinfer
    np.testing.assert_array_equal(m.run({"x": np.array([-1, 3], np.float32)})["y"], [0, 3])
    notes = m.info()["notes"]
    assert any(f"opset {NEWEST + 2} of domain 'ai.onnx'" in n for n in notes)


@pytest.mark.parametrize("opsets", [
    [("", NEWEST)],
    [("", 13), ("ai.onnx.ml", NEWEST_ML)],
    [("", NEWEST), ("com.example.custom", 99)],  # a domain jaxinfer has no ops of: its nodes would be unsupported
])
def test_known_opsets_load_silently(opsets):
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewerOpsetWarning)
        m = jaxinfer.load(_relu(*opsets))
    assert not any("newer than the newest" in n for n in m.info()["notes"])


def test_the_onnx_wheel_declares_no_opset_newer_than_ours():
    """The backend conformance suite's models (at most the wheel's opset) must load without the warning."""
    assert onnx.defs.onnx_opset_version() <= NEWEST


def test_info_notes_the_newer_opset(tmp_path: Path, capsys):
    path = tmp_path / "new.onnx"
    onnx.save(_relu(("", NEWEST + 1)), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NewerOpsetWarning)  # info says it as a note, not a warning as well
        assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"note:     the model declares opset {NEWEST + 1} of domain 'ai.onnx'" in out
    assert main(["info", str(path), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["notes"]
    assert any(f"newest jaxinfer implements ({NEWEST})" in n for n in notes)


def test_info_notes_it_beside_unsupported_ops(tmp_path: Path, capsys):
    path = tmp_path / "new_bad.onnx"
    onnx.save(_relu(("", NEWEST + 1), unsupported=True), path)
    assert main(["info", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"opset {NEWEST + 1} of domain 'ai.onnx'" in out and "UNSUPPORTED" in out
