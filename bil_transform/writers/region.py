"""The region endpoint's body: any box of any level, as .npy, ImageJ TIFF or raw bytes.

`/ds/ID/region?level=L&z=A:B&y=C:D&x=E:F[&t=T|A:B][&c=C|A:B|0,2][&coords=level|full][&format=npy|tiff|raw]`

The box is read through the same pyramid (and so the same cached blocks) as the views. Every
format streams in pieces of bounded size (planes, rows of a plane, or pieces of a row), so a large
box never sits whole in memory: TIFF too, uncompressed, its layout written by tifffile up front.
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
PIECE_BYTES = 4 * 2**20  # the most one piece of a region body holds, unless the server asks for less


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

    def pieces(self, limit: int) -> Iterator[tuple[int, int, tuple[slice, slice, slice]]]:
        """The box as (time, channel, (z, y, x) slices) in the order its bytes go out (C order of
        (t, c, z, y, x); (t, z, c, y, x), ImageJ's, for TIFF), each holding at most `limit` bytes
        (and never less than one voxel): whole planes up to a chunk deep, else rows of one plane,
        else pieces of one row."""
        (z0, z1), (y0, y1), (x0, x1) = self.box
        item = self.dtype.itemsize
        row = (x1 - x0) * item
        plane = row * (y1 - y0)
        interleaved = self.format == "tiff" and len(self.channels) > 1  # a TIFF page is one plane of one channel
        depth = 1 if interleaved else max(1, min(self.pyramid.levels[self.level].chunks[0], limit // plane))

        def within(z: int) -> Iterator[tuple[slice, slice, slice]]:
            zs = slice(z, min(z + depth, z1))
            if plane <= limit:
                yield zs, slice(y0, y1), slice(x0, x1)
            elif row <= limit:
                rows = limit // row
                for y in range(y0, y1, rows):
                    yield zs, slice(y, min(y + rows, y1)), slice(x0, x1)
            else:
                width = max(1, limit // item)
                for y in range(y0, y1):
                    for x in range(x0, x1, width):
                        yield zs, slice(y, y + 1), slice(x, min(x + width, x1))

        for t in self.times:
            if interleaved:
                for z in range(z0, z1):
                    for c in self.channels:
                        yield from ((t, c, box) for box in within(z))
            else:
                for c in self.channels:
                    for z in range(z0, z1, depth):
                        yield from ((t, c, box) for box in within(z))

    def read(self, t: int, c: int, box: tuple[slice, slice, slice]) -> np.ndarray:
        """One piece, C-contiguous in the region's (little-endian) dtype."""
        return np.ascontiguousarray(self.pyramid.read(self.level, t, c, box), self.dtype)


class _Sparse:
    """A write-only file that keeps what tifffile writes except the pixel data, which it skips
    (tifffile seeks over an empty array's bytes): the TIFF's layout, without its size in memory."""

    def __init__(self) -> None:
        self.pos, self.end = 0, 0
        self.parts: list[tuple[int, bytes]] = []  # in the order written: a later write wins

    def write(self, data: bytes) -> int:
        self.parts.append((self.pos, bytes(data)))
        self.pos += len(data)
        self.end = max(self.end, self.pos)
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = (0, self.pos, self.end)[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        pass

    def seekable(self) -> bool:
        return True

    def span(self, start: int, stop: int) -> bytes:
        """Bytes [start, stop), zeros where nothing was written."""
        out = bytearray(stop - start)
        for at, data in self.parts:
            lo, hi = max(at, start), min(at + len(data), stop)
            if lo < hi:
                out[lo - start:hi - start] = data[lo - at:hi - at]
        return bytes(out)


def _tiff_layout(region: Region) -> tuple[bytes, bytes]:
    """An uncompressed ImageJ hyperstack's bytes before and after its pixel data, which lie
    between them in one contiguous run in (t, z, c, y, x) order: written by tifffile without the
    data, so a TIFF region streams like npy, band by band."""
    r = region
    voxel = [v * f for v, f in zip(r.pyramid.volume.voxel_size, r.pyramid.levels[r.level].factors)]
    t, c, z, y, x = r.shape
    sink = _Sparse()
    tifffile.imwrite(sink, shape=(t, z, c, y, x), dtype=r.dtype, byteorder="<", imagej=True,
                     resolution=(1 / voxel[2], 1 / voxel[1]),
                     metadata={"axes": "TZCYX", "spacing": voxel[0], "unit": "um"})
    with tifffile.TiffFile(io.BytesIO(sink.span(0, min(sink.end, 1 << 16)))) as tif:
        page = tif.pages.first
        if page.compression != 1 or not tif.is_imagej:
            raise RuntimeError("tifffile wrote no uncompressed ImageJ TIFF")  # its pixels would not be one run
        start = page.dataoffsets[0]
    stop = start + r.nbytes
    return sink.span(0, start), sink.span(stop, sink.end)


class RegionBody:
    """A region as a body (resource.py's contract): never cached whole, streamed piece by piece,
    each at most `piece_bytes`, whatever the format. Its length is known before any voxel is read."""

    compressible = False
    streamed = False  # its length is known

    def __init__(self, region: Region, piece_bytes: int = PIECE_BYTES):
        self.region = region
        self.piece_bytes = piece_bytes
        self.content_type = FORMATS[region.format]
        self.key: Hashable = ("region", *region.pyramid.key, region.level, region.times, region.channels,
                              region.box, region.format)
        self.headers = {"X-Shape": ",".join(map(str, region.shape)), "X-Dtype": region.dtype.str}
        if region.format == "npy":
            header = io.BytesIO()
            np.lib.format.write_array_header_1_0(
                header, {"descr": region.dtype.str, "fortran_order": False, "shape": region.shape})
            self._head, self._tail = header.getvalue(), b""
        else:
            self._head, self._tail = b"", b""
        # A TIFF's layout (tifffile writes an IFD a page) is made once, on a worker, by size().
        self.length = None if region.format == "tiff" else len(self._head) + region.nbytes

    @property
    def in_flight(self) -> int:
        """What a response holds at most while it streams: a piece, its copy in the socket's
        buffer, and the header and trailer (a TIFF's IFDs)."""
        return 2 * self.piece_bytes + len(self._head) + len(self._tail)

    def peek(self) -> None:
        return None

    def size(self) -> int:
        if self.length is None:
            self._head, self._tail = _tiff_layout(self.region)
            self.length = len(self._head) + self.region.nbytes + len(self._tail)
        return self.length

    def _parts(self) -> Iterator[tuple[int, int, bytes | tuple]]:
        """(offset, length, bytes at hand or a piece to read) in order."""
        self.size()
        yield 0, len(self._head), self._head
        offset, item = len(self._head), self.region.dtype.itemsize
        for t, c, box in self.region.pieces(self.piece_bytes):
            n = math.prod(s.stop - s.start for s in box) * item
            yield offset, n, (t, c, box)
            offset += n
        yield offset, len(self._tail), self._tail

    def read(self, start: int, stop: int) -> Iterator[memoryview]:
        """Bytes [start, stop), reading only the pieces they cover. Bytes at hand (a header) wait
        for the first piece read, so a failure to read shows before anything is sent."""
        held: list[memoryview] = []
        for offset, n, part in self._parts():
            if offset >= stop:
                break
            if offset + n <= start or n == 0:
                continue
            data = part if isinstance(part, bytes) else self.region.read(*part)
            view = memoryview(data).cast("B")[max(0, start - offset):stop - offset]
            if isinstance(part, bytes):
                held.append(view)
                continue
            yield from held
            held = []
            yield view
        yield from held
