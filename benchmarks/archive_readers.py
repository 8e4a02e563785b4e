"""What the archive readers' two design choices buy, each against its alternative in the same run.

(a) JPEG2000 overview levels. A slice stack of lossless JPEG2000 files (imagecodecs, 6 resolutions);
    the pyramid's level r is produced cold (empty caches), all of it. Native: level r is decoded
    at wavelet reduction r, as the reader does. Baseline: the same reader with its reductions
    hidden, so the pyramid decodes full resolution and downsamples (mean) level by level.
(b) Imaris chunks under the worker pool. An .ims file (h5py, gzip, Imaris-typical 32 x 128 x 128
    chunks); every 64^3 block of level 0 is read cold by 1 and by 2 worker threads.
    Reader: raw chunk bytes through HDF5, decompressed outside h5py's global lock, each chunk
    once (kept in the segments cache for the other blocks it serves). Baseline: plain h5py slicing, where
    HDF5 decompresses under the lock, again for every block a chunk serves once the chunk is
    larger than HDF5's default 1 MiB chunk cache.

Every timing is the best of --repeat cold runs; native and baseline outputs are checked equal
where they must be (Imaris) and the native levels' shapes against the baseline's.

Run: python benchmarks/archive_readers.py [--slices N] [--size N] [--repeat N]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from imaris_writer import write_ims  # noqa: E402

import bil_transform.readers.imaris as imaris  # noqa: E402
from bil_transform.cache import Cache  # noqa: E402
from bil_transform.pyramid import Pyramid  # noqa: E402
from bil_transform.readers import open_source  # noqa: E402

RUNS = itertools.count()


def synthetic(rng, shape, hi) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(0, 8, n) for n in shape], indexing="ij")
    smooth = (np.sin(grids[0] + grids[1]) * np.cos(grids[-1] * 1.3) + 1) / 2
    return (smooth * hi * 0.8 + rng.uniform(0, hi * 0.2, shape)).astype(np.uint16)


SEGMENTS = Cache(2**30).section("segments")  # what the server hands its readers, as large as the old fixed one


def fresh(reader):
    """The reader with a new version token, so no decoded window or chunk from an earlier run is reused."""
    reader.volume = dataclasses.replace(reader.volume, version=f"bench-{next(RUNS)}")
    return reader


def read_level(pyramid: Pyramid, level: int, workers: int = 1) -> list[np.ndarray]:
    lvl = pyramid.levels[level]
    blocks = list(itertools.product(*(range(g) for g in lvl.grid)))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda b: pyramid.block(level, 0, 0, b), blocks))


def cold_level(reader, level: int, workers: int, repeat: int) -> tuple[float, list[np.ndarray]]:
    """Best time of `repeat` cold reads of a whole pyramid level, and what the last one read."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        blocks = read_level(Pyramid(fresh(reader), Cache(2**33).section("blocks"), "bench"), level, workers)
        times.append(time.perf_counter() - start)
    return min(times), blocks


def jpeg2000(root: Path, slices: int, size: int, repeat: int) -> None:
    rng = np.random.default_rng(1)
    (root / "jp2").mkdir()
    for z in range(slices):
        plane = synthetic(rng, (size, size), 60000)
        (root / "jp2" / f"z{z:04d}.jp2").write_bytes(
            imagecodecs.jpeg2k_encode(plane, level=0, codecformat="jp2", reversible=True, resolutions=6))
    native, hidden = open_source(root / "jp2", SEGMENTS), open_source(root / "jp2", SEGMENTS)
    # serial sections 16 um apart, so both pyramids keep z through level 4 and make the same levels
    native.volume = dataclasses.replace(native.volume, voxel_size=(16.0, 1.0, 1.0))
    hidden.volume = dataclasses.replace(native.volume, native_levels=native.volume.native_levels[:1])
    print(f"(a) JPEG2000: {slices} lossless slices of {size} x {size} uint16, "
          f"{sum(f.stat().st_size for f in (root / 'jp2').iterdir()) / 2**20:.0f} MiB")
    print("    level  shape            native  full decode + downsample  ratio")
    for level in (1, 2, 3, 4):
        shape = Pyramid(native, Cache(1).section("blocks"), "n").levels[level].shape
        assert shape == Pyramid(hidden, Cache(1).section("blocks"), "h").levels[level].shape
        t_native, _ = cold_level(native, level, 2, repeat)
        t_full, _ = cold_level(hidden, level, 2, repeat)
        print(f"    {level:5d}  {str(shape):15s}  {t_native:6.2f} s  {t_full:6.2f} s{'':18s}{t_native / t_full:.3f}")


def imaris_chunks(root: Path, slices: int, size: int, repeat: int) -> None:
    rng = np.random.default_rng(2)
    path = root / "bench.ims"
    write_ims(path, synthetic(rng, (slices, size, size), 60000)[None, None], levels=1, chunks=(32, 128, 128))
    print(f"(b) Imaris: {slices} x {size} x {size} uint16, gzip, chunks 32 x 128 x 128, "
          f"{path.stat().st_size / 2**20:.0f} MiB; all level-0 blocks of 64^3")
    direct = imaris.chunk_layout
    ways = {"decode outside the lock": direct, "h5py slicing (global lock)": lambda data: None}
    times, blocks = {}, {}
    try:
        for name, layout in ways.items():
            imaris.chunk_layout = layout
            reader = open_source(path, SEGMENTS)  # the layouts are taken at open
            for workers in (1, 2):
                times[name, workers], blocks[name] = cold_level(reader, 0, workers, repeat)
    finally:
        imaris.chunk_layout = direct
    assert all(np.array_equal(a, b) for a, b in zip(*blocks.values()))
    for name in ways:
        one, two = times[name, 1], times[name, 2]
        print(f"    {name:28s} 1 worker {one:6.2f} s   2 workers {two:6.2f} s   speed-up {one / two:.2f}")
    ratio = times["decode outside the lock", 2] / times["h5py slicing (global lock)", 2]
    print(f"    reader / h5py slicing, 2 workers: {ratio:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bil-bench-") as tmp:
        jpeg2000(Path(tmp), args.slices, args.size, args.repeat)
        imaris_chunks(Path(tmp), args.slices, args.size // 2, args.repeat)


if __name__ == "__main__":
    main()
