"""`bil-transform export`: a dataset's pyramid written as files, computed on a dask.distributed cluster.

    bil-transform export ID|PATH --to OUT [--config CATALOG.toml] [--format VIEW] [--levels LEVELS]
                         [--scheduler ADDRESS | --workers N] [--task-size SIZE] [--cache-size SIZE]

Every file is made by the server's own code: the view `make_view` builds for VIEW answers each key
(`listing.files` names them all) with the body the server would stream, so an export is the served
view byte for byte, file for file (metadata documents, chunks, shards). OUT is a local path or any
fsspec URL; it must be new or empty, and never inside the dataset's own directory.

VIEW defaults to `zarr` (OME-Zarr NGFF 0.4 on zarr v2): the server's first link, and the copy the
most readers open today (napari-ome-zarr, ome-zarr-py, Fiji/MoBIE, zarr-python 2 and 3,
tensorstore, Neuroglancer). `zarr3-sharded` or `precomputed-sharded` write far fewer files.

The work, spatially local and read once:
- Tasks are cells of space, one time point and channel (a precomputed view: all its channels) per
  task. A first-stage cell covers whole source slabs (the source rows, tiles or chunks the server
  reads together), whole blocks of its hand-off level and whole files of the levels below it, at
  most --task-size of source voxels where that allows; it writes its files in post-order (a coarse
  chunk right after the finer chunks under it, while they are in its cache) and hands its parent the
  blocks of its hand-off level. A parent cell, seeded with those blocks (at most --task-size of them),
  writes the coarser files (and the shards of the hand-off level that straddle its children) and
  hands on, up to one task for the whole volume. No source voxel is read twice. Levels the source
  stores below its coarsest stored one depend on nothing else: their cells are tasks of their own.
- Each worker process opens the dataset once per export (send specs, never open readers), with
  its own Cache (--cache-size) and Workers; the parent blocks of a cell are reused from that cache.
- Metadata documents are written last, once every chunk is, so an interrupted export is never
  mistaken for a complete one.

--levels picks resolution levels as START:STOP (STOP excluded, as the region endpoint takes
them; either side may be left out, negative counts from the coarsest), a single level, or a
comma-separated list of these: `1:` drops level 0, `-1` keeps the coarsest only. The export is
then a complete multiscale of those levels alone: each keeps its own path and files (byte for byte
the server's), and the root documents (.zattrs, .zmetadata, zarr.json, info) list only them, so no
reader ever looks for a level that was not written (and reads its missing chunks as zeros). These
root documents differ from the server's, which lists every level. Label datasets under labels/ are
always exported with all their levels.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import logging
import math
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import Cache
from .catalog import DatasetSpec, holding, load_catalog, specs_from_paths
from .dataset import Dataset
from .pyramid import Pyramid
from .workers import Workers
from .writers import make_view, parse_view
from .writers.listing import File, files
from .writers.resource import to_json

# distributed and fsspec are imported where an export needs them: `serve` imports this module too.

DEFAULT_VIEW = "zarr"
DEFAULT_CACHE = 2**30  # per worker process, at most a third of its memory limit: a cell's slabs and blocks
MIN_TASK, MAX_TASK = 16 * 2**20, 256 * 2**20  # source bytes a task covers, by default (and a quarter of the cache)
TASKS_PER_WORKER = 4  # by default cells are made small enough for this many per worker process (balance)
ROOT_DOCUMENTS = (".zattrs", ".zmetadata", "zarr.json", "info")  # the documents that list the levels


class ExportError(Exception):
    """Bad input; the message says what to fix in one sentence (exit code 2)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Write a dataset's pyramid as files (OME-Zarr or Neuroglancer precomputed), byte for byte what "
                     "the server serves, computed on a dask.distributed cluster.")
    p.add_argument("source", metavar="ID|PATH", help="a dataset id of --config, or a path as `serve PATH` takes it")
    p.add_argument("--to", required=True, metavar="OUT", dest="out",
                   help="where to write: a new or empty directory, or an fsspec URL (s3://bucket/name, file:///...)")
    p.add_argument("--config", metavar="CATALOG.toml", help="the catalog that defines ID")
    p.add_argument("--format", default=DEFAULT_VIEW, metavar="VIEW", dest="view",
                   help="a view name as the server serves it: zarr, zarr3, zarr3-sharded, precomputed, "
                        "precomputed-sharded, or one of them with -COMPRESSOR / -ENCODING (default zarr)")
    p.add_argument("--levels", metavar="LEVELS",
                   help="levels to write: START:STOP (STOP excluded), N, or a comma-separated list of these, "
                        "e.g. 1: or 0,2 (default all); the metadata then lists those levels only")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a running dask.distributed scheduler (tcp://host:8786) to compute on; its workers must "
                        "reach the dataset's files and OUT (default: a local cluster)")
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"worker processes of the local cluster (default one per core: {os.cpu_count()})")
    p.add_argument("--task-size", type=size_arg, metavar="SIZE",
                   help="source voxels one task covers at most (default: enough tasks for every worker, "
                        "16MiB to 256MiB)")
    p.add_argument("--cache-size", type=size_arg, metavar="SIZE",
                   help="memory each worker process keeps decoded data in (default 1GiB or a third of a worker's "
                        "memory limit, and at least 4x --task-size)")


def size_arg(text: str) -> int:
    from .cli import parse_size  # cli imports this module: import it when it is complete

    return parse_size(text)


# ----------------------------------------------------------------------------------------------
# Input


@dataclass(frozen=True)
class Job:
    """What every task is handed: specs (picklable), never open readers."""

    run: str  # unique per export: worker processes keep what they opened under it
    specs: tuple[DatasetSpec, ...]  # the dataset first, then its label datasets
    view: str
    out: str  # OUT as a URL every worker reaches (file:///abs/path for a local one)
    versions: tuple[tuple, ...]  # each spec's pyramid key as planned: nothing it derives from may change
    cache_size: int
    kept: tuple[int, ...] | None  # --levels of the dataset (None: all)
    # Resumable runs (prepare): where each finished task leaves a marker holding the blocks it hands
    # on, and the tasks whose markers a run started with (they hand on those blocks, and run nothing)
    markers: str | None = None
    finished: frozenset[str] = frozenset()


def parse_levels(text: str, count: int) -> tuple[int, ...]:
    """The levels `text` names among `count`, in order, each once. ExportError, with a sentence."""
    have = f"the dataset has levels 0 to {count - 1}" if count > 1 else "the dataset has level 0 only"
    chosen: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        try:
            if ":" in part:
                start, stop = (int(v) if v.strip() else None for v in part.split(":"))
                picked = range(count)[slice(start, stop)]
            else:
                level = int(part)
                if not -count <= level < count:
                    raise ExportError(f"--levels {text}: there is no level {level}; {have}")
                picked = [level % count]
        except ValueError:
            raise ExportError(f"--levels {text}: write levels as START:STOP (STOP excluded), N, or a list of "
                              "these separated by commas, like 1: or 0,2") from None
        chosen.update(picked)
    if not chosen:
        raise ExportError(f"--levels {text} names no level; {have}")
    return tuple(sorted(chosen))


def _specs(args: argparse.Namespace) -> tuple[DatasetSpec, ...]:
    """The dataset to export (and its label datasets), as `serve` would open it."""
    if args.config:
        catalog = {s.id: s for s in load_catalog(args.config)}
        spec = catalog.get(args.source)
        if spec is None:
            ids = ", ".join(sorted(catalog)[:10]) + (", ..." if len(catalog) > 10 else "")
            raise ExportError(f"{args.config} has no dataset with id {args.source!r}; its ids are {ids}")
        if spec.kind == "skeletons":
            raise ExportError(f"dataset {spec.id!r} is a skeleton source: its SWC files are its originals (see its "
                              "manifest), and export writes image pyramids")
        return (spec, *(catalog[name] for name in spec.labels))
    if "*" not in args.source and not Path(args.source).expanduser().exists():
        raise ExportError(f"{args.source} is no file or directory (to export a catalog's dataset by id, "
                          "give --config CATALOG.toml)")
    return tuple(specs_from_paths([args.source]))


def _output(out: str, specs: Iterable[DatasetSpec]):
    """(filesystem, path, URL) of OUT, refused if it is inside a dataset's directory or not empty."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(out)
    except (ValueError, ImportError) as exc:
        raise ExportError(f"--to {out}: not a path or a URL fsspec can write to ({exc})") from None
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        local = Path(path).resolve()
        if (spec := holding(local, specs)) is not None:
            raise ExportError(f"--to {out} is inside the directory of dataset {spec.id!r} ({spec.root}); nothing "
                              "is ever written next to the data: choose a directory elsewhere")
        path = str(local)
    try:
        if fs.isfile(path):
            raise ExportError(f"--to {out} is a file; give a new or empty directory")
        if fs.isdir(path) and fs.ls(path, detail=False):
            raise ExportError(f"--to {out} is not empty; give a new or empty directory (an export never mixes "
                              "with other files)")
    except (OSError, PermissionError) as exc:
        raise ExportError(f"--to {out} cannot be reached ({type(exc).__name__}: {exc})") from None
    return fs, path, fs.unstrip_protocol(path)


# ----------------------------------------------------------------------------------------------
# The plan: cells of space, in stages, each handing blocks to the stage above


@dataclass(frozen=True)
class Node:
    """One task: the files it writes, in order, and the blocks it hands its parent."""

    name: str  # the dask key
    keys: tuple[str, ...]
    children: tuple[str, ...] = ()
    handoff: tuple | None = None  # (label, level, (z, y, x) block ranges, ((t, c), ...)) for the parent


@dataclass
class _Frame:
    """Levels planned together, in the voxels of `base`: a level the source stores and the
    computed levels above it (whose blocks nest exactly), or a stored level alone."""

    pyramid: Pyramid
    base: int
    top: int
    bpv: int  # bytes per base voxel of one task's channels
    files: list[File] = field(default_factory=list)

    def __post_init__(self) -> None:
        levels = self.pyramid.levels
        self.shape = levels[self.base].shape
        step = [1, 1, 1]
        self.blk: dict[int, tuple[int, ...]] = {}  # base voxels one block of each level spans
        self.scale: dict[int, tuple[int, ...]] = {}  # base voxels per voxel of each level
        for level in range(self.base, self.top + 1):
            if level > self.base:
                step = [s * n for s, n in zip(step, levels[level].step)]
            self.scale[level] = tuple(step)
            self.blk[level] = tuple(c * s for c, s in zip(levels[level].chunks, step))

    def box(self, f: File) -> tuple[tuple[int, ...], tuple[int, ...]]:
        blk = self.blk[f.level]
        return (tuple(r.start * b for r, b in zip(f.blocks, blk)),
                tuple(min(r.stop * b, n) for r, b, n in zip(f.blocks, blk, self.shape)))

    def extent(self, level: int, within: tuple[int, ...]) -> tuple[int, ...]:
        """The smallest cell (base voxels, z, y, x) made of `within` cells that holds whole source slabs,
        whole blocks of `level` and whole files of the levels below it (a file of `level` itself that
        straddles cells is written by the parent, from the blocks they hand it; at the top, whole files
        of `level` too); a whole axis where that is the axis or more."""
        if not hasattr(self, "units"):  # base voxels the files of each level span, at most
            self.units: dict[int, list[int]] = {}
            for f in self.files:
                span = [len(r) * b for r, b in zip(f.blocks, self.blk[f.level])]
                self.units[f.level] = [max(a, b) for a, b in zip(self.units.get(f.level, span), span)]
        needs = [tuple(len(r) * c for r, c in zip(self.pyramid.slab(self.base, (0, 0, 0)),
                                                   self.pyramid.levels[self.base].chunks)), self.blk[level]]
        needs += [unit for at, unit in self.units.items() if at < level or at == level == self.top]
        out = list(within)
        for need in needs:
            out = [n if e >= n or u >= n or math.lcm(e, u) >= n else math.lcm(e, u)
                   for e, u, n in zip(out, need, self.shape)]
        return tuple(out)

    def stages(self, budget: int) -> list[tuple[int, tuple[int, ...]]]:
        """(hand-off level, cell extent) of each stage: as coarse a level as keeps a task's source
        voxels (first stage) or seed blocks (the others) within `budget`, until one cell is all."""
        stages: list[tuple[int, tuple[int, ...]]] = []
        level, extent = None, (1, 1, 1)
        while True:
            lowest = min(self.base + 1, self.top) if level is None else level + 1
            per = math.prod(self.scale[level]) if level is not None else 1  # base voxels per seed voxel

            def cost(h: int, extent=extent, per=per) -> float:
                return math.prod(self.extent(h, extent)) * self.bpv / per

            fits = [h for h in range(lowest, self.top + 1) if cost(h) <= budget]
            level = max(fits, default=lowest)
            extent = self.extent(level, extent)
            if stages and self.grid(extent) == self.grid(stages[-1][1]):
                stages[-1] = (level, extent)  # the same cells: a parent of one child is the child going on
            else:
                stages.append((level, extent))
            if level == self.top or extent == self.shape:
                return stages

    def grid(self, extent: tuple[int, ...]) -> list[int]:
        return [-(-n // e) for n, e in zip(self.shape, extent)]


def _morton(cell: tuple[int, ...], bits: int) -> int:
    code = 0
    for bit in range(bits):
        for axis, value in enumerate(cell):
            code |= ((value >> bit) & 1) << (3 * bit + axis)
    return code


def plan(pyramids: dict[str | None, Pyramid], chosen: list[File], budget: int,
         run: str) -> tuple[list[Node], list[str]]:
    """The tasks writing the chunk and shard files, children before parents, and the files left for
    the last task (metadata documents, shards holding no chunk, and any file no cell holds)."""
    last: list[str] = []
    frames: dict[tuple, _Frame] = {}
    for f in chosen:
        if f.blocks is None:
            last.append(f.key)
            continue
        pyramid = pyramids[f.label]
        stored = max(i for i, lvl in enumerate(pyramid.levels) if lvl.native is not None)
        base, top = (f.level, f.level) if f.level < stored else (stored, len(pyramid.levels) - 1)
        group = (f.label, f.t, f.channels, base)
        if group not in frames:
            frames[group] = _Frame(pyramid, base, top, pyramid.volume.dtype.itemsize * len(f.channels))
        frames[group].files.append(f)

    nodes: list[Node] = []
    for (label, t, channels, _), frame in frames.items():
        stages = frame.stages(budget)
        cells: list[dict[tuple, list]] = [{} for _ in stages]  # per stage: cell -> [(order, key)]
        bits = max(frame.grid(frame.blk[frame.base])).bit_length()
        for f in frame.files:
            lo, hi = frame.box(f)
            for j, (_, extent) in enumerate(stages):
                first, end = (tuple(v // e for v, e in zip(p, extent)) for p in (lo, tuple(h - 1 for h in hi)))
                if first == end:  # post-order: by the last base block a file covers, then finer levels first
                    corner = tuple((h - 1) // c for h, c in zip(hi, frame.blk[frame.base]))
                    cells[j].setdefault(first, []).append(((_morton(corner, bits), f.level), f.key))
                    break
            else:
                last.append(f.key)  # no cell holds it whole: the last task computes it
        kids: dict[tuple, list[str]] = {}
        running: set[tuple] = set()
        for j in reversed(range(len(stages))):  # a cell runs if it writes files, or if its parent runs
            for cell in _cells(frame.grid(stages[j][1])):
                if cell in cells[j] or (j + 1 < len(stages) and (j + 1, _parent(cell, stages[j][1], stages[j + 1][1]))
                                        in running):
                    running.add((j, cell))
        for j, (level, extent) in enumerate(stages):
            for cell in _cells(frame.grid(extent)):
                if (j, cell) not in running:
                    continue
                name, handoff = f"bil-export-{run}-{len(nodes)}", None
                if j + 1 < len(stages):
                    blk, shape = frame.blk[level], frame.shape
                    ranges = tuple(range(c * e // b, -(-min((c + 1) * e, n) // b))
                                   for c, e, b, n in zip(cell, extent, blk, shape))
                    handoff = (label, level, ranges, tuple((t, c) for c in channels))
                    kids.setdefault((j + 1, _parent(cell, extent, stages[j + 1][1])), []).append(name)
                keys = tuple(key for _, key in sorted(cells[j].get(cell, [])))
                nodes.append(Node(name, keys, tuple(kids.pop((j, cell), ())), handoff))
    return nodes, last


def _cells(grid: Iterable[int]) -> Iterator[tuple[int, ...]]:
    return (tuple(int(i) for i in cell) for cell in np.ndindex(*grid))


def _parent(cell: tuple[int, ...], extent: tuple[int, ...], above: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(c * e // a for c, e, a in zip(cell, extent, above))


# ----------------------------------------------------------------------------------------------
# On the workers


class _Opened:
    """What one worker process opened for one export: the datasets, the view, OUT, and counters."""

    def __init__(self, job: Job):
        import fsspec

        from .cli import no_huge_pages_for_numpy

        no_huge_pages_for_numpy()
        try:
            from distributed import get_worker

            threads = get_worker().state.nthreads
        except (ImportError, ValueError, AttributeError):
            threads = 1
        self.cache, self.workers = Cache(job.cache_size), Workers(threads)
        chunks = Cache(max(job.cache_size // 4, 64 * 2**20)).section("chunks")  # encoded bodies, apart from blocks
        opened = {}
        for spec, version in zip(job.specs, job.versions):
            ds = Dataset(spec, self.cache, recheck=math.inf, workers=self.workers)
            if ds.pyramid is None:
                raise RuntimeError(f"dataset {spec.id!r} cannot be opened on this worker: {ds.error}")
            if ds.pyramid.key != version:  # the key holds all the bytes derive from
                raise RuntimeError(f"dataset {spec.id!r} is not what it was when the export started (its files, "
                                   "its catalog entry or bil-transform's code changed); run the export again")
            opened[spec.id] = ds.pyramid
        image, *labels = job.specs
        self.pyramids = {None: opened[image.id], **{s.id: opened[s.id] for s in labels}}
        self.view = make_view(opened[image.id], job.view, chunks, compression=image.compression,
                              encoding=image.encoding, labels={s.id: opened[s.id] for s in labels})
        self.job = job
        self.fs, self.root = fsspec.core.url_to_fs(job.out)
        self.made: set[str] = set()
        self.lock = threading.Lock()
        self.files = self.bytes = 0

    def write(self, key: str, data: bytes | None = None) -> None:
        """Write the body the view has for `key` (or `data`) to OUT/key, piece by piece."""
        path = f"{self.root}/{key}"
        parent = path.rsplit("/", 1)[0]
        if parent not in self.made:
            self.fs.makedirs(parent, exist_ok=True)
            self.made.add(parent)
        written = 0
        with self.fs.open(path, "wb") as out:
            if data is not None:
                written = out.write(data) or len(data)
            else:
                body = self.view.resource(key)
                for piece in body.read(0, body.size()):
                    out.write(piece)
                    written += len(piece)
        with self.lock:
            self.files += 1
            self.bytes += written

    def mark(self, node: Node, handoff: list) -> None:
        """Leave the marker saying `node` is done, holding what it hands on; written aside and
        renamed, so a marker that exists is whole."""
        buffer = io.BytesIO()
        meta = [[label, level, t, c, list(index)] for label, level, t, c, index, _ in handoff]
        np.savez(buffer, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                 **{f"b{i}": part[-1] for i, part in enumerate(handoff)})
        path = f"{self.job.markers}/{marker(node.name)}"
        self.fs.pipe_file(f"{path}.part", buffer.getvalue())
        self.fs.mv(f"{path}.part", path)

    def marked(self, node: Node) -> list:
        """What a node finished by an earlier run handed on, from its marker."""
        with self.fs.open(f"{self.job.markers}/{marker(node.name)}", "rb") as f, np.load(f) as saved:
            meta = json.loads(saved["meta"].tobytes())
            return [(label, level, t, c, tuple(index), saved[f"b{i}"])
                    for i, (label, level, t, c, index) in enumerate(meta)]

    def source_bytes(self) -> int:
        return self.workers.meter.snapshot()["source_bytes"]


def marker(name: str) -> str:
    """The file name of a node's marker: its place in the plan (the dask key's last part)."""
    return f"{name.rsplit('-', 1)[-1]}.npz"


_OPENED: dict[str, _Opened] = {}
_LOCK = threading.Lock()


def _opened(job: Job) -> _Opened:
    with _LOCK:
        if job.run not in _OPENED:
            _OPENED[job.run] = _Opened(job)
        return _OPENED[job.run]


def write_node(job: Job, node: Node, *handed: list) -> list:
    """Seed the blocks the children handed over, write the node's files, hand on its own blocks."""
    opened = _opened(job)
    if node.name in job.finished:
        return opened.marked(node)
    for part in handed:
        for label, level, t, c, index, block in part:
            opened.pyramids[label].seed(level, t, c, index, block)
    for key in node.keys:
        opened.write(key)
    out = []
    if node.handoff is not None:
        label, level, ranges, tcs = node.handoff
        pyramid = opened.pyramids[label]
        out = [(label, level, t, c, index, pyramid.block(level, t, c, index))
               for t, c in tcs for index in itertools.product(*ranges)]
    if job.markers is not None:
        opened.mark(node, out)
    return out


def write_last(job: Job, keys: list[str]) -> None:
    """The files written once every chunk is: metadata documents (listing only the kept levels),
    shards that hold no chunk, and files no cell held."""
    opened = _opened(job)
    for key in keys:
        if job.kept is not None and key in ROOT_DOCUMENTS:
            body = opened.view.resource(key)
            data = b"".join(body.read(0, body.size()))
            opened.write(key, only_levels(key, data, job.kept))
        else:
            opened.write(key)


def only_levels(key: str, data: bytes, kept: tuple[int, ...]) -> bytes:
    """A root document of a view that lists the `kept` levels only (in the server's JSON layout)."""
    doc, paths = json.loads(data), {str(level) for level in kept}

    def multiscales(listing: list) -> None:
        for ms in listing:
            ms["datasets"] = [d for d in ms["datasets"] if d["path"] in paths]

    if key == "info":
        doc["scales"] = [s for s in doc["scales"] if s["key"] in paths]
    elif key == ".zattrs":
        multiscales(doc["multiscales"])
    elif key == ".zmetadata":
        meta = doc["metadata"]
        for name in list(meta):
            level = name.split("/", 1)[0]
            if level.isdigit() and level not in paths:
                del meta[name]
        multiscales(meta[".zattrs"]["multiscales"])
    elif key == "zarr.json":
        multiscales(doc["attributes"]["ome"]["multiscales"])
        members = doc["consolidated_metadata"]["metadata"]
        for name in list(members):
            level = name.split("/", 1)[0]
            if level.isdigit() and level not in paths:
                del members[name]
    return to_json(doc)


def finish(run: str) -> dict[str, int]:
    """What this worker process wrote and read for export `run`; forgets it (closing its datasets)."""
    with _LOCK:
        opened = _OPENED.pop(run, None)
    if opened is None:
        return {"files": 0, "bytes": 0, "source_bytes": 0}
    opened.workers.shutdown()
    return {"files": opened.files, "bytes": opened.bytes, "source_bytes": opened.source_bytes()}


# ----------------------------------------------------------------------------------------------
# Driving it


class Progress:
    """Tasks done out of all, and files written, on stderr: redrawn in place on a terminal, a line
    per tenth otherwise (a log keeps every line)."""

    def __init__(self, tasks: int, files: int, stream=None, name: str = "export"):
        self.tasks, self.files, self.stream, self.name = tasks, files, stream or sys.stderr, name
        self.done = self.written = 0
        self.start = time.monotonic()
        self.tty = self.stream.isatty()
        self.shown = -1

    def update(self, files: int) -> None:
        self.done += 1
        self.written += files
        tenth = 10 * self.done // max(1, self.tasks)
        if self.tty or tenth != self.shown:
            self.shown = tenth
            bar = "#" * (20 * self.done // max(1, self.tasks))
            line = (f"{self.name} [{bar:<20}] {self.done}/{self.tasks} tasks, {self.written}/{self.files} files, "
                    f"{time.monotonic() - self.start:.1f} s")
            self.stream.write(f"\r{line}" if self.tty else f"{line}\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


@contextmanager
def cluster_client(args: argparse.Namespace):
    """A client of the cluster named by --scheduler, or of a local cluster of --workers processes."""
    from distributed import Client, LocalCluster

    # Its log lines (INFO at start, a heartbeat racing the close at the end) would bury the progress bar;
    # what fails reaches us through the futures.
    logging.getLogger("distributed").setLevel(logging.CRITICAL)
    if args.scheduler:
        try:
            client = Client(args.scheduler, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise ExportError(f"--scheduler {args.scheduler}: cannot reach it ({exc})") from None
        with client:
            yield client
        return
    with LocalCluster(n_workers=args.workers or os.cpu_count() or 1, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL) as cluster, \
            Client(cluster) as client:
        yield client


def sizes(args: argparse.Namespace, client, total: int) -> tuple[int, int]:
    """(task size, cache size per worker process): given, or enough tasks for every worker thread
    within a quarter of a cache that takes at most a third of a worker's memory limit."""
    threads = sum(client.nthreads().values()) or 1
    limits = [w.get("memory_limit") or 0 for w in client.scheduler_info()["workers"].values()]
    cache = args.cache_size or int(min(DEFAULT_CACHE, min(limits, default=0) / 3 or DEFAULT_CACHE))
    if args.task_size:
        return args.task_size, args.cache_size or max(cache, 4 * args.task_size)
    task = min(MAX_TASK, max(MIN_TASK, total / (TASKS_PER_WORKER * threads)), max(1, cache // 4))
    return int(task), cache


def megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except ExportError as exc:
        print(f"bil-transform export: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    try:
        parse_view(args.view)
    except KeyError as exc:
        raise ExportError(f"--format: {exc.args[0]}") from None
    if args.scheduler and args.workers:
        raise ExportError("--workers sets the local cluster's size; a --scheduler's cluster has its own workers")
    if args.workers is not None and args.workers < 1:
        raise ExportError(f"--workers {args.workers}: give at least 1")
    specs = _specs(args)
    url = _output(args.out, specs)[2]

    cache = Cache(64 * 2**20)  # planning reads nothing but headers
    opened = {}
    for spec in specs:
        ds = Dataset(spec, cache, recheck=math.inf)
        if ds.pyramid is None:
            print(f"bil-transform export: dataset {spec.id!r} cannot be opened: {ds.error}", file=sys.stderr)
            return 1
        opened[spec.id] = ds.pyramid
    image, *labels = specs
    pyramid = opened[image.id]
    try:
        view = make_view(pyramid, args.view, cache.section("chunks"), compression=image.compression,
                         encoding=image.encoding, labels={s.id: opened[s.id] for s in labels})
    except (KeyError, ValueError) as exc:
        raise ExportError(f"--format {args.view}: {exc.args[0] if isinstance(exc, KeyError) else exc}") from None
    kept = parse_levels(args.levels, len(pyramid.levels)) if args.levels else None
    chosen = [f for f in files(view) if kept is None or f.label is not None or f.level is None or f.level in kept]
    for embargoed in (s for s in specs if s.embargo):  # the image, or a label exported with it
        print(f"bil-transform export: WARNING: dataset {embargoed.id!r} is embargoed; the export holds its voxels",
              file=sys.stderr)

    run_id = uuid.uuid4().hex[:12]
    start = time.monotonic()
    with cluster_client(args) as client:
        processes = len(client.nthreads())
        vol = pyramid.volume
        budget, cache_size = sizes(args, client, math.prod(vol.shape) * vol.dtype.itemsize)
        job = Job(run_id, specs, args.view, url, tuple(opened[s.id].key for s in specs), cache_size, kept)
        nodes, last = plan({None: pyramid, **{s.id: opened[s.id] for s in labels}}, chosen, budget, run_id)
        progress = Progress(len(nodes) + 1, len(chosen))
        try:
            failed = compute(client, job, nodes, last, progress)
        finally:
            progress.close()
            stats = client.run(finish, run_id)  # and forget: a long-lived cluster keeps nothing of this export
    seconds = time.monotonic() - start
    if failed:
        print(f"bil-transform export: failed: {failed}; {args.out} is incomplete (its metadata was not written)",
              file=sys.stderr)
        return 1
    wrote = sum(s["files"] for s in stats.values())
    size = sum(s["bytes"] for s in stats.values())
    read = sum(s["source_bytes"] for s in stats.values())
    shown = f"levels {', '.join(map(str, kept))} of " if kept else ""
    print(f"bil-transform export: wrote {wrote} files ({megabytes(size)}) of {shown}the {args.view} view of "
          f"{image.id!r} to {args.out} in {seconds:.1f} s on {processes} worker process(es); read "
          f"{megabytes(read)} of source voxels ({read} bytes)", file=sys.stderr)
    return 0


def compute(client, job: Job, nodes: list[Node], last: list[str], progress: Progress) -> str | None:
    """Submit the tasks (children first), then the last one once all are written; the first
    failure, in one line, or None."""
    from distributed import as_completed

    futures = {}
    for node in nodes:
        futures[node.name] = client.submit(write_node, job, node, *(futures[k] for k in node.children),
                                           key=node.name, pure=False)
    counts = {node.name: len(node.keys) for node in nodes}
    pending = as_completed(list(futures.values()), loop=client.loop)
    futures.clear()  # as_completed holds them until they are done: each result is dropped once its parent has it
    for future in pending:
        if future.status == "error":
            exc = future.exception()
            client.cancel(list(pending.futures))
            return f"{type(exc).__name__}: {exc}"
        progress.update(counts[future.key])
    final = client.submit(write_last, job, last, key=f"bil-export-{job.run}-last", pure=False)
    try:
        final.result()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    progress.update(len(last))
    return None
