"""Every performance target of issue #11 in one run, each against its baseline measured in the same run.

Why: the server is rewritten for speed while it is measured; one command that measures every row the
same way, on the same machine at the same time as its baseline, keeps the figures comparable.

Data: the demo (256 x 1024 x 1024 uint16 TIFF slices, made once by `bil_transform.demo.make_demo`) and a
tiled BigTIFF written from its first 128 slices (256 x 256 tiles, zlib). Every server is a separate
`python -m bil_transform serve --config CATALOG` process on a loopback port; "cold" means a fresh process
(empty chunk cache) while the OS page cache holds the source files (read once before the first run).

Each round runs every measurement the chosen rows need once, contenders next to their baselines (the
order reversed in every other round, against drift); a row's ratio is the ratio of the medians over
--repeat rounds. The client shares the machine's cores with the server, as on a workstation.

Run: python benchmarks/run_all.py [--rows 1,2,...] [--repeat N] [--markdown FILE] [--data-dir DIR]
Row 1 needs the test extra (neuroglancer, playwright) and Debian's chromium, as the test suite does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numcodecs
import numpy as np
import requests
import tifffile
from serve_throughput import fetch_urls, free_port, start, stop

from bil_transform.demo import DEMO_VOXEL, make_demo

MB = 1e6
TARGETS = {
    1: ("Neuroglancer first screen, cold / static files", "<= 1.5x both"),
    2: ("coldest request: coarsest chunk of the demo", "<= 2x floor, >= 3x faster than LocalVolume"),
    3: ("cold level 0, floor / server time", ">= 0.8x both"),
    4: ("source bytes read per level-0 voxel byte (slices)", "<= 1.1"),
    5: ("cold whole pyramid / cold level 0 (slices)", "<= 1.25x"),
    6: ("warm req/s, precomputed / zarr (client decodes)", ">= 0.9x"),
    7: ("cold all levels, precomputed / zarr time (neither client decodes)", "<= 1.1x"),
    8: ("peak RSS, 200 clients x one cached shard, 64MiB cache", "<= cache + 300 MB"),
    9: ("peak RSS streaming the pyramid, cache = data / 10", "<= cache + 300 MB"),
}
# what each row needs measured in every round; shared measurements run once per round
NEEDS = {1: ["first_screen"], 2: ["coarse_server", "coarse_floor", "coarse_localvolume"],
         3: ["l0_demo", "floor_demo", "l0_tiled", "floor_tiled"], 4: ["l0_demo"], 5: ["l0_demo", "all_zarr"],
         6: ["warm"], 7: ["all_zarr", "all_precomputed"], 8: ["shard_rss"], 9: ["stream_rss"]}
ORDER = ["coarse_server", "coarse_floor", "coarse_localvolume", "l0_demo", "floor_demo", "all_zarr",
         "all_precomputed", "l0_tiled", "floor_tiled", "warm", "first_screen", "shard_rss", "stream_rss"]

# neuroglancer.LocalVolume over a dask stack of delayed tifffile.imread, served by neuroglancer's own server
LOCAL_VOLUME = """
import glob, json, sys, time
import dask, dask.array as da, neuroglancer, tifffile
files = sorted(glob.glob(sys.argv[1]))
page = tifffile.TiffFile(files[0]).pages[0]
lazy = da.stack([da.from_delayed(dask.delayed(tifffile.imread)(f), page.shape, page.dtype) for f in files])
neuroglancer.set_server_bind_address("127.0.0.1")
space = neuroglancer.CoordinateSpace(names=["z", "y", "x"], units="um", scales=json.loads(sys.argv[2]))
volume = neuroglancer.LocalVolume(lazy, dimensions=space, volume_type="image", encoding="npz")
viewer = neuroglancer.Viewer()
with viewer.txn() as s:
    s.layers["demo"] = neuroglancer.ImageLayer(source=volume)
url = f"{neuroglancer.server.get_server_url()}/neuroglancer/npz/{viewer.volume_manager.get_volume_key(volume)}"
print(json.dumps({"url": url, "shape": list(lazy.shape), "max_downsampling": volume.max_downsampling,
                  "max_downsampled_size": volume.max_downsampled_size}), flush=True)
while True:
    time.sleep(3600)
"""


# ---------------------------------------------------------------------------------------------- the machine

def machine() -> str:
    """CPU model, cores, load and the busiest processes: what else competed for the cores."""
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    others = [line.split(None, 1)[1] for line in ps.splitlines()[1:] if line.split()[0] != str(os.getpid())]
    busy = "; ".join(" ".join(line.split()) for line in others[:4])
    return f"{model}, {os.cpu_count()} cores; loadavg {load}; busiest (%cpu rss_kB name): {busy}"


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, in case the server ever forks workers."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for children in Path(f"/proc/{p}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                todo += [int(c) for c in children.read_text().split()]
    return out


def read_chars(pid: int) -> int:
    """Bytes the process tree got from read() calls (/proc/PID/io rchar): files, but sockets too."""
    total = 0
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            total += int(next(line.split()[1] for line in Path(f"/proc/{p}/io").read_text().splitlines()
                              if line.startswith("rchar:")))
    return total


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in bytes, from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) * 1024 for k in ("VmRSS", "VmHWM")}


class RssSampler:
    """Polls VmRSS every 10 ms in a thread: a cross-check of VmHWM."""

    def __init__(self, pid: int):
        self.pid, self.peak, self._done = pid, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(0.01):
            with contextlib.suppress(OSError, KeyError):  # KeyError: the process has exited
                self.peak = max(self.peak, memory(self.pid)["VmRSS"])

    def stop(self) -> int:
        self._done.set()
        self._thread.join()
        return self.peak


def run_async(coro):
    """asyncio.run in a thread of its own: playwright's sync API keeps an event loop in the main thread."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def cache_misses(base: str) -> int:
    text = requests.get(f"{base}/metrics", timeout=30).text
    return int(sum(float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("bil_transform_cache_misses_total{")))


# --------------------------------------------------------------------------------------------- the data

def write_tiled(files: list[Path], path: Path) -> None:
    """A tiled, zlib-compressed BigTIFF from the first 128 demo slices (one page per z)."""
    volume = np.stack([tifffile.imread(f) for f in files[:128]])
    tifffile.imwrite(path, volume, bigtiff=True, tile=(256, 256), compression="zlib", photometric="minisblack")


class Source:
    """Plane reader of a dataset's source, for the floors and the checks (one TiffFile per thread)."""

    def __init__(self, path: Path):
        self.path = path
        self.files = sorted(path.glob("slice_*.tif")) if path.is_dir() else []
        with tifffile.TiffFile(self.files[0] if self.files else path) as tif:
            self.plane, self.dtype = tif.pages[0].shape, tif.pages[0].dtype
            self.depth = len(self.files) or len(tif.pages)
        self._local = threading.local()

    def read(self, z: int) -> np.ndarray:
        if self.files:
            return tifffile.imread(self.files[z], maxworkers=1)
        if not hasattr(self._local, "tif"):
            self._local.tif = tifffile.TiffFile(self.path)
        return self._local.tif.pages[z].asarray(maxworkers=1)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.depth, *self.plane)


# ------------------------------------------------------------------------------------- the measurements

@dataclass
class Bench:
    """What the measurements share: the catalog, metadata read once, samples by name."""
    args: argparse.Namespace
    stack: contextlib.ExitStack
    tmp: Path
    catalog: Path
    sources: dict[str, Source]
    meta: dict = field(default_factory=dict)  # dataset -> levels, zarray, precomputed info
    samples: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    notes: dict[str, str] = field(default_factory=dict)  # printed under the table
    details: dict[str, str] = field(default_factory=dict)  # printed in the table
    warm_base: str | None = None
    screens: object = None  # neuroglancer_first_screen.FirstScreens, made on first use
    coarse_chunk: np.ndarray | None = None  # the server's coarsest chunk, checked against the floor's mean

    def serve(self, stack: contextlib.ExitStack, cache_size: int | str = "4GiB") -> tuple[subprocess.Popen, str]:
        """A fresh server (stopped when `stack` closes): its process and base URL."""
        port = free_port()
        cmd = [sys.executable, "-m", "bil_transform", "serve", "--config", str(self.catalog), "--port", str(port),
               "--cache-size", str(cache_size)]
        cmd += ["--workers", str(self.args.workers)] if self.args.workers else []
        return start(stack, cmd, port, "/healthz", self.tmp / "server.log"), f"http://127.0.0.1:{port}"

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def fetch(self, urls: list[str], **kw) -> tuple[float, int, dict[str, bytes]]:
        return run_async(fetch_urls(urls, self.args.concurrency, **kw))

    # -- metadata and keys

    def read_meta(self) -> None:
        """Levels, codecs and precomputed scales of both datasets, from a throwaway server."""
        with contextlib.ExitStack() as s:
            _, base = self.serve(s)
            for ds in self.sources:
                doc = requests.get(f"{base}/api/datasets/{ds}", timeout=60).json()
                zarray = requests.get(f"{base}/ds/{ds}/zarr/0/.zarray", timeout=60).json()
                info = requests.get(f"{base}/ds/{ds}/precomputed/info", timeout=60).json()
                self.meta[ds] = {"doc": doc, "zarray": zarray, "info": info}

    def zarr_urls(self, base: str, ds: str, levels: range | None = None, view: str = "zarr") -> list[str]:
        """Every chunk URL of the given levels (default all), level by level, x fastest."""
        doc = self.meta[ds]["doc"]
        nt, nc = doc["shape"][:2]
        out = []
        for i, lvl in enumerate(doc["levels"]):
            if levels is not None and i not in levels:
                continue
            gz, gy, gx = (-(-s // c) for s, c in zip(lvl["shape"], lvl["chunks"]))
            out += [f"{base}/ds/{ds}/{view}/{i}/{t}/{c}/{z}/{y}/{x}" for t in range(nt) for c in range(nc)
                    for z in range(gz) for y in range(gy) for x in range(gx)]
        return out

    def precomputed_urls(self, base: str, ds: str) -> list[str]:
        """Every chunk URL of every precomputed scale (edge chunks clipped), scale by scale, x fastest."""
        out = []
        for scale in self.meta[ds]["info"]["scales"]:
            (sx, sy, sz), (ox, oy, oz), (cx, cy, cz) = scale["size"], scale["voxel_offset"], scale["chunk_sizes"][0]
            for z in range(oz, oz + sz, cz):
                for y in range(oy, oy + sy, cy):
                    for x in range(ox, ox + sx, cx):
                        out.append(f"{base}/ds/{ds}/precomputed/{scale['key']}/{x}-{min(x + cx, ox + sx)}_"
                                   f"{y}-{min(y + cy, oy + sy)}_{z}-{min(z + cz, oz + sz)}")
        return out

    def zarr_decoder(self, ds: str) -> Callable[[str, bytes], np.ndarray]:
        zarray = self.meta[ds]["zarray"]
        codec = numcodecs.get_codec(zarray["compressor"]) if zarray["compressor"] else None
        dtype, shape = np.dtype(zarray["dtype"]), zarray["chunks"][2:]

        def decode(url: str, body: bytes) -> np.ndarray:
            return np.frombuffer(codec.decode(body) if codec else body, dtype).reshape(shape)
        return decode

    def check_level0(self, base: str, ds: str, round_: int) -> None:
        """Level-0 chunks of one z block (a different one each round) must equal the source voxels."""
        src, zarray = self.sources[ds], self.meta[ds]["zarray"]
        cz, cy, cx = zarray["chunks"][2:]
        gz, gy, gx = (-(-s // c) for s, c in zip(src.shape, (cz, cy, cx)))
        bz = round_ % gz
        block = np.stack([src.read(z) for z in range(bz * cz, min((bz + 1) * cz, src.depth))])
        decode = self.zarr_decoder(ds)
        for by, bx in ((0, 0), (gy // 2, gx // 2), (gy // 2, gx // 3), (gy - 1, gx - 1)):
            body = requests.get(f"{base}/ds/{ds}/zarr/0/0/0/{bz}/{by}/{bx}", timeout=120).content
            want = block[:, by * cy:(by + 1) * cy, bx * cx:(bx + 1) * cx]
            got = decode("", body)[:want.shape[0], :want.shape[1], :want.shape[2]]
            if not np.array_equal(got, want):
                raise AssertionError(f"{ds}: level-0 chunk {bz}/{by}/{bx} differs from the source voxels")

    # -- row 1

    def first_screen(self, round_: int) -> None:
        """Cold and static first screens of both views (neuroglancer_first_screen.FirstScreens)."""
        if self.screens is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from neuroglancer_browser import Browser
            from neuroglancer_first_screen import FirstScreens
            browser = Browser()
            self.stack.callback(browser.close)
            self.screens = FirstScreens(self.stack, browser, self.catalog, self.tmp)
        for view in ("precomputed", "zarr"):
            times = self.screens.round(view)
            self.samples[f"ng_cold_{view}"].append(times["cold"])
            self.samples[f"ng_static_{view}"].append(times["static"])
            print(f"    first screen {view}: cold {times['cold']:.2f} s, warm {times['warm']:.2f} s, "
                  f"static {times['static']:.2f} s", flush=True)

    # -- row 2

    def coarse_server(self, round_: int) -> None:
        """A fresh server's first request: the coarsest level's chunk, from request to full body."""
        levels = self.meta["demo"]["doc"]["levels"]
        with contextlib.ExitStack() as s:
            _, base = self.serve(s)
            t0 = time.perf_counter()
            r = requests.get(f"{base}/ds/demo/zarr/{len(levels) - 1}/0/0/0/0/0", timeout=600)
            seconds = time.perf_counter() - t0
            r.raise_for_status()
        self.samples["coarse_server"].append(seconds)
        self.coarse_chunk = self.zarr_decoder("demo")("", r.content)
        print(f"    coarsest chunk, fresh server: {seconds:.2f} s", flush=True)

    def coarse_floor(self, round_: int) -> None:
        """Read every slice once and reduce it at once to the coarsest level's shape: the sum over each
        window accumulated in 64 bits, then one rounded mean (what one reshape-mean computes)."""
        src = self.sources["demo"]
        shape = self.meta["demo"]["doc"]["levels"][-1]["shape"]
        (fz, fy, fx), (cy, cx) = (a // b for a, b in zip(src.shape, shape)), shape[1:]
        assert all(a == b * f for a, b, f in zip(src.shape, shape, (fz, fy, fx))), "needs an exact reduction"
        t0 = time.perf_counter()
        acc = np.zeros(shape, np.uint64)
        for z in range(src.depth):
            acc[z // fz] += src.read(z).reshape(cy, fy, cx, fx).sum(axis=(1, 3), dtype=np.uint64)
        n = fz * fy * fx
        coarse = ((acc + n // 2) // n).astype(src.dtype)
        seconds = time.perf_counter() - t0
        self.samples["coarse_floor"].append(seconds)
        if self.coarse_chunk is not None:
            got = self.coarse_chunk[:shape[0], :shape[1], :shape[2]].astype(np.int64)
            diff = int(np.abs(got - coarse).max())
            self.notes["coarse_diff"] = f"server's coarsest chunk vs the one-step mean: max |diff| {diff}"
            if diff > 3:  # the server averages level by level, rounding at each
                raise AssertionError(f"the server's coarsest chunk differs from the mean by up to {diff}")
        print(f"    coarsest level floor (read every slice + reduce): {seconds:.2f} s", flush=True)

    def coarse_localvolume(self, round_: int) -> None:
        """neuroglancer.LocalVolume in its own process: every chunk of the coarsest scale the viewer would use."""
        src = self.sources["demo"]
        voxel = list(DEMO_VOXEL)
        with contextlib.ExitStack() as s:
            proc = subprocess.Popen([sys.executable, "-c", LOCAL_VOLUME, str(src.path / "slice_*.tif"),
                                     json.dumps(voxel)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            s.callback(stop, proc)
            if not select.select([proc.stdout], [], [], 120)[0]:
                raise RuntimeError("the neuroglancer LocalVolume server did not start")
            desc = json.loads(proc.stdout.readline())
            factors = ng_downsample_levels(desc["shape"], voxel, desc["max_downsampling"],
                                           desc["max_downsampled_size"])[-1]
            shape = [-(-n // f) for n, f in zip(desc["shape"], factors)]
            chunk = ng_chunk_shape([v * f for v, f in zip(voxel, factors)])
            urls = []
            for z in range(0, shape[0], chunk[0]):
                for y in range(0, shape[1], chunk[1]):
                    for x in range(0, shape[2], chunk[2]):
                        lo, hi = (z, y, x), [min(a + c, n) for a, c, n in zip((z, y, x), chunk, shape)]
                        urls.append(f"{desc['url']}/{','.join(map(str, factors))}/{','.join(map(str, lo))}/"
                                    f"{','.join(map(str, hi))}")
            seconds, nbytes, _ = run_async(fetch_urls(urls, len(urls)))
        self.samples["coarse_localvolume"].append(seconds)
        self.notes["localvolume"] = (f"LocalVolume coarsest scale {'x'.join(map(str, shape))} (factors "
                                     f"{'x'.join(map(str, factors))}), {len(urls)} chunks of "
                                     f"{'x'.join(map(str, chunk))}, all requested at once")
        print(f"    LocalVolume coarsest scale: {seconds:.2f} s for {len(urls)} chunks", flush=True)

    # -- rows 3, 4, 5, 7

    def level0(self, ds: str, round_: int) -> None:
        """A fresh server serves every level-0 chunk of /zarr; also the bytes it read meanwhile."""
        with contextlib.ExitStack() as s:
            proc, base = self.serve(s)
            urls = self.zarr_urls(base, ds, range(1))
            before = read_chars(proc.pid)
            seconds, nbytes, _ = self.fetch(urls)
            read = read_chars(proc.pid) - before
            self.check_level0(base, ds, round_)
        voxel_bytes = math.prod(self.sources[ds].shape) * self.sources[ds].dtype.itemsize
        self.samples[f"l0_{ds}"].append(seconds)
        self.samples[f"read_{ds}"].append(read / voxel_bytes)
        print(f"    {ds} cold level 0: {seconds:.2f} s, {len(urls)} chunks, {nbytes / MB:.0f} MB; read "
              f"{read / MB:.0f} MB = {read / voxel_bytes:.2f} x the voxel bytes; chunks match the source", flush=True)

    def floor(self, ds: str, round_: int) -> None:
        """Decode every plane once and blosc-encode every 64^3 chunk once, on all cores, in-process."""
        src = self.sources[ds]
        chunk = self.meta[ds]["zarray"]["chunks"][2:]
        codec = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
        origins = [(z, y, x) for z in range(0, src.shape[0], chunk[0]) for y in range(0, src.shape[1], chunk[1])
                   for x in range(0, src.shape[2], chunk[2])]

        def encode(origin: tuple[int, int, int]) -> int:
            block = np.zeros(chunk, src.dtype)  # the server pads edge chunks to the full chunk shape
            part = volume[tuple(slice(o, o + c) for o, c in zip(origin, chunk))]
            block[:part.shape[0], :part.shape[1], :part.shape[2]] = part
            return len(codec.encode(block))

        def decode(z: int) -> None:
            volume[z] = src.read(z)

        with ThreadPoolExecutor(os.cpu_count()) as pool:
            t0 = time.perf_counter()
            volume = np.empty(src.shape, src.dtype)
            list(pool.map(decode, range(src.depth)))
            nbytes = sum(pool.map(encode, origins))
            seconds = time.perf_counter() - t0
        self.samples[f"floor_{ds}"].append(seconds)
        print(f"    {ds} floor (decode once + encode every chunk, {os.cpu_count()} threads): {seconds:.2f} s, "
              f"{len(origins)} chunks, {nbytes / MB:.0f} MB", flush=True)

    def l0_demo(self, r: int) -> None:
        self.level0("demo", r)

    def l0_tiled(self, r: int) -> None:
        self.level0("tiled", r)

    def floor_demo(self, r: int) -> None:
        self.floor("demo", r)

    def floor_tiled(self, r: int) -> None:
        self.floor("tiled", r)

    def all_zarr(self, round_: int) -> None:
        """A fresh server serves every chunk of every level of /zarr, level 0 first."""
        with contextlib.ExitStack() as s:
            _, base = self.serve(s)
            urls = self.zarr_urls(base, "demo")
            seconds, nbytes, _ = self.fetch(urls)
        self.samples["all_zarr"].append(seconds)
        print(f"    demo cold all levels, zarr: {seconds:.2f} s, {len(urls)} chunks, {nbytes / MB:.0f} MB", flush=True)

    def all_precomputed(self, round_: int) -> None:
        """A fresh server serves every chunk of every scale of /precomputed, gzip accepted as clients do.
        Like the zarr pass, the client does not decode: this row compares the two views' server side
        (row 6 includes the clients' decoding, where gzip's inflate costs precomputed clients)."""
        with contextlib.ExitStack() as s:
            _, base = self.serve(s)
            urls = self.precomputed_urls(base, "demo")
            seconds, nbytes, _ = self.fetch(urls)  # aiohttp accepts gzip; auto_decompress is off
        self.samples["all_precomputed"].append(seconds)
        print(f"    demo cold all levels, precomputed: {seconds:.2f} s, {len(urls)} chunks, {nbytes / MB:.0f} MB "
              "(gzip, not decoded)", flush=True)

    # -- row 6

    def warm(self, round_: int) -> None:
        """One server kept for the whole run, every chunk of both views cached; one timed pass of each view,
        the client decoding every body (blosc for zarr; gzip undone by aiohttp, then the raw voxels)."""
        if self.warm_base is None:
            _, self.warm_base = self.serve(self.stack)
            base = self.warm_base
            zarr = self.fetch(self.zarr_urls(base, "demo"))[0]
            pre = self.fetch(self.precomputed_urls(base, "demo"), auto_decompress=True)[0]
            print(f"    warm server filled: zarr {zarr:.2f} s, precomputed {pre:.2f} s", flush=True)
            level0 = self.meta["demo"]["doc"]["levels"][0]["chunks"]
            decode = self.zarr_decoder("demo")
            key = self.meta["demo"]["info"]["scales"][0]["key"]
            for (z, y, x) in ((0, 0, 0), (1, 7, 9), (3, 15, 15)):  # level-0 chunks, both views: the same voxels
                cz, cy, cx = level0
                p = requests.get(f"{base}/ds/demo/precomputed/{key}/{x * cx}-{(x + 1) * cx}_{y * cy}-{(y + 1) * cy}_"
                                 f"{z * cz}-{(z + 1) * cz}", timeout=60).content
                q = requests.get(f"{base}/ds/demo/zarr/0/0/0/{z}/{y}/{x}", timeout=60).content
                if not np.array_equal(np.frombuffer(p, "<u2").reshape(level0), decode("", q)):
                    raise AssertionError(f"precomputed and zarr level-0 chunk {z}/{y}/{x} differ")
        base = self.warm_base
        dtype = np.dtype(self.meta["demo"]["zarray"]["dtype"])
        decode_zarr = self.zarr_decoder("demo")

        def decode_precomputed(url: str, body: bytes) -> np.ndarray:
            ranges = [tuple(map(int, r.split("-"))) for r in url.rsplit("/", 1)[1].split("_")]
            return np.frombuffer(body, dtype).reshape([b - a for a, b in reversed(ranges)])

        misses = cache_misses(base)
        passes = [("zarr", self.zarr_urls(base, "demo"), decode_zarr, False),
                  ("precomputed", self.precomputed_urls(base, "demo"), decode_precomputed, True)]
        for view, urls, decode, gzip in passes[::-1 if round_ % 2 else 1]:
            seconds, _, _ = self.fetch(urls, decode=decode, auto_decompress=gzip)
            self.samples[f"warm_{view}"].append(len(urls) / seconds)
            print(f"    warm {view}: {len(urls) / seconds:.0f} req/s ({len(urls)} chunks in {seconds:.2f} s)",
                  flush=True)
        self.notes["warm_misses"] = f"cache misses during the timed warm passes: {cache_misses(base) - misses}"

    # -- rows 8, 9

    def shard_rss(self, round_: int) -> None:
        """200 concurrent clients fetch one cached level-0 shard of /zarr3-sharded from a 64 MiB-cache server."""
        cache = 64 * 2**20
        clients = 200
        with contextlib.ExitStack() as s:
            proc, base = self.serve(s, cache)
            url = f"{base}/ds/demo/zarr3-sharded/0/c/0/0/0/1/1"
            size = len(requests.get(url, timeout=600).content)  # warms it
            misses = cache_misses(base)
            before = memory(proc.pid)
            with contextlib.suppress(OSError):  # reset VmHWM to the current RSS (Linux >= 4.0)
                Path(f"/proc/{proc.pid}/clear_refs").write_text("5")
            sampler = RssSampler(proc.pid)
            try:
                seconds, sizes = run_async(stream_many(url, clients))
            finally:
                sampled = sampler.stop()
            after = memory(proc.pid)
            recomputed = cache_misses(base) - misses
        if set(sizes) != {size}:
            raise AssertionError(f"shard bodies of {set(sizes)} bytes, not {size}")
        self.samples["shard_peak"].append(after["VmHWM"])
        self.samples["shard_limit"].append(cache + 300 * MB)
        self.details["shard"] = (f"shard {size / MB:.1f} MB, {clients} clients in {seconds:.1f} s; VmRSS before "
                               f"{before['VmRSS'] / MB:.0f} MB (VmHWM after warm-up {before['VmHWM'] / MB:.0f} MB, "
                               f"then reset); {recomputed} cache misses meanwhile")
        print(f"    one shard x {clients}: peak {after['VmHWM'] / MB:.0f} MB (sampled {sampled / MB:.0f} MB), "
              f"{self.details['shard']}", flush=True)

    def stream_rss(self, round_: int) -> None:
        """A fresh server with a cache of a tenth of the level-0 bytes streams every chunk of every level."""
        src = self.sources["demo"]
        cache = math.prod(src.shape) * src.dtype.itemsize // 10
        with contextlib.ExitStack() as s:
            proc, base = self.serve(s, cache)
            sampler = RssSampler(proc.pid)
            try:
                seconds, nbytes, _ = self.fetch(self.zarr_urls(base, "demo"))
            finally:
                sampled = sampler.stop()
            peak = memory(proc.pid)["VmHWM"]
        self.samples["stream_peak"].append(peak)
        self.samples["stream_limit"].append(cache + 300 * MB)
        self.details["stream"] = f"cache {cache / MB:.0f} MB, whole pyramid in {seconds:.1f} s"
        print(f"    whole pyramid, cache {cache / MB:.0f} MB: peak {peak / MB:.0f} MB (sampled {sampled / MB:.0f} MB), "
              f"{seconds:.1f} s", flush=True)


async def stream_many(url: str, clients: int) -> tuple[float, list[int]]:
    """`clients` concurrent GETs of `url`, each body read in 1 MiB pieces and dropped (a bounded client)."""
    async def one(session: aiohttp.ClientSession) -> int:
        n = 0
        async with session.get(url) as r:
            r.raise_for_status()
            async for piece in r.content.iter_chunked(2**20):
                n += len(piece)
        return n

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:
        t0 = time.perf_counter()
        sizes = await asyncio.gather(*(one(session) for _ in range(clients)))
        return time.perf_counter() - t0, list(sizes)


def ng_downsample_levels(shape: list[int], voxel: list[float], max_downsampling: float = 64,
                         max_downsampled_size: float = 128) -> list[tuple[int, ...]]:
    """Neuroglancer's own choice of scales for a python:// volume (computeNearIsotropicDownsamplingLevels in
    src/datasource/python/frontend.ts, ported), so the baseline serves what the viewer would ask for."""
    factors, product, levels = [1] * len(shape), 1, [tuple([1] * len(shape))]
    while product < max_downsampling and not all(s / f <= max_downsampled_size for s, f in zip(shape, factors)):
        small = 0
        for i in range(1, len(shape)):
            if factors[i] * voxel[i] < factors[small] * voxel[small]:
                small = i
        factors[small] *= 2
        product *= 2
        target = factors[small] * voxel[small]
        for i in range(len(shape)):
            if product >= max_downsampling:
                break
            effective = factors[i] * voxel[i]
            if i != small and abs(effective - target) > abs(effective * 2 - target):
                factors[i] *= 2
                product *= 2
        levels.append(tuple(factors))
    return levels


def ng_chunk_shape(voxel: list[float], log2_voxels: int = 18) -> list[int]:
    """Neuroglancer's default chunk: 2^18 voxels, as near physically isotropic as powers of two allow."""
    chunk = [1] * len(voxel)
    for _ in range(log2_voxels):
        i = min(range(len(voxel)), key=lambda d: (chunk[d] * voxel[d], -d))  # ties: the faster-varying axis
        chunk[i] *= 2
    return chunk


# ------------------------------------------------------------------------------------------------ the table

def rows(b: Bench, chosen: list[int]) -> list[tuple[int, str, str, str, bool]]:
    """(row, what, target, measured, passed) from the medians."""
    m, out = b.median, []
    for row in chosen:
        what, target = TARGETS[row]
        if row == 1:
            r = {v: m(f"ng_cold_{v}") / m(f"ng_static_{v}") for v in ("precomputed", "zarr")}
            text = ", ".join(f"{v} {r[v]:.2f}x ({m(f'ng_cold_{v}'):.2f} s / {m(f'ng_static_{v}'):.2f} s)" for v in r)
            out.append((row, what, target, text, max(r.values()) <= 1.5))
        elif row == 2:
            floor, lv = m("coarse_server") / m("coarse_floor"), m("coarse_localvolume") / m("coarse_server")
            text = (f"{floor:.2f}x floor ({m('coarse_server'):.2f} s / {m('coarse_floor'):.2f} s); LocalVolume "
                    f"{m('coarse_localvolume'):.2f} s = {lv:.2f}x the server's time")
            out.append((row, what, target, text, floor <= 2 and lv >= 3))
        elif row == 3:
            r = {ds: m(f"floor_{ds}") / m(f"l0_{ds}") for ds in ("tiled", "demo")}
            text = ", ".join(f"{'tiled BigTIFF' if ds == 'tiled' else 'slices'} {r[ds]:.2f}x ({m(f'floor_{ds}'):.2f} s"
                             f" / {m(f'l0_{ds}'):.2f} s)" for ds in r)
            out.append((row, what, target, text, min(r.values()) >= 0.8))
        elif row == 4:
            text = f"{m('read_demo'):.2f} (rchar, counts socket reads too)"
            out.append((row, what, target, text, m("read_demo") <= 1.1))
        elif row == 5:
            r = m("all_zarr") / m("l0_demo")
            out.append((row, what, target, f"{r:.2f}x ({m('all_zarr'):.2f} s / {m('l0_demo'):.2f} s)", r <= 1.25))
        elif row == 6:
            r = m("warm_precomputed") / m("warm_zarr")
            text = f"{r:.2f}x ({m('warm_precomputed'):.0f} / {m('warm_zarr'):.0f} req/s)"
            out.append((row, what, target, text, r >= 0.9))
        elif row == 7:
            r = m("all_precomputed") / m("all_zarr")
            text = f"{r:.2f}x ({m('all_precomputed'):.2f} s / {m('all_zarr'):.2f} s)"
            out.append((row, what, target, text, r <= 1.1))
        elif row in (8, 9):
            key = "shard" if row == 8 else "stream"
            peak, limit = max(b.samples[f"{key}_peak"]), b.samples[f"{key}_limit"][0]
            text = f"peak {peak / MB:.0f} MB (max of runs) vs limit {limit / MB:.0f} MB; {b.details[key]}"
            out.append((row, what, target, text, peak <= limit))
    return out


def print_table(table: list, header: str) -> str:
    lines = [header, "", "| row | what | target | measured | |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r} | {what} | {target} | {text} | {'PASS' if ok else 'MISS'} |"
              for r, what, target, text, ok in table]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(map(str, TARGETS)), help="rows to measure, e.g. 2,3 (default all)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; every ratio is of medians (default 3)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight for the chunk passes")
    parser.add_argument("--workers", type=int, default=None, help="server worker threads (default: its own)")
    parser.add_argument("--data-dir", help="where the demo data is kept (default: the demo's own cache)")
    parser.add_argument("--markdown", help="also write the table as markdown to this file")
    args = parser.parse_args()
    chosen = sorted({int(r) for r in args.rows.split(",")})
    if not set(chosen) <= set(TARGETS) or args.repeat < 1 or args.concurrency < 1:
        parser.error(f"--rows takes numbers from 1 to {len(TARGETS)}; --repeat and --concurrency positive")
    needed = [name for name in ORDER if any(name in NEEDS[r] for r in chosen)]
    started = time.perf_counter()
    at_start = machine()
    print(f"start: {at_start}", flush=True)
    demo = make_demo(Path(args.data_dir) if args.data_dir else None)
    with tempfile.TemporaryDirectory(prefix="bil-bench-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        tiled = tmp / "tiled.tif"
        t0 = time.perf_counter()
        write_tiled(sorted(demo.glob("slice_*.tif")), tiled)
        catalog = tmp / "catalog.toml"
        catalog.write_text(f'[[datasets]]\nid = "demo"\npath = "{demo}"\n\n[[datasets]]\nid = "tiled"\n'
                           f'path = "{tiled}"\n')
        b = Bench(args, stack, tmp, catalog, {"demo": Source(demo), "tiled": Source(tiled)})
        for src in b.sources.values():  # into the OS page cache: every run below sees the same warm files
            for path in src.files or [src.path]:
                path.read_bytes()
        b.read_meta()
        os.sync()
        print(f"data: demo {'x'.join(map(str, b.sources['demo'].shape))} uint16 slices ({demo}); tiled BigTIFF "
              f"{'x'.join(map(str, b.sources['tiled'].shape))} (256x256 zlib tiles, {tiled.stat().st_size / MB:.0f} MB,"
              f" written in {time.perf_counter() - t0:.1f} s); demo levels "
              + ", ".join("x".join(map(str, lv["shape"])) for lv in b.meta["demo"]["doc"]["levels"]), flush=True)
        for round_ in range(args.repeat):
            print(f"round {round_ + 1}/{args.repeat} (loadavg {' '.join(f'{v:.2f}' for v in os.getloadavg())})",
                  flush=True)
            for name in needed[::-1] if round_ % 2 else needed:
                getattr(b, name)(round_)
        table = rows(b, chosen)
    minutes = (time.perf_counter() - started) / 60
    header = (f"bil-transform benchmarks (benchmarks/run_all.py --rows {','.join(map(str, chosen))} --repeat "
              f"{args.repeat}), {minutes:.1f} min\n\nstart: {at_start}\n\nend: {machine()}")
    text = print_table(table, header)
    notes = "\n".join(f"- {v}" for v in b.notes.values())
    text += f"\nmedians of {args.repeat} rounds; notes:\n{notes}\n" if notes else ""
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
