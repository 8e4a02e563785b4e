"""Sanity bounds on what a source claims: checked once, where `open_source` hands a Volume out, so
a file that claims more than the archive holds (an N5 of 2^40 voxels a side in 150 bytes, a
mutated header saying 10^300) is unavailable with one sentence instead of fanning out over
blocks that do not exist. Each format adds what its files can hold where that is cheap to ask
(`check_stored`: HDF5 allocation, N5 blocks present)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import SourceError, Volume

GIB = 2**30


@dataclass(frozen=True)
class Limits:
    """The largest source served. Whole brains are 1-10 TB; the default total is 2^46 voxels
    (140 TB of uint16), so only a claim no microscope makes is refused."""

    axis: int = 2**31  # voxels along z, y or x
    voxels: int = 2**46  # t x c x z x y x x at level 0
    timepoints: int = 100_000
    channels: int = 1024


LIMITS = Limits()


def configure(limits: Limits) -> None:
    """Set the limits every source opened after this is checked against (the server's --max-voxels)."""
    global LIMITS
    LIMITS = limits


def check_volume(volume: Volume, limits: Limits | None = None) -> None:
    """Refuse, in one sentence naming the source, a volume whose claimed size exceeds `limits` or
    whose geometry is not finite numbers (which would reach JSON as NaN or Infinity)."""
    limits = limits or LIMITS
    t, c, *zyx = volume.shape
    where = volume.path
    for name, n, most in (("time points", t, limits.timepoints), ("channels", c, limits.channels),
                          *((f"voxels along {a}", n, limits.axis) for a, n in zip("zyx", zyx))):
        if n > most:
            raise SourceError(f"{where}: claims {_count(n)} {name}, more than the {most:,} a source may have; "
                              "the file's header is damaged or hostile")
    total = math.prod(volume.shape)
    if total > limits.voxels:
        shape = ", ".join(map(_count, volume.shape))
        raise SourceError(f"{where}: claims {_count(total)} voxels (t, c, z, y, x: {shape}), more than the "
                          f"{limits.voxels:,} a source may have (--max-voxels)")
    numbers = [("voxel size", volume.voxel_size), ("origin", volume.origin)]
    for k, lvl in enumerate(volume.native_levels):
        numbers += [(f"level {k} factors", lvl.factors), (f"level {k} translation", lvl.translation or ())]
    for what, values in numbers:
        if not all(math.isfinite(v) for v in values):
            raise SourceError(f"{where}: its {what} (z, y, x) is {tuple(values)}; a registration, voxel size or "
                              "level factor must be finite numbers")


def check_stored(path: object, what: str, claimed: int, stored: int, ratio: int = 2**20) -> None:
    """Refuse a dataset that claims more than a GiB while its file holds less than 1/`ratio` of it:
    by default a millionth, more than any codec compresses, so no voxels were ever written. Sparse
    data (missing chunks or blocks read as the fill value) passes."""
    if claimed > GIB and stored * ratio < claimed:
        raise SourceError(f"{path}: {what} claims {_count(claimed)} bytes and holds {stored:,}; refused as a "
                          "damaged or hostile header")


def _count(n: int) -> str:
    """A number as a sentence may show it: never 301 digits."""
    return f"{n:,}" if n < 10**15 else f"about 10^{len(str(n)) - 1}"
