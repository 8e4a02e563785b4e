"""A dataset's source files as its manifest lists them: names relative to its root, sizes, times,
and checksums, which are kept in a cache by file version so a second manifest costs a stat a file."""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import jobs
from ..cache import Section
from ..workers import Meter
from .base import Volume
from .confine import open_file

CHECKSUMS = ("sha256",)
READ_BLOCK = 4 * 2**20
PARTIAL = 16  # hashings stopped half-way, kept to be resumed
_partial: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()  # (algorithm, path, size, mtime) -> (hash, bytes done)
_partial_lock = threading.Lock()


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # relative to the dataset's root
    size: int
    mtime_ns: int
    stamp: tuple[int, int] = (0, 0)  # ctime and inode: a rewrite keeping size and mtime (cp -p) changes them


def volume_files(volume: Volume) -> list[Path]:
    """Every file a volume is read from: a Zarr store's every file (its version covers only the
    metadata), else the files the reader lists."""
    if volume.format.startswith("zarr"):  # only what resolves inside the store: a symlink out is no part of it
        store = Path(os.path.realpath(volume.path))
        return sorted(p for p in Path(volume.path).rglob("*")
                      if p.is_file() and Path(os.path.realpath(p)).is_relative_to(store))
    return [Path(f) for f in volume.files]


def source_files(paths: Sequence[str | Path], root: Path) -> list[SourceFile]:
    """The files with their current sizes and times (a stat each: run it on the workers); a file linked out
    of `root` is never read (readers/confine.py), so it is neither listed nor hashed."""
    found, inside = [], Path(os.path.realpath(root))
    for p in sorted(Path(p) for p in paths):
        if not Path(os.path.realpath(p)).is_relative_to(inside):
            continue
        st, named = p.stat(), Path(os.path.normpath(p))  # an XML's ../raw/x.h5 is named raw/x.h5
        found.append(SourceFile(p, named.relative_to(root).as_posix() if named.is_relative_to(root) else p.name,
                                st.st_size, st.st_mtime_ns, (st.st_ctime_ns, st.st_ino)))
    return found


def checksummer(algorithm: str, cache: Section, meter: Meter | None = None) -> Callable[[SourceFile], str]:
    """A function giving a file's checksum (hex), computed once per file version: concurrent
    requests for one file share one hashing (the cache's single-flight), which reads the file in
    pieces of READ_BLOCK, no further than the size it was listed with, and stops between pieces
    once every request waiting for it has left (jobs.Cancelled). A hashing so stopped is kept
    (up to PARTIAL of them) and resumed where it stopped by the next request for that version."""
    if algorithm not in CHECKSUMS:
        raise ValueError(f"checksums={algorithm!r} is not one of {', '.join(CHECKSUMS)}")

    def digest(f: SourceFile) -> str:
        key = (algorithm, os.fspath(f.path), f.size, f.mtime_ns, f.stamp)

        def compute() -> str:
            with _partial_lock:
                h, done = _partial.pop(key, None) or (hashlib.new(algorithm), 0)
            try:
                with open_file(f.path) as fh:  # a regular file, opened without blocking
                    fh.seek(done)
                    while done < f.size and (block := fh.read(min(READ_BLOCK, f.size - done))):
                        h.update(block)
                        done += len(block)
                        if meter is not None:
                            meter.hashed(len(block))
                        jobs.checkpoint()
            except jobs.Cancelled:
                with _partial_lock:
                    _partial[key] = (h, done)
                    while len(_partial) > PARTIAL:
                        _partial.popitem(last=False)
                raise
            return h.hexdigest()

        return cache.get_or_compute(key, compute)

    return digest
