"""The catalog: which datasets exist, where their files are, and what people may search them by."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import threading
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from . import search
from .cache import Cache
from .pyramid import DEFAULT_CHUNK, Pyramid
from .pyramid.downsample import METHODS
from .readers import SourceError, open_source
from .readers.base import version_token
from .workers import Workers
from .writers import default_encoding, precomputed_encodings, served_dtype
from .writers.codecs import COMPRESSORS
from .writers.precomputed import ENCODINGS

KINDS = ("image", "labels")
KNOWN_KEYS = {"id", "path", "voxel_size", "kind", "embargo", "downsample", "compression", "encoding", "chunk"}


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
    metadata: dict[str, str] = field(default_factory=dict)


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


def _spec(entry: dict, where: str, base: Path, taken: set[str]) -> DatasetSpec:
    if not isinstance(entry.get("path"), str) or not entry["path"]:
        raise CatalogError(f"{where}: 'path' must be a non-empty string")
    if "id" not in entry:  # derived from the path as written; a clash with an earlier entry tries again
        entry = {**entry, "id": pronounceable_id(entry["path"])}
        attempt = 1
        while entry["id"] in taken:
            entry["id"] = pronounceable_id(f"{entry['path']}#{attempt}")
            attempt += 1
    if not isinstance(entry["id"], str) or not entry["id"]:
        raise CatalogError(f"{where}: 'id' must be a non-empty string (or left out, to derive one from the path)")
    if not re.fullmatch(r"[A-Za-z0-9._-]+", entry["id"]):
        raise CatalogError(f"{where}: id {entry['id']!r} may use only letters, digits, '.', '_' and '-'")
    kind = entry.get("kind", "image")
    if kind not in KINDS:
        raise CatalogError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
    voxel = entry.get("voxel_size")
    if voxel is not None and (len(voxel) != 3 or not all(isinstance(v, (int, float)) and v > 0 for v in voxel)):
        raise CatalogError(f"{where}: voxel_size must be three positive numbers [z, y, x] in micrometers")
    if entry.get("downsample", "mean") not in METHODS:
        raise CatalogError(f"{where}: downsample must be one of {', '.join(METHODS)}")
    if entry.get("compression", "blosc") not in COMPRESSORS:
        raise CatalogError(f"{where}: compression must be one of {', '.join(COMPRESSORS)}")
    if entry.get("encoding", "raw") not in ENCODINGS:
        raise CatalogError(f"{where}: encoding must be one of {', '.join(ENCODINGS)}")
    chunk = entry.get("chunk", DEFAULT_CHUNK)
    if len(chunk) != 3 or not all(isinstance(v, int) and v > 0 for v in chunk):
        raise CatalogError(f"{where}: chunk must be three positive integers [z, y, x]")
    path = Path(entry["path"]).expanduser()
    metadata = {k: str(v) for k, v in entry.items() if k not in KNOWN_KEYS}
    return DatasetSpec(
        id=entry["id"],
        path=str(path if path.is_absolute() else base / path),
        voxel_size=tuple(float(v) for v in voxel) if voxel else None,
        kind=kind,
        embargo=bool(entry.get("embargo", False)),
        downsample=entry.get("downsample"),
        compression=entry.get("compression", "blosc"),
        encoding=entry.get("encoding"),
        chunk=tuple(chunk),
        metadata=metadata,
    )


def load_catalog(path: str | Path) -> list[DatasetSpec]:
    """Parse a TOML catalog: one [[datasets]] table per dataset; relative paths are relative to the file."""
    path = Path(path)
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CatalogError(f"{path}: cannot read the catalog ({exc})") from exc
    entries = doc.get("datasets", [])
    if not isinstance(entries, list):
        raise CatalogError(f"{path}: 'datasets' must be an array of tables ([[datasets]])")
    taken = {e["id"] for e in entries if isinstance(e, dict) and isinstance(e.get("id"), str)}
    specs = []
    for i, entry in enumerate(entries):
        specs.append(_spec(entry, f"{path}: datasets[{i}]", path.parent, taken))
        taken.add(specs[-1].id)
    return _unique(specs, str(path))


def specs_from_paths(paths: list[str]) -> list[DatasetSpec]:
    """Datasets for bare PATH arguments, with ids derived from their names."""
    specs = []
    seen: set[str] = set()
    for p in paths:
        stem = re.sub(r"(\.ome)?\.(tiff?|zarr|ims|jp2|j2k)$", "", Path(p.rstrip("/")).name or "dataset", flags=re.I)
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-") or "dataset"
        ident, n = base, 1
        while ident in seen:
            n += 1
            ident = f"{base}-{n}"
        seen.add(ident)
        specs.append(DatasetSpec(id=ident, path=str(Path(p).expanduser().resolve()) if "*" not in p else p))
    return specs


def _unique(specs: list[DatasetSpec], where: str) -> list[DatasetSpec]:
    ids = [s.id for s in specs]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise CatalogError(f"{where}: dataset ids must be unique; repeated: {', '.join(dupes)}")
    return specs


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
