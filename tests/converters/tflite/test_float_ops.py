"""Float TFLite builtins, one small model each, compared with LiteRT on random inputs."""

from __future__ import annotations

import numpy as np
import pytest

from .builder import ModelBuilder
from .harness import compare

RNG = np.random.default_rng(0)


class In:
    """A runtime input of the single-op model."""

    def __init__(self, shape, dtype=np.float32, low=-2.0, high=2.0):
        self.shape, self.dtype, self.low, self.high = tuple(shape), np.dtype(dtype), low, high

    def sample(self) -> np.ndarray:
        if self.dtype == np.bool_:
            return RNG.random(self.shape) > 0.5
        if self.dtype.kind in "iu":
            return RNG.integers(int(self.low), int(self.high), self.shape).astype(self.dtype)
        return RNG.uniform(self.low, self.high, self.shape).astype(self.dtype)


def one_op(op: str, ins, outs, options: str | None = None, **fields):
    """A model of one op: ``ins`` are In (runtime), arrays (constants) or None (omitted); ``outs`` (shape, dtype)."""
    b = ModelBuilder()
    idx, feeds = [], {}
    for k, spec in enumerate(ins):
        if spec is None:
            idx.append(-1)
        elif isinstance(spec, In):
            idx.append(b.input(f"in{k}", spec.shape, spec.dtype))
            feeds[f"in{k}"] = spec.sample()
        else:
            idx.append(b.const(f"c{k}", np.asarray(spec)))
    out_idx = [b.tensor(f"out{k}", shape, dtype) for k, (shape, dtype) in enumerate(outs)]
    b.op(op, idx, out_idx, options, **fields)
    b.outputs(*out_idx)
    return b.finish(), feeds


F = np.float32
X4 = In((1, 6, 6, 3))
CASES = {
    "add_relu": (("ADD", [In((2, 3)), In((1, 3))], [((2, 3), F)], "AddOptions"), {"fused_activation_function": 1}),
    "sub_bcast": (("SUB", [In((2, 3)), In((3,))], [((2, 3), F)], "SubOptions"), {}),
    "mul_relu6": (("MUL", [In((2, 3), low=-5, high=5), In((2, 3))], [((2, 3), F)], "MulOptions"),
                  {"fused_activation_function": 3}),
    "div": (("DIV", [In((2, 3)), In((2, 3), low=0.5, high=2)], [((2, 3), F)], "DivOptions"), {}),
    "squared_difference": (("SQUARED_DIFFERENCE", [In((2, 3)), In((2, 3))], [((2, 3), F)]), {}),
    "pow": (("POW", [In((2, 3), low=0.5, high=2), In((2, 3))], [((2, 3), F)]), {}),
    "maximum": (("MAXIMUM", [In((2, 3)), In((2, 3))], [((2, 3), F)]), {}),
    "minimum": (("MINIMUM", [In((2, 3)), In((2, 3))], [((2, 3), F)]), {}),
    "floor_div": (("FLOOR_DIV", [In((2, 3)), In((2, 3), low=0.5, high=2)], [((2, 3), F)]), {}),
    "floor_mod": (("FLOOR_MOD", [In((2, 3)), In((2, 3), low=0.5, high=2)], [((2, 3), F)]), {}),
    **{u.lower(): ((u, [In((2, 5), low=lo, high=hi)], [((2, 5), F)]), {}) for u, lo, hi in [
        ("ABS", -2, 2), ("NEG", -2, 2), ("SQRT", 0.1, 4), ("RSQRT", 0.1, 4), ("EXP", -2, 2), ("LOG", 0.1, 4),
        ("SIN", -3, 3), ("COS", -3, 3), ("SQUARE", -2, 2), ("CEIL", -2, 2), ("FLOOR", -2, 2), ("ROUND", -2, 2),
        ("SIGN", -2, 2), ("RELU", -2, 2), ("RELU6", -8, 8), ("RELU_N1_TO_1", -2, 2), ("RELU_0_TO_1", -2, 2),
        ("ELU", -2, 2), ("HARD_SWISH", -5, 5), ("LOGISTIC", -5, 5), ("TANH", -3, 3), ("LOG_SOFTMAX", -3, 3)]},
    "leaky_relu": (("LEAKY_RELU", [In((2, 5))], [((2, 5), F)], "LeakyReluOptions"), {"alpha": 0.3}),
    "prelu": (("PRELU", [In((2, 5)), RNG.uniform(0, 1, (5,)).astype(F)], [((2, 5), F)]), {}),
    "gelu": (("GELU", [In((2, 5))], [((2, 5), F)], "GeluOptions"), {"approximate": False}),
    "gelu_tanh": (("GELU", [In((2, 5))], [((2, 5), F)], "GeluOptions"), {"approximate": True}),
    "softmax": (("SOFTMAX", [In((2, 7))], [((2, 7), F)], "SoftmaxOptions"), {"beta": 0.7}),
    "conv_same_relu": (("CONV_2D", [X4, RNG.standard_normal((4, 3, 3, 3)).astype(F), RNG.standard_normal(4).astype(F)],
                        [((1, 6, 6, 4), F)], "Conv2DOptions"),
                       {"padding": 0, "stride_w": 1, "stride_h": 1, "fused_activation_function": 1}),
    "conv_valid_stride_dil": (("CONV_2D", [In((1, 9, 9, 3)), RNG.standard_normal((2, 3, 3, 3)).astype(F),
                                                 np.zeros(2, F)], [((1, 3, 3, 2), F)], "Conv2DOptions"),
                              {"padding": 1, "stride_w": 2, "stride_h": 2, "dilation_w_factor": 2,
                               "dilation_h_factor": 2}),
    "depthwise": (("DEPTHWISE_CONV_2D", [X4, RNG.standard_normal((1, 3, 3, 6)).astype(F),
                                         RNG.standard_normal(6).astype(F)], [((1, 3, 3, 6), F)],
                   "DepthwiseConv2DOptions"),
                  {"padding": 0, "stride_w": 2, "stride_h": 2, "depth_multiplier": 2}),
    "transpose_conv": (("TRANSPOSE_CONV", [np.array([1, 12, 12, 2], np.int32),
                                           RNG.standard_normal((2, 3, 3, 3)).astype(F), X4],
                        [((1, 12, 12, 2), F)], "TransposeConvOptions"),
                       {"padding": 0, "stride_w": 2, "stride_h": 2}),
    "transpose_conv_valid": (("TRANSPOSE_CONV", [np.array([1, 13, 13, 2], np.int32),
                                                 RNG.standard_normal((2, 3, 3, 3)).astype(F), X4],
                              [((1, 13, 13, 2), F)], "TransposeConvOptions"),
                             {"padding": 1, "stride_w": 2, "stride_h": 2}),
    "conv_3d": (("CONV_3D", [In((1, 4, 5, 5, 2)), RNG.standard_normal((2, 3, 3, 2, 3)).astype(F), None],
                 [((1, 4, 5, 5, 3), F)], "Conv3DOptions"),
                {"padding": 0, "stride_d": 1, "stride_h": 1, "stride_w": 1, "dilation_d_factor": 1,
                 "dilation_h_factor": 1, "dilation_w_factor": 1}),
    "fully_connected": (("FULLY_CONNECTED", [In((2, 3, 8)), RNG.standard_normal((5, 8)).astype(F),
                                             RNG.standard_normal(5).astype(F)], [((6, 5), F)],
                         "FullyConnectedOptions"), {"fused_activation_function": 1}),
    "fully_connected_keep_dims": (("FULLY_CONNECTED", [In((2, 3, 8)), RNG.standard_normal((5, 8)).astype(F), None],
                                   [((2, 3, 5), F)], "FullyConnectedOptions"), {"keep_num_dims": True}),
    "batch_matmul": (("BATCH_MATMUL", [In((2, 3, 4)), In((1, 5, 4))], [((2, 3, 5), F)], "BatchMatMulOptions"),
                     {"adj_y": True}),
    "max_pool": (("MAX_POOL_2D", [X4], [((1, 3, 3, 3), F)], "Pool2DOptions"),
                 {"padding": 0, "stride_w": 2, "stride_h": 2, "filter_width": 3, "filter_height": 3}),
    "avg_pool_same": (("AVERAGE_POOL_2D", [X4], [((1, 3, 3, 3), F)], "Pool2DOptions"),
                      {"padding": 0, "stride_w": 2, "stride_h": 2, "filter_width": 3, "filter_height": 3}),
    "avg_pool_valid": (("AVERAGE_POOL_2D", [X4], [((1, 2, 2, 3), F)], "Pool2DOptions"),
                       {"padding": 1, "stride_w": 2, "stride_h": 2, "filter_width": 3, "filter_height": 3}),
    "l2_pool": (("L2_POOL_2D", [X4], [((1, 3, 3, 3), F)], "Pool2DOptions"),
                {"padding": 0, "stride_w": 2, "stride_h": 2, "filter_width": 2, "filter_height": 2}),
    "mean": (("MEAN", [X4, np.array([1, 2], np.int32)], [((1, 1, 1, 3), F)], "ReducerOptions"), {"keep_dims": True}),
    "sum": (("SUM", [X4, np.array([2], np.int32)], [((1, 6, 3), F)], "ReducerOptions"), {}),
    "reduce_max": (("REDUCE_MAX", [X4, np.array([-1], np.int32)], [((1, 6, 6), F)], "ReducerOptions"), {}),
    "reduce_min": (("REDUCE_MIN", [X4, np.array([0, 1], np.int32)], [((6, 3), F)], "ReducerOptions"), {}),
    "reduce_prod": (("REDUCE_PROD", [In((2, 3), low=0.5, high=1.5), np.array([1], np.int32)], [((2,), F)],
                     "ReducerOptions"), {}),
    "reduce_any": (("REDUCE_ANY", [In((2, 3), np.bool_), np.array([1], np.int32)], [((2,), np.bool_)],
                    "ReducerOptions"), {}),
    "arg_max": (("ARG_MAX", [X4, np.array([3], np.int32)], [((1, 6, 6), np.int32)], "ArgMaxOptions"),
                {"output_type": 2}),
    "arg_min": (("ARG_MIN", [X4, np.array([1], np.int32)], [((1, 6, 3), np.int64)], "ArgMinOptions"),
                {"output_type": 4}),
    "reshape": (("RESHAPE", [X4, np.array([6, -1], np.int32)], [((6, 18), F)]), {}),
    "squeeze": (("SQUEEZE", [In((1, 3, 1, 2))], [((3, 2), F)], "SqueezeOptions"), {"squeeze_dims": [0, 2]}),
    "expand_dims": (("EXPAND_DIMS", [In((3, 2)), np.array(-1, np.int32)], [((3, 2, 1), F)]), {}),
    "transpose": (("TRANSPOSE", [X4, np.array([0, 3, 1, 2], np.int32)], [((1, 3, 6, 6), F)]), {}),
    "pack": (("PACK", [In((2, 3)), In((2, 3))], [((2, 2, 3), F)], "PackOptions"), {"values_count": 2, "axis": 1}),
    "unpack": (("UNPACK", [In((2, 3))], [((2,), F)] * 3, "UnpackOptions"), {"num": 3, "axis": 1}),
    "split": (("SPLIT", [np.array(1, np.int32), In((2, 6))], [((2, 2), F)] * 3, "SplitOptions"), {"num_splits": 3}),
    "split_v": (("SPLIT_V", [In((2, 6)), np.array([1, -1, 2], np.int32), np.array(1, np.int32)],
                 [((2, 1), F), ((2, 3), F), ((2, 2), F)], "SplitVOptions"), {"num_splits": 3}),
    "slice": (("SLICE", [X4, np.array([0, 1, 2, 0], np.int32), np.array([1, 3, -1, 2], np.int32)],
               [((1, 3, 4, 2), F)]), {}),
    "strided_slice": (("STRIDED_SLICE", [X4, np.array([0, 1, 5, 0], np.int32), np.array([1, 6, 0, 3], np.int32),
                                         np.array([1, 2, -2, 1], np.int32)], [((1, 3, 3, 3), F)],
                       "StridedSliceOptions"), {"begin_mask": 1, "end_mask": 9}),
    "strided_slice_shrink": (("STRIDED_SLICE", [X4, np.array([0, 2, 0], np.int32), np.array([1, 3, 6], np.int32),
                                                np.array([1, 1, 1], np.int32)], [((6, 3), F)],
                              "StridedSliceOptions"), {"shrink_axis_mask": 3, "end_mask": 4}),
    "strided_slice_ellipsis_newaxis": (("STRIDED_SLICE", [X4, np.array([0, 0, 1], np.int32),
                                                          np.array([0, 0, 2], np.int32),
                                                          np.array([1, 1, 1], np.int32)], [((1, 6, 6, 1, 1), F)],
                                        "StridedSliceOptions"), {"ellipsis_mask": 1, "new_axis_mask": 2}),
    "gather": (("GATHER", [In((5, 3)), np.array([[4, 0], [2, 2]], np.int32)], [((2, 2, 3), F)], "GatherOptions"),
               {"axis": 0}),
    "gather_axis1": (("GATHER", [In((5, 3)), np.array([2, 0], np.int32)], [((5, 2), F)], "GatherOptions"),
                     {"axis": 1}),
    "gather_nd": (("GATHER_ND", [In((4, 3, 2)), np.array([[1, 2], [3, 0]], np.int32)], [((2, 2), F)]), {}),
    "scatter_nd": (("SCATTER_ND", [np.array([[1], [3]], np.int32), In((2, 3)), np.array([5, 3], np.int32)],
                    [((5, 3), F)]), {}),
    "pad": (("PAD", [X4, np.array([[0, 0], [1, 2], [0, 1], [0, 0]], np.int32)], [((1, 9, 7, 3), F)]), {}),
    "padv2": (("PADV2", [X4, np.array([[0, 0], [1, 0], [0, 1], [0, 0]], np.int32), np.array([1.5], F)],
               [((1, 7, 7, 3), F)]), {}),
    "mirror_pad_reflect": (("MIRROR_PAD", [X4, np.array([[0, 0], [2, 1], [1, 2], [0, 0]], np.int32)],
                            [((1, 9, 9, 3), F)], "MirrorPadOptions"), {"mode": 0}),
    "mirror_pad_symmetric": (("MIRROR_PAD", [X4, np.array([[0, 0], [2, 1], [1, 2], [0, 0]], np.int32)],
                              [((1, 9, 9, 3), F)], "MirrorPadOptions"), {"mode": 1}),
    "tile": (("TILE", [In((2, 3)), np.array([2, 3], np.int32)], [((4, 9), F)]), {}),
    "broadcast_to": (("BROADCAST_TO", [In((1, 3)), np.array([4, 3], np.int32)], [((4, 3), F)]), {}),
    "shape": (("SHAPE", [X4], [((4,), np.int32)], "ShapeOptions"), {"out_type": 2}),
    "fill": (("FILL", [np.array([2, 3], np.int32), np.array(2.5, F)], [((2, 3), F)]), {}),
    "zeros_like": (("ZEROS_LIKE", [In((2, 3))], [((2, 3), F)]), {}),
    "range": (("RANGE", [np.array(1, np.int32), np.array(10, np.int32), np.array(3, np.int32)],
               [((3,), np.int32)]), {}),
    "cast": (("CAST", [In((2, 3), low=-5, high=5)], [((2, 3), np.int32)]), {}),
    "depth_to_space": (("DEPTH_TO_SPACE", [In((1, 2, 3, 8))], [((1, 4, 6, 2), F)], "DepthToSpaceOptions"),
                       {"block_size": 2}),
    "space_to_depth": (("SPACE_TO_DEPTH", [In((1, 4, 6, 2))], [((1, 2, 3, 8), F)], "SpaceToDepthOptions"),
                       {"block_size": 2}),
    "space_to_batch_nd": (("SPACE_TO_BATCH_ND", [In((1, 4, 5, 2)), np.array([2, 2], np.int32),
                                                 np.array([[0, 0], [0, 1]], np.int32)], [((4, 2, 3, 2), F)]), {}),
    "batch_to_space_nd": (("BATCH_TO_SPACE_ND", [In((4, 2, 3, 2)), np.array([2, 2], np.int32),
                                                 np.array([[0, 0], [0, 1]], np.int32)], [((1, 4, 5, 2), F)]), {}),
    "l2_normalization": (("L2_NORMALIZATION", [In((2, 5))], [((2, 5), F)], "L2NormOptions"), {}),
    "lrn": (("LOCAL_RESPONSE_NORMALIZATION", [In((1, 2, 2, 6))], [((1, 2, 2, 6), F)],
             "LocalResponseNormalizationOptions"), {"radius": 2, "bias": 1.0, "alpha": 0.5, "beta": 0.75}),
    "embedding_lookup": (("EMBEDDING_LOOKUP", [np.array([3, 0, 3], np.int32), In((5, 4))], [((3, 4), F)]), {}),
    "select": (("SELECT", [In((2, 3), np.bool_), In((2, 3)), In((2, 3))], [((2, 3), F)]), {}),
    "select_v2": (("SELECT_V2", [In((2, 1), np.bool_), In((2, 3)), In((1, 3))], [((2, 3), F)]), {}),
    "less": (("LESS", [In((2, 3)), In((2, 3))], [((2, 3), np.bool_)]), {}),
    "greater_equal": (("GREATER_EQUAL", [In((2, 3)), In((3,))], [((2, 3), np.bool_)]), {}),
    "equal_int": (("EQUAL", [In((2, 3), np.int32, 0, 3), In((2, 3), np.int32, 0, 3)], [((2, 3), np.bool_)]), {}),
    "not_equal": (("NOT_EQUAL", [In((2, 3), np.int32, 0, 3), In((2, 3), np.int32, 0, 3)], [((2, 3), np.bool_)]), {}),
    "greater": (("GREATER", [In((2, 3)), In((2, 3))], [((2, 3), np.bool_)]), {}),
    "less_equal": (("LESS_EQUAL", [In((2, 3)), In((2, 3))], [((2, 3), np.bool_)]), {}),
    "logical_and": (("LOGICAL_AND", [In((2, 3), np.bool_), In((2, 3), np.bool_)], [((2, 3), np.bool_)]), {}),
    "logical_or": (("LOGICAL_OR", [In((2, 3), np.bool_), In((2, 3), np.bool_)], [((2, 3), np.bool_)]), {}),
    "logical_not": (("LOGICAL_NOT", [In((2, 3), np.bool_)], [((2, 3), np.bool_)]), {}),
    "topk": (("TOPK_V2", [In((3, 6)), np.array(2, np.int32)], [((3, 2), F), ((3, 2), np.int32)]), {}),
    "cumsum": (("CUMSUM", [In((2, 4)), np.array(1, np.int32)], [((2, 4), F)], "CumsumOptions"),
               {"exclusive": True, "reverse": True}),
    "reverse_v2": (("REVERSE_V2", [X4, np.array([1, 2], np.int32)], [((1, 6, 6, 3), F)]), {}),
    "matrix_diag": (("MATRIX_DIAG", [In((2, 3))], [((2, 3, 3), F)]), {}),
    "one_hot": (("ONE_HOT", [np.array([0, 2, 1], np.int32), np.array(4, np.int32), np.array(1.0, F),
                             np.array(0.0, F)], [((3, 4), F)], "OneHotOptions"), {"axis": -1}),
    "resize_bilinear": (("RESIZE_BILINEAR", [X4, np.array([9, 11], np.int32)], [((1, 9, 11, 3), F)],
                         "ResizeBilinearOptions"), {}),
    "resize_bilinear_half_pixel": (("RESIZE_BILINEAR", [X4, np.array([9, 11], np.int32)], [((1, 9, 11, 3), F)],
                                    "ResizeBilinearOptions"), {"half_pixel_centers": True}),
    "resize_bilinear_align": (("RESIZE_BILINEAR", [X4, np.array([9, 11], np.int32)], [((1, 9, 11, 3), F)],
                               "ResizeBilinearOptions"), {"align_corners": True}),
    "resize_nearest": (("RESIZE_NEAREST_NEIGHBOR", [X4, np.array([9, 11], np.int32)], [((1, 9, 11, 3), F)],
                        "ResizeNearestNeighborOptions"), {}),
    "resize_nearest_half_pixel": (("RESIZE_NEAREST_NEIGHBOR", [X4, np.array([9, 11], np.int32)],
                                   [((1, 9, 11, 3), F)], "ResizeNearestNeighborOptions"),
                                  {"half_pixel_centers": True}),
    "resize_nearest_align": (("RESIZE_NEAREST_NEIGHBOR", [X4, np.array([9, 11], np.int32)], [((1, 9, 11, 3), F)],
                              "ResizeNearestNeighborOptions"), {"align_corners": True}),
    "concat_relu": (("CONCATENATION", [In((2, 3)), In((2, 2))], [((2, 5), F)], "ConcatenationOptions"),
                    {"axis": -1, "fused_activation_function": 1}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_float_op(case):
    (args, fields) = CASES[case]
    data, feeds = one_op(*args, **fields)
    compare(data, feeds)
