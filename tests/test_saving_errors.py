"""``jaxinfer.save`` / ``jaxinfer.load(<saved dir>)`` on bad arguments and damaged directories: clean errors."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer
from jaxinfer.errors import ModelLoadError


def _matmul(n: int, dtype: type = np.float32) -> jaxinfer.Model:
    """y = x @ W with W of shape [3, n]."""
    g = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n])],
                          [numpy_helper.from_array(np.arange(3 * n, dtype=dtype).reshape(3, n), "W")])
    return jaxinfer.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A good saved dir (W: 3x4) and one of another model (W: 3x5), written once."""
    root = tmp_path_factory.mktemp("saved")
    return {"good": jaxinfer.save(_matmul(4), root / "good"), "other": jaxinfer.save(_matmul(5), root / "other")}


def _copy(saved: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved["good"], tmp_path / "d"))


def _edit_manifest(d: Path, edit) -> None:
    p = d / "jaxinfer.json"
    p.write_text(json.dumps(edit(json.loads(p.read_text()))))


def test_good_dir_round_trips_and_records_leaf_shapes(saved):
    m = jaxinfer.load(saved["good"])
    assert m.run({"x": np.ones((2, 3), np.float32)})["y"].shape == (2, 4)
    manifest = json.loads((saved["good"] / "jaxinfer.json").read_text())
    assert manifest["leaves"] == {"p0": {"shape": [3, 4], "dtype": "float32"}}


def test_params_of_another_model_are_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    shutil.rmtree(d / "params")
    shutil.copytree(saved["other"] / "params", d / "params")
    with pytest.raises(ModelLoadError) as e:
        jaxinfer.load(d)
    msg = str(e.value)
    assert str(d) in msg and "param 'W'" in msg and "float32[3, 5]" in msg and "float32[3, 4]" in msg


def test_dtype_mismatch_is_refused(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_manifest(d, lambda m: (m["leaves"]["p0"].__setitem__("dtype", "int32"), m)[1])
    with pytest.raises(ModelLoadError, match=r"param 'W'.*float32\[3, 4\].*expects int32\[3, 4\]"):
        jaxinfer.load(d)


def test_dir_saved_without_leaf_records_still_loads(saved, tmp_path):
    d = _copy(saved, tmp_path)
    _edit_manifest(d, lambda m: {k: v for k, v in m.items() if k != "leaves"})
    assert jaxinfer.load(d).run({"x": np.ones((1, 3), np.float32)})["y"].shape == (1, 4)


def _rm_metadata(d: Path) -> None:
    os.remove(d / "params" / "_METADATA")


def _flip_data(d: Path) -> None:
    for root, _, files in os.walk(d / "params"):
        for f in files:
            if root.endswith("/d") or f == "manifest.ocdbt":
                p = Path(root) / f
                b = bytearray(p.read_bytes())
                b[len(b) // 2] ^= 0xFF
                p.write_bytes(bytes(b))


def _rm_data(d: Path) -> None:
    for root, _, files in os.walk(d / "params"):
        for f in files:
            if root.endswith("/d") or f == "manifest.ocdbt":
                os.remove(Path(root) / f)


def _truncate_all(d: Path) -> None:
    for root, _, files in os.walk(d / "params"):
        for f in files:
            p = Path(root) / f
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])


CASES = {
    "params missing": (lambda d: shutil.rmtree(d / "params"), "params/ is missing"),
    "params emptied": (lambda d: (shutil.rmtree(d / "params"), (d / "params").mkdir()), "cannot restore params/"),
    "_METADATA removed": (_rm_metadata, "cannot restore params/.*_METADATA"),
    "data byte flipped": (_flip_data, "cannot restore params/"),
    "data removed": (_rm_data, "cannot restore params/"),
    "files truncated": (_truncate_all, "cannot restore params/"),
    "no graph": (lambda d: _edit_manifest(d, lambda m: {k: v for k, v in m.items() if k != "graph"}),
                 "'graph' is missing; expected an object"),
    "no params": (lambda d: _edit_manifest(d, lambda m: {k: v for k, v in m.items() if k != "params"}),
                  "'params' is missing; expected an object"),
    "graph nodes malformed": (lambda d: _edit_manifest(d, lambda m: (m["graph"].__setitem__("nodes", [["MatMul"]]),
                                                                      m)[1]), "'graph' is malformed"),
    "graph bad dtype": (lambda d: _edit_manifest(
        d, lambda m: (m["graph"]["inputs"][0]["__vi__"].__setitem__(2, "notadtype"), m)[1]), "'graph' is malformed"),
    "unknown leaf": (lambda d: _edit_manifest(d, lambda m: (m["params"]["W"].__setitem__("leaf", "p9"), m)[1]),
                     "param 'W' needs leaf 'p9', which params/ lacks"),
    "empty spec": (lambda d: _edit_manifest(d, lambda m: (m["params"].__setitem__("W", {}), m)[1]),
                   "param 'W' spec has kind None; expected"),
    "bogus kind": (lambda d: _edit_manifest(d, lambda m: (m["params"]["W"].__setitem__("kind", "zz"), m)[1]),
                   "param 'W' spec has kind 'zz'"),
    "manifest is a list": (lambda d: (d / "jaxinfer.json").write_text('["jaxinfer-saved/1"]'),
                           "holds a JSON list; expected an object"),
    "unknown graph fmt": (lambda d: _edit_manifest(d, lambda m: (m["graph"].__setitem__("fmt", "zz"), m)[1]),
                          "unknown format 'zz'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_dir_gives_model_load_error(saved, tmp_path, case):
    mutate, pattern = CASES[case]
    d = _copy(saved, tmp_path)
    mutate(d)
    with pytest.raises(ModelLoadError, match=pattern) as e:
        jaxinfer.load(d)
    assert str(d) in str(e.value)


def test_save_onto_an_existing_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    with pytest.raises(ValueError, match="afile is an existing file; expected a directory"):
        jaxinfer.save(_matmul(4), f)
    assert f.read_text() == "x"


def test_save_a_non_model(tmp_path):
    with pytest.raises(TypeError, match="model must be a jaxinfer Model.*got str"):
        jaxinfer.save("hello", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_model_without_params_round_trips(tmp_path):
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    m = jaxinfer.load(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
    assert not m.params
    r = jaxinfer.load(jaxinfer.save(m, tmp_path / "s"))
    x = -np.ones((2, 3), np.float32)
    assert np.array_equal(r.run({"x": x})["y"], np.zeros((2, 3), np.float32))
