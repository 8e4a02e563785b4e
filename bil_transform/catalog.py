"""The catalog: which datasets exist, where their files are, and what people may search them by (parsed
and checked here; served by dataset.py)."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import hashlib
import math
import os
import re
import shlex
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .pyramid import DEFAULT_CHUNK
from .pyramid.downsample import METHODS
from .readers.base import SELECTIONS, natural_key, selection_of
from .readers.confine import default_root
from .writers.codecs import COMPRESSORS
from .writers.precomputed import ENCODINGS

KINDS = ("image", "labels", "skeletons")
ORIGINS = ("source", "zero")
UNITS = ("micrometer", "voxel")  # what a skeleton source's SWC coordinates are in
METADATA = "metadata"  # [datasets.metadata]: free metadata under any name
# The fields of a [[datasets]] table (DatasetSpec's, checked in _fields); any other key is free metadata,
# unless it is close to one of these (a misspelling, refused with "did you mean").
KNOWN_KEYS = ("id", "path", "voxel_size", "kind", "embargo", "downsample", "compression", "encoding", "chunk", "origin",
              "labels", "space", "units", "offset", "setup", "scene", "root", METADATA)
# The fields only a skeleton source has, and those it has not (they describe voxels)
SKELETON_KEYS = ("space", "units", "offset")
VOXEL_KEYS = ("voxel_size", "downsample", "compression", "encoding", "chunk", "origin", "labels", "setup", "scene")
TOP_LEVEL = ("datasets", "derived")  # the keys a catalog file has at its top level
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")


class CatalogError(ValueError):
    """The catalog file itself is wrong; the message says where and how to fix it."""


@dataclass(frozen=True)
class DatasetSpec:
    id: str
    path: str
    voxel_size: tuple[float, float, float] | None = None
    kind: str = "image"
    embargo: bool = False
    downsample: str | None = None  # mean | mode | stride; default by kind
    compression: str = "blosc"
    encoding: str | None = None  # precomputed; default by kind and dtype
    chunk: tuple[int, int, int] = DEFAULT_CHUNK
    origin: str = "source"  # source: the files' own position in space; zero: voxel 0 at 0 (for viewers that need it)
    labels: tuple[str, ...] = ()  # ids of kind = "labels" datasets served under this image's labels/ group
    metadata: dict[str, str] = field(default_factory=dict)
    # kind = "skeletons": SWC tracings placed in the frame of the image dataset `space`
    space: str | None = None
    units: str = "micrometer"  # micrometer: the image's physical frame; voxel: voxels of its level 0
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)  # z, y, x, in `units`, added to every node
    # the part of a file holding several: a BigDataViewer setup (with the setups sharing its grid as
    # channels), a CZI scene; None: the first
    setup: int | None = None
    scene: int | None = None
    # the catalog's `root`: a directory holding the path that its source's files may be read from (an XML
    # beside a raw/ tree one level up); None: `root` below. Only the operator widens it, never a file.
    widened_root: str | None = None
    # the catalog's `derived`: the store of prepared coarse levels (pyramid/prepared.py); not part of
    # what the bytes derive from, so neither compared nor in the repr that keys derived bytes
    derived: str | None = field(default=None, compare=False, repr=False)

    @property
    def selection(self) -> dict[str, int]:
        """The parts chosen, as the readers take them."""
        return selection_of(self)

    @property
    def root(self) -> Path:
        """The dataset's own root: its directory, or the one holding its file (or glob)."""
        path = Path(self.path)
        return path if path.is_dir() else path.parent

    @property
    def confinement(self) -> Path:
        """The directory every file the source reads must resolve inside (readers/confine.py)."""
        return Path(self.widened_root) if self.widened_root else default_root(self.path)


def holding(path: str | Path, specs: Iterable[DatasetSpec]) -> DatasetSpec | None:
    """The dataset whose own directory `path` is in, if any: where the server never writes."""
    where = Path(path).expanduser().resolve()
    for spec in specs:
        root = spec.root.expanduser().resolve()
        if where == root or root in where.parents:
            return spec
    return None


CONSONANTS, VOWELS = "bcdfghjklmnprstvwz", "aeiou"


def pronounceable_id(text: str, triplets: int = 3) -> str:
    """A stable identifier like 'bec-tov-mar' derived from `text` (a dataset's path as the catalog
    writes it): the same on every start and every machine, easy to read out and type."""
    n = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    parts = []
    for _ in range(triplets):
        n, a = divmod(n, len(CONSONANTS))
        n, v = divmod(n, len(VOWELS))
        n, b = divmod(n, len(CONSONANTS))
        parts.append(CONSONANTS[a] + VOWELS[v] + CONSONANTS[b])
    return "-".join(parts)


class _Bad(Exception):
    """One field of one dataset is wrong; _spec adds the catalog and the dataset to the message."""


def _key(key: str) -> str:
    """A key as TOML would write it: bare when it can be, quoted otherwise."""
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else repr(key)


def _show(value) -> str:
    """A value as the catalog wrote it, short and on one line, for 'got ...' in a message."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table {" + ", ".join(f"{_key(k)} = {_show(v)}" for k, v in value.items()) + "}"
    elif isinstance(value, list):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    elif isinstance(value, str):
        text = repr(value)
    else:
        text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _normal(key: str) -> str:
    return re.sub(r"[^a-z0-9]", "", key.lower())


def _close(key: str, known, cutoff: float = 0.8) -> str | None:
    """The known key `key` is probably a misspelling of: the same letters in another case or with
    other separators, or (for keys of four letters or more; 'uid' or 'ids' are fair metadata names,
    not misspelt 'id's) one difflib finds at least `cutoff` alike."""
    for k in known:
        if _normal(key) == _normal(k):
            return k
    found = difflib.get_close_matches(key.lower(), [k for k in known if len(k) >= 4], n=1, cutoff=cutoff)
    return found[0] if found else None


def _did_you_mean(key: str, known, cutoff: float = 0.8) -> str:
    close = _close(key, known, cutoff)
    return f"; did you mean {close!r}?" if close else ""


def _scalar(value) -> bool:
    """Free metadata is one value a search can match: a string, a number, a boolean or a date."""
    return isinstance(value, (str, int, float, bool, datetime.date, datetime.time))


def _metadata_text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _check_id(ident) -> str | None:
    """Why `ident` cannot be a dataset id, or None when it can."""
    if not isinstance(ident, str) or not ident:
        return (f"id must be a non-empty string (or left out, to derive one from the path); got {_show(ident)}")
    if not ID_PATTERN.fullmatch(ident):
        return f"id {ident!r} may use only letters, digits, '.', '_' and '-'"
    if set(ident) == {"."}:  # '.' and '..' would be path segments in /ds/ID/...
        return f"id {ident!r} must hold a letter, digit, '_' or '-', not only dots"
    return None


def _one_of(entry: dict, key: str, allowed, default):
    value = entry.get(key, default)
    if key in entry and (not isinstance(value, str) or value not in allowed):
        raise _Bad(f"{key} must be one of {', '.join(repr(a) for a in allowed)}; got {_show(value)}")
    return value


def _spec(entry: dict, catalog: Path, i: int, taken: set[str]) -> DatasetSpec:
    """datasets[i], checked field by field; a wrong one is one line naming the catalog, the dataset
    (by its id when it has a good one) and the field."""
    ident = entry.get("id")
    name = f"dataset {ident!r} (datasets[{i}])" if "id" in entry and _check_id(ident) is None else f"datasets[{i}]"
    try:
        return _fields(entry, catalog.parent, taken)
    except _Bad as exc:
        raise CatalogError(f"{catalog}: {name}: {exc}") from None


def _fields(entry: dict, base: Path, taken: set[str]) -> DatasetSpec:
    for key, value in entry.items():  # misspelt fields first: they explain what goes wrong after them
        if key in KNOWN_KEYS:
            continue
        close = _close(key, KNOWN_KEYS)
        if close:
            raise _Bad(f"unknown field {key!r}; did you mean {close!r}? (free metadata of any name "
                       f"goes under [datasets.metadata])")
        if not _scalar(value):
            raise _Bad(f"{_key(key)} is free metadata (no catalog field) and must be a string, number or boolean; "
                       f"got {_show(value)}{_did_you_mean(key, KNOWN_KEYS, 0.6)}")
    path = entry.get("path")
    if not isinstance(path, str) or not path:
        got = _show(path) if "path" in entry else "no path"
        raise _Bad(f"path must be a non-empty string: a file, a directory of slices, a glob or a Zarr, "
                   f"relative to the catalog; got {got}")
    if "id" in entry:
        ident = entry["id"]
        if why := _check_id(ident):
            raise _Bad(why)
    else:  # derived from the path as written; a clash with an earlier entry tries again
        ident, attempt = pronounceable_id(path), 1
        while ident in taken:
            ident = pronounceable_id(f"{path}#{attempt}")
            attempt += 1
    kind = _one_of(entry, "kind", KINDS, "image")
    space, units, offset = _skeleton_fields(entry, kind)
    for name, source, _ in SELECTIONS:
        value = entry.get(name)
        if name in entry and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise _Bad(f"{name} must be a whole number from 0: the {name} of a {source} to serve; got {_show(value)}")
    voxel = entry.get("voxel_size")
    if voxel is not None and not (isinstance(voxel, list) and len(voxel) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in voxel)):
        raise _Bad(f"voxel_size must be three positive numbers [z, y, x] in micrometers; got {_show(voxel)}")
    embargo = entry.get("embargo", False)
    if not isinstance(embargo, bool):
        raise _Bad(f"embargo must be true or false (a TOML boolean, without quotes); got {_show(embargo)}")
    downsample = _one_of(entry, "downsample", tuple(METHODS), None)
    compression = _one_of(entry, "compression", tuple(COMPRESSORS), "blosc")
    encoding = _one_of(entry, "encoding", ENCODINGS, None)
    origin = _one_of(entry, "origin", ORIGINS, "source")
    labels = entry.get("labels", [])
    names = isinstance(labels, list) and all(isinstance(v, str) and v for v in labels)
    if not names or len(set(labels)) < len(labels):
        raise _Bad(f"labels must be a list of distinct dataset ids, like [\"atlas\", \"cells\"]; got {_show(labels)}")
    chunk = entry.get("chunk", DEFAULT_CHUNK)
    if "chunk" in entry and not (isinstance(chunk, list) and len(chunk) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in chunk)):
        cube = f" (for a cube, write [{chunk}, {chunk}, {chunk}])" if isinstance(chunk, int) and chunk > 0 else ""
        raise _Bad(f"chunk must be three positive integers [z, y, x]{cube}; got {_show(chunk)}")
    metadata = {k: _metadata_text(v) for k, v in entry.items() if k not in KNOWN_KEYS}
    table = entry.get(METADATA, {})
    if not isinstance(table, dict):
        raise _Bad(f"{METADATA} must be a table ([datasets.metadata] with one key = value a line); got {_show(table)}")
    for key, value in table.items():
        field_name = f"{METADATA}.{_key(key)}"
        if key in KNOWN_KEYS:
            raise _Bad(f"{field_name} is a catalog field, not metadata; set {key} at the top level of the dataset")
        if key in metadata:
            raise _Bad(f"{field_name} is also given at the top level of the dataset; keep one")
        if not _scalar(value):
            raise _Bad(f"{field_name} must be a string, number or boolean; got {_show(value)}")
        metadata[key] = _metadata_text(value)
    full = Path(path).expanduser()
    full = full if full.is_absolute() else base / full
    widened = entry.get("root")
    if "root" in entry:
        if not isinstance(widened, str) or not widened:
            raise _Bad(f"root must be a directory holding the path, as a string; got {_show(widened)}")
        widened = Path(widened).expanduser()
        widened = widened if widened.is_absolute() else base / widened
        own = full if full.is_dir() else full.parent
        if not Path(os.path.realpath(own)).is_relative_to(os.path.realpath(widened)):
            raise _Bad(f"root {str(widened)!r} does not hold the path {str(full)!r}; root widens the directory a "
                       "dataset's files may be read from, so it must be the path's directory or one above it")
    return DatasetSpec(
        id=ident,
        path=str(full),
        voxel_size=tuple(float(v) for v in voxel) if voxel else None,
        kind=kind,
        embargo=embargo,
        downsample=downsample,
        compression=compression,
        encoding=encoding,
        chunk=tuple(chunk),
        origin=origin,
        labels=tuple(labels),
        metadata=metadata,
        space=space,
        units=units,
        offset=offset,
        setup=entry.get("setup"),
        scene=entry.get("scene"),
        widened_root=str(widened) if widened else None,
    )


def _skeleton_fields(entry: dict, kind: str) -> tuple[str | None, str, tuple[float, float, float]]:
    """(space, units, offset) of a skeleton source; the fields of the other kind are refused on each."""
    if kind != "skeletons":
        if given := [k for k in SKELETON_KEYS if k in entry]:
            raise _Bad(f"{given[0]} belongs to a skeleton source (kind = \"skeletons\"); this dataset is {kind}")
        return None, "micrometer", (0.0, 0.0, 0.0)
    if given := [k for k in VOXEL_KEYS if k in entry]:
        raise _Bad(f"{given[0]} describes voxels, and a skeleton source (kind = \"skeletons\") has none; its "
                   "frame is its space image's")
    space = entry.get("space")
    if not isinstance(space, str) or not space:
        raise _Bad(f"space must name the image dataset the tracings were made on, like space = \"mouse-001\"; "
                   f"got {_show(space) if 'space' in entry else 'no space'}")
    units = _one_of(entry, "units", UNITS, "micrometer")
    offset = entry.get("offset", [0, 0, 0])
    if not (isinstance(offset, list) and len(offset) == 3 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in offset)):
        raise _Bad(f"offset must be three numbers [z, y, x] in the tracings' units ({units}s); got {_show(offset)}")
    return space, units, tuple(float(v) for v in offset)


def load_catalog(path: str | Path) -> list[DatasetSpec]:
    """Parse a TOML catalog: one [[datasets]] table per dataset; relative paths are relative to the file.
    Anything wrong is one CatalogError line naming the file, the dataset and the field."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read the catalog ({exc})") from exc
    for key, value in doc.items():
        if key in TOP_LEVEL:
            continue
        if key == "tokens":
            raise CatalogError(f"{path}: tokens belong in their own file, given with --tokens, not in the catalog "
                               "(which may be published)")
        what = "table" if isinstance(value, dict) or (isinstance(value, list) and value and all(
            isinstance(v, dict) for v in value)) else "key"
        hint = _did_you_mean(key, TOP_LEVEL, 0.6) or (
            "; a catalog holds only [[datasets]] tables, and a dataset's fields go below its [[datasets]] line")
        raise CatalogError(f"{path}: unknown {what} {key!r}{hint}")
    derived = doc.get("derived")
    if derived is not None and (not isinstance(derived, str) or not derived.strip()):
        raise CatalogError(f"{path}: derived must be a directory or a URL (the store of prepared coarse levels), "
                           f"as a string; got {_show(derived)}")
    if derived is not None and "://" not in derived:
        derived = str((path.parent / Path(derived).expanduser()).resolve())
    entries = doc.get("datasets", [])
    if isinstance(entries, dict):
        raise CatalogError(f"{path}: datasets must be an array of tables, one [[datasets]] (two brackets) per "
                           "dataset; got a single [datasets] table")
    if not isinstance(entries, list):
        raise CatalogError(f"{path}: datasets must be an array of tables, one [[datasets]] per dataset; "
                           f"got {_show(entries)}")
    if not entries:
        raise CatalogError(f"{path}: the catalog defines no datasets; add one [[datasets]] table per dataset, "
                           "with at least its path")
    taken = {e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)}
    first: dict[str, int] = {}
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CatalogError(f"{path}: datasets[{i}] must be a table ([[datasets]]); got {_show(entry)}")
        spec = dataclasses.replace(_spec(entry, path, i, taken), derived=derived)
        if spec.id in first:
            raise CatalogError(f"{path}: dataset {spec.id!r} (datasets[{i}]): id {spec.id!r} is already the id "
                               f"of datasets[{first[spec.id]}]; ids must be unique")
        first[spec.id] = i
        taken.add(spec.id)
        specs.append(spec)
    _check_labels(specs, path, first)
    _check_spaces(specs, path, first)
    return specs


def _check_spaces(specs: list[DatasetSpec], path: Path, index: dict[str, int]) -> None:
    """Each skeleton source's `space` names an image dataset of the catalog."""
    kinds = {s.id: s.kind for s in specs}
    for spec in specs:
        if spec.kind != "skeletons":
            continue
        where = f"{path}: dataset {spec.id!r} (datasets[{index[spec.id]}])"
        if spec.space not in kinds:
            raise CatalogError(f"{where}: space names {spec.space!r}, which is no dataset of the catalog"
                               f"{_did_you_mean(spec.space, [s for s, k in kinds.items() if k == 'image'])}")
        if kinds[spec.space] != "image":
            raise CatalogError(f"{where}: space names {spec.space!r}, whose kind is {kinds[spec.space]!r}; "
                               "tracings are placed in the frame of an image dataset")


def _check_labels(specs: list[DatasetSpec], path: Path, index: dict[str, int]) -> None:
    """Each `labels` entry names a kind = "labels" dataset of the catalog, attached to an image."""
    kinds = {s.id: s.kind for s in specs}
    for spec in specs:
        where = f"{path}: dataset {spec.id!r} (datasets[{index[spec.id]}])"
        if spec.labels and spec.kind != "image":
            raise CatalogError(f"{where}: labels can be attached to an image only; this dataset is {spec.kind}")
        for label in spec.labels:
            if label not in kinds:
                close = _did_you_mean(label, list(kinds))
                raise CatalogError(f"{where}: labels names {label!r}, which is no dataset of the catalog{close}")
            if kinds[label] != "labels":
                raise CatalogError(f"{where}: labels names {label!r}, whose kind is {kinds[label]!r}; "
                                   'a dataset attached as labels needs kind = "labels"')


def specs_from_paths(paths: list[str]) -> list[DatasetSpec]:
    """Datasets for bare PATH arguments, with ids derived from their names."""
    specs = []
    seen: set[str] = set()
    for p in paths:
        stem = re.sub(r"(\.ome)?\.(tiff?|zarr|ims|jp2|j2k|czi|n5|h5|xml)$", "", Path(p.rstrip("/")).name or "dataset",
                      flags=re.I)
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "dataset"
        ident, n = base, 1
        while ident in seen:
            n += 1
            ident = f"{base}-{n}"
        seen.add(ident)
        specs.append(DatasetSpec(id=ident, path=str(Path(p).expanduser().resolve()) if "*" not in p else p))
    return specs


SLICE_SUFFIXES = (".tif", ".tiff", ".jp2", ".j2k", ".j2c", ".jpc")  # 2-D slices a stack is made of


def expanded_glob_warning(paths: list[str], least: int = 3) -> str | None:
    """Issue 13, point 13: `serve slices/z000*.tif` with the glob unquoted reaches us as one PATH
    per slice, each of which would become a dataset of one plane. One sentence when `least` or
    more PATH arguments are files of one directory whose names differ only in their numbers
    (z000.tif, z001.tif, ...), saying how to serve them as one stack; None otherwise."""
    groups: dict[tuple, list[str]] = {}
    for p in dict.fromkeys(paths):
        path = Path(p)
        if not path.name.lower().endswith(SLICE_SUFFIXES) or not path.is_file():
            continue
        parts = re.split(r"(\d+)", path.name)
        if len(parts) > 1:  # a number somewhere in the name
            groups.setdefault((path.parent, tuple(parts[0::2])), []).append(p)
    stack = max(groups.values(), key=len, default=[])
    if len(stack) < least:
        return None
    stack.sort(key=lambda p: natural_key(Path(p).name))
    split = [re.split(r"(\d+)", Path(p).name) for p in stack]
    name = "".join(text if i % 2 == 0 or len({s[i] for s in split}) == 1 else "*" for i, text in enumerate(split[0]))
    first = Path(stack[0])
    glob = str(first.with_name(name))
    same_kind = [f for f in first.parent.iterdir() if f.is_file() and f.suffix.lower() == first.suffix.lower()]
    directory = (f" or give the directory ({shlex.quote(str(first.parent) + os.sep)})"
                 if len(same_kind) == len(stack) else "")
    return (f"{len(stack)} PATH arguments look like slices of one stack ({stack[0]} ... {stack[-1]}), "
            f"expanded by the shell from an unquoted glob, and would be served as {len(stack)} datasets of one "
            f"plane each; to serve them as one dataset, quote the glob ({shlex.quote(glob)}){directory}")
