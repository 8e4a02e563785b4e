"""Neuroglancer precomputed: `info` and chunks named by absolute voxel ranges, clipped at the edges.

Chunk bytes are the [x, y, z, channel] Fortran-order layout, which is exactly the C-order
bytes of our (channel, z, y, x) blocks, so no transpose is ever needed.
"""

from __future__ import annotations

import re

import compressed_segmentation
import imagecodecs
import numpy as np

from ..cache import Section
from ..pyramid import Pyramid
from .resource import BINARY, JSON, Resource, to_json
from .sharding import PrecomputedSharding, Shard

ENCODINGS = ("raw", "jpeg", "png", "compressed_segmentation")
CHUNK_NAME = re.compile(r"(\d+)-(\d+)_(\d+)-(\d+)_(\d+)-(\d+)")
SHARD_NAME = re.compile(r"([0-9a-f]+)\.shard")
JPEG_QUALITY = 90
CSEG_BLOCK = (8, 8, 8)

# What Neuroglancer cannot show natively, served as a type it can (also reported by the API).
SERVED_DTYPES = {
    "float64": "float32", "float16": "float32", "bool": "uint8",
    "int64": "float32",  # images; labels become uint64 (see served_dtype)
}


def served_dtype(dtype: np.dtype, kind: str) -> np.dtype:
    if kind == "labels" and dtype.kind in "iu":
        return np.dtype("uint64") if dtype.itemsize == 8 else np.dtype(dtype)
    return np.dtype(SERVED_DTYPES.get(dtype.name, dtype.name))


def supported(encoding: str, dtype: np.dtype, channels: int) -> bool:
    """Which encodings Neuroglancer and tensorstore decode for this data."""
    return {
        "raw": True,
        "jpeg": dtype == np.uint8 and channels in (1, 3),
        "png": dtype in (np.uint8, np.uint16) and 1 <= channels <= 4,
        # one channel: the compressed_segmentation package crashes on 4-D input
        "compressed_segmentation": dtype in (np.uint32, np.uint64) and channels == 1,
    }[encoding]


def default_encoding(dtype: np.dtype, kind: str) -> str:
    return "compressed_segmentation" if kind == "labels" and supported("compressed_segmentation", dtype, 1) else "raw"


class Precomputed:
    """The `/precomputed/` view of one dataset: one time point, all or one channel, one encoding;
    with `sharded`, the `/precomputed-sharded/` view, whose shard files are assembled on request
    from the same cached chunks."""

    def __init__(self, pyramid: Pyramid, chunks: Section, encoding: str | None = None, t: int = 0,
                 channel: int | None = None, sharded: bool = False):
        vol = pyramid.volume
        self.sharded = sharded
        if not 0 <= t < vol.shape[0]:
            raise KeyError(f"No time point {t}: the dataset has {vol.shape[0]}")
        if channel is not None and not 0 <= channel < vol.shape[1]:
            raise KeyError(f"No channel {channel}: the dataset has {vol.shape[1]}")
        self.pyramid, self.chunks, self.t = pyramid, chunks, t
        self.channels = [channel] if channel is not None else list(range(vol.shape[1]))
        self.dtype = served_dtype(vol.dtype, vol.kind)
        self.encoding = encoding or default_encoding(self.dtype, vol.kind)
        if not supported(self.encoding, self.dtype, len(self.channels)):
            raise ValueError(f"the {self.encoding} encoding cannot hold {len(self.channels)} channel(s) of "
                             f"{self.dtype.name}; use raw" + ("" if channel is not None else " or pick one channel"))
        if vol.kind == "labels" and len(self.channels) != 1:
            raise ValueError("a segmentation source has one channel; pick one with /c/N/")

    def info(self) -> dict:
        vol = self.pyramid.volume
        scales = []
        for i, lvl in enumerate(self.pyramid.levels):
            scale = {
                "key": str(i),
                "size": list(lvl.shape[::-1]),
                "resolution": [v * f * 1000.0 for v, f in zip(vol.voxel_size[::-1], lvl.factors[::-1])],
                "voxel_offset": [0, 0, 0],
                "chunk_sizes": [list(lvl.chunks[::-1])],
                "encoding": self.encoding,
            }
            if self.encoding == "compressed_segmentation":
                scale["compressed_segmentation_block_size"] = list(CSEG_BLOCK)
            if self.sharded:
                scale["sharding"] = self.sharding(i).spec()
            scales.append(scale)
        return {
            "@type": "neuroglancer_multiscale_volume",
            "type": "segmentation" if vol.kind == "labels" else "image",
            "data_type": self.dtype.name,
            "num_channels": len(self.channels),
            "scales": scales,
        }

    def sharding(self, level: int) -> PrecomputedSharding:
        return PrecomputedSharding.for_grid(self.pyramid.levels[level].grid[::-1])

    def chunk(self, level: int, index: tuple[int, int, int]) -> Resource:
        """Chunk `index` (z, y, x) of `level`. Raw chunks have a known length, so a shard of
        them can be indexed and ranged without encoding anything the range does not cover."""
        lvl = self.pyramid.levels[level]
        clipped = [min(c, s - i * c) for i, c, s in zip(index, lvl.chunks, lvl.shape)]
        length = int(np.prod(clipped)) * len(self.channels) * self.dtype.itemsize if self.encoding == "raw" else None
        return Resource((*self._base(), level, index), lambda: self.encode(level, index), BINARY, self.chunks,
                        compressible=self.encoding in ("raw", "compressed_segmentation"), length=length)

    def shard(self, level: int, shard: int) -> Shard:
        sharding = self.sharding(level)
        cells = sharding.cells(shard)
        chunks = tuple(self.chunk(level, sharding.cell(code)[::-1]) for code, _ in cells)
        return Shard((*self._base(), "shard", level, shard), chunks, lambda lengths: sharding.index(cells, lengths),
                     sharding.index_length(cells), index_at_end=False, cache=self.chunks,
                     workers=self.pyramid.workers)

    def _base(self) -> tuple:
        return ("precomputed", *self.pyramid.key, self.encoding, self.t, tuple(self.channels))

    def encode(self, level: int, index: tuple[int, int, int]) -> bytes:
        blocks = [self.pyramid.block(level, self.t, c, index) for c in self.channels]
        data = np.stack(blocks).astype(self.dtype.newbyteorder("<"), copy=False)  # (c, z, y, x)
        c, z, y, x = data.shape
        if self.encoding == "raw":
            return data.tobytes()
        if self.encoding == "compressed_segmentation":
            return compressed_segmentation.compress(data[0].T, block_size=CSEG_BLOCK, order="F")
        # image encodings: width x, height y*z, channels interleaved (the codecs need C-contiguous input)
        image = np.ascontiguousarray(np.moveaxis(data, 0, -1).reshape(z * y, x, c))
        if self.encoding == "jpeg":
            # 4:4:4: channels are independent measurements, not colour to subsample
            return imagecodecs.jpeg8_encode(image if c == 3 else image[..., 0], level=JPEG_QUALITY, subsampling="444")
        return imagecodecs.png_encode(image if c > 1 else image[..., 0])

    def resource(self, key: str) -> Resource | Shard:
        if key == "info":
            return Resource((*self._base(), self.sharded, key), lambda: to_json(self.info()), JSON, self.chunks,
                            compressible=True)
        level_name, _, name = key.partition("/")
        if not level_name.isdigit() or int(level_name) >= len(self.pyramid.levels) or "/" in name or not name:
            raise KeyError(key)
        level = int(level_name)
        if self.sharded:
            return self._shard_resource(key, level, name)
        lvl = self.pyramid.levels[level]
        m = CHUNK_NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"chunk name {name!r} must be x0-x1_y0-y1_z0-z1 in voxels, like 0-64_0-64_0-64")
        x0, x1, y0, y1, z0, z1 = map(int, m.groups())
        index = []
        for lo, hi, chunk, size in zip((z0, y0, x0), (z1, y1, x1), lvl.chunks, lvl.shape):
            if lo % chunk or lo >= size or hi != min(lo + chunk, size):
                raise KeyError(key)  # not a chunk of this grid
            index.append(lo // chunk)
        return self.chunk(level, tuple(index))

    def _shard_resource(self, key: str, level: int, name: str) -> Shard:
        sharding = self.sharding(level)
        m = SHARD_NAME.fullmatch(name)
        if m is None:
            raise ValueError(f"shard name {name!r} must be a hexadecimal shard number and .shard, like "
                             f"{sharding.shard_name(0)}")
        shard = int(m.group(1), 16)
        if shard >= sharding.shards() or name != sharding.shard_name(shard):
            raise KeyError(key)
        return self.shard(level, shard)
