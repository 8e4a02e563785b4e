"""Zeiss CZI (ZISRAW) through pylibCZIrw, ZEISS's own wrapper of libCZI: one scene a dataset.

Layout rules, from the ZISRAW format as libCZI reads it and the metadata schema ZEISS publishes next
to it (czi-to-ome-xslt, `zisraw/*.xsd`); benchmarks/czi_readers.py shows why pylibCZIrw:
- A CZI starts with the segment id "ZISRAWFILE", zero-padded to 16 bytes; `is_czi` checks exactly that.
- Pixels live in subblocks: 2-D tiles of one plane (T, C, Z, scene S, mosaic index M, ...), each placed
  at a logical rectangle of the file's pixel coordinates. A subblock stored smaller than its logical
  rectangle is a pyramid subblock; its factor is logical / stored size, rounded.
- Scenes: `scene = N` (the catalog's field) takes the subblocks with S = N; absent, the lowest scene.
  A file whose subblocks carry no S is one image: scene 0 or none.
- Level 0 is the scene's bounding box of full-size subblocks; its corner is voxel (0, 0), wherever it
  lies (negative or not). A mosaic is stitched as libCZI's single-channel scaling tile accessor
  stitches it (ZEN's 2-D view): each tile at its position, a later M index over an earlier one where
  tiles overlap, 0 where no tile lies.
- Native levels: each pyramid factor that every plane of the scene has subblocks at, read through the
  accessor at zoom 1/factor, which takes that layer's subblocks. A file without a pyramid has level 0
  only (the server computes the rest); a layer only some planes have is left to the server, with a note.
- T, C and Z come from the subblocks' own coordinates (a start above 0 is kept); other dimensions
  (R, I, H, V, B) are served at their first index, with a note. A plane without subblocks reads as 0,
  with a note (an acquisition stopped early).
- Gray8, Gray16, Gray32Float are uint8, uint16, float32. Bgr24, Bgr48, Bgr96Float become three channels
  each, red, green, blue (as the TIFF reader does with RGB samples). All channels must share one type.
- Voxel size: Metadata/Scaling/Items/Distance[@Id=X|Y|Z]/Value, in metres. A value of 1e-3 or more
  cannot be a microscope's pixel in metres (pylibCZIrw's `write_metadata` asks for micrometres) and
  is read as micrometres, with a note. No Z distance: z takes x's, with a note when there are planes.
- Channels: names from Information/Image/Dimensions/Channels/Channel@Name; colour from its Color, else
  from DisplaySetting/Channels/Channel/Color ("#AARRGGBB" or "#RRGGBB"); the display window from
  DisplaySetting's Low/High, fractions of the channel's bit range (BitCountRange, ComponentBitCount,
  else the type's), for integer types.
- Origin: the scene's stage position, Information/Image/Dimensions/S/Scenes/Scene/CenterPosition
  ("x,y" in micrometres, the centre of the scene's box); without one, the box corner in the file's
  pixel coordinates times the voxel size, so the scenes of one file keep their places.

Refused, with the file named: a header or subblock directory libCZI cannot read (damaged, truncated, never
finished), a scene that is not in the file, channels of different pixel types, other pixel types.

Reading: per z plane, the accessor reads and decodes only the subblocks that intersect the region.
The windows of a grid of the block shape (the commonest tile size) that a region covers only in part
are composed whole and kept in `segments`, so the served chunks of one tile decode it once. One
libCZI document per thread: libCZI's reader is meant to be shared, but its Linux file stream was not
safe to share until 2022, and a document costs only its directory.
"""

from __future__ import annotations

import math
import threading
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pylibCZIrw import czi as pyczi

from ..cache import Section, uncached
from . import confine
from .base import (
    Channel,
    NativeLevel,
    Region,
    SourceError,
    Volume,
    check_region,
    default_channels,
    grid_cells,
    reading,
    version_token,
    within,
)
from .bounds import check_stored

MAGIC = b"ZISRAWFILE".ljust(16, b"\0")
# pixel type: (numpy type, samples per pixel). libCZI also knows Gray32 (int32), Gray64Float, complex and
# Bgra32 types; pylibCZIrw reads none of them.
PIXEL_TYPES = {"Gray8": ("uint8", 1), "Gray16": ("uint16", 1), "Gray32Float": ("float32", 1),
               "Bgr24": ("uint8", 3), "Bgr48": ("uint16", 3), "Bgr96Float": ("float32", 3)}
RGB = (("red", "FF0000", 2), ("green", "00FF00", 1), ("blue", "0000FF", 0))  # name, colour, sample (B, G, R order)
PLANE_DIMS = ("T", "C", "Z")
OTHER_DIMS = ("R", "I", "H", "V", "B")
WINDOW_BYTES = 32 * 2**20  # the largest window composed and kept whole


def is_czi(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(16) == MAGIC


@dataclass(frozen=True)
class _Subblock:
    """What the directory says of one subblock (no pixels)."""

    coordinate: dict[str, int]
    x: int
    y: int
    w: int
    h: int
    stored_w: int
    stored_h: int
    pixel_type: str

    @property
    def factor(self) -> int:
        """1 for a full-size subblock, the pyramid factor for a smaller one."""
        if self.stored_w <= 0 or self.stored_h <= 0:
            return 0
        return max(1, round(max(self.w / self.stored_w, self.h / self.stored_h)))


class CziReader:
    def __init__(self, path: Path, segments: Section | None = None, scene: int | None = None,
                 root: Path | None = None):
        self.path = Path(path)
        self.root = root or confine.current_root() or confine.default_root(self.path)
        confine.check_file(self.path)
        self.segments = segments or uncached("segments")
        self._local = threading.local()
        try:
            doc = pyczi.CziReader(str(self.path))
        except Exception as exc:
            raise self._fail(f"the file header or subblock directory cannot be read, so the file is damaged, "
                             f"truncated or was never finished ({type(exc).__name__}: {exc})") from exc
        self._local.doc = doc
        subblocks: list[_Subblock] = []

        def collect(_index: int, info) -> bool:
            rect, stored = info.logicalRect, info.physicalSize
            subblocks.append(_Subblock(info.coordinate.to_dict(), rect.x, rect.y, rect.w, rect.h, stored.w,
                                       stored.h, info.pixelType.name))
            return True

        with reading(self.path, "the subblock directory"):
            doc.enumerate_subblocks(collect)
            xml = doc.raw_metadata
        try:
            metadata = ET.fromstring(xml.encode()) if xml else None
        except ET.ParseError:
            metadata = None
        self.volume = self._describe(subblocks, scene, metadata)

    def _fail(self, why: str) -> SourceError:
        return SourceError(f"{self.path}: {why}")

    def _describe(self, subblocks: list[_Subblock], scene: int | None, md: ET.Element | None) -> Volume:
        notes: list[str] = []
        if md is None:
            notes.append("the file has no readable XML metadata: no voxel size, channel names or colours")
        subblocks = self._pick_scene(subblocks, scene, notes)
        full = [s for s in subblocks if s.factor == 1]
        if not full:
            raise self._fail(f"{self._scene_name()}has no full-resolution subblocks (only pyramid ones)")
        x0, y0 = min(s.x for s in full), min(s.y for s in full)
        width, height = max(s.x + s.w for s in full) - x0, max(s.y + s.h for s in full) - y0
        self.corner = (x0, y0)

        starts, sizes = {}, {}
        for d in PLANE_DIMS + OTHER_DIMS:
            values = {s.coordinate.get(d, 0) for s in full}
            starts[d], sizes[d] = min(values), max(values) - min(values) + 1
            if d in OTHER_DIMS and sizes[d] > 1:
                notes.append(f"dimension {d} has {sizes[d]} positions; only the first ({d}={starts[d]}) is served")
        self._starts = starts
        self._others = {d: starts[d] for d in OTHER_DIMS if any(d in s.coordinate for s in full)}

        types: dict[int, set[str]] = {}
        for s in full:
            types.setdefault(s.coordinate.get("C", 0), set()).add(s.pixel_type)
        found = set().union(*types.values())
        if len(found) > 1:
            per = "; ".join(f"C{c}: {', '.join(sorted(t))}" for c, t in sorted(types.items()))
            raise self._fail(f"its channels have different pixel types ({per}), which one volume cannot hold; "
                             "only files whose channels share one pixel type are read")
        self.pixel_type = found.pop()
        if self.pixel_type not in PIXEL_TYPES:
            raise self._fail(f"pixel type {self.pixel_type} is not read (Gray8, Gray16, Gray32Float, Bgr24, Bgr48 "
                             "and Bgr96Float are)")
        dtype, self.samples = PIXEL_TYPES[self.pixel_type]

        self._factors = self._pyramid(subblocks, sizes["T"] * sizes["C"] * sizes["Z"], notes)
        shapes = [(sizes["Z"], -(-height // f), -(-width // f)) for f in self._factors]
        common = Counter((s.stored_h, s.stored_w) for s in full).most_common(1)[0][0]
        window = [min(common[0], height), min(common[1], width)]
        while window[0] * window[1] * np.dtype(dtype).itemsize * self.samples > WINDOW_BYTES:
            longest = 0 if window[0] >= window[1] else 1
            window[longest] = -(-window[longest] // 2)
        self._window = tuple(window)

        claimed = math.prod(shapes[0]) * sizes["T"] * sizes["C"] * np.dtype(dtype).itemsize * self.samples
        covered = sum(s.stored_w * s.stored_h for s in full) * np.dtype(dtype).itemsize * self.samples
        check_stored(self.path, f"{self._scene_name()}(its subblocks' planes and rectangles)", claimed, covered,
                     ratio=1024)  # uncompressed sizes: a mosaic or a stopped acquisition covers far more
        voxel, known = self._voxel_size(md, sizes["Z"], notes)
        return Volume(
            format="czi",
            path=str(self.path),
            shape=(sizes["T"], sizes["C"] * self.samples, *shapes[0]),
            dtype=np.dtype(dtype),
            voxel_size=voxel,
            voxel_size_known=known,
            origin=self._origin(md, voxel, (height, width)),
            native_levels=tuple(NativeLevel(s, (1.0, float(f), float(f))) for s, f in zip(shapes, self._factors)),
            block_shape=(1, *self._window),
            version=version_token([self.path]),
            files=(str(self.path),),
            channels=self._channels(md, sizes["C"], np.dtype(dtype)),
            notes=tuple(notes),
        )

    def _pick_scene(self, subblocks: list[_Subblock], scene: int | None, notes: list[str]) -> list[_Subblock]:
        """The subblocks of the scene asked for (absent: the lowest); sets self.scene (None: no scenes)."""
        if not subblocks:
            raise self._fail("the file holds no subblocks, so no pixels")
        scenes = sorted({s.coordinate["S"] for s in subblocks if "S" in s.coordinate})
        self.scene = None
        if not scenes:
            if scene not in (None, 0):
                raise self._fail(f"scene = {scene} does not exist; the file has no scenes (one image): "
                                 "leave scene out")
            return subblocks
        if scene is None:
            scene = scenes[0]
        elif scene not in scenes:
            which = (f"scenes {_listed(scenes)}: set scene to one of them" if len(scenes) > 1 else
                     f"one scene, {scenes[0]}: leave scene out")
            raise self._fail(f"scene = {scene} does not exist; the file has {which}")
        if len(scenes) > 1:
            notes.append(f"the file holds {len(scenes)} scenes ({_listed(scenes)}); this is scene {scene}: "
                         "another one is its own catalog entry with scene = N")
        self.scene = scene
        return [s for s in subblocks if s.coordinate.get("S") == scene]

    def _pyramid(self, subblocks: list[_Subblock], planes: int, notes: list[str]) -> list[int]:
        """1, then each pyramid factor every plane has subblocks at; notes planes without any subblock."""
        def planes_at(factor: int) -> int:
            return len({tuple(s.coordinate.get(d, 0) for d in PLANE_DIMS) for s in subblocks
                        if s.factor == factor and all(s.coordinate.get(d, 0) == v for d, v in self._others.items())})

        if (present := planes_at(1)) < planes:
            notes.append(f"{planes - present} of {planes} planes (T, C, Z) have no subblocks and read as 0; "
                         "was the acquisition stopped early?")
        factors = [1]
        for f in sorted({s.factor for s in subblocks} - {0, 1}):
            if (covered := planes_at(f)) == planes:
                factors.append(f)
            else:
                notes.append(f"pyramid subblocks at factor {f} exist for {covered} of {planes} planes only; "
                             "that level is computed by the server instead")
        return factors

    def _scene_name(self) -> str:
        return f"scene {self.scene} " if self.scene is not None else "the file "

    def _voxel_size(self, md: ET.Element | None, planes: int, notes: list[str]) -> tuple[tuple, bool]:
        """z, y, x micrometres from Scaling/Items/Distance (metres)."""
        metres = {}
        for d in md.findall("Metadata/Scaling/Items/Distance") if md is not None else ():
            try:
                value = float(d.findtext("Value", ""))
            except ValueError:
                continue
            if math.isfinite(value) and value > 0:
                metres[d.get("Id")] = value
        if "X" not in metres:
            return (1.0, 1.0, 1.0), False
        metres.setdefault("Y", metres["X"])
        if "Z" not in metres:
            metres["Z"] = metres["X"]
            if planes > 1:
                notes.append("the file gives no z spacing (Scaling Distance Z): z takes x's voxel size")
        if any(v >= 1e-3 for v in metres.values()):
            notes.append("Scaling Distance values of 1e-3 or more cannot be metres per pixel; read as micrometres")
            return tuple(metres[a] for a in "ZYX"), True
        return tuple(metres[a] * 1e6 for a in "ZYX"), True

    def _origin(self, md: ET.Element | None, voxel: tuple, size_yx: tuple[int, int]) -> tuple[float, float, float]:
        """Centre of voxel 0, z y x micrometres: from the scene's stage position, else the file's pixel frame."""
        for index, node in enumerate(md.findall("Metadata/Information/Image/Dimensions/S/Scenes/Scene")
                                     if md is not None else ()):
            try:
                if int(node.get("Index", index)) != (self.scene or 0):
                    continue
                cx, cy = (float(v) for v in (node.findtext("CenterPosition") or "").split(","))
            except ValueError:  # no index or position, or not numbers
                break
            vy, vx = voxel[1:]
            return (0.0, cy - size_yx[0] * vy / 2 + vy / 2, cx - size_yx[1] * vx / 2 + vx / 2)
        return (0.0, self.corner[1] * voxel[1] + voxel[1] / 2, self.corner[0] * voxel[2] + voxel[2] / 2)

    def _channels(self, md: ET.Element | None, n: int, dtype: np.dtype) -> tuple[Channel, ...]:
        """Names, colours and display windows of the file's channels; three (red, green, blue) per BGR channel."""
        info = md.findall("Metadata/Information/Image/Dimensions/Channels/Channel") if md is not None else []
        display = md.findall("Metadata/DisplaySetting/Channels/Channel") if md is not None else []
        by_id = {d.get("Id"): d for d in display if d.get("Id")}
        bits = md.findtext("Metadata/Information/Image/ComponentBitCount") if md is not None else None
        out = []
        for i, default in enumerate(default_channels(n)):
            c = self._starts["C"] + i
            node = info[c] if c < len(info) else (info[i] if i < len(info) else None)
            shown = (by_id.get(node.get("Id")) if node is not None else None) or (
                display[c] if c < len(display) else None)
            name = ((node.get("Name") or node.get("Id")) if node is not None else None) or default.name
            color = _color(node) or _color(shown) or default.color
            if self.samples == 3:
                prefix = f"{name} " if n > 1 else ""
                out.extend(Channel(f"{prefix}{part}", rgb) for part, rgb, _ in RGB)
                continue
            window = None
            if shown is not None and dtype.kind in "iu":
                depth = next((b for b in (_number(node, "BitCountRange"), _number(shown, "BitCountRange"),
                                          _number(node, "ComponentBitCount"), _int(bits)) if b), None)
                top = 2 ** int(depth) - 1 if depth and depth <= dtype.itemsize * 8 else np.iinfo(dtype).max
                low, high = _number(shown, "Low"), _number(shown, "High")
                if low is not None and high is not None and high > low:
                    window = (round(low * top, 3), round(high * top, 3))
            out.append(Channel(name, color, window))
        return tuple(out)

    def _document(self) -> pyczi.CziReader:
        doc = getattr(self._local, "doc", None)
        if doc is None:
            confine.check_file(self.path, root=self.root)
            with reading(self.path, "the subblock directory"):
                doc = self._local.doc = pyczi.CziReader(str(self.path))
        return doc

    def read(self, level: int, t: int, c: int, region: Region) -> np.ndarray:
        shape = self.volume.native_levels[level].shape
        check_region(shape, region)
        out = np.zeros([s.stop - s.start for s in region], self.volume.dtype)
        if not out.size:
            return out
        channel, sample = divmod(c, self.samples)
        sample = RGB[sample][2] if self.samples == 3 else 0
        for z in range(region[0].start, region[0].stop):
            self._plane(out[z - region[0].start], level, t, channel, sample, z, region[1:], shape[1:])
        return out

    def _plane(self, out: np.ndarray, level: int, t: int, channel: int, sample: int, z: int,
               region: tuple[slice, slice], shape: tuple[int, int]) -> None:
        """Fill `out` with the (y, x) `region` of one plane: the windows it covers whole in one
        composition, those it covers in part from the composed windows kept in `segments`."""
        whole = []
        for win, part in grid_cells(region, self._window, shape):
            if part == win:
                whole.append(win)
                continue
            origin = tuple(s.start for s in win)
            key = (str(self.path), self.volume.version, self.scene, level, t, channel, z, origin)
            block = self.segments.get_or_compute(key, lambda win=win: self._compose(level, t, channel, z, win))
            out[within(part, region)] = block[within(part, win)][..., sample]
        if whole:
            box = tuple(slice(min(w[a].start for w in whole), max(w[a].stop for w in whole)) for a in range(2))
            out[within(box, region)] = self._compose(level, t, channel, z, box)[..., sample]

    def _compose(self, level: int, t: int, channel: int, z: int, box: tuple[slice, slice]) -> np.ndarray:
        """The (y, x, samples) pixels of `box` of one plane of a level, as libCZI stitches them from the
        subblocks that intersect it."""
        f = self._factors[level]
        (ys, xs), (x0, y0) = box, self.corner
        roi = (x0 + xs.start * f, y0 + ys.start * f, (xs.stop - xs.start) * f, (ys.stop - ys.start) * f)
        plane = {"T": self._starts["T"] + t, "C": self._starts["C"] + channel, "Z": self._starts["Z"] + z,
                 **self._others}
        where = (f"the subblocks of {self._scene_name()}at T={plane['T']} C={plane['C']} Z={plane['Z']}, "
                 f"x {roi[0]}..{roi[0] + roi[2]}, y {roi[1]}..{roi[1] + roi[3]} (level {level})")
        with reading(self.path, where):
            pixels = self._document().read(roi=roi, plane=plane, scene=self.scene, zoom=1.0 / f,
                                           pixel_type=self.pixel_type)
        want = (ys.stop - ys.start, xs.stop - xs.start)
        if pixels.shape[:2] != want:
            raise self._fail(f"libCZI composed {pixels.shape[:2]} pixels for {where}, expected {want}")
        pixels = np.ascontiguousarray(pixels)
        pixels.flags.writeable = False
        return pixels


def _listed(values: list[int]) -> str:
    return ", ".join(map(str, values[:-1])) + (" and " if len(values) > 1 else "") + str(values[-1])


def _color(node: ET.Element | None) -> str | None:
    """"#AARRGGBB" or "#RRGGBB" as 6 hex digits."""
    text = (node.findtext("Color") or "").strip().lstrip("#") if node is not None else ""
    if len(text) in (6, 8) and all(ch in "0123456789abcdefABCDEF" for ch in text):
        return text[-6:].upper()
    return None


def _number(node: ET.Element | None, tag: str) -> float | None:
    try:
        return float(node.findtext(tag)) if node is not None and node.findtext(tag) is not None else None
    except ValueError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None
