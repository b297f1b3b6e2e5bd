"""Classic ML ops (ai.onnx.ml domain).

LabelEncoder, ArrayFeatureExtractor, Binarizer, FeatureVectorizer, OneHotEncoder, Scaler,
Normalizer, Imputer,
LinearRegressor, LinearClassifier, TreeEnsemble (v5) and the legacy
TreeEnsembleRegressor / TreeEnsembleClassifier (v1, v3).

Numeric work runs in JAX and jits; string tensors (always concrete at trace
time) are handled with numpy on the host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS, domain="ai.onnx.ml")


def _is_strings(x: Any) -> bool:
    return isinstance(x, np.ndarray) and x.dtype == np.dtype(object)


def _as_text(v: Any) -> str:
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


# --------------------------------------------------------------------------- LabelEncoder


def _label_table(keys_floats, keys_int64s, keys_strings, keys_tensor,
                 values_floats, values_int64s, values_strings, values_tensor,
                 default_float, default_int64, default_string, default_tensor) -> tuple[np.ndarray, np.ndarray, Any]:
    """(keys, values, default) from whichever attributes the node sets."""
    key_opts = [np.asarray(keys_floats, np.float32) if keys_floats is not None else None,
                np.asarray(keys_int64s, np.int64) if keys_int64s is not None else None,
                np.asarray([_as_text(s) for s in keys_strings], object) if keys_strings is not None else None,
                np.asarray(keys_tensor).reshape(-1) if keys_tensor is not None else None]
    val_opts = [np.asarray(values_floats, np.float32) if values_floats is not None else None,
                np.asarray(values_int64s, np.int64) if values_int64s is not None else None,
                np.asarray([_as_text(s) for s in values_strings], object) if values_strings is not None else None,
                np.asarray(values_tensor).reshape(-1) if values_tensor is not None else None]
    keys = [k for k in key_opts if k is not None]
    values = [v for v in val_opts if v is not None]
    if len(keys) != 1 or len(values) != 1:
        raise ValueError(f"LabelEncoder wants exactly one keys_* and one values_* attribute, "
                         f"got {len(keys)} keys and {len(values)} values attributes")
    k, v = keys[0], values[0]
    if len(k) != len(v):
        raise ValueError(f"LabelEncoder keys ({len(k)}) and values ({len(v)}) differ in length")
    if default_tensor is not None:
        default = np.asarray(default_tensor).reshape(-1)[0]
    elif v.dtype == np.dtype(object):
        default = default_string
    elif np.issubdtype(v.dtype, np.floating):
        default = default_float
    else:
        default = default_int64
    return k, v, default


def _encode_host(x: np.ndarray, keys: np.ndarray, values: np.ndarray, default: Any) -> np.ndarray:
    """Dictionary lookup on the host (string keys or values); NaN keys match NaN."""
    is_text = keys.dtype == np.dtype(object)
    table: dict[Any, Any] = {}
    nan_value: Any = None
    for k, v in zip(keys.tolist(), values.tolist()):
        if not is_text and isinstance(k, float) and np.isnan(k):
            nan_value = v
        else:
            table[_as_text(k) if is_text else k] = v
    out = np.empty(x.shape, dtype=values.dtype)
    flat = out.reshape(-1)
    for i, item in enumerate(np.asarray(x).reshape(-1).tolist()):
        if is_text:
            flat[i] = table.get(_as_text(item), default)
        elif isinstance(item, float) and np.isnan(item):
            flat[i] = default if nan_value is None else nan_value
        else:
            flat[i] = table.get(item, default)
    return out


def _encode_numeric(x: Any, keys: np.ndarray, values: np.ndarray, default: Any) -> jax.Array:
    """Numeric keys -> numeric values in JAX: compare against every key, pick the match."""
    x = jnp.asarray(x)
    k = jnp.asarray(keys.astype(np.result_type(x.dtype, keys.dtype)))
    hit = x[..., None] == k
    if jnp.issubdtype(k.dtype, jnp.floating):
        hit = hit | (jnp.isnan(x)[..., None] & jnp.isnan(k))
    found = jnp.any(hit, axis=-1)
    picked = jnp.asarray(values)[jnp.argmax(hit, axis=-1)]
    return jnp.where(found, picked, jnp.asarray(default, values.dtype))


@op("LabelEncoder", (2, 4))
def label_encoder(x, *, keys_floats=None, keys_int64s=None, keys_strings=None, keys_tensor=None,
                  values_floats=None, values_int64s=None, values_strings=None, values_tensor=None,
                  default_float: float = -0.0, default_int64: int = -1, default_string: str = "_Unused",
                  default_tensor=None):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_LabelEncoder.html

    Numeric-to-numeric maps run in JAX; a map with string keys or values runs on
    the host and so needs a concrete input (string inputs always are).
    """
    keys, values, default = _label_table(keys_floats, keys_int64s, keys_strings, keys_tensor,
                                         values_floats, values_int64s, values_strings, values_tensor,
                                         default_float, default_int64, default_string, default_tensor)
    if keys.dtype == np.dtype(object) or values.dtype == np.dtype(object):
        if isinstance(x, jax.core.Tracer):
            raise ValueError("LabelEncoder with string keys or values needs its input at trace time "
                             "(a constant or a string input); it got a runtime numeric tensor")
        if keys.dtype == np.dtype(object) and not _is_strings(np.asarray(x)):
            raise ValueError(f"LabelEncoder has string keys but its input is {np.asarray(x).dtype}")
        return _encode_host(np.asarray(x), keys, values, default)
    return _encode_numeric(x, keys, values, default)


@op("LabelEncoder", 1)
def label_encoder_v1(x, *, classes_strings=(), default_int64: int = -1, default_string: str = "_Unused"):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_LabelEncoder.html (v1): string <-> class index."""
    classes = np.asarray([_as_text(s) for s in classes_strings], object)
    index = np.arange(len(classes), dtype=np.int64)
    if _is_strings(np.asarray(x)) and not isinstance(x, jax.core.Tracer):
        return _encode_host(np.asarray(x), classes, index, default_int64)
    if isinstance(x, jax.core.Tracer):
        raise ValueError("LabelEncoder-1 maps int64 to strings and needs its input at trace time")
    return _encode_host(np.asarray(x).astype(np.int64), index, classes, default_string)


# --------------------------------------------------------------------------- simple transforms


@op("ArrayFeatureExtractor", 1, static=(1,))
def array_feature_extractor(x, indices):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_ArrayFeatureExtractor.html: x[..., indices]."""
    if _is_strings(x):
        out = np.take(x, np.asarray(indices).reshape(-1), axis=-1)
        return out.reshape(1, -1) if x.ndim == 1 else out
    x = jnp.asarray(x)
    out = jnp.take(x, jnp.asarray(indices).reshape(-1).astype(jnp.int64), axis=-1, mode="clip")
    return out.reshape(1, -1) if x.ndim == 1 else out


@op("Binarizer", 1)
def binarizer(x, *, threshold: float = 0.0):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_Binarizer.html: 1 where x > threshold, else 0."""
    return jnp.where(x > threshold, jnp.ones_like(x), jnp.zeros_like(x))


@op("FeatureVectorizer", 1)
def feature_vectorizer(*inputs, inputdimensions: tuple[int, ...] = ()):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_FeatureVectorizer.html: rows concatenated as float,
    each input cut or zero-padded to its ``inputdimensions`` entry."""
    if len(inputdimensions) != len(inputs):
        raise ValueError(f"FeatureVectorizer has {len(inputs)} inputs but {len(inputdimensions)} inputdimensions")
    parts = []
    for x, width in zip(inputs, inputdimensions):
        x = _rows(x).astype(jnp.float32)
        x = x[:, :width] if x.shape[1] >= width else jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
        parts.append(x)
    return jnp.concatenate(parts, axis=1)


@op("OneHotEncoder", 1)
def one_hot_encoder(x, *, cats_int64s=None, cats_strings=None, zeros: int = 1):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_OneHotEncoder.html: float one-hot over the categories
    (a new last axis). ``zeros=0`` (fail on unknown values) needs a concrete input to check."""
    if (cats_int64s is None) == (cats_strings is None):
        raise ValueError("OneHotEncoder wants exactly one of cats_int64s and cats_strings")
    if cats_strings is not None:
        cats = [_as_text(c) for c in cats_strings]
        flat = [_as_text(v) for v in np.asarray(x).reshape(-1).tolist()]
        pos = {c: i for i, c in enumerate(cats)}
        code = np.asarray([pos.get(v, -1) for v in flat], np.int64).reshape(np.shape(x))
    else:
        cats_arr = jnp.asarray(np.asarray(cats_int64s, np.int64))
        hit = jnp.asarray(x).astype(jnp.int64)[..., None] == cats_arr
        code = jnp.where(jnp.any(hit, axis=-1), jnp.argmax(hit, axis=-1), -1)
        cats = list(cats_int64s)
    if not zeros:
        if isinstance(code, jax.core.Tracer):
            raise ValueError("OneHotEncoder with zeros=0 must fail on unknown values, which needs a concrete input")
        if np.any(np.asarray(code) < 0):
            raise ValueError("OneHotEncoder (zeros=0): the input holds a value that is not among the categories")
    return (jnp.asarray(code)[..., None] == jnp.arange(len(cats))).astype(jnp.float32)


@op("Scaler", 1)
def scaler(x, *, offset=(0.0,), scale=(1.0,)):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_Scaler.html: (x - offset) * scale, as float."""
    x = jnp.asarray(x).astype(jnp.float32)
    return ((x - jnp.asarray(offset, jnp.float32)) * jnp.asarray(scale, jnp.float32)).astype(jnp.float32)


@op("Normalizer", 1)
def normalizer(x, *, norm: str = "MAX"):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_Normalizer.html: each row divided by its MAX, L1 or L2 norm."""
    x = jnp.asarray(x).astype(jnp.float32)
    norm = _as_text(norm)
    if norm == "MAX":
        d = jnp.max(x, axis=-1, keepdims=True)
    elif norm == "L1":
        d = jnp.sum(jnp.abs(x), axis=-1, keepdims=True)
    elif norm == "L2":
        d = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    else:
        raise ValueError(f"Normalizer norm must be MAX, L1 or L2, got '{norm}'")
    return x / d


@op("Imputer", 1)
def imputer(x, *, imputed_value_floats=None, imputed_value_int64s=None, replaced_value_float: float = 0.0,
            replaced_value_int64: int = 0):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_Imputer.html: replace one value (NaN matches NaN) per feature."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        if imputed_value_floats is None:
            raise ValueError("Imputer on a float input wants imputed_value_floats")
        fill = jnp.asarray(imputed_value_floats, x.dtype)
        hit = jnp.isnan(x) if np.isnan(replaced_value_float) else x == replaced_value_float
    else:
        if imputed_value_int64s is None:
            raise ValueError(f"Imputer on a {x.dtype} input wants imputed_value_int64s")
        fill = jnp.asarray(imputed_value_int64s).astype(x.dtype)
        hit = x == replaced_value_int64
    if fill.size not in (1, x.shape[-1]):
        raise ValueError(f"Imputer has {fill.size} imputed values; want 1 or one per feature ({x.shape[-1]})")
    return jnp.where(hit, fill, x)


def _linear_scores(x: Any, coefficients, intercepts, n_rows: int, op_type: str) -> jax.Array:
    x = _rows(x).astype(jnp.float32)
    coef = np.asarray(coefficients, np.float32)
    if coef.size != n_rows * x.shape[1]:
        raise ValueError(f"{op_type}: {coef.size} coefficients for {n_rows} outputs x {x.shape[1]} features")
    y = x @ jnp.asarray(coef.reshape(n_rows, x.shape[1]).T)
    if intercepts is not None and len(intercepts):
        y = y + jnp.asarray(intercepts, jnp.float32)
    return y


@op("LinearRegressor", 1)
def linear_regressor(x, *, coefficients=None, intercepts=None, post_transform: str = "NONE", targets: int = 1):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_LinearRegressor.html: x @ coefficients.T + intercepts."""
    post = _POSTS.get(_as_text(post_transform))
    if post is None:
        raise ValueError(f"LinearRegressor post_transform must be one of {sorted(_POSTS)}, got '{post_transform}'")
    return _post_transform(_linear_scores(x, coefficients, intercepts, int(targets), "LinearRegressor"), post)


@op("LinearClassifier", 1)
def linear_classifier(x, *, coefficients, classlabels_ints=None, classlabels_strings=None, intercepts=None,
                      multi_class: int = 0, post_transform: str = "NONE"):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_LinearClassifier.html: (label, scores), one coefficient row per class.

    Integer labels jit; string labels need a concrete input (strings cannot leave XLA).
    """
    del multi_class  # scores are per class either way; it only names how they were trained
    labels = classlabels_ints if classlabels_ints is not None else classlabels_strings
    if labels is None:
        raise ValueError("LinearClassifier wants classlabels_ints or classlabels_strings")
    post = _POSTS.get(_as_text(post_transform))
    if post is None:
        raise ValueError(f"LinearClassifier post_transform must be one of {sorted(_POSTS)}, got '{post_transform}'")
    n_coef = np.asarray(coefficients).size
    n_features = _rows(x).shape[1]
    if n_coef != len(labels) * n_features:
        raise ValueError(f"LinearClassifier: {n_coef} coefficients for {len(labels)} classes x {n_features} features; "
                         "the binary one-row form is not supported")
    scores = _post_transform(_linear_scores(x, coefficients, intercepts, len(labels), "LinearClassifier"), post)
    best = jnp.argmax(scores, axis=-1)
    if classlabels_ints is not None:
        return jnp.asarray(np.asarray(classlabels_ints, np.int64))[best], scores
    if isinstance(best, jax.core.Tracer):
        raise ValueError("LinearClassifier with string labels needs its input at trace time (a constant)")
    names = np.asarray([_as_text(s) for s in classlabels_strings], object)
    return names[np.asarray(best)], scores


# --------------------------------------------------------------------------- tree ensembles

_LEQ, _LT, _GTE, _GT, _EQ, _NEQ, _MEMBER = range(7)
_LEAF = 7  # legacy TreeEnsembleRegressor/Classifier leaf nodes
_MODE_NAMES = {"BRANCH_LEQ": _LEQ, "BRANCH_LT": _LT, "BRANCH_GTE": _GTE, "BRANCH_GT": _GT,
               "BRANCH_EQ": _EQ, "BRANCH_NEQ": _NEQ, "LEAF": _LEAF}
_AVERAGE, _SUM, _MIN, _MAX = range(4)
_AGGREGATES = {"AVERAGE": _AVERAGE, "SUM": _SUM, "MIN": _MIN, "MAX": _MAX}
_POSTS = {"NONE": 0, "SOFTMAX": 1, "LOGISTIC": 2, "SOFTMAX_ZERO": 3, "PROBIT": 4}


def _member_sets(modes: np.ndarray, membership_values: np.ndarray | None) -> np.ndarray:
    """A [n_nodes, width] table of each BRANCH_MEMBER node's set, padded with NaN (which never matches)."""
    n_member = int(np.sum(modes == _MEMBER))
    if n_member == 0:
        return np.full((len(modes), 1), np.nan)
    if membership_values is None:
        raise ValueError("TreeEnsemble has BRANCH_MEMBER nodes but no membership_values")
    vals = np.asarray(membership_values, np.float64).reshape(-1)
    sets: list[list[float]] = [[]]
    for v in vals:
        if np.isnan(v):
            sets.append([])
        else:
            sets[-1].append(float(v))
    if sets and not sets[-1]:
        sets.pop()
    if len(sets) != n_member:
        raise ValueError(f"TreeEnsemble: membership_values holds {len(sets)} NaN-delimited sets, "
                         f"want one per BRANCH_MEMBER node ({n_member})")
    width = max(1, max(len(s) for s in sets))
    table = np.full((len(modes), width), np.nan)
    for node, members in zip(np.flatnonzero(modes == _MEMBER), sets):
        table[node, :len(members)] = members
    return table


def _tree_depth(roots: np.ndarray, true_ids: np.ndarray, true_leaf: np.ndarray,
                false_ids: np.ndarray, false_leaf: np.ndarray) -> int:
    """The most interior nodes on any root-to-leaf path (the number of traversal steps)."""
    depth = 0
    for root in roots:
        stack = [(int(root), 1)]
        while stack:
            node, d = stack.pop()
            if d > len(true_ids):
                raise ValueError("tree ensemble: the nodes_* attributes contain a cycle")
            depth = max(depth, d)
            if not true_leaf[node]:
                stack.append((int(true_ids[node]), d + 1))
            if not false_leaf[node]:
                stack.append((int(false_ids[node]), d + 1))
    return depth


def _walk(x: jax.Array, roots: np.ndarray, root_is_leaf: np.ndarray, feature: np.ndarray, modes: np.ndarray,
          splits: np.ndarray, sets: np.ndarray, true_ids: np.ndarray, true_leaf: np.ndarray,
          false_ids: np.ndarray, false_leaf: np.ndarray, tracks_true: np.ndarray) -> jax.Array:
    """Walk every tree for every row of x [N, F] in parallel for a fixed number of steps
    (the deepest path); returns the reached leaf index per row and tree, [N, trees]."""
    cmp_dtype = jnp.promote_types(x.dtype, splits.dtype)
    xc = x.astype(cmp_dtype)
    split_t, set_t = jnp.asarray(splits).astype(cmp_dtype), jnp.asarray(sets).astype(cmp_dtype)
    feature_t, mode_t, tracks_t = jnp.asarray(feature), jnp.asarray(modes), jnp.asarray(tracks_true)
    true_t, false_t = jnp.asarray(true_ids), jnp.asarray(false_ids)
    true_leaf_t, false_leaf_t = jnp.asarray(true_leaf), jnp.asarray(false_leaf)
    starts = np.where(root_is_leaf, 0, roots)
    steps = _tree_depth(starts[~root_is_leaf], true_ids, true_leaf, false_ids, false_leaf) if (~root_is_leaf).any() else 0
    node = jnp.broadcast_to(jnp.asarray(roots), (x.shape[0], len(roots)))
    at_leaf = jnp.broadcast_to(jnp.asarray(root_is_leaf), node.shape)
    for _ in range(steps):
        safe = jnp.where(at_leaf, 0, node)
        value = jnp.take_along_axis(xc, feature_t[safe], axis=1)
        split, mode = split_t[safe], mode_t[safe]
        member = jnp.any(value[..., None] == set_t[safe], axis=-1)
        cond = jnp.select(
            [mode == _LEQ, mode == _LT, mode == _GTE, mode == _GT, mode == _EQ, mode == _NEQ],
            [value <= split, value < split, value >= split, value > split, value == split, value != split],
            member)
        cond = jnp.where(jnp.isnan(value), tracks_t[safe], cond)
        nxt = jnp.where(cond, true_t[safe], false_t[safe])
        leaf = jnp.where(cond, true_leaf_t[safe], false_leaf_t[safe])
        node = jnp.where(at_leaf, node, nxt)
        at_leaf = at_leaf | leaf
    return node


def _aggregate(values: jax.Array, hit: jax.Array, kind: int, n_trees: int) -> jax.Array:
    """Combine per-tree contributions [N, trees, targets] (``hit`` marks real ones) per target.
    A target no tree reaches is 0 under MIN/MAX, as onnxruntime does."""
    if kind in (_SUM, _AVERAGE):
        y = jnp.sum(jnp.where(hit, values, 0), axis=1)
        return y / n_trees if kind == _AVERAGE else y
    if kind not in (_MIN, _MAX):
        raise ValueError(f"tree ensemble aggregate_function must be AVERAGE, SUM, MIN or MAX (0..3), got {kind}")
    pick = jnp.min if kind == _MIN else jnp.max
    fill = jnp.finfo(values.dtype).max if kind == _MIN else jnp.finfo(values.dtype).min
    return jnp.where(jnp.any(hit, axis=1), pick(jnp.where(hit, values, fill), axis=1), 0)


def _post_transform(y: jax.Array, kind: int) -> jax.Array:
    if kind == 0:
        return y
    if kind == 1:
        return jax.nn.softmax(y, axis=-1)
    if kind == 2:
        return jax.nn.sigmoid(y)
    if kind == 3:
        e = jnp.where(y == 0, 0.0, jnp.exp(y - jnp.max(y, axis=-1, keepdims=True)))
        total = jnp.sum(e, axis=-1, keepdims=True)
        return jnp.where(total > 0, e / jnp.where(total > 0, total, 1.0), 0.0).astype(y.dtype)
    if kind == 4:
        return (jnp.sqrt(2.0) * jax.scipy.special.erfinv(2.0 * y - 1.0)).astype(y.dtype)
    raise ValueError(f"post_transform must be 0..4 (NONE, SOFTMAX, LOGISTIC, SOFTMAX_ZERO, PROBIT), got {kind}")


def _rows(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x[None, :] if x.ndim == 1 else x.reshape(x.shape[0], -1)


@op("TreeEnsemble", 5)
def tree_ensemble(x, *, nodes_featureids, nodes_modes, nodes_splits, nodes_truenodeids, nodes_trueleafs,
                  nodes_falsenodeids, nodes_falseleafs, leaf_targetids, leaf_weights, tree_roots,
                  n_targets: int | None = None, aggregate_function: int = 1, post_transform: int = 0,
                  membership_values=None, nodes_missing_value_tracks_true=None, nodes_hitrates=None):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_TreeEnsemble.html

    All trees walk in parallel for a fixed number of steps (the deepest path),
    so the whole ensemble is a static-shaped gather/compare loop.
    """
    del nodes_hitrates  # a performance hint only
    modes = np.asarray(nodes_modes).reshape(-1).astype(np.int64)
    feature = np.asarray(nodes_featureids, np.int64)
    true_ids, false_ids = np.asarray(nodes_truenodeids, np.int64), np.asarray(nodes_falsenodeids, np.int64)
    true_leaf, false_leaf = np.asarray(nodes_trueleafs, bool), np.asarray(nodes_falseleafs, bool)
    roots = np.asarray(tree_roots, np.int64)
    targets = np.asarray(leaf_targetids, np.int64)
    weights = np.asarray(leaf_weights).reshape(-1)
    n = len(modes)
    if not all(len(a) == n for a in (feature, true_ids, false_ids, true_leaf, false_leaf)):
        raise ValueError("TreeEnsemble: the nodes_* attributes must all have the same length")
    if len(targets) != len(weights):
        raise ValueError(f"TreeEnsemble: leaf_targetids ({len(targets)}) and leaf_weights ({len(weights)}) differ in length")
    if np.any(modes > _MEMBER) or np.any(modes < 0):
        raise ValueError(f"TreeEnsemble: nodes_modes must be 0..6, got {sorted(set(modes.tolist()))}")
    n_out = int(n_targets) if n_targets is not None else int(targets.max(initial=-1)) + 1
    tracks_true = (np.zeros(n, bool) if nodes_missing_value_tracks_true is None
                   else np.asarray(nodes_missing_value_tracks_true, bool))
    x = _rows(x)
    leaf = _walk(x, roots, np.zeros(len(roots), bool), feature, modes, np.asarray(nodes_splits).reshape(-1),
                 _member_sets(modes, membership_values), true_ids, true_leaf, false_ids, false_leaf, tracks_true)
    w = jnp.asarray(weights).astype(x.dtype)[leaf][..., None]             # [N, trees, 1]
    hit = jnp.asarray(targets)[leaf][..., None] == jnp.arange(n_out)       # [N, trees, targets]
    y = _aggregate(jnp.broadcast_to(w, hit.shape), hit, int(aggregate_function), len(roots))
    return _post_transform(y.astype(x.dtype), int(post_transform))


def _legacy_trees(op_type: str, nodes_treeids, nodes_nodeids, nodes_modes, nodes_truenodeids, nodes_falsenodeids
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[tuple[int, int], int]]:
    """Legacy (tree id, node id) addressing -> flat node indices: modes, true/false child index, roots, root-is-leaf."""
    index = {(int(t), int(i)): k for k, (t, i) in enumerate(zip(nodes_treeids, nodes_nodeids))}
    try:
        modes = np.asarray([_MODE_NAMES[_as_text(m)] for m in nodes_modes], np.int64)
        true_ids = np.asarray([index[(int(t), int(c))] for t, c in zip(nodes_treeids, nodes_truenodeids)], np.int64)
        false_ids = np.asarray([index[(int(t), int(c))] for t, c in zip(nodes_treeids, nodes_falsenodeids)], np.int64)
    except KeyError as e:
        raise ValueError(f"{op_type}: unknown node mode or child node {e}; modes must be one of "
                         f"{sorted(_MODE_NAMES)} and children must name nodes of the same tree") from e
    is_leaf = modes == _LEAF
    # a leaf's children are never followed; point them at itself so shapes stay uniform
    true_ids = np.where(is_leaf, np.arange(len(modes)), true_ids)
    false_ids = np.where(is_leaf, np.arange(len(modes)), false_ids)
    trees = sorted({int(t) for t in nodes_treeids})
    roots = np.asarray([min((k for (t, _), k in index.items() if t == tree), key=lambda k: int(nodes_nodeids[k]))
                        for tree in trees], np.int64)
    return modes, true_ids, false_ids, roots, is_leaf, index


def _legacy_scores(op_type: str, x: Any, nodes_treeids, nodes_nodeids, nodes_featureids, nodes_modes,
                   nodes_truenodeids, nodes_falsenodeids, nodes_values, nodes_values_as_tensor,
                   nodes_missing_value_tracks_true, leaf_treeids, leaf_nodeids, leaf_ids, leaf_weights,
                   n_out: int, aggregate: int, base) -> jax.Array:
    """Raw aggregated scores [N, n_out] of a legacy TreeEnsembleRegressor/Classifier, base values added."""
    modes, true_ids, false_ids, roots, is_leaf, index = _legacy_trees(
        op_type, nodes_treeids, nodes_nodeids, nodes_modes, nodes_truenodeids, nodes_falsenodeids)
    splits = np.asarray(nodes_values_as_tensor if nodes_values_as_tensor is not None else
                        (nodes_values if nodes_values is not None else np.zeros(len(modes))), np.float64).reshape(-1)
    weights = np.asarray(leaf_weights, np.float64).reshape(-1)
    if len(weights) != len(leaf_ids):
        raise ValueError(f"{op_type}: {len(weights)} leaf weights for {len(leaf_ids)} target/class ids")
    table = np.zeros((len(modes), n_out))
    has = np.zeros((len(modes), n_out), bool)
    for t, nid, k, w in zip(leaf_treeids, leaf_nodeids, leaf_ids, weights):
        leaf = index.get((int(t), int(nid)))
        if leaf is None or not is_leaf[leaf]:
            raise ValueError(f"{op_type}: a leaf weight names tree {t} node {nid}, which is not a LEAF node")
        if not 0 <= int(k) < n_out:
            raise ValueError(f"{op_type}: leaf weight for output {k}, want 0..{n_out - 1}")
        table[leaf, int(k)] += w
        has[leaf, int(k)] = True
    tracks = (np.zeros(len(modes), bool) if nodes_missing_value_tracks_true is None
              else np.asarray(nodes_missing_value_tracks_true, bool))
    x = _rows(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    leaf = _walk(x, roots, is_leaf[roots], np.asarray(nodes_featureids, np.int64), modes, splits,
                 np.full((len(modes), 1), np.nan), true_ids, is_leaf[true_ids], false_ids, is_leaf[false_ids], tracks)
    y = _aggregate(jnp.asarray(table)[leaf], jnp.asarray(has)[leaf], aggregate, len(roots))
    if base is not None and len(np.asarray(base).reshape(-1)):
        y = y + jnp.asarray(np.asarray(base, np.float64).reshape(-1))
    return y


def _post_code(op_type: str, post_transform: str) -> int:
    post = _POSTS.get(_as_text(post_transform))
    if post is None:
        raise ValueError(f"{op_type}: post_transform must be one of {sorted(_POSTS)}, got '{post_transform}'")
    return post


@op("TreeEnsembleRegressor", (1, 3))
def tree_ensemble_regressor(x, *, nodes_treeids, nodes_nodeids, nodes_featureids, nodes_modes,
                            nodes_truenodeids, nodes_falsenodeids, target_treeids, target_nodeids, target_ids,
                            nodes_values=None, nodes_values_as_tensor=None, target_weights=None,
                            target_weights_as_tensor=None, n_targets: int = 1, aggregate_function: str = "SUM",
                            post_transform: str = "NONE", base_values=None, base_values_as_tensor=None,
                            nodes_missing_value_tracks_true=None, nodes_hitrates=None, nodes_hitrates_as_tensor=None):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_TreeEnsembleRegressor.html (float output)"""
    del nodes_hitrates, nodes_hitrates_as_tensor  # performance hints only
    op_type = "TreeEnsembleRegressor"
    agg = _AGGREGATES.get(_as_text(aggregate_function))
    if agg is None:
        raise ValueError(f"{op_type}: aggregate_function must be one of {sorted(_AGGREGATES)}, got '{aggregate_function}'")
    post = _post_code(op_type, post_transform)
    weights = target_weights_as_tensor if target_weights_as_tensor is not None else target_weights
    base = base_values_as_tensor if base_values_as_tensor is not None else base_values
    y = _legacy_scores(op_type, x, nodes_treeids, nodes_nodeids, nodes_featureids, nodes_modes, nodes_truenodeids,
                       nodes_falsenodeids, nodes_values, nodes_values_as_tensor, nodes_missing_value_tracks_true,
                       target_treeids, target_nodeids, target_ids, weights, int(n_targets), agg, base)
    return _post_transform(y.astype(jnp.float32), post)


@op("TreeEnsembleClassifier", (1, 3))
def tree_ensemble_classifier(x, *, nodes_treeids, nodes_nodeids, nodes_featureids, nodes_modes,
                             nodes_truenodeids, nodes_falsenodeids, class_treeids, class_nodeids, class_ids,
                             classlabels_int64s=None, classlabels_strings=None, nodes_values=None,
                             nodes_values_as_tensor=None, class_weights=None, class_weights_as_tensor=None,
                             post_transform: str = "NONE", base_values=None, base_values_as_tensor=None,
                             nodes_missing_value_tracks_true=None, nodes_hitrates=None, nodes_hitrates_as_tensor=None):
    """https://onnx.ai/onnx/operators/onnx_aionnxml_TreeEnsembleClassifier.html: (label, scores [N, classes]).

    Leaves must carry a weight column per class; the binary form whose leaves
    score only one class is refused. String labels need a concrete input.
    """
    del nodes_hitrates, nodes_hitrates_as_tensor  # performance hints only
    op_type = "TreeEnsembleClassifier"
    labels = classlabels_int64s if classlabels_int64s is not None else classlabels_strings
    if labels is None:
        raise ValueError(f"{op_type} wants classlabels_int64s or classlabels_strings")
    n_classes = len(labels)
    if n_classes == 2 and len({int(c) for c in class_ids}) < 2:
        raise ValueError(f"{op_type}: the binary form (leaves score one class of two) is not supported")
    post = _post_code(op_type, post_transform)
    weights = class_weights_as_tensor if class_weights_as_tensor is not None else class_weights
    base = base_values_as_tensor if base_values_as_tensor is not None else base_values
    raw = _legacy_scores(op_type, x, nodes_treeids, nodes_nodeids, nodes_featureids, nodes_modes, nodes_truenodeids,
                         nodes_falsenodeids, nodes_values, nodes_values_as_tensor, nodes_missing_value_tracks_true,
                         class_treeids, class_nodeids, class_ids, weights, n_classes, _SUM, base).astype(jnp.float32)
    best = jnp.argmax(raw, axis=-1)
    scores = _post_transform(raw, post)
    if classlabels_int64s is not None:
        return jnp.asarray(np.asarray(classlabels_int64s, np.int64))[best], scores
    if isinstance(best, jax.core.Tracer):
        raise ValueError(f"{op_type} with string labels needs its input at trace time (a constant)")
    names = np.asarray([_as_text(v) for v in classlabels_strings], object)
    return names[np.asarray(best)], scores
