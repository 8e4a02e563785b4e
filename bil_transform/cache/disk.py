"""The disk tier under the in-memory cache: encoded bodies, and the blocks of computed levels,
kept on local disk, shared by every server process on the machine and kept across restarts
(memory -> disk -> compute).

It is a diskcache store (SQLite index, one file per large value), which is process-safe and
size-bounded by itself; chosen over lmdb (no eviction, fixed map) and diskcache's FanoutCache or
LRU policy by benchmarks/disk_cache_choice.py. Keys are digests of
the cache keys, which carry the source's version and the dataset's revision (catalog entry and
code), so a changed source or catalog entry never reads old bytes, across restarts too. The same
store makes concurrent misses in different processes compute once: the first one claims the key
with an atomic `add`, the others wait for its value.
"""

from __future__ import annotations

import hashlib
import math
import os
import struct
import threading
import time
from collections.abc import Hashable
from pathlib import Path

import crc32c
import diskcache
import numpy as np

# How long a claim holds: a process that dies mid-computation frees its keys after this.
LEASE = 60.0
POLL = 0.005  # seconds between looks for a value another process is computing
WAL = 4 * 2**20  # SQLite's write-ahead log, which diskcache's size does not count
# After each value: its length and CRC-32C. diskcache never fsyncs its value files, so after a
# power cut an entry may point at a short or torn file; such an entry is a miss, never bytes.
TRAILER = struct.Struct("<QI")
# Before it, what it is: encoded bytes (b), or the raw voxels of an array (a) with its dtype and shape.
KIND = struct.Struct("<c8s3Q")


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
        # least-recently-stored: with least-recently-used every hit is a write transaction (gets
        # 3-9x slower, measured); the memory cache in front already keeps what is hot.
        self.store = diskcache.Cache(str(directory), size_limit=max(0, max_bytes - WAL),
                                     eviction_policy="least-recently-stored", statistics=False)
        self.store.cull()  # a smaller bound than last time's takes effect now, not at the first write
        self._lock = threading.Lock()
        self.counts = {"hits": 0, "misses": 0, "writes": 0, "waits": 0, "damaged": 0}

    def _count(self, what: str) -> None:
        with self._lock:
            self.counts[what] += 1

    def get(self, key: str) -> bytes | np.ndarray | None:
        value = self._checked(key)
        self._count("hits" if value is not None else "misses")
        return value

    def _checked(self, key: str) -> bytes | np.ndarray | None:
        stored = self.store.get(key)
        if stored is None:
            return None
        end = len(stored) - TRAILER.size
        if end < KIND.size or TRAILER.unpack_from(stored, end) != (end, crc32c.crc32c(memoryview(stored)[:end])):
            self._count("damaged")
            self.store.delete(key)
            return None
        kind, dtype, *shape = KIND.unpack_from(stored)
        if kind == b"b":
            return stored[KIND.size:end]
        return np.frombuffer(stored, np.dtype(dtype.rstrip(b"\0").decode()), math.prod(shape), KIND.size).reshape(shape)

    def put(self, key: str, value: bytes | np.ndarray) -> None:
        """Keep `value` (bytes, or a 3-D array, which comes back read-only)."""
        if isinstance(value, np.ndarray):
            head = KIND.pack(b"a", value.dtype.str.encode(), *value.shape)
            body = memoryview(np.ascontiguousarray(value)).cast("B")  # bytes, whatever the shape
        else:
            head, body = KIND.pack(b"b", b"", 0, 0, 0), value
        if KIND.size + len(body) + TRAILER.size > self.store.size_limit:  # could never stay
            return
        crc = crc32c.crc32c(body, crc32c.crc32c(head))
        self.store.set(key, b"".join((head, body, TRAILER.pack(len(head) + len(body), crc))))  # one copy
        self._count("writes")

    def claim(self, key: str) -> bool:
        """True if this process is now the one computing `key`; False if another one is."""
        return self.store.add(("computing", key), os.getpid(), expire=LEASE)

    def release(self, key: str) -> None:
        self.store.delete(("computing", key))

    def wait(self, key: str) -> bytes | np.ndarray | None:
        """The value another process is computing, once it is stored; None if that process gave up
        (failed, or died and its claim expired), and the caller computes it itself."""
        self._count("waits")
        while True:
            if (value := self._checked(key)) is not None:
                self._count("hits")
                return value
            if ("computing", key) not in self.store:
                return self._checked(key)  # stored just before the claim went
            time.sleep(POLL)

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self.counts)
        return {**counts, "bytes": self.store.volume(), "entries": len(self.store), "max_bytes": self.max_bytes}

    def close(self) -> None:
        self.store.close()
