"""Quantize/dequantize, control flow (WHILE/IF) and resource variables."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ....registry import OpDef, registrar
from .. import quant as Q
from ._util import QList

OPS: list[OpDef] = []
op = registrar(OPS, domain="tflite")


@op("QUANTIZE")
def quantize(x, *, out_dtype=None, in_q: QList = None, out_q: QList = None):
    """float -> int (round half away from zero), or int -> int requantization with a fixed-point multiplier."""
    qo = out_q[0]
    qi = in_q[0] if in_q else None
    if qi is None:
        return Q.quantize(x, qo)
    y = Q.multiply_by_quantized_multiplier(jnp.asarray(x, jnp.int64) - qi.zp,
                                           *Q.quantize_multiplier(float(qi.s) / float(qo.s))) + qo.zp
    return jnp.clip(y, qo.qmin, qo.qmax).astype(qo.dtype)


@op("DEQUANTIZE")
def dequantize(x, *, out_dtype=None, in_q: QList = None, out_q: QList = None):
    """int -> float32 ``scale * (x - zero_point)``; float16 -> float32."""
    qi = in_q[0] if in_q else None
    if qi is None:
        return jnp.asarray(x).astype(out_dtype or jnp.float32)
    return Q.dequantize(x, qi).astype(out_dtype or jnp.float32)


@op("DENSIFY")
def densify(x):
    """Sparse constants are densified at load, so DENSIFY passes its (dense) input on."""
    return x


@op("READ_VARIABLE")
def read_variable(value):
    """A resource variable's current value (the reader rewired the handle to the value)."""
    return value


@op("ASSIGN_VARIABLE")
def assign_variable(old, new):
    """The variable's next value (its dtype kept)."""
    return jnp.asarray(new).astype(jnp.result_type(old))


@op("WHILE")
def while_(*args, cond, body):
    """lax.while_loop over the loop-carried inputs."""
    init = tuple(jnp.asarray(a) for a in args)

    def cond_fn(carry):
        return jnp.reshape(cond(*carry)[0], ()).astype(bool)

    def body_fn(carry):
        out = body(*carry)
        return tuple(jnp.asarray(o).astype(c.dtype).reshape(c.shape) for o, c in zip(out, carry))

    return tuple(lax.while_loop(cond_fn, body_fn, init))


@op("IF")
def if_(pred, *args, then_branch, else_branch):
    """lax.cond on a scalar predicate (concrete predicates pick a branch at trace time)."""
    if not isinstance(pred, jax.core.Tracer):
        branch = then_branch if bool(np.asarray(pred).reshape(())) else else_branch
        return tuple(branch(*args))
    return tuple(lax.cond(jnp.reshape(pred, ()).astype(bool), lambda a: tuple(then_branch(*a)),
                          lambda a: tuple(else_branch(*a)), tuple(args)))


@op("STABLEHLO_COMPOSITE")
def stablehlo_composite(*args, decomposition, name: str = "", composite_attributes: tuple = (),
                        composite_attributes_format: int = 0, version: int = 0):
    """A named composite (e.g. ``odml.rms_norm``) executed through its decomposition subgraph."""
    return tuple(decomposition(*args))
