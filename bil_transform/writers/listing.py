"""Directory listings of the views, and the `.ome.zarr` aliases of the zarr views.

A directory is '' (the view's root) or a key prefix ending in '/'. Its listing names the next
path component only, never the tree below it: the metadata documents there and the
subdirectories (ending in '/'), or at the last axis the chunk files. Every file named is one the
view's `resource` answers, so a listing never names a key that would 404.
"""

from __future__ import annotations

import html
import math

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
        per = view.shard_shape(level) if view.sharded else view.chunk_shape(level)
    else:
        per = view.chunk_shape(level)
    grid = [math.ceil(s / p) for s, p in zip(view.shape(level), per)]
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
    else:
        lvl = levels[level]
        count = math.prod(lvl.grid)
        names = ("_".join(f"{i * c}-{min((i + 1) * c, s)}" for i, c, s in zip(idx[::-1], lvl.chunks[::-1],
                                                                              lvl.shape[::-1]))
                 for idx in _cells(lvl.grid, MAX_LISTED))
    if count > MAX_LISTED:
        return []  # too many to list: the page says so
    return _existing(view, f"{level}/", tuple(names))


def _cells(grid, limit: int):
    """The first `limit` chunk indices (z, y, x) of a grid, in C order."""
    total = math.prod(grid)
    for n in range(min(total, limit)):
        z, rem = divmod(n, grid[1] * grid[2])
        yield z, *divmod(rem, grid[2])


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
