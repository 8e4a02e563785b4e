"""Virtual shard files for zarr v3 `sharding_indexed` and Neuroglancer's uint64 sharded format.

A shard is never stored. It is described by its chunks (each a Resource, the same one the
unsharded view serves, or None for a chunk that is not stored) and by an index computed from
the chunks' lengths. It is a body (see resource.py): a byte range is read by encoding only
the chunks it overlaps, a few at a time on all workers, and streamed as it is assembled, so
a reader costs the chunks in flight, not the shard. Where every chunk's length is known in
advance (uncompressed zarr, raw precomputed), the index needs no chunk encoded either.
"""

from __future__ import annotations

import array
import functools
import itertools
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import crc32c
import numpy as np

from ..cache import Section
from ..workers import Workers
from .resource import BINARY, Resource

EMPTY = 2**64 - 1  # zarr: an inner chunk that is not stored


@dataclass(frozen=True)
class Shard:
    key: Hashable  # identifies the bytes exactly (source version included)
    chunks: tuple[Resource | None, ...]  # in file order; None: not stored
    index: Callable[[Sequence[int]], bytes]  # the index, from every chunk's length (0 if not stored)
    index_length: int
    index_at_end: bool
    cache: Section = field(compare=False, repr=False)  # where the chunks' lengths are kept
    workers: Workers = field(compare=False, repr=False)
    content_type = BINARY
    compressible = False  # Content-Encoding cannot apply to the ranges clients read shards in
    headers = MappingProxyType({})
    streamed = False

    @property
    def length(self) -> int | None:
        if any(c is not None and c.length is None for c in self.chunks):
            return None
        return self.index_length + sum(c.length for c in self.chunks if c is not None)

    def peek(self) -> None:
        return None  # assembled only as it is streamed

    def lengths(self) -> list[int]:
        """Every chunk's encoded length (0 if not stored). Chunks whose length is not known in
        advance are encoded, on all workers; their lengths are kept, as clients read a shard
        in many ranges."""
        unknown = [c for c in self.chunks if c is not None and c.length is None]
        if not unknown:
            return [0 if c is None else c.length for c in self.chunks]

        def compute() -> bytes:
            found = dict(zip((c.key for c in unknown), self.workers.map(lambda c: len(c.body()), unknown)))
            return array.array("Q", [0 if c is None else c.length or found[c.key] for c in self.chunks]).tobytes()

        return array.array("Q", self.cache.get_or_compute(("shard-lengths", self.key), compute)).tolist()

    def size(self) -> int:
        return self.index_length + sum(self.lengths())

    def segments(self, lengths: Sequence[int]) -> list[tuple[int, int, int | None]]:
        """(offset, length, chunk number, or None for the index) of every part, in file order."""
        parts: list[tuple[int, int | None]] = [(n, i) for i, n in enumerate(lengths) if n]
        parts.insert(len(parts) if self.index_at_end else 0, (self.index_length, None))
        offsets = itertools.accumulate((n for n, _ in parts), initial=0)
        return [(o, n, i) for o, (n, i) in zip(offsets, parts)]

    def read(self, start: int, stop: int) -> Iterator[memoryview]:
        """Bytes [start, stop), in pieces; chunks not at hand are encoded a batch at a time."""
        lengths = self.lengths()
        wanted = [s for s in self.segments(lengths) if s[0] < stop and s[0] + s[1] > start]
        batch = 2 * self.workers.threads
        for first in range(0, len(wanted), batch):
            group = wanted[first:first + batch]
            chunks = [self.chunks[i] for _, _, i in group if i is not None]
            bodies = {c.key: c.peek() for c in chunks}
            missing = [c for c in chunks if bodies[c.key] is None]
            bodies.update(zip((c.key for c in missing), self.workers.map(Resource.body, missing)))
            for offset, length, i in group:
                data = self.index(lengths) if i is None else bodies[self.chunks[i].key]
                if len(data) != length:
                    raise RuntimeError(f"shard part {i} is {len(data)} bytes, not the {length} its index says")
                yield memoryview(data)[max(0, start - offset):stop - offset]


def zarr_index(lengths: Sequence[int]) -> bytes:
    """`sharding_indexed` index for chunks stored in C order from offset 0, index at the end:
    uint64le (offset, nbytes) per inner chunk, then the crc32c of those bytes."""
    index = np.full((len(lengths), 2), EMPTY, "<u8")
    offset = 0
    for i, n in enumerate(lengths):
        if n:
            index[i] = offset, n
            offset += n
    raw = index.tobytes()
    return raw + crc32c.crc32c(raw).to_bytes(4, "little")


def zarr_index_length(chunks: int) -> int:
    return 16 * chunks + 4


# Neuroglancer precomputed (sharded.md): chunk ids are compressed Morton codes of grid cells.

def morton_bits(grid: Sequence[int]) -> list[int]:
    """Bits each dimension (x, y, z) contributes to a compressed Morton code."""
    return [(g - 1).bit_length() for g in grid]


def compressed_morton(cell: Sequence[int], grid: Sequence[int]) -> int:
    """Interleave the cell's bits x, y, z from the lowest up, skipping a dimension once its bits run out."""
    bits, code, out = morton_bits(grid), 0, 0
    for i in range(max(bits, default=0)):
        for d, c in enumerate(cell):
            if i < bits[d]:
                code |= ((c >> i) & 1) << out
                out += 1
    return code


def morton_cell(code: int, grid: Sequence[int]) -> tuple[int, ...]:
    bits, cell, src = morton_bits(grid), [0] * len(grid), 0
    for i in range(max(bits, default=0)):
        for d in range(len(grid)):
            if i < bits[d]:
                cell[d] |= ((code >> src) & 1) << i
                src += 1
    return tuple(cell)


@dataclass(frozen=True)
class PrecomputedSharding:
    """Identity hash; each shard holds 2**(preshift+minishard) consecutive Morton codes (4x4x4
    chunks where the grid allows), in minishards of 2**preshift (2x2x2) chunks."""

    grid: tuple[int, int, int]  # x, y, z
    preshift_bits: int
    minishard_bits: int
    shard_bits: int

    @classmethod
    def for_grid(cls, grid: Sequence[int]) -> PrecomputedSharding:
        total = sum(morton_bits(grid))
        preshift = min(3, total)
        minishard = min(3, total - preshift)
        return cls(tuple(grid), preshift, minishard, total - preshift - minishard)

    def spec(self) -> dict:
        return {"@type": "neuroglancer_uint64_sharded_v1", "hash": "identity", "preshift_bits": self.preshift_bits,
                "minishard_bits": self.minishard_bits, "shard_bits": self.shard_bits,
                "minishard_index_encoding": "raw", "data_encoding": "raw"}

    def shard_name(self, shard: int) -> str:
        return f"{shard:0{max(1, -(-self.shard_bits // 4))}x}.shard"

    def shards(self) -> int:
        return 2**self.shard_bits

    def cell(self, code: int) -> tuple[int, ...]:
        """The grid cell (x, y, z) of a chunk id."""
        return morton_cell(code, self.grid)

    def cells(self, shard: int) -> tuple[tuple[int, int], ...]:
        """(chunk id, minishard) of every grid cell in `shard`, in file order (minishard, then id).
        Kept, as a client reads one shard in many ranges (decoding 64 codes takes a third of a ms)."""
        return _shard_cells(self, shard)

    def index_length(self, cells: Sequence[tuple[int, int]]) -> int:
        return 16 * 2**self.minishard_bits + 24 * len(cells)

    def index(self, cells: Sequence[tuple[int, int]], lengths: Sequence[int]) -> bytes:
        """Shard index, then each minishard's index; chunk data follows in the same order."""
        minishards = 2**self.minishard_bits
        shard_index = np.zeros((minishards, 2), "<u8")
        minishard_indexes = []
        data_offset = 24 * len(cells)  # relative to the end of the shard index
        position = 0
        for m in range(minishards):
            members = [(code, n) for (code, mm), n in zip(cells, lengths) if mm == m]
            if not members:
                shard_index[m] = position, position
                continue
            ids = np.array([code for code, _ in members], "<u8")
            sizes = np.array([n for _, n in members], "<u8")
            table = np.stack([np.diff(ids, prepend=0), np.zeros_like(sizes), sizes])
            table[1, 0] = data_offset
            data_offset += int(sizes.sum())
            minishard_indexes.append(table.astype("<u8").tobytes())
            shard_index[m] = position, position + 24 * len(members)
            position += 24 * len(members)
        return shard_index.tobytes() + b"".join(minishard_indexes)


@functools.lru_cache(maxsize=4096)
def _shard_cells(sharding: PrecomputedSharding, shard: int) -> tuple[tuple[int, int], ...]:
    per_shard = sharding.preshift_bits + sharding.minishard_bits
    found = []
    for code in range(shard << per_shard, (shard + 1) << per_shard):
        if all(c < g for c, g in zip(sharding.cell(code), sharding.grid)):
            found.append((code, (code >> sharding.preshift_bits) & (2**sharding.minishard_bits - 1)))
    return tuple(sorted(found, key=lambda e: (e[1], e[0])))
