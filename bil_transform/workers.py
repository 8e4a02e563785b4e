"""The worker pool: every read, decode, downsample and encode runs here, off the event loop.

Work fans out from inside the pool (a coarse block needs its parent blocks, a compressed shard
needs all its chunks), and a pool thread that waits for its own subtasks could wait forever
once every thread waits. `map` avoids that: the caller runs every subtask no other thread
has started yet, and waits only for subtasks already running elsewhere, which never wait
for it (subtasks are finer blocks of one tree, or leaves). How many threads one job may spread
over, and when it stops, is jobs.py's say.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from . import jobs

T = TypeVar("T")
LIGHT_THREADS = 2


def _giving_back(work: Callable[[], None], share: jobs.Share | None) -> Callable[[], None]:
    """work, then its thread back to the share it was taken from."""

    def helper() -> None:
        try:
            work()
        finally:
            if share is not None:
                share.give_back()

    return helper


class Meter:
    """What the workers' computations cost, for /metrics: blocks and seconds per level, voxel
    bytes read from the sources, and source file bytes hashed for manifest checksums."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._levels: dict[int, list] = {}  # level -> [blocks, seconds]
        self._source_bytes = 0
        self._hashed_bytes = 0

    def computed(self, level: int, seconds: float) -> None:
        with self._lock:
            tally = self._levels.setdefault(level, [0, 0.0])
            tally[0] += 1
            tally[1] += seconds

    def read(self, nbytes: int) -> None:
        with self._lock:
            self._source_bytes += nbytes

    def hashed(self, nbytes: int) -> None:
        with self._lock:
            self._hashed_bytes += nbytes

    def snapshot(self) -> dict:
        with self._lock:
            return {"levels": {k: tuple(v) for k, v in self._levels.items()}, "source_bytes": self._source_bytes,
                    "hashed_bytes": self._hashed_bytes}


class Workers:
    def __init__(self, threads: int | None = None):
        # One thread per core: chunk assembly is partly Python, and extra threads only fight over
        # the GIL (benchmarks/serve_throughput.py --workers N). Storage with high latency wants more.
        self.threads = threads or os.cpu_count() or 1
        # Beyond them, a reserve that only datasets holding little may use (jobs.Shares): one dataset's
        # long work never leaves another's chunk without a thread.
        half = max(1, self.threads // 2)
        self.pool = ThreadPoolExecutor(max_workers=self.threads + half, thread_name_prefix="bil-worker")
        self.shares = jobs.Shares(self.pool, self.threads, reserve=half, limit=half)
        # Checks of source files (stats, and reopening what changed) get a thread of their own: queued
        # behind cold chunk work they made cache hits wait with them (p95 1.7 s under load, issue 13).
        self.checks = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bil-check")
        # Catalog answers, pages and metadata documents: a flood of cold chunks never delays them.
        self.light = ThreadPoolExecutor(max_workers=LIGHT_THREADS, thread_name_prefix="bil-light")
        self.meter = Meter()

    def map(self, fn: Callable[[T], Any], items: Iterable[T]) -> list:
        """[fn(item) for item in items], spread over idle workers; safe to call from a worker.

        The caller and its helpers (at most one per other thread, and only while the job's
        dataset may have more threads: jobs.Shares) take items one at a time until none is
        left; the caller then waits only for helpers already running, and takes back the others.
        Every item is preceded by a checkpoint: a cancelled job stops between items (jobs.py)."""
        items = list(items)
        results: list = [None] * len(items)
        taken = iter(range(len(items)))
        lock, stop = threading.Lock(), []

        def work() -> None:
            while True:
                with lock:
                    i = None if stop else next(taken, None)
                if i is None:
                    return
                try:
                    jobs.checkpoint()
                    results[i] = fn(items[i])
                except BaseException:
                    stop.append(True)  # the others stop taking items: this map has failed
                    raise

        helpers = []
        for _ in range(min(len(items), self.threads) - 1):
            free, share = jobs.try_take_share()
            if not free:
                break
            helpers.append((self.pool.submit(jobs.carried(_giving_back(work, share))), share))
        try:
            work()
            for future, share in helpers:
                if not future.cancel():
                    future.result()
                elif share is not None:  # never started: its thread of the share was never used
                    share.give_back()
        except BaseException:
            stop.append(True)
            for future, share in helpers:
                if future.cancel() and share is not None:
                    share.give_back()
            raise
        return results

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.light.shutdown(wait=False, cancel_futures=True)
        self.checks.shutdown(wait=False, cancel_futures=True)
