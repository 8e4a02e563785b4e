"""Directory listings of the views, and the `.ome.zarr` aliases of the zarr views.

A directory is '' (the view's root) or a key prefix ending in '/'. Its listing names the next
path component only, never the tree below it: the metadata documents there and the
subdirectories (ending in '/'), or at the last axis the chunk files. Every file named is one the
view's `resource` answers, so a listing never names a key that would 404.

`files` names every file of a view at once (the listings' limit aside), with the pyramid blocks
each chunk or shard file holds: what `bil-transform export` writes, and how it groups the work.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from .omezarr import OmeZarrV2, OmeZarrV3
from .precomputed import Precomputed

SUFFIX = ".ome.zarr"  # what suffix-choosing readers look for
MAX_LISTED = 4096  # files of a precomputed level listed at most (its chunks have no shorter prefix)
METADATA = (".zattrs", ".zgroup", ".zmetadata", ".zarray", "zarr.json", "info")


def suffixed(ident: str, view: str) -> str:
    """The alias of a zarr view: ID.ome.zarr for `zarr`, ID.VIEW.ome.zarr for the others."""
    return f"{ident}{SUFFIX}" if view == "zarr" else f"{ident}.{view}{SUFFIX}"


def unsuffixed(ident: str, name: str) -> str | None:
    """The zarr view an alias stands for (None if `name` is not one of this dataset's aliases);
    the caller's make_view still refuses an unknown view."""
    if name == ident + SUFFIX:
        return "zarr"
    inner = name.removeprefix(ident + ".").removesuffix(SUFFIX)
    if len(inner) + len(ident) + 1 + len(SUFFIX) != len(name) or not inner.startswith("zarr"):
        return None
    return inner


def _index(part: str, size: int) -> bool:
    """Whether a path component is a canonical index below size ('01' is not: it lists nothing)."""
    return part.isdigit() and len(part) < 19 and str(int(part)) == part and int(part) < size


def _existing(view, prefix: str, names: tuple[str, ...]) -> list[str]:
    found = []
    for name in names:
        try:
            view.resource(prefix + name)
        except (KeyError, ValueError):
            continue
        found.append(name)
    return found


def _zarr(view: OmeZarrV2 | OmeZarrV3, parts: list[str]) -> list[str] | None:
    levels = len(view.pyramid.levels)
    labels = list(getattr(view, "labels", None) or ())  # label datasets attached under labels/NAME/
    if not parts:
        return _existing(view, "", METADATA) + [f"{i}/" for i in range(levels)] + (["labels/"] if labels else [])
    if parts[0] == "labels" and labels:
        if len(parts) == 1:
            return _existing(view, "labels/", METADATA) + [f"{n}/" for n in labels]
        if parts[1] not in labels:
            return None
        return _zarr(view.label_view(parts[1]), parts[2:])
    if not _index(parts[0], levels):
        return None
    level, rest = int(parts[0]), parts[1:]
    if isinstance(view, OmeZarrV3):
        if not rest:
            return _existing(view, f"{level}/", METADATA) + ["c/"]
        if rest[0] != "c":
            return None
        rest = rest[1:]
    grid, _ = _zarr_grid(view, level)
    if len(rest) >= len(grid) or not all(_index(p, g) for p, g in zip(rest, grid)):
        return None
    axis = len(rest)
    last = axis == len(grid) - 1
    files = _existing(view, f"{level}/", METADATA) if not rest and isinstance(view, OmeZarrV2) else []
    return files + [f"{i}" if last else f"{i}/" for i in range(grid[axis])]


def _precomputed(view: Precomputed, parts: list[str]) -> list[str] | None:
    levels = view.pyramid.levels
    if not parts:
        return _existing(view, "", METADATA) + [f"{i}/" for i in range(len(levels))]
    if len(parts) != 1 or not _index(parts[0], len(levels)):
        return None
    level = int(parts[0])
    if view.sharded:
        sharding = view.sharding(level)
        count = sharding.shards()
        if count > MAX_LISTED:
            return []
        return [sharding.shard_name(i) for i in range(count)]  # the grid's own names: nothing to check
    lvl = levels[level]
    if math.prod(lvl.grid) > MAX_LISTED:
        return []  # too many to list: the page says so
    return _existing(view, f"{level}/", tuple(_chunk_name(lvl, idx) for idx in np.ndindex(*lvl.grid)))


def _chunk_name(lvl, index: tuple[int, ...]) -> str:
    """A precomputed chunk's name: its voxel ranges x, y, z, clipped at the level's edge."""
    return "_".join(f"{i * c}-{min((i + 1) * c, s)}" for i, c, s in zip(index[::-1], lvl.chunks[::-1],
                                                                         lvl.shape[::-1]))


def _zarr_grid(view: OmeZarrV2 | OmeZarrV3, level: int) -> tuple[list[int], list[int]]:
    """The (t, c, z, y, x) grid of a zarr level's chunk files (shards, in a sharded view), and the
    pyramid blocks one file holds along each axis."""
    per = view.shard_shape(level) if getattr(view, "sharded", False) else view.chunk_shape(level)
    chunks = view.chunk_shape(level)
    return [math.ceil(s / p) for s, p in zip(view.shape(level), per)], [p // c for p, c in zip(per, chunks)]


@dataclass(frozen=True)
class File:
    """One file of a view: a metadata document, or a chunk or shard file and the pyramid blocks it
    holds (`blocks`: ranges of block indices z, y, x of `level`, of time point `t` and each of
    `channels`). `level` is None for a document of the whole view; `blocks` is None for a metadata
    document and a shard that holds no chunk. Under labels/NAME/, `label` is NAME and level and
    blocks are the label dataset's own."""

    key: str
    level: int | None = None
    blocks: tuple[range, range, range] | None = None
    t: int = 0
    channels: tuple[int, ...] = ()
    label: str | None = None


def files(view) -> Iterator[File]:
    """Every file of a view, each once: what walking `children` from the root finds, without
    the listings' limit, and with what each chunk or shard file holds."""
    if isinstance(view, (OmeZarrV2, OmeZarrV3)):
        yield from _zarr_files(view)
    elif isinstance(view, Precomputed):
        yield from _precomputed_files(view)
    else:
        raise TypeError(f"no files of {type(view).__name__}")


def _zarr_files(view: OmeZarrV2 | OmeZarrV3) -> Iterator[File]:
    yield from (File(name) for name in _existing(view, "", METADATA))
    for level, lvl in enumerate(view.pyramid.levels):
        yield from (File(f"{level}/{name}", level) for name in _existing(view, f"{level}/", METADATA))
        grid, per = _zarr_grid(view, level)
        prefix = f"{level}/c/" if isinstance(view, OmeZarrV3) else f"{level}/"
        for t, c, *index in np.ndindex(*grid):
            blocks = tuple(range(i * n, min((i + 1) * n, g)) for i, n, g in zip(index, per[2:], lvl.grid))
            yield File(prefix + "/".join(map(str, (t, c, *index))), level, blocks, t, (c,))
    labels = list(getattr(view, "labels", None) or ())
    if labels:
        yield from (File(f"labels/{name}") for name in _existing(view, "labels/", METADATA))
        for name in labels:
            for f in _zarr_files(view.label_view(name)):
                yield replace(f, key=f"labels/{name}/{f.key}", label=name)


def _precomputed_files(view: Precomputed) -> Iterator[File]:
    yield from (File(name) for name in _existing(view, "", METADATA))
    held = {"t": view.t, "channels": tuple(view.channels)}
    for level, lvl in enumerate(view.pyramid.levels):
        if not view.sharded:
            for index in np.ndindex(*lvl.grid):
                yield File(f"{level}/{_chunk_name(lvl, index)}", level, tuple(range(i, i + 1) for i in index), **held)
            continue
        sharding = view.sharding(level)
        for shard in range(sharding.shards()):
            cells = [sharding.cell(code)[::-1] for code, _ in sharding.cells(shard)]  # z, y, x
            blocks = tuple(range(min(c[a] for c in cells), max(c[a] for c in cells) + 1)
                           for a in range(3)) if cells else None  # a shard's cells are an aligned box
            yield File(f"{level}/{sharding.shard_name(shard)}", level, blocks, **held)


def children(view, prefix: str) -> list[str] | None:
    """The names directly under directory `prefix` ('' or 'a/b/'), subdirectories ending in '/';
    None if the view has no such directory."""
    if prefix and not prefix.endswith("/"):
        return None
    parts = prefix.split("/")[:-1] if prefix else []
    if any(not p for p in parts):
        return None
    if isinstance(view, (OmeZarrV2, OmeZarrV3)):
        return _zarr(view, parts)
    if isinstance(view, Precomputed):
        return _precomputed(view, parts)
    return None


def page(title: str, names: list[str], note: str = "") -> str:
    """A plain HTML index, one relative link a name: what fsspec's HTTP `ls` and Neuroglancer's
    path completion read."""
    e = html.escape
    items = "".join(f'<li><a href="{e(n, quote=True)}">{e(n)}</a></li>' for n in names)
    return ("<!doctype html><html><head><meta charset=utf-8>"
            f"<title>Index of {e(title)}</title></head><body><h1>Index of {e(title)}</h1>"
            f"{f'<p>{e(note)}</p>' if note else ''}<ul>{items}</ul></body></html>")
