"""Shape and indexing ops against onnxruntime, on one-node graphs the backend suite covers thinly."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import jaxinfer

ort = pytest.importorskip("onnxruntime")

RNG = np.random.default_rng(0)


def _model(op_type: str, inputs: dict[str, Any], consts: dict[str, Any], n_out: int, opset: int,
           **attrs: Any) -> onnx.ModelProto:
    """One node; ``inputs`` become graph inputs, ``consts`` initializers (names in node order)."""
    names = list(inputs) + list(consts)
    order = attrs.pop("_order", names)
    node = helper.make_node(op_type, order, [f"y{i}" for i in range(n_out)], **attrs)
    ins = [helper.make_tensor_value_info(k, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
           for k, v in inputs.items()]
    outs = [helper.make_value_info(f"y{i}", onnx.TypeProto()) for i in range(n_out)]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()]
    graph = helper.make_graph([node], op_type.lower(), ins, outs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def check(op_type: str, inputs: dict[str, Any], consts: dict[str, Any] | None = None, *, n_out: int = 1,
          opset: int = 18, exact: bool = True, **attrs: Any) -> list[np.ndarray]:
    """Run the node in jaxinfer and onnxruntime; outputs must match in dtype, shape and value."""
    model = _model(op_type, inputs, consts or {}, n_out, opset, **attrs)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    want = sess.run(None, inputs)
    got = jaxinfer.load(model).run(inputs)
    got = [got[f"y{i}"] for i in range(n_out)]
    for g, w in zip(got, want):
        g = np.asarray(g)
        assert g.dtype == w.dtype, (g.dtype, w.dtype)
        assert g.shape == w.shape, (g.shape, w.shape)
        if exact:
            np.testing.assert_array_equal(g, w)
        else:
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    return got


def f32(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def i64(*v: int) -> np.ndarray:
    return np.asarray(v, np.int64)


# --- Slice ---------------------------------------------------------------------------------------


def test_slice_attr_form_opset1():
    check("Slice", {"x": f32(4, 5, 6)}, opset=1, starts=[1, -4], ends=[100, -1], axes=[0, 2])


@pytest.mark.parametrize("starts,ends,axes,steps", [
    ((-1, 10), (-100, 0), (0, 1), (-1, -2)),
    ((5, 0), (-5, 4), (0, 2), (-2, 3)),
    ((100,), (200,), (1,), (1,)),
    ((0,), (9223372036854775807,), (-1,), (4,)),
    ((9223372036854775807,), (-9223372036854775807,), (0,), (-1,)),
    ((-100,), (-200,), (0,), (-1,)),
])
def test_slice_inputs(starts, ends, axes, steps):
    check("Slice", {"x": f32(6, 7, 8)}, {"s": i64(*starts), "e": i64(*ends), "a": i64(*axes), "p": i64(*steps)})


def test_slice_starts_as_runtime_input():
    check("Slice", {"x": f32(6, 7), "s": i64(1, -3)}, {"e": i64(5, 7)})


# --- Pad -----------------------------------------------------------------------------------------


def test_pad_attr_form_opset2():
    check("Pad", {"x": f32(3, 4)}, opset=2, pads=[1, 0, 2, 3], value=1.5)


@pytest.mark.parametrize("mode", ["constant", "reflect", "edge", "wrap"])
def test_pad_modes_with_axes(mode):
    check("Pad", {"x": f32(2, 5, 6)}, {"p": i64(2, 1, 3, 2), "c": np.asarray(0.0, np.float32), "a": i64(-1, 1)},
          mode=mode)


def test_pad_negative_pads_crop():
    check("Pad", {"x": f32(5, 6)}, {"p": i64(-1, 2, 1, -3)}, opset=13)


def test_pad_runtime_constant_value_int():
    x = RNG.integers(-5, 5, (3, 3)).astype(np.int32)
    check("Pad", {"x": x, "c": np.asarray(7, np.int32)}, {"p": i64(1, 1, 1, 1)}, opset=13, _order=["x", "p", "c"])


# --- Split ---------------------------------------------------------------------------------------


def test_split_attr_opset11():
    check("Split", {"x": f32(7, 3)}, n_out=3, opset=11, axis=0, split=[2, 4, 1])


def test_split_equal_opset2():
    check("Split", {"x": f32(4, 6)}, n_out=3, opset=2, axis=-1)


def test_split_num_outputs_uneven_opset18():
    check("Split", {"x": f32(2, 11)}, n_out=4, opset=18, axis=1, num_outputs=4)


def test_split_input_opset13():
    check("Split", {"x": f32(5, 2)}, {"s": i64(0, 3, 2)}, n_out=3, opset=13)


# --- Tile / Expand / Range / EyeLike / Trilu / OneHot --------------------------------------------


def test_tile():
    check("Tile", {"x": f32(2, 3, 1)}, {"r": i64(2, 1, 3)})


def test_expand_lower_rank_shape():
    check("Expand", {"x": f32(3, 1, 4)}, {"s": i64(5, 1)})


@pytest.mark.parametrize("vals", [(np.int64, 10, -3, -4), (np.float64, 0.5, 2.25, 0.4), (np.int32, 3, 3, 1)])
def test_range(vals):
    dt, s, l, d = vals
    check("Range", {"s": np.asarray(s, dt), "l": np.asarray(l, dt), "d": np.asarray(d, dt)}, opset=11)


@pytest.mark.parametrize("k", [-2, 0, 3])
def test_eyelike(k):
    check("EyeLike", {"x": np.zeros((4, 6), np.int32)}, k=k, dtype=TensorProto.FLOAT)


@pytest.mark.parametrize("upper", [0, 1])
def test_trilu_runtime_k(upper):
    check("Trilu", {"x": f32(2, 4, 5), "k": np.asarray(-1, np.int64)}, opset=14, upper=upper)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_onehot(axis):
    idx = np.asarray([[0, -1, 3], [5, 2, -4]], np.int64)
    check("OneHot", {"i": idx, "v": np.asarray([-1.0, 2.0], np.float32)}, {"d": np.asarray(4.0, np.float32)},
          opset=11, axis=axis, _order=["i", "d", "v"])


# --- Gather / Scatter ----------------------------------------------------------------------------


def test_gather_negative_indices_axis1():
    check("Gather", {"x": f32(3, 5, 2), "i": np.asarray([[-1, 0], [2, -5]], np.int64)}, axis=1)


def test_gather_elements_negative():
    check("GatherElements", {"x": f32(3, 4), "i": np.asarray([[-1, 0, 2, 3]] * 3, np.int32)}, axis=1)


def test_gather_nd_batch_dims():
    x = f32(2, 3, 4, 5)
    i = RNG.integers(-3, 4, (2, 6, 2)).astype(np.int64)
    i[..., 0] = np.clip(i[..., 0], -3, 2)
    check("GatherND", {"x": x, "i": i}, opset=13, batch_dims=1)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_elements_reductions(reduction):
    i = np.asarray([[1, -1], [0, 2]], np.int64)
    check("ScatterElements", {"x": f32(2, 3), "i": i, "u": f32(2, 2)}, axis=1, reduction=reduction, exact=False)


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_nd_reductions(reduction):
    i = np.asarray([[0, 1], [2, -1]], np.int64)
    check("ScatterND", {"x": f32(3, 4, 2), "i": i, "u": f32(2, 2)}, reduction=reduction, exact=False)


@pytest.mark.parametrize("mode", ["linear", "circular"])
def test_tensor_scatter(mode):
    past = f32(2, 3, 6, 4)
    upd = f32(2, 3, 3, 4)
    w = np.asarray([1, 3] if mode == "linear" else [4, 5], np.int64)
    check("TensorScatter", {"p": past, "u": upd, "w": w}, opset=24, mode=mode, axis=2)


# --- Data-dependent shapes -----------------------------------------------------------------------


def test_compress_runtime_condition():
    check("Compress", {"x": f32(3, 4), "c": np.asarray([True, False, True], bool)}, axis=0)
    check("Compress", {"x": f32(3, 4), "c": np.asarray([0, 1, 0, 0, 1], bool)})


def test_nonzero_runtime():
    x = RNG.integers(0, 2, (3, 4)).astype(np.int32)
    check("NonZero", {"x": x})


@pytest.mark.parametrize("axis,sorted_", [(None, 0), (None, 1), (1, 0), (-2, 1)])
def test_unique_all_outputs(axis, sorted_):
    x = np.asarray([[3, 1, 3, 1], [2, 0, 2, 0], [3, 1, 3, 1]], np.float32)
    attrs = {"sorted": sorted_} if axis is None else {"sorted": sorted_, "axis": axis}
    check("Unique", {"x": x}, n_out=4, opset=11, **attrs)


@pytest.mark.parametrize("center", [0, 1])
def test_non_max_suppression(center):
    boxes = RNG.uniform(0, 10, (2, 12, 4)).astype(np.float32)
    scores = RNG.uniform(0, 1, (2, 3, 12)).astype(np.float32)
    check("NonMaxSuppression", {"b": boxes, "s": scores},
          {"m": i64(4), "iou": np.asarray([0.3], np.float32), "st": np.asarray([0.2], np.float32)},
          opset=11, center_point_box=center)


# --- TopK / ReverseSequence ----------------------------------------------------------------------


@pytest.mark.parametrize("largest", [0, 1])
def test_top_k_ints_axis0(largest):
    x = RNG.integers(0, 4, (6, 3)).astype(np.int64)
    check("TopK", {"x": x}, {"k": i64(3)}, n_out=2, opset=11, axis=0, largest=largest)


def test_top_k_v1_attr():
    check("TopK", {"x": f32(3, 5)}, n_out=2, opset=1, k=2)


def test_reverse_sequence_batch_axis0():
    x = f32(3, 5, 2)
    check("ReverseSequence", {"x": x, "l": np.asarray([5, 1, 3], np.int64)}, batch_axis=0, time_axis=1, opset=10)


# --- Common model patterns -----------------------------------------------------------------------


def test_gather_scalar_index_and_flatten_negative_axis():
    check("Gather", {"x": f32(4, 3)}, {"i": np.asarray(-2, np.int64)})
    check("Flatten", {"x": f32(2, 3, 4)}, opset=13, axis=-1)
    check("Flatten", {"x": f32(2, 3, 4)}, opset=13, axis=0)


def test_squeeze_unsqueeze_attr_forms():
    check("Unsqueeze", {"x": f32(3, 4)}, opset=11, axes=[-1, 0])
    check("Squeeze", {"x": f32(1, 3, 1)}, opset=11, axes=[-1])
    check("Squeeze", {"x": f32(1, 3, 1)}, opset=11)


def test_shape_driven_reshape_folds_under_jit():
    """Shape -> Gather -> Unsqueeze -> Concat -> Reshape: shape arithmetic folds, the graph jits once."""
    import jax

    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["b"], axis=0),
        helper.make_node("Unsqueeze", ["b", "zero1"], ["b1"]),
        helper.make_node("Concat", ["b1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y0"]),
    ]
    inits = [
        numpy_helper.from_array(np.asarray(0, np.int64), "zero"),
        numpy_helper.from_array(i64(0), "zero1"),
        numpy_helper.from_array(i64(-1), "minus1"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_value_info("y0", onnx.TypeProto())], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    m = jaxinfer.load(model)
    x = f32(2, 3, 4)
    y = jax.jit(m.fn)(m.params, {"x": x})["y0"]
    np.testing.assert_array_equal(np.asarray(y), x.reshape(2, -1))
