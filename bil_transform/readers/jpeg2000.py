"""JPEG2000 slices: the wavelet reductions each file stores are native x/y levels.

OpenJPEG (through glymur) decodes an area at a reduction directly, so a coarse level costs a
fraction of a full decode. A request decodes aligned windows of WINDOW x WINDOW voxels of its
level; a window larger than the request is kept in the segments cache for the neighbouring chunks.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import glymur
import numpy as np

from . import confine
from .base import SourceError, grid_cells, reading, within
from .slices import SliceFile, SliceInfo, reduced

SUFFIXES = (".jp2", ".j2k", ".j2c", ".jpc", ".jpx", ".jpf")
MAGIC = (b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")  # JP2 signature box, raw codestream SOC+SIZ
WINDOW = 1024
OPENJPEG = (2, 4)  # the oldest OpenJPEG glymur decodes with (older, or none, fails every decode)


def is_jpeg2000(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(12)
    return any(head.startswith(m) for m in MAGIC)


class Jpeg2000Slices:
    """2-D JPEG2000 slices for SliceStackReader. The header is a parsed glymur.Jp2k."""

    name = "jpeg2000-stack"
    suffixes = SUFFIXES

    def open(self, path: Path) -> glymur.Jp2k:
        confine.check_file(path)
        if not is_jpeg2000(path):
            raise SourceError(f"{path}: not a JPEG2000 file (no JP2 signature or codestream marker)")
        if glymur.version.openjpeg_version_tuple[:2] < OPENJPEG:  # "0.0.0" when glymur found no library
            raise SourceError(f"{path}: JPEG2000 decoding needs the OpenJPEG library {'.'.join(map(str, OPENJPEG))} "
                              f"or newer, which glymur did not find (it found {glymur.version.openjpeg_version}); "
                              "install it (Debian/Ubuntu: apt-get install libopenjp2-7)")
        try:
            return glymur.Jp2k(str(path))
        except Exception as exc:
            raise SourceError(f"{path}: not a readable JPEG2000 file ({exc})") from exc

    def info(self, jp2: glymur.Jp2k) -> SliceInfo:
        siz = jp2.codestream.segment[1]
        cod = next(s for s in jp2.codestream.segment if s.marker_id == "COD")
        if max(siz.bitdepth) > 16:
            raise SourceError(f"{jp2.filename}: {max(siz.bitdepth)}-bit JPEG2000 samples are not supported")
        height, width = jp2.shape[:2]
        return SliceInfo(height, width, len(siz.bitdepth), _dtype(jp2), cod.num_res, voxel_size=_voxel_size(jp2))

    def block(self, jp2: glymur.Jp2k) -> tuple[int, int]:
        return min(WINDOW, jp2.shape[0]), min(WINDOW, jp2.shape[1])

    def read(self, jp2: glymur.Jp2k, where: SliceFile, level: int, ys: slice, xs: slice, sample: int,
             out: np.ndarray) -> None:
        height, width = (reduced(n, level) for n in jp2.shape[:2])
        for win, part in grid_cells((ys, xs), (WINDOW, WINDOW), (height, width)):
            decode = functools.partial(_decode, jp2, level, win)
            if part == win:
                data = decode()
            else:
                key = (str(where.path), where.version, level, win[0].start, win[1].start)
                data = where.segments.get_or_compute(key, decode)
            data = data[within(part, win)]
            out[within(part, (ys, xs))] = data[..., sample] if data.ndim == 3 else data


def _dtype(jp2: glymur.Jp2k) -> np.dtype:
    siz = jp2.codestream.segment[1]
    return np.dtype(f"{'i' if any(siz.signed) else 'u'}{1 if max(siz.bitdepth) <= 8 else 2}")


def _decode(jp2: glymur.Jp2k, level: int, win: tuple[slice, slice]) -> np.ndarray:
    """Decode one window of reduction `level`. Jp2k keeps decode parameters on the object, so
    each decode works on its own shallow copy and threads never share them."""
    step = 2**level
    height, width = jp2.shape[:2]
    rows = slice(win[0].start * step, min(win[0].stop * step, height), step)
    cols = slice(win[1].start * step, min(win[1].stop * step, width), step)
    with reading(jp2.filename, f"reduction level {level}"):
        data = copy.copy(jp2)[rows, cols]
    expected = (win[0].stop - win[0].start, win[1].stop - win[1].start)
    if data.shape[:2] != expected:
        raise SourceError(f"{jp2.filename}: decoded {data.shape[:2]} voxels where {expected} were expected")
    data.flags.writeable = False
    return data


def _voxel_size(jp2: glymur.Jp2k) -> tuple[float, float, float] | None:
    """From the JP2 capture (or display) resolution box, in pixels per metre; z is unknown, so x."""
    boxes = [b for top in jp2.box if top.box_id == "jp2h" for b in top.box if b.box_id == "res "]
    for res in boxes:
        for b in res.box:
            if b.box_id in ("resc", "resd") and b.vertical_resolution > 0 and b.horizontal_resolution > 0:
                y, x = 1e6 / b.vertical_resolution, 1e6 / b.horizontal_resolution
                return (x, y, x)
    return None


JPEG2000_SLICES = Jpeg2000Slices()
