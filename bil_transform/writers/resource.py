"""What a view hands the server for one key: a body, which the server only streams.

The body contract is `Body` below; `Resource` (here) and `Shard` (sharding.py) keep it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import ClassVar, Protocol

from isal import igzip

from ..cache import Section

JSON = "application/json"
BINARY = "application/octet-stream"
# ISA-L level 1: 1.8 ms for a 64^3 uint16 chunk, against 3.3 ms for zlib-ng level 1 (ratio 0.57 vs 0.55)
# and 25 ms for zlib level 5, the old choice (benchmarks/gzip_choice.py).
GZIP_LEVEL = 1


class Body(Protocol):
    """What the server streams for one key. `size` and `read` may compute, so the server runs
    them on the workers; `peek` never does, so a warm request never leaves the event loop."""

    key: Hashable  # identifies the bytes exactly (source version included); the ETag comes from it
    content_type: str
    compressible: bool  # then it also has gzipped() and peek_gzipped()
    headers: Mapping[str, str]  # sent with it (what the bytes are, where the content type cannot say)
    streamed: bool  # sent as it is made (chunked), not measured first, when the whole body is asked for

    @property
    def length(self) -> int | None:
        """The byte length, where known without computing anything."""

    def size(self) -> int: ...

    def peek(self) -> bytes | None:
        """The whole body if it is at hand already."""

    def read(self, start: int, stop: int) -> Iterator[memoryview]:
        """Bytes [start, stop) piece by piece, computing only the pieces the range covers."""


@dataclass(frozen=True)
class Resource:
    """A body made in one piece by `produce` and kept in the `cache` section it is given."""

    key: Hashable  # identifies the bytes exactly (source version included)
    produce: Callable[[], bytes]
    content_type: str
    cache: Section = field(compare=False, repr=False)
    compressible: bool = False  # worth Content-Encoding: gzip when the client accepts it
    length: int | None = None  # the byte length, where known without producing the bytes
    headers: ClassVar[Mapping[str, str]] = MappingProxyType({})
    streamed: ClassVar[bool] = False

    def peek(self) -> bytes | None:
        return self.cache.get(self.key)

    def body(self) -> bytes:
        return self.cache.get_or_compute(self.key, self.produce)

    def size(self) -> int:
        return self.length if self.length is not None else len(self.body())

    def read(self, start: int, stop: int) -> Iterator[memoryview]:
        yield memoryview(self.body())[start:stop]

    def peek_gzipped(self) -> bytes | None:
        return self.cache.get(("gzip", self.key))

    def gzipped(self) -> bytes:
        """The gzip-encoded body. Only it is kept: a client that accepts gzip never needs the
        identity bytes, and keeping both would halve what the cache holds."""
        return self.cache.get_or_compute(("gzip", self.key), lambda: gzip(self.peek() or self.produce()))


def gzip(data: bytes) -> bytes:
    return igzip.compress(data, GZIP_LEVEL, mtime=0)  # the same bytes every time, as a strong ETag promises


def to_json(doc: dict) -> bytes:
    return json.dumps(doc, indent=1).encode()
