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
    assert main(["bench", "shufflenet", "--batch", "1,2", "--runs", "2", "--min-block-s", "0",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "geomean ratio" in text
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["onnxruntime_ms"] > 0 and r["max_abs_diff"] < 1e-4 for r in rows)


def test_info_passes_shows_counts_shrinking(capsys):
    assert main(["info", "resnet50", "--passes", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["pass"] == "(as read)" and rows[-1]["nodes"] < rows[0]["nodes"]


# ----------------------------------------------------------------------------- quantize
def _tiny_encoder(tmp_path: Path) -> Path:
    from jaxinfer.quant import fixtures

    path = tmp_path / "enc.onnx"
    path.write_bytes(fixtures.encoder(32, 64, layers=1, heads=2).SerializeToString())
    return path


def _calibration_dir(tmp_path: Path, batches: int) -> Path:
    root = tmp_path / "calib"
    for i in range(batches):
        (root / f"{i:03d}").mkdir(parents=True)
        np.save(root / f"{i:03d}" / "x.npy", np.random.default_rng(i).standard_normal((2, 4, 32)).astype(np.float32))
    return root


def test_quantize_int8_static_saves_a_reloadable_model(tmp_path: Path, capsys):
    import jaxinfer
    from jaxinfer import arith

    model, calib, out = _tiny_encoder(tmp_path), _calibration_dir(tmp_path, 2), tmp_path / "q"
    assert main(["quantize", str(model), "--method", "static_int8", "--calibration", str(calib),
                 "--exclude", "l0/ffn/*", "-o", str(out), "--report"]) == 0
    text = capsys.readouterr().out
    assert "quantization: int8-static" in text and "l0/attn/q/matmul" in text and f"saved int8-static model to {out}" in text
    q = jaxinfer.load(out)
    assert arith.kind(q.params["l0.attn.q.w"]) == "int8-static" and arith.kind(q.params["l0.ffn.up.w"]) == "float"
    x = {"x": np.load(calib / "001" / "x.npy")}
    ref = jaxinfer.load(model).run(x)["y"]
    from jaxinfer.quant.report import cosine

    assert cosine(q.run(x)["y"], ref) > 0.995


def test_quantize_json_report(tmp_path: Path, capsys):
    model = _tiny_encoder(tmp_path)
    assert main(["quantize", str(model), "--method", "int8-weight", "-o", str(tmp_path / "w"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["method"] == "int8-weight" and rep["totals"]["quantized_weights_ratio"] > 3


def test_calibration_dir_layouts(tmp_path: Path):
    from jaxinfer.quant.calibrate import read_npy_dir

    flat = tmp_path / "flat"
    flat.mkdir()
    np.save(flat / "gpu_0_data_0.npy", np.ones((1, 3), np.float32))
    np.save(flat / "mask.npy", np.zeros((1, 3), np.int64))
    (b,) = read_npy_dir(flat, ["gpu_0/data_0", "mask"])
    assert b["gpu_0/data_0"].shape == (1, 3) and b["mask"].dtype == np.int64
    nested = _calibration_dir(tmp_path, 3)
    assert len(read_npy_dir(nested, ["x"])) == 3
    (nested / "002" / "x.npy").rename(nested / "002" / "anything.npy")  # one input: any one file
    assert read_npy_dir(nested, ["x"])[2]["x"].shape == (2, 4, 32)


def test_quantize_errors(tmp_path: Path, capsys):
    model = _tiny_encoder(tmp_path)
    assert main(["quantize", str(model), "--method", "int8-static", "-o", str(tmp_path / "o")]) == 2
    assert "needs --calibration DIR" in capsys.readouterr().err
    assert main(["quantize", str(model), "--method", "int3", "-o", str(tmp_path / "o")]) == 2
    assert "unknown quantization method" in capsys.readouterr().err
    empty = tmp_path / "empty"
    (empty / "000").mkdir(parents=True)
    np.save(empty / "000" / "a.npy", np.ones(1, np.float32))
    np.save(empty / "000" / "b.npy", np.ones(1, np.float32))
    assert main(["quantize", str(model), "--method", "int8-static", "--calibration", str(empty), "-o",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "lacks x (x.npy)" in err and "000" in err
    assert not (tmp_path / "o").exists()
