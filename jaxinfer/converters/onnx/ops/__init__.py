"""The ONNX op registry, built explicitly from the family modules (one module per family)."""

from __future__ import annotations

from ....registry import Registry
from . import (
    activation,
    attention,
    cast,
    contrib,
    contrib_attention,
    contrib_quant,
    control_flow,
    conv_pool,
    elementwise,
    image,
    indexing,
    linalg,
    losses,
    ml,
    normalization,
    pool,
    quant,
    random,
    reduce,
    rnn,
    sequence,
    shape,
    signal,
    strings,
    training,
)

FAMILIES = (
    activation, attention, cast, contrib, contrib_attention, contrib_quant, control_flow, conv_pool, elementwise, image, indexing, linalg, losses, ml,
    normalization, pool, quant, random, reduce, rnn, sequence, shape, signal, strings, training,
)

REGISTRY = Registry.merge(*(m.OPS for m in FAMILIES))
