"""The ``jaxinfer`` command: info, run, bench on real models the onnx wheel ships."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from jaxinfer.cli import main


def test_info_lists_signature_and_ops(capsys):
    assert main(["info", "squeezenet"]) == 0
    out = capsys.readouterr().out
    assert "data_0: float32[1, 3, 224, 224]" in out
    assert "Conv x26" in out


def test_info_reports_every_unsupported_op(tmp_path: Path, capsys):
    graph = helper.make_graph(
        [helper.make_node("Nope", ["x"], ["a"], name="n1"), helper.make_node("Nada", ["a"], ["y"], name="n2")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    assert main(["info", str(path)]) == 1
    out = capsys.readouterr().out
    assert "Nope" in out and "Nada" in out and "n1" in out and "n2" in out


def test_run_with_random_and_given_inputs(tmp_path: Path, capsys):
    assert main(["run", "squeezenet"]) == 0
    assert "softmaxout_1: float32[1, 1000, 1, 1]" in capsys.readouterr().out
    x = np.zeros((1, 3, 224, 224), np.float32)
    np.save(tmp_path / "x.npy", x)
    assert main(["run", "squeezenet", "--input", f"data_0={tmp_path / 'x.npy'}", "--save", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "softmaxout_1.npy").exists()


def test_run_reports_bad_input_as_an_error(tmp_path: Path, capsys):
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 10, 10), np.float32))
    assert main(["run", "squeezenet", "--input", f"data_0={tmp_path / 'x.npy'}"]) == 2
    assert "dim 2 must be 224" in capsys.readouterr().err


def test_bench_against_onnxruntime_writes_json(tmp_path: Path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "shufflenet", "--batch", "1,2", "--runs", "2", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "geomean ratio" in text
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["onnxruntime_ms"] > 0 and r["max_abs_diff"] < 1e-4 for r in rows)


def test_info_passes_shows_counts_shrinking(capsys):
    assert main(["info", "resnet50", "--passes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["pass"] == "(as read)" and rows[-1]["nodes"] < rows[0]["nodes"]
