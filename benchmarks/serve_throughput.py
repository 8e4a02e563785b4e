"""Chunk throughput of the OME-Zarr view of a TIFF slice stack, against baselines measured in the same run.

Why: the server computes every chunk on request, so the two questions are what that costs
compared with serving precomputed files, and compared with reading the source yourself.

(a) Warm: every chunk of every level is fetched once (filling the cache), then all are
    fetched again and timed (best of --repeat passes). Baseline: the very same response bodies
    written to disk under the same keys and served by aiohttp's static file handler, fetched
    the same way.
(b) Cold: a fresh server process (empty chunk cache; the OS page cache still holds the
    slices) serves every level-0 chunk, then every chunk of the other levels, which are
    downsampled from cached level-0 blocks (each the best of --repeat fresh processes).
    Baselines, in-process: read each level-0 chunk region with tifffile the naive way (whole
    slice, then crop), and read every slice once in full (the I/O + decode floor for
    touching all the data).

Level-0 chunks are checked against the written voxels; static and cold-computed bodies must
equal the warm ones (compared after the timed passes, which keep no bodies). Client and
servers share the machine's cores, as they would on a workstation.

Run: python benchmarks/serve_throughput.py [--shape Z Y X] [--concurrency N] [--workers N] [--repeat N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numcodecs
import numpy as np
import requests
import tifffile

DATASET = "bench"  # the slice directory's name, which the server uses as the dataset id
STATIC_SERVER = """
import sys
from aiohttp import web
app = web.Application()
app.add_routes([web.static(sys.argv[3], sys.argv[1])])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""


@dataclass
class Row:
    name: str
    seconds: float
    chunks: int | None = None  # HTTP responses
    nbytes: int | None = None  # response body bytes
    voxels: int | None = None  # voxels delivered (unpadded)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def start(stack: contextlib.ExitStack, cmd: list[str], port: int, ready: str, log: Path,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `cmd` (stopped when `stack` closes) and wait until GET `ready` answers 200."""
    with log.open("wb") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, env=env)
    stack.callback(stop, proc)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(requests.ConnectionError):
            if requests.get(f"http://127.0.0.1:{port}{ready}", timeout=2).status_code == 200:
                return proc
        time.sleep(0.1)
    raise RuntimeError(f"{' '.join(cmd[:4])} did not become ready; its stderr:\n{log.read_text()[-2000:]}")


def start_server(stack: contextlib.ExitStack, data: Path, workers: int | None, log: Path) -> tuple[
        subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "bil_transform", "serve", str(data), "--port", str(port), "--cache-size", "4GiB"]
    cmd += ["--workers", str(workers)] if workers else []
    return start(stack, cmd, port, "/healthz", log), f"http://127.0.0.1:{port}"


def make_slices(root: Path, shape: tuple[int, int, int]) -> np.ndarray:
    """Uncompressed uint16 slices (the usual fMOST/STPT layout): smooth 3-D Gaussian blobs plus shot noise."""
    rng = np.random.default_rng(0)
    z, y, x = shape
    n = 24
    centres = rng.uniform(0, 1, (n, 3)) * shape
    sigmas = rng.uniform(0.04, 0.12, (n, 1)) * shape
    amps = rng.uniform(500, 3000, n)
    gy = [np.exp(-0.5 * ((np.arange(y) - c[1]) / s[1]) ** 2).astype(np.float32) for c, s in zip(centres, sigmas)]
    gx = [np.exp(-0.5 * ((np.arange(x) - c[2]) / s[2]) ** 2).astype(np.float32) for c, s in zip(centres, sigmas)]
    volume = np.empty(shape, np.uint16)
    for i in range(z):
        plane = np.full((y, x), 200, np.float32)
        for b in range(n):
            wz = amps[b] * np.exp(-0.5 * ((i - centres[b, 0]) / sigmas[b, 0]) ** 2)
            if wz > 1:
                plane += np.float32(wz) * np.outer(gy[b], gx[b])
        volume[i] = np.minimum(rng.poisson(plane), 65535)
        tifffile.imwrite(root / f"slice_{i:05d}.tif", volume[i])
    return volume


def chunk_keys(base: str, dataset: str = DATASET) -> tuple[list[list[str]], list[dict]]:
    """Every chunk key of every level, from the dataset's own metadata."""
    doc = requests.get(f"{base}/api/datasets/{dataset}", timeout=30).json()
    nt, nc = doc["shape"][:2]
    keys = []
    for i, lvl in enumerate(doc["levels"]):
        gz, gy, gx = (-(-s // c) for s, c in zip(lvl["shape"], lvl["chunks"]))
        keys.append([f"{i}/{t}/{c}/{z}/{y}/{x}" for t in range(nt) for c in range(nc)
                     for z in range(gz) for y in range(gy) for x in range(gx)])
    return keys, doc["levels"]


async def fetch_urls(urls: list[str], concurrency: int, keep: bool = False, decode=None,
                     auto_decompress: bool = False) -> tuple[float, int, dict[str, bytes]]:
    """GET every URL with `concurrency` requests in flight: seconds, body bytes, and the bodies (by URL) if
    `keep`. `decode(url, body)`, if given, runs on every body inside the timed pass (a client that uses the
    data). Timed passes drop each body at once: holding hundreds of MB of fresh bodies makes the client
    page-fault new memory, which costs more than serving them."""
    bodies: dict[str, bytes] = {}
    total = 0
    queue = list(reversed(urls))
    timeout = aiohttp.ClientTimeout(total=600)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal total
        while queue:
            url = queue.pop()
            async with session.get(url) as r:
                if r.status != 200:
                    raise RuntimeError(f"GET {url}: HTTP {r.status} {await r.text()}")
                body = await r.read()
            total += len(body)
            if decode is not None:
                decode(url, body)
            if keep:
                bodies[url] = body

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=auto_decompress) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return time.perf_counter() - t0, total, bodies


async def fetch_all(base: str, keys: list[str], concurrency: int, keep: bool = False,
                    root: str = f"/ds/{DATASET}/zarr") -> tuple[float, int, dict[str, bytes]]:
    """GET base + root/KEY for every key (see fetch_urls); the bodies are keyed by KEY."""
    prefix = f"{base}{root}/"
    seconds, total, bodies = await fetch_urls([prefix + k for k in keys], concurrency, keep)
    return seconds, total, {url.removeprefix(prefix): body for url, body in bodies.items()}


def best_of(runs: int, base: str, keys: list[str], concurrency: int) -> float:
    """The fastest of `runs` timed passes over `keys` (every response already cached or on disk)."""
    return min(asyncio.run(fetch_all(base, keys, concurrency))[0] for _ in range(runs))


def check_level0(base: str, bodies: dict[str, bytes], volume: np.ndarray, count: int = 8) -> None:
    """Decode `count` level-0 chunks spread over the grid and compare them with the written voxels."""
    zarray = requests.get(f"{base}/ds/{DATASET}/zarr/0/.zarray", timeout=30).json()
    codec = numcodecs.get_codec(zarray["compressor"]) if zarray["compressor"] else None
    cz, cy, cx = zarray["chunks"][2:]
    keys = sorted(k for k in bodies if k.startswith("0/"))
    for key in keys[:: max(1, len(keys) // count)] + keys[-1:]:
        z, y, x = map(int, key.split("/")[3:])
        raw = codec.decode(bodies[key]) if codec else bodies[key]
        chunk = np.frombuffer(raw, np.dtype(zarray["dtype"])).reshape(cz, cy, cx)
        want = volume[z * cz:(z + 1) * cz, y * cy:(y + 1) * cy, x * cx:(x + 1) * cx]
        if not np.array_equal(chunk[:want.shape[0], :want.shape[1], :want.shape[2]], want):
            raise AssertionError(f"level-0 chunk {key} differs from the source voxels")


def tifffile_baselines(files: list[Path], level0: dict) -> tuple[float, float]:
    """Seconds to read every level-0 chunk region naively (whole slices, cropped), and to read every slice once.
    Each crop is copied out at once: a list of crops would keep whole slices alive (views), and
    allocating that memory afresh for every chunk costs ~5x more than the reads themselves."""
    (z, y, x), (cz, cy, cx) = level0["shape"], level0["chunks"]
    t0 = time.perf_counter()
    for z0 in range(0, z, cz):
        for y0 in range(0, y, cy):
            for x0 in range(0, x, cx):
                out = np.empty((min(cz, z - z0), min(cy, y - y0), min(cx, x - x0)), np.uint16)
                for i, f in enumerate(files[z0:z0 + cz]):
                    out[i] = tifffile.imread(f)[y0:y0 + cy, x0:x0 + cx]
    naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    for f in files:
        tifffile.imread(f)
    return naive, time.perf_counter() - t0


def report(rows: dict[str, Row]) -> None:
    print(f"\n{'measurement':50s} {'seconds':>8s} {'chunks/s':>9s} {'MB/s':>8s} {'Mvox/s':>8s}")
    for r in rows.values():
        cols = [f"{r.chunks / r.seconds:9.1f}" if r.chunks else " " * 9,
                f"{r.nbytes / r.seconds / 1e6:8.1f}" if r.nbytes else " " * 8,
                f"{r.voxels / r.seconds / 1e6:8.1f}" if r.voxels else " " * 8]
        print(f"{r.name:50s} {r.seconds:8.2f} {' '.join(cols)}")
    s = {k: r.seconds for k, r in rows.items()}
    print("\nratios")
    print(f"  warm throughput, bil-transform / static files    {s['static'] / s['warm']:7.2f}  (1: as fast as files)")
    print(f"  cold level-0 time, server / naive tifffile loop  {s['cold0'] / s['naive']:7.2f}  (<1: server faster)")
    print(f"  cold level-0 time, server / every slice once     {s['cold0'] / s['once']:7.2f}  (the floor is ~1)")
    print(f"  levels 1+ time / cold level-0 time               {s['pyramid'] / s['cold0']:7.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 1024, 1024], metavar=("Z", "Y", "X"))
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--workers", type=int, default=None, help="server worker threads (default: its own)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed warm passes, and cold server restarts; the best counts (default 3)")
    args = parser.parse_args()
    if args.repeat < 1 or args.concurrency < 1 or min(args.shape) < 1:
        parser.error("--repeat, --concurrency and --shape must be positive")
    rows: dict[str, Row] = {}
    with tempfile.TemporaryDirectory(prefix="bil-bench-") as tmp, contextlib.ExitStack() as stack:
        data, static_dir = Path(tmp) / DATASET, Path(tmp) / "static"
        data.mkdir()
        t0 = time.perf_counter()
        volume = make_slices(data, tuple(args.shape))
        files = sorted(data.iterdir())
        os.sync()  # write back now, not during a timed pass
        print(f"dataset: {' x '.join(map(str, args.shape))} uint16 ({volume.nbytes / 2**20:.0f} MiB), {len(files)} "
              f"uncompressed TIFF slices, written in {time.perf_counter() - t0:.1f} s; "
              f"concurrency {args.concurrency}, server workers {args.workers or 'default'}", flush=True)

        # (a) warm: fill the cache, then time; the same bytes from static files as the baseline
        proc, base = start_server(stack, data, args.workers, Path(tmp) / "server-warm.log")
        keys, levels = chunk_keys(base)
        all_keys = [k for lv in keys for k in lv]
        level_voxels = [int(np.prod(lv["shape"])) for lv in levels]
        all_voxels = sum(level_voxels)
        print(f"levels: {', '.join('x'.join(map(str, lv['shape'])) for lv in levels)}; {len(all_keys)} chunks "
              f"of {'x'.join(map(str, levels[0]['chunks']))}", flush=True)
        warmup, nbytes, bodies = asyncio.run(fetch_all(base, all_keys, args.concurrency, keep=True))
        check_level0(base, bodies, volume)
        print(f"warm-up (computes everything): {warmup:.2f} s, {nbytes / 1e6:.0f} MB of chunks; "
              "level-0 chunks match the source", flush=True)
        warm = best_of(args.repeat, base, all_keys, args.concurrency)
        rows["warm"] = Row("(a) warm  bil-transform, all levels", warm, len(all_keys), nbytes, all_voxels)
        stop(proc)
        for key, body in bodies.items():
            (static_dir / key).parent.mkdir(parents=True, exist_ok=True)
            (static_dir / key).write_bytes(body)
        os.sync()
        port = free_port()
        prefix = f"/ds/{DATASET}/zarr"
        static_proc = start(stack, [sys.executable, "-c", STATIC_SERVER, str(static_dir), str(port), prefix], port,
                            f"{prefix}/{all_keys[0]}", Path(tmp) / "static.log")
        static_base = f"http://127.0.0.1:{port}"
        if asyncio.run(fetch_all(static_base, all_keys, args.concurrency, keep=True))[2] != bodies:
            raise AssertionError("the static server returned different bytes")
        static = best_of(args.repeat, static_base, all_keys, args.concurrency)
        rows["static"] = Row("(a) warm  aiohttp static files, same bytes", static, len(all_keys), nbytes, all_voxels)
        stop(static_proc)
        print(f"warm, best of {args.repeat}: {warm:.2f} s served, {static:.2f} s static", flush=True)

        # (b) cold: a fresh process each time, level 0 first, then the pyramid above it
        rest = all_keys[len(keys[0]):]
        cold0 = pyramid = float("inf")
        for run in range(args.repeat):
            proc, base = start_server(stack, data, args.workers, Path(tmp) / "server-cold.log")
            seconds0, n0, _ = asyncio.run(fetch_all(base, keys[0], args.concurrency))
            seconds_rest, n_rest, _ = asyncio.run(fetch_all(base, rest, args.concurrency))
            # what this server computed, now from its cache, must be what the warm one served
            if asyncio.run(fetch_all(base, all_keys, args.concurrency, keep=True))[2] != bodies:
                raise AssertionError("a cold server computed different bytes than the warm one")
            stop(proc)
            cold0, pyramid = min(cold0, seconds0), min(pyramid, seconds_rest)
            print(f"cold run {run + 1}: level 0 {seconds0:.2f} s, levels 1+ {seconds_rest:.2f} s (same bytes as warm)",
                  flush=True)
        rows["cold0"] = Row("(b) cold  bil-transform, level 0", cold0, len(keys[0]), n0, level_voxels[0])
        rows["pyramid"] = Row(f"(b) cold  bil-transform, levels 1-{len(levels) - 1}", pyramid, len(rest), n_rest,
                              all_voxels - level_voxels[0])
        naive, once = tifffile_baselines(files, levels[0])
        rows["naive"] = Row("(b) tifffile, level-0 chunk regions (naive loop)", naive, voxels=level_voxels[0])
        rows["once"] = Row("(b) tifffile, every slice read once in full", once, voxels=level_voxels[0])
    report(rows)


if __name__ == "__main__":
    main()
