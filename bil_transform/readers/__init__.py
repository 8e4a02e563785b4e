"""Reader registry: pick the reader from what a path is (suffix, magic bytes, directory contents)."""

from __future__ import annotations

import glob
from collections.abc import Callable, Mapping
from pathlib import Path

from ..cache import Section
from .base import SELECTIONS, Channel, NativeLevel, Reader, Region, SourceError, Volume, selection_of
from .bdv import BdvReader, is_bdv
from .bounds import check_volume
from .confine import confined, default_root, inside
from .czi import CziReader, is_czi
from .imaris import ImarisReader, is_hdf5
from .jpeg2000 import JPEG2000_SLICES, is_jpeg2000
from .n5 import N5Reader, is_n5
from .slices import SliceStackReader, StackLayout, is_glob, stack_layout
from .tiff import TiffFileReader
from .zarr_source import ZarrReader, is_zarr

TIFF_MAGIC = (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")
SWC = ".swc"


def _is_tiff_file(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) in TIFF_MAGIC


def _one_jpeg2000(path: Path, segments: Section | None = None, root: Path | None = None) -> Reader:
    return SliceStackReader(path, StackLayout(JPEG2000_SLICES, [(path.stem, [path])]), segments, root=root)


def _stack(path: Path, segments: Section | None = None, root: Path | None = None) -> Reader:
    return SliceStackReader(path, segments=segments, root=root)


# (format name, does this path look like it, how to open it with a segments cache and the parts the
# catalog selects, which selections it takes). First match wins: BigDataViewer's HDF5 before Imaris'.
REGISTRY: list[tuple[str, Callable[[Path], bool], Callable[..., Reader], tuple[str, ...]]] = [
    ("zarr", is_zarr, ZarrReader, ()),
    ("n5", is_n5, N5Reader, ("setup",)),
    ("czi", is_czi, CziReader, ("scene",)),
    ("tiff", _is_tiff_file, TiffFileReader, ()),
    ("jpeg2000", is_jpeg2000, _one_jpeg2000, ()),
    ("bdv", is_bdv, BdvReader, ("setup",)),
    ("imaris", is_hdf5, ImarisReader, ()),
    ("slice-stack", lambda p: stack_layout(p) is not None, _stack, ()),
]


def _contents(p: Path) -> str:
    """A short account of what a path holds, for the message that says it is not a source."""
    if p.suffix.lower() == SWC or (p.is_dir() and any(c.suffix.lower() == SWC for c in p.iterdir())):
        return ("SWC tracings, which are served as a skeleton source: a catalog entry with kind = \"skeletons\" "
                "and space = the id of the image they were traced in")
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(8)
        return (f"a file starting with bytes {head!r}, which is not TIFF, JPEG2000, HDF5 (Imaris, BigDataViewer), "
                "a BigDataViewer XML or CZI")
    if p.is_dir():
        suffixes: dict[str, int] = {}
        for child in p.iterdir():
            kind = "directories" if child.is_dir() else (child.suffix.lower() or "no suffix") + " files"
            suffixes[kind] = suffixes.get(kind, 0) + 1
        found = ", ".join(f"{n} {kind}" for kind, n in sorted(suffixes.items())) or "nothing"
        return (f"a directory holding {found}; no Zarr or N5 metadata, TIFF or JPEG2000 slices, or channel "
                "directories of them")
    return "a glob that matches no TIFF or JPEG2000 slices"


def open_source(path: str | Path, segments: Section | None = None,
                selection: Mapping[str, int] | None = None, root: str | Path | None = None) -> Reader:
    """Open any supported source, or raise SourceError saying why the path is not one.
    `segments` keeps decoded source segments that serve several requests (strips, tiles,
    JPEG2000 windows, HDF5 chunks); without it each is decoded whenever it is needed.
    `selection` picks a part of a source holding several (base.SELECTIONS: setup, scene). Every file
    it reads resolves inside `root` (confine.py; default: the path if a directory, else its directory)."""
    p = Path(path).expanduser()
    with confined(root if root is not None else default_root(p)) as inner:
        return _open(p, segments, dict(selection or {}), inner)


def _open(p: Path, segments: Section | None, selection: dict[str, int], root: Path) -> Reader:
    if not p.exists() and not (is_glob(p) and glob.glob(str(p))):
        raise SourceError(f"{p}: no such file or directory")
    if not is_glob(p):
        inside(p)
    for name, detect, factory, takes in REGISTRY:
        if detect(p):
            if wrong := [k for k in selection if k not in takes]:
                key = wrong[0]
                source, part = next((s, w) for n, s, w in SELECTIONS if n == key)
                raise SourceError(f"{p}: {key} = {selection[key]} names a {key} ({part}) of a {source}, and this "
                                  f"is a {name} source; leave {key} out")
            try:
                reader = factory(p, segments, root=root, **selection)
                check_volume(reader.volume)
                return reader
            except SourceError:
                raise
            except Exception as exc:  # a damaged file trips a parser anywhere: say which file, and how
                raise SourceError(f"{p}: damaged or not a readable {name} source ({type(exc).__name__}: {exc})") \
                    from exc
    raise SourceError(f"{p}: not a supported source: {_contents(p)}")


__all__ = ["Channel", "NativeLevel", "Reader", "Region", "SourceError", "Volume", "open_source", "REGISTRY",
           "SELECTIONS", "selection_of"]
