"""The disk tier under the in-memory cache: encoded bodies kept on local disk, shared by every
server process on the machine and kept across restarts (memory -> disk -> compute).

It is a diskcache store (SQLite index, one file per large value), which is process-safe and
size-bounded by itself; choice measured in benchmarks/disk_cache_choice.py. Keys are digests of
the cache keys, which carry the source's version and the dataset's revision (catalog entry and
code), so a changed source or catalog entry never reads old bytes, across restarts too. The same
store makes concurrent misses in different processes compute once: the first one claims the key
with an atomic `add`, the others wait for its value.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Hashable
from pathlib import Path

import diskcache

# How long a claim holds: a process that dies mid-computation frees its keys after this.
LEASE = 60.0
POLL = 0.005  # seconds between looks for a value another process is computing


def disk_key(section: str, key: Hashable) -> str | None:
    """The store's key for a cache key, or None when the key's text is not stable across processes
    (an object shown by its address would never match, and must not collide)."""
    text = repr((section, key))
    if " at 0x" in text:
        return None
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


class DiskTier:
    """A size-bounded LRU of bytes on local disk, shared by processes. Thread-safe."""

    def __init__(self, directory: str | Path, max_bytes: int):
        self.directory, self.max_bytes = Path(directory), max_bytes
        # least-recently-used: a hit refreshes the entry, so the first screens everyone opens stay
        # while one-off bulk reads age out. Values at least 32 KiB live in files of their own.
        self.store = diskcache.Cache(str(directory), size_limit=max_bytes, eviction_policy="least-recently-used",
                                     statistics=False)
        self._lock = threading.Lock()
        self.counts = {"hits": 0, "misses": 0, "writes": 0, "waits": 0}

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def get(self, key: str) -> bytes | None:
        value = self.store.get(key)
        self._count("hits" if value is not None else "misses")
        return value

    def put(self, key: str, value: bytes) -> None:
        if len(value) <= self.max_bytes:
            self.store.set(key, value)
            self._count("writes")

    def claim(self, key: str) -> bool:
        """True if this process is now the one computing `key`; False if another one is."""
        return self.store.add(("computing", key), os.getpid(), expire=LEASE)

    def release(self, key: str) -> None:
        self.store.delete(("computing", key))

    def wait(self, key: str) -> bytes | None:
        """The value another process is computing, once it is stored; None if that process gave up
        (failed, or died and its claim expired), and the caller computes it itself."""
        self._count("waits")
        while True:
            value = self.store.get(key)
            if value is not None:
                self._count("hits")
                return value
            if ("computing", key) not in self.store:
                return self.store.get(key)  # stored just before the claim went
            time.sleep(POLL)

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self.counts)
        return {**counts, "bytes": self.store.volume(), "entries": len(self.store), "max_bytes": self.max_bytes}

    def close(self) -> None:
        self.store.close()
