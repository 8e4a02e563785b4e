"""Which library reads Zeiss CZI for the reader: pylibCZIrw, aicspylibczi and bioio-czi on one mosaic.

(a) The libraries. One CZI written by pylibCZIrw: 2 x 2 tiles of 1024 x 1024, 16 z planes, 2 channels,
    uint16, zstd (ZEN's current compression). Each library reads through its own stitched-mosaic call:
      pylibCZIrw    `CziReader.read(roi=..., plane=...)` on one open document
      aicspylibczi  `CziFile.read_mosaic(region=..., scale_factor=1, C=, Z=)` on one open file
      bioio-czi     `Reader(path).mosaic_xarray_dask_data` (its default aicspylibczi backend, one dask
                    chunk a tile) sliced and computed
    Measured, interleaved (the order reversed every other round), medians over --repeat rounds:
      - a 256 x 256 region inside one tile, one across the corner of all four, a whole 2048 x 2048 plane
        (every read checked against the voxels written);
      - bytes the process reads from the file (`/proc/self/io` rchar) for the one-tile region, against
        one tile's bytes on disk: about 1 means it decodes only the tile under the region;
      - thread safety: 4 threads sharing one object read 100 random regions each, checked;
      - 2 threads, each with its own object, against 1 thread doing the same 128 whole-tile reads (does
        the library release the GIL while it decodes): 0.5 is twice as fast, 1 no faster;
      - install weight: the installed files of each package and its dependencies (numpy left out).
(b) The reader's window cache, measured first (in a fresh process) after one untimed walk. A deeper
    mosaic (2 x 1 tiles of 1024 x 1024, 64 planes) walked cold as the server walks it: every block of
    level 0 through the pyramid's slabs (64 x 512 x 512, so four slabs a tile), with the windows kept
    in `segments` and with none kept: wall and user CPU time, and bytes read from the file (rchar).

aicspylibczi and bioio-czi are not dependencies of the project: `pip install aicspylibczi bioio-czi` to run
this.

Run: python benchmarks/czi_readers.py [--repeat N] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata as im
import resource
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from packaging.requirements import Requirement
from pylibCZIrw import czi as pyczi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bil_transform.cache import Cache, uncached  # noqa: E402
from bil_transform.pyramid import Pyramid  # noqa: E402
from bil_transform.readers import open_source  # noqa: E402

TILE, TILES, PLANES, CHANNELS = 1024, 2, 16, 2
ROI = 256
ZSTD = "zstd1:ExplicitLevel=1;PreProcess=HiLoByteUnpack"


def synthetic(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Smooth structure and camera-like noise, 12 bits, so zstd has something to do; made a plane at a time."""
    out = np.empty(shape, np.uint16)
    y, x = np.linspace(0, 8, shape[-2])[:, None], np.linspace(0, 8, shape[-1])[None, :]
    for i, index in enumerate(np.ndindex(*shape[:-2])):
        smooth = (np.sin(i * 0.3 + y) * np.cos(x * 1.3) + 1) / 2
        out[index] = (smooth * 3000 + rng.normal(300, 40, shape[-2:])).clip(0, 4095)
    return out


def write_mosaic(path: Path, tiles: tuple[int, int], planes: int, channels: int) -> np.ndarray:
    """Write a mosaic with pylibCZIrw; return what it holds, (c, z, y, x)."""
    rng = np.random.default_rng(3)
    data = synthetic(rng, (channels, planes, tiles[0] * TILE, tiles[1] * TILE))
    with pyczi.create_czi(str(path), exist_ok=True, compression_options=ZSTD) as czi:
        for c in range(channels):
            for z in range(planes):
                for ty in range(tiles[0]):
                    for tx in range(tiles[1]):
                        tile = data[c, z, ty * TILE:(ty + 1) * TILE, tx * TILE:(tx + 1) * TILE]
                        czi.write(tile[..., None], plane={"C": c, "Z": z, "T": 0}, location=(tx * TILE, ty * TILE))
        czi.write_metadata(channel_names={c: f"ch{c}" for c in range(channels)}, scale_x=0.5e-6, scale_y=0.5e-6,
                           scale_z=2e-6)
    return data


def rchar() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar"))


# A contender: open(path) -> reader object; read(obj, c, z, x, y, w, h) -> (h, w) array.
def _pylibczirw_open(path: Path):
    return pyczi.CziReader(str(path))


def _pylibczirw_read(doc, c, z, x, y, w, h):
    return doc.read(roi=(x, y, w, h), plane={"C": c, "Z": z, "T": 0})[..., 0]


def _aics_open(path: Path):
    from aicspylibczi import CziFile

    return CziFile(str(path))


def _aics_read(czi, c, z, x, y, w, h):
    return czi.read_mosaic(region=(x, y, w, h), scale_factor=1.0, C=c, Z=z).reshape(h, w)


def _bioio_open(path: Path):
    from bioio_czi import Reader

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Reader(str(path)).mosaic_xarray_dask_data.data  # (T, C, Z, Y, X)


def _bioio_read(mosaic, c, z, x, y, w, h):
    return np.asarray(mosaic[0, c, z, y:y + h, x:x + w].compute(scheduler="synchronous"))


CONTENDERS: dict[str, tuple[Callable, Callable, str]] = {
    "pylibCZIrw": (_pylibczirw_open, _pylibczirw_read, "pylibCZIrw"),
    "aicspylibczi": (_aics_open, _aics_read, "aicspylibczi"),
    "bioio-czi": (_bioio_open, _bioio_read, "bioio-czi"),
}


def install_weight(name: str, skip: frozenset = frozenset({"numpy"})) -> tuple[float, int]:
    """MiB of installed files of `name` and its dependencies (without extras), and how many packages."""
    seen: set[str] = set()
    todo = [name]
    total = 0
    while todo:
        dist_name = todo.pop()
        key = dist_name.lower().replace("_", "-")
        if key in seen or key in skip:
            continue
        seen.add(key)
        try:
            dist = im.distribution(dist_name)
        except im.PackageNotFoundError:
            continue
        total += sum(f.locate().stat().st_size for f in dist.files or () if f.locate().is_file())
        for spec in dist.requires or ():
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return total / 2**20, len(seen)


def regions(rng: np.random.Generator, n: int, kind: str) -> list[tuple[int, int, int, int, int, int]]:
    """(c, z, x, y, w, h) of n random reads: 'tile' inside one tile, 'corner' across all four, 'whole tile',
    'plane'."""
    out = []
    for _ in range(n):
        c, z = int(rng.integers(CHANNELS)), int(rng.integers(PLANES))
        if kind == "tile":
            ty, tx = (int(v) for v in rng.integers(0, TILES, 2))
            y, x = (int(v) + t * TILE for v, t in zip(rng.integers(0, TILE - ROI, 2), (ty, tx)))
            out.append((c, z, x, y, ROI, ROI))
        elif kind == "whole tile":
            ty, tx = (int(v) * TILE for v in rng.integers(0, TILES, 2))
            out.append((c, z, tx, ty, TILE, TILE))
        elif kind == "corner":
            y, x = (TILE - ROI // 2 + int(v) for v in rng.integers(-64, 64, 2))
            out.append((c, z, x, y, ROI, ROI))
        else:
            out.append((c, z, 0, 0, TILES * TILE, TILES * TILE))
    return out


def timed_reads(obj, read: Callable, data: np.ndarray, todo: list) -> tuple[float, int]:
    """Median seconds per read, and rchar bytes of all of them; every result checked."""
    times, before = [], rchar()
    for c, z, x, y, w, h in todo:
        start = time.perf_counter()
        got = read(obj, c, z, x, y, w, h)
        times.append(time.perf_counter() - start)
        assert np.array_equal(got, data[c, z, y:y + h, x:x + w]), "a read differs from the voxels written"
    return statistics.median(times), rchar() - before


def shared_by_threads(obj, read: Callable, data: np.ndarray, threads: int, per_thread: int) -> tuple[int, int]:
    """Wrong results and errors when `threads` threads share one object."""
    wrong, errors = [0], [0]

    def work(seed: int) -> None:
        for c, z, x, y, w, h in regions(np.random.default_rng(seed), per_thread, "tile"):
            try:
                if not np.array_equal(read(obj, c, z, x, y, w, h), data[c, z, y:y + h, x:x + w]):
                    wrong[0] += 1
            except Exception:  # a library that is not thread-safe may raise anything
                errors[0] += 1

    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return wrong[0], errors[0]


def two_threads(objects: list, read: Callable, todo: list) -> float:
    """Time of two threads, each with its own object and half of `todo`, over one thread doing all of it."""
    start = time.perf_counter()
    for r in todo:
        read(objects[0], *r)
    one = time.perf_counter() - start
    pool = [threading.Thread(target=lambda o=o, h=todo[i::2]: [read(o, *r) for r in h]) for i, o in enumerate(objects)]
    start = time.perf_counter()
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    return (time.perf_counter() - start) / one


def libraries(root: Path, repeat: int) -> None:
    path = root / "mosaic.czi"
    data = write_mosaic(path, (TILES, TILES), PLANES, CHANNELS)
    tile_bytes = path.stat().st_size / (CHANNELS * PLANES * TILES * TILES)
    print(f"(a) {path.name}: {TILES} x {TILES} tiles of {TILE} x {TILE}, {PLANES} planes, {CHANNELS} channels, "
          f"uint16, zstd: {path.stat().st_size / 2**20:.0f} MiB, {tile_bytes / 2**20:.2f} MiB a tile on disk")
    opened = {name: fn[0](path) for name, fn in CONTENDERS.items()}
    second = {name: fn[0](path) for name, fn in CONTENDERS.items()}  # each thread its own object
    for name, (_, read, _) in CONTENDERS.items():  # untimed: a library's first reads allocate its buffers
        for obj in (opened[name], second[name]):
            for r in regions(np.random.default_rng(1), 8, "whole tile"):
                read(obj, *r)
    samples: dict[tuple[str, str], list[float]] = {}
    parallel: dict[str, list[float]] = {}
    traffic: dict[str, list[float]] = {}
    rng = np.random.default_rng(5)
    for round_ in range(repeat):
        todo = {kind: regions(rng, n, kind) for kind, n in (("tile", 20), ("corner", 10), ("plane", 3))}
        todo["whole"] = regions(rng, 128, "whole tile")
        order = list(CONTENDERS) if round_ % 2 == 0 else list(reversed(CONTENDERS))
        for name in order:
            read = CONTENDERS[name][1]
            for kind in ("tile", "corner", "plane"):
                reads = todo[kind]
                seconds, nbytes = timed_reads(opened[name], read, data, reads)
                samples.setdefault((name, kind), []).append(seconds)
                if kind == "tile":
                    traffic.setdefault(name, []).append(nbytes / len(reads) / tile_bytes)
            parallel.setdefault(name, []).append(two_threads([opened[name], second[name]], read, todo["whole"]))
    base = {kind: statistics.median(samples["pylibCZIrw", kind]) for kind in ("tile", "corner", "plane")}
    print(f"    median ms per read (ratio to pylibCZIrw), {repeat} rounds; bytes read for a one-tile region in tiles")
    print(f"    {'library':14s} {'256^2 in 1 tile':>22s} {'256^2 over 4 tiles':>22s} {'whole plane':>22s} "
          f"{'bytes/tile':>11s}")
    for name in CONTENDERS:
        cells = []
        for kind in ("tile", "corner", "plane"):
            t = statistics.median(samples[name, kind])
            cells.append(f"{t * 1e3:9.2f} ({t / base[kind]:6.2f}x)")
        print(f"    {name:14s} {cells[0]:>22s} {cells[1]:>22s} {cells[2]:>22s} "
              f"{statistics.median(traffic[name]):11.2f}")
    print("    thread safety (4 threads x 100 regions on one shared object); 2 threads with an object each / 1 thread;"
          " install weight:")
    for name, (_, read, package) in CONTENDERS.items():
        wrong, errors = shared_by_threads(opened[name], read, data, 4, 100)
        ratio = statistics.median(parallel[name])
        mib, count = install_weight(package)
        print(f"    {name:14s} wrong {wrong:3d}, errors {errors:3d};  2 threads take {ratio:4.2f} of 1 thread's time;  "
              f"{mib:6.1f} MiB in {count} packages")


def window_cache(root: Path, repeat: int) -> None:
    path = root / "deep.czi"
    write_mosaic(path, (1, 2), 64, 1)
    print(f"(b) {path.name}: 1 x 2 tiles of {TILE} x {TILE}, 64 planes, 1 channel, uint16, zstd: "
          f"{path.stat().st_size / 2**20:.0f} MiB; every level-0 block (64^3) cold, through the pyramid's slabs")
    reader = open_source(path)
    ways = {"windows kept in segments": lambda: Cache(2**31).section("segments"),
            "no windows kept": lambda: uncached("segments")}
    times: dict[str, list[float]] = {name: [] for name in ways}
    traffic: dict[str, list[float]] = {name: [] for name in ways}
    cpu: dict[str, list[float]] = {name: [] for name in ways}
    for round_ in range(-1, repeat):  # round -1 untimed: the first walk's allocations
        for name in (ways if round_ % 2 == 0 else reversed(list(ways))):
            reader.segments = ways[name]()
            reader.volume = dataclasses.replace(reader.volume, version=f"bench-{round_}-{name}")
            pyramid = Pyramid(reader, Cache(2**31).section("blocks"), "bench")
            lvl = pyramid.levels[0]
            start, before, user = time.perf_counter(), rchar(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
            for index in np.ndindex(*lvl.grid):
                pyramid.block(0, 0, 0, index)
            if round_ >= 0:
                times[name].append(time.perf_counter() - start)
                cpu[name].append(resource.getrusage(resource.RUSAGE_SELF).ru_utime - user)
                traffic[name].append((rchar() - before) / path.stat().st_size)
    slab = pyramid.slab(0, (0, 0, 0))
    print(f"    slab {tuple(len(r) * c for r, c in zip(slab, lvl.chunks))} voxels; medians of {repeat} walks: "
          "wall time, user CPU time, bytes read in file sizes")
    for name in ways:
        print(f"    {name:26s} {statistics.median(times[name]):6.2f} s  {statistics.median(cpu[name]):6.2f} s CPU  "
              f"{statistics.median(traffic[name]):5.2f}")
    (kept, none), (kept_cpu, none_cpu) = ([statistics.median(d[name]) for name in ways] for d in (times, cpu))
    print(f"    kept / none: wall {kept / none:.2f}, CPU {kept_cpu / none_cpu:.2f} (the system time of page faults "
          "swings with the machine's other work; the CPU time is this process's own)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--data-dir", type=Path, default=None, help="where to write the CZI files (default: a "
                        "temporary directory, removed afterwards)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="czi-bench-", dir=args.data_dir) as tmp:
        window_cache(Path(tmp), args.repeat)  # first: (a) leaves the heap holding large freed blocks
        libraries(Path(tmp), args.repeat)


if __name__ == "__main__":
    main()
