"""The JSON the API returns for a dataset: what the catalog and the current snapshot know, read from
one snapshot so a document never mixes two versions."""

from __future__ import annotations

from pathlib import Path

from . import search
from .dataset import Dataset, Snapshot
from .writers import default_encoding, precomputed_encodings, served_dtype
from .writers.codecs import COMPRESSORS


def searchable(ds: Dataset) -> dict[str, str]:
    """Every field a search may name: the catalog's, the path's own name and what the reader found."""
    pyramid = ds.pyramid
    channels = [c.name for c in pyramid.volume.channels] if pyramid is not None else []
    return search.fields({**summary(ds), "path": Path(ds.spec.path).name}, channels)


def summary(ds: Dataset, snap: Snapshot | None = None) -> dict:
    """What the catalog and the reader know without reading voxels."""
    spec, snap = ds.spec, snap or ds.snapshot
    doc: dict = {"id": spec.id, **spec.metadata, "kind": spec.kind, "embargo": spec.embargo}
    pyramid = snap.pyramid
    if pyramid is None:
        return {**doc, "status": "error", "error": ds.public(snap.error or "")}
    vol = pyramid.volume
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
        "downsample": pyramid.method,
        "zarr": {"compression": spec.compression, "compressions": list(COMPRESSORS)},
        "precomputed": {
            "data_type": served.name,
            "encoding": spec.encoding or default_encoding(served, vol.kind),
            "encodings": precomputed_encodings(pyramid),
        },
        "levels": [
            {"shape": list(lvl.shape), "factors": list(lvl.factors), "chunks": list(lvl.chunks),
             "native": lvl.native is not None}
            for lvl in pyramid.levels
        ],
    }


def describe(ds: Dataset, reveal: bool = True) -> dict:
    """The summary plus channels; with `reveal`, their display windows too (which may read one
    plane to estimate contrast, so an embargoed dataset shows them only to a token holder)."""
    snap = ds.snapshot
    doc, pyramid = summary(ds, snap), snap.pyramid
    if pyramid is not None:
        doc["channels"] = [
            {"name": ch.name, "color": ch.color, **({"window": list(pyramid.display_window(c))} if reveal else {})}
            for c, ch in enumerate(pyramid.volume.channels)
        ]
    return doc
