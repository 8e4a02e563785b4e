"""Slice stacks: one 2-D file per z (TIFF or JPEG2000), in a directory, a glob, or one directory per channel.

Only the first slice is opened up front. Every other slice is opened, and checked against
the first, when a region first touches it; its parsed header is then kept (LRU), and so is
an open handle to it (a smaller LRU: a slab of 64 slices reads each of them once).
"""

from __future__ import annotations

import glob
import math
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import numpy as np
from cachetools import LRUCache

from ..cache import Section, uncached
from . import confine
from .base import (
    Channel,
    NativeLevel,
    Region,
    SourceError,
    Volume,
    check_region,
    default_channels,
    natural_key,
    reading,
    version_token,
)

PARSED_SLICES = 4096  # parsed slice headers kept per stack (a few KB each)
OPEN_SLICES = 256  # slice files kept open per stack (well under the usual limit of 1024 descriptors)


class OpenFiles:
    """A bounded LRU of open files, read with os.pread so threads can share them. An evicted
    file closes when the last reader lets go of it (reference counting), never under a reader."""

    def __init__(self, size: int):
        self._files: LRUCache = LRUCache(maxsize=size)
        self._lock = threading.Lock()

    def get(self, path: Path) -> BinaryIO:
        with self._lock:
            fh = self._files.get(path)
        if fh is None:
            fh = confine.open_file(path)  # closed when the LRU and readers drop it
            with self._lock:
                fh = self._files.setdefault(path, fh)
        return fh


@dataclass(frozen=True)
class SliceFile:
    """One slice file as a read sees it: where it is, which version, an open handle to it where
    the format reads the file itself, and the cache for decoded segments larger than a request."""

    path: Path
    version: str
    files: OpenFiles
    segments: Section

    def handle(self) -> BinaryIO:
        return self.files.get(self.path)


@dataclass(frozen=True)
class SliceInfo:
    """What every slice of a stack must share."""

    height: int
    width: int
    samples: int
    dtype: np.dtype
    reductions: int = 0  # native 2x reductions the format stores (JPEG2000 wavelet levels)
    voxel_size: tuple[float, float, float] | None = field(default=None, compare=False)  # z, y, x um

    def describe(self) -> str:
        return f"{self.height}x{self.width}x{self.samples} {self.dtype}"


class SliceFormat(Protocol):
    name: str  # Volume.format, e.g. "tiff-stack"
    suffixes: tuple[str, ...]

    def open(self, path: Path) -> Any:
        """Parse one slice's header; the result is shared between threads. Raises SourceError."""

    def info(self, header: Any) -> SliceInfo: ...

    def block(self, header: Any) -> tuple[int, int]:
        """The slice's natural read unit (rows, columns): a strip, tile or decode window."""

    def read(self, header: Any, where: SliceFile, level: int, ys: slice, xs: slice, sample: int,
             out: np.ndarray) -> None:
        """Rows ys and columns xs of one sample of the slice, at native 2x reduction `level`,
        written into `out` (a plane of the caller's block)."""


def _formats() -> list[SliceFormat]:
    from .jpeg2000 import JPEG2000_SLICES
    from .tiff import TIFF_SLICES

    return [TIFF_SLICES, JPEG2000_SLICES]


def is_glob(path: Path) -> bool:
    return any(ch in str(path) for ch in "*?[") and not path.exists()


def _files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    if path.is_dir():
        found = [f for f in path.iterdir() if f.is_file() and f.name.lower().endswith(suffixes)]
    else:
        found = [Path(f) for f in glob.glob(str(path)) if Path(f).is_file() and f.lower().endswith(suffixes)]
    return sorted(found, key=lambda f: natural_key(f.name))


def _check_numbering(where: Path, files: list[Path]) -> None:
    """Refuse a stack whose names do not follow one pattern, or whose slice numbers skip:
    either would put planes at the wrong z without anyone noticing."""
    if len(files) < 2:
        return
    parts = [re.split(r"(\d+)", f.name) for f in files]
    masked = [tuple("#" if i % 2 else text for i, text in enumerate(p)) for p in parts]
    pattern, _ = Counter(masked).most_common(1)[0]
    if "#" not in pattern:
        names = ", ".join(f.name for f in files[:3]) + (", ..." if len(files) > 3 else "")
        raise SourceError(f"{where}: {len(files)} files ({names}) that are not numbered slices of one stack; "
                          "open one of them, or pick slices with a glob")
    stray = [f for f, m in zip(files, masked) if m != pattern]
    if stray:
        example = files[masked.index(pattern)].name
        raise SourceError(f"{stray[0]}: stray file in a stack of slices named like {example} "
                          f"({len(stray)} such file{'s' if len(stray) > 1 else ''}; move it away or use a glob)")
    varying = [i for i in range(1, len(parts[0]), 2) if len({p[i] for p in parts}) > 1]
    if len(varying) != 1:
        return  # the z number cannot be told apart from other numbers in the names: trust the sort order
    numbers = [int(p[varying[0]]) for p in parts]
    steps = [b - a for a, b in zip(numbers, numbers[1:])]
    step = min(steps)
    for k, s in enumerate(steps):
        if s == 0:
            raise SourceError(f"{files[k + 1]}: slice number {numbers[k]} appears twice in {where} "
                              f"(also {files[k].name})")
        if s != step:
            missing = s // step - 1
            raise SourceError(f"{where}: {missing} slice{'s are' if missing > 1 else ' is'} missing between "
                              f"{files[k].name} and {files[k + 1].name}")


@dataclass(frozen=True)
class StackLayout:
    format: SliceFormat
    channels: list[tuple[str, list[Path]]]  # (channel name, slice files in z order)


def stack_layout(path: Path) -> StackLayout | None:
    """The stack at `path`: a directory or glob of slices, or a directory of channel directories
    of slices; None if `path` is neither. Raises SourceError for a stack that is broken."""
    if not (path.is_dir() or is_glob(path)):
        return None
    for fmt in _formats():
        files = _files(path, fmt.suffixes)
        if files:
            _check_numbering(path, files)
            return StackLayout(fmt, [(path.name, files)])
    if not path.is_dir():
        return None
    subdirs = sorted((d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")),
                     key=lambda d: natural_key(d.name))
    for fmt in _formats():
        channels = [(d.name, _files(d, fmt.suffixes)) for d in subdirs]
        channels = [(name, files) for name, files in channels if files]
        if channels:
            for name, files in channels:
                _check_numbering(path / name, files)
            counts = {len(files) for _, files in channels}
            if len(counts) > 1:
                detail = ", ".join(f"{name}: {len(files)}" for name, files in channels)
                raise SourceError(f"{path}: channel directories hold different numbers of slices ({detail})")
            return StackLayout(fmt, channels)
    return None


class SliceStackReader:
    """Channels x z slices; samples of multi-sample slices (RGB) become channels too."""

    def __init__(self, path: Path | str, layout: StackLayout | None = None, segments: Section | None = None,
                 root: Path | None = None):
        path = Path(path)
        self.root = root or confine.current_root() or confine.default_root(path)
        self.segments = segments or uncached("segments")
        layout = layout or stack_layout(path)
        if layout is None:
            raise SourceError(f"{path}: no TIFF or JPEG2000 slices found")
        self.format = layout.format
        self._files = [files for _, files in layout.channels]
        confine.all_inside([f for files in self._files for f in files], root=self.root)
        first = self._files[0][0]
        with confine.confined(self.root):
            header = self.format.open(first)
        self._slice = s = self.format.info(header)
        for name, files in layout.channels[1:]:  # a channel of another shape would fail mid-response
            other = self.format.info(self.format.open(files[0]))
            if other != s:
                raise SourceError(f"{path}: channel directories {layout.channels[0][0]} ({s.describe()}) and {name} "
                                  f"({other.describe()}) differ in slice shape or type; serve each as a dataset")
        n_z = len(self._files[0])
        levels = [NativeLevel((n_z, reduced(s.height, r), reduced(s.width, r)), (1.0, 2.0**r, 2.0**r))
                  for r in range(s.reductions + 1)]
        if len(layout.channels) > 1:
            names = [f"{name}:{i}" if s.samples > 1 else name for name, _ in layout.channels for i in range(s.samples)]
        else:
            names = [c.name for c in default_channels(s.samples)]
        colors = default_channels(len(names))
        self.volume = Volume(
            format=self.format.name,
            path=str(path),
            shape=(1, len(names), n_z, s.height, s.width),
            dtype=s.dtype,
            voxel_size=s.voxel_size or (1.0, 1.0, 1.0),
            voxel_size_known=s.voxel_size is not None,
            native_levels=tuple(levels),
            block_shape=(1, *self.format.block(header)),
            version=version_token([f for files in self._files for f in files]),
            files=tuple(str(f) for files in self._files for f in files),
            channels=tuple(Channel(n, c.color) for n, c in zip(names, colors)),
        )
        self._headers: LRUCache = LRUCache(maxsize=PARSED_SLICES)
        self._headers[first] = header
        self._open = OpenFiles(OPEN_SLICES)
        self._lock = threading.Lock()

    def _header(self, f: Path):
        with self._lock:
            header = self._headers.get(f)
        if header is None:
            header = self.format.open(f)
            found = self.format.info(header)
            if found != self._slice:
                raise SourceError(f"{f}: slice is {found.describe()}, the stack is {self._slice.describe()}")
            with self._lock:
                self._headers[f] = header
        return header

    def read(self, level: int, t: int, c: int, region: Region) -> np.ndarray:
        check_region(self.volume.native_levels[level].shape, region)
        zs, ys, xs = region
        channel, sample = divmod(c, self._slice.samples)
        out = np.empty([s.stop - s.start for s in region], self.volume.dtype)
        with confine.confined(self.root):  # once a read: it resolves the root
            for i, f in enumerate(self._files[channel][zs]):
                with reading(f, "the slice"):
                    where = SliceFile(f, self.volume.version, self._open, self.segments)
                    self.format.read(self._header(f), where, level, ys, xs, sample, out[i])
        return out


def reduced(n: int, r: int) -> int:
    """Size of an axis of n voxels at 2x reduction r, as JPEG2000 (OpenJPEG) makes it."""
    return math.ceil(n / 2**r)
