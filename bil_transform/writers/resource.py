"""What a view hands the server for one key: a cache key and how to produce the bytes."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass

JSON = "application/json"
BINARY = "application/octet-stream"


@dataclass(frozen=True)
class Resource:
    key: Hashable  # cache key: identifies the bytes exactly (source version included)
    produce: Callable[[], bytes]
    content_type: str
    compressible: bool = False  # worth Content-Encoding: gzip when the client accepts it
    length: int | None = None  # the byte length, where known without producing the bytes


def to_json(doc: dict) -> bytes:
    return json.dumps(doc, indent=1).encode()
