"""The catalog: which datasets exist, where their files are, and what people may search them by (parsed
and checked here; served by dataset.py)."""

from __future__ import annotations

import hashlib
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .pyramid import DEFAULT_CHUNK
from .pyramid.downsample import METHODS
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
