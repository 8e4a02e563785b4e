"""Confinement: every file a source reads resolves inside its dataset's root, and is a regular file.

Source files are untrusted input: an XML, N5 or Zarr path may climb with `../` or be absolute, a slice
or block may be a symlink to any file (the server's own tokens file) or to /dev/zero, a FIFO blocks
whoever opens it, and HDF5 follows whatever a file asks for (external links, external storage, virtual
datasets). So each reader resolves every path it opens here (os.path.realpath, symlinks followed) and
refuses one outside the root in one sentence naming the file and what it points at; it opens files
non-blocking and reads them only if fstat says they are regular; and a whole-file read is capped at
the size the format expects. The root is the catalog path's directory unless the operator widens it
in the catalog (`root = ...`); a file's own say-so never widens it.

The root of the source being opened or read on this thread is a context variable (`confined`), so the
format's own helpers check their paths without each taking it as an argument; readers set it from the
root they keep for the reads of their worker threads.
"""

from __future__ import annotations

import contextvars
import glob
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .base import SourceError

_ROOT: contextvars.ContextVar[Path | None] = contextvars.ContextVar("bil_transform_root", default=None)
# HDF5 resolves a relative external link, external-storage or virtual-source name against these (when set),
# the file's own directory and the working directory: every one that exists must be inside the root.
HDF5_PREFIX_VARIABLES = ("HDF5_EXT_PREFIX", "HDF5_EXTFILE_PREFIX", "HDF5_VDS_PREFIX")
HDF5_DEPTH = 8  # files reached through files reached through ... (external links, virtual sources)


def default_root(path: str | Path) -> Path:
    """A source's root when the catalog does not widen it: the path if a directory, else the directory
    holding the file (or, for a glob, the deepest directory above its first wildcard)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    p = p.parent
    while glob.has_magic(str(p)) and p != p.parent:
        p = p.parent
    return p


@contextmanager
def confined(root: str | Path | None) -> Iterator[Path | None]:
    """Check every path opened in this block against `root` (resolved)."""
    resolved = Path(os.path.realpath(root)) if root is not None else None
    token = _ROOT.set(resolved)
    try:
        yield resolved
    finally:
        _ROOT.reset(token)


def current_root() -> Path | None:
    return _ROOT.get()


def _outside(path: Path, real: Path, root: Path, named_by: str | Path | None) -> SourceError:
    who = named_by or path
    return SourceError(f"{who}: refers to {real} outside the dataset's root {root}, so it is not read; move it "
                       "inside, or the operator may widen the dataset's root in the catalog (root = ...)")


def inside(path: str | Path, named_by: str | Path | None = None, root: Path | None = None) -> Path:
    """`path` resolved (symlinks followed, `..` removed); SourceError if that leaves the root.
    `named_by`: the file that named the path, for the message."""
    root = Path(os.path.realpath(root)) if root is not None else _ROOT.get()  # the context's is resolved
    real = Path(os.path.realpath(path))
    if root is not None:
        if real != root and not real.is_relative_to(root):
            raise _outside(Path(path), real, root, named_by)
    return real


def open_file(path: str | Path, named_by: str | Path | None = None, root: Path | None = None) -> BinaryIO:
    """`path` opened for reading if it resolves inside the root and is a regular file: opened non-blocking
    (a FIFO never blocks the worker) without following a last symlink, then checked with fstat.
    FileNotFoundError where it does not exist."""
    return _open_regular(inside(path, named_by, root), path)


def _open_regular(real: Path, shown: str | Path) -> BinaryIO:
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(real, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise SourceError(f"{shown}: {_kind(mode)}, not a regular file, so it is not read")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def check_file(path: str | Path, named_by: str | Path | None = None, root: Path | None = None) -> Path:
    """The resolved path of a regular file inside the root, for a library that opens it by name
    (h5py, tifffile, OpenJPEG, libCZI); SourceError otherwise."""
    real = inside(path, named_by, root)
    with _open_regular(real, path):
        pass
    return real


def read_bytes(path: str | Path, limit: int, what: str = "", root: Path | None = None) -> bytes:
    """A whole regular file inside the root, of at most `limit` bytes (`what` says what the format
    expects, for the message); FileNotFoundError where it does not exist."""
    with open_file(path, None, root) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise SourceError(f"{path}: {size} bytes, more than the {limit} {what or 'this file can hold'}, "
                              "so it is not read")
        data = f.read(size + 1)  # one byte more than fstat said: a file growing past the limit is refused
    if len(data) > limit:
        raise SourceError(f"{path}: more than the {limit} bytes {what or 'this file can hold'}, so it is not read")
    return data


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return name
    return "a special file"


# ---- HDF5 ---------------------------------------------------------------------------------------------

def _hdf5_candidates(name: str, holder: Path) -> list[Path]:
    """Where HDF5 may look for a file an HDF5 file at `holder` names: as given, and (relative names, or an
    absolute one's last component when it is missing) under the prefix variables, the holder's directory
    and the working directory."""
    given = Path(name)
    out = [given] if given.is_absolute() else []
    relative = given if not given.is_absolute() else Path(given.name)
    bases = [Path(p) for var in HDF5_PREFIX_VARIABLES for p in os.environ.get(var, "").split(os.pathsep) if p]
    out += [b / relative for b in [*bases, holder.parent, Path.cwd()]]
    return out


def _hdf5_target(name: str, holder: Path, what: str) -> list[Path]:
    """The files (inside the root, regular) an HDF5 name may reach; SourceError for any that leaves."""
    if "%" in name:  # a virtual source's printf-style pattern: which files it reaches cannot be said
        raise SourceError(f"{holder}: {what} names {name!r}, a file pattern, which is not followed")
    found = []
    for candidate in _hdf5_candidates(name, holder):
        if os.path.lexists(candidate):
            real = inside(candidate, f"{holder}: {what}")
            with open_file(real, f"{holder}: {what}"):
                pass
            found.append(real)
    return found


def check_hdf5_links(f, seen: set[Path] | None = None, depth: int = 0) -> None:
    """Every external link of an open h5py.File (and of the files they reach, inside the root) names
    files inside the root only; soft links stay inside their file, so they reach outside only through
    an external link. Raises SourceError naming the link and its target."""
    import h5py

    holder = Path(f.filename)
    seen = seen if seen is not None else set()
    if holder in seen or depth > HDF5_DEPTH:
        return
    seen.add(holder)
    links: list[tuple[str, str]] = []

    def visit(name: str, link) -> None:
        if isinstance(link, h5py.ExternalLink):
            links.append((name, link.filename))

    f.visititems_links(visit)
    for name, target in links:
        for real in _hdf5_target(target, holder, f"the external link /{name}"):
            if real != holder and real not in seen:
                with h5py.File(real, "r") as other:
                    check_hdf5_links(other, seen, depth + 1)


def check_hdf5_dataset(data, depth: int = 0) -> None:
    """A dataset the reader will read keeps to the root: no external storage and no virtual source in a
    file outside it (a virtual source's own dataset checked the same way)."""
    import h5py

    holder = Path(data.file.filename)
    for name, *_ in data.external or ():
        _hdf5_target(name.decode() if isinstance(name, bytes) else name, holder,
                     f"{data.name} (external storage)")
    if not data.is_virtual:
        return
    if depth > HDF5_DEPTH:
        raise SourceError(f"{holder}: {data.name} is a virtual dataset nested more than {HDF5_DEPTH} deep")
    for vs in data.virtual_sources():
        files = [holder] if vs.file_name == "." else _hdf5_target(vs.file_name, holder,
                                                                  f"{data.name} (a virtual dataset)")
        for real in files:
            with h5py.File(real, "r") as other:
                if real != holder:
                    check_hdf5_links(other)
                source = other.get(vs.dset_name)
                if isinstance(source, h5py.Dataset):
                    check_hdf5_dataset(source, depth + 1)


def open_hdf5(path: str | Path, named_by: str | Path | None = None):
    """An h5py.File for a regular file inside the root whose external links keep to the root."""
    import h5py

    real = check_file(path, named_by)
    try:
        f = h5py.File(real, "r")
    except Exception as exc:
        raise SourceError(f"{path}: not a readable HDF5 file ({exc})") from exc
    try:
        check_hdf5_links(f)
    except BaseException:
        f.close()
        raise
    return f


def all_inside(paths: Iterable[str | Path], named_by: str | Path | None = None,
               root: Path | None = None) -> list[Path]:
    """Every path resolved inside the root (`inside`), or SourceError for the first that is not."""
    return [inside(p, named_by, root) for p in paths]
