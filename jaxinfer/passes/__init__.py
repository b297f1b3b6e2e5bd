"""Graph passes: each a pure function ``Graph -> Graph`` (nodes are never mutated in place).

``optimize(graph)`` runs the default pipeline; ``counts(graph)`` reports node/initializer counts
before and after for ``jaxinfer info --passes``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..graph import Graph
from ..registry import Registry
from .cleanup import eliminate_dead_nodes, eliminate_identities
from .constant_fold import constant_folder, fold_constants
from .dedupe import merge_identical_initializers
from .fold_bn import fold_conv_batchnorm
from .fuse import fuse_conv_epilogue, fuse_gelu, fuse_matmul_add
from .layout import (conv_weights_spatial_first, int8_conv_weights_ohwi, int8_weights_rows_first,
                     pools_after_costly_ops)
from .lookup import tabulate_8bit_chains
from .qdq import rewrite_qdq

Pass = Callable[[Graph], Graph]

DEFAULT_PASSES: tuple[Pass, ...] = (
    eliminate_identities,
    rewrite_qdq,
    merge_identical_initializers,
    fold_conv_batchnorm,
    fuse_matmul_add,
    conv_weights_spatial_first,
    int8_weights_rows_first,
    int8_conv_weights_ohwi,
    pools_after_costly_ops,
    fuse_conv_epilogue,
    tabulate_8bit_chains,
    fuse_gelu,
    eliminate_dead_nodes,
)


def pipeline(registry: Registry) -> tuple[Pass, ...]:
    """The default passes with constant folding (which needs the format's registry) first."""
    return (eliminate_identities, rewrite_qdq, constant_folder(registry)) + DEFAULT_PASSES[2:]


def optimize(graph: Graph, passes: Sequence[Pass] = DEFAULT_PASSES) -> Graph:
    """Run ``passes`` in order."""
    for p in passes:
        graph = p(graph)
    return graph


def counts(graph: Graph) -> dict[str, int]:
    return {"nodes": sum(1 for _ in graph.walk()), "initializers": len(graph.initializers),
            "params_bytes": graph.params_bytes()}


__all__ = [
    "DEFAULT_PASSES",
    "conv_weights_spatial_first",
    "counts",
    "eliminate_dead_nodes",
    "eliminate_identities",
    "fold_constants",
    "pipeline",
    "pools_after_costly_ops",
    "rewrite_qdq",
    "fold_conv_batchnorm",
    "fuse_conv_epilogue",
    "fuse_gelu",
    "fuse_matmul_add",
    "int8_conv_weights_ohwi",
    "int8_weights_rows_first",
    "merge_identical_initializers",
    "optimize",
    "tabulate_8bit_chains",
]
