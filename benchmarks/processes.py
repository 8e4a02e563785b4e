"""What `serve --processes N` and `--workers N` buy on this machine, against one process with its default
threads measured in the same round (issue 15, point 1).

Why: a server process runs Python under one GIL, so its event loop (every cache hit, every HTTP
exchange) uses at most one core, whatever --workers says; several processes on one port
(SO_REUSEPORT) each bring their own GIL, but also their own memory cache, and the kernel spreads
*connections*, not requests, over them. Configurations (`--configs`):
  1p    1 process, default threads (cores / processes): the baseline of every ratio
  1p4t  1 process, --workers 4
  1p8t  1 process, --workers 8
  2p    --processes 2 (default threads: cores / 2 each)
  4p    --processes 4
every one with --cache-size 4GiB in all (shared out among the processes) and no disk tier.

Data: a synthetic stack written by serve_throughput.make_slices (default 128 x 1024 x 1024 uint16,
uncompressed TIFF slices, dataset "bench") for (a), (b) and the sizes; the demo (256 x 1024 x 1024,
`bil_transform.demo.make_demo`, dataset "demo") for the Neuroglancer first screens (c), (d) and the disk
tier's size. Both are read once first, so the OS page cache holds them in every run.

(a) warm requests/s: every chunk of every level of /zarr in every process's memory cache. Each
    process is warmed deterministically: connections are opened until each process holds four (the
    process owning a connection is found in /proc: the server-side socket's inode in its fd table),
    and every chunk is fetched over each process's own connections. The timed pass then GETs every
    chunk --warm-passes times with 8 and 32 requests in flight (`--concurrency`), one aiohttp
    connection per request in flight (TCPConnector limit), bodies not decoded. /metrics must show no
    chunk-cache miss and no eviction during the timed passes. The connections each process held in
    the timed pass are counted (/proc, half-way through) and printed: that is SO_REUSEPORT's balance.
    CPU time per request, of the server's processes together and of the client, from /proc: on a
    shared machine it moves less than requests/s. Then VmRSS/VmHWM of every server process (and of
    the supervising parent) from /proc.
(b) cold chunks/s: a fresh server, every level-0 chunk, then every chunk of the levels above
    (`--cold-concurrency` in flight, default 8); rates are level 0 alone and all levels together.
    Also the server's CPU seconds, and the source bytes its processes read
    (bil_transform_source_bytes_total, summed over the processes) per level-0 byte: each process
    reads (and keeps) the source itself, and one asked for a coarser chunk whose level-0 blocks
    another process decoded decodes them again.
(c) cold first screen: the real Neuroglancer viewer (tests/neuroglancer_browser.py: the package's
    client in headless Debian chromium, 4-panel layout, 800 x 600, a fresh browser context) opens the
    demo as zarr:// (and as precomputed:// with `--views zarr,precomputed`) on a fresh server.
    "drawn" is Neuroglancer's own every-visible-chunk-drawn signal (from opening the page);
    "fetched" is when the page saw the last chunk response (from just before opening; playwright
    delivers events in 50 ms polls, so it is late by up to ~50 ms). Chromium sends the requests over
    at most 6 connections, as a person's browser would.
(d) disk tier, 2 processes: a fresh --disk-cache directory; a server shows the zarr first screen
    (cold, writing the tier) and stops; a restarted server shows it again (the tier holds that view's
    chunks); a restarted server shows the precomputed first screen (the tier holds the zarr view's
    encoded chunks and the blocks of the computed levels, but no precomputed chunk);
    a restarted server shows the precomputed screen again (now the tier holds its chunks: what
    persisting would give at best). Ratios are against the cold 2-process screen of the same view
    without a disk tier, in the same round. Blocks computed and disk hits come from /metrics.
(e) the disk tier's size (du) after every /zarr chunk of the demo, then every /precomputed chunk
    too, went through a 2-process server; once, after the rounds.

Each round runs every configuration once, the order reversed every other round, each contender next to
its baseline; printed figures are medians over --repeat rounds, ratios the medians of the per-round
ratios to 1p. Correctness: all requests must answer 200; level-0 chunks of every warm server are
compared with the written voxels (serve_throughput.check_level0) and every chunk body of every
configuration with the 1p server's; the disk-restarted servers' first-screen chunks with a no-disk
server's; a server's log must hold no traceback and its processes must exit when it is stopped.
The client (one Python process, aiohttp) and the browser share the machine's cores with the server.
Every server runs a copy of the bil_transform package taken at the start (PYTHONPATH), so a tree edited
during the run cannot mix two versions of the code into one table.

Run: python benchmarks/processes.py [--repeat N] [--only a,b,c,d,e] [--configs 1p,2p,...] [--views zarr,precomputed]
     [--shape Z Y X] [--concurrency 8,32] [--cold-concurrency N] [--warm-passes N] [--data-dir DIR]
(c) and (d) need the test extra (neuroglancer, playwright) and Debian's chromium, as the test suite does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import requests
from run_all import Bench, descendants, machine, memory, run_async
from serve_throughput import DATASET, check_level0, chunk_keys, fetch_urls, free_port, make_slices, start

import bil_transform
from bil_transform.demo import make_demo

MB = 1e6
CONFIGS = {  # name: (label, --processes, --workers)
    "1p": ("1 process, default threads", 1, None),
    "1p4t": ("1 process, 4 threads", 1, 4),
    "1p8t": ("1 process, 8 threads", 1, 8),
    "2p": ("2 processes", 2, None),
    "4p": ("4 processes", 4, None),
}
BASELINE = "1p"
CACHE_SIZE = "4GiB"  # in all, shared out among the processes
PINNED = 4  # connections per process for the warm-up
VIEWS = ("zarr", "precomputed")
DISK_CASES = {  # name: (label, view)
    "d_cold": ("cold, empty disk tier (writes it)", "zarr"),
    "d_zarr": ("restarted, tier holds the zarr view's chunks", "zarr"),
    "d_pre_zarronly": ("restarted, tier holds zarr chunks + blocks", "precomputed"),
    "d_pre": ("restarted, tier holds precomputed chunks too", "precomputed"),
}


# ----------------------------------------------------------------------------- server processes and sockets

def tcp_sockets() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket (state 0A listen, 01 established)."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        out.append((int(f[1].split(":")[1], 16), int(f[2].split(":")[1], 16), f[3], int(f[9])))
    return out


def socket_inodes(pid: int) -> set[int]:
    out = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    out.add(int(link[8:-1]))
    return out


def connection_owners(port: int, pids: list[int]) -> dict[int, int]:
    """Client port -> the server process holding that accepted connection to `port`."""
    established = {inode: remote for local, remote, state, inode in tcp_sockets() if local == port and state == "01"}
    owners = {}
    for pid in pids:
        for inode in socket_inodes(pid) & established.keys():
            owners[established[inode]] = pid
    return owners


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    pids: list[int]  # the processes that accept connections (the parent itself when there is one process)
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metric(self, name: str, settle: bool = True, **labels: str) -> float:
        """A /metrics value summed over its samples matching `labels` (and over the processes: the server
        sums them). With several processes each mirrors its values every second: wait for that first."""
        if settle and len(self.pids) > 1:
            time.sleep(1.2)
        total = 0.0
        for line in requests.get(f"{self.base}/metrics", timeout=60).text.splitlines():
            m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
            if m and m.group(1) == name:
                have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
                if all(have.get(k) == v for k, v in labels.items()):
                    total += float(m.group(3))
        return total

    def memory(self) -> dict[str, dict[str, int]]:
        out = {str(pid): memory(pid) for pid in self.pids}
        if self.pids != [self.proc.pid]:
            out["parent"] = memory(self.proc.pid)
        return out


def server_pids(proc: subprocess.Popen, port: int, n: int) -> list[int]:
    """The processes under `proc` holding a listening socket on `port`, once there are `n` of them."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listening = {inode for local, _, state, inode in tcp_sockets() if local == port and state == "0A"}
        pids = sorted(p for p in descendants(proc.pid) if socket_inodes(p) & listening)
        if len(pids) == n:
            return pids
        if len(pids) > n:
            raise RuntimeError(f"{len(pids)} processes listen on port {port}, {n} were asked for")
        time.sleep(0.1)
    raise RuntimeError(f"only {pids} of {n} server processes listen on port {port} after 60 s")


def pin(server: Server, per_process: int) -> dict[int, list[http.client.HTTPConnection]]:
    """`per_process` open keep-alive connections held by each server process: connections are opened
    (each answering GET /healthz) until every process holds enough; the others are closed. A process that
    gets no connection out of 50 per process is a server fault."""
    pinned: dict[int, list[http.client.HTTPConnection]] = {pid: [] for pid in server.pids}
    tries = 0
    while any(len(c) < per_process for c in pinned.values()):
        tries += 1
        if tries > 50 * per_process * len(server.pids):
            for conns in pinned.values():
                for c in conns:
                    c.close()
            raise RuntimeError(f"after {tries - 1} connections the server processes hold "
                               f"{ {p: len(c) for p, c in pinned.items()} }: a process gets no connections")
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"GET /healthz answered {r.status}")
        pid = connection_owners(server.port, server.pids).get(conn.sock.getsockname()[1])
        if pid is None:
            raise RuntimeError(f"no server process {server.pids} holds connection {conn.sock.getsockname()}")
        if len(pinned[pid]) < per_process:
            pinned[pid].append(conn)
        else:
            conn.close()
    return pinned


def snapshot_code(tmp: Path) -> dict[str, str]:
    """Copy the bil_transform package into `tmp` and return the environment that makes servers run that copy:
    every configuration of a run then measures the same code, even if the tree is edited meanwhile."""
    live = Path(bil_transform.__file__).parent
    shutil.copytree(live, tmp / "src" / "bil_transform", ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(tmp / "src")}
    where = subprocess.run([sys.executable, "-c", "import bil_transform; print(bil_transform.__file__)"], env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    if not where.startswith(str(tmp / "src")):
        raise RuntimeError(f"the servers would import {where}, not the snapshot")
    newest = max(f.stat().st_mtime for f in live.rglob("*.py"))
    print(f"server code: a copy of {live} taken {time.strftime('%H:%M:%S')} (newest file there modified "
          f"{time.strftime('%H:%M:%S', time.localtime(newest))})", flush=True)
    return env


def start_server(stack: contextlib.ExitStack, catalog: Path, tmp: Path, processes: int, workers: int | None,
                 disk: Path | None = None, name: str = "server", env: dict[str, str] | None = None) -> Server:
    """A fresh server (stopped, and checked, when `stack` closes), every process answering."""
    port = free_port()
    log = tmp / f"{name}.log"
    cmd = [sys.executable, "-m", "bil_transform", "serve", "--config", str(catalog), "--port", str(port),
           "--cache-size", CACHE_SIZE, "--processes", str(processes)]
    cmd += ["--workers", str(workers)] if workers else []
    cmd += ["--disk-cache", str(disk)] if disk else []
    pids: list[int] = []
    stack.callback(check_stopped, log, pids)  # runs after the server is stopped (last in, first out)
    proc = start(stack, cmd, port, "/healthz", log, env=env)
    pids += server_pids(proc, port, processes)
    server = Server(proc, port, pids, log)
    for conns in pin(server, 1).values():  # every process answers
        for c in conns:
            c.close()
    return server


def check_stopped(log: Path, pids: list[int]) -> None:
    """After a server is stopped: its processes are gone and its log holds no traceback or error."""
    deadline = time.monotonic() + 10
    while (alive := [p for p in pids if Path(f"/proc/{p}").exists() and not zombie(p)]) and \
            time.monotonic() < deadline:
        time.sleep(0.1)
    if alive:
        raise RuntimeError(f"server processes {alive} still run 10 s after the server was stopped")
    text = log.read_text(errors="replace")
    bad = [line for line in text.splitlines() if "Traceback" in line or " ERROR " in line or "exited with" in line]
    if bad:
        raise RuntimeError(f"the server's log ({log}) reports errors:\n{text[-3000:]}")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), from /proc/PID/stat."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    return True


class Census:
    """fetch_urls' per-body hook: half-way through a pass (every connection open by then), how many
    connections each server process holds."""

    def __init__(self, server: Server, total: int):
        self.server, self.at, self.seen, self.counts = server, max(1, total // 2), 0, None

    def __call__(self, url: str, body: bytes) -> None:
        self.seen += 1
        if self.seen == self.at:
            owners = list(connection_owners(self.server.port, self.server.pids).values())
            self.counts = [owners.count(pid) for pid in self.server.pids]

    def __str__(self) -> str:
        return "+".join(map(str, self.counts)) if self.counts else "?"


# ------------------------------------------------------------------------------------------ measurements

@dataclass
class Run:
    args: argparse.Namespace
    stack: contextlib.ExitStack
    tmp: Path
    catalog: Path
    volume: object  # the bench stack's voxels (numpy array)
    keys: list[list[str]]  # bench chunk keys by level
    env: dict[str, str]  # the servers' environment (PYTHONPATH: the code snapshot)
    samples: dict[tuple, list[float]] = field(default_factory=lambda: defaultdict(list))
    notes: dict[tuple, list[str]] = field(default_factory=lambda: defaultdict(list))
    reference: dict[str, str] | None = None  # chunk key -> digest, from the first 1p server
    screen_reference: dict[str, dict[str, bytes]] = field(default_factory=dict)  # view -> url path -> body
    browser: object = None
    arrivals: list[tuple[float, str]] = field(default_factory=list)

    def urls(self, base: str, levels: slice = slice(None)) -> list[str]:
        return [f"{base}/ds/{DATASET}/zarr/{k}" for lv in self.keys[levels] for k in lv]

    def serve(self, stack: contextlib.ExitStack, config: str, **kw) -> Server:
        _, processes, workers = CONFIGS[config]
        return start_server(stack, self.catalog, self.tmp, processes, workers, name=config, env=self.env, **kw)

    # -- (b) then (a), on one server

    def cold_and_warm(self, config: str, round_: int) -> None:
        with contextlib.ExitStack() as s:
            server = self.serve(s, config)
            if "b" in self.args.only:
                self.cold(server, config)
            if "a" in self.args.only:
                self.warm(server, config, round_)

    def cold(self, server: Server, config: str) -> None:
        c = self.args.cold_concurrency
        level0, rest = self.urls(server.base, slice(0, 1)), self.urls(server.base, slice(1, None))
        census = Census(server, len(level0))
        cpu0 = cpu_seconds(server.pids)
        t0, _, _ = run_async(fetch_urls(level0, c, decode=census))
        cpu1 = cpu_seconds(server.pids)
        t1, _, _ = run_async(fetch_urls(rest, c))
        cpu2 = cpu_seconds(server.pids)
        self.notes[("b", config)].append(str(census))
        self.samples[("b", config, "cpu0")].append(cpu1 - cpu0)
        self.samples[("b", config, "cpu")].append(cpu2 - cpu0)
        read = server.metric("bil_transform_source_bytes_total") / self.volume.nbytes
        self.samples[("b", config, "level0")].append(len(level0) / t0)
        self.samples[("b", config, "all")].append((len(level0) + len(rest)) / (t0 + t1))
        self.samples[("b", config, "read")].append(read)
        print(f"    {config} cold: level 0 {len(level0) / t0:.0f} chunks/s ({t0:.2f} s), all levels "
              f"{(len(level0) + len(rest)) / (t0 + t1):.0f} chunks/s ({t0 + t1:.2f} s); source bytes read "
              f"{read:.2f}x level 0; server CPU {cpu1 - cpu0:.1f} s, {cpu2 - cpu0:.1f} s; connections per process "
              f"{census}", flush=True)

    def warm(self, server: Server, config: str, round_: int) -> None:
        urls = self.urls(server.base)
        t0 = time.perf_counter()
        pinned = pin(server, PINNED)
        jobs = [(conn, urls[i::PINNED]) for conns in pinned.values() for i, conn in enumerate(conns)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            list(pool.map(lambda job: get_all(*job), jobs))
        for conns in pinned.values():
            for conn in conns:
                conn.close()
        warmup = time.perf_counter() - t0
        misses = server.metric("bil_transform_cache_misses_total", cache="chunks")
        timed = urls * self.args.warm_passes
        for c in self.args.concurrency[::-1 if round_ % 2 else 1]:
            census = Census(server, len(timed))
            cpu, mine = cpu_seconds(server.pids), time.process_time()
            seconds, _, _ = run_async(fetch_urls(timed, c, decode=census))
            cpu, mine = cpu_seconds(server.pids) - cpu, time.process_time() - mine
            self.samples[("a", config, c)].append(len(timed) / seconds)
            self.samples[("a", config, c, "cpu")].append(cpu / len(timed) * 1000)
            self.samples[("a", config, c, "client")].append(mine / len(timed) * 1000)
            self.notes[("a", config, c)].append(str(census))
            print(f"    {config} warm, {c} in flight: {len(timed) / seconds:.0f} req/s ({len(timed)} in "
                  f"{seconds:.2f} s); CPU per request: server {cpu / len(timed) * 1000:.2f} ms, client "
                  f"{mine / len(timed) * 1000:.2f} ms; connections per process {census}", flush=True)
        grew = server.metric("bil_transform_cache_misses_total", cache="chunks") - misses
        evicted = server.metric("bil_transform_cache_evictions_total", settle=False)
        if grew or evicted:
            raise RuntimeError(f"{config}: {grew:.0f} chunk-cache misses during the warm passes, {evicted:.0f} "
                               "evictions: not every process held every chunk")
        rss = server.memory()
        for who, m in rss.items():
            kind = who if who == "parent" else "process"
            self.samples[("mem", config, kind, "rss")].append(m["VmRSS"])
            self.samples[("mem", config, kind, "hwm")].append(m["VmHWM"])
        print(f"    {config} warm-up {warmup:.1f} s over {PINNED} pinned connections per process; no miss or "
              "eviction in the timed passes; MB VmRSS/VmHWM: " + ", ".join(
                  f"{who} {m['VmRSS'] / MB:.0f}/{m['VmHWM'] / MB:.0f}" for who, m in rss.items()), flush=True)
        self.check_bodies(server, config)

    def check_bodies(self, server: Server, config: str) -> None:
        """Every chunk body equals the 1p server's (first one measured); level-0 ones the written voxels."""
        _, _, bodies = run_async(fetch_urls(self.urls(server.base), 32, keep=True))
        prefix = f"{server.base}/ds/{DATASET}/zarr/"
        bodies = {url.removeprefix(prefix): body for url, body in bodies.items()}
        check_level0(server.base, bodies, self.volume, count=16)
        digests = {k: hashlib.blake2b(b, digest_size=16).hexdigest() for k, b in bodies.items()}
        if self.reference is None:
            self.reference = digests
        elif digests != self.reference:
            differ = sorted(k for k in digests if digests[k] != self.reference.get(k))
            raise AssertionError(f"{config}: chunks {differ[:5]} ({len(differ)} in all) differ from the first server's")

    # -- (c), (d): Neuroglancer first screens

    def screen(self, server: Server, view: str) -> tuple[float, float, list[str]]:
        """One first screen: seconds to all drawn, seconds to the last chunk response, the chunk URL paths."""
        from neuroglancer_first_screen import VIEWS as SOURCES
        from neuroglancer_first_screen import open_view

        if self.browser is None:
            self.start_browser()
        self.arrivals.clear()
        t0 = time.monotonic()
        screen = open_view(self.browser, SOURCES[view], server.base)
        chunks = [t for t, url in self.arrivals if url.startswith(server.base) and not is_metadata(url)]
        paths = [url.removeprefix(server.base) for url in (e.url for e in screen.exchanges)
                 if not is_metadata(url)]
        return screen.seconds, max(chunks) - t0, paths

    def start_browser(self) -> None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import neuroglancer_browser
        from neuroglancer_first_screen import VIEWS as SOURCES
        from neuroglancer_first_screen import open_view

        exchange = neuroglancer_browser._exchange

        def timed(response):  # when the page saw each response (Browser.show keeps no times)
            self.arrivals.append((time.monotonic(), response.url))
            return exchange(response)
        neuroglancer_browser._exchange = timed
        self.browser = neuroglancer_browser.Browser()
        self.stack.callback(self.browser.close)
        with contextlib.ExitStack() as s:  # the first page load compiles the viewer: pay it untimed
            open_view(self.browser, SOURCES["zarr"], self.serve(s, BASELINE).base)

    def first_screens(self, config: str, round_: int) -> None:
        for view in self.args.views:
            with contextlib.ExitStack() as s:
                server = self.serve(s, config)
                drawn, fetched, paths = self.screen(server, view)
                if view not in self.screen_reference:  # the bodies every disk-tier screen must match
                    self.screen_reference[view] = bodies_of(server.base, paths)
            self.samples[("c", config, view, "drawn")].append(drawn)
            self.samples[("c", config, view, "fetched")].append(fetched)
            print(f"    {config} first screen {view}: drawn {drawn:.2f} s, fetched {fetched:.2f} s, "
                  f"{len(paths)} chunk requests", flush=True)

    def disk_round(self, round_: int) -> None:
        """(d): one disk tier, written by a cold zarr screen, then restarted servers over it."""
        disk = Path(tempfile.mkdtemp(prefix="disk-", dir=self.tmp))
        for view in VIEWS:  # the baseline: cold, no disk tier, 2 processes, unless (c) measured it this round
            if len(self.samples[("c", "2p", view, "drawn")]) <= round_:
                with contextlib.ExitStack() as s:
                    server = self.serve(s, "2p")
                    drawn, fetched, paths = self.screen(server, view)
                    if view not in self.screen_reference:
                        self.screen_reference[view] = bodies_of(server.base, paths)
                self.samples[("c", "2p", view, "drawn")].append(drawn)
                self.samples[("c", "2p", view, "fetched")].append(fetched)
                print(f"    2p first screen {view} (baseline for d): drawn {drawn:.2f} s, fetched {fetched:.2f} s",
                      flush=True)
        for case, (label, view) in DISK_CASES.items():
            with contextlib.ExitStack() as s:
                server = self.serve(s, "2p", disk=disk)
                drawn, fetched, paths = self.screen(server, view)
                computed = server.metric("bil_transform_blocks_computed_total")
                hits = server.metric("bil_transform_disk_cache_hits_total", settle=False)
                if view in self.screen_reference:
                    want = self.screen_reference[view]
                    got = bodies_of(server.base, [p for p in paths if p in want])
                    if any(got[p] != want[p] for p in got):
                        raise AssertionError(f"{case}: first-screen chunks differ from a server's without disk tier")
            self.samples[("d", case, "drawn")].append(drawn)
            self.samples[("d", case, "fetched")].append(fetched)
            self.samples[("d", case, "computed")].append(computed)
            self.samples[("d", case, "hits")].append(hits)
            print(f"    2p + disk tier, {label}, {view}: drawn {drawn:.2f} s, fetched {fetched:.2f} s; "
                  f"{computed:.0f} blocks computed, {hits:.0f} disk hits, {len(paths)} chunk requests", flush=True)

    # -- (e)

    def disk_size(self) -> dict[str, tuple[float, float, float]]:
        """The disk tier after every chunk of the demo's /zarr, then /precomputed, went through a 2p server."""
        disk = Path(tempfile.mkdtemp(prefix="disk-size-", dir=self.tmp))
        out = {}
        with contextlib.ExitStack() as s:
            server = self.serve(s, "2p", disk=disk)
            meta = {"doc": requests.get(f"{server.base}/api/datasets/demo", timeout=60).json(),
                    "info": requests.get(f"{server.base}/ds/demo/precomputed/info", timeout=60).json()}
            urls = Bench(None, None, None, None, {}, meta={"demo": meta})  # only its URL lists
            body_bytes = 0.0
            for view, view_urls in (("zarr", urls.zarr_urls(server.base, "demo")),
                                    ("+ precomputed", urls.precomputed_urls(server.base, "demo"))):
                seconds, nbytes, _ = run_async(fetch_urls(view_urls, 8))
                body_bytes += nbytes
                entries = server.metric("bil_transform_disk_cache_entries")
                out[view] = (du(disk, apparent=True), du(disk), body_bytes, entries, len(view_urls))
                print(f"    disk tier after every demo {view} chunk ({len(view_urls)} in {seconds:.1f} s, "
                      f"{nbytes / MB:.0f} MB of bodies as sent): du {out[view][1] / MB:.0f} MB "
                      f"(apparent {out[view][0] / MB:.0f} MB), {entries:.0f} entries", flush=True)
        return out


def get_all(conn: http.client.HTTPConnection, urls: list[str]) -> None:
    for url in urls:
        conn.request("GET", urllib.parse.urlsplit(url).path)
        r = conn.getresponse()
        body = r.read()
        if r.status != 200:
            raise RuntimeError(f"GET {url}: HTTP {r.status} {body[:200]!r}")


def is_metadata(url: str) -> bool:
    return url.rsplit("/", 1)[-1] in ("info", ".zattrs", ".zarray", ".zgroup", "zarr.json")


def bodies_of(base: str, paths: list[str]) -> dict[str, bytes]:
    out = {}
    for p in paths:
        r = requests.get(base + p, headers={"Accept-Encoding": "identity"}, timeout=120)
        r.raise_for_status()
        out[p] = r.content
    return out


def du(path: Path, apparent: bool = False) -> float:
    cmd = ["du", "-s", "--block-size=1"] + (["--apparent-size"] if apparent else []) + [str(path)]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[0])


# ------------------------------------------------------------------------------------------------ report

def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(run: Run, key: tuple, base_key: tuple) -> float:
    """The median over rounds of value / baseline of the same round."""
    pairs = list(zip(run.samples[key], run.samples[base_key]))
    return statistics.median(a / b for a, b in pairs) if pairs else float("nan")


def report(run: Run, configs: list[str]) -> str:
    a, lines = run.args, []
    label = {c: f"{c:5s} {CONFIGS[c][0]}" for c in configs}
    if "a" in a.only:
        lines += [f"(a) warm /zarr requests/s, every chunk of every level ({len(run.urls(''))}) x {a.warm_passes} "
                  "per pass, in every process's memory (pinned warm-up); ratio to 1p, higher is faster; CPU ms per "
                  "request: the server's processes together / the client",
                  f"{'config':34s}" + "".join(f" {f'{c} in flight':>13s} {'ratio':>6s} {'CPU ms/req':>12s}"
                                              for c in a.concurrency)]
        for cfg in configs:
            lines.append(f"{label[cfg]:34s}" + "".join(
                f" {med(run.samples[('a', cfg, c)]):13.0f} {ratio(run, ('a', cfg, c), ('a', BASELINE, c)):6.2f} "
                f"{med(run.samples[('a', cfg, c, 'cpu')]):5.2f} / {med(run.samples[('a', cfg, c, 'client')]):4.2f}"
                for c in a.concurrency))
        lines.append("")
    census = [(f"{c} in flight (a)", ("a", c)) for c in a.concurrency if "a" in a.only]
    census += [(f"cold level 0, {a.cold_concurrency} in flight (b)", ("b",)) for _ in "b" if "b" in a.only]
    multi = [cfg for cfg in configs if CONFIGS[cfg][1] > 1]
    if census and multi:
        lines.append("connections each process held half-way through a pass (SO_REUSEPORT's balance), by round:")
        for what, (part, *rest) in census:
            lines.append(f"  {what:30s} " + "; ".join(
                f"{cfg} {' '.join(run.notes[(part, cfg, *rest)])}" for cfg in multi))
        lines.append("")
    if "b" in a.only:
        lines += [f"(b) cold /zarr chunks/s, fresh server, {a.cold_concurrency} in flight; ratio to 1p, higher is "
                  "faster; server CPU seconds (its processes together); source bytes read / level-0 bytes",
                  f"{'config':34s} {'level 0':>9s} {'ratio':>6s} {'CPU s':>6s} {'all levels':>11s} {'ratio':>6s} "
                  f"{'CPU s':>6s} {'read':>5s}"]
        for cfg in configs:
            k = ("b", cfg)
            lines.append(f"{label[cfg]:34s} {med(run.samples[(*k, 'level0')]):9.0f} "
                         f"{ratio(run, (*k, 'level0'), ('b', BASELINE, 'level0')):6.2f} "
                         f"{med(run.samples[(*k, 'cpu0')]):6.1f} {med(run.samples[(*k, 'all')]):11.0f} "
                         f"{ratio(run, (*k, 'all'), ('b', BASELINE, 'all')):6.2f} {med(run.samples[(*k, 'cpu')]):6.1f} "
                         f"{med(run.samples[(*k, 'read')]):5.2f}")
        lines.append("")
    if "c" in a.only:
        lines += ["(c) cold first screen of the demo, real Neuroglancer (headless chromium), seconds to all drawn / "
                  "last chunk fetched; ratio of drawn to 1p, lower is faster",
                  f"{'config':34s}" + "".join(f" {v + ' drawn':>18s} {'fetched':>8s} {'ratio':>6s}" for v in a.views)]
        for cfg in configs:
            cols = ""
            for v in a.views:
                k = ("c", cfg, v)
                cols += f" {med(run.samples[(*k, 'drawn')]):18.2f} {med(run.samples[(*k, 'fetched')]):8.2f} " \
                        f"{ratio(run, (*k, 'drawn'), ('c', BASELINE, v, 'drawn')):6.2f}"
            lines.append(f"{label[cfg]:34s}{cols}")
        lines.append("")
    if "d" in a.only:
        lines += ["(d) 2 processes with --disk-cache, first screen of the demo; ratio of drawn to the same view's cold "
                  "2-process screen without disk tier (same round), lower is faster",
                  f"{'case':52s} {'view':>11s} {'drawn':>6s} {'fetched':>8s} {'ratio':>6s} {'blocks computed':>16s} "
                  f"{'disk hits':>10s}"]
        for view in VIEWS:
            k = ("c", "2p", view)
            lines.append(f"{'cold, no disk tier (the baseline)':52s} {view:>11s} "
                         f"{med(run.samples[(*k, 'drawn')]):6.2f} "
                         f"{med(run.samples[(*k, 'fetched')]):8.2f} {1:6.2f}")
        for case, (lab, view) in DISK_CASES.items():
            k = ("d", case)
            lines.append(f"{lab:52s} {view:>11s} {med(run.samples[(*k, 'drawn')]):6.2f} "
                         f"{med(run.samples[(*k, 'fetched')]):8.2f} "
                         f"{ratio(run, (*k, 'drawn'), ('c', '2p', view, 'drawn')):6.2f} "
                         f"{med(run.samples[(*k, 'computed')]):16.0f} {med(run.samples[(*k, 'hits')]):10.0f}")
        lines.append("")
    if "a" in a.only:
        lines += ["memory after the warm pass, MB (median of rounds): VmRSS / VmHWM per server process "
                  "(and the supervising parent)"]
        for cfg in configs:
            per = [(kind, med(run.samples[("mem", cfg, kind, "rss")]), med(run.samples[("mem", cfg, kind, "hwm")]))
                   for kind in ("process", "parent") if run.samples[("mem", cfg, kind, "rss")]]
            n = CONFIGS[cfg][1]
            text = "; ".join(f"{kind} {r / MB:.0f} / {h / MB:.0f}" for kind, r, h in per)
            total = sum(r * (n if kind == "process" else 1) for kind, r, _ in per)
            lines.append(f"  {label[cfg]:34s} {text}; all processes {total / MB:.0f} MB")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds; figures are medians (default 3)")
    parser.add_argument("--only", default="a,b,c,d,e", help="parts to measure, e.g. a,b (default a,b,c,d,e)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"configurations (default {','.join(CONFIGS)})")
    parser.add_argument("--views", default="zarr", help="first-screen views for (c): zarr, precomputed or both "
                        "(default zarr; (d) measures the 2-process cold precomputed screen it needs itself)")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 1024, 1024], metavar=("Z", "Y", "X"))
    parser.add_argument("--concurrency", default="8,32", help="requests in flight for (a) (default 8,32)")
    parser.add_argument("--cold-concurrency", type=int, default=8, help="requests in flight for (b) (default 8)")
    parser.add_argument("--warm-passes", type=int, default=3, help="times each chunk is requested per timed pass")
    parser.add_argument("--data-dir", help="where the demo is kept (default: the demo's own cache)")
    args = parser.parse_args()
    args.only = set(args.only.split(","))
    configs = [c for c in CONFIGS if c in args.configs.split(",")]
    args.views = [v for v in VIEWS if v in args.views.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not args.only <= set("abcde") or set(args.configs.split(",")) - set(CONFIGS) or BASELINE not in configs \
            or not args.views or args.repeat < 1 or min(args.concurrency) < 1 or args.warm_passes < 1:
        parser.error(f"--only takes a-e, --configs names from {list(CONFIGS)} with {BASELINE} (the baseline), "
                     f"--views {list(VIEWS)}; counts must be positive")
    if "d" in args.only and "2p" not in configs:
        configs.append("2p")  # (d) is about 2 processes
    started = time.perf_counter()
    at_start = machine()
    print(f"start: {at_start}", flush=True)
    demo = make_demo(Path(args.data_dir) if args.data_dir else None)
    with tempfile.TemporaryDirectory(prefix="bil-processes-") as tmp, contextlib.ExitStack() as stack:
        tmp = Path(tmp)
        data = tmp / DATASET
        data.mkdir()
        t0 = time.perf_counter()
        volume = make_slices(data, tuple(args.shape))
        for path in sorted(demo.glob("slice_*.tif")):  # into the OS page cache, as the bench stack is
            path.read_bytes()
        os.sync()
        catalog = tmp / "catalog.toml"
        catalog.write_text(f'[[datasets]]\nid = "{DATASET}"\npath = "{data}"\n\n[[datasets]]\nid = "demo"\n'
                           f'path = "{demo}"\n')
        env = snapshot_code(tmp)
        with contextlib.ExitStack() as s:
            base = start_server(s, catalog, tmp, 1, None, name="meta", env=env).base
            keys, levels = chunk_keys(base)
        run = Run(args, stack, tmp, catalog, volume, keys, env)
        print(f"data: bench {' x '.join(map(str, args.shape))} uint16 slices, written in "
              f"{time.perf_counter() - t0:.1f} s, levels {', '.join('x'.join(map(str, lv['shape'])) for lv in levels)}"
              f", {len(run.urls(''))} chunks of {'x'.join(map(str, levels[0]['chunks']))}; demo {demo}; "
              f"{os.cpu_count()} cores; server --cache-size {CACHE_SIZE} in all", flush=True)
        for round_ in range(args.repeat):
            print(f"round {round_ + 1}/{args.repeat} after {(time.perf_counter() - started) / 60:.1f} min (loadavg "
                  f"{' '.join(f'{v:.2f}' for v in os.getloadavg())})", flush=True)
            order = configs[::-1] if round_ % 2 else configs
            if args.only & {"a", "b"}:
                for config in order:
                    run.cold_and_warm(config, round_)
            if "c" in args.only:
                for config in order:
                    run.first_screens(config, round_)
            if "d" in args.only:
                run.disk_round(round_)
        sizes = run.disk_size() if "e" in args.only else {}
    minutes = (time.perf_counter() - started) / 60
    text = (f"benchmarks/processes.py --repeat {args.repeat} --only {','.join(sorted(args.only))} --configs "
            f"{','.join(configs)}: {minutes:.1f} min\nstart: {at_start}\nend:   {machine()}\n\n" + report(run, configs))
    if sizes:
        text += "(e) disk tier after every chunk of the demo went through a 2-process server (du):\n"
        for view, (apparent, used, body, entries, n) in sizes.items():
            text += (f"  {view:14s} {used / MB:6.0f} MB on disk (apparent {apparent / MB:.0f} MB; bodies as sent "
                     f"{body / MB:.0f} MB; {entries:.0f} entries, {n} requests)\n")
    print("\n" + text)


if __name__ == "__main__":
    main()
