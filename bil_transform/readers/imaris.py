"""Imaris .ims (HDF5, Imaris 5.5 layout): every resolution level the file stores is a native level.

Layout and rules: CONFORMANCE.md section 5. Level sizes come from each level's ImageSize*
attributes (never assumed to halve), stored datasets are cropped to them, and the voxel size
is the extent divided by the size.
"""

from __future__ import annotations

import functools
import re
import threading
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the LZ4 filter (32004) that Imaris 9.6+ writes
import numpy as np

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
    grid_cells,
    reading,
    um_per_unit,
    version_token,
    within,
)
from .bounds import check_stored
from .hdf5_chunks import Chunked, chunk_layout, decode_chunk

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def is_hdf5(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(8) == HDF5_MAGIC


def text(value) -> str:
    """An Imaris attribute as text: they are stored as arrays of single characters."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind == "S":
            return b"".join(value.ravel().tolist()).decode("utf-8", "replace")
        return " ".join(str(v) for v in value.ravel())
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _numbered(group: h5py.Group, prefix: str) -> list[int]:
    """Indices of the subgroups named '<prefix> N', sorted."""
    found = (re.fullmatch(rf"{prefix} (\d+)", name) for name in group)
    return sorted(int(m.group(1)) for m in found if m)


class ImarisReader:
    def __init__(self, path: Path, segments: Section | None = None, root: Path | None = None):
        self.path = Path(path)
        self.root = root or confine.current_root() or confine.default_root(self.path)
        self.segments = segments or uncached("segments")
        self._local = threading.local()
        self._layouts: dict[str, Chunked | None] = {}  # per Data path, read once at open
        with confine.open_hdf5(self.path) as f:
            self.volume = self._describe(f)

    def _fail(self, why: str) -> SourceError:
        return SourceError(f"{self.path}: {why}")

    def _describe(self, f: h5py.File) -> Volume:
        if "DataSet/ResolutionLevel 0" not in f:
            raise self._fail("an HDF5 file without DataSet/ResolutionLevel 0, so not an Imaris .ims file")
        dataset = f["DataSet"]
        levels = _numbered(dataset, "ResolutionLevel")
        if levels != list(range(len(levels))):
            missing = sorted(set(range(max(levels) + 1)) - set(levels))
            raise self._fail(f"ResolutionLevel {missing[0]} is missing (the file has levels {levels})")
        times = _numbered(dataset["ResolutionLevel 0"], "TimePoint")
        if not times or times != list(range(len(times))):
            raise self._fail(f"DataSet/ResolutionLevel 0 has time points {times}, expected 0..N-1")
        channels = _numbered(dataset["ResolutionLevel 0/TimePoint 0"], "Channel")
        if not channels or channels != list(range(len(channels))):
            raise self._fail(f"DataSet/ResolutionLevel 0/TimePoint 0 has channels {channels}, expected 0..N-1")
        shapes, dtype, block = [], None, None
        for r in levels:
            shape = None
            for t in times:
                for c in channels:
                    name = f"DataSet/ResolutionLevel {r}/TimePoint {t}/Channel {c}"
                    if f"{name}/Data" not in f:
                        raise self._fail(f"{name}/Data is missing")
                    group, data = f[name], f[f"{name}/Data"]
                    confine.check_hdf5_dataset(data)
                    if r == 0:
                        check_stored(self.path, data.name, data.size * data.dtype.itemsize, data.id.get_storage_size())
                    self._layouts[f"{name}/Data"] = chunk_layout(data)
                    try:
                        size = tuple(int(float(text(group.attrs[f"ImageSize{a}"]))) for a in "ZYX")
                    except (KeyError, ValueError) as exc:
                        raise self._fail(f"{name} has no readable ImageSizeX/Y/Z ({exc})") from exc
                    if data.ndim != 3 or any(s > n for s, n in zip(size, data.shape)):
                        raise self._fail(f"{name}/Data is shaped {data.shape}, smaller than ImageSize {size}")
                    if shape not in (None, size) or (dtype is not None and data.dtype != dtype):
                        raise self._fail(f"{name}/Data differs in size or type from the other channels of level {r}")
                    shape, dtype = size, data.dtype
                    block = block or tuple(min(c, s) for c, s in zip(data.chunks or data.shape, size))
            if shapes and any(s > p for s, p in zip(shape, shapes[-1])):
                raise self._fail(f"ResolutionLevel {r} ({shape}) is larger than the level before it ({shapes[-1]})")
            shapes.append(shape)
        if dtype.kind not in "uif":
            raise self._fail(f"voxel type {dtype} is not a number type")
        voxel, origin = self._geometry(f, shapes[0])
        return Volume(
            format="imaris",
            path=str(self.path),
            shape=(len(times), len(channels), *shapes[0]),
            dtype=np.dtype(dtype),
            voxel_size=voxel or (1.0, 1.0, 1.0),
            voxel_size_known=voxel is not None,
            origin=origin,
            native_levels=tuple(
                NativeLevel(s, tuple(n0 / n for n0, n in zip(shapes[0], s))) for s in shapes
            ),
            block_shape=block,
            version=version_token([self.path]),
            files=(str(self.path),),
            channels=self._channels(f, len(channels)),
        )

    def _geometry(self, f: h5py.File, shape: tuple[int, int, int]):
        """Voxel size and the centre of voxel 0, z, y, x micrometers. The extents lie on voxel
        borders: voxel = (ExtMax - ExtMin) / size."""
        attrs = f["DataSetInfo/Image"].attrs if "DataSetInfo/Image" in f else {}
        try:
            lo = [float(text(attrs[f"ExtMin{i}"])) for i in (2, 1, 0)]
            hi = [float(text(attrs[f"ExtMax{i}"])) for i in (2, 1, 0)]
        except (KeyError, ValueError):
            return None, (0.0, 0.0, 0.0)
        unit = text(attrs["Unit"]).strip().lower() if "Unit" in attrs else "um"
        scale = um_per_unit(unit or "um") or 1.0
        voxel = tuple((b - a) / n * scale for a, b, n in zip(lo, hi, shape))
        if not all(v > 0 for v in voxel):
            return None, (0.0, 0.0, 0.0)
        return voxel, tuple(a * scale + v / 2 for a, v in zip(lo, voxel))

    @staticmethod
    def _channels(f: h5py.File, n: int) -> tuple[Channel, ...]:
        """Names, colours and display ranges from DataSetInfo/Channel c, where the file has them."""
        out = []
        for c, default in enumerate(default_channels(n)):
            attrs = f[f"DataSetInfo/Channel {c}"].attrs if f"DataSetInfo/Channel {c}" in f else {}
            name = text(attrs["Name"]).strip() if "Name" in attrs else ""
            color, window = default.color, None
            try:
                rgb = [float(v) for v in text(attrs["Color"]).split()]
                if len(rgb) == 3:
                    color = "".join(f"{round(min(max(v, 0.0), 1.0) * 255):02X}" for v in rgb)
            except (KeyError, ValueError):
                pass
            try:
                lo, hi = (float(v) for v in text(attrs["ColorRange"]).split())
                window = (lo, hi) if hi > lo else None
            except (KeyError, ValueError):
                pass
            out.append(Channel(name or default.name, color, window))
        return tuple(out)

    def _file(self) -> h5py.File:
        """One handle per worker thread. h5py serializes HDF5 calls under one lock, so only raw chunk
        bytes are read through it; chunks are decompressed outside it (hdf5_chunks)."""
        f = getattr(self._local, "file", None)
        if f is None:
            with confine.confined(self.root):
                f = self._local.file = confine.open_hdf5(self.path)
        return f

    def read(self, level: int, t: int, c: int, region: Region) -> np.ndarray:
        check_region(self.volume.native_levels[level].shape, region)
        name = f"DataSet/ResolutionLevel {level}/TimePoint {t}/Channel {c}/Data"
        with reading(self.path, name):
            data = self._file()[name]
            layout = self._layouts[name]
            if layout is None:  # a filter we do not decode ourselves: let HDF5 do all of it
                return data[region]
            out = np.empty([s.stop - s.start for s in region], self.volume.dtype)
            for chunk, part in grid_cells(region, layout.chunks, data.shape):
                origin = tuple(s.start for s in chunk)
                fetch = functools.partial(decode_chunk, data.id, origin, layout)
                with reading(self.path, f"the chunk at voxel {origin} of {name}"):
                    block = fetch() if part == chunk else self.segments.get_or_compute(
                        (str(self.path), self.volume.version, name, origin), fetch)
                out[within(part, region)] = block[within(part, chunk)]
            return out
