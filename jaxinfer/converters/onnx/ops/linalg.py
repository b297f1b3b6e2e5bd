"""Matrix products and linear algebra (ai.onnx): MatMul, MatMulInteger, Gemm, Einsum, Det.

Float products run at ``PRECISION`` (full float32, as ONNX defines them; XLA's default
would let GPUs use TF32). MatMul, Gemm and Einsum go through :mod:`jaxinfer.arith`, which
dispatches on the weight's type (plain, bf16, int8 QArray, w8a8): quantization swaps the
arithmetic, not the op.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from .... import arith
from ....intmath import zero_point, zp_matmul
from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)

PRECISION = arith.PRECISION


@op("MatMul", (1, 9, 13))
def matmul(a, b):
    """https://onnx.ai/onnx/operators/onnx__MatMul.html (numpy matmul semantics)."""
    return arith.matmul(a, b)


@op("MatMulInteger", (10,))
def matmul_integer(a, b, a_zero_point=None, b_zero_point=None):
    """https://onnx.ai/onnx/operators/onnx__MatMulInteger.html: (A - a_zp) @ (B - b_zp) in int32."""
    a, b = jnp.asarray(a), jnp.asarray(b)
    # A's zero point is per row ([..., M] -> [..., M, 1]); B's per column broadcasts as it is.
    return zp_matmul(a, zero_point(a_zero_point, np.shape(a_zero_point) + (1,)), b, zero_point(b_zero_point))


@op("Gemm", (1, 6, 7, 9, 11, 13))
def gemm(a, b, c=None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0,
         broadcast: int = 0):
    """https://onnx.ai/onnx/operators/onnx__Gemm.html: alpha*A'B' + beta*C (C broadcast to the result)."""
    a = a.T if transA else a
    # B is usually the weight: contract its axis 1 when transposed instead of transposing it
    # (a quantized B keeps its layout and its per-output-channel scales).
    y = arith.dot_general(a, b, (((1,), (1,)), ((), ()))) if transB else arith.matmul(a, b)
    if alpha != 1.0:
        y = y * jnp.asarray(alpha, y.dtype)
    if c is not None:
        c = jnp.asarray(c)
        y = y + (c if beta == 1.0 else c * jnp.asarray(beta, c.dtype))
    return y


@op("Einsum", (12, 28))
def einsum(*inputs, equation: str):
    """https://onnx.ai/onnx/operators/onnx__Einsum.html (spaces in the equation are ignored)."""
    eq = (equation.decode() if isinstance(equation, bytes) else equation).replace(" ", "")
    return arith.einsum(eq, *inputs)


@op("Det", (11, 22))
def det(x):
    """https://onnx.ai/onnx/operators/onnx__Det.html: determinant over the last two axes."""
    return jnp.linalg.det(x)
