"""Reductions and arg-reductions (axes are a static second input)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from ....registry import OpDef, registrar
from .. import quant as Q
from ._util import QList, is_quantized

OPS: list[OpDef] = []
op = registrar(OPS, domain="tflite")


def _axes(axes, rank: int) -> tuple[int, ...]:
    return tuple(sorted({int(a) % rank for a in np.ravel(axes)}))


@op("MEAN", static=(1,))
def mean(x, axes, *, keep_dims: bool = False, in_q: QList = None, out_q: QList = None):
    """Mean over ``axes``; 8-bit: integer sum rescaled to the output by a fixed-point multiplier."""
    ax = _axes(axes, x.ndim)
    if is_quantized(in_q, out_q):
        qi, qo = in_q[0], out_q[0]
        n = int(np.prod([x.shape[a] for a in ax]))
        s = jnp.sum(jnp.asarray(x, jnp.int64) - qi.zp, axis=ax, keepdims=bool(keep_dims))
        return Q.requantize(s, float(qi.s) / (float(qo.s) * n), qo, (qo.qmin, qo.qmax))
    return jnp.mean(x, axis=ax, keepdims=bool(keep_dims))


def _reducer(name: str, fn) -> None:
    def reduce(x, axes, *, keep_dims: bool = False, in_q: QList = None, out_q: QList = None):
        if name not in ("REDUCE_MAX", "REDUCE_MIN") and (in_q or out_q):
            raise ValueError(f"{name} on quantized tensors is not supported (float kernel only)")
        return fn(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))

    reduce.__doc__ = f"{name} over ``axes``."
    op(name, static=(1,))(reduce)


for _name, _fn in {"SUM": jnp.sum, "REDUCE_MAX": jnp.max, "REDUCE_MIN": jnp.min, "REDUCE_PROD": jnp.prod,
                   "REDUCE_ANY": jnp.any, "REDUCE_ALL": jnp.all}.items():
    _reducer(_name, _fn)


@op("ARG_MAX", static=(1,))
def arg_max(x, axis, *, output_type: int = 2, out_dtype=None, in_q: QList = None, out_q: QList = None):
    """Index of the first maximum along ``axis``."""
    return jnp.argmax(x, axis=int(np.ravel(axis)[0])).astype(out_dtype or np.int32)


@op("ARG_MIN", static=(1,))
def arg_min(x, axis, *, output_type: int = 2, out_dtype=None, in_q: QList = None, out_q: QList = None):
    """Index of the first minimum along ``axis``."""
    return jnp.argmin(x, axis=int(np.ravel(axis)[0])).astype(out_dtype or np.int32)
