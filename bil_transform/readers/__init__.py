"""Reader registry: pick the reader from what a path is (suffix, magic bytes, directory contents)."""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path

from .base import Channel, NativeLevel, Reader, Region, SourceError, Volume
from .tiff import TiffFileReader, TiffStackReader, stack_files
from .zarr_source import ZarrReader, is_zarr

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


def _is_tiff_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def _is_glob(path: Path) -> bool:
    return any(ch in str(path) for ch in "*?[") and not path.exists()


# (format name, does this path look like it, how to open it). First match wins.
REGISTRY: list[tuple[str, Callable[[Path], bool], Callable[[Path], Reader]]] = [
    ("zarr", is_zarr, ZarrReader),
    ("tiff", _is_tiff_file, TiffFileReader),
    ("tiff-stack", lambda p: (p.is_dir() or _is_glob(p)) and bool(stack_files(p)), TiffStackReader),
]


def open_source(path: str | Path) -> Reader:
    """Open any supported source, or raise SourceError saying why the path is not one."""
    p = Path(path).expanduser()
    if not p.exists() and not (_is_glob(p) and glob.glob(str(p))):
        raise SourceError(f"{p}: no such file or directory")
    for _name, detect, factory in REGISTRY:
        if detect(p):
            return factory(p)
    raise SourceError(
        f"{p}: not a supported source (expected a TIFF file, a directory or glob of TIFF slices, or Zarr)")


__all__ = ["Channel", "NativeLevel", "Reader", "Region", "SourceError", "Volume", "open_source", "REGISTRY"]
