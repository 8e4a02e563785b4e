"""How the BigDataViewer HDF5 reader reads its chunks, against the alternatives, in the same run.

A BDV .h5 written by npy2bdv (uint16 stored as int16, gzip) with four chunk shapes: BigDataViewer's
own typical 16 x 16 x 16 (Fiji's exporter proposes blocks of about 4096 voxels, so files from Fiji
hold many small chunks), 16 x 32 x 32, 32 x 32 x 32 and npy2bdv's default 4 x 256 x 256. Every 64^3
block of level 0 is produced cold through the pyramid (a first pass over the data, as the server
makes it), by 1 and by 2 worker threads, four ways:

- the reader as it is: chunks under bdv.SMALL_CHUNK bytes by h5py slicing, larger ones as below;
- raw chunk bytes read through HDF5 (`read_direct_chunk`, one call a chunk) and inflated by
  libdeflate into a buffer of the known size, outside h5py's global lock, each chunk once;
- the Imaris reader's earlier way (before both readers shared hdf5_chunks): each chunk looked up
  (`get_chunk_info_by_coord`), read, and inflated with zlib outside the lock;
- plain h5py slicing: HDF5 reads and decompresses the region's chunks in C, under the lock.

Rounds interleave the four (order rotated each round); each figure is the median of --repeat
rounds, with its ratio to the reader's figure. Outputs are checked equal.

Run: python benchmarks/bdv_readers.py [--slices N] [--size N] [--repeat N]
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import statistics
import sys
import tempfile
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np

import bil_transform.readers.bdv as bdv
import bil_transform.readers.hdf5_chunks as hdf5_chunks
from bil_transform.cache import Cache
from bil_transform.pyramid import Pyramid
from bil_transform.readers import open_source

RUNS = itertools.count()
DIRECT = bdv.decode_chunk


def synthetic(rng, shape, hi) -> np.ndarray:
    grids = np.meshgrid(*[np.linspace(0, 8, n) for n in shape], indexing="ij")
    smooth = (np.sin(grids[0] + grids[1]) * np.cos(grids[-1] * 1.3) + 1) / 2
    return (smooth * hi * 0.8 + rng.uniform(0, hi * 0.2, shape)).astype(np.uint16)


def write(path: Path, data: np.ndarray, block: tuple[int, int, int]) -> None:
    import npy2bdv

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = npy2bdv.BdvWriter(str(path), blockdim=(block,), compression="gzip", overwrite=True)
        w.append_view(data, voxel_size_xyz=(1, 1, 1), voxel_units="um")
        w.write_xml()
        w.close()


def lookup_read_zlib(dsid, origin, layout):
    """The Imaris reader's chunk decode before it shared hdf5_chunks with this reader: the chunk
    looked up first, then read, then zlib (deflate and shuffle, what npy2bdv writes)."""
    if dsid.get_chunk_info_by_coord(origin).byte_offset is None:
        return np.full(layout.chunks, layout.fill, layout.dtype)
    mask, raw = dsid.read_direct_chunk(origin)
    for i in reversed(range(len(layout.pipeline))):
        if mask & (1 << i):
            continue
        if layout.pipeline[i] == hdf5_chunks.DEFLATE:
            raw = zlib.decompress(raw)
        elif layout.pipeline[i] == hdf5_chunks.SHUFFLE:
            raw = np.frombuffer(raw, np.uint8).reshape(layout.dtype.itemsize, -1).T.tobytes()
        else:
            raise ValueError(f"filter {layout.pipeline[i]} is not in this baseline")
    return np.frombuffer(raw, layout.dtype).reshape(layout.chunks)


WAYS = {
    "the reader (its choice by chunk size)": ("reader", DIRECT),
    "raw chunk, libdeflate outside lock": ("decode", DIRECT),
    "earlier Imaris decode: lookup, raw chunk, zlib": ("decode", lookup_read_zlib),
    "h5py slicing (HDF5 decodes under lock)": ("slice", None),
}


def cold_level0(path: Path, way: str, workers: int) -> tuple[float, list[np.ndarray]]:
    kind, decode = WAYS[way]
    bdv.decode_chunk = decode or DIRECT
    original, small = bdv.chunk_layout, bdv.SMALL_CHUNK
    if kind == "slice":
        bdv.chunk_layout = lambda data, min_bytes=0: None
    elif kind == "decode":
        bdv.SMALL_CHUNK = 0
    try:
        reader = open_source(path, Cache(2**30).section("segments"))
        reader.volume = dataclasses.replace(reader.volume, version=f"bench-{next(RUNS)}")
        pyramid = Pyramid(reader, Cache(2**33).section("blocks"), "bench")
        blocks = list(itertools.product(*(range(g) for g in pyramid.levels[0].grid)))
        start = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            out = list(pool.map(lambda b: pyramid.block(0, 0, 0, b), blocks))
        return time.perf_counter() - start, out
    finally:
        bdv.decode_chunk, bdv.chunk_layout, bdv.SMALL_CHUNK = DIRECT, original, small


def way_of(path: Path) -> str:
    with h5py.File(path.with_suffix(".h5"), "r") as f:
        return "by h5py slicing" if bdv.chunk_layout(f["t00000/s00/0/cells"], bdv.SMALL_CHUNK) is None else "raw chunks"


def measure(path: Path, label: str, repeat: int) -> None:
    print(f"{label}: {path.with_suffix('.h5').stat().st_size / 2**20:.1f} MiB on disk")
    times: dict[tuple[str, int], list[float]] = {(w, n): [] for w in WAYS for n in (1, 2)}
    reference = None
    for r in range(repeat):
        order = list(WAYS)[r % len(WAYS):] + list(WAYS)[:r % len(WAYS)]
        for workers in (1, 2):
            for way in order:
                seconds, out = cold_level0(path, way, workers)
                times[way, workers].append(seconds)
                if reference is None:
                    reference = out
                assert all(np.array_equal(a, b) for a, b in zip(reference, out)), way
    base = {n: statistics.median(times[next(iter(WAYS)), n]) for n in (1, 2)}
    print(f"    {'':42s}  1 worker        2 workers       2 / 1   (reader reads {way_of(path)})")
    for way in WAYS:
        one, two = (statistics.median(times[way, n]) for n in (1, 2))
        print(f"    {way:42s}  {one:5.2f} s ({one / base[1]:4.2f})  {two:5.2f} s ({two / base[2]:4.2f})  "
              f"{two / one:4.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"{args.slices} x {args.size} x {args.size} uint16, gzip; every 64^3 block of level 0, cold; "
          f"median of {args.repeat} interleaved rounds (ratio to the reader's time); cpus {os.cpu_count()}, "
          f"load {os.getloadavg()[0]:.2f}", file=sys.stdout)
    data = synthetic(np.random.default_rng(3), (args.slices, args.size, args.size), 60000)
    with tempfile.TemporaryDirectory(prefix="helper-bdv-bench-") as tmp:
        for block in ((16, 16, 16), (16, 32, 32), (32, 32, 32), (4, 256, 256)):
            path = Path(tmp) / f"b{'x'.join(map(str, block))}.h5"
            write(path, data, block)
            measure(path.with_suffix(".xml"), f"chunks {block[0]} x {block[1]} x {block[2]}", args.repeat)
    print(f"load at end {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
