"""A byte-bounded LRU with single-flight: concurrent misses for one key share one computation."""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

import numpy as np
from cachetools import LRUCache


def nbytes(value: Any) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else len(value)


class _CountingLRU(LRUCache):
    evictions = 0

    def popitem(self):
        self.evictions += 1
        return super().popitem()


class ChunkCache:
    """Holds encoded chunks (bytes) and decoded blocks (ndarrays) under one byte budget.

    Thread-safe. `get_or_compute` runs in worker threads: the first miss for a key computes
    in its own thread, later callers for the same key wait for that result. A failed
    computation is not cached; every waiter sees its exception.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._lru = _CountingLRU(maxsize=max_bytes, getsizeof=nbytes)
        self._lock = threading.Lock()
        self._inflight: dict[Hashable, Future] = {}
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable) -> Any | None:
        """The cached value or None; cheap enough for the event loop."""
        with self._lock:
            value = self._lru.get(key)
            if value is not None:
                self.hits += 1
            return value

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        with self._lock:
            value = self._lru.get(key)
            if value is not None:
                self.hits += 1
                return value
            future = self._inflight.get(key)
            owner = future is None
            if owner:
                self.misses += 1
                future = self._inflight[key] = Future()
        if not owner:
            return future.result()
        try:
            value = compute()
        except BaseException as exc:
            with self._lock:
                del self._inflight[key]
            future.set_exception(exc)
            raise
        with self._lock:
            if nbytes(value) <= self.max_bytes:
                self._lru[key] = value
            del self._inflight[key]
        future.set_result(value)
        return value

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self._lru.evictions,
                "bytes": int(self._lru.currsize),
                "max_bytes": self.max_bytes,
                "entries": len(self._lru),
            }
