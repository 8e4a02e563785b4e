"""BigDataViewer HDF5 + XML (`dataset.xml` next to its `.h5`), and a bare BigDataViewer `.h5`.

Layout (bigdataviewer-core `bdv/img/hdf5/{Util,Hdf5ImageLoader,XmlIoHdf5ImageLoader}.java`,
spimdata `mpicbg/spim/data/{XmlKeys,registration/ViewRegistration,sequence/XmlIoTimePoints}.java`):
- HDF5: `s{setup:02d}/resolutions` (float rows of x, y, z factors per level) and
  `s{setup:02d}/subdivisions` (int rows of x, y, z block sizes per level); the voxels of time point
  T, setup S, level L in `t{T:05d}/s{S:02d}/{L}/cells`, z, y, x, its dims the level's size. Without a
  `dataType` attribute on `s{S:02d}`, the cells are BDV's legacy type: 16-bit unsigned stored as HDF5
  int16, served bit-exactly as uint16 (an old writer's uint8 or float32 without it: as stored); with
  one, that type. The XML's `size` is informational: each level's shape is its `cells` dims.
- XML: `SpimData/BasePath`, `SequenceDescription/ImageLoader format="bdv.hdf5"` with `<hdf5>` (relative
  to BasePath, itself relative to the XML's directory), `ViewSetups/ViewSetup` (id, name, size "x y z",
  voxelSize unit + "x y z", attributes channel/illumination/tile/angle ids), `ViewSetups/Attributes
  name=...` (each id's name), `Timepoints` (range, list or pattern), `MissingViews`, and
  `ViewRegistrations/ViewRegistration timepoint setup`, whose `ViewTransform type="affine"` rows
  (12 numbers, row-major 3 x 4, x y z) compose in order: world = T1 T2 ... Tn voxel.

Decisions where the format leaves room:
- World units. A voxel's centre is at its integer coordinates (imglib2). The composed registration maps
  voxels to world units, which BDV never names: BigStitcher's calibration makes them x-pixels, pybdv
  makes them the voxelSize unit. Where the registration is a scale and a translation, one world unit
  is voxelSize.x / scale.x in voxelSize's unit, the voxel size served is voxelSize's, and the
  translation is converted with that ratio. A rotated, sheared or flipped registration cannot be a
  scale and a translation: the view is served as stored, in its own grid at the origin, with a note.
- Native levels: every `resolutions` row, its factors relative to row 0, each level's shape from its
  `cells` dims; level L's voxel 0 sits where BDV's mipmap transform puts it, (factor - 1) / 2 voxels of
  level 0 in, the convention the OME writer already uses for a stored level without a translation.
- Setup groups: setups whose level shapes, factors, type, voxel size and registrations (at every time
  point where both have a view) agree are one grid, served as the channels of one dataset, ordered by
  channel id then setup id. Others (tiles, angles) are separate datasets: the catalog's `setup = N`
  picks the group holding setup N; without it, the group of the lowest setup id.
  A registration that changes between time points (drift correction) places every time point where
  the first one is, with a note.
- Time points: the listed ids in increasing order become t = 0, 1, ...
- A view in MissingViews, or a `cells` dataset that is absent, damaged or of another size, fails the
  chunks that touch it, naming the file and the view; everything else keeps serving. A setup whose
  `sNN` group is missing or unreadable is left out with a note (refused by name if `setup = N` asks for it).
- An XML whose loader is not bdv.hdf5 (bdv.n5, ...) is refused in one sentence naming the loader.
- An `.h5` with `NAME.xml` beside it that points at it is read with that XML. A bare `.h5`: setups
  from its `sNN` groups, time points from its `tNNNNN` groups, voxel size unknown.
- Chunks whose filters hdf5_chunks decodes are read raw and decompressed outside h5py's lock, into
  a buffer of the chunk's size, each once however many served chunks it feeds (as the Imaris reader
  does); only other filters and contiguous data are left to HDF5 slicing. HDF5's own deflate filter
  inflates a chunk as far as its stream goes: a 1 MB stream stored as a 16 KiB chunk took 1 GiB.
"""

from __future__ import annotations

import functools
import re
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import hdf5plugin  # noqa: F401 - registers the LZ4 filter (32004), for h5py slicing of what we do not decode
import numpy as np

from ..cache import Section, uncached
from . import bounds, confine
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
    um_per_unit,
    version_token,
    within,
)
from .bounds import check_stored
from .hdf5_chunks import Chunked, chunk_layout, decode_chunk
from .imaris import HDF5_MAGIC

LOADER = "bdv.hdf5"
ATTRIBUTE_ORDER = ("channel", "illumination", "angle", "tile")  # how a channel's name is built, first to last
LEGACY = np.dtype("int16")  # stored for BDV's unsigned 16-bit when `s{NN}` has no dataType
TOLERANCE = 1e-6  # relative: what counts as zero in a registration's off-diagonal, or as equal
# Chunks smaller than this would be read by HDF5 slicing, decompressed in C under h5py's lock, which
# benchmarks/bdv_readers.py once found 1.6x faster for Fiji's 16^3 blocks; but HDF5's filters have no
# output bound (a decompression bomb), and decoding here read 16^3 blocks of a 64 x 256 x 256 level in
# 62 ms against slicing's 81 ms (one thread): every chunk is decoded here.
SMALL_CHUNK = 0


def _is_spimdata(path: Path) -> bool:
    """Whether an XML file's root element is <SpimData>; parses up to that element only."""
    try:
        with confine.open_file(path) as f:
            for _, elem in ET.iterparse(f, events=("start",)):
                return elem.tag == "SpimData"
    except (ET.ParseError, OSError, UnicodeDecodeError, SourceError):
        return False
    return False


def _bdv_groups(f: h5py.File) -> list[int]:
    """The setup ids of an HDF5 file's `sNN` groups holding `resolutions`."""
    ids = (re.fullmatch(r"s(\d{2,})", name) for name in f)
    return sorted(int(m.group(1)) for m in ids if m and isinstance(f.get(f"{m.group(0)}/resolutions"), h5py.Dataset))


def is_bdv(path: Path) -> bool:
    """A SpimData XML (whatever its loader: one that is not bdv.hdf5 is refused with a sentence), or
    an HDF5 file with `sNN/resolutions` (before the Imaris reader, which takes any HDF5)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(HDF5_MAGIC):
        try:
            with h5py.File(path, "r") as f:
                confine.check_hdf5_links(f)  # before any link is followed; BdvReader says why it is refused
                return bool(_bdv_groups(f))
        except SourceError:
            return True
        except Exception:
            return False
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<") and b"<SpimData" in head and _is_spimdata(path)


@dataclass
class Setup:
    """One ViewSetup: what the XML says of it (nothing but its id for a bare .h5) and what the HDF5 holds."""

    id: int
    name: str = ""
    attributes: dict[str, int] = field(default_factory=dict)
    size: tuple[int, int, int] | None = None  # z, y, x, from the XML
    voxel: tuple[float, float, float] | None = None  # z, y, x micrometers, None where not given in a length unit
    shapes: list[tuple[int, int, int]] = field(default_factory=list)  # per level, z, y, x
    factors: list[tuple[float, float, float]] = field(default_factory=list)  # per level, z, y, x
    block: tuple[int, int, int] = (1, 1, 1)
    dtype: np.dtype = np.dtype("uint16")  # served
    legacy: bool = True  # int16 cells are BDV's uint16
    registrations: dict[int, np.ndarray] = field(default_factory=dict)  # time point id -> 4 x 4, x y z


def _text(elem: ET.Element | None, tag: str, default: str | None = None) -> str | None:
    child = elem.find(tag) if elem is not None else None
    return child.text.strip() if child is not None and child.text is not None else default


def _numbers(text: str | None, kind=float) -> list:
    return [kind(v) for v in (text or "").replace(",", " ").split()]


def _integer_pattern(text: str) -> list[range]:
    """spimdata's IntegerPattern: "0-10:2, 15" (ranges with an optional step, commas between), as
    ascending ranges: a pattern of millions of ids costs nothing until they are counted."""
    out = []
    for part in (text or "0").replace(" ", "").split(","):
        m = re.fullmatch(r"(-?\d+)(?:-(-?\d+)(?::(\d+))?)?", part)
        if not m:
            raise ValueError(f"time point pattern {text!r} is not N, N-M or N-M:S")
        first, last, step = int(m.group(1)), int(m.group(2) or m.group(1)), int(m.group(3) or 1)
        out.append(range(first, last + 1, step) if last >= first else range(first, last - 1, -step)[::-1])
    return out


def _size(ids: range) -> int:
    """How many ids an ascending range holds, however many (len() stops at sys.maxsize)."""
    return max(0, -(-(ids.stop - ids.start) // ids.step))


def _timepoints(elem: ET.Element | None) -> list[range]:
    """The listed time point ids, as ascending ranges (see BdvReader._held for how many are served)."""
    if elem is None:
        raise ValueError("the XML has no SequenceDescription/Timepoints")
    kind = elem.get("type")
    if kind == "range":
        return [range(int(_text(elem, "first")), int(_text(elem, "last")) + 1)]
    if kind == "list":
        return [range(i, i + 1) for i in sorted({int(_text(tp, "id")) for tp in elem.findall("Timepoint")})]
    if kind == "pattern":
        return _integer_pattern(_text(elem, "integerpattern", ""))
    raise ValueError(f"Timepoints type {kind!r} is not range, list or pattern")


def _composed(vreg: ET.Element) -> np.ndarray:
    """The product of a ViewRegistration's affine ViewTransforms in order (spimdata's updateModel)."""
    model = np.eye(4)
    for vt in vreg.findall("ViewTransform"):
        if vt.get("type", "affine") != "affine":
            raise ValueError(f"a ViewTransform of type {vt.get('type')!r}, not affine")
        values = _numbers(_text(vt, "affine"))
        if len(values) != 12:
            raise ValueError(f"an affine of {len(values)} numbers, not 12")
        if not np.all(np.isfinite(values)):
            raise ValueError(f"an affine with a number that is not finite ({_text(vt, 'affine')})")
        model = model @ np.vstack([np.reshape(values, (3, 4)), [0, 0, 0, 1]])
    return model


def _scale_translation(model: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(scale, translation), x y z, where the registration is one; None if it rotates, shears or flips."""
    linear = model[:3, :3]
    scale = np.diag(linear).copy()
    off = linear - np.diag(scale)
    if np.any(scale <= 0) or np.abs(off).max() > TOLERANCE * np.abs(scale).max():
        return None
    return scale, model[:3, 3].copy()


def _same(a: np.ndarray | tuple | None, b: np.ndarray | tuple | None) -> bool:
    if a is None or b is None:
        return a is b
    return np.allclose(np.asarray(a, float), np.asarray(b, float), rtol=TOLERANCE, atol=TOLERANCE)


def _fits(s: Setup, other: Setup) -> bool:
    """One grid: the same level shapes, factors, type and voxel size, and registrations equal
    wherever both have a view."""
    return (s.shapes == other.shapes and _same(s.factors, other.factors) and s.dtype == other.dtype
            and s.legacy == other.legacy and _same(s.voxel, other.voxel)
            and all(_same(m, other.registrations[tp]) for tp, m in s.registrations.items()
                    if tp in other.registrations))


@dataclass
class Description:
    """What a SpimData XML says: the HDF5 file, partition files, setups, time points, missing views and
    the names of each attribute's ids."""

    h5: Path
    partitions: list[Path]
    setups: dict[int, Setup]
    timepoints: list[range]  # ids, as _timepoints gives them
    missing: set[tuple[int, int]] = field(default_factory=set)  # (time point id, setup id)
    names: dict[str, dict[int, str]] = field(default_factory=dict)  # attribute -> id -> name


def _legacy(dtype: np.dtype) -> bool:
    return dtype.kind == "i" and dtype.itemsize == 2


def _head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(8)


class BdvReader:
    def __init__(self, path: Path, segments: Section | None = None, setup: int | None = None,
                 root: Path | None = None):
        self.path = Path(path)
        self.root = root or confine.current_root() or confine.default_root(self.path)
        self.segments = segments or uncached("segments")
        self._local = threading.local()
        self._layouts: dict[str, Chunked | None] = {}  # per cells path, found at its first read
        self.notes: list[str] = []
        self.xml: Path | None = None
        desc = None
        if _head(self.path) != HDF5_MAGIC:
            self.xml, desc = self.path, self._parse_xml(self.path)
        elif (companion := self.path.with_suffix(".xml")).is_file() and _is_spimdata(companion):
            try:
                desc = self._parse_xml(companion)
            except SourceError:
                desc = None
            if desc is not None and desc.h5.resolve() == self.path.resolve():
                self.xml = companion
                self.notes.append(f"metadata from {companion.name}, the BigDataViewer XML beside it")
            else:
                desc = None
        self.h5 = desc.h5 if desc else self.path
        with confine.open_hdf5(self.h5, self.xml) as f:
            desc = desc or self._bare(f)
            self.missing, self.attribute_names = desc.missing, desc.names
            self.timepoints = self._held(f, desc)
            broken = {}  # setup id -> why it cannot be served; the other setups still are
            for s in desc.setups.values():
                try:
                    self._levels(f, s)
                except (ValueError, KeyError, TypeError) as exc:
                    broken[s.id] = str(exc)
        if setup in broken or len(broken) == len(desc.setups):
            sid = setup if setup in broken else min(broken)
            raise self._fail(f"setup {sid} cannot be served: {broken[sid]}", self.h5)
        for sid, why in broken.items():
            self.notes.append(f"setup {sid} is not served: {why}")
        self.files = tuple(str(p) for p in [*([self.xml] if self.xml else []), self.h5, *desc.partitions]
                           if p.is_file())
        self.group = self._select({i: s for i, s in desc.setups.items() if i not in broken}, setup)
        self.volume = self._describe()

    # -- metadata -------------------------------------------------------------------------------

    def _fail(self, why: str, path: Path | None = None) -> SourceError:
        return SourceError(f"{path or self.path}: {why}")

    def _parse_xml(self, xml: Path) -> Description:
        """What a SpimData XML says, checked to be a bdv.hdf5 dataset whose HDF5 file exists."""
        try:
            with confine.open_file(xml) as fh:
                root = ET.parse(fh).getroot()
        except ET.ParseError as exc:
            raise self._fail(f"not a readable XML file ({exc})", xml) from exc
        if root.tag != "SpimData":
            raise self._fail(f"an XML file whose root is <{root.tag}>, not a BigDataViewer <SpimData>", xml)
        base = xml.parent / (_text(root, "BasePath") or ".")
        seq = root.find("SequenceDescription")
        loader = seq.find("ImageLoader") if seq is not None else None
        fmt = loader.get("format") if loader is not None else None
        if fmt != LOADER:
            data = next((c.text.strip() for c in (loader if loader is not None else []) if (c.text or "").strip()), "")
            n5 = f"; serve the N5 container ({data}) itself, which holds the same setups" \
                if fmt == "bdv.n5" and data else ""
            raise self._fail(f"its image loader is {fmt!r}" + (f" (image data in {data})" if data else "") +
                             f", and this reader reads BigDataViewer HDF5 ({LOADER!r}) only{n5}", xml)
        h5 = _text(loader, "hdf5")
        if not h5:
            raise self._fail("the bdv.hdf5 ImageLoader names no <hdf5> file", xml)
        h5 = Path(h5) if Path(h5).is_absolute() or loader.find("hdf5").get("type") == "absolute" else base / h5
        partitions = [base / p for part in loader.findall("partition") if (p := _text(part, "path"))]
        confine.all_inside([h5, *partitions], xml)
        if not h5.is_file():
            raise self._fail(f"the HDF5 file it names, {h5}, does not exist", xml)
        views = seq.find("ViewSetups")
        if views is None:
            raise self._fail("the XML has no SequenceDescription/ViewSetups", xml)
        desc = Description(h5, partitions, {}, [])
        for attrs in views.findall("Attributes"):
            names = desc.names.setdefault(attrs.get("name", ""), {})
            for item in attrs:
                if (i := _text(item, "id")) is not None and (name := _text(item, "name")):
                    names[int(i)] = name
        setups = desc.setups
        for vs in views.findall("ViewSetup"):
            s = Setup(int(_text(vs, "id")), _text(vs, "name") or "")
            attrs = vs.find("attributes")
            s.attributes = {a.tag: int(a.text) for a in (attrs if attrs is not None else []) if a.text}
            size = _numbers(_text(vs, "size"), int)
            s.size = tuple(size[::-1]) if len(size) == 3 else None
            vox = vs.find("voxelSize")
            unit = (_text(vox, "unit") or "").lower()
            size = _numbers(_text(vox, "size"))
            per_um = um_per_unit(unit)
            if len(size) == 3 and per_um is not None and all(v > 0 for v in size):
                s.voxel = tuple(v * per_um for v in size[::-1])
            setups[s.id] = s
        if not setups:
            raise self._fail("the XML lists no ViewSetup", xml)
        try:
            desc.timepoints = timepoints = _timepoints(seq.find("Timepoints"))
            few = sum(map(_size, timepoints)) <= bounds.LIMITS.timepoints  # a set, unless there are millions
            listed = {tp for r in timepoints for tp in r} if few else None
            for mv in seq.findall("MissingViews/MissingView"):
                desc.missing.add((int(mv.get("timepoint")), int(mv.get("setup"))))
            for vreg in root.findall("ViewRegistrations/ViewRegistration"):
                tp, sid = int(vreg.get("timepoint")), int(vreg.get("setup"))
                if sid in setups and (tp in listed if listed is not None else any(tp in r for r in timepoints)):
                    setups[sid].registrations[tp] = _composed(vreg)
        except (ValueError, TypeError) as exc:
            raise self._fail(f"unreadable BigDataViewer metadata: {exc}", xml) from exc
        if not any(timepoints):
            raise self._fail("the XML lists no time point", xml)
        return desc

    def _bare(self, f: h5py.File) -> Description:
        """Setups and time points from the HDF5 groups alone: no names, voxel size or registration."""
        ids = _bdv_groups(f)
        if not ids:
            raise self._fail("an HDF5 file without s00/resolutions, so not a BigDataViewer .h5", self.h5)
        timepoints = sorted(int(m.group(1)) for name in f if (m := re.fullmatch(r"t(\d{5,})", name)))
        if not timepoints:
            raise self._fail("a BigDataViewer .h5 without any tNNNNN time point group", self.h5)
        self.notes.append("no BigDataViewer XML beside it: voxel size unknown; setups sharing one grid are served "
                          "as channels, and tiles or angles cannot be told apart from channels")
        return Description(self.h5, [], {i: Setup(i) for i in ids}, [range(tp, tp + 1) for tp in timepoints])

    def _held(self, f: h5py.File, desc: Description) -> list[int]:
        """The time point ids served: those listed up to the last one the .h5 holds (a `tNNNNN` group,
        or a view in MissingViews), so an XML claiming millions of time points beside a file holding
        one costs nothing; a listed one missing before that fails the chunks that touch it."""
        held = [int(m.group(1)) for name in f if (m := re.fullmatch(r"t(\d{5,})", name))]
        last = max([*held, *(tp for tp, _ in desc.missing)], default=None)
        if last is None:
            raise self._fail("holds no time point group (t00000, ...) of those its XML lists", self.h5)
        listed = sum(map(_size, desc.timepoints))
        kept = [range(r.start, min(r.stop, last + 1), r.step) for r in desc.timepoints]
        if sum(map(_size, kept)) > bounds.LIMITS.timepoints:
            raise self._fail(f"lists {sum(map(_size, kept)):,} time points up to {last}, more than the "
                             f"{bounds.LIMITS.timepoints:,} a source may have", self.xml)
        timepoints = sorted({tp for r in kept for tp in r})
        if sum(map(_size, kept)) < listed:
            self.notes.append(f"the XML lists {listed:,} time points and {self.h5.name} holds none after time point "
                              f"{last}: {len(timepoints)} served")
        if not timepoints:
            raise self._fail(f"holds time points up to {last}, and its XML lists none of them", self.h5)
        return timepoints

    def _levels(self, f: h5py.File, s: Setup) -> None:
        """A setup's levels: factors from `resolutions`, shapes from the first time point's `cells`.
        Raises ValueError saying why the setup cannot be served."""
        key = f"s{s.id:02d}"
        for name in (f"{key}/resolutions", f"{key}/subdivisions"):
            if isinstance(listed := f.get(name), h5py.Dataset):
                confine.check_hdf5_dataset(listed)
        try:
            res = np.asarray(f[f"{key}/resolutions"], float).reshape(-1, 3)
            sub = np.asarray(f[f"{key}/subdivisions"], int).reshape(-1, 3) if f"{key}/subdivisions" in f else None
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{key}/resolutions is missing or not rows of 3 numbers ({exc})") from exc
        if len(res) == 0 or np.any(res <= 0):
            raise ValueError(f"{key}/resolutions {res.tolist()} is empty or not positive")
        s.factors = [tuple(float(v) for v in (r / res[0])[::-1]) for r in res]
        if "dataType" in f[key].attrs:
            kind = f[key].attrs["dataType"]
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            try:
                s.dtype, s.legacy = np.dtype(kind.lower()), False
            except TypeError as exc:
                raise ValueError(f"{key} has dataType {kind!r}, not a number type") from exc
        for level in range(len(res)):
            data = next((d for tp in self.timepoints if (tp, s.id) not in self.missing
                         and isinstance(d := f.get(f"t{tp:05d}/{key}/{level}/cells"), h5py.Dataset)), None)
            if data is None:  # no view has it: the reads say so; the shape is what BDV's exporter writes
                base = s.size or (s.shapes[0] if s.shapes else (1, 1, 1))
                s.shapes.append(tuple(max(int(n // f), 1) for n, f in zip(base, s.factors[level])))
                continue
            confine.check_hdf5_dataset(data)
            if data.ndim != 3:
                raise ValueError(f"{data.name} has {data.ndim} dimensions, not 3 (z, y, x)")
            s.shapes.append(tuple(data.shape))
            if level == 0:
                check_stored(self.h5, data.name, data.size * data.dtype.itemsize, data.id.get_storage_size())
                if s.legacy and not _legacy(data.dtype):  # an old writer's other type: served as stored
                    s.dtype = data.dtype.newbyteorder("=")
                chunks = data.chunks or (tuple(sub[0][::-1]) if sub is not None else data.shape)
                s.block = tuple(min(c, n) for c, n in zip(chunks, data.shape))
        if s.dtype.kind not in "uif":
            raise ValueError(f"its voxel type {s.dtype} is not a number type")
        if s.size and s.shapes[0] != s.size:
            self.notes.append(f"setup {s.id}: the XML says size {s.size[::-1]} (x y z), its level 0 cells are "
                              f"{s.shapes[0][::-1]}; the cells' size is served")

    def _select(self, setups: dict[int, Setup], wanted: int | None) -> list[Setup]:
        """The group of setups that share one grid and hold `wanted` (default: the lowest setup id)."""
        groups: list[list[Setup]] = []
        for s in sorted(setups.values(), key=lambda s: s.id):
            home = next((g for g in groups if all(_fits(s, o) for o in g)), None)
            home.append(s) if home is not None else groups.append([s])
        told = [a for a in ("tile", "angle", "illumination") if len({self._shared(g, a) for g in groups}) > 1]
        described = "; ".join(f"setups {', '.join(str(s.id) for s in g)}" + self._where(g, told) for g in groups)
        if wanted is not None and wanted not in setups:
            raise self._fail(f"setup = {wanted} is not in this BigDataViewer dataset, whose setups are "
                             f"{', '.join(str(i) for i in sorted(setups))} (one dataset per group: {described})")
        chosen = next(g for g in groups if any(s.id == (min(setups) if wanted is None else wanted) for s in g))
        if len(groups) > 1:
            self.notes.append(f"{len(groups)} setup groups, each a grid of its own ({described}); serving setups "
                              f"{', '.join(str(s.id) for s in chosen)}: the catalog's setup = N picks the group "
                              "holding setup N")
        return sorted(chosen, key=lambda s: (s.attributes.get("channel", s.id), s.id))

    @staticmethod
    def _shared(group: list[Setup], attribute: str) -> int | None:
        """The id of `attribute` every setup of a group has, None if they differ or lack it."""
        ids = {s.attributes.get(attribute) for s in group}
        return ids.pop() if len(ids) == 1 else None

    def _where(self, group: list[Setup], told: list[str]) -> str:
        """' (tile 1, angle 0)': the attributes in `told` that the group's setups share, by name."""
        shared = [(a, i) for a in told if (i := self._shared(group, a)) is not None]
        names = [f"{a} {self.attribute_names.get(a, {}).get(i, i)}" for a, i in shared]
        return f" ({', '.join(names)})" if names else ""

    def _channels(self) -> tuple[Channel, ...]:
        """A channel per setup, named by what tells it apart in its group: its channel's name (or, where
        the XML names no channel, its ViewSetup name), then any other attribute that differs
        (`illumination 1`); a group of one setup is named by its channel, or its ViewSetup name."""
        group, names = self.group, self.attribute_names
        keys = [a for a in ATTRIBUTE_ORDER if any(a in s.attributes for s in group)]
        keys += sorted({a for s in group for a in s.attributes} - set(keys))
        varies = [a for a in keys if len({s.attributes.get(a) for s in group}) > 1]
        unique = len({s.name for s in group}) == len(group) and all(s.name for s in group)
        out = []
        for s, default in zip(group, default_channels(len(group))):
            parts = []
            for a in varies if len(group) > 1 else ["channel"]:
                if a not in s.attributes:
                    continue
                named = names.get(a, {}).get(s.attributes[a])
                if a != "channel":
                    parts.append(f"{a} {named or s.attributes[a]}")
                elif named or len(group) > 1:
                    parts.append(named or (s.name if unique else f"channel {s.attributes[a]}"))
            out.append(Channel(", ".join(parts) or s.name or f"setup {s.id}", default.color))
        return tuple(out)

    def _geometry(self) -> tuple[tuple[float, float, float], bool, tuple[float, float, float]]:
        """Voxel size (z, y, x um), whether it is known, and the centre of voxel 0 (z, y, x um)."""
        first = self.group[0]
        known = first.voxel is not None
        models = [(tp, first.registrations[tp]) for tp in self.timepoints if tp in first.registrations]
        if not models:
            return first.voxel or (1.0, 1.0, 1.0), known, (0.0, 0.0, 0.0)
        tp, model = models[0]
        if any(not _same(m, model) for _, m in models):
            self.notes.append(f"the registration changes between time points (drift correction?); every time "
                              f"point is placed where time point {tp} is")
        fit = _scale_translation(model)
        if fit is None:
            rows = "; ".join(" ".join(f"{v:g}" for v in row) for row in model[:3])
            self.notes.append(f"setup {first.id}'s registration rotates, shears or flips the view (affine {rows}), "
                              "which OME-Zarr and precomputed scale and translation cannot express: served as "
                              "stored, in its own voxel grid at the origin, without the registration")
            return first.voxel or (1.0, 1.0, 1.0), known, (0.0, 0.0, 0.0)
        scale, shift = fit
        if not known:  # world units of unknown length: keep the registration's proportions
            return tuple(scale[::-1]), False, tuple(shift[::-1])
        per_world = first.voxel[2] / scale[0]  # um per world unit, from x
        if not _same(np.array(first.voxel[::-1]) / scale, np.full(3, per_world)):
            self.notes.append(f"the registration scales x, y, z as {' : '.join(f'{v:g}' for v in scale)} but "
                              f"voxelSize is {' x '.join(f'{v:g}' for v in first.voxel[::-1])} um (x y z): the "
                              "voxel size served is voxelSize's, and the translation is converted with x's ratio")
        return first.voxel, True, tuple(float(v) for v in (shift * per_world)[::-1])

    def _describe(self) -> Volume:
        first = self.group[0]
        voxel, known, origin = self._geometry()
        absent = [(tp, s.id) for tp in self.timepoints for s in self.group
                  if self.xml and tp not in s.registrations and (tp, s.id) not in self.missing]
        if absent:
            listed = ", ".join(f"time point {tp} setup {i}" for tp, i in absent[:4]) + (" ..." if absent[4:] else "")
            self.notes.append(f"{len(absent)} view(s) have no ViewRegistration ({listed}): their chunks fail if their "
                              "cells are missing too")
        if self.timepoints != list(range(len(self.timepoints))):
            ids = ", ".join(str(tp) for tp in self.timepoints[:8]) + (" ..." if len(self.timepoints) > 8 else "")
            self.notes.append(f"time point ids {ids} are served as t = 0, 1, ...")
        return Volume(
            format="bdv",
            path=str(self.path),
            shape=(len(self.timepoints), len(self.group), *first.shapes[0]),
            dtype=np.dtype(first.dtype),
            voxel_size=tuple(float(v) for v in voxel),
            voxel_size_known=known,
            origin=origin,
            native_levels=tuple(NativeLevel(s, f) for s, f in zip(first.shapes, first.factors)),
            block_shape=first.block,
            version=version_token(self.files),
            files=self.files,
            channels=self._channels(),
            notes=tuple(self.notes),
        )

    # -- voxels ---------------------------------------------------------------------------------

    def _file(self) -> h5py.File:
        """One handle per worker thread; raw chunk bytes are read through it and decompressed outside
        h5py's lock (hdf5_chunks), each chunk once however many served chunks it feeds."""
        f = getattr(self._local, "file", None)
        if f is None:
            with confine.confined(self.root):
                f = self._local.file = confine.open_hdf5(self.h5, self.xml)
        return f

    def read(self, level: int, t: int, c: int, region: Region) -> np.ndarray:
        shape = self.volume.native_levels[level].shape
        check_region(shape, region)
        tp, s = self.timepoints[t], self.group[c]
        name = f"t{tp:05d}/s{s.id:02d}/{level}/cells"
        view = f"{name} (time point {tp}, setup {s.id}, level {level})"
        if (tp, s.id) in self.missing:
            raise self._fail(f"the view of time point {tp}, setup {s.id} is listed in MissingViews of "
                             f"{self.xml.name if self.xml else 'the XML'}: it holds no voxels", self.h5)
        with reading(self.h5, view):
            data = self._file().get(name)
            if not isinstance(data, h5py.Dataset):
                raise self._fail(f"{view} is missing: the file is partial, or a partition file is missing", self.h5)
            if data.shape != shape:
                raise self._fail(f"{view} is shaped {data.shape}, not {shape} as the other views of this level",
                                 self.h5)
            if name not in self._layouts:
                with confine.confined(self.root):
                    confine.check_hdf5_dataset(data)
                self._layouts[name] = chunk_layout(data, SMALL_CHUNK)
            layout = self._layouts[name]
            if layout is None:  # small chunks, contiguous, or a filter not decoded here: HDF5 reads the region
                return self._served(s, data[region])
            out = np.empty([r.stop - r.start for r in region], self.volume.dtype)
            for chunk, part in grid_cells(region, layout.chunks, shape):
                origin = tuple(r.start for r in chunk)
                fetch = functools.partial(decode_chunk, data.id, origin, layout)
                with reading(self.h5, f"the chunk at voxel {origin} of {view}"):
                    block = fetch() if part == chunk else self.segments.get_or_compute(
                        (str(self.h5), self.volume.version, name, origin), fetch)
                    out[within(part, region)] = self._served(s, block[within(part, chunk)])
            return out

    def _served(self, s: Setup, block: np.ndarray) -> np.ndarray:
        """Stored values as served: legacy int16 as uint16 bit for bit; otherwise the setup's type."""
        if s.legacy and block.dtype == LEGACY:
            return block.view(np.uint16)  # the same bits; a big-endian int16 wraps the same way in astype
        return block if block.dtype == self.volume.dtype else block.astype(self.volume.dtype)
