"""OME-Zarr: NGFF 0.4 on zarr v2 and NGFF 0.5 on zarr v3 (optionally sharded), padded compressed chunks.

`resource(key)` maps a store key to its body (resource.py), kept in the `chunks` cache section
the view is given; the server streams it and turns KeyError into 404, ValueError into 400. Both versions encode a
chunk to the same bytes (C order, little endian, then the compressor), so they share one
cache entry, and a v3 shard is assembled from exactly those entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..cache import Section
from ..pyramid import Pyramid
from .codecs import Compressor
from .resource import BINARY, JSON, Resource, to_json
from .sharding import Shard, zarr_index, zarr_index_length

AXES = [
    {"name": "t", "type": "time"},
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space", "unit": "micrometer"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]
DIMENSIONS = [a["name"] for a in AXES]


def array_dimensions(level: int) -> list[str]:
    """xarray's `_ARRAY_DIMENSIONS` of a v2 level: t and c are shared, the spatial axes of each
    coarser level are its own (z1, y1, x1, ...), so `xarray.open_zarr` opens every level of the
    group side by side instead of refusing their different sizes. (v3's `dimension_names` must
    be the NGFF axis names, so there every level says t, c, z, y, x.)"""
    return [*DIMENSIONS[:2], *(f"{a}{level}" if level else a for a in DIMENSIONS[2:])]
SHARD_CHUNKS = 4  # inner chunks per shard along z, y and x, where the level is that large


@dataclass(frozen=True)
class Frame:
    """Where a label dataset's level 0 lies in the space of the image it is attached to: the
    voxel size and translation of the image level whose shape it has."""

    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]


def level_transforms(pyramid: Pyramid, frame: Frame | None = None) -> list[tuple[list[float], list[float]]]:
    """Each level's (z, y, x) scale and translation. A level the source stores keeps the source's
    translation; a computed level's puts its voxel centres where the centres of the voxels it
    averages are, so levels overlay exactly. In a `frame`, level 0 takes the frame's."""
    vol = pyramid.volume
    voxel, origin = (frame.voxel_size, frame.origin) if frame else (vol.voxel_size, vol.origin)
    out, shift, scale = [], list(origin), list(voxel)
    for lvl in pyramid.levels:
        stored = vol.native_levels[lvl.native].translation if lvl.native is not None and not frame else None
        if stored is not None:  # the source's own, kept as it says
            shift = list(stored)
        elif lvl.native is not None:  # a stored level without one: box-downsampled from level 0
            shift = [o + (f - 1) / 2 * v for o, f, v in zip(origin, lvl.factors, voxel)]
        else:  # computed: the centre of the parent voxels each voxel averages
            shift = [t + (s - 1) / 2 * v for t, s, v in zip(shift, lvl.step, scale)]
        scale = [v * f for v, f in zip(voxel, lvl.factors)]
        out.append((scale, shift))
    return out


def multiscale(pyramid: Pyramid, name: str, frame: Frame | None = None) -> dict:
    """One NGFF multiscale (without its version, which 0.4 and 0.5 place differently)."""
    datasets = [{"path": str(i), "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, 1.0, *scale]},
        {"type": "translation", "translation": [0.0, 0.0, *shift]},
    ]} for i, (scale, shift) in enumerate(level_transforms(pyramid, frame))]
    return {"name": name, "axes": AXES, "datasets": datasets,
            "type": pyramid.method, "metadata": {"method": f"bil_transform.pyramid.downsample.{pyramid.method}"}}


def label_frame(image: Pyramid, label: Pyramid) -> Frame | None:
    """The frame of the image level whose (z, y, x) shape the label's level 0 has, None if no
    level has it (the label cannot be overlaid on this image)."""
    for lvl, (scale, shift) in zip(image.levels, level_transforms(image)):
        if lvl.shape == label.levels[0].shape:
            return Frame(tuple(scale), tuple(shift))
    return None


def image_label(pyramid: Pyramid, attached: bool) -> dict:
    """NGFF `image-label`: the source's colours where it has them, and the image it belongs to."""
    doc: dict = {}
    if pyramid.volume.label_colors:
        doc["colors"] = [{"label-value": v, "rgba": list(rgba)} for v, rgba in pyramid.volume.label_colors]
    if attached:
        doc["source"] = {"image": "../../"}
    return doc


def omero(pyramid: Pyramid, name: str) -> dict:
    vol = pyramid.volume
    if np.issubdtype(vol.dtype, np.integer):
        info = np.iinfo(vol.dtype)
        lo, hi = float(info.min), float(info.max)
    else:
        lo, hi = None, None
    channels = []
    for c, ch in enumerate(vol.channels):
        start, end = pyramid.display_window(c)
        channels.append({
            "label": ch.name, "color": ch.color, "active": True, "coefficient": 1.0,
            "family": "linear", "inverted": False,
            "window": {"min": min(lo, start) if lo is not None else start,
                       "max": max(hi, end) if hi is not None else end, "start": start, "end": end},
        })
    return {"name": name, "channels": channels,
            "rdefs": {"defaultT": 0, "defaultZ": pyramid.levels[0].shape[0] // 2,
                      "model": "color" if len(channels) > 1 else "greyscale"}}


class _ZarrView:
    """What both zarr versions share: levels, the chunk grid and chunk bytes."""

    view: str  # the URL name, which also keys its metadata documents in the cache

    def __init__(self, pyramid: Pyramid, chunks: Section, name: str, compression: str = "blosc",
                 labels: dict[str, tuple[Pyramid, Frame]] | None = None, frame: Frame | None = None):
        self.pyramid, self.chunks, self.name = pyramid, chunks, name
        self.compressor = Compressor(compression)
        self.dtype = np.dtype(pyramid.volume.dtype)
        self.labels = labels or {}  # label datasets served under labels/, each in this image's frame
        self.frame = frame  # set when this view is a label group under its image

    @property
    def is_label(self) -> bool:
        return self.pyramid.volume.kind == "labels"

    def label_view(self, name: str) -> _ZarrView:
        """The view of one attached label dataset, under labels/NAME/."""
        if name not in self.labels:
            raise KeyError(name)
        pyramid, frame = self.labels[name]
        return self.sub(pyramid, name, frame)

    def sub(self, pyramid: Pyramid, name: str, frame: Frame) -> _ZarrView:
        return type(self)(pyramid, self.chunks, name, self.compressor.name, frame=frame)

    def shape(self, level: int) -> list[int]:
        return [*self.pyramid.volume.shape[:2], *self.pyramid.levels[level].shape]

    def chunk_shape(self, level: int) -> list[int]:
        return [1, 1, *self.pyramid.levels[level].chunks]

    def _level(self, key: str) -> tuple[int, str]:
        level_name, _, rest = key.partition("/")
        if not level_name.isdigit() or int(level_name) >= len(self.pyramid.levels) or not rest:
            raise KeyError(key)
        return int(level_name), rest

    def _grid_index(self, key: str, parts: list[str], grid: list[int], example: str) -> tuple[int, ...]:
        if len(parts) != 5:
            raise KeyError(key)
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"chunk key {key!r} must be five non-negative integers after the level, like {example}")
        index = tuple(map(int, parts))
        if not all(i < g for i, g in zip(index, grid)):
            raise KeyError(key)
        return index

    def chunk(self, level: int, t: int, c: int, index: tuple[int, int, int]) -> Resource:
        """The block padded to the full chunk shape (zarr requires equal-size chunks)."""
        lvl = self.pyramid.levels[level]

        def produce() -> bytes:
            block = self.pyramid.block(level, t, c, index)
            if block.shape != lvl.chunks:
                padded = np.zeros(lvl.chunks, block.dtype)
                padded[tuple(slice(0, n) for n in block.shape)] = block
                block = padded
            return self.compressor.encode(block)

        length = None if self.compressor.codec else int(np.prod(lvl.chunks)) * self.dtype.itemsize
        return Resource(("zarr-chunk", *self.pyramid.key, self.compressor.name, level, t, c, index), produce,
                        BINARY, self.chunks, length=length)

    def _doc(self, key: str, doc: Callable[[], dict]) -> Resource:
        labels = tuple((n, p.key, f) for n, (p, f) in self.labels.items())  # the documents list them
        return Resource((self.view, *self.pyramid.key, self.compressor.name, self.frame, labels, key),
                        lambda: to_json(doc()), JSON, self.chunks, compressible=True)


class OmeZarrV2(_ZarrView):
    """The `/zarr/` view: NGFF 0.4 on zarr v2, with consolidated metadata."""

    view = "zarr"

    def zarray(self, level: int) -> dict:
        return {
            "zarr_format": 2,
            "shape": self.shape(level),
            "chunks": self.chunk_shape(level),
            "dtype": self.dtype.newbyteorder("<").str if self.dtype.itemsize > 1 else self.dtype.str,
            "compressor": self.compressor.v2(),
            "fill_value": None,  # every chunk is answered: no value stands for "missing" (xarray masked 0s as NaN)
            "order": "C",
            "filters": None,
            "dimension_separator": "/",
        }

    def zattrs(self) -> dict:
        attrs: dict = {"multiscales": [{"version": "0.4", **multiscale(self.pyramid, self.name, self.frame)}]}
        if self.is_label:
            attrs["image-label"] = {"version": "0.4", **image_label(self.pyramid, self.frame is not None)}
        else:
            attrs["omero"] = {**omero(self.pyramid, self.name), "version": "0.4"}
        return attrs

    def documents(self) -> dict[str, dict]:
        """Every metadata key and its JSON, the labels' too; `.zmetadata` is exactly these."""
        docs = {".zgroup": {"zarr_format": 2}, ".zattrs": self.zattrs()}
        for level in range(len(self.pyramid.levels)):
            docs[f"{level}/.zarray"] = self.zarray(level)
            docs[f"{level}/.zattrs"] = {"_ARRAY_DIMENSIONS": array_dimensions(level)}
        if self.labels:
            docs["labels/.zgroup"], docs["labels/.zattrs"] = {"zarr_format": 2}, {"labels": list(self.labels)}
            for name in self.labels:
                docs.update({f"labels/{name}/{k}": v for k, v in self.label_view(name).documents().items()})
        return docs

    def resource(self, key: str) -> Resource:
        if key == ".zmetadata":
            return self._doc(key, lambda: {"zarr_consolidated_format": 1, "metadata": self.documents()})
        if key in (".zgroup", ".zattrs") or (self.labels and key in ("labels/.zgroup", "labels/.zattrs")):
            return self._doc(key, lambda: self.documents()[key])
        if key.startswith("labels/") and self.labels:
            name, _, rest = key[len("labels/"):].partition("/")
            return self.label_view(name).resource(rest)
        level, rest = self._level(key)
        if rest == ".zarray":
            return self._doc(key, lambda: self.zarray(level))
        if rest == ".zattrs":
            return self._doc(key, lambda: {"_ARRAY_DIMENSIONS": array_dimensions(level)})
        grid = [*self.pyramid.volume.shape[:2], *self.pyramid.levels[level].grid]
        parts = rest.split("/") if "/" in rest else rest.split(".")
        if rest.startswith("."):
            raise KeyError(key)
        t, c, *index = self._grid_index(key, parts, grid, "0/0/0/1/2/3")
        return self.chunk(level, t, c, tuple(index))


class OmeZarrV3(_ZarrView):
    """The `/zarr3/` view (NGFF 0.5 on zarr v3), or with `sharded` the `/zarr3-sharded/` view,
    whose shards of up to 4 x 4 x 4 chunks are assembled on request from the cached chunks."""

    view = "zarr3"

    def __init__(self, pyramid: Pyramid, chunks: Section, name: str, compression: str = "blosc",
                 sharded: bool = False, labels: dict[str, tuple[Pyramid, Frame]] | None = None,
                 frame: Frame | None = None):
        super().__init__(pyramid, chunks, name, compression, labels, frame)
        self.sharded = sharded
        if sharded:
            self.view = "zarr3-sharded"

    def sub(self, pyramid: Pyramid, name: str, frame: Frame) -> OmeZarrV3:
        return OmeZarrV3(pyramid, self.chunks, name, self.compressor.name, self.sharded, frame=frame)

    def shard_shape(self, level: int) -> list[int]:
        lvl = self.pyramid.levels[level]
        return [1, 1, *(c * min(SHARD_CHUNKS, g) for c, g in zip(lvl.chunks, lvl.grid))]

    def zarr_json(self, level: int) -> dict:
        codecs = [{"name": "bytes", "configuration": {"endian": "little"}}, *self.compressor.v3(self.dtype)]
        grid_shape = self.chunk_shape(level)
        if self.sharded:
            codecs = [{"name": "sharding_indexed", "configuration": {
                "chunk_shape": grid_shape,
                "codecs": codecs,
                "index_codecs": [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}],
                "index_location": "end",
            }}]
            grid_shape = self.shard_shape(level)
        return {
            "zarr_format": 3,
            "node_type": "array",
            "shape": self.shape(level),
            "data_type": self.dtype.name,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": grid_shape}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": False if self.dtype == bool else 0,
            "codecs": codecs,
            "attributes": {},
            "dimension_names": DIMENSIONS,
            "storage_transformers": [],
        }

    def group_json(self) -> dict:
        """The root group, with zarr-python's inline consolidated metadata: zarr v3 has no listing,
        so without it group.keys() is empty and xarray.open_zarr finds no arrays."""
        return {**self._group(), "consolidated_metadata": {
            "kind": "inline", "must_understand": False, "metadata": self.members()}}

    def _group(self) -> dict:
        ome: dict = {"version": "0.5", "multiscales": [multiscale(self.pyramid, self.name, self.frame)]}
        if self.is_label:
            ome["image-label"] = image_label(self.pyramid, self.frame is not None)
        else:
            ome["omero"] = omero(self.pyramid, self.name)
        return {"zarr_format": 3, "node_type": "group", "attributes": {"ome": ome}}

    def _labels_group(self) -> dict:
        return {"zarr_format": 3, "node_type": "group", "attributes": {"ome": {"version": "0.5",
                                                                              "labels": list(self.labels)}}}

    def members(self) -> dict[str, dict]:
        """Every node below the root by path, as consolidated metadata lists them."""
        nodes = {str(level): self.zarr_json(level) for level in range(len(self.pyramid.levels))}
        if self.labels:
            nodes["labels"] = self._labels_group()
            for name in self.labels:
                view = self.label_view(name)
                nodes[f"labels/{name}"] = view._group()
                nodes.update({f"labels/{name}/{k}": v for k, v in view.members().items()})
        return nodes

    def shard(self, level: int, t: int, c: int, index: tuple[int, int, int]) -> Shard:
        """Inner chunks in C order; those wholly past the level's edge are not stored."""
        lvl = self.pyramid.levels[level]
        per = self.shard_shape(level)[2:]
        first = [i * p // ch for i, p, ch in zip(index, per, lvl.chunks)]
        counts = [p // ch for p, ch in zip(per, lvl.chunks)]
        chunks = []
        for inner in np.ndindex(*counts):
            cell = tuple(f + i for f, i in zip(first, inner))
            chunks.append(self.chunk(level, t, c, cell) if all(i < g for i, g in zip(cell, lvl.grid)) else None)
        return Shard(("zarr3-shard", *self.pyramid.key, self.compressor.name, level, t, c, index), tuple(chunks),
                     zarr_index, zarr_index_length(len(chunks)), index_at_end=True, cache=self.chunks,
                     workers=self.pyramid.workers)

    def resource(self, key: str) -> Resource | Shard:
        if key == "zarr.json":
            return self._doc(key, self.group_json)
        if key.startswith("labels/") and self.labels:
            if key == "labels/zarr.json":
                return self._doc(key, self._labels_group)
            name, _, rest = key[len("labels/"):].partition("/")
            return self.label_view(name).resource(rest)
        level, rest = self._level(key)
        if rest == "zarr.json":
            return self._doc(key, lambda: self.zarr_json(level))
        if not rest.startswith("c/"):
            raise KeyError(key)
        per = self.shard_shape(level) if self.sharded else self.chunk_shape(level)
        grid = [-(-s // p) for s, p in zip(self.shape(level), per)]
        t, c, *index = self._grid_index(key, rest[2:].split("/"), grid, "0/c/0/0/1/2/3")
        return self.shard(level, t, c, tuple(index)) if self.sharded else self.chunk(level, t, c, tuple(index))
