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

A claim names its process by pid, start time (from /proc/PID/stat) and pid namespace, so a waiter
takes over at once the claim of a process that is gone (killed mid-computation), where the lease
alone would hold it LEASE seconds. The start time tells a reused pid from the claimant with no
heartbeat (no write every few seconds to keep a claim alive); a claim from another pid namespace
(a replica in another container sharing the directory) cannot be judged, and waits out its lease.

Embargoed voxels are stored here: the directory, its subdirectories and its files are the server's
user's alone (0700 and 0600), whatever the umask.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import struct
import threading
import time
from collections.abc import Hashable
from pathlib import Path
from typing import Any

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
PRIVATE_DIR, PRIVATE_FILE = 0o700, 0o600


def _process(pid: int) -> tuple[int, int, int] | None:
    """(pid namespace, pid, start time in clock ticks after boot) of a running process; None if there
    is none (a zombie is none: it computes nothing) or /proc cannot tell."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
        fields = Path(f"/proc/{pid}/stat").read_bytes().rpartition(b")")[2].split()
    except OSError:
        return None
    return None if fields[0] == b"Z" else (namespace, pid, int(fields[19]))  # fields 3 and 22 of proc(5)


@functools.lru_cache(maxsize=4)
def _claimant(pid: int) -> tuple[int, int, int] | int:
    """What a process's claims say about it (its bare pid where /proc cannot tell more); per pid,
    so a forked child is itself."""
    return _process(pid) or pid


def _gone(owner: Any) -> bool:
    """Whether the process that made a claim has surely ended (never true of one that may still be
    computing: an older claim's bare pid, or a claim from another pid namespace, is left to its lease)."""
    if not (isinstance(owner, tuple) and len(owner) == 3):
        return False
    namespace, pid, _ = owner
    try:
        if os.stat("/proc/self/ns/pid").st_ino != namespace:
            return False
    except OSError:
        return False
    return _process(pid) != owner


class _PrivateDisk(diskcache.Disk):
    """diskcache's files, made the server's user's alone: value files 0600, directories 0700."""

    def filename(self, key=diskcache.core.UNKNOWN, value=diskcache.core.UNKNOWN):
        filename, full_path = super().filename(key, value)
        top = Path(self._directory)
        for part in Path(filename).parent.parts:  # both levels, made before diskcache's makedirs would
            top = top / part
            try:
                os.mkdir(top, PRIVATE_DIR)
            except FileExistsError:
                pass
        return filename, full_path

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        size, mode, filename, db_value = super().store(value, read, key)
        if filename is not None:
            os.chmod(os.path.join(self._directory, filename), PRIVATE_FILE)  # in a 0700 directory already
        return size, mode, filename, db_value


def _private_directory(directory: Path) -> None:
    """The store's directory and its SQLite files, created (or made) the server's user's alone; SQLite
    gives its -wal and -shm files the database's mode."""
    directory.mkdir(PRIVATE_DIR, parents=True, exist_ok=True)
    os.chmod(directory, PRIVATE_DIR)
    database = directory / diskcache.core.DBNAME
    os.close(os.open(database, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE))
    for each in (database, *(database.with_name(database.name + end) for end in ("-wal", "-shm"))):
        try:
            os.chmod(each, PRIVATE_FILE)
        except FileNotFoundError:
            pass


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
        _private_directory(self.directory)
        # least-recently-stored: with least-recently-used every hit is a write transaction (gets
        # 3-9x slower, measured); the memory cache in front already keeps what is hot.
        self.store = diskcache.Cache(str(directory), size_limit=max(0, max_bytes - WAL), disk=_PrivateDisk,
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

    def _owner(self) -> tuple[int, int, int] | int:
        return _claimant(os.getpid())

    def claim(self, key: str) -> bool:
        """True if this process is now the one computing `key`; False if another one is."""
        return self.store.add(("computing", key), self._owner(), expire=LEASE)

    def release(self, key: str) -> None:
        """Drop this process's claim on `key`, if it holds one (never another's, which may have
        taken over this one's after its lease ran out)."""
        claim = ("computing", key)
        if self.store.get(claim) != self._owner():
            return
        with self.store.transact():
            if self.store.get(claim) == self._owner():
                self.store.delete(claim)

    def _take_over(self, key: str, owner: Any) -> bool:
        """Claim `key` in place of `owner`, a process that is gone; False if another waiter was first."""
        claim = ("computing", key)
        with self.store.transact():
            if self.store.get(claim) != owner:
                return False
            self.store.set(claim, self._owner(), expire=LEASE)
            return True

    def wait(self, key: str) -> bytes | np.ndarray | None:
        """The value another process is computing, once it is stored; None if that process gave up
        (failed, died, or its claim expired), and the caller computes it itself (holding the claim,
        released by `release`, when it took over a dead process's)."""
        self._count("waits")
        while True:
            if (value := self._checked(key)) is not None:
                self._count("hits")
                return value
            owner = self.store.get(("computing", key))
            if owner is None:
                return self._checked(key)  # stored just before the claim went
            if _gone(owner) and self._take_over(key, owner):
                if (value := self._checked(key)) is not None:  # it was stored after all: nothing to compute
                    self.release(key)
                return value
            time.sleep(POLL)

    def stats(self) -> dict[str, int]:
        with self._lock:
            counts = dict(self.counts)
        return {**counts, "bytes": self.store.volume(), "entries": len(self.store), "max_bytes": self.max_bytes}

    def close(self) -> None:
        self.store.close()
