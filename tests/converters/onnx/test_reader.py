"""The ONNX reader: corrupt files, external data confinement, constants, subgraphs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import jaxinfer
from jaxinfer import ModelLoadError
from jaxinfer.converters.onnx.reader import read_model


def small_model(weight: np.ndarray | None = None) -> onnx.ModelProto:
    w = weight if weight is not None else np.arange(12, dtype=np.float32).reshape(4, 3)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, w.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, w.shape[1]])],
        [numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_loads_from_path_bytes_and_proto(tmp_path: Path):
    proto = small_model()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    x = np.ones((1, 4), np.float32)
    outs = [jaxinfer.load(src).run({"x": x})["y"] for src in (path, str(path), proto.SerializeToString(), proto)]
    for out in outs:
        np.testing.assert_allclose(out, x @ np.arange(12, dtype=np.float32).reshape(4, 3))


@pytest.mark.parametrize("data", [b"", b"\x00\x01garbage\xff" * 10, b"not an onnx model at all"])
def test_corrupt_bytes_raise_model_load_error(data: bytes):
    with pytest.raises(ModelLoadError):
        jaxinfer.load(data)


def test_truncated_file_raises_model_load_error(tmp_path: Path):
    raw = small_model(np.ones((64, 64), np.float32)).SerializeToString()
    path = tmp_path / "cut.onnx"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        jaxinfer.load(path)


def test_missing_file():
    with pytest.raises(ModelLoadError, match="not found"):
        jaxinfer.load("/nonexistent/model.onnx")


def _external(tmp_path: Path, location: str) -> Path:
    proto = small_model(np.ones((32, 32), np.float32))
    tensor = proto.graph.initializer[0]
    external_data_helper.set_external_data(tensor, location=location, offset=0, length=32 * 32 * 4)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    model_dir = tmp_path / "model"
    model_dir.mkdir(exist_ok=True)
    path = model_dir / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


def test_external_data_inside_folder_loads(tmp_path: Path):
    path = _external(tmp_path, "weights.bin")
    (path.parent / "weights.bin").write_bytes(np.full((32, 32), 2, np.float32).tobytes())
    m = jaxinfer.load(path)
    np.testing.assert_allclose(m.run({"x": np.ones((1, 32), np.float32)})["y"], np.full((1, 32), 64.0))


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path: Path, location: str):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    path = _external(tmp_path, location)
    with pytest.raises(ModelLoadError, match="refused|absolute"):
        jaxinfer.load(path)


def test_external_data_symlink_out_of_folder_is_refused(tmp_path: Path):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 4096)
    path = _external(tmp_path, "link.bin")
    os.symlink(tmp_path / "secret.bin", path.parent / "link.bin")
    with pytest.raises(ModelLoadError, match="outside"):
        jaxinfer.load(path)


def test_large_constant_node_becomes_a_param():
    w = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
    )
    m = jaxinfer.load(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert "w" in m.params
    x = np.ones((1, 64), np.float32)
    np.testing.assert_allclose(m.run({"x": x})["y"], x @ w, rtol=1e-5)


def test_symbolic_dims_and_subgraphs_are_kept():
    then_g = helper.make_graph([helper.make_node("Identity", ["x"], ["t"])], "then", [],
                               [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["e"])], "else", [],
                               [helper.make_tensor_value_info("e", TensorProto.FLOAT, None)])
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_g, else_branch=else_g)], "g",
        [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "m"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "m"])],
    )
    g = read_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert g.inputs[1].shape == ("n", "m")
    subs = list(g.nodes[0].subgraphs())
    assert sorted(s.name for s in subs) == ["else", "then"]
    assert g.opsets[""] == 17
