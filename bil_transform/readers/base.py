"""The one model every reader produces: a `Volume` with (t, c, z, y, x) axes."""

from __future__ import annotations

import hashlib
import itertools
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

Region = tuple[slice, slice, slice]  # z, y, x; start/stop always set, step 1
# Which part of a source holding several a dataset is: (catalog field, the format whose parts it
# names, what such a part is). A reader that takes one gets it as a keyword argument; None or absent:
# the first part.
SELECTIONS = (("setup", "BigDataViewer dataset (HDF5 or N5)", "its tile, angle or illumination"),
              ("scene", "Zeiss CZI file", "one region of the slide or sample"))


def selection_of(holder: object) -> dict[str, int]:
    """The parts `holder` (a catalog entry, the command line's arguments) selects, as readers take them."""
    return {name: value for name, *_ in SELECTIONS if (value := getattr(holder, name, None)) is not None}


# Micrometres per unit of length, as files write the unit (TIFF, OME, ImageJ, Imaris, NGFF, BigDataViewer,
# N5): one table for every reader, matched without case or surrounding spaces by um_per_unit.
_UM_PER_UNIT = {
    **dict.fromkeys(("um", "\u00b5m", "\u03bcm", "micron", "microns", "micrometer", "micrometers", "micrometre",
                     "micrometres"), 1.0),
    **dict.fromkeys(("nm", "nanometer", "nanometers", "nanometre", "nanometres"), 1e-3),
    **dict.fromkeys(("mm", "millimeter", "millimeters", "millimetre", "millimetres"), 1e3),
    **dict.fromkeys(("m", "meter", "meters", "metre", "metres"), 1e6),
    "cm": 1e4, "pm": 1e-6, "angstrom": 1e-4, "\u00e5": 1e-4,
}


def um_per_unit(unit: object) -> float | None:
    """Micrometres per `unit` of length, None for anything that is not one (a missing unit included)."""
    return _UM_PER_UNIT.get(str(unit).strip().lower())


class SourceError(Exception):
    """A source file cannot be read. The message names the file and says why."""


@contextmanager
def reading(path: Path | str, what: str) -> Iterator[None]:
    """Turn whatever a parser or decoder raises while reading `what` of the file `path` into one
    SourceError naming both: damage, or a change since the file was opened, trips libraries
    (h5py, tifffile, imagecodecs, glymur, zarr) anywhere, each with its own exception types."""
    try:
        yield
    except (SourceError, MemoryError):
        raise
    except Exception as exc:
        raise SourceError(f"{path}: {what} cannot be read; the file is damaged or has changed since it was "
                          f"opened ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class Channel:
    name: str
    color: str = "FFFFFF"  # 6 hex digits, no '#'
    window: tuple[float, float] | None = None  # display start/end, where the source has one


@dataclass(frozen=True)
class NativeLevel:
    """A resolution level the source stores itself."""

    shape: tuple[int, int, int]  # z, y, x
    factors: tuple[float, float, float]  # voxel size relative to level 0, z, y, x (Imaris: 75/38, not 2)
    translation: tuple[float, float, float] | None = None  # centre of its voxel 0, z, y, x um, as the source says


@dataclass(frozen=True)
class Volume:
    """What a reader sees. Axes are always (t, c, z, y, x)."""

    format: str
    path: str
    shape: tuple[int, int, int, int, int]
    dtype: np.dtype
    voxel_size: tuple[float, float, float]  # z, y, x micrometers at level 0
    native_levels: tuple[NativeLevel, ...]
    block_shape: tuple[int, int, int]  # natural read unit of the source, z, y, x
    version: str  # version_token(files)
    channels: tuple[Channel, ...] = ()
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # centre of voxel 0 at level 0, z, y, x micrometers
    voxel_size_known: bool = True
    kind: str = "image"
    notes: tuple[str, ...] = field(default=())
    files: tuple[str, ...] = ()  # the files whose names, sizes and mtimes make the version
    label_colors: tuple[tuple[int, tuple[int, int, int, int]], ...] = ()  # label value -> RGBA, where the source says

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return self.shape[2:]


class Reader(Protocol):
    volume: Volume

    def read(self, level: int, t: int, c: int, region: Region) -> np.ndarray:
        """Return the (z, y, x) block `region` of native `level`, reading only what it needs.

        Must be thread-safe. Raises SourceError naming the file for unreadable data.
        """
        ...


def natural_key(name: str) -> list:
    """Sort key that orders 'z2' before 'z10'."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def version_token(paths: Sequence[Path | str]) -> str:
    """A short token that changes when any of the files changes: name, size, mtime, and the inode
    and ctime, which a rewrite that keeps size and mtime (`cp -p`, `rsync -a`) cannot set back."""
    h = hashlib.blake2b(digest_size=8)
    for p in paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\0".encode())
    return h.hexdigest()


def default_channels(n: int) -> tuple[Channel, ...]:
    """Grey for one channel; green, magenta, cyan, ... for several (readable on black)."""
    if n == 1:
        return (Channel("ch0"),)
    palette = ["00FF00", "FF00FF", "00FFFF", "FF0000", "0000FF", "FFFF00", "FFFFFF"]
    return tuple(Channel(f"ch{i}", palette[i % len(palette)]) for i in range(n))


def check_region(shape: Sequence[int], region: Region) -> None:
    for s, n in zip(region, shape):
        if not (0 <= s.start <= s.stop <= n):
            raise ValueError(f"region {region} is outside the level shape {tuple(shape)}")


def grid_cells(region: Sequence[slice], cell: Sequence[int], shape: Sequence[int]):
    """The cells of a regular grid (chunks, tiles, decode windows) that `region` overlaps, as
    (the cell clipped to `shape`, the part of the region inside it)."""
    starts = [range(r.start - r.start % c, r.stop, c) for r, c in zip(region, cell)]
    for origin in itertools.product(*starts):
        win = tuple(slice(o, min(o + c, n)) for o, c, n in zip(origin, cell, shape))
        yield win, tuple(slice(max(r.start, w.start), min(r.stop, w.stop)) for r, w in zip(region, win))


def within(inner: Sequence[slice], outer: Sequence[slice]) -> tuple[slice, ...]:
    """`inner` in the coordinates of `outer`'s first voxel."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))
