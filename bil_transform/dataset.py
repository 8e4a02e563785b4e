"""A served dataset: a catalog entry and the pyramid over its source, reopened when its files change."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

from . import search
from .cache import Cache
from .catalog import DatasetSpec
from .pyramid import Pyramid
from .readers import SourceError, open_source
from .readers.base import version_token
from .workers import Workers
from .writers import default_encoding, precomputed_encodings, served_dtype
from .writers.codecs import COMPRESSORS


class Dataset:
    """A catalog entry and, if its source opened, the pyramid over it. A source that fails to
    open is kept with its error so the server can say why, and every other dataset still works.

    The source's version (its files' names, sizes and mtimes) is in every cache key and ETag;
    `refresh` reopens the source when that version changes, so a changed file is never served stale.
    """

    def __init__(self, spec: DatasetSpec, cache: Cache, recheck: float = 2.0, workers: Workers | None = None):
        self.spec, self.cache, self.workers = spec, cache, workers
        self.recheck = recheck  # seconds between checks of the source files
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        spec = self.spec
        self.pyramid: Pyramid | None = None
        self.error: str | None = None
        self._checked = time.monotonic()
        try:
            reader = open_source(spec.path, self.cache.section("segments"))
            overrides = {"kind": spec.kind}
            if spec.voxel_size:
                overrides.update(voxel_size=spec.voxel_size, voxel_size_known=True)
            reader.volume = dataclasses.replace(reader.volume, **overrides)
            method = spec.downsample or ("mode" if spec.kind == "labels" else "mean")
            pyramid = Pyramid(reader, self.cache.section("blocks"), spec.id, method=method, chunk=spec.chunk,
                              workers=self.workers)
            encodings = precomputed_encodings(pyramid)
            if spec.encoding and spec.encoding not in encodings:
                raise ValueError(f"the precomputed encoding {spec.encoding!r} cannot hold this {reader.volume.dtype} "
                                 f"data with {reader.volume.shape[1]} channel(s); use one of {', '.join(encodings)}")
            self.pyramid = pyramid
        except (SourceError, ValueError, OSError) as exc:
            self.error = str(exc)
        except Exception as exc:  # never let one dataset stop the server from starting
            self.error = f"{spec.path}: cannot be opened ({type(exc).__name__}: {exc})"

    def check_due(self) -> bool:
        return time.monotonic() - self._checked >= self.recheck

    def refresh(self) -> None:
        """Reopen the source if any of its files changed (or it failed to open before)."""
        with self._lock:
            if not self.check_due():
                return
            self._checked = time.monotonic()
            if self.pyramid is not None:
                try:
                    if version_token(self.pyramid.volume.files) == self.pyramid.volume.version:
                        return
                except OSError:
                    pass  # a file is gone: reopening says which
            self._open()

    @property
    def root(self) -> Path:
        """The dataset's own root: its directory, or the one holding its file (or glob)."""
        path = Path(self.spec.path)
        return path if path.is_dir() else path.parent

    def public(self, text: str) -> str:
        """`text` (a message) with this dataset's files named relative to its own root, as anonymous
        clients see them; only the operator's log and `bil-transform info` show full paths."""
        root = self.root
        return text.replace(f"{root}{os.sep}", "").replace(str(root), root.name)

    def source_paths(self) -> list[Path]:
        """Every file the dataset is read from: a Zarr store's every file (its version covers only
        the metadata), else the files the reader lists."""
        vol = self.pyramid.volume
        if vol.format.startswith("zarr"):
            return sorted(p for p in Path(vol.path).rglob("*") if p.is_file())
        return [Path(f) for f in vol.files]

    def searchable(self) -> dict[str, str]:
        """Every field a search may name: the catalog's, the path's own name and what the reader found."""
        channels = [c.name for c in self.pyramid.volume.channels] if self.pyramid is not None else []
        return search.fields({**self.summary(), "path": Path(self.spec.path).name}, channels)

    def summary(self) -> dict:
        """What the catalog and the reader know without reading voxels."""
        doc: dict = {"id": self.spec.id, **self.spec.metadata, "kind": self.spec.kind, "embargo": self.spec.embargo}
        if self.pyramid is None:
            return {**doc, "status": "error", "error": self.public(self.error or "")}
        vol = self.pyramid.volume
        served = served_dtype(vol.dtype, vol.kind)
        return {
            **doc,
            "status": "ok",
            "format": vol.format,
            "shape": list(vol.shape),
            "axes": ["t", "c", "z", "y", "x"],
            "dtype": vol.dtype.name,
            "voxel_size": list(vol.voxel_size),
            "voxel_size_unit": "micrometer",
            "voxel_size_known": vol.voxel_size_known,
            "downsample": self.pyramid.method,
            "zarr": {"compression": self.spec.compression, "compressions": list(COMPRESSORS)},
            "precomputed": {
                "data_type": served.name,
                "encoding": self.spec.encoding or default_encoding(served, vol.kind),
                "encodings": precomputed_encodings(self.pyramid),
            },
            "levels": [
                {"shape": list(lvl.shape), "factors": list(lvl.factors), "chunks": list(lvl.chunks),
                 "native": lvl.native is not None}
                for lvl in self.pyramid.levels
            ],
        }

    def describe(self, reveal: bool = True) -> dict:
        """The summary plus channels; with `reveal`, their display windows too (which may read one
        plane to estimate contrast, so an embargoed dataset shows them only to a token holder)."""
        doc = self.summary()
        if self.pyramid is not None:
            doc["channels"] = [
                {"name": ch.name, "color": ch.color,
                 **({"window": list(self.pyramid.display_window(c))} if reveal else {})}
                for c, ch in enumerate(self.pyramid.volume.channels)
            ]
        return doc
