"""Prepared coarse levels: computed once by `bil-transform prepare`, kept in a derived store outside
every dataset, and read by the pyramid instead of computed from the whole source.

DERIVED/ID/KEY/ is an OME-Zarr v3 group (the zarr3-sharded view's files of the prepared levels, so any
zarr reader opens it) with RECORD written last: a store without it is unfinished. KEY digests what the
bytes derive from (the fingerprint below, and the levels), never the package's code: an upgrade keeps
terabytes of prepared levels unless the reduction itself changed, and then REDUCTION is raised. A
store whose fingerprint is not the source's current one is stale and never read.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..readers import Region, SourceError

if TYPE_CHECKING:
    from . import Pyramid

RECORD = "bil-prepare.json"  # written last: the store is complete
PROGRESS = ".progress"  # while preparing: plan.json, and one marker per finished task
# The version of the reduction: the methods of downsample.py and the level plan. Raise it when
# either changes the bytes of a computed level; nothing else invalidates prepared levels.
REDUCTION = 1
SHARE = 0.01  # the default prepared levels: the coarsest ones holding at most this share of level 0


def fingerprint(pyramid: Pyramid, selection: dict[str, int]) -> dict[str, Any]:
    """Everything the bytes of a computed level derive from (`selection`: the part of the source
    the dataset is, which its files' version does not tell)."""
    vol = pyramid.volume
    return {"source": vol.version, "selection": dict(selection), "shape": list(vol.shape),
            "dtype": vol.dtype.str, "method": pyramid.method, "reduction": REDUCTION,
            "levels": [[list(lvl.shape), list(lvl.step), list(lvl.chunks), lvl.native] for lvl in pyramid.levels]}


def store_key(fingerprint: dict[str, Any], levels: tuple[int, ...]) -> str:
    text = json.dumps({"fingerprint": fingerprint, "levels": list(levels)}, sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=10).hexdigest()


def default_levels(pyramid: Pyramid) -> tuple[int, ...]:
    """The computed levels among the coarsest ones that together hold at most SHARE of level 0
    (levels the source stores are read as they are: nothing to prepare)."""
    sizes = [math.prod(lvl.shape) for lvl in pyramid.levels]
    first = len(sizes)
    while first > 1 and sum(sizes[first - 1:]) <= SHARE * sizes[0]:
        first -= 1
    return tuple(i for i in range(first, len(sizes)) if pyramid.levels[i].native is None)


@dataclass(frozen=True)
class Preparation:
    """What the derived store holds for a dataset: `state` is none, in progress (`fraction` of its
    tasks done), complete (`levels`, `bytes`), or stale (prepared from files that have changed)."""

    state: str = "none"
    levels: tuple[int, ...] = ()
    fraction: float | None = None
    bytes: int = 0
    url: str | None = None  # the store of a complete preparation

    def public(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"state": self.state}
        if self.fraction is not None:
            doc["fraction"] = round(self.fraction, 4)
        if self.state == "complete":
            doc.update(levels=list(self.levels), bytes=self.bytes)
        return doc


NOT_CONFIGURED = Preparation()


class Derived:
    """A derived store's root (a directory or any fsspec URL), holding one folder per dataset id."""

    def __init__(self, url: str):
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.url = self.fs.unstrip_protocol(self.root)
        self._records: dict[str, dict] = {}  # complete stores' records, by path: they never change
        self._lock = threading.Lock()

    def folder(self, ident: str, key: str) -> str:
        return f"{self.url.rstrip('/')}/{ident}/{key}"

    def _json(self, path: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except (OSError, ValueError):
            return None

    def preparation(self, ident: str, current: dict[str, Any]) -> Preparation:
        """What the store holds for the source whose fingerprint is `current`: a complete store of
        it (the one with the most levels), else one being prepared, else stale or none."""
        try:
            folders = self.fs.ls(f"{self.root}/{ident}", detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return Preparation()
        except OSError as exc:
            raise SourceError(f"the derived store {self.url} cannot be listed ({type(exc).__name__}: {exc})") from exc
        complete, progress, stale = [], [], False
        for folder in folders:
            with self._lock:
                record = self._records.get(folder)
            if record is None and (record := self._json(f"{folder}/{RECORD}")) is not None:
                with self._lock:
                    self._records[folder] = record
            if record is not None:
                if record.get("fingerprint") == current:
                    complete.append((folder, record))
                else:
                    stale = True
                continue
            plan = self._json(f"{folder}/{PROGRESS}/plan.json")
            if plan is not None and plan.get("fingerprint") == current:
                progress.append((folder, plan))
        if complete:
            folder, record = max(complete, key=lambda fr: len(fr[1]["levels"]))
            return Preparation("complete", tuple(record["levels"]), 1.0, record.get("bytes", 0),
                               self.fs.unstrip_protocol(folder))
        if progress:
            folder, plan = progress[0]
            try:
                done = sum(1 for p in self.fs.ls(f"{folder}/{PROGRESS}", detail=False) if p.endswith(".npz"))
            except OSError:
                done = 0
            return Preparation("in progress", tuple(plan["levels"]), done / max(1, plan["tasks"]))
        return Preparation("stale") if stale else Preparation()


class PreparedLevels:
    """The levels of one complete store, read block by block with zarr-python (the store is the
    zarr3-sharded view's own files, so its values are exactly the computed ones)."""

    def __init__(self, preparation: Preparation, dtype: np.dtype):
        self.url, self.levels, self.dtype = preparation.url, frozenset(preparation.levels), dtype
        self._arrays: dict[int, Any] = {}
        self._lock = threading.Lock()

    def _array(self, level: int):
        with self._lock:
            if level not in self._arrays:
                import zarr

                self._arrays[level] = zarr.open_array(store=f"{self.url}/{level}", mode="r")
            return self._arrays[level]

    def read(self, level: int, t: int, c: int, region: Region) -> np.ndarray:
        try:
            data = self._array(level)[(t, c, *region)]
        except Exception as exc:  # any failure of the store is one sentence naming it
            raise SourceError(f"the prepared level {level} in {self.url} cannot be read ({type(exc).__name__}: "
                              f"{exc}); prepare the dataset again") from exc
        return np.asarray(data, self.dtype)
