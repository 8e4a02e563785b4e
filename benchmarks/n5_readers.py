"""Which library should read N5 blocks for readers/n5.py: four candidates on the same files, in one run.

Candidates:
  own         readers/n5.py: block files read and decoded here with imagecodecs (and zlib)
  tensorstore its n5 driver (file kvstore, no cache), with its own threads; tensorstore-1 limits
              them to one (`data_copy_concurrency`), which is how it would run under the server's
              worker pool, one read per worker
  z5py        z5py.File(...)[name][z, y, x] (C++), one thread
  zarr-n5     zarr-python 3 through zarr_n5.N5WrapperStore (local store)

Data: (--depth, --size, --size) uint16 (smooth + noise) in blocks of 32 x 128 x 128 (N5 [128, 128, 32]),
written by tensorstore for raw, gzip, blosc (zstd, shuffle), zstd, bzip2 and xz; lz4 in n5-java's
framing (lz4-java LZ4BlockOutputStream), written here because no Python library writes it; gzip by
z5py too, whose edge blocks are cut to the volume as n5-java's are.

Measured, interleaved (the candidates' order rotates every round), medians of --repeat rounds:
  (a) a region of 2 x 3 x 3 blocks, each compression: ms per block touched, and the ratio to own;
  (b) a small region (8^3) inside one block: every candidate decodes the whole block;
  (c) 8 regions read by 2 threads against the same 8 read by one: the speed-up (the GIL), and every
      result checked against the array written (thread safety);
  (d) peak RSS growth of one region read (gzip), each candidate in a fresh process;
  (e) which compressions and layouts each reads correctly.

zarr-n5 is not a dependency of the project: `pip install zarr-n5` to run this (z5py and xxhash come with
the test extra).

Run: python benchmarks/n5_readers.py [--size 512] [--depth 64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import imagecodecs
import numpy as np

BLOCK = (32, 128, 128)  # z, y, x
COMPRESSIONS = {
    "raw": {"type": "raw"},
    "gzip": {"type": "gzip", "level": 6},
    "blosc": {"type": "blosc", "cname": "zstd", "clevel": 5, "shuffle": 2},
    "zstd": {"type": "zstd", "level": 3},
    "bzip2": {"type": "bzip2", "blockSize": 9},
    "xz": {"type": "xz", "preset": 6},
}
REGION = (slice(8, 56), slice(100, 300), slice(100, 300))  # 2 x 3 x 3 blocks
SMALL = (slice(4, 12), slice(20, 28), slice(20, 28))  # inside block (0, 0, 0)


def synthetic(shape: tuple[int, ...]) -> np.ndarray:
    rng = np.random.default_rng(3)
    grids = np.meshgrid(*[np.linspace(0, 8, n) for n in shape], indexing="ij")
    smooth = (np.sin(grids[0] + grids[1]) * np.cos(grids[-1] * 1.3) + 1) / 2
    return (smooth * 48000 + rng.uniform(0, 12000, shape)).astype(np.uint16)


def write_tensorstore(path: Path, data: np.ndarray, compression: dict) -> None:
    import tensorstore as ts

    spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"dimensions": list(data.shape[::-1]), "blockSize": list(BLOCK[::-1]), "dataType": "uint16",
                         "compression": compression}}
    ts.open(spec, create=True).result()[...].write(data.T).result()


def write_java_lz4(path: Path, data: np.ndarray) -> None:
    """n5-java's lz4 blocks: N5 header, then lz4-java LZ4BlockOutputStream frames of 64 KiB and its end mark."""
    import xxhash

    path.mkdir(parents=True)
    (path / "attributes.json").write_text(json.dumps({
        "dimensions": list(data.shape[::-1]), "blockSize": list(BLOCK[::-1]), "dataType": "uint16",
        "compression": {"type": "lz4", "blockSize": 65536}}))
    grid = [range(math.ceil(n / b)) for n, b in zip(data.shape, BLOCK)]
    for z in grid[0]:
        for y in grid[1]:
            for x in grid[2]:
                cell = data[z * BLOCK[0]:(z + 1) * BLOCK[0], y * BLOCK[1]:(y + 1) * BLOCK[1],
                            x * BLOCK[2]:(x + 1) * BLOCK[2]]
                body = cell.astype(">u2").tobytes()
                out = [struct.pack(">HH3I", 0, 3, *cell.shape[::-1])]
                for i in range(0, len(body), 65536):
                    piece = body[i:i + 65536]
                    packed = imagecodecs.lz4_encode(piece, header=False)
                    check = xxhash.xxh32_intdigest(piece, seed=0x9747B28C) & 0x0FFFFFFF
                    out.append(struct.pack("<8sBiii", b"LZ4Block", 0x20 | 6, len(packed), len(piece), check) + packed)
                out.append(struct.pack("<8sBiii", b"LZ4Block", 0x10 | 6, 0, 0, 0))
                (path / str(x) / str(y)).mkdir(parents=True, exist_ok=True)
                (path / str(x) / str(y) / str(z)).write_bytes(b"".join(out))


def write_z5py(path: Path, data: np.ndarray, compression: str) -> None:
    import z5py

    f = z5py.File(str(path.parent), use_zarr_format=False, mode="a")
    f.create_dataset(path.name, data=data, chunks=BLOCK, compression=compression)


def write_all(root: Path, data: np.ndarray) -> dict[str, Path]:
    """Every dataset in one container (z5py opens datasets inside one), by its row name."""
    container = root / "bench.n5"
    container.mkdir()
    (container / "attributes.json").write_text(json.dumps({"n5": "2.0.0"}))
    paths = {}
    for name, comp in COMPRESSIONS.items():
        paths[name] = container / name
        write_tensorstore(paths[name], data, comp)
    paths["lz4 (n5-java)"] = container / "lz4"
    write_java_lz4(paths["lz4 (n5-java)"], data)
    paths["gzip, cut edges (z5py)"] = container / "z5py-gzip"
    write_z5py(paths["gzip, cut edges (z5py)"], data, "gzip")
    paths["lz4 (z5py's bare block)"] = container / "z5py-lz4"
    write_z5py(paths["lz4 (z5py's bare block)"], data, "lz4")
    return paths


# ---- candidates: open(path) -> handle; read(handle, region) -> (z, y, x) ndarray --------------------

def open_own(path: Path):
    from bil_transform.readers.n5 import N5Reader

    return N5Reader(path)


def read_own(reader, region):
    return reader.read(0, 0, 0, region)


def open_tensorstore(path: Path, threads: int | None = None):
    import tensorstore as ts

    context = {"cache_pool": {"total_bytes_limit": 0}}
    if threads:
        context["data_copy_concurrency"] = {"limit": threads}
    return ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(path)}, "context": context},
                   read=True).result()


def read_tensorstore(store, region):
    z, y, x = region
    return np.ascontiguousarray(store[x, y, z].read().result().T)


def open_z5py(path: Path):
    import z5py

    return z5py.File(str(path.parent), use_zarr_format=False, mode="r")[path.name]


def read_z5py(ds, region):
    return ds[region]


def open_zarr_n5(path: Path):
    import zarr
    from zarr.storage import LocalStore
    from zarr_n5 import N5WrapperStore

    return zarr.open_array(store=N5WrapperStore(LocalStore(str(path), read_only=True)), mode="r")


def read_zarr_n5(arr, region):
    z, y, x = region
    return np.ascontiguousarray(arr[x, y, z].T)


CANDIDATES = {
    "own": (open_own, read_own),
    "tensorstore": (open_tensorstore, read_tensorstore),
    "tensorstore-1": (lambda p: open_tensorstore(p, 1), read_tensorstore),
    "z5py": (open_z5py, read_z5py),
    "zarr-n5": (open_zarr_n5, read_zarr_n5),
}


def attempt(name: str, path: Path, region, want: np.ndarray) -> str:
    """'ok', 'WRONG' or the error, for one candidate reading one region of one file."""
    opener, reader = CANDIDATES[name]
    try:
        got = reader(opener(path), region)
    except Exception as exc:
        return f"fails ({type(exc).__name__}: {str(exc).splitlines()[0][:60]})"
    return "ok" if np.array_equal(got, want[region]) else "WRONG"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def region_times(paths: dict[str, Path], data: np.ndarray, repeat: int, names: list[str], region) -> dict:
    """Median seconds per (candidate, compression) for one region, rounds interleaved."""
    handles = {}
    for comp, path in paths.items():
        for name in names:
            if attempt(name, path, region, data) == "ok":
                handles[name, comp] = CANDIDATES[name][0](path)
    times: dict = {key: [] for key in handles}
    for r in range(repeat):
        order = names[r % len(names):] + names[:r % len(names)]
        for comp in paths:
            for name in order:
                if (name, comp) in handles:
                    read, handle = CANDIDATES[name][1], handles[name, comp]
                    times[name, comp].append(timed(functools.partial(read, handle, region)))
    return {key: statistics.median(v) for key, v in times.items()}


def blocks_touched(region) -> int:
    return math.prod(len(range(s.start // b, (s.stop - 1) // b + 1)) for s, b in zip(region, BLOCK))


def _spin(done: threading.Event) -> int:
    n = 0
    while not done.is_set():
        n += 1
    return n


def gil_share(read, regions: list, repeat: int) -> float:
    """How fast a pure-Python loop runs while another thread reads `regions`, against the loop alone:
    about 1.0 (or 0.5 with one free core) when the reads release the GIL, near 0 when they hold it."""
    shares = []
    for _ in range(repeat):
        done = threading.Event()
        with ThreadPoolExecutor(1) as pool:
            start = time.perf_counter()
            job = pool.submit(lambda: [read(r) for r in regions])
            job.add_done_callback(lambda _, flag=done: flag.set())
            busy = _spin(done) / (time.perf_counter() - start)
            job.result()
        alone = threading.Event()
        threading.Timer(time.perf_counter() - start, alone.set).start()
        start = time.perf_counter()
        shares.append(busy / (_spin(alone) / (time.perf_counter() - start)))
    return statistics.median(shares)


def threads(path: Path, data: np.ndarray, repeat: int, names: list[str]) -> dict:
    """Per candidate: the speed-up of 2 threads over 1 reading the same 8 regions (every result checked
    against the array written), and the GIL share of a Python loop beside one reading thread."""
    regions = [(slice(z, z + 32), slice(y, y + 200), slice(x, x + 200))
               for z in (0, 32) for y in (0, 256) for x in (0, 256)]
    out = {}
    for name in names:
        opener, reader = CANDIDATES[name]
        read = functools.partial(reader, opener(path))
        wall: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeat):
            for workers in (1, 2):
                with ThreadPoolExecutor(workers) as pool:
                    start = time.perf_counter()
                    results = list(pool.map(read, regions))
                    wall[workers].append(time.perf_counter() - start)
                assert all(np.array_equal(got, data[r]) for got, r in zip(results, regions)), f"{name}: wrong results"
        out[name] = (statistics.median(wall[1]) / statistics.median(wall[2]), gil_share(read, regions, repeat))
    return out


def machine_parallelism(repeat: int) -> dict:
    """The same two figures for C work that releases the GIL (hashlib) and C work that holds it (sorting
    a list): on a shared machine, the ceiling and the floor the candidates are read against."""
    payload, items = bytes(8 * 2**20), np.random.default_rng(0).permutation(300_000).tolist()
    work = {"sha256 (no GIL)": lambda _: hashlib.sha256(payload).digest(),
            "list sort (GIL)": lambda _: sorted(items)}
    out = {}
    for name, fn in work.items():
        wall: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(repeat):
            for workers in (1, 2):
                with ThreadPoolExecutor(workers) as pool:
                    start = time.perf_counter()
                    list(pool.map(fn, range(16)))
                    wall[workers].append(time.perf_counter() - start)
        out[name] = (statistics.median(wall[1]) / statistics.median(wall[2]), gil_share(fn, list(range(16)), repeat))
    return out


def _status(key: str) -> float:
    """A /proc/self/status figure in MiB."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def memory_child(name: str, path: str) -> None:
    """In a fresh process: open, read a small region (libraries loaded), reset the peak (clear_refs 5),
    read the region, print the peak's growth over the resident size before it."""
    opener, reader = CANDIDATES[name]
    handle = opener(Path(path))
    reader(handle, SMALL)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    reader(handle, REGION)
    print(_status("VmHWM") - before)


def memory(path: Path, name: str) -> float:
    """Peak RSS growth (MiB) of one region read, in a fresh process."""
    done = subprocess.run([sys.executable, __file__, "--memory", name, str(path)], capture_output=True, text=True,
                          check=True)
    return float(done.stdout.strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=512, help="y and x size (default 512)")
    parser.add_argument("--depth", type=int, default=64, help="z size (default 64)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--memory", nargs=2, help=argparse.SUPPRESS)  # the child process of (d)
    args = parser.parse_args()
    if args.memory:
        return memory_child(*args.memory)
    data = synthetic((args.depth, args.size, args.size - 42))  # x not a multiple of the block: edge blocks
    names = list(CANDIDATES)
    root = Path(tempfile.mkdtemp(prefix="helper-n5-bench-"))
    try:
        paths = write_all(root, data)
        print(f"data: {data.shape} uint16 (z, y, x), blocks {BLOCK}, {data.nbytes / 2**20:.0f} MiB; repeat "
              f"{args.repeat}; load average {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")

        print("\n(e) what each reads correctly (the region of (a))")
        for comp, path in paths.items():
            print(f"  {comp:26s} " + "  ".join(f"{n}: {attempt(n, path, REGION, data)}" for n in names))

        main_paths = {k: v for k, v in paths.items() if k in COMPRESSIONS or k == "lz4 (n5-java)"}
        n = blocks_touched(REGION)
        times = region_times(main_paths, data, args.repeat, names, REGION)
        print(f"\n(a) region {tuple((s.start, s.stop) for s in REGION)}: {n} blocks; ms per block (ratio to own)")
        print("  " + " " * 16 + "".join(f"{name:>22s}" for name in names))
        for comp in main_paths:
            own = times.get(("own", comp))
            cells = []
            for name in names:
                t = times.get((name, comp))
                cells.append("-" if t is None or own is None else f"{t / n * 1e3:7.2f} ({t / own:4.2f})")
            print(f"  {comp:16s}" + "".join(f"{c:>22s}" for c in cells))

        small = region_times({"gzip": paths["gzip"]}, data, args.repeat, names, SMALL)
        print("\n(b) an 8^3 region inside one gzip block: ms (ratio to own)")
        base = small["own", "gzip"]
        print("  " + "  ".join(f"{name}: {small[name, 'gzip'] * 1e3:.2f} ({small[name, 'gzip'] / base:.2f})"
                               for name in names))

        speedup = threads(paths["gzip"], data, args.repeat, [n for n in names if n != "tensorstore"])
        print("\n(c) 8 gzip regions: speed-up of 2 threads over 1 (results checked), and the speed a Python loop keeps "
              "beside one reading thread (1.0, or 0.5 on one free core: the GIL released; near 0: held)")
        print("  " + "  ".join(f"{name}: {s:.2f}, {c:.2f}" for name, (s, c) in speedup.items()))
        print("  the machine now: " + "  ".join(f"{name}: {s:.2f}, {c:.2f}"
                                               for name, (s, c) in machine_parallelism(args.repeat).items()))

        out = math.prod(r.stop - r.start for r in REGION) * 2 / 2**20
        print(f"\n(d) peak RSS growth of one gzip region read (the region itself is {out:.1f} MiB), fresh process: MiB")
        print("  " + "  ".join(f"{name}: {memory(paths['gzip'], name):.1f}" for name in names))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nload average at the end: {' '.join(Path('/proc/loadavg').read_text().split()[:3])}")


if __name__ == "__main__":
    main()
