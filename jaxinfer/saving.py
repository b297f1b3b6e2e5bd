"""``save(model, dir)`` / ``load_saved(dir)``: the graph as JSON, the params with orbax.

A saved directory holds:

* ``jaxinfer.json``: format version, the Graph (pickle-free JSON: nodes, value infos,
  opsets, the constant initializers; arrays as dtype + shape + base64 bytes), how each
  param is built from its leaves (plain array, qwix ``QArray``, ``W8A8``), and the
  quantization report if the model has one.
* ``params/``: an orbax-checkpoint of the param leaves (int8 values, scales, bf16 ...),
  restored bit-identically, so a quantized or pruned model reloads without recalibration.
  The manifest records each leaf's shape and dtype (``"leaves"``); loading checks the
  restored leaves against it, so a ``params/`` that belongs to another model is refused.

Loading a damaged directory raises :class:`ModelLoadError` naming the directory, what is
missing or invalid, and what was expected (the original error is kept as context).
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
                "transposed": value.transposed, "act_unsigned": value.act_unsigned}
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
        return arith.W8A8(_qarray_from(spec["w"], leaves), a, bool(spec.get("transposed", False)),
                          bool(spec.get("act_unsigned", False)))
    if spec["kind"] == "qarray":
        return _qarray_from(spec, leaves)
    return leaves[spec["leaf"]]


def _spec_leaves(name: str, spec: Any) -> list[str]:
    """The leaf names param ``name``'s spec reads; ModelLoadError when the spec is malformed."""
    expected = ("expected {'kind': 'array', 'leaf': ...}, {'kind': 'qarray', 'qvalue': ..., 'scale': ...} "
                "or {'kind': 'w8a8', 'w': {...}}")
    if not isinstance(spec, Mapping):
        raise ModelLoadError(f"param '{name}' spec is {type(spec).__name__}; {expected}")
    kind = spec.get("kind")
    if kind == "array":
        keys: list[Any] = [spec.get("leaf")]
    elif kind == "qarray":
        keys = [spec.get("qvalue"), spec.get("scale")] + ([spec["zero_point"]] if spec.get("zero_point") else [])
    elif kind == "w8a8":
        keys = _spec_leaves(name, {"kind": "qarray", **spec["w"]}) if isinstance(spec.get("w"), Mapping) else [None]
        keys += [spec["act_scale"]] if spec.get("act_scale") else []
    else:
        raise ModelLoadError(f"param '{name}' spec has kind {kind!r}; {expected}")
    if not all(isinstance(k, str) for k in keys):
        raise ModelLoadError(f"param '{name}' spec {dict(spec)} lacks a leaf name; {expected}")
    return keys


def _leaf_record(value: Any) -> dict[str, Any]:
    """What the manifest records of one leaf: its shape and dtype."""
    arr = np.asarray(value)
    return {"shape": list(arr.shape), "dtype": _dtype_name(arr.dtype)}


def _check_leaves(specs: Mapping[str, Any], leaves: Mapping[str, np.ndarray],
                  recorded: Mapping[str, Any] | None) -> None:
    """Every leaf a param spec reads is restored, with the shape and dtype the manifest recorded.

    ``recorded`` is the manifest's ``"leaves"`` (absent in directories saved before it existed:
    then only presence is checked).
    """
    for name, spec in specs.items():
        for leaf in _spec_leaves(name, spec):
            if leaf not in leaves:
                raise ModelLoadError(f"param '{name}' needs leaf '{leaf}', which params/ lacks (it holds "
                                     f"{sorted(leaves)[:10]}); expected the params/ saved with this {MANIFEST}")
            if recorded is None:
                continue
            want = recorded.get(leaf)
            if not isinstance(want, Mapping) or "shape" not in want or "dtype" not in want:
                raise ModelLoadError(f"{MANIFEST} 'leaves' has no shape/dtype record for leaf '{leaf}' of param "
                                     f"'{name}'; expected {{'shape': [...], 'dtype': ...}}")
            got = leaves[leaf]
            if list(got.shape) != list(want["shape"]) or _dtype_name(got.dtype) != want["dtype"]:
                raise ModelLoadError(
                    f"param '{name}' (leaf '{leaf}'): params/ holds {_dtype_name(got.dtype)}{list(got.shape)}, but "
                    f"{MANIFEST} expects {want['dtype']}{list(want['shape'])}; params/ belongs to another model?")
    if recorded is not None and set(leaves) != set(recorded):
        extra = sorted(set(leaves) - set(recorded))
        missing = sorted(set(recorded) - set(leaves))
        raise ModelLoadError(f"params/ leaves {sorted(leaves)[:10]} differ from the {MANIFEST} record "
                             f"(extra {extra[:10]}, missing {missing[:10]}); params/ belongs to another model?")


# ------------------------------------------------------------------------- public
def _check_save_args(model: Any, path: Path) -> None:
    """TypeError/ValueError naming the argument when ``save``'s model or directory cannot be used."""
    if not isinstance(getattr(model, "graph", None), Graph) or not isinstance(getattr(model, "params", None), Mapping):
        raise TypeError(f"save(): model must be a jaxinfer Model (from jaxinfer.load or jaxinfer.quantize), "
                        f"got {type(model).__name__}")
    if path.exists() and not path.is_dir():
        raise ValueError(f"save(): directory {path} is an existing file; expected a directory (new or existing) "
                         f"to write {MANIFEST} and params/ into")


def save(model: Any, directory: str | os.PathLike[str]) -> Path:
    """Write ``model`` (graph + params, quantized or not) to ``directory``.

    Example:
      >>> jaxinfer.save(jaxinfer.quantize(m, "int8-dynamic"), "out/")   # doctest: +SKIP
      >>> q = jaxinfer.load("out/")                                     # doctest: +SKIP
    """
    import orbax.checkpoint as ocp

    path = Path(directory).resolve()
    _check_save_args(model, path)
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
        "leaves": {k: _leaf_record(v) for k, v in leaves.items()},
    }
    rep = getattr(model, "quant_report", None)
    if rep is not None:
        manifest["quant_report"] = rep.to_dict()
    ckpt = path / "params"
    host = {k: np.asarray(v) for k, v in leaves.items()}
    if host:  # orbax refuses an empty tree; a model without params has no params/ (load skips it)
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


def _why(e: BaseException) -> str:
    """An exception as ``Type: message`` (a KeyError says which key is missing)."""
    if isinstance(e, KeyError):
        return f"missing key {e}"
    return f"{type(e).__name__}: {e}"


def _read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of saved directory ``path``, checked to be an object with format, graph and params."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: cannot read {MANIFEST}: {e}") from e
    if not isinstance(manifest, dict):
        raise ModelLoadError(f"{path}: {MANIFEST} holds a JSON {type(manifest).__name__}; expected an object with "
                             "'format', 'graph' and 'params' as jaxinfer.save writes it")
    if manifest.get("format") != FORMAT:
        raise ModelLoadError(f"{path}: saved format {manifest.get('format')!r} is not {FORMAT!r}")
    for key in ("graph", "params"):
        if not isinstance(manifest.get(key), dict):
            found = "missing" if key not in manifest else f"a JSON {type(manifest[key]).__name__}"
            raise ModelLoadError(f"{path}: {MANIFEST} '{key}' is {found}; expected an object as jaxinfer.save "
                                 "writes it")
    if "leaves" in manifest and not isinstance(manifest["leaves"], dict):
        raise ModelLoadError(f"{path}: {MANIFEST} 'leaves' is a JSON {type(manifest['leaves']).__name__}; expected "
                             "an object {leaf: {'shape': [...], 'dtype': ...}}")
    return manifest


def _graph_of(path: Path, manifest: Mapping[str, Any]) -> tuple[Graph, Any]:
    """(graph, op registry) from the manifest's ``graph``; ModelLoadError naming ``path`` when malformed."""
    try:
        graph = graph_from_json(manifest["graph"])
        return graph, _registry(graph.fmt)
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {MANIFEST} 'graph': {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"{path}: {MANIFEST} 'graph' is malformed ({_why(e)}); expected the graph object "
                             "jaxinfer.save writes") from e


def _restore_leaves(path: Path) -> dict[str, np.ndarray]:
    """The param leaves in ``path/params`` (an orbax checkpoint); ModelLoadError when missing or corrupt."""
    import orbax.checkpoint as ocp

    ckpt = path / "params"
    if not ckpt.is_dir():
        raise ModelLoadError(f"{path}: params/ is missing; expected the orbax checkpoint of the params that "
                             f"jaxinfer.save writes next to {MANIFEST}")
    try:
        with ocp.StandardCheckpointer() as ckptr:
            leaves = ckptr.restore(ckpt)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: cannot restore params/ ({_why(e)}); expected the intact orbax checkpoint "
                             "jaxinfer.save writes") from e
    if not isinstance(leaves, Mapping):
        raise ModelLoadError(f"{path}: params/ holds a {type(leaves).__name__}; expected a dict of param leaves")
    return {str(k): np.asarray(v) for k, v in leaves.items()}


def load_saved(directory: str | os.PathLike[str]) -> Any:
    """The Model saved in ``directory`` (params restored bit-identically).

    Raises:
      ModelLoadError: the manifest or ``params/`` is missing, malformed, or does not match
        (a param whose restored shape/dtype differs from the recorded one).
    """
    from .model import Model

    path = Path(directory).resolve()
    manifest = _read_manifest(path)
    graph, registry = _graph_of(path, manifest)
    specs = manifest["params"]
    host = _restore_leaves(path) if specs else {}
    try:
        _check_leaves(specs, host, manifest.get("leaves"))
    except ModelLoadError as e:
        raise ModelLoadError(f"{path}: {e}") from e
    leaves = {k: jax.device_put(v) for k, v in host.items()}
    try:
        params = {name: _param_from(spec, leaves) for name, spec in specs.items()}
    except (KeyError, TypeError, ValueError) as e:  # e.g. a qarray spec without a valid 'qtype'
        raise ModelLoadError(f"{path}: {MANIFEST} 'params' has a malformed spec ({_why(e)}); expected the "
                             "param specs jaxinfer.save writes") from e
    if "quant_report" in manifest:
        from .quant.api import QuantizedModel
        from .quant.report import QuantReport

        m = QuantizedModel(graph, registry, params=params, source=manifest.get("source", ""), check=False)
        try:
            m.quant_report = QuantReport.from_dict(manifest["quant_report"])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ModelLoadError(f"{path}: {MANIFEST} 'quant_report' is malformed ({_why(e)}); expected the "
                                 "report jaxinfer.save writes") from e
        return m
    return Model(graph, registry, params=params, source=manifest.get("source", ""), check=False)


__all__ = ["graph_from_json", "graph_to_json", "is_saved_dir", "load_saved", "save"]
