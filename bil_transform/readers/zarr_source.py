"""Zarr sources: a v2 or v3 array, or an OME-Zarr 0.4/0.5 multiscale group whose levels are native."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import zarr
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import LocalStore

from ..cache import Section
from . import confine
from .base import (
    Channel,
    NativeLevel,
    Region,
    SourceError,
    Volume,
    check_region,
    default_channels,
    reading,
    um_per_unit,
    version_token,
)

DEFAULT_AXES = {2: "yx", 3: "zyx", 4: "czyx", 5: "tczyx"}
METADATA_FILES = ("zarr.json", ".zarray", ".zattrs", ".zgroup")


class ConfinedStore(LocalStore):
    """A read-only local store whose every key is read through confine.open_file: it resolves inside
    the dataset's root to a regular file (a chunk that is a symlink out, or a FIFO, is refused), and
    the bytes come from the handle that was checked, never from a second open by name."""

    def __init__(self, path: Path, root: Path):
        super().__init__(path, read_only=True)
        self.confined_to = root

    def _read(self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None) -> Buffer | None:
        try:
            f = confine.open_file(self.root / key, root=self.confined_to)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        with f:
            size = os.fstat(f.fileno()).st_size
            if byte_range is None:
                start, stop = 0, size
            elif isinstance(byte_range, RangeByteRequest):
                start, stop = byte_range.start, min(byte_range.end, size)
            elif isinstance(byte_range, OffsetByteRequest):
                start, stop = byte_range.offset, size
            elif isinstance(byte_range, SuffixByteRequest):
                start, stop = max(0, size - byte_range.suffix), size
            else:
                raise TypeError(f"unexpected byte range {byte_range!r}")
            return prototype.buffer.from_bytes(os.pread(f.fileno(), max(0, stop - start), start))

    async def get(self, key: str, prototype: BufferPrototype | None = None,
                  byte_range: ByteRequest | None = None) -> Buffer | None:
        return await asyncio.to_thread(self._read, key, prototype or default_buffer_prototype(), byte_range)

    async def get_partial_values(self, prototype: BufferPrototype,
                                 key_ranges: Iterable[tuple[str, ByteRequest | None]]) -> list[Buffer | None]:
        return list(await asyncio.gather(*(self.get(key, prototype, byte_range) for key, byte_range in key_ranges)))


def is_zarr(path: Path) -> bool:
    return path.is_dir() and any((path / name).exists() for name in METADATA_FILES)


def _ome_attrs(group: zarr.Group) -> dict | None:
    attrs = dict(group.attrs)
    ome = attrs.get("ome", attrs)
    return ome if "multiscales" in ome else None


def _transform(node: dict, kind: str) -> list[float] | None:
    return next((t.get(kind) for t in node.get("coordinateTransformations", []) if t.get("type") == kind), None)


def _physical(ms: dict, axes: str) -> list[tuple[tuple[float, ...] | None, tuple[float, ...] | None]]:
    """Each level's (z, y, x) scale and translation in micrometers, None where the metadata has none:
    the level's own transforms, then the multiscale's, which NGFF applies after them."""
    units = {a.get("name"): a.get("unit") for a in ms.get("axes", []) if isinstance(a, dict)}
    um = [um_per_unit(units.get(a) or "micrometer") or 1.0 for a in axes]

    def vector(node: dict, kind: str) -> list[float] | None:  # one value per axis, or none at all
        values = _transform(node, kind)
        return values if values is not None and len(values) == len(axes) else None

    def zyx(values: list[float], z: float) -> tuple[float, float, float]:
        named = dict(zip(axes, values))
        return named.get("z", z), named["y"], named["x"]

    outer_scale = vector(ms, "scale") or [1.0] * len(axes)
    outer_shift = vector(ms, "translation") or [0.0] * len(axes)
    out = []
    for d in ms["datasets"]:
        scale, shift = vector(d, "scale"), vector(d, "translation")
        if shift is None and any(outer_shift):
            shift = [0.0] * len(axes)
        out.append((
            zyx([v * o * u for v, o, u in zip(scale, outer_scale, um)], 1.0) if scale else None,
            zyx([(v * o + t) * u for v, o, t, u in zip(shift, outer_scale, outer_shift, um)], 0.0) if shift else None,
        ))
    return out


class ZarrReader:
    def __init__(self, path: Path, segments: Section | None = None,  # unused: slabs align with its chunks
                 root: Path | None = None):
        self.path = Path(path)
        self.root = confine.inside(root or confine.current_root() or confine.default_root(self.path))
        try:
            node = zarr.open(ConfinedStore(self.path, self.root), mode="r")
        except SourceError:
            raise
        except Exception as exc:
            raise SourceError(f"{self.path}: not a readable Zarr array or group ({exc})") from exc
        channels: tuple[Channel, ...] = ()
        colors: tuple = ()
        voxel, voxel_known = (1.0, 1.0, 1.0), False
        if isinstance(node, zarr.Array):
            arrays, axes = [node], DEFAULT_AXES.get(node.ndim)
        else:
            ome = _ome_attrs(node)
            if ome is None:
                raise SourceError(f"{self.path}: Zarr group without OME multiscales metadata")
            ms = ome["multiscales"][0]
            confine.all_inside([self.path / d["path"] for d in ms["datasets"]], self.path)
            axes = "".join(a["name"] if isinstance(a, dict) else a for a in ms.get("axes", [])) or None
            arrays = [node[d["path"]] for d in ms["datasets"]]
            axes = axes or DEFAULT_AXES.get(arrays[0].ndim)
            channels = self._channels(ome.get("omero"))
            colors = self._label_colors(ome.get("image-label"))
        if axes is None or not set(axes) <= set("tczyx") or len(axes) != arrays[0].ndim or not axes.endswith("yx"):
            raise SourceError(f"{self.path}: unsupported axes {axes!r} for a {arrays[0].ndim}-D array")
        self._axes, self._arrays = axes, arrays
        full = dict(zip(axes, arrays[0].shape))
        shape = (full.get("t", 1), full.get("c", 1), full.get("z", 1), full["y"], full["x"])
        physical = _physical(ms, axes) if not isinstance(node, zarr.Array) else [(None, None)]
        scales = [scale if scale and all(v > 0 for v in scale) else None for scale, _ in physical]
        if scales[0] is not None:
            voxel, voxel_known = scales[0], True
        levels = []
        for a, scale, (_, shift) in zip(arrays, scales, physical):
            s = dict(zip(axes, a.shape))
            lvl = (s.get("z", 1), s["y"], s["x"])
            if scale is not None and scales[0] is not None:  # the metadata's own factors: 75 -> 38 is still 2
                factors = tuple(mine / first for first, mine in zip(scales[0], scale))
            else:
                factors = tuple(float(max(1, round(n0 / n))) for n0, n in zip(shape[2:], lvl))
            levels.append(NativeLevel(lvl, factors, shift))
        chunks = dict(zip(axes, arrays[0].chunks))
        meta = [p for a in arrays for n in METADATA_FILES if (p := self.path / a.path / n).exists()]
        meta += [p for n in METADATA_FILES if (p := self.path / n).exists()]
        if len(channels) != shape[1]:
            channels = default_channels(shape[1])
        self.volume = Volume(
            format=f"zarr-v{arrays[0].metadata.zarr_format}",
            path=str(self.path),
            shape=shape,
            dtype=np.dtype(arrays[0].dtype),
            voxel_size=voxel,
            voxel_size_known=voxel_known,
            native_levels=tuple(levels),
            block_shape=(chunks.get("z", 1), chunks["y"], chunks["x"]),
            version=version_token(sorted(set(meta))),
            files=tuple(str(p) for p in sorted(set(meta))),
            channels=channels,
            origin=levels[0].translation or (0.0, 0.0, 0.0),
            label_colors=colors,
        )

    @staticmethod
    def _label_colors(label: dict | None) -> tuple[tuple[int, tuple[int, int, int, int]], ...]:
        """NGFF image-label colours: (label value, RGBA 0-255), the well-formed entries."""
        out = []
        for entry in (label or {}).get("colors", []):
            value, rgba = entry.get("label-value"), entry.get("rgba")
            if isinstance(value, int) and isinstance(rgba, list) and len(rgba) == 4:
                out.append((value, tuple(int(v) for v in rgba)))
        return tuple(out)

    @staticmethod
    def _channels(omero: dict | None) -> tuple[Channel, ...]:
        if not omero:
            return ()
        out = []
        for i, ch in enumerate(omero.get("channels", [])):
            w = ch.get("window") or {}
            window = (float(w["start"]), float(w["end"])) if "start" in w and "end" in w else None
            out.append(Channel(str(ch.get("label", f"ch{i}")), str(ch.get("color", "FFFFFF")), window))
        return tuple(out)

    def read(self, level: int, t: int, c: int, region: Region) -> np.ndarray:
        check_region(self.volume.native_levels[level].shape, region)
        index = {"t": t, "c": c, "z": region[0], "y": region[1], "x": region[2]}
        with reading(self.path, f"level {level}"):
            block = self._arrays[level][tuple(index[a] for a in self._axes)]
        return block if block.ndim == 3 else block[np.newaxis]
