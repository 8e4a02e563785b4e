"""OME-Zarr 0.4 on zarr v2: metadata documents and padded, compressed chunks.

`OmeZarrV2.resource(key)` maps a store key to what produces its bytes; the server
caches and serves whatever it returns and turns KeyError into 404, ValueError into 400.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from ..pyramid import Pyramid
from .codecs import compressor

AXES = [
    {"name": "t", "type": "time"},
    {"name": "c", "type": "channel"},
    {"name": "z", "type": "space", "unit": "micrometer"},
    {"name": "y", "type": "space", "unit": "micrometer"},
    {"name": "x", "type": "space", "unit": "micrometer"},
]
JSON = "application/json"
BINARY = "application/octet-stream"


@dataclass(frozen=True)
class Resource:
    key: Hashable  # cache key: identifies the bytes exactly (source version included)
    produce: Callable[[], bytes]
    content_type: str
    compressible: bool = False  # worth Content-Encoding: gzip when the client accepts it


def to_json(doc: dict) -> bytes:
    return json.dumps(doc, indent=1).encode()


def multiscale(pyramid: Pyramid, name: str) -> dict:
    """One NGFF multiscale; each level's scale and translation put its voxel centres where
    the box-downsampled voxels' centres are, so levels overlay exactly."""
    vol = pyramid.volume
    datasets = []
    for i, lvl in enumerate(pyramid.levels):
        scale = [v * f for v, f in zip(vol.voxel_size, lvl.factors)]
        shift = [o + (f - 1) / 2 * v for o, f, v in zip(vol.origin, lvl.factors, vol.voxel_size)]
        datasets.append({
            "path": str(i),
            "coordinateTransformations": [
                {"type": "scale", "scale": [1.0, 1.0, *scale]},
                {"type": "translation", "translation": [0.0, 0.0, *shift]},
            ],
        })
    return {"version": "0.4", "name": name, "axes": AXES, "datasets": datasets,
            "type": pyramid.method, "metadata": {"method": f"bil_transform.pyramid.downsample.{pyramid.method}"}}


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
    return {"name": name, "version": "0.4", "channels": channels,
            "rdefs": {"defaultT": 0, "defaultZ": pyramid.levels[0].shape[0] // 2,
                      "model": "color" if len(channels) > 1 else "greyscale"}}


class OmeZarrV2:
    """The `/zarr/` view of one dataset."""

    def __init__(self, pyramid: Pyramid, name: str, compression: str = "blosc"):
        self.pyramid, self.name = pyramid, name
        self.codec = compressor(compression)
        self.compression = compression

    def zarray(self, level: int) -> dict:
        vol, lvl = self.pyramid.volume, self.pyramid.levels[level]
        return {
            "zarr_format": 2,
            "shape": [*vol.shape[:2], *lvl.shape],
            "chunks": [1, 1, *lvl.chunks],
            "dtype": vol.dtype.str,
            "compressor": self.codec.get_config() if self.codec else None,
            "fill_value": 0,
            "order": "C",
            "filters": None,
            "dimension_separator": "/",
        }

    def chunk(self, level: int, t: int, c: int, index: tuple[int, int, int]) -> bytes:
        """The block padded to the full chunk shape (zarr requires equal-size chunks)."""
        lvl = self.pyramid.levels[level]
        block = self.pyramid.block(level, t, c, index)
        if block.shape != lvl.chunks:
            padded = np.zeros(lvl.chunks, block.dtype)
            padded[tuple(slice(0, n) for n in block.shape)] = block
            block = padded
        raw = np.ascontiguousarray(block).tobytes()
        return self.codec.encode(raw) if self.codec else raw

    def resource(self, key: str) -> Resource:
        base = ("zarr2", *self.pyramid.key, self.compression)
        if key == ".zgroup":
            return Resource((*base, key), lambda: to_json({"zarr_format": 2}), JSON, True)
        if key == ".zattrs":
            return Resource((*base, key), lambda: to_json(
                {"multiscales": [multiscale(self.pyramid, self.name)], "omero": omero(self.pyramid, self.name)}), JSON,
                True)
        level_name, _, rest = key.partition("/")
        if not level_name.isdigit() or int(level_name) >= len(self.pyramid.levels) or not rest:
            raise KeyError(key)
        level = int(level_name)
        if rest == ".zarray":
            return Resource((*base, key), lambda: to_json(self.zarray(level)), JSON, True)
        if rest == ".zattrs":
            return Resource((*base, key), lambda: to_json({"_ARRAY_DIMENSIONS": ["t", "c", "z", "y", "x"]}), JSON)
        parts = rest.split("/") if "/" in rest else rest.split(".")
        if len(parts) != 5 or rest.startswith("."):
            raise KeyError(key)
        if not all(p.isdigit() for p in parts):
            raise ValueError(f"chunk key {key!r} must be five non-negative integers after the level, like 0/0/0/1/2/3")
        t, c, *index = map(int, parts)
        grid = (*self.pyramid.volume.shape[:2], *self.pyramid.levels[level].grid)
        if not all(i < g for i, g in zip((t, c, *index), grid)):
            raise KeyError(key)
        return Resource((*base, level, t, c, *index), lambda: self.chunk(level, t, c, tuple(index)), BINARY)
