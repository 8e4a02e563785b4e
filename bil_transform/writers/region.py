"""The region endpoint's body: any box of any level, as .npy, ImageJ TIFF or raw bytes.

`/ds/ID/region?level=L&z=A:B&y=C:D&x=E:F[&t=T|A:B][&c=C|A:B|0,2][&coords=level|full][&format=npy|tiff|raw]`

The box is read through the same pyramid (and so the same cached blocks) as the views. npy and
raw are streamed one plane band at a time, so a large box never sits whole in memory; TIFF is
written whole (tifffile needs the array), which the size limit bounds.
"""

from __future__ import annotations

import io
import math
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import tifffile

from ..pyramid import Pyramid
from .resource import BINARY

FORMATS = {"npy": "application/octet-stream", "raw": BINARY, "tiff": "image/tiff"}
IMAGEJ_DTYPES = ("uint8", "uint16", "float32")


class RegionTooLarge(ValueError):
    """The box asked for is larger than the server's limit (413); the message gives both."""


def _span(text: str, n: int, name: str) -> tuple[int, int]:
    """'A:B' (either side may be empty) or 'A' as [start, stop) within [0, n)."""
    lo, colon, hi = text.partition(":")
    try:
        start = int(lo) if lo.strip() else 0
        stop = (int(hi) if hi.strip() else n) if colon else start + 1
    except ValueError:
        raise ValueError(f"{name}={text!r} must be START:STOP in voxels, like {name}=0:64") from None
    if not 0 <= start < stop <= n:
        raise ValueError(f"{name}={text!r} is outside 0:{n} (or empty)")
    return start, stop


@dataclass(frozen=True)
class Region:
    """One box of one level: time points, channels, and z, y, x ranges in that level's voxels."""

    pyramid: Pyramid
    level: int
    times: tuple[int, ...]
    channels: tuple[int, ...]
    box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    format: str

    @classmethod
    def parse(cls, pyramid: Pyramid, query: Mapping[str, str], max_bytes: int) -> Region:
        """The region a query asks for. ValueError with one sentence if it is malformed or out of
        bounds, RegionTooLarge if it holds more than `max_bytes`."""
        known = {"level", "z", "y", "x", "t", "c", "coords", "format"}
        unknown = sorted(set(query) - known)
        if unknown:
            raise ValueError(f"unknown parameter {unknown[0]!r}; a region takes {', '.join(sorted(known))}")
        fmt = query.get("format", "npy")
        if fmt not in FORMATS:
            raise ValueError(f"format={fmt!r} is not one of {', '.join(FORMATS)}")
        levels = len(pyramid.levels)
        text = query.get("level", "0")
        if not text.isdigit() or int(text) >= levels:
            raise ValueError(f"level={text!r} must be a level number from 0 to {levels - 1}")
        level = int(text)
        coords = query.get("coords", "level")
        if coords not in ("level", "full"):
            raise ValueError(f"coords={coords!r} must be 'level' (the level's voxels) or 'full' (level 0's)")
        lvl = pyramid.levels[level]
        full = pyramid.levels[0].shape
        box = []
        for axis, n, n0, factor in zip("zyx", lvl.shape, full, lvl.factors):
            if coords == "full":  # level-0 voxels: the level's voxels that cover them
                start, stop = _span(query.get(axis, ":"), n0, axis)
                box.append((min(int(start // factor), n - 1), min(n, max(int(start // factor) + 1,
                                                                          math.ceil(stop / factor)))))
            else:
                box.append(_span(query.get(axis, ":"), n, axis))
        n_t, n_c = pyramid.volume.shape[:2]
        times = tuple(range(*_span(query.get("t", ":"), n_t, "t")))
        text = query.get("c", ":")
        if "," in text:
            try:
                channels = tuple(int(c) for c in text.split(","))
            except ValueError:
                raise ValueError(f"c={text!r} must be channel numbers, like c=0,2") from None
            if not all(0 <= c < n_c for c in channels):
                raise ValueError(f"c={text!r} names a channel outside 0:{n_c}")
        else:
            channels = tuple(range(*_span(text, n_c, "c")))
        region = cls(pyramid, level, times, channels, tuple(box), fmt)
        if region.nbytes > max_bytes:
            raise RegionTooLarge(f"the region is {region.nbytes} bytes; the limit is {max_bytes} (--max-region)")
        if fmt == "tiff" and region.dtype.name not in IMAGEJ_DTYPES:
            raise ValueError(f"an ImageJ TIFF holds {', '.join(IMAGEJ_DTYPES)}, not {region.dtype.name}; "
                             "use format=npy or format=raw")
        return region

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.pyramid.volume.dtype).newbyteorder("<")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.times), len(self.channels), *(b - a for a, b in self.box))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def bands(self) -> Iterator[np.ndarray]:
        """The box in C order, one (time, channel, chunk-deep z band) at a time."""
        (z0, z1), ys, xs = self.box
        depth = self.pyramid.levels[self.level].chunks[0]
        for t in self.times:
            for c in self.channels:
                for z in range(z0, z1, depth):
                    zs = slice(z, min(z + depth, z1))
                    yield self.pyramid.read(self.level, t, c, (zs, slice(*ys), slice(*xs)))


class RegionBody:
    """A region as a body (resource.py's contract): never cached whole, streamed band by band."""

    compressible = False
    streamed = False  # its length is known (npy, raw) or it is made whole (tiff)

    def __init__(self, region: Region):
        self.region = region
        self.content_type = FORMATS[region.format]
        self.key: Hashable = ("region", *region.pyramid.key, region.level, region.times, region.channels,
                              region.box, region.format)
        self.headers = {"X-Shape": ",".join(map(str, region.shape)), "X-Dtype": region.dtype.str}
        if region.format == "npy":
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": region.dtype.str, "fortran_order": False, "shape": region.shape})
            self._head = header.getvalue()
        else:
            self._head = b""
        self.length = len(self._head) + region.nbytes if region.format != "tiff" else None

    def peek(self) -> None:
        return None

    def size(self) -> int:
        return self.length if self.length is not None else len(self._tiff())

    def _tiff(self) -> bytes:
        r = self.region
        data = np.empty(r.shape, r.dtype)
        flat = data.reshape(-1, *r.shape[3:])
        row = 0
        for band in r.bands():
            flat[row:row + len(band)] = band
            row += len(band)
        voxel = [v * f for v, f in zip(r.pyramid.volume.voxel_size, r.pyramid.levels[r.level].factors)]
        out = io.BytesIO()
        tifffile.imwrite(out, data.transpose(0, 2, 1, 3, 4), imagej=True, resolution=(1 / voxel[2], 1 / voxel[1]),
                         metadata={"axes": "TZCYX", "spacing": voxel[0], "unit": "um"})
        return out.getvalue()

    def read(self, start: int, stop: int) -> Iterator[memoryview]:
        pieces = [self._tiff()] if self.region.format == "tiff" else self._stream()
        offset = 0
        for piece in pieces:
            view = memoryview(piece).cast("B")
            if offset + len(view) > start and offset < stop:
                yield view[max(0, start - offset):stop - offset]
            offset += len(view)
            if offset >= stop:
                return

    def _stream(self) -> Iterator[bytes | np.ndarray]:
        yield self._head
        for band in self.region.bands():
            yield np.ascontiguousarray(band, self.region.dtype)
