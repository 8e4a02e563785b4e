"""A dataset's source files as its manifest lists them: names relative to its root, sizes, times,
and checksums, which are kept in a cache by file version so a second manifest costs a stat a file."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..cache import Section
from .base import Volume

CHECKSUMS = ("sha256",)
READ_BLOCK = 4 * 2**20


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


def checksummer(algorithm: str, cache: Section) -> Callable[[SourceFile], str]:
    """A function giving a file's checksum (hex), computed once per file version."""
    if algorithm not in CHECKSUMS:
        raise ValueError(f"checksums={algorithm!r} is not one of {', '.join(CHECKSUMS)}")

    def digest(f: SourceFile) -> str:
        def compute() -> str:
            h = hashlib.new(algorithm)
            with open(f.path, "rb") as fh:
                while block := fh.read(READ_BLOCK):
                    h.update(block)
            return h.hexdigest()

        return cache.get_or_compute((algorithm, os.fspath(f.path), f.size, f.mtime_ns, f.stamp), compute)

    return digest
