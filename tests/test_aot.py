"""Exported programs beside the persistent cache: a second process runs a model without tracing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from jaxinfer import aot
from jaxinfer.graph import Graph, Node, ValueInfo

CHILD = """
import json, sys, numpy as np, jaxinfer
m = jaxinfer.load(sys.argv[1])
y = m.run({"x": np.arange(8, dtype=np.float32).reshape(2, 4)})["y"]
print(json.dumps({"traces": m.stats.traces, "compiles": m.stats.compiles, "y": y.tolist()}))
"""


def _model(path: Path, alpha: float) -> None:
    w = numpy_helper.from_array(np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("LeakyRelu", ["h"], ["y"], alpha=alpha)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])], [w])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), path)


def _run(model: Path, cache: Path) -> dict:
    env = {**os.environ, "JAXINFER_CACHE_DIR": str(cache)}
    out = subprocess.run([sys.executable, "-c", CHILD, str(model)], env=env, capture_output=True, text=True,
                         timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_runs_the_stored_program_without_tracing(tmp_path):
    cache = tmp_path / "cache"
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    _model(a, 0.1)
    _model(b, 0.2)  # differs only in an attribute: must not reuse a's program
    cold = _run(a, cache)
    assert cold["traces"] == 1 and len(list((cache / "jaxinfer-exports").glob("*.jaxexport"))) == 1
    warm = _run(a, cache)
    assert warm["traces"] == 0 and warm["compiles"] == 1 and warm["y"] == cold["y"]
    other = _run(b, cache)
    assert other["traces"] == 1 and other["y"] != cold["y"]
    assert len(list((cache / "jaxinfer-exports").glob("*.jaxexport"))) == 2


def test_digest_follows_attributes_constants_shapes_and_options():
    def graph(alpha: float) -> Graph:
        return Graph(nodes=(Node("LeakyRelu", ("x",), ("y",), {"alpha": alpha}),),
                     inputs=(ValueInfo("x", np.dtype(np.float32), ("batch", 3)),),
                     outputs=(ValueInfo("y", np.dtype(np.float32), ("batch", 3)),))

    args = ({}, {"x": np.zeros((2, 3), np.float32)})
    base = aot.program_digest(graph(0.1), {}, args, {})
    assert base == aot.program_digest(graph(0.1), {}, args, {})
    assert base != aot.program_digest(graph(0.2), {}, args, {})
    assert base != aot.program_digest(graph(0.1), {"c": np.array([1, 2])}, args, {})
    assert base != aot.program_digest(graph(0.1), {}, ({}, {"x": np.zeros((4, 3), np.float32)}), {})
    assert base != aot.program_digest(graph(0.1), {}, args, {"xla_flag": "x"})
