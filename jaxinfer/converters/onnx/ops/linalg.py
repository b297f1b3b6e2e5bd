"""Matrix products (ai.onnx): MatMul, Gemm, Einsum."""

from __future__ import annotations

import jax.numpy as jnp

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)


@op("MatMul", (1, 9, 13))
def matmul(a, b):
    """https://onnx.ai/onnx/operators/onnx__MatMul.html (numpy matmul semantics)."""
    return jnp.matmul(a, b)


@op("Gemm", (1, 6, 7, 9, 11, 13))
def gemm(a, b, c=None, *, alpha: float = 1.0, beta: float = 1.0, transA: int = 0, transB: int = 0, broadcast: int = 0):
    """https://onnx.ai/onnx/operators/onnx__Gemm.html: alpha*A'B' + beta*C."""
    a = a.T if transA else a
    b = b.T if transB else b
    y = jnp.matmul(a, b)
    if alpha != 1.0:
        y = y * jnp.asarray(alpha, y.dtype)
    if c is not None:
        y = y + (c if beta == 1.0 else c * jnp.asarray(beta, y.dtype))
    return y
