"""`/ds/ID/manifest.json`: a dataset's source files (readers/files.py), named relative to its own
root, with sizes and modification times, and on request their checksums, each made as the body
is streamed, one file at a time."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Hashable, Iterator
from types import MappingProxyType

from ..readers.files import SourceFile
from .resource import JSON


class Manifest:
    """The manifest as a body (resource.py's contract) of unknown length, streamed file by file."""

    content_type = JSON
    compressible = False
    length = None
    streamed = True  # sent as it is made (chunked), not measured first
    headers = MappingProxyType({})

    def __init__(self, dataset: str, files: list[SourceFile], checksum: str | None = None,
                 digest: Callable[[SourceFile], str] | None = None):
        self.dataset, self.files, self.checksum, self.digest = dataset, files, checksum, digest
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
                entry[self.checksum] = self.digest(f)
            yield (("," if i else "") + "\n " + json.dumps(entry)).encode()
        yield b"\n]}\n"
