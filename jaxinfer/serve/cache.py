"""An opt-in LRU response cache keyed by a hash of the input tensors."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np


def tensors_key(feeds: Mapping[str, np.ndarray]) -> str:
    """A digest of names, dtypes, shapes and bytes of ``feeds`` (order-independent)."""
    h = hashlib.blake2b(digest_size=20)
    for name in sorted(feeds):
        arr = np.asarray(feeds[name])
        h.update(name.encode() + b"\0" + str(arr.dtype).encode() + b"\0" + repr(arr.shape).encode())
        if arr.dtype == np.dtype(object):
            h.update(repr(arr.tolist()).encode())
        else:
            h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


class ResponseCache:
    """At most ``size`` results, least recently used evicted first; counts hits and misses."""

    def __init__(self, size: int):
        if size < 1:
            raise ValueError(f"cache size must be >= 1, got {size}")
        self.size = size
        self.hits = 0
        self.misses = 0
        self._data: OrderedDict[str, dict[str, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict[str, np.ndarray] | None:
        with self._lock:
            value = self._data.get(key)
            if value is None:
                self.misses += 1
                return None
            self._data.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: str, value: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            self._data[key] = dict(value)
            self._data.move_to_end(key)
            while len(self._data) > self.size:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)
