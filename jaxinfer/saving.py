"""``save(model, dir)`` / ``load_saved(dir)``: the graph as JSON, the params with orbax.

A saved directory holds:

* ``jaxinfer.json``: format version, the Graph (pickle-free JSON: nodes, value infos,
  opsets, the constant initializers; arrays as dtype + shape + base64 bytes), how each
  param is built from its leaves (plain array, qwix ``QArray``, ``W8A8``), and the
  quantization report if the model has one.
* ``params/``: an orbax-checkpoint of the param leaves (int8 values, scales, bf16 ...),
  restored bit-identically, so a quantized or pruned model reloads without recalibration.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import arith
from .errors import ModelLoadError
from .graph import Graph, Node, ValueInfo

MANIFEST = "jaxinfer.json"
FORMAT = "jaxinfer-saved/1"


# ------------------------------------------------------------------ graph <-> JSON
def _dtype_name(dt: Any) -> str:
    return np.dtype(dt).name


def _dtype(name: str) -> np.dtype:
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(jnp.dtype(name))


def _enc(v: Any) -> Any:
    if isinstance(v, Graph):
        return {"__graph__": graph_to_json(v)}
    if isinstance(v, ValueInfo):
        return {"__vi__": [v.name, _enc(v.shape), None if v.dtype is None else _dtype_name(v.dtype), v.kind,
                           _enc(v.elem)]}
    if isinstance(v, np.ndarray) or isinstance(v, np.generic):
        arr = np.asarray(v)
        if arr.dtype == np.dtype(object):
            return {"__nd_obj__": [list(arr.shape), [x.decode("latin-1") if isinstance(x, bytes) else str(x)
                                                      for x in arr.ravel().tolist()],
                                   [isinstance(x, bytes) for x in arr.ravel().tolist()]]}
        return {"__nd__": [_dtype_name(arr.dtype), list(arr.shape),
                           base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()]}
    if isinstance(v, np.dtype):
        return {"__dtype__": v.name}
    if isinstance(v, bytes):
        return {"__bytes__": base64.b64encode(v).decode()}
    if isinstance(v, tuple):
        return {"__tuple__": [_enc(x) for x in v]}
    if isinstance(v, list):
        return [_enc(x) for x in v]
    if isinstance(v, Mapping):
        return {"__map__": [[k, _enc(x)] for k, x in v.items()]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot save a graph attribute of type {type(v).__name__}")


def _dec(v: Any) -> Any:
    if isinstance(v, list):
        return [_dec(x) for x in v]
    if not isinstance(v, dict):
        return v
    (tag, body), = v.items()
    if tag == "__graph__":
        return graph_from_json(body)
    if tag == "__vi__":
        name, shape, dtype, kind, elem = body
        return ValueInfo(name, _dec(shape), None if dtype is None else _dtype(dtype), kind, _dec(elem))
    if tag == "__nd__":
        dt, shape, data = body
        return np.frombuffer(base64.b64decode(data), dtype=_dtype(dt)).reshape(shape).copy()
    if tag == "__nd_obj__":
        shape, items, is_bytes = body
        vals = [x.encode("latin-1") if b else x for x, b in zip(items, is_bytes)]
        arr = np.empty(len(vals), dtype=object)
        arr[:] = vals
        return arr.reshape(shape)
    if tag == "__dtype__":
        return _dtype(body)
    if tag == "__bytes__":
        return base64.b64decode(body)
    if tag == "__tuple__":
        return tuple(_dec(x) for x in body)
    if tag == "__map__":
        return {k: _dec(x) for k, x in body}
    raise ModelLoadError(f"saved graph has an unknown tag '{tag}'")


def graph_to_json(g: Graph, drop: set[str] | frozenset[str] = frozenset()) -> dict[str, Any]:
    """A JSON-able dict of ``g``; initializers named in ``drop`` (the params) are left out."""
    return {
        "name": g.name, "fmt": g.fmt,
        "nodes": [[n.op_type, list(n.inputs), list(n.outputs), _enc(dict(n.attrs)), n.name, n.domain] for n in g.nodes],
        "inputs": [_enc(v) for v in g.inputs],
        "outputs": [_enc(v) for v in g.outputs],
        "initializers": {k: _enc(np.asarray(v)) for k, v in g.initializers.items() if k not in drop},
        "opsets": dict(g.opsets),
        "value_info": {k: _enc(v) for k, v in g.value_info.items()},
        "metadata": dict(g.metadata),
        "state_vars": dict(g.state_vars),
        "state_init": {k: _enc(np.asarray(v)) for k, v in g.state_init.items()},
    }


def graph_from_json(d: Mapping[str, Any]) -> Graph:
    nodes = tuple(Node(op, tuple(ins), tuple(outs), _dec(attrs), name, domain)
                  for op, ins, outs, attrs, name, domain in d["nodes"])
    return Graph(nodes, tuple(_dec(v) for v in d["inputs"]), tuple(_dec(v) for v in d["outputs"]),
                 {k: _dec(v) for k, v in d["initializers"].items()}, dict(d["opsets"]), d["name"],
                 {k: _dec(v) for k, v in d["value_info"].items()}, d["fmt"], dict(d["metadata"]),
                 dict(d["state_vars"]), {k: _dec(v) for k, v in d["state_init"].items()})


# ---------------------------------------------------------------- params <-> leaves
def _qarray_spec(q: arith.QArray, leaves: dict[str, Any], prefix: str) -> dict[str, Any]:
    spec = {"qvalue": f"{prefix}v", "scale": f"{prefix}s", "zero_point": None, "qtype": _dtype_name(q.qtype)}
    leaves[f"{prefix}v"], leaves[f"{prefix}s"] = q.qvalue, q.scale
    if q.zero_point is not None:
        spec["zero_point"] = f"{prefix}z"
        leaves[f"{prefix}z"] = q.zero_point
    return spec


def _param_spec(value: Any, leaves: dict[str, Any], key: str) -> dict[str, Any]:
    if isinstance(value, arith.W8A8):
        spec = {"kind": "w8a8", "w": _qarray_spec(value.w, leaves, key + "w"), "act_scale": None,
                "transposed": value.transposed}
        if value.act_scale is not None:
            spec["act_scale"] = key + "a"
            leaves[key + "a"] = value.act_scale
        return spec
    if isinstance(value, arith.QArray):
        return {"kind": "qarray", **_qarray_spec(value, leaves, key)}
    leaves[key] = value
    return {"kind": "array", "leaf": key}


def _qarray_from(spec: Mapping[str, Any], leaves: Mapping[str, Any]) -> arith.QArray:
    zp = leaves[spec["zero_point"]] if spec.get("zero_point") else None
    return arith.QArray(leaves[spec["qvalue"]], leaves[spec["scale"]], zp, _dtype(spec["qtype"]))


def _param_from(spec: Mapping[str, Any], leaves: Mapping[str, Any]) -> Any:
    if spec["kind"] == "w8a8":
        a = leaves[spec["act_scale"]] if spec.get("act_scale") else None
        return arith.W8A8(_qarray_from(spec["w"], leaves), a, bool(spec.get("transposed", False)))
    if spec["kind"] == "qarray":
        return _qarray_from(spec, leaves)
    return leaves[spec["leaf"]]


# ------------------------------------------------------------------------- public
def save(model: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` (graph + params, quantized or not) to ``directory``.

    Example:
      >>> jaxinfer.save(jaxinfer.quantize(m, "int8-dynamic"), "out/")   # doctest: +SKIP
      >>> q = jaxinfer.load("out/")                                     # doctest: +SKIP
    """
    import orbax.checkpoint as ocp

    path = Path(directory).resolve()
    path.mkdir(parents=True, exist_ok=True)
    leaves: dict[str, Any] = {}
    specs: dict[str, Any] = {}
    for i, (name, value) in enumerate(model.params.items()):
        specs[name] = _param_spec(value, leaves, f"p{i}")
    manifest = {
        "format": FORMAT,
        "source": getattr(model, "source", ""),
        "graph": graph_to_json(model.graph, drop=set(model.params)),
        "params": specs,
    }
    rep = getattr(model, "quant_report", None)
    if rep is not None:
        manifest["quant_report"] = rep.to_dict()
    ckpt = path / "params"
    host = {k: np.asarray(v) for k, v in leaves.items()}
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(ckpt, host, force=True)
        ckptr.wait_until_finished()
    (path / MANIFEST).write_text(json.dumps(manifest, default=_json_default))
    return path


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def is_saved_dir(directory: str | os.PathLike[str]) -> bool:
    """True when ``directory`` holds a model written by :func:`save`."""
    p = Path(directory) / MANIFEST
    if not p.is_file():
        return False
    try:
        with open(p) as f:
            head = f.read(64)
    except OSError:
        return False
    return FORMAT in head


def _registry(fmt: str) -> Any:
    if fmt == "onnx":
        from .converters.onnx.ops import REGISTRY
        return REGISTRY
    if fmt == "tflite":
        from .converters.tflite import ops as tflite_ops  # type: ignore[attr-defined]
        return tflite_ops.REGISTRY
    raise ModelLoadError(f"saved model has unknown format '{fmt}'")


def load_saved(directory: str | os.PathLike[str]) -> Any:
    """The Model saved in ``directory`` (params restored bit-identically)."""
    import orbax.checkpoint as ocp

    from .model import Model

    path = Path(directory).resolve()
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read {MANIFEST}: {e}") from e
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: saved format {manifest.get('format')!r} is not {FORMAT!r}")
    graph = graph_from_json(manifest["graph"])
    with ocp.StandardCheckpointer() as ckptr:
        leaves = ckptr.restore(path / "params")
    leaves = {k: jax.device_put(np.asarray(v)) for k, v in leaves.items()}
    params = {name: _param_from(spec, leaves) for name, spec in manifest["params"].items()}
    registry = _registry(graph.fmt)
    if "quant_report" in manifest:
        from .quant.api import QuantizedModel
        from .quant.report import QuantReport

        m = QuantizedModel(graph, registry, params=params, source=manifest.get("source", ""), check=False)
        m.quant_report = QuantReport.from_dict(manifest["quant_report"])
        return m
    return Model(graph, registry, params=params, source=manifest.get("source", ""), check=False)


__all__ = ["graph_from_json", "graph_to_json", "is_saved_dir", "load_saved", "save"]
