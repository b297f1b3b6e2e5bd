"""Shape buckets and the latency-aware dynamic batcher.

Example:
    >>> from jaxinfer.batching import BucketedModel, BucketPolicy, DynamicBatcher, LatencyModel  # doctest: +SKIP
    >>> bm = BucketedModel(jaxinfer.load("mlp.onnx"), BucketPolicy.for_max_batch(8))           # doctest: +SKIP
    >>> with DynamicBatcher(bm, LatencyModel(bm.warmup())) as b:                                 # doctest: +SKIP
    ...     out = b.submit({"x": x}).result()
"""

from __future__ import annotations

from .batcher import (BatcherConfig, BatcherStoppedError, BatchReport, DynamicBatcher, LatencyModel,
                      QueueFullError, RequestTimeoutError)
from .buckets import (BucketedModel, BucketError, BucketPolicy, Prepared, batch_layout, default_batch_sizes,
                      restamp_graph_batch, stderr_progress)
from .sequences import (SequenceError, SequenceLimitError, SequencePolicy, SequenceTable, StreamRef, stateless_view,
                        stream_of)

__all__ = [
    "BatchReport",
    "BatcherConfig",
    "BatcherStoppedError",
    "BucketError",
    "BucketPolicy",
    "BucketedModel",
    "DynamicBatcher",
    "LatencyModel",
    "Prepared",
    "QueueFullError",
    "RequestTimeoutError",
    "SequenceError",
    "SequenceLimitError",
    "SequencePolicy",
    "SequenceTable",
    "StreamRef",
    "batch_layout",
    "default_batch_sizes",
    "restamp_graph_batch",
    "stateless_view",
    "stderr_progress",
    "stream_of",
]
