"""The JSON the API returns for a dataset: what the catalog and the current snapshot know, read from
one snapshot so a document never mixes two versions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from . import access, search
from .dataset import Dataset, Snapshot
from .tracings import Traced
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
    doc: dict = {"id": spec.id, **spec.metadata, "kind": spec.kind,
                 "embargo": access.embargoed(ds)}  # the effective one: an image's embargo covers what is attached to it
    if spec.kind == "skeletons":
        doc.update(space=spec.space, units=spec.units, offset=list(spec.offset))
    if snap.error is not None:
        return {**doc, "status": "error", "error": ds.public(snap.error)}
    if snap.tracings is not None:
        bad = sum(t.error is not None for t in snap.tracings.neurons)
        return {**doc, "status": "ok", "format": "swc", "neuron_count": len(snap.tracings.neurons) - bad,
                "unavailable_neurons": bad}
    pyramid = snap.pyramid
    vol = pyramid.volume
    served = served_dtype(vol.dtype, vol.kind)
    if ds.derived is not None:  # served with a store of prepared levels: what it holds for this source
        doc["preparation"] = snap.preparation.public()
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
        **({"notes": [ds.public(n) for n in vol.notes]} if vol.notes else {}),  # what the reader had to decide
    }


def describe(ds: Dataset, reveal: bool = True, skeletons: Sequence[Dataset] = (),
             terms: Sequence[tuple[str | None, str]] = ()) -> dict:
    """The summary plus channels; with `reveal`, their display windows too (which may read one
    plane to estimate contrast, so an embargoed dataset shows them only to a token holder). An
    image lists the skeleton sources traced on it; a skeleton source, with `reveal`, its neurons
    that match the search `terms`."""
    if ds.derived is not None and ds.snapshot.preparation.state != "complete":
        ds.reattach()  # the preparation's progress as it is now
    snap = ds.snapshot
    doc, pyramid = summary(ds, snap), snap.pyramid
    if skeletons:
        doc["skeletons"] = [summary(s) for s in skeletons]
    if snap.tracings is not None and reveal:
        listed = [(t, neuron_fields(ds, t)) for t in snap.tracings.neurons]
        doc["neurons"] = [neuron(ds, t) for t, fields in listed if search.matches(list(terms), fields)]
    if pyramid is not None:
        doc["channels"] = [
            {"name": ch.name, "color": ch.color, **({"window": list(pyramid.display_window(c))} if reveal else {})}
            for c, ch in enumerate(pyramid.volume.channels)
        ]
    return doc


def neuron(ds: Dataset, traced: Traced) -> dict:
    """One neuron of a skeleton source: its names, its file, its measures and its SWC header (in
    micrometres of the image's OME-Zarr frame), or why it is unavailable."""
    doc: dict = {"id": traced.name, "segid": traced.segid, "file": traced.file}
    if traced.error is not None:
        return {**doc, "status": "error", "error": ds.public(traced.error)}
    m = traced.measures
    return {**doc, "status": "ok", "nodes": m.nodes, "cable_um": round(m.cable_length, 3),
            "soma_um": [round(v, 3) for v in m.soma], "header": dict(traced.header)}


def neuron_fields(ds: Dataset, traced: Traced) -> dict[str, str]:
    """What a neuron can be searched by: the source's catalog metadata, then its SWC header (so a
    file's own SOMA_REGION wins over the catalog's), its names and its file."""
    return {**ds.spec.metadata, **dict(traced.header), "id": traced.name, "segid": str(traced.segid),
            "file": traced.file}
