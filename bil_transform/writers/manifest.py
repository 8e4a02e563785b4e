"""`/ds/ID/manifest.json`: a dataset's source files, named relative to its own root, with sizes and
modification times, and with `?checksums=sha256` their checksums.

Checksums are computed on the workers as the body is streamed, one file at a time, and kept in
the cache by file version (path, size, mtime), so a second manifest costs a stat per file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from ..cache import Section
from .resource import JSON

CHECKSUMS = ("sha256",)
READ_BLOCK = 4 * 2**20


@dataclass(frozen=True)
class SourceFile:
    path: Path
    name: str  # relative to the dataset's root
    size: int
    mtime_ns: int


def source_files(paths: Sequence[str | Path], root: Path) -> list[SourceFile]:
    """The files with their current sizes and times (a stat each: run it on the workers)."""
    found = []
    for p in sorted(Path(p) for p in paths):
        st = p.stat()
        found.append(SourceFile(p, p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name,
                                st.st_size, st.st_mtime_ns))
    return found


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(READ_BLOCK):
            h.update(block)
    return h.hexdigest()


class Manifest:
    """The manifest as a body (resource.py's contract) of unknown length, streamed file by file."""

    content_type = JSON
    compressible = False
    length = None
    streamed = True  # sent as it is made (chunked), not measured first
    headers = MappingProxyType({})

    def __init__(self, dataset: str, files: list[SourceFile], checksum: str | None, cache: Section):
        self.dataset, self.files, self.checksum, self.cache = dataset, files, checksum, cache
        self.key: Hashable = ("manifest", dataset, checksum, tuple((f.name, f.size, f.mtime_ns) for f in files))

    def peek(self) -> None:
        return None

    def size(self) -> int:
        return sum(len(piece) for piece in self._pieces())

    def read(self, start: int, stop: int) -> Iterator[memoryview]:
        offset = 0
        for piece in self._pieces():
            if offset + len(piece) > start and offset < stop:
                yield memoryview(piece)[max(0, start - offset):stop - offset]
            offset += len(piece)

    def _pieces(self) -> Iterator[bytes]:
        yield f'{{"id": {json.dumps(self.dataset)}, "files": ['.encode()
        for i, f in enumerate(self.files):
            entry = {"name": f.name, "size": f.size, "mtime": datetime.datetime.fromtimestamp(
                f.mtime_ns / 1e9, datetime.UTC).isoformat().replace("+00:00", "Z")}
            if self.checksum:
                key = (self.checksum, os.fspath(f.path), f.size, f.mtime_ns)
                entry[self.checksum] = self.cache.get_or_compute(key, lambda f=f: _sha256(f.path))
            yield (("," if i else "") + "\n " + json.dumps(entry)).encode()
        yield b"\n]}\n"
