"""One byte budget for everything the server keeps in memory, shared by named sections, each
with single-flight: concurrent misses for one key share one computation.

The server makes one `Cache` from `--cache-size` and hands a section to each layer that keeps
something: encoded chunks (server and writers), decoded blocks (pyramid), decoded source
segments (readers). One LRU over all of them means the budget goes wherever it is used most;
each section counts its own hits, misses, evictions and bytes for /metrics.

Under it may lie a `DiskTier` (disk.py), shared by the server's processes: the sections named in
`persist` look there before computing, and keep what they compute there too.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

import numpy as np

from .. import jobs
from .disk import DiskTier, disk_key

WAIT_POLL = 0.1  # seconds between looks at a waiter's token while it waits for another thread's computation
COUNTERS = ("hits", "misses", "evictions", "bytes", "entries")


def nbytes(value: Any) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else len(value)


class Cache:
    """A byte-bounded LRU shared by named sections. Thread-safe."""

    def __init__(self, max_bytes: int, disk: DiskTier | None = None,
                 persist: tuple[str, ...] = ("chunks", "reduced")):
        self.max_bytes = max_bytes
        self.disk, self.persist = disk, persist
        self._lru: OrderedDict[tuple[str, Hashable], tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()
        self._inflight: dict[tuple[str, Hashable], tuple[Future, jobs.Token]] = {}  # future, its flight's token
        self._bytes = 0
        self._sections: dict[str, Section] = {}

    def section(self, name: str) -> Section:
        with self._lock:
            if name not in self._sections:
                self._sections[name] = Section(self, name)
            return self._sections[name]

    def stats(self) -> dict[str, dict[str, int]]:
        """Counters per section, and `all` summed over them (with the budget); the disk tier's
        own under `disk`, where there is one."""
        with self._lock:
            per = {name: dict(s.counts) for name, s in self._sections.items()}
        total = {k: sum(s[k] for s in per.values()) for k in COUNTERS}
        disk = {"disk": self.disk.stats()} if self.disk is not None else {}
        return {**per, "all": {**total, "max_bytes": self.max_bytes}, **disk}

    def _store(self, section: Section, key: Hashable, value: Any) -> None:
        """Insert under the lock, evicting the least recently used entries of any section."""
        size = nbytes(value)
        if size > self.max_bytes:
            return
        full = (section.name, key)
        old = self._lru.pop(full, None)
        if old is not None:
            self._bytes -= old[1]
            section.counts["bytes"] -= old[1]
            section.counts["entries"] -= 1
        self._lru[full] = (value, size)
        self._bytes += size
        section.counts["bytes"] += size
        section.counts["entries"] += 1
        while self._bytes > self.max_bytes:
            (name, _), (_, gone) = self._lru.popitem(last=False)
            owner = self._sections[name]
            self._bytes -= gone
            owner.counts["bytes"] -= gone
            owner.counts["entries"] -= 1
            owner.counts["evictions"] += 1


class Section:
    """One named part of a Cache: what one layer keeps, under the shared budget."""

    def __init__(self, cache: Cache, name: str):
        self.cache, self.name = cache, name
        self.counts = dict.fromkeys(COUNTERS, 0)

    def get(self, key: Hashable) -> Any | None:
        """The cached value or None; cheap enough for the event loop."""
        cache = self.cache
        with cache._lock:
            entry = cache._lru.get((self.name, key))
            if entry is None:
                return None
            cache._lru.move_to_end((self.name, key))
            self.counts["hits"] += 1
            return entry[0]

    def get_or_compute(self, key: Hashable, compute: Callable[[], Any], keep: bool = True) -> Any:
        """The cached value, else compute it once however many threads ask at the same time.
        A failed computation is not cached; every waiter sees its exception. With keep=False
        the value is shared with concurrent callers only, never stored.

        The computation runs under a token of its own (jobs.py), waited for by the tokens of
        everyone asking: it is cancelled (jobs.Cancelled, never cached) only once every one of
        them is, and a waiter that joins a computation being cancelled computes it anew."""
        cache, full = self.cache, (self.name, key)
        waiter = jobs.current()
        while True:
            with cache._lock:
                entry = cache._lru.get(full)
                if entry is not None:
                    cache._lru.move_to_end(full)
                    self.counts["hits"] += 1
                    return entry[0]
                flight = cache._inflight.get(full)
                owner = flight is None
                if owner:
                    self.counts["misses"] += keep  # a value shared only in flight is no cache miss
                    flight = cache._inflight[full] = (Future(), jobs.Token())
            future, token = flight
            if owner:
                return self._compute(key, full, compute, keep, future, token, waiter)
            if not token.join(waiter):
                concurrent.futures.wait([future])  # it ends soon, at its next checkpoint
                continue
            try:
                return _result(future, waiter)
            except jobs.Cancelled:
                if waiter is not None and waiter.cancelled:
                    raise
                # cancelled as this waiter joined: compute it anew
            finally:
                token.leave(waiter)

    def _compute(self, key: Hashable, full: tuple, compute: Callable[[], Any], keep: bool, future: Future,
                 token: jobs.Token, waiter: jobs.Token | None) -> Any:
        try:
            token.join(waiter)
            value = jobs.under(token, lambda: self._stored_or_compute(key, compute) if keep else compute())
        except BaseException as exc:
            with self.cache._lock:
                del self.cache._inflight[full]
            future.set_exception(exc)
            raise
        finally:
            token.leave(waiter)
        with self.cache._lock:
            if keep:
                self.cache._store(self, key, value)
            del self.cache._inflight[full]
        future.set_result(value)
        return value

    def _stored_or_compute(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """The value from the disk tier, else computed (once across processes) and stored there."""
        disk = self.cache.disk
        name = disk_key(self.name, key) if disk is not None and self.name in self.cache.persist else None
        if name is None:
            return compute()
        value = disk.get(name)
        if value is not None:
            return value
        claimed = disk.claim(name)
        if not claimed and (value := disk.wait(name)) is not None:
            return value
        try:
            value = compute()
            if isinstance(value, (bytes, np.ndarray)):  # not shard indexes' length lists
                disk.put(name, value)
        finally:
            disk.release(name)  # ours, whether claimed at first or taken over from a process that died
        return value

    def stats(self) -> dict[str, int]:
        with self.cache._lock:
            return {**self.counts, "max_bytes": self.cache.max_bytes}


def _result(future: Future, waiter: jobs.Token | None) -> Any:
    """A flight's result, or Cancelled as soon as the waiter is (it polls: a thread cannot wait
    for a future and a token at once)."""
    while True:
        try:
            return future.result(timeout=None if waiter is None else WAIT_POLL)
        except TimeoutError:
            if future.done():
                raise  # the computation's own
            if waiter.cancelled:
                raise jobs.Cancelled() from None


def uncached(name: str) -> Section:
    """A section that keeps nothing (single-flight only), for readers used outside a server."""
    return Cache(0).section(name)
