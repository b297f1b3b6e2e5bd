"""``quantize(model, method, ...)``: a new Model whose params select int8 / bf16 arithmetic."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax.numpy as jnp

from .. import arith
from ..checks import is_real
from ..model import Model
from . import calibrate as cal
from . import precision
from .layers import Layer, exclude_patterns, find_layers, keeps_model_state, require_model, warn_unmatched
from .report import QuantReport, compare, end_to_end

METHODS = ("bf16", "fp16", "mixed", "int8-weight", "int8-dynamic", "int8-static", "auto")
ALIASES = {
    "dynamic_int8": "int8-dynamic", "int8_dynamic": "int8-dynamic", "w8a8": "int8-dynamic",
    "static_int8": "int8-static", "int8_static": "int8-static",
    "weight_int8": "int8-weight", "int8_weight": "int8-weight", "int8-weight-only": "int8-weight",
    # the seed's "dynamic_fp16": fp16 weights and activations, f32 for the sensitive ops.
    "dynamic_fp16": "fp16", "float16": "fp16", "half": "fp16", "bfloat16": "bf16",
}


def canonical(method: str) -> str:
    """The method name behind ``method`` (an alias or a name); TypeError/ValueError naming it otherwise."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a string, one of {list(METHODS)}; got {type(method).__name__} {method!r}")
    m = ALIASES.get(method, method)
    if m not in METHODS:
        raise ValueError(f"unknown quantization method '{method}'; choose one of {list(METHODS)} "
                         f"(aliases: {sorted(ALIASES)})")
    return m


class QuantizedModel(Model):
    """A :class:`Model` with quantized params and the record of how they were made.

    ``report()`` gives per-layer method, bytes before/after and (when calibration data was
    given) the output error against the float model.
    """

    quant_report: QuantReport

    def report(self) -> QuantReport:
        return self.quant_report


def _int8(w: Any, axes: Sequence[int], granularity: str) -> arith.QArray:
    """qwix's int8 array of ``w``, its per-channel (or per-tensor) scales searched for the least squared
    error (:func:`~jaxinfer.quant.calibrate.weight_int8`)."""
    return cal.weight_int8(w, tuple(axes) if granularity == "per_channel" else ())


def _store_transposed(layer: Layer, w: Any) -> bool:
    """A ``[K, N]`` MatMul/Gemm weight is stored ``[N, K]`` for w8a8, an ungrouped 2-D convolution's HWIO
    filter OHWI (see :class:`~jaxinfer.arith.W8A8`)."""
    if layer.op_type == "Conv":
        return jnp.ndim(w) == 4 and layer.groups == 1 and tuple(layer.channel_axes) == (3,)
    return layer.op_type in ("MatMul", "Gemm") and jnp.ndim(w) == 2 and tuple(layer.channel_axes) == (1,)


def layer_param(layer: Layer, w: Any, how: str, granularity: str = "per_channel",
                act_scale: float | None = None, act_unsigned: bool = False) -> Any:
    """The param a layer's weight becomes under ``how`` (``act_unsigned``: int8-static's activation is
    non-negative, see :attr:`~jaxinfer.arith.W8A8.act_unsigned`)."""
    if how == "int8-weight":
        return _int8(w, layer.channel_axes, granularity)
    if how in ("int8-dynamic", "int8-static"):
        scale = None if how == "int8-dynamic" else jnp.asarray(act_scale, jnp.float32)
        unsigned = scale is not None and act_unsigned
        if _store_transposed(layer, w):
            return arith.W8A8(_int8(jnp.moveaxis(jnp.asarray(w), -1, 0), (0,), granularity), scale, transposed=True,
                              act_unsigned=unsigned)
        return arith.W8A8(_int8(w, layer.channel_axes, granularity), scale, act_unsigned=unsigned)
    if how in ("bf16", "fp16"):
        return jnp.asarray(w).astype(precision.low_dtype(how))
    if how == "f32":
        return w
    raise ValueError(how)


def _strip(graph: Any, names: Iterable[str]) -> Any:
    """The graph without the float copies of weights now held quantized in params."""
    drop = set(names)
    return graph.replace(initializers={k: v for k, v in graph.initializers.items() if k not in drop})


def build(model: Model, graph: Any, params: Mapping[str, Any], report: QuantReport) -> QuantizedModel:
    q = QuantizedModel(graph, model.registry, params=params, source=model.source, check=False).compiled_like(model)
    q.quant_report = report
    return q


@keeps_model_state
def quantize(model: Model, method: str, *, exclude: Sequence[str] = (), calibration: Any = None,
             budget: Mapping[str, float] | None = None, granularity: str = "per_channel",
             observer: str = "minmax", percentile: float = 99.99, measure: bool = True) -> QuantizedModel:
    """A new, quantized Model; ``model`` is left as it was.

    Args:
      model: a loaded :class:`Model`.
      method: ``bf16``, ``fp16``, ``mixed``, ``int8-weight``, ``int8-dynamic``,
        ``int8-static``, ``auto`` (or an alias: ``dynamic_int8``, ``static_int8``,
        ``dynamic_fp16``).
      exclude: globs over node names, ``"op:Type"`` and initializer names; one matching nothing
        in this model is warned about (:class:`~jaxinfer.errors.UnmatchedExcludeWarning`).
      calibration: an iterable of input dicts: required by ``int8-static`` and ``auto``;
        when given, ``report()`` also measures each layer's error against float.
      budget: for ``auto``: ``{"cosine": 0.999}`` or ``{"top1_agreement": 0.99}``.
      granularity: ``per_channel`` (per output channel) or ``per_tensor`` weight scales.
      observer: for ``int8-static``: ``minmax``, ``percentile`` or ``mse``.
      measure: when False, calibration only sets scales and the report holds bytes but no
        errors (measuring compiles a probe of every layer: minutes for a large CNN on CPU).

    Example:
      >>> q = jaxinfer.quantize(m, "int8-dynamic", exclude=["lm_head*"])   # doctest: +SKIP
      >>> print(q.report())                                                # doctest: +SKIP
    """
    method = canonical(method)
    if granularity not in ("per_channel", "per_tensor"):
        raise ValueError(f"granularity must be 'per_channel' or 'per_tensor', got '{granularity}'")
    _check_model(model)
    exclude = exclude_patterns(exclude)
    _check_budget(budget)
    _check_observer(observer, percentile)
    warn_unmatched(exclude, model.graph, model.params)
    data = cal.batches(calibration)
    shown = data if measure else []
    layers, skipped = find_layers(model.graph, model.params, model.registry, exclude)
    if method == "auto":
        from .auto import auto

        return auto(model, layers, skipped, data, budget, granularity)
    if method == "int8-static" and not data:
        raise ValueError("int8-static needs calibration: an iterable of input dicts (e.g. 8-32 typical batches)")
    params = dict(model.params)
    graph = model.graph
    how: dict[str, str] = {}
    if method in ("bf16", "fp16", "mixed"):
        kind = "fp16" if method == "fp16" else "bf16"
        mode = "mixed" if method == "mixed" else "full"
        skip_nodes = [n.name for n, _ in model.graph.walk() if exclude and _excluded(n, exclude)]
        graph = precision.rewrite(model.graph, model.registry, kind, mode, skip_nodes)
        if mode == "full":
            params = precision.cast_params(params, kind)
        else:
            prod_params = {i for n in model.graph.nodes
                           if (n.op_type in precision.PRODUCTS or precision.is_product(n)) and n.name not in skip_nodes
                           for i in n.inputs if i in params}
            params = precision.cast_params(params, kind, prod_params)
        for layer in layers:
            how[layer.weight] = kind
        q = build(model, graph, params, QuantReport(method, []))
        q.quant_report = _report(model, q, method, layers, skipped, how, shown)
        return q
    scales: dict[str, float] = {}
    positive: set[str] = set()
    if method == "int8-static":
        acts = {layer.weight: layer_input(model, layer) for layer in layers}
        readers: dict[str, list[str]] = {}
        for layer in layers:
            readers.setdefault(acts[layer.weight], []).append(layer.node)
        obs = cal.observe(model, list(readers), data, readers=readers)
        unsigned = cal.nonnegative(obs)
        per_value = cal.act_scales(obs, observer, percentile, readers, unsigned)
        scales = {w: per_value[a] for w, a in acts.items()}
        positive = {w for w, a in acts.items() if a in unsigned}
    for layer in layers:
        params[layer.weight] = layer_param(layer, model.params[layer.weight], method, granularity,
                                           scales.get(layer.weight), layer.weight in positive)
        how[layer.weight] = method
    graph = _strip(graph, how)
    q = build(model, graph, params, QuantReport(method, []))
    q.quant_report = _report(model, q, method, layers, skipped, how, shown, observer if method == "int8-static" else None)
    return q


def _check_model(model: Any) -> None:
    """TypeError for what is not a Model; ValueError for a model quantized already (its weights are int8)."""
    require_model(model, "quantize")
    done = sorted({arith.kind(v) for v in model.params.values() if arith.is_quantized(v)})
    if done:
        raise ValueError(f"this model is quantized already ({', '.join(done)} weights); quantize the float model "
                         "it came from instead")


def _check_observer(observer: Any, percentile: Any) -> None:
    """ValueError for an unknown ``observer`` or a ``percentile`` outside (0, 100], before any calibration run."""
    if observer not in cal.OBSERVERS:
        raise ValueError(f"unknown observer {observer!r}; choose one of {list(cal.OBSERVERS)}")
    if not is_real(percentile) or not 0 < percentile <= 100:
        raise ValueError(f"percentile must be a number in (0, 100] (e.g. 99.99), got {percentile!r}")


def _check_budget(budget: Any) -> None:
    """ValueError unless ``budget`` is None or maps metric names to numbers in (0, 1]."""
    if budget is None:
        return
    if not isinstance(budget, Mapping):
        raise TypeError(f"budget must be a dict like {{'cosine': 0.999}}, got {type(budget).__name__}")
    for key, value in budget.items():
        if not is_real(value) or not 0 < value <= 1:
            raise ValueError(f"budget {key!r} must be a number in (0, 1], got {value!r}")


def layer_input(model: Model, layer: Layer) -> str:
    node = next(n for n in model.graph.nodes if n.name == layer.node)
    return node.inputs[layer.activation_slots[0]] if layer.activation_slots else node.inputs[0]


def _excluded(node: Any, patterns: Sequence[str]) -> bool:
    from .layers import matches

    return matches(patterns, node, "")


def _report(model: Model, q: Model, method: str, layers: list[Layer], skipped: list[tuple[str, str]],
            how: Mapping[str, str], data: Sequence[Mapping[str, Any]], observer: str | None = None,
            extra: Mapping[str, Any] | None = None) -> QuantReport:
    rows = []
    errors = compare(model, q, [layer.output for layer in layers], data) if data else {}
    for layer in layers:
        before = arith.nbytes(model.params[layer.weight])
        after = arith.nbytes(q.params[layer.weight])
        row = {"layer": layer.node, "op": layer.op_type, "weight": layer.weight,
               "method": how.get(layer.weight, "f32"), "bytes_before": before, "bytes_after": after,
               "ratio": round(before / after, 3) if after else None}
        row.update(errors.get(layer.output, {}))
        rows.append(row)
    totals = {
        "params_bytes_f32": sum(arith.nbytes(v) for v in model.params.values()),
        "params_bytes": sum(arith.nbytes(v) for v in q.params.values()),
        "quantized_layers": sum(1 for r in rows if r["method"] not in ("f32",)),
        "skipped": [{"layer": n, "why": why} for n, why in skipped],
    }
    qb = sum(r["bytes_before"] for r in rows if r["method"] != "f32")
    qa = sum(r["bytes_after"] for r in rows if r["method"] != "f32")
    totals["quantized_weights_bytes_before"] = qb
    totals["quantized_weights_bytes_after"] = qa
    totals["quantized_weights_ratio"] = round(qb / qa, 3) if qa else None
    if data:
        totals.update(end_to_end(model, q, data))
    if observer:
        totals["observer"] = observer
    if extra:
        totals.update(extra)
    return QuantReport(method, rows, totals)
