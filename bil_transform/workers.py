"""The worker pool: every read, decode, downsample and encode runs here, off the event loop.

Work fans out from inside the pool (a coarse block needs its parent blocks, a compressed shard
needs all its chunks), and a pool thread that waits for its own subtasks could wait forever
once every thread waits. `map` avoids that: the caller runs every subtask no other thread
has started yet, and waits only for subtasks already running elsewhere, which never wait
for it (subtasks are finer blocks of one tree, or leaves).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class Meter:
    """What the workers' computations cost, for /metrics: blocks and seconds per level, and voxel
    bytes read from the sources."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._levels: dict[int, list] = {}  # level -> [blocks, seconds]
        self._source_bytes = 0

    def computed(self, level: int, seconds: float) -> None:
        with self._lock:
            tally = self._levels.setdefault(level, [0, 0.0])
            tally[0] += 1
            tally[1] += seconds

    def read(self, nbytes: int) -> None:
        with self._lock:
            self._source_bytes += nbytes

    def snapshot(self) -> dict:
        with self._lock:
            return {"levels": {k: tuple(v) for k, v in self._levels.items()}, "source_bytes": self._source_bytes}


class Workers:
    def __init__(self, threads: int | None = None):
        # One thread per core: chunk assembly is partly Python, and extra threads only fight over
        # the GIL (benchmarks/serve_throughput.py --workers N). Storage with high latency wants more.
        self.threads = threads or os.cpu_count() or 1
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="bil-worker")
        # Checks of source files (stats, and reopening what changed) get a thread of their own: queued
        # behind cold chunk work they made cache hits wait with them (p95 1.7 s under load, issue 13).
        self.checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bil-check")
        self.meter = Meter()

    def map(self, fn: Callable[[T], Any], items: Iterable[T]) -> list:
        """[fn(item) for item in items], spread over idle workers; safe to call from a worker."""
        items = list(items)
        if len(items) < 2 or self.threads < 2:
            return [fn(item) for item in items]
        futures = [self.pool.submit(fn, item) for item in items[1:]]
        try:
            results = [fn(items[0])]
            for item, future in zip(items[1:], futures):
                results.append(fn(item) if future.cancel() else future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            raise
        return results

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.checks.shutdown(wait=False, cancel_futures=True)
