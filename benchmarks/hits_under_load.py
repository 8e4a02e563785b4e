"""Cache hits under cold load (issue 13): does the every-2-s check of a dataset's files make a cached
chunk wait behind cold chunk work, or get shed with 503?

The defect: the check of a dataset's files ran in the same worker queue as chunk decoding, so under
load a request for a cached chunk that fell due for a check waited behind every queued cold chunk
(p95 1.7 s, 0.1 s with checks off) and, with the queue full, was shed with 503. Fixed: the check
runs off the chunk queue and never blocks a hit.

Data (written once into --data-dir): "big", uint16 TIFF slices (default 256 x 1024 x 1024) whose
level-0 and level-1 chunks are the cold work, and "small", a few slices whose first chunk is
warmed first and then requested over and over as "the cached chunk".

Each run starts a fresh server (`PYTHONPATH=TREE python -m bil_transform serve --config CATALOG
--recheck R`, only flags every build knows), warms the cached chunk, then for --duration seconds
runs --clients cold clients (a separate process, distinct keys of levels 0 and 1 in a shuffled
order, view zarr-gzip; a 503 makes a client wait its Retry-After) while --hit-clients clients
request the cached chunk, each every --hit-interval seconds. Every cached-chunk request's latency
and status is recorded; a 200's body must equal the warmed one. The server's peak RSS is its
VmHWM at the end of the run.

Configurations (before/after build x checks on (--recheck) / off (--recheck 1e9)) are interleaved
within each of --repeat rounds, the order reversed every other round; the summary gives medians
over rounds and after/before ratios of p95. The clients share the machine's cores with the
server; the load average and the busiest other processes are printed with every run.

Run: python benchmarks/hits_under_load.py [--before TREE] [--after TREE] [--duration S]
     [--clients N] [--hit-clients M] [--repeat R] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import numpy as np
import requests
import tifffile
from serve_throughput import free_port, start

CHECKS_OFF = 1e9  # --recheck for "checks off": never due within a run
# the costliest zarr codec to encode first: every cold chunk keeps a worker busy longest. Should the keys run
# out, later passes take the next view (the blocks are then cached: only encoding is left, a lighter load)
COLD_VIEWS = ["zarr-gzip", "zarr3-gzip", "zarr-zstd", "zarr3-zstd"]


# ---------------------------------------------------------------------------------------------- the machine

def machine() -> str:
    """Load average and the busiest other processes: what else competed for the cores."""
    load = Path("/proc/loadavg").read_text().split()[:3]
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    others = [" ".join(line.split()[1:])[:70] for line in ps.splitlines()[1:] if line.split()[0] != str(os.getpid())]
    return f"loadavg {' '.join(load)}; busiest (%cpu rss_kB args): {'; '.join(others[:3])}"


def peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


# --------------------------------------------------------------------------------------------- the data

def write_data(root: Path, big: tuple[int, int, int]) -> Path:
    """The two datasets and their catalog, unless a previous run left them complete."""
    catalog = root / "catalog.toml"
    done = root / f"complete-{'x'.join(map(str, big))}"
    if done.exists():
        return catalog
    rng = np.random.default_rng(13)
    z, y, x = big
    t0 = time.perf_counter()
    for name, shape in (("big", big), ("small", (16, 96, 96))):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        # smooth structure plus noise: chunks compress like microscopy, not like zeros
        yy, xx = np.ogrid[:shape[1], :shape[2]]
        base = (1000 + 800 * np.sin(yy / 37.0) * np.cos(xx / 23.0)).astype(np.float32)
        for i in range(shape[0]):
            plane = base * (1 + 0.3 * np.sin(i / 9.0)) + rng.normal(0, 120, shape[1:]).astype(np.float32)
            tifffile.imwrite(d / f"slice_{i:05d}.tif", np.clip(plane, 0, 65535).astype(np.uint16))
    catalog.write_text('[[datasets]]\nid = "big"\npath = "big"\nvoxel_size = [1.0, 1.0, 1.0]\n\n'
                       '[[datasets]]\nid = "small"\npath = "small"\nvoxel_size = [1.0, 1.0, 1.0]\n')
    os.sync()  # written back now, not during a timed run
    done.touch()
    print(f"data: big {z} x {y} x {x} uint16 ({z * y * x * 2 / 2**20:.0f} MiB) and small 16 x 96 x 96, "
          f"TIFF slices in {root}, written in {time.perf_counter() - t0:.1f} s", flush=True)
    return catalog


# ------------------------------------------------------------------------------------------- the server

def start_server(stack: contextlib.ExitStack, tree: Path | None, catalog: Path, recheck: float,
                 args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    """A fresh server from `tree` (None: the installed package) on a loopback port, stopped when
    `stack` closes; its process and base URL."""
    port = free_port()
    env = dict(os.environ)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree.resolve()), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, "-m", "bil_transform", "serve", "--config", str(catalog), "--host", "127.0.0.1",
           "--port", str(port), "--cache-size", args.cache_size, "--recheck", repr(recheck)]
    cmd += ["--workers", str(args.workers)] if args.workers else []
    return start(stack, cmd, port, "/healthz", log, env), f"http://127.0.0.1:{port}"


def cold_keys(base: str) -> list[str]:
    """Every chunk key of levels 0 and 1 of "big" (the dataset's own metadata)."""
    doc = requests.get(f"{base}/api/datasets/big", timeout=60).json()
    nt, nc = doc["shape"][:2]
    keys = []
    for i, lvl in enumerate(doc["levels"][:2]):
        gz, gy, gx = (-(-s // c) for s, c in zip(lvl["shape"], lvl["chunks"]))
        keys += [f"{i}/{t}/{c}/{z}/{y}/{x}" for t in range(nt) for c in range(nc)
                 for z in range(gz) for y in range(gy) for x in range(gx)]
    return keys


# ------------------------------------------------------------------------------------------- the clients

def cold_load(base: str, keys: list[str], clients: int, until: float, out) -> None:
    """In a process of its own: `clients` clients GET distinct cold chunks until `until` (time.time()); a
    shed request's key is asked again later. Puts (done, shed, errors, passes over the keys) on `out`."""

    async def main() -> tuple[int, int, int, int]:
        todo: list[str] = []
        done = shed = errors = passes = 0

        async def client(session: aiohttp.ClientSession) -> None:
            nonlocal done, shed, errors, passes
            while time.time() < until:
                if not todo:
                    if passes == len(COLD_VIEWS):
                        return
                    todo.extend(f"{base}/ds/big/{COLD_VIEWS[passes]}/{k}" for k in reversed(keys))
                    passes += 1
                url = todo.pop()
                try:
                    async with session.get(url) as r:
                        await r.read()
                        if r.status == 503:
                            shed += 1
                            todo.insert(0, url)
                            await asyncio.sleep(max(0.0, min(float(r.headers.get("Retry-After", "1")),
                                                             until - time.time())))
                        elif r.status == 200:
                            done += 1
                        else:
                            errors += 1
                except (TimeoutError, aiohttp.ClientError):
                    errors += 1

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                         auto_decompress=False) as session:
            tasks = [asyncio.ensure_future(client(session)) for _ in range(clients)]
            # requests still waiting at the deadline are abandoned: the run is over
            await asyncio.wait(tasks, timeout=max(0.0, until - time.time()) + 0.5)
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return done, shed, errors, passes

    out.put(asyncio.run(main()))


@dataclass
class Run:
    label: str
    latencies: list[float] = field(default_factory=list)  # seconds, every cached-chunk request
    statuses: dict = field(default_factory=dict)  # status (or "error") -> count
    shed_with_retry_after: int = 0
    cold_done: int = 0
    cold_shed: int = 0
    cold_errors: int = 0
    cold_passes: int = 0
    rss: int = 0
    load: str = ""

    def pct(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        return float(np.percentile(self.latencies, q))


async def hit_load(url: str, want: bytes, clients: int, interval: float, until: float, run: Run) -> None:
    """`clients` clients GET the cached chunk, each every `interval` s, until `until` (time.time()). Open
    loop: a request is sent on time even while the client's earlier ones still wait, so a stalled hit
    does not hide the ones that would have stalled behind it (no coordinated omission)."""

    async def one(session: aiohttp.ClientSession) -> None:
        t0 = time.perf_counter()
        try:
            async with session.get(url) as r:
                body = await r.read()
                status = r.status
                if status == 200 and body != want:
                    raise AssertionError(f"the cached chunk came back with other bytes ({len(body)} bytes)")
                if status == 503 and "Retry-After" in r.headers:
                    run.shed_with_retry_after += 1
        except (TimeoutError, aiohttp.ClientError):
            status = "error"
        run.latencies.append(time.perf_counter() - t0)
        run.statuses[status] = run.statuses.get(status, 0) + 1

    async def client(session: aiohttp.ClientSession, offset: float, sent: list) -> None:
        t = time.perf_counter() + offset
        while time.time() < until:
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            sent.append(asyncio.ensure_future(one(session)))
            t += interval

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout,
                                     auto_decompress=False) as session:
        sent: list = []
        await asyncio.gather(*(client(session, interval * i / clients, sent) for i in range(clients)))
        await asyncio.gather(*sent)  # the last ones, answered after the load stopped, count too


def one_run(label: str, tree: Path | None, recheck: float, catalog: Path, args: argparse.Namespace,
            seed: int) -> Run:
    run = Run(label)
    with contextlib.ExitStack() as stack:
        proc, base = start_server(stack, tree, catalog, recheck, args,
                                  args.data_dir / f"server-{label.replace(' ', '_')}.log")

        hit_url = f"{base}/ds/small/zarr/0/0/0/0/0/0"
        want = requests.get(hit_url, timeout=60).content  # warmed: every later request is a cache hit
        if requests.get(hit_url, timeout=60).content != want:
            raise AssertionError("the cached chunk is not stable")
        keys = cold_keys(base)
        random.Random(seed).shuffle(keys)
        until = time.time() + 1.0 + args.duration  # the cold clients connect during the first second
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        cold = ctx.Process(target=cold_load, args=(base, keys, args.clients, until, out), daemon=True)
        cold.start()
        time.sleep(max(0.0, until - args.duration - time.time()))
        asyncio.run(hit_load(hit_url, want, args.hit_clients, args.hit_interval, until, run))
        run.load = machine()
        run.cold_done, run.cold_shed, run.cold_errors, run.cold_passes = out.get(timeout=120)
        cold.join(30)
        if proc.poll() is not None:
            raise RuntimeError(f"{label}: the server died during the run")
        run.rss = peak_rss(proc.pid)
    return run


# ------------------------------------------------------------------------------------------------ report

HEADER = (f"{'configuration':24s} {'hits':>6s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'max ms':>8s} "
          f"{'503':>5s} {'err':>4s} {'cold ok':>7s} {'cold 503':>8s} {'RSS MB':>7s}")


def row(label: str, hits: float, p50: float, p95: float, p99: float, worst: float, shed: float, err: float,
        cold: float, cold_shed: float, rss: float) -> str:
    return (f"{label:24s} {hits:6.0f} {p50 * 1e3:8.1f} {p95 * 1e3:8.1f} {p99 * 1e3:8.1f} {worst * 1e3:8.0f} "
            f"{shed:5.0f} {err:4.0f} {cold:7.0f} {cold_shed:8.0f} {rss / 1e6:7.0f}")


def run_row(r: Run) -> str:
    shed = r.statuses.get(503, 0)
    err = sum(n for s, n in r.statuses.items() if s not in (200, 503)) + r.cold_errors
    return row(r.label, len(r.latencies), r.pct(50), r.pct(95), r.pct(99), max(r.latencies, default=float("nan")),
               shed, err, r.cold_done, r.cold_shed, r.rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=None, metavar="TREE",
                        help="source tree of the build before the fix (e.g. a git worktree); left out: "
                             "only --after is measured")
    parser.add_argument("--after", "--tree", dest="after", type=Path, default=None, metavar="TREE",
                        help="source tree of the build to measure (default: the installed package)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load per run (default 20)")
    parser.add_argument("--clients", type=int, default=640,
                        help="cold clients; above the server's queue limit (256 per worker) they fill the "
                             "queue, so queued work is shed (default 640)")
    parser.add_argument("--hit-clients", type=int, default=8, help="clients of the cached chunk (default 8)")
    parser.add_argument("--hit-interval", type=float, default=0.05,
                        help="seconds between one hit client's requests (default 0.05)")
    parser.add_argument("--recheck", type=float, default=2.0, help="--recheck with checks on (default 2)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of every configuration (default 3)")
    parser.add_argument("--shape", type=int, nargs=3, default=[384, 1024, 1024], metavar=("Z", "Y", "X"))
    parser.add_argument("--cache-size", default="2GiB", help="server --cache-size (default 2GiB)")
    parser.add_argument("--workers", type=int, default=None, help="server --workers (default: its own)")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/bench-hits"),
                        help="where the data is written once and server logs go (default /tmp/bench-hits)")
    args = parser.parse_args()
    if min(args.duration, args.clients, args.hit_clients, args.repeat, args.hit_interval, *args.shape) <= 0:
        parser.error("--duration, --clients, --hit-clients, --hit-interval, --repeat and --shape must be positive")
    args.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = write_data(args.data_dir, tuple(args.shape))

    builds = ([("before", args.before)] if args.before else []) + [("after", args.after)]
    configs = [(f"{name} checks {'on' if recheck != CHECKS_OFF else 'off'}", tree, recheck)
               for name, tree in builds for recheck in (args.recheck, CHECKS_OFF)]
    print(f"{os.cpu_count()} cores; {machine()}", flush=True)
    shown = ", ".join(f"{n} = {t or 'installed package'}" for n, t in builds)
    print(f"builds: {shown}; {args.duration:g} s per "
          f"run, {args.clients} cold clients ({COLD_VIEWS[0]}, levels 0-1 of big, shuffled), {args.hit_clients} "
          f"hit clients every {args.hit_interval:g} s; checks on = --recheck {args.recheck:g}, off = --recheck "
          f"{CHECKS_OFF:g}; --cache-size {args.cache_size}, workers {args.workers or 'server default'}", flush=True)
    runs: dict[str, list[Run]] = {label: [] for label, _, _ in configs}
    for rnd in range(args.repeat):
        order = configs if rnd % 2 == 0 else configs[::-1]
        print(f"\nround {rnd + 1}/{args.repeat}\n{HEADER}", flush=True)
        for label, tree, recheck in order:
            r = one_run(label, tree, recheck, catalog, args, seed=rnd)
            runs[label].append(r)
            print(f"{run_row(r)}   [{r.load.split(';')[0]}]", flush=True)
            if r.cold_passes > 1:
                views = ", ".join(COLD_VIEWS[:r.cold_passes])
                print(f"  note: the cold keys ran out; {r.cold_passes} passes (views {views}), later ones only "
                      "encode: raise --shape for cold work all the way", flush=True)

    def med(label: str, fn) -> float:
        return statistics.median(fn(r) for r in runs[label])

    print(f"\nmedians over {args.repeat} rounds\n{HEADER}")
    for label, _, _ in configs:
        print(row(label, med(label, lambda r: len(r.latencies)), med(label, lambda r: r.pct(50)),
                  med(label, lambda r: r.pct(95)), med(label, lambda r: r.pct(99)),
                  med(label, lambda r: max(r.latencies)), med(label, lambda r: r.statuses.get(503, 0)),
                  med(label, lambda r: sum(n for s, n in r.statuses.items() if s not in (200, 503))),
                  med(label, lambda r: r.cold_done), med(label, lambda r: r.cold_shed), med(label, lambda r: r.rss)))
    totals = {label: (sum(r.statuses.get(503, 0) for r in rs), sum(r.shed_with_retry_after for r in rs))
              for label, rs in runs.items()}
    print("\ncached-chunk 503s over all rounds (of which with Retry-After): "
          + "; ".join(f"{k} {n} ({ra})" for k, (n, ra) in totals.items()))
    if args.before:
        print("ratios (medians), after / before")
        for state in ("on", "off"):
            a, b = f"after checks {state}", f"before checks {state}"
            p95a, p95b = med(a, lambda r: r.pct(95)), med(b, lambda r: r.pct(95))
            print(f"  cached-chunk p95, checks {state:3s}  {p95a / p95b:7.3f}  "
                  f"({p95a * 1e3:.1f} / {p95b * 1e3:.1f} ms)")
    for name, _ in builds:
        on, off = med(f"{name} checks on", lambda r: r.pct(95)), med(f"{name} checks off", lambda r: r.pct(95))
        print(f"  {name}: p95 checks on / checks off  {on / off:7.3f}")
    print(f"end: {machine()}")


if __name__ == "__main__":
    main()
