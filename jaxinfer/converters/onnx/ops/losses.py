"""Loss ops (ai.onnx): NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss.

Both take class scores [N, C, d1, ...] and integer targets [N, d1, ...]. A target
equal to ``ignore_index`` contributes zero loss and zero weight (it may lie outside
[0, C), so gathers clamp it first). ``mean`` divides by the summed weights of the
targets that count, as the spec does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ....registry import OpDef, registrar

OPS: list[OpDef] = []
op = registrar(OPS)

_REDUCTIONS = ("none", "sum", "mean")


def _nll(log_prob, target, weight, reduction: str, ignore_index: int | None):
    """-log_prob[n, target[n, ...], ...] * weight[target], reduced as asked."""
    reduction = reduction.decode() if isinstance(reduction, bytes) else reduction
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got '{reduction}'")
    n_classes = log_prob.shape[1]
    target = jnp.asarray(target).astype(jnp.int64)
    if log_prob.ndim != target.ndim + 1:
        raise ValueError(f"target of rank {target.ndim} does not match scores of rank {log_prob.ndim} (want rank - 1)")
    keep = jnp.ones(target.shape, bool) if ignore_index is None else target != ignore_index
    index = jnp.clip(target, 0, n_classes - 1)
    picked = jnp.take_along_axis(log_prob, index[:, None], axis=1)[:, 0]
    w = jnp.ones(target.shape, log_prob.dtype) if weight is None else jnp.take(jnp.asarray(weight), index)
    w = jnp.where(keep, w, jnp.zeros_like(w))
    loss = -picked * w
    if reduction == "none":
        return loss
    total = jnp.sum(loss)
    if reduction == "sum":
        return total
    return total / jnp.sum(w)


@op("NegativeLogLikelihoodLoss", (12, 13, 22))
def negative_log_likelihood_loss(input, target, weight=None, *, ignore_index: int | None = None,
                                 reduction: str = "mean"):
    """https://onnx.ai/onnx/operators/onnx__NegativeLogLikelihoodLoss.html"""
    return _nll(input, target, weight, reduction, ignore_index)


@op("SoftmaxCrossEntropyLoss", (12, 13))
def softmax_cross_entropy_loss(scores, labels, weights=None, *, ignore_index: int | None = None,
                               reduction: str = "mean", _num_outputs: int = 1):
    """https://onnx.ai/onnx/operators/onnx__SoftmaxCrossEntropyLoss.html: loss and (optionally) log_prob."""
    log_prob = jax.nn.log_softmax(scores, axis=1)
    loss = _nll(log_prob, labels, weights, reduction, ignore_index)
    return (loss, log_prob) if _num_outputs > 1 else loss
