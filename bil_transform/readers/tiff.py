"""TIFF sources: one multi-page (Big)TIFF, OME-TIFF or ImageJ file, and 2-D TIFF slices for slices.py.

Regions are read by decoding only the strips or tiles they overlap, straight from
the file offsets tifffile parses.
"""

from __future__ import annotations

import functools
import os
import struct
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import tifffile

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
from .slices import SliceFile, SliceInfo

TIFF_SUFFIXES = (".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".ome.tiff")


def read_page_region(page, fh: BinaryIO, name: str, ys: slice, xs: slice, sample: int, version: str,
                     segments: Section, out: np.ndarray | None = None) -> np.ndarray:
    """Decode the strips/tiles of one page that overlap rows `ys` and columns `xs`, into `out`
    if given (a plane of the caller's block, so nothing is copied twice).

    Uncompressed segments are read by row range: a single-strip plane costs the rows a
    region needs, not the whole plane, and full-width rows go straight into `out`. Compressed
    segments are decoded whole, and kept in `segments` when the region uses only part of one.
    `name` is the file's path, for messages and cache keys; `version` keys cached segments to
    the file's state. `fh` is read with os.pread only, so threads may share it.
    """
    key = page.keyframe
    if out is None:
        out = np.empty((ys.stop - ys.start, xs.stop - xs.start), key.dtype)
    if out.size == 0:
        return out
    seg_h, seg_w = key.chunks[0], key.chunks[1]
    n_rows, n_cols = -(-key.imagelength // seg_h), -(-key.imagewidth // seg_w)  # `chunked` puts samples first
    separate = key.planarconfig == 2
    plane = sample * n_rows * n_cols if separate else 0  # planar: each sample's segments follow the last's
    raw = _raw_dtype(key)
    offsets, counts = page.dataoffsets, page.databytecounts
    for win, part in grid_cells((ys, xs), (seg_h, seg_w), (key.imagelength, key.imagewidth)):
        index = plane + win[0].start // seg_h * n_cols + win[1].start // seg_w
        dest = out[within(part, (ys, xs))]
        if counts[index] == 0:
            dest[...] = 0  # sparse segment: fill value
            continue
        if raw is not None:  # only the rows the region needs
            rows = slice(part[0].start, part[0].stop)
            samples = 1 if separate else key.samplesperpixel
            direct = samples == 1 and part[1] == win[1] == xs and raw == out.dtype and dest.flags.c_contiguous
            segment = _raw_rows(fh, name, raw, offsets[index], seg_w, samples, rows.start - win[0].start,
                                rows.stop - win[0].start, into=dest if direct else None)
            if direct:
                continue
            win = (rows, win[1])
        else:
            args = (key, fh, name, offsets[index], counts[index], index)
            segment = (_decoded(*args) if part == win else segments.get_or_compute(
                (name, version, offsets[index]), functools.partial(_decoded, *args)))[0]
        dest[...] = segment[:, :, 0 if separate else sample][within(part, win)]
    return out


def natural_block(key) -> tuple[int, int]:
    """The smallest (rows, columns) a read of this page decodes: a strip or tile, or for
    uncompressed data one row of one."""
    rows = 1 if _raw_dtype(key) is not None else key.chunks[0]
    return min(rows, key.imagelength), min(key.chunks[1], key.imagewidth)


def _raw_dtype(key) -> np.dtype | None:
    """The on-disk dtype of uncompressed, byte-aligned segments; None if they need decoding."""
    if key.compression != 1 or key.predictor != 1 or key.fillorder != 1 or key.dtype is None:
        return None
    if key.bitspersample != 8 * np.dtype(key.dtype).itemsize:
        return None
    return np.dtype(key.dtype).newbyteorder(key.parent.byteorder)


def _raw_rows(fh: BinaryIO, name: str, dtype: np.dtype, offset: int, width: int, samples: int,
              first: int, stop: int, into: np.ndarray | None = None) -> np.ndarray:
    """Rows [first, stop) of an uncompressed segment, as (rows, width, samples), read into
    `into` (contiguous, exactly those bytes) if given."""
    row_bytes = width * samples * dtype.itemsize
    size, start = (stop - first) * row_bytes, offset + first * row_bytes
    if into is None:
        data = os.pread(fh.fileno(), size, start)
        got = len(data)
    else:
        got = os.preadv(fh.fileno(), [memoryview(into).cast("B")], start)
    if got != size:
        raise _cut_short(name, start, size, got)
    return into if into is not None else np.frombuffer(data, dtype).reshape(stop - first, width, samples)


def _decoded(key, fh: BinaryIO, name: str, offset: int, count: int, index: int) -> np.ndarray:
    """One compressed segment, decoded whole: (depth, rows, width, samples)."""
    data = os.pread(fh.fileno(), count, offset)
    if len(data) != count:
        raise _cut_short(name, offset, count, len(data))
    return key.decode(data, index, jpegtables=key.jpegtables)[0]


def _cut_short(name: str, start: int, size: int, got: int) -> SourceError:
    """A read that found fewer bytes than the page's offsets promise: the file was cut after it was
    opened. Never filled in: the missing bytes would be served as zeros or as another file's."""
    return SourceError(f"{name}: the file is truncated: the image data at bytes {start}-{start + size} "
                       f"is cut short ({got} of its {size} bytes are there)")


def _voxel_size(tf: tifffile.TiffFile) -> tuple[float, float, float] | None:
    """Physical voxel size (z, y, x) in micrometers from OME-XML, ImageJ or resolution tags."""
    if tf.is_ome and tf.ome_metadata:
        try:
            root = ET.fromstring(tf.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            sizes = []
            for ax in "ZYX":
                value = pixels.get(f"PhysicalSize{ax}")
                unit = pixels.get(f"PhysicalSize{ax}Unit", "µm")
                sizes.append(float(value) * (um_per_unit(unit) or 1.0) if value else 1.0)
            if pixels.get("PhysicalSizeX"):
                return tuple(sizes)
        except (ET.ParseError, StopIteration, ValueError):
            pass
    page = tf.pages.first
    tags = page.tags
    if "XResolution" not in tags or "YResolution" not in tags:
        return None
    ij = tf.imagej_metadata or {}
    unit = ij.get("unit")
    if unit is not None:
        scale = um_per_unit(unit)
    else:
        scale = {2: 25400.0, 3: 10000.0}.get(int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 2)
    if scale is None:
        return None
    xres, yres = (n / d if d else 0 for n, d in (tags["XResolution"].value, tags["YResolution"].value))
    if xres <= 0 or yres <= 0 or (xres == 1 and yres == 1 and unit is None):
        return None  # the tifffile default of 1 pixel per inch carries no information
    x, y = scale / xres, scale / yres
    z = float(ij["spacing"]) * scale if "spacing" in ij and unit is not None else x
    return (z, y, x)


RGB_CHANNELS = (Channel("red", "FF0000"), Channel("green", "00FF00"), Channel("blue", "0000FF"))


def _channels(tf: tifffile.TiffFile, n: int) -> tuple[Channel, ...]:
    """Names, colours and display ranges from OME-XML or ImageJ metadata; RGB pages are red, green, blue."""
    if n == 3 and tf.pages.first.photometric == tifffile.PHOTOMETRIC.RGB:
        return RGB_CHANNELS
    channels = list(default_channels(n))
    if tf.is_ome and tf.ome_metadata:
        try:
            root = ET.fromstring(tf.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            elements = [el for el in pixels if el.tag.endswith("Channel")]
        except (ET.ParseError, StopIteration):
            elements = []
        if len(elements) == n:
            for i, el in enumerate(elements):
                color = channels[i].color
                if el.get("Color") not in (None, "-1"):  # signed 32-bit RGBA; -1 (white) is the default
                    color = f"{(int(el.get('Color')) >> 8) & 0xFFFFFF:06X}"
                channels[i] = Channel(el.get("Name") or channels[i].name, color)
    elif tf.is_imagej:
        ij = tf.imagej_metadata or {}
        ranges, luts = ij.get("Ranges") or (), ij.get("LUTs") or ()
        for i in range(n):
            window = (float(ranges[2 * i]), float(ranges[2 * i + 1])) if len(ranges) >= 2 * n else None
            color = channels[i].color
            if len(luts) == n and np.shape(luts[i]) == (3, 256):
                color = "".join(f"{int(v):02X}" for v in np.asarray(luts[i])[:, 255])
            channels[i] = Channel(channels[i].name, color, window if window and window[1] > window[0] else None)
    return tuple(channels)


def _open(path: Path, check: Callable[[tifffile.TiffFile, Path], None]) -> tifffile.TiffFile:
    """The parsed file, which `check` confirms still holds what its directories describe."""
    confine.check_file(path)
    try:
        tf = tifffile.TiffFile(path)
    except Exception as exc:  # tifffile raises many types for broken files
        raise SourceError(f"{path}: not a readable TIFF ({exc})") from exc
    try:
        check(tf, path)
    except BaseException:
        tf.close()
        raise
    return tf


def _check_data(path: Path, levels: Sequence[Sequence], size: int) -> None:
    """Refuse pages whose strips or tiles end past the end of the file: cut off, they would read
    as other bytes. `levels` are sequences of pages (resolution levels), `size` the file's."""
    for level, pages in enumerate(levels):
        for i, page in enumerate(pages):
            if page is None or not page.databytecounts:
                continue
            end = max(o + n for o, n in zip(page.dataoffsets, page.databytecounts))
            if end > size:
                kind = "tile" if page.keyframe.is_tiled else "strip"
                where = f" of level {level}" if level else ""
                raise SourceError(f"{path}: the file is truncated: the {kind} data of page {i + 1} of {len(pages)}"
                                  f"{where} ends at byte {end}, past the end of the {size}-byte file")


def _check_stack(tf: tifffile.TiffFile, path: Path) -> None:
    """Refuse a multi-page file that no longer holds every page it had. tifffile stops quietly at a
    page directory past the end of the file and offers the pages before it (a 37-page file cut in
    half opens as 18 pages, or as 1), so the chain of directories must end where it says it ends."""
    size = tf.filehandle.size
    _check_data(path, tf.series[0].levels, size)
    n = len(tf.pages)  # walks the whole chain of page directories
    after = _next_directory(tf, tf.pages[n - 1].offset)
    if after >= size:
        raise SourceError(f"{path}: the file is truncated: page {n} says the next page starts at byte {after}, "
                          f"past the end of the {size}-byte file")
    if after:
        raise SourceError(f"{path}: the file is damaged: page {n} says the next page starts at byte {after}, "
                          "where no page directory can be read")


def _already_checked(tf: tifffile.TiffFile, path: Path) -> None:
    """The file is what was opened and checked (its name, size and mtime are the reader's version)."""


def _check_slice(tf: tifffile.TiffFile, path: Path) -> None:
    """A slice is its first page: only that page's strips or tiles must be there."""
    _check_data(path, [[tf.pages.first]], tf.filehandle.size)


def _next_directory(tf: tifffile.TiffFile, offset: int) -> int:
    """The offset of the page directory after the one at `offset` (0 at the end of the chain),
    read as tifffile reads it."""
    fh, tiff = tf.filehandle, tf.tiff
    fh.seek(offset)
    (tags,) = struct.unpack(tiff.tagnoformat, fh.read(tiff.tagnosize))
    fh.seek(offset + tiff.tagnosize + tags * tiff.tagsize)
    (after,) = struct.unpack(tiff.offsetformat, fh.read(tiff.offsetsize))
    return after


class TiffFileReader:
    """One multi-page TIFF: pages are z (and t/c where the series says so); OME SubIFD levels are native."""

    def __init__(self, path: Path, segments: Section | None = None, root: Path | None = None):
        self.path = Path(path)
        self.root = root or confine.current_root() or confine.default_root(self.path)
        self.segments = segments or uncached("segments")
        self._local = threading.local()
        with _open(self.path, _check_stack) as tf:
            series = tf.series[0]
            key = series.keyframe
            samples = key.samplesperpixel if key.planarconfig in (1, 2) else 1
            axes = series.axes
            lead = [(a, n) for a, n in zip(axes, series.shape) if a not in "YXS"]
            self._lead_shape = tuple(n for _, n in lead)
            self._lead_axes = "".join("z" if a not in "TC" else a.lower() for a, _ in lead)
            if self._lead_axes.count("z") > 1 or (samples > 1 and "c" in self._lead_axes):
                raise SourceError(f"{self.path}: unsupported TIFF series axes {axes!r}")
            size = {a: n for a, n in zip(self._lead_axes, self._lead_shape)}
            self._samples = samples
            n_c = size.get("c", 1) * samples
            levels = []
            y0, x0 = key.imagelength, key.imagewidth
            for lvl in series.levels:
                k = lvl.keyframe
                fy, fx = round(y0 / k.imagelength), round(x0 / k.imagewidth)
                levels.append(NativeLevel((size.get("z", 1), k.imagelength, k.imagewidth), (1, fy, fx)))
            voxel = _voxel_size(tf)
            self.volume = Volume(
                format="tiff",
                path=str(self.path),
                shape=(size.get("t", 1), n_c, size.get("z", 1), y0, x0),
                dtype=np.dtype(key.dtype),
                voxel_size=voxel or (1.0, 1.0, 1.0),
                voxel_size_known=voxel is not None,
                native_levels=tuple(levels),
                block_shape=(1, *natural_block(key)),
                version=version_token([self.path]),
                files=(str(self.path),),
                channels=_channels(tf, n_c),
            )

    def _file(self) -> tifffile.TiffFile:
        tf = getattr(self._local, "tf", None)
        if tf is None:
            # a thread's own handle: the pages were checked at open, and walking every IFD again
            # is needed only if the file has changed since (a cut one must not read as fewer pages)
            unchanged = version_token([self.path]) == self.volume.version
            with confine.confined(self.root):
                tf = self._local.tf = _open(self.path, _already_checked if unchanged else _check_stack)
            tf.pages.cache = True  # parse each page's IFD once per thread, not on every read
        return tf

    def read(self, level: int, t: int, c: int, region: Region) -> np.ndarray:
        check_region(self.volume.native_levels[level].shape, region)
        where = f" of level {level}" if level else ""
        with reading(self.path, f"the pages{where}"):
            tf = self._file()
            pages = tf.series[0].levels[level].pages
        c_axis, sample = divmod(c, self._samples)
        zs, ys, xs = region
        out = np.empty([s.stop - s.start for s in region], self.volume.dtype)
        for i, z in enumerate(range(zs.start, zs.stop)):
            index = {"t": t, "c": c_axis, "z": z}
            flat = np.ravel_multi_index([index[a] for a in self._lead_axes], self._lead_shape) if self._lead_axes else 0
            with reading(self.path, f"page {flat + 1} of {len(pages)}{where}"):
                read_page_region(pages[int(flat)], tf.filehandle, str(self.path), ys, xs, sample,
                                 self.volume.version, self.segments, out[i])
        return out


class TiffSlices:
    """2-D TIFF slices for SliceStackReader. The header is the parsed first page."""

    name = "tiff-stack"
    suffixes = TIFF_SUFFIXES

    def open(self, path: Path) -> tuple:
        with _open(path, _check_slice) as tf:
            page = tf.pages.first
            if page.samplesperpixel > 1 and page.planarconfig not in (1, 2):
                raise SourceError(f"{path}: unsupported sample layout")
            page.decode  # noqa: B018 - build the decoder while the file is open
            return page, _voxel_size(tf)

    def info(self, header: tuple) -> SliceInfo:
        page, voxel = header
        return SliceInfo(page.imagelength, page.imagewidth, page.samplesperpixel, np.dtype(page.dtype),
                         voxel_size=voxel)

    def block(self, header: tuple) -> tuple[int, int]:
        return natural_block(header[0])

    def read(self, header: tuple, where: SliceFile, level: int, ys: slice, xs: slice, sample: int,
             out: np.ndarray) -> None:
        read_page_region(header[0], where.handle(), str(where.path), ys, xs, sample, where.version,
                         where.segments, out)


TIFF_SLICES = TiffSlices()
