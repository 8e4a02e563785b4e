"""The resolution pyramid: native levels from the reader, then synthesized levels down to one chunk.

Every level is a grid of blocks (the serving chunk shape). A native block is read with its
slab: the neighbouring blocks that share its source rows, tiles or chunks, read in one pass
and cached as one array whose blocks are views, so each source byte is read once. A
synthesized block is computed from the parent level's blocks, which come through the same
cache. Parent blocks (and slabs) are spread over the workers: the coarsest block, which
Neuroglancer asks for first, needs the whole volume below it.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import dask.array as da
import numpy as np

from .. import jobs
from ..cache import Section
from ..readers import Reader, Region, SourceError
from ..readers.base import within
from ..workers import Workers
from .downsample import METHODS
from .prepared import PreparedLevels

log = logging.getLogger("bil_transform")

DEFAULT_CHUNK = (64, 64, 64)
SLAB_BYTES = 32 * 2**20  # the most one native read may decode at once (it holds many blocks)


@dataclass(frozen=True)
class Level:
    shape: tuple[int, int, int]  # z, y, x
    factors: tuple[float, float, float]  # voxel size relative to level 0
    chunks: tuple[int, int, int]
    native: int | None  # index of the reader's native level, or None if synthesized
    step: tuple[int, int, int] = (1, 1, 1)  # integer reduction from the previous level (synthesized levels)

    @property
    def grid(self) -> tuple[int, int, int]:
        return tuple(-(-s // c) for s, c in zip(self.shape, self.chunks))


def plan_levels(reader: Reader, chunk: tuple[int, int, int]) -> list[Level]:
    """Native levels, then halve until the coarsest level fits in one chunk.

    x and y halve at every step; z halves only once its voxel is no coarser than x/y's,
    so a stack with a large z step keeps its z until x/y catch up.
    """
    vol = reader.volume

    def clip(shape):
        return tuple(min(c, s) for c, s in zip(chunk, shape))

    levels = []
    for i, nl in enumerate(vol.native_levels):
        levels.append(Level(nl.shape, nl.factors, clip(nl.shape), i))
    while any(s > c for s, c in zip(levels[-1].shape, chunk)):
        last = levels[-1]
        vz, vy, vx = (v * f for v, f in zip(vol.voxel_size, last.factors))
        z, y, x = last.shape
        xy_done = y == 1 and x == 1
        step = (2 if z > 1 and (vz <= max(vy, vx) or xy_done) else 1, 2 if y > 1 else 1, 2 if x > 1 else 1)
        shape = tuple(-(-s // f) for s, f in zip(last.shape, step))
        factors = tuple(a * b for a, b in zip(last.factors, step))
        levels.append(Level(shape, factors, clip(shape), None, step))
    return levels


class Pyramid:
    def __init__(self, reader: Reader, blocks: Section, key: str, method: str = "mean",
                 chunk: tuple[int, int, int] = DEFAULT_CHUNK, workers: Workers | None = None, revision: str = "",
                 reduced: Section | None = None, prepared: PreparedLevels | None = None):
        if method not in METHODS:
            raise ValueError(f"unknown downsampling method {method!r}; choose one of {', '.join(METHODS)}")
        self.reader, self.blocks, self.method = reader, blocks, method
        # Blocks of computed levels apart from the slabs read from the source: each needs all the
        # source under it, so they are worth keeping on a disk tier (the server persists this section).
        self.reduced = reduced if reduced is not None else blocks
        self.workers = workers or Workers(1)
        self.prepared = prepared  # computed levels read from a derived store instead
        self.volume = reader.volume
        # Everything the bytes derive from: the files' version, and `revision` for the rest (the
        # catalog entry and the code), so keys and ETags stay true across restarts and upgrades.
        self.key = (key, self.volume.version, method, chunk, revision)
        self.levels = plan_levels(reader, chunk)
        self._spans = {i: self._slab_spans(i) for i, lvl in enumerate(self.levels) if lvl.native is not None}
        self._windows: dict[int, tuple[float, float]] = {}

    def display_window(self, c: int) -> tuple[float, float]:
        """Contrast limits for channel c: the source's own, else the 0.1-99.9 percentiles of a
        central crop (at most 1024 x 1024) of the middle plane of the coarsest native level. If
        that plane cannot be read, the dtype's range for now: a damaged plane fails the chunks
        that touch it, not every document and listing that shows the dataset."""
        known = self.volume.channels[c].window
        if known is not None:
            return known
        if c not in self._windows:
            native = len(self.volume.native_levels) - 1
            z, y, x = self.volume.native_levels[native].shape
            crop = [slice(max(0, (n - 1024) // 2), min(n, (n - 1024) // 2 + 1024)) for n in (y, x)]
            try:
                plane = self.reader.read(native, 0, c, (slice(z // 2, z // 2 + 1), *crop))
            except SourceError as exc:
                log.warning("%s: display window of channel %d from the dtype's range: %s", self.key[0], c, exc)
                dtype = self.volume.dtype
                return (0.0, float(np.iinfo(dtype).max)) if dtype.kind in "iu" else (0.0, 1.0)
            lo, hi = (float(v) for v in np.percentile(plane, [0.1, 99.9]))
            self._windows[c] = (lo, hi if hi > lo else lo + 1)
        return self._windows[c]

    def block(self, level: int, t: int, c: int, index: tuple[int, int, int]) -> np.ndarray:
        """Block `index` of `level`, clipped to the level shape; cached and read-only. A native
        block is a view into its cached slab."""
        lvl = self.levels[level]
        if not all(0 <= i < g for i, g in zip(index, lvl.grid)):
            raise IndexError(f"block {index} is outside the grid {lvl.grid} of level {level}")
        jobs.checkpoint()  # between blocks: a coarse block of a huge source fans out over millions
        if self.prepared is not None and level in self.prepared.levels:
            region, dtype = self._region(level, index), self.volume.dtype
            return self.blocks.get_or_compute(("prepared", *self.key, level, t, c, index),
                                              lambda: _frozen(self.prepared.read(level, t, c, region), dtype))
        if lvl.native is None:
            return self.reduced.get_or_compute(("block", *self.key, level, t, c, index),
                                               lambda: self._timed(level, self._reduce, level, t, c, index))
        slab = self.slab(level, index)
        first, last = (self._region(level, tuple(r[end] for r in slab)) for end in (0, -1))
        region = tuple(slice(a.start, b.stop) for a, b in zip(first, last))
        key = ("slab", *self.key, level, t, c, tuple(r.start for r in slab))
        data = self.blocks.get_or_compute(key, lambda: self._timed(level, self._read, lvl.native, t, c, region))
        return data[within(self._region(level, index), region)]

    def stored(self, level: int) -> bool:
        """Whether blocks of `level` are read (from the source, or a derived store), not computed."""
        return self.levels[level].native is not None or (self.prepared is not None and level in self.prepared.levels)

    def seed(self, level: int, t: int, c: int, index: tuple[int, int, int], block: np.ndarray) -> None:
        """Take a block of a computed level made elsewhere (by another process of an export), so
        the coarser blocks over it are computed from it instead of from the source again."""
        if self.levels[level].native is not None:
            raise ValueError(f"level {level} is read from the source, not computed: nothing to seed")
        block = _frozen(block, self.volume.dtype)
        self.reduced.get_or_compute(("block", *self.key, level, t, c, index), lambda: block)

    def _read(self, native: int, t: int, c: int, region: Region) -> np.ndarray:
        data = _frozen(self.reader.read(native, t, c, region), self.volume.dtype)
        self.workers.meter.read(data.nbytes)
        return data

    def _timed(self, level: int, compute: Callable[..., np.ndarray], *args) -> np.ndarray:
        start = time.perf_counter()
        out = compute(*args)
        self.workers.meter.computed(level, time.perf_counter() - start)
        return out

    def _reduce(self, level: int, t: int, c: int, index: tuple[int, int, int]) -> np.ndarray:
        """A synthesized block, from the parent level's blocks."""
        lvl = self.levels[level]
        region = self._region(level, index)
        parent = self.levels[level - 1]
        src = tuple(slice(r.start * f, min(r.stop * f, p)) for r, f, p in zip(region, lvl.step, parent.shape))
        reduce = METHODS[self.method]
        if any(ch % f for ch, f in zip(parent.chunks, lvl.step)):  # windows straddle parent blocks
            return _frozen(reduce(self.read(level - 1, t, c, src), lvl.step), self.volume.dtype)
        # Every window lies in one parent block: reduce each where it is computed, on its worker,
        # and place the results, instead of first assembling the parents' whole region. A view
        # into a slab is copied first: the mean runs twice as fast on contiguous blocks, and the
        # copy lands in memory just freed.
        out = np.empty([r.stop - r.start for r in region], self.volume.dtype)
        ranges = [range(s.start // ch, (s.stop - 1) // ch + 1) for s, ch in zip(src, parent.chunks)]
        for pindex, part in self._blocks(level - 1, t, c, list(itertools.product(*ranges)),
                                         lambda b: reduce(np.ascontiguousarray(b), lvl.step)):
            at = [i * ch // f - r.start for i, ch, f, r in zip(pindex, parent.chunks, lvl.step, region)]
            out[tuple(slice(a, a + n) for a, n in zip(at, part.shape))] = part
        out.flags.writeable = False
        return out

    def _region(self, level: int, index: tuple[int, int, int]) -> Region:
        lvl = self.levels[level]
        return tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, lvl.chunks, lvl.shape))

    def slab(self, level: int, index: tuple[int, int, int]) -> tuple[range, range, range]:
        """The blocks of a native level read together with block `index` (ranges of block indices
        along z, y, x)."""
        spans, grid = self._spans[level], self.levels[level].grid
        return tuple(range(i - i % n, min(i - i % n + n, g)) for i, n, g in zip(index, spans, grid))

    def _slab_spans(self, level: int) -> tuple[int, int, int]:
        """Blocks per slab along z, y, x: aligned so that a slab covers whole source blocks (rows,
        tiles, chunks), halved along its longest side while it would decode more than SLAB_BYTES."""
        lvl = self.levels[level]
        spans = [min(math.lcm(c, min(b, s)) // c, g)
                 for c, b, s, g in zip(lvl.chunks, self.volume.block_shape, lvl.shape, lvl.grid)]
        itemsize = self.volume.dtype.itemsize
        while math.prod(n * c for n, c in zip(spans, lvl.chunks)) * itemsize > SLAB_BYTES and max(spans) > 1:
            longest = max(range(3), key=lambda a: spans[a] * lvl.chunks[a] if spans[a] > 1 else 0)
            spans[longest] = -(-spans[longest] // 2)
        return tuple(spans)

    def read(self, level: int, t: int, c: int, region: Region) -> np.ndarray:
        """Any (z, y, x) region of a level, assembled from its blocks."""
        lvl = self.levels[level]
        ranges = [range(r.start // ch, (r.stop - 1) // ch + 1) for r, ch in zip(region, lvl.chunks)]
        if all(len(r) == 1 for r in ranges):
            index = tuple(r[0] for r in ranges)
            b = self.block(level, t, c, index)
            return b[tuple(slice(r.start - i * ch, r.stop - i * ch) for r, i, ch in zip(region, index, lvl.chunks))]
        out = np.empty([r.stop - r.start for r in region], self.volume.dtype)
        for index, b in self._blocks(level, t, c, list(itertools.product(*ranges))):
            lo = [i * ch for i, ch in zip(index, lvl.chunks)]
            dst = tuple(slice(max(r.start, o) - r.start, min(r.stop, o + n) - r.start)
                        for r, o, n in zip(region, lo, b.shape))
            src = tuple(slice(max(r.start, o) - o, min(r.stop, o + n) - o) for r, o, n in zip(region, lo, b.shape))
            out[dst] = b[src]
        return out

    def _blocks(self, level: int, t: int, c: int, indices: list,
                then: Callable[[np.ndarray], np.ndarray] | None = None) -> list[tuple[tuple, np.ndarray]]:
        """(index, block, or `then(block)`) of many blocks, spread over the workers: one task per
        slab on a native level, so that no two workers read the same source bytes, one per block
        otherwise."""
        groups: dict[tuple, list] = {}
        native = self.levels[level].native is not None
        for index in indices:
            groups.setdefault(tuple(r.start for r in self.slab(level, index)) if native else index, []).append(index)

        def task(group: list) -> list:
            return [(i, self.block(level, t, c, i) if then is None else then(self.block(level, t, c, i)))
                    for i in group]

        return [pair for done in self.workers.map(task, groups.values()) for pair in done]

    def dask_array(self, level: int) -> da.Array:
        """Level `level` as a lazy (t, c, z, y, x) dask array chunked like the served chunks."""
        lvl = self.levels[level]
        view = _LevelView(self, level)
        name = f"bil-{'-'.join(map(str, self.key))}-{level}"
        return da.from_array(view, chunks=(1, 1, *lvl.chunks), name=name, fancy=False, asarray=True)


def _frozen(data: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """An array as the cache keeps it: contiguous and read-only."""
    data = np.ascontiguousarray(data, dtype)
    data.flags.writeable = False
    return data


class _LevelView:
    """Array-like adapter so dask can slice a pyramid level."""

    def __init__(self, pyramid: Pyramid, level: int):
        self.pyramid, self.level = pyramid, level
        self.shape = (*pyramid.volume.shape[:2], *pyramid.levels[level].shape)
        self.dtype = pyramid.volume.dtype
        self.ndim = 5

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = tuple(key) + (slice(None),) * (5 - len(key))
        slices = [slice(*k.indices(n)[:2]) if isinstance(k, slice) else slice(k, k + 1)
                  for k, n in zip(key, self.shape)]
        ts, cs, *region = slices
        out = np.empty([max(0, s.stop - s.start) for s in slices], self.dtype)
        if out.size:
            for t, c in itertools.product(range(ts.start, ts.stop), range(cs.start, cs.stop)):
                out[t - ts.start, c - cs.start] = self.pyramid.read(self.level, t, c, tuple(region))
        return out[tuple(0 if isinstance(k, int) else slice(None) for k in key)]
