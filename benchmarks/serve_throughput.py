"""Chunk throughput of the OME-Zarr view, against baselines measured in the same run.

(a) Warm: every chunk is in the cache. Baseline: the very same bytes written to disk and
    served by aiohttp's static file handler: what serving precomputed files would cost.
(b) Cold: a fresh server (empty cache) serves every level-0 chunk, then every chunk of
    the other levels (the pyramid built on demand). Baselines: reading the same level-0
    regions with tifffile in a loop (the naive way: whole slice, then crop), and reading
    every slice once in full (the I/O + decode floor for touching all the data).

Run: python benchmarks/serve_throughput.py [--shape Z Y X] [--concurrency N]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numcodecs
import numpy as np
import requests
import tifffile

STATIC_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.router.add_static("/ds/bench/zarr", sys.argv[1])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(cmd: list[str], port: int, ready: str) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}{ready}", timeout=1).status_code < 500:
                return proc
        except requests.ConnectionError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{cmd[:4]} did not start")


def start_server(data: Path, workers: int | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bil_transform", "serve", str(data), "--port", str(port), "--cache-size", "8GiB"]
    cmd += ["--workers", str(workers)] if workers else []
    return start(cmd, port, "/healthz"), f"http://127.0.0.1:{port}"


def make_slices(root: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Uncompressed uint16 slices (the usual fMOST/STPT layout): smooth blobs plus shot noise."""
    rng = np.random.default_rng(0)
    z, y, x = shape
    yy, xx = np.mgrid[0:y, 0:x].astype(np.float32)
    volume = np.empty(shape, np.uint16)
    for i in range(z):
        smooth = 1000 + 800 * np.sin(yy / 37 + i / 11) * np.cos(xx / 53 - i / 7)
        volume[i] = rng.poisson(np.clip(smooth, 0, None)).astype(np.uint16)
        tifffile.imwrite(root / f"slice_{i:05d}.tif", volume[i])
    return volume


def chunk_keys(base: str) -> tuple[list[list[str]], list[dict]]:
    """Every chunk key of every level, from the dataset's own metadata."""
    levels = requests.get(f"{base}/api/datasets/bench").json()["levels"]
    keys = []
    for i, lvl in enumerate(levels):
        grid = [-(-s // c) for s, c in zip(lvl["shape"], lvl["chunks"])]
        keys.append([f"{i}/0/0/{z}/{y}/{x}" for z in range(grid[0]) for y in range(grid[1]) for x in range(grid[2])])
    return keys, levels


async def fetch_all(base: str, keys: list[str], concurrency: int) -> tuple[float, dict[str, bytes]]:
    """GET every key with `concurrency` requests in flight; returns seconds and bodies."""
    bodies: dict[str, bytes] = {}
    queue = list(reversed(keys))

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            key = queue.pop()
            async with session.get(f"{base}/ds/bench/zarr/{key}") as r:
                if r.status != 200:
                    raise RuntimeError(f"{key}: HTTP {r.status} {await r.text()}")
                bodies[key] = await r.read()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - t0, bodies


def check_chunks(bodies: dict[str, bytes], volume: np.ndarray, level0: dict) -> None:
    codec = numcodecs.Blosc()
    cz, cy, cx = level0["chunks"]
    for key in list(sorted(bodies))[:: max(1, len(bodies) // 7)]:
        _, _, _, z, y, x = map(int, key.split("/"))
        chunk = np.frombuffer(codec.decode(bodies[key]), np.uint16).reshape(cz, cy, cx)
        want = volume[z * cz:(z + 1) * cz, y * cy:(y + 1) * cy, x * cx:(x + 1) * cx]
        if not np.array_equal(chunk[tuple(slice(0, n) for n in want.shape)], want):
            raise AssertionError(f"chunk {key} differs from the source")


def tifffile_baselines(files: list[Path], level0: dict) -> tuple[float, float]:
    """Seconds to read every level-0 chunk region naively, and to read every slice once."""
    (z, y, x), (cz, cy, cx) = level0["shape"], level0["chunks"]
    t0 = time.perf_counter()
    for z0 in range(0, z, cz):
        for y0 in range(0, y, cy):
            for x0 in range(0, x, cx):
                np.stack([tifffile.imread(f)[y0:y0 + cy, x0:x0 + cx] for f in files[z0:z0 + cz]])
    naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in files:
        tifffile.imread(f)
    return naive, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 1024, 1024], metavar=("Z", "Y", "X"))
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, default=None, help="server worker threads (default: its own)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bil-bench-") as tmp:
        data, static_dir = Path(tmp) / "bench", Path(tmp) / "static"
        data.mkdir()
        volume = make_slices(data, tuple(args.shape))
        voxels = volume.size
        print(f"dataset: {' x '.join(map(str, args.shape))} uint16, {len(list(data.iterdir()))} uncompressed "
              f"TIFF slices; concurrency {args.concurrency}")
        procs = []
        try:
            # (b) cold first, on a fresh server
            proc, base = start_server(data, args.workers)
            procs.append(proc)
            keys, levels = chunk_keys(base)
            cold0, bodies = asyncio.run(fetch_all(base, keys[0], args.concurrency))
            check_chunks(bodies, volume, levels[0])
            cold_rest, more = asyncio.run(fetch_all(base, [k for lv in keys[1:] for k in lv], args.concurrency))
            bodies.update(more)
            naive, once = tifffile_baselines(sorted(data.iterdir()), levels[0])

            # (a) warm: the same server, everything cached; baseline serves the same bytes from disk
            all_keys = [k for lv in keys for k in lv]
            warm, _ = asyncio.run(fetch_all(base, all_keys, args.concurrency))
            for key, body in bodies.items():
                (static_dir / key).parent.mkdir(parents=True, exist_ok=True)
                (static_dir / key).write_bytes(body)
            port = free_port()
            procs.append(start([sys.executable, "-c", STATIC_SERVER, str(static_dir), str(port)], port,
                               "/ds/bench/zarr/0/.zarray"))
            static, _ = asyncio.run(fetch_all(f"http://127.0.0.1:{port}", all_keys, args.concurrency))
        finally:
            for p in procs:
                p.terminate()
                p.wait(10)

    n_all, mb = len(all_keys), sum(map(len, bodies.values())) / 1e6
    print(f"\n{'measurement':52s} {'seconds':>8s} {'chunks/s':>9s} {'Mvoxel/s':>9s}")
    rows = [
        ("(a) warm, bil-transform, all levels", warm, n_all, None),
        ("(a) warm, aiohttp static files, same bytes", static, n_all, None),
        ("(b) cold, bil-transform, level 0", cold0, len(keys[0]), voxels),
        ("(b) cold, bil-transform, levels 1+ (pyramid)", cold_rest, n_all - len(keys[0]), None),
        ("(b) tifffile, level-0 chunk regions, naive loop", naive, len(keys[0]), voxels),
        ("(b) tifffile, every slice read once", once, None, voxels),
    ]
    for name, secs, n, vox in rows:
        per = f"{n / secs:9.1f}" if n else " " * 9
        mvox = f"{vox / secs / 1e6:9.1f}" if vox else " " * 9
        print(f"{name:52s} {secs:8.2f} {per} {mvox}")
    print(f"\nwarm: {mb / warm:.0f} MB/s served vs {mb / static:.0f} MB/s static")
    print("ratios (higher is better for bil-transform):")
    print(f"  warm throughput / static-file throughput        {static / warm:6.2f}")
    print(f"  cold level 0 vs naive tifffile region loop     {naive / cold0:6.2f}")
    print(f"  cold level 0 vs reading every slice once       {once / cold0:6.2f}")
    print(f"  full pyramid (levels 1+) time / level-0 time   {cold_rest / cold0:6.2f}  (lower is better)")


if __name__ == "__main__":
    main()
