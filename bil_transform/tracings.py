"""A skeleton source: SWC tracings (catalog kind = "skeletons") placed in the frame of the image they
were traced on, as one snapshot of its files. Opening reads every file once, for its checks and the
few numbers the listings give; a skeleton's body is made from its file again when asked for (and
cached), so thousands of neurons cost their listings' memory, not their nodes'.

Frames. The image's Neuroglancer views put voxel i of level 0 on [i, i+1) x its voxel size, from 0
(Neuroglancer's convention: voxel corners at whole coordinates); its OME-Zarr views put voxel i's
centre at origin + i x voxel size. SWC coordinates are either
- `units = "micrometer"`: the OME-Zarr frame (where a tool reading the image's OME-Zarr, or the
  microscope's own stage coordinates, put them), or
- `units = "voxel"`: voxel indices of level 0, a voxel's centre at its whole index (Vaa3D's and
  numpy's convention); radii in voxels of x;
and the catalog's `offset` (z, y, x, in those units) is added first. Skeletons are served in the
Neuroglancer frame, so they lie on the image in any viewer of its precomputed views.
"""

from __future__ import annotations

import dataclasses
import glob
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from .catalog import CONSONANTS, VOWELS, DatasetSpec, pronounceable_id
from .readers import SourceError
from .readers.base import natural_key, version_token
from .readers.confine import confined
from .readers.swc import Tracing, read_swc
from .writers.skeletons import Measures, Neuron, measure

SUFFIX = ".swc"
# The largest coordinate, radius or cable length served, in micrometres: skeletons and their segment
# properties are float32 nanometres (the origin shift may add up to as much again)
LARGEST_UM = float(np.finfo(np.float32).max) / 1e3 / 4
PREFIX = "swc-"  # every neuron's identifier starts so, as the archive's own do


@dataclass(frozen=True)
class Frame:
    """Where the space image's level 0 lies: its voxel size and the centre of voxel 0 (z y x um),
    and its shape (z y x voxels)."""

    voxel_size: tuple[float, float, float]
    origin: tuple[float, float, float]
    shape: tuple[int, int, int]


@dataclass(frozen=True)
class Traced:
    """One SWC file of the source: its neuron's names and measures, or why it cannot be served."""

    name: str  # swc-xxx-xxx
    segid: int
    file: str  # relative to the source's root, as the listings show it
    path: str
    version: str  # of this file alone: a skeleton's cache key
    measures: Measures | None = None
    header: tuple[tuple[str, str], ...] = ()  # the file's "# KEY: value" lines, KEY lower-cased
    error: str | None = None


@dataclass(frozen=True)
class Tracings:
    """One opened state of a skeleton source (a Dataset snapshot holds it)."""

    neurons: tuple[Traced, ...]  # in the files' natural order
    files: tuple[str, ...]
    version: str  # version_token(files), taken before they were read
    frame: Frame
    spec: DatasetSpec

    @cached_property
    def _by_segid(self) -> dict[int, Traced]:
        return {t.segid: t for t in self.neurons}

    def by_segid(self, segid: int) -> Traced | None:
        return self._by_segid.get(segid)

    def neuron(self, traced: Traced) -> Neuron:
        """The neuron of one file, read again and placed in the Neuroglancer frame. Raises
        SourceError naming the file if it changed since the snapshot (a check reopens it)."""
        tracing = read_swc(traced.path)
        if version_token([traced.path]) != traced.version:
            raise SourceError(f"{traced.path}: changed while it was read; retry")
        return place(tracing, traced, self.spec, self.frame)


def frame_of(volume) -> Frame:
    return Frame(tuple(volume.voxel_size), tuple(volume.origin), tuple(volume.shape[2:]))


def physical(tracing: Tracing, spec: DatasetSpec, frame: Frame) -> tuple[np.ndarray, np.ndarray]:
    """The nodes (n, 3) z y x and radii in micrometres of the image's OME-Zarr frame."""
    zyx = tracing.xyz[:, ::-1] + np.asarray(spec.offset)
    if spec.units == "voxel":
        return np.asarray(frame.origin) + zyx * np.asarray(frame.voxel_size), tracing.radii * frame.voxel_size[2]
    return zyx, tracing.radii


def place(tracing: Tracing, traced: Traced, spec: DatasetSpec, frame: Frame, served: bool = True) -> Neuron:
    """The tracing as a Neuron in micrometres: of the Neuroglancer frame the skeletons are served in,
    or (`served=False`) of the OME-Zarr frame, where the listings give the soma."""
    zyx, radius = physical(tracing, spec, frame)
    if served:
        zyx = zyx - np.asarray(frame.origin) + np.asarray(frame.voxel_size) / 2
    return Neuron(traced.segid, traced.name, traced.file, zyx[:, ::-1], tracing.edges, radius, tracing.types)


def _check_finite(tracing: Tracing, neuron: Neuron) -> None:
    """Refuse a node that, once placed, is no number a skeleton or a JSON listing can carry: the
    skeletons hold float32 nanometres, and an Infinity in the segment properties is invalid JSON,
    which fails a viewer's whole segment list. Says the file and the line."""
    placed = np.column_stack([neuron.vertices, neuron.radius])
    bad = ~(np.abs(placed) < LARGEST_UM).all(axis=1)  # NaN compares False too
    if bad.any():
        k = int(np.argmax(bad))
        raise SourceError(f"{tracing.path}, line {tracing.lines[k]}: node {tracing.ids[k]} is placed at "
                          f"{', '.join(f'{v:g}' for v in placed[k, :3])} um (x, y, z) with radius {placed[k, 3]:g}, "
                          "beyond the float32 nanometres a skeleton holds; its coordinates or the catalog's units are "
                          "wrong")


def swc_files(spec: DatasetSpec) -> list[Path]:
    """The source's SWC files: its one file, the .swc files of its directory, or its glob's matches."""
    path = Path(spec.path)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p in path.iterdir() if p.suffix.lower() == SUFFIX and p.is_file()]
    elif glob.has_magic(spec.path):
        found = [Path(p) for p in glob.glob(spec.path) if Path(p).is_file()]
    else:
        raise SourceError(f"{spec.path}: no such file or directory")
    if not found:
        raise SourceError(f"{spec.path}: holds no SWC file ({SUFFIX})" if path.is_dir()
                          else f"{spec.path}: no file matches the glob")
    return sorted(found, key=lambda p: natural_key(str(p)))


def names(spec: DatasetSpec, files: list[str]) -> list[tuple[str, int]]:
    """(identifier, segment id) of each file, stable across starts and machines: the identifier is
    derived from the source's id and the file's relative name (a clash tries again), the segment id
    is the number its letters spell, so each names the other."""
    taken: set[str] = set()
    out = []
    for file in files:
        text, attempt = f"{spec.id}/{file}", 0
        name = PREFIX + pronounceable_id(text, triplets=2)
        while name in taken:
            attempt += 1
            name = PREFIX + pronounceable_id(f"{text}#{attempt}", triplets=2)
        taken.add(name)
        out.append((name, segid_of(name)))
    return out


def segid_of(name: str) -> int:
    """The segment id an identifier spells: its triplets as digits of a mixed radix, plus 1 (0 is
    no segment in Neuroglancer)."""
    n = 0
    for triplet in reversed(name.removeprefix(PREFIX).split("-")):
        a, v, b = triplet
        n = ((n * len(CONSONANTS) + CONSONANTS.index(b)) * len(VOWELS) + VOWELS.index(v)) * len(CONSONANTS) \
            + CONSONANTS.index(a)
    return n + 1


def open_tracings(spec: DatasetSpec, frame: Frame, before: Tracings | None = None) -> Tracings:
    """Read every file of the source once (a reopen reads again only the files that changed since
    `before`). A malformed file is kept with its one-sentence error and the others are served; no
    file at all is an error of the whole source (SourceError)."""
    files = swc_files(spec)
    version = version_token(files)
    root = spec.root
    relative = [str(p.relative_to(root)) if p.is_relative_to(root) else p.name for p in files]
    kept = {t.path: t for t in before.neurons} if before is not None and before.frame == frame else {}
    neurons = []
    for path, file, (name, segid) in zip(files, relative, names(spec, relative)):
        try:
            stamp = version_token([path])
        except OSError as exc:
            stamp, failure = "", exc  # gone since the listing: unavailable until the next reopen
        else:
            failure = None
        old = kept.get(str(path))
        if old is not None and stamp and old.version == stamp:
            neurons.append(dataclasses.replace(old, name=name, segid=segid, file=file))
            continue
        traced = Traced(name, segid, file, str(path), stamp)
        try:
            if failure is not None:
                raise failure
            with confined(spec.confinement):  # a file linked out of the root is refused, never parsed
                tracing = read_swc(path)
            placed = place(tracing, traced, spec, frame, served=False)
            _check_finite(tracing, placed)
            measures = measure(placed)
            if not abs(measures.cable_length) < LARGEST_UM:
                raise SourceError(f"{path}: its cable length, {measures.cable_length:g} um, is beyond the float32 "
                                  "nanometres a skeleton holds; its coordinates or the catalog's units are wrong")
        except (SourceError, OSError, ValueError) as exc:
            neurons.append(dataclasses.replace(traced, error=str(exc)))
            continue
        header = tuple((k.lower(), v) for k, v in tracing.header.items())
        neurons.append(dataclasses.replace(traced, measures=measures, header=header))
    return Tracings(tuple(neurons), tuple(map(str, files)), version, frame, spec)
