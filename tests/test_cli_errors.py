"""The ``jaxinfer`` command on bad arguments and bad files: ``jaxinfer: error: ...`` and exit 2, no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

import jaxinfer
from jaxinfer.cli import main

TFLITE = Path(__file__).parent / "fixtures" / "tflite" / "conv_f32.tflite"


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A relu model, a corrupt .onnx, a plain file, and .npy inputs good and bad."""
    root = tmp_path_factory.mktemp("cli")
    g = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), root / "good.onnx")
    (root / "rand.onnx").write_bytes(bytes(range(256)) * 4)
    (root / "afile").write_text("x")
    np.save(root / "x_ok.npy", np.ones((2, 3), np.float32))
    np.save(root / "x_obj.npy", np.array([1, "a"], dtype=object), allow_pickle=True)
    (root / "x_garbage.npy").write_bytes(b"not npy")
    return {p.name: p for p in root.iterdir()} | {"root": root}


def _error(capsys, args: list[str]) -> str:
    """stderr of ``main(args)``, asserting it exits 2 with ``jaxinfer: error:``."""
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxinfer: error: ") and "Traceback" not in err
    return err


def _usage_error(capsys, args: list[str]) -> str:
    """stderr of an argparse rejection (SystemExit 2)."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("name, expected", [
    ("missing.npy", "No such file or directory"),
    ("root", "a directory"),
    ("x_obj.npy", "holds a Python object array"),
    ("x_garbage.npy", "not a .npy file"),
])
def test_run_input_file_problems(files, capsys, name, expected):
    path = files.get(name, files["root"] / name)
    err = _error(capsys, ["run", str(files["good.onnx"]), "--input", f"x={path}"])
    assert f"--input x ({path})" in err and expected in err


def test_run_input_without_equals(files, capsys):
    assert "--input expects NAME=FILE.npy, got 'x'" in _error(capsys, ["run", str(files["good.onnx"]), "--input", "x"])


def test_run_save_onto_a_file(files, capsys):
    err = _error(capsys, ["run", str(files["good.onnx"]), "--save", str(files["afile"])])
    assert f"--save ({files['afile']}): an existing file, not a directory" in err


@pytest.mark.parametrize("args, expected", [
    (["run", "M", "--batch", "-3"], "argument --batch: -3 is not positive"),
    (["run", "M", "--batch", "0"], "argument --batch: 0 is not positive"),
    (["bench", "M", "--batch", "abc"], "invalid batch size 'abc'"),
    (["bench", "M", "--batch", "1,-2"], "invalid batch size '-2' in '1,-2'"),
    (["bench", "M", "--runs", "0"], "argument --runs: 0 is not positive"),
    (["plan", "M", "--devices", "-1"], "argument --devices: -1 is not positive"),
    (["plan", "M", "--devices", "0"], "argument --devices: 0 is not positive"),
    (["plan", "M", "--batch", "0"], "argument --batch: 0 is not positive"),
])
def test_numeric_options_must_be_positive(files, capsys, args, expected):
    args = [str(files["good.onnx"]) if a == "M" else a for a in args]
    assert expected in _usage_error(capsys, args)


@pytest.mark.parametrize("name, expected", [("nope.onnx", "not found"), ("root", "a directory")])
def test_info_passes_needs_a_model_file(files, capsys, name, expected):
    path = files.get(name, files["root"] / name)
    err = _error(capsys, ["info", "--passes", str(path)])
    assert f"model file ({path}): {expected}" in err


@pytest.mark.parametrize("name, expected", [("nope.onnx", "model file not found"),
                                            ("rand.onnx", "not a valid ONNX model")])
def test_bench_bad_model(files, capsys, name, expected):
    path = files.get(name, files["root"] / name)
    assert expected in _error(capsys, ["bench", str(path), "--against", "none", "--runs", "1"])


def test_bench_tflite_against_litert_and_saved_dir_alone(files, capsys, tmp_path):
    """A .tflite file is timed against LiteRT by default (outputs against LiteRT's builtin kernels: the int8
    fixture matches exactly); onnxruntime cannot run it, so ``--against onnxruntime`` times jaxinfer alone;
    a stateful model runs at its own batch only; a saved directory has no twin."""
    out = tmp_path / "b.json"
    assert main(["bench", str(TFLITE), "--batch", "1,2", "--runs", "1", "--min-block-s", "0", "--json", str(out)]) == 0
    assert "jaxinfer/litert" in capsys.readouterr().out
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["reference"] == "litert" and r["litert_ms"] > 0 and r["max_abs_diff"] < 1e-4 for r in rows)
    assert main(["bench", str(TFLITE.with_name("conv_int8.tflite")), "--runs", "1", "--min-block-s", "0",
                 "--json", str(out)]) == 0
    assert json.loads(out.read_text())[0]["max_abs_diff"] == 0
    assert main(["bench", str(TFLITE), "--against", "onnxruntime", "--runs", "1", "--min-block-s", "0",
                 "--json", str(out)]) == 0
    assert "timing jaxinfer alone" in capsys.readouterr().err
    (row,) = json.loads(out.read_text())
    assert row["model"] == "conv_f32" and row["jaxinfer_ms"] > 0 and row["onnxruntime_ms"] is None
    err = _error(capsys, ["bench", str(TFLITE.with_name("lstm_stream.tflite")), "--batch", "2", "--runs", "1"])
    assert "keeps state; it cannot run at batch 2" in err
    saved = jaxinfer.save(jaxinfer.load(files["good.onnx"]), tmp_path / "saved")
    assert main(["bench", str(saved), "--batch", "1,2", "--against", "none", "--runs", "1", "--min-block-s", "0"]) == 0
    assert "saved" in capsys.readouterr().out


def test_bench_json_onto_a_directory(files, capsys):
    err = _error(capsys, ["bench", str(files["good.onnx"]), "--against", "none", "--runs", "1", "--min-block-s", "0",
                          "--json", str(files["root"])])
    assert f"bench ({files['root']})" in err


def test_quantize_output_onto_a_file(files, capsys):
    err = _error(capsys, ["quantize", str(files["good.onnx"]), "-o", str(files["afile"])])
    assert f"-o/--output ({files['afile']}): an existing file" in err


def test_quantize_calibration_file_not_npy(files, capsys, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    (calib / "x.npy").write_bytes(b"not npy")
    err = _error(capsys, ["quantize", str(files["good.onnx"]), "--method", "int8-static", "--calibration",
                          str(calib), "-o", str(tmp_path / "q")])
    assert f"--calibration file ({calib / 'x.npy'}): not a .npy file" in err
    assert not (tmp_path / "q").exists()


def test_quantize_budget_needs_key_equals_number(files, capsys, tmp_path):
    err = _error(capsys, ["quantize", str(files["good.onnx"]), "--method", "int8-dynamic", "--budget", "cosine",
                          "-o", str(tmp_path / "q")])
    assert "--budget expects KEY=NUMBER" in err
