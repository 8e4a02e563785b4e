"""Which library backs the on-disk cache tier (--disk-cache DIR --disk-cache-size SIZE), chosen by measurement.

Why: the tier sits between the in-memory chunk cache and computing a chunk, and several server
processes on one machine read and write it at once. It must be process-safe, bounded in size
(evicting roughly least-recently-stored/used), survive restarts, make a hit cheap (a `get` may
run on the event loop) and a `set` reasonable. Values are encoded chunks (bytes, 1 KB - 2 MB),
keys short hex digests.

Contenders, each a fresh store per measurement (on /tmp, the same ext4 disk as /work here):
- plain files, one per key (open/read; set = write a temporary file + os.replace): the baseline
  every ratio is against. It has no bound and no eviction.
- diskcache.Cache with its defaults (eviction_policy least-recently-stored, values >= 32 KiB
  (disk_min_file_size) in files of their own, sqlite_mmap_size 64 MiB, WAL, synchronous NORMAL);
- diskcache.Cache with ChunkDisk (below): its defaults, but a value file written with one write() into
  one of 256 kept directories (diskcache's own Disk writes it line by line into one of 65536
  directories it makes and removes);
- diskcache.Cache with eviction_policy least-recently-used (every get becomes a write transaction);
- diskcache.FanoutCache, 4 shards (size_limit split among them; timeout 10 ms: a get that times out
  returns a miss, a set returns False);
- diskcache.Cache with disk_min_file_size 4 MiB (every value a blob inside SQLite) and
  sqlite_mmap_size 1 GiB;
- python-lmdb (not a dependency: `pip install lmdb` to run this) with a small least-recently-stored
  eviction written here (see Lmdb: values charged by their 4 KiB pages; a set that would pass 80% of
  map_size first evicts the oldest, in a transaction of its own), once with its default durability
  (sync=True: fsync per commit) and
  once with sync=False, metasync=False (no fsync, like diskcache's defaults; a system crash can
  then corrupt the file, which a cache would have to detect and wipe).

Measured for 16 KiB, 256 KiB and 1 MiB values (random bytes: compressed chunks do not compress):
- set: latency of each set that fills a fresh store with --store-mb MiB (at least 48 values);
  the store is then closed and reopened (a restart) before the gets, every key checked present;
- get hit: latency of --gets random gets of those keys, each value checked whole (page cache warm:
  a disk-cache hit on a machine with free memory);
- mixed: two processes (forked, each opening the store itself) doing 90% get / 10% set of new keys
  on the same store for --duration s; operations/s, misses and failed sets (must be 0 but for
  FanoutCache timeouts);
- bound: a store limited to --limit-mb MiB (lmdb: map_size) filled with twice that; set latency
  below and above the limit, the peak and final bytes on disk (st_blocks of every file under
  the directory, sampled ~32 times) against the limit, whether the last value set is there, and
  for lmdb the charged fraction of the map at the first MapFullError (0: none came) and the
  evictions.
Every round runs every contender once per value size (the order reversed every other round); the
table shows the medians of --rounds rounds and each contender's ratio to plain files. A check runs
once at the end: two processes setting the same key 100 times each, then the value must be one
whole value and diskcache must have no orphaned value files; and an lmdb map is filled with
no eviction, to see what MapFullError leaves possible.

The script prints the load average and the busiest other processes at start and end. What else was
running during the recorded run (2 cores, AMD EPYC, shared VM, 233 s): another session's work on this
project -- its pytest suite, several `bil_transform serve` processes and a benchmark client; load
average 3.4 at the start and 5.1 at the end, the busiest other processes at 25-96% CPU each. So the
absolute numbers are noisy (fsync-bound ones most: lmdb sync), the ratios less so. An earlier run at
load ~1 with --store-mb 16 --limit-mb 16 --duration 0.4 took 168 s and gave the same ranking; the
defaults are a quarter smaller than that, so expect under 3 minutes unless the machine is as busy.

Run: python benchmarks/disk_cache_choice.py [--rounds N] [--duration S] [--gets N] [--store-mb MB] [--limit-mb MB]
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing as mp
import os
import random
import shutil
import statistics
import struct
import subprocess
import time
from pathlib import Path

import diskcache
import lmdb

SIZES = {"16 KiB": 16 << 10, "256 KiB": 256 << 10, "1 MiB": 1 << 20}
BIG_LIMIT = 4 << 30  # the bound during the latency and mixed phases: never reached


def tag(key: str) -> bytes:
    return hashlib.md5(key.encode()).digest()


def make_value(key: str, size: int, body: bytes) -> bytes:
    """`size` bytes starting and ending with the key's 16-byte tag: a torn or mixed-up value shows."""
    t = tag(key)
    return t + body[:size - 32] + t


def whole(value: bytes | None, size: int, key: str | None = None) -> bool:
    return (value is not None and len(value) == size and value[:16] == value[-16:]
            and (key is None or value[:16] == tag(key)))


def footprint(path: Path) -> int:
    """Bytes allocated on disk by every file under `path` (what `du` counts)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, f)).st_blocks * 512
    return total


class Files:
    """The baseline: one file per key under two hex characters of the key."""

    def __init__(self, path: Path, limit: int):
        self.root = str(path)
        for i in range(256):
            os.makedirs(os.path.join(self.root, f"{i:02x}"), exist_ok=True)

    def get(self, key: str) -> bytes | None:
        try:
            with open(os.path.join(self.root, key[:2], key), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def set(self, key: str, value: bytes) -> bool:
        path = os.path.join(self.root, key[:2], key)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(value)
        os.replace(tmp, path)
        return True

    def close(self) -> None:
        pass


class ChunkDisk(diskcache.Disk):
    """diskcache's Disk with bytes values written the cheap way. Disk.store writes a file value from
    io.BytesIO(value) line by line (random bytes hold a b"\\n" every ~256 bytes: ~1000 write() calls for
    256 KiB) into one of 65536 directories, made (and removed when emptied) on the way. This writes a value
    with one write() into one of 256 directories made once, here, and kept."""

    def __init__(self, directory, **kwargs):
        super().__init__(directory, **kwargs)
        for i in range(256):
            os.makedirs(os.path.join(directory, f"{i:02x}"), exist_ok=True)

    def filename(self, key=diskcache.core.UNKNOWN, value=diskcache.core.UNKNOWN):
        name = os.urandom(16).hex()
        filename = os.path.join(name[:2], name[2:] + ".val")
        return filename, os.path.join(self._directory, filename)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if type(value) is not bytes or len(value) < self.min_file_size:
            return super().store(value, read, key=key)
        filename, full_path = self.filename()
        try:
            f = open(full_path, "xb")
        except FileNotFoundError:
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            f = open(full_path, "xb")
        with f:
            f.write(value)
        return len(value), diskcache.core.MODE_BINARY, filename, None

    def remove(self, file_path):
        with contextlib.suppress(OSError):
            os.remove(os.path.join(self._directory, file_path))


class DiskCache:
    def __init__(self, path: Path, limit: int, fanout: int = 0, **settings):
        if fanout:
            self.cache = diskcache.FanoutCache(str(path), shards=fanout, size_limit=limit, **settings)
        else:
            self.cache = diskcache.Cache(str(path), size_limit=limit, **settings)

    def get(self, key: str) -> bytes | None:
        return self.cache.get(key)

    def set(self, key: str, value: bytes) -> bool:
        try:
            return self.cache.set(key, value)  # FanoutCache: False on timeout
        except diskcache.Timeout:
            return False

    def close(self) -> None:
        self.cache.close()


class Lmdb:
    """lmdb with least-recently-stored eviction written here: `data` key -> value, `seq` key -> stamp + charge,
    `order` stamp -> key, `meta` b"total" -> the bytes charged (each value's overflow pages). A set that would take
    the total past BUDGET of the map first evicts the oldest values, in a transaction of its own: a full map
    refuses even deletes (they copy B-tree pages), and pages freed by a transaction are reused only by later
    ones. A MapFullError all the same (a value needs contiguous free pages) evicts another 1/8 of the map."""

    BUDGET = 0.8

    def __init__(self, path: Path, limit: int, sync: bool = True):
        self.env = lmdb.open(str(path), map_size=limit, max_dbs=4, sync=sync, metasync=sync, readahead=False)
        self.env.reader_check()  # clear reader slots of processes that died holding one
        self.data, self.seq, self.order, self.meta = (self.env.open_db(n) for n in (b"data", b"seq", b"order", b"meta"))
        self.psize = self.env.stat()["psize"]
        self.map_size, self.budget = limit, int(limit * self.BUDGET)
        self.evictions, self.first_full = 0, None

    def get(self, key: str) -> bytes | None:
        with self.env.begin(db=self.data) as txn:
            return txn.get(key.encode())

    def set(self, key: str, value: bytes) -> bool:
        k = key.encode()
        charge = -(-(len(value) + 16) // self.psize) * self.psize
        for _ in range(8):
            txn = self.env.begin(write=True)
            try:
                total = int.from_bytes(txn.get(b"total", b"", db=self.meta), "big")
                old = txn.get(k, db=self.seq)
                total -= 0 if old is None else int.from_bytes(old[12:], "big")
                if total + charge > self.budget:
                    txn.abort()
                    self.evict(self.budget - charge - self.map_size // 16)
                    continue
                if old is not None:
                    txn.delete(old[:12], db=self.order)
                stamp = struct.pack(">QI", time.time_ns(), os.getpid())
                txn.put(k, value, db=self.data)
                txn.put(k, stamp + charge.to_bytes(8, "big"), db=self.seq)
                txn.put(stamp, k, db=self.order)
                txn.put(b"total", (total + charge).to_bytes(8, "big"), db=self.meta)
                txn.commit()
                return True
            except lmdb.MapFullError:
                txn.abort()
                if self.first_full is None:
                    self.first_full = total / self.map_size
                self.evict(total - self.map_size // 8)
            except BaseException:
                txn.abort()
                raise
        return False

    def evict(self, target: int) -> None:
        """Delete the oldest values until at most `target` bytes are charged."""
        self.evictions += 1
        with self.env.begin(write=True) as txn:
            total = int.from_bytes(txn.get(b"total", b"", db=self.meta), "big")
            cursor = txn.cursor(db=self.order)
            while total > target and cursor.first():
                k = cursor.value()
                old = txn.get(k, db=self.seq)
                total -= int.from_bytes(old[12:], "big")
                txn.delete(k, db=self.data)
                txn.delete(k, db=self.seq)
                cursor.delete()
            txn.put(b"total", max(total, 0).to_bytes(8, "big"), db=self.meta)

    def close(self) -> None:
        self.env.close()


CONTENDERS = {
    "plain files (baseline)": Files,
    "dc.Cache defaults (LRS)": DiskCache,
    "dc.Cache + ChunkDisk": lambda p, n: DiskCache(p, n, disk=ChunkDisk),
    "dc.Cache LRU": lambda p, n: DiskCache(p, n, eviction_policy="least-recently-used"),
    "dc.FanoutCache 4 shards": lambda p, n: DiskCache(p, n, fanout=4),
    "dc.Cache blobs in SQLite": lambda p, n: DiskCache(p, n, disk_min_file_size=4 << 20, sqlite_mmap_size=1 << 30),
    "lmdb sync": lambda p, n: Lmdb(p, n, sync=True),
    "lmdb no sync": lambda p, n: Lmdb(p, n, sync=False),
}
BASE = "plain files (baseline)"


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def mixed_worker(name: str, path: Path, size: int, keys: list[str], body: bytes, seconds: float,
                 ready, go, results) -> None:
    store = CONTENDERS[name](path, BIG_LIMIT)
    rng = random.Random(os.getpid())
    ops = misses = failed = broken = 0
    ready.release()
    go.wait()
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        if rng.random() < 0.1:
            key = hashlib.md5(f"mixed-{os.getpid()}-{ops}".encode()).hexdigest()
            failed += not store.set(key, make_value(key, size, body))
        else:
            key = rng.choice(keys)
            value = store.get(key)
            if value is None:
                misses += 1
            elif not whole(value, size, key):
                broken += 1
        ops += 1
    store.close()
    results.put((ops, misses, failed, broken))


def run_mixed(ctx, name: str, path: Path, size: int, keys: list[str], body: bytes, seconds: float) -> dict:
    ready, go, results = ctx.Semaphore(0), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=mixed_worker, args=(name, path, size, keys, body, seconds, ready, go, results))
             for _ in range(2)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    go.set()
    out = [results.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    ops, misses, failed, broken = (sum(x) for x in zip(*out))
    if broken:
        raise AssertionError(f"{name}: {broken} torn or wrong values in the mixed run")
    return {"mixed ops/s": ops / seconds, "mixed misses": misses, "mixed failed sets": failed}


def measure(ctx, name: str, path: Path, size: int, count: int, gets: int, seconds: float, body: bytes) -> dict:
    """Fill a fresh store (timing each set), reopen it, time random gets, then the 2-process mixed run."""
    keys = [hashlib.md5(f"{size}-{i}".encode()).hexdigest() for i in range(count)]
    values = [make_value(k, size, body) for k in keys]
    store = CONTENDERS[name](path, BIG_LIMIT)
    sets = []
    for k, v in zip(keys, values):
        t0 = time.perf_counter()
        ok = store.set(k, v)
        sets.append(time.perf_counter() - t0)
        assert ok, f"{name}: set failed"
    store.close()
    del values
    store = CONTENDERS[name](path, BIG_LIMIT)  # a restart: everything must still be there
    order = [random.choice(keys) for _ in range(gets)]
    got = []
    store.get(keys[0])  # open the connection: a server's stays open
    for k in order:
        t0 = time.perf_counter()
        v = store.get(k)
        got.append(time.perf_counter() - t0)
        if not whole(v, size, k):
            raise AssertionError(f"{name}: get {k} after reopening returned {'nothing' if v is None else 'bad bytes'}")
    store.close()
    row = {"get p50": statistics.median(got), "get p95": pct(got, 0.95),
           "set p50": statistics.median(sets), "set p95": pct(sets, 0.95)}
    row.update(run_mixed(ctx, name, path, size, keys, body, seconds))
    return row


def measure_bound(name: str, path: Path, size: int, limit: int, body: bytes) -> dict:
    """Write 2x `limit` of new values into a store bounded by `limit`; set latency below/above it, bytes on disk."""
    store = CONTENDERS[name](path, limit)
    n = 2 * limit // size
    every = max(1, n // 32)
    below, above, peak = [], [], 0
    for i in range(n):
        key = hashlib.md5(f"bound-{size}-{i}".encode()).hexdigest()
        value = make_value(key, size, body)
        t0 = time.perf_counter()
        ok = store.set(key, value)
        dt = time.perf_counter() - t0
        assert ok or isinstance(store, DiskCache), f"{name}: set failed over the limit"
        (below if (i + 1) * size <= 0.9 * limit else above if (i + 1) * size > limit else []).append(dt)
        if i % every == every - 1:
            peak = max(peak, footprint(path))
    final = footprint(path)
    row = {"set p50 below": statistics.median(below), "set p50 above": statistics.median(above),
           "set p95 above": pct(above, 0.95), "set max above": max(above),
           "peak/limit": max(peak, final) / limit, "final/limit": final / limit}
    if isinstance(store, Lmdb):
        row["lmdb full at"] = store.first_full or 0.0
        row["lmdb evictions"] = store.evictions
    last = hashlib.md5(f"bound-{size}-{n - 1}".encode()).hexdigest()
    row["last kept"] = whole(store.get(last), size, last)
    store.close()
    return row


def race_worker(name: str, path: Path, size: int, body: bytes, ready, go) -> None:
    store = CONTENDERS[name](path, BIG_LIMIT)
    ready.release()
    go.wait()
    for i in range(100):
        store.set("same-key", make_value(f"{os.getpid()}-{i}", size, body))
    store.close()


def race_check(ctx, name: str, path: Path, size: int, body: bytes) -> str:
    """Two processes set one key 100 times each: the value must be whole, and no value file left orphaned."""
    ready, go = ctx.Semaphore(0), ctx.Event()
    procs = [ctx.Process(target=race_worker, args=(name, path, size, body, ready, go)) for _ in range(2)]
    for p in procs:
        p.start()
    for _ in procs:
        ready.acquire()
    go.set()
    for p in procs:
        p.join()
    store = CONTENDERS[name](path, BIG_LIMIT)
    value = store.get("same-key")
    result = "whole" if whole(value, size) else "TORN OR MISSING"
    if isinstance(store, DiskCache):
        files = sum(f.endswith(".val") for _, _, fs in os.walk(path) for f in fs)
        result += f", {files} value file(s) for {len(store.cache)} key(s)"
    store.close()
    return result


def lmdb_full_check(path: Path, size: int, limit: int, body: bytes) -> str:
    """What a full lmdb map does: fill it with no eviction, then try deleting 1/8 of it in one transaction
    (else one key per transaction), then a put, deleting one more key per commit until the put fits."""
    env = lmdb.open(str(path), map_size=limit, sync=False, metasync=False)
    n = 0
    with contextlib.suppress(lmdb.MapFullError):
        while True:
            with env.begin(write=True) as txn:
                txn.put(b"%08d" % n, body[:size])
            n += 1
    out = f"{n * size / limit:.0%} of map_size in values at MapFullError;"
    batch = max(1, n // 8)
    try:
        with env.begin(write=True) as txn:
            for i in range(batch):
                txn.delete(b"%08d" % i)
        out += f" deleting {batch} in one txn: ok;"
    except lmdb.MapFullError:
        out += f" deleting {batch} in one txn: MapFullError;"
        try:
            for i in range(batch):
                with env.begin(write=True) as txn:
                    txn.delete(b"%08d" % i)
            out += " one per txn: ok;"
        except lmdb.MapFullError:
            out += f" one per txn: MapFullError after {i};"
    for extra in range(n - batch):  # pages freed by the last commit are not reused by the next one
        try:
            with env.begin(write=True) as txn:
                txn.put(b"new", body[:size])
            out += f" then a put: ok after {extra} more single-key delete commits"
            break
        except lmdb.MapFullError:
            with contextlib.suppress(lmdb.MapFullError), env.begin(write=True) as txn:
                txn.delete(b"%08d" % (batch + extra))
    else:
        out += " then a put: never fit"
    env.close()
    return out


def machine() -> str:
    """Load and the busiest other processes: what else competed for the cores."""
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    ps = subprocess.run(["ps", "-eo", "pid,pcpu,rss,comm", "--sort=-pcpu"], capture_output=True, text=True).stdout
    others = [line.split(None, 1)[1] for line in ps.splitlines()[1:] if line.split()[0] != str(os.getpid())]
    return f"{os.cpu_count()} cores; loadavg {load}; busiest (%cpu rss_kB name): {'; '.join(others[:4])}"


def fmt(value, ratio: float | None = None) -> str:
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return str(value)
    text = f"{value:.3g}" if value >= 1e-3 or value == 0 else f"{value:.2e}"
    return text if ratio is None else f"{text} ({ratio:.2f}x)"


def print_table(title: str, columns: dict[str, float], rows: dict[str, dict[str, list]], base: str | None) -> None:
    """Medians of every column; `columns` maps a column to a scale (1e6: seconds shown as us), 0 for no ratio."""
    print(f"\n{title}")
    header = f"{'contender':26s}" + "".join(f"{c:>22s}" for c in columns)
    print(header)
    for name, cols in rows.items():
        line = f"{name:26s}"
        for c, scale in columns.items():
            if c not in cols:
                line += f"{'-':>22s}"
                continue
            med = statistics.median(cols[c])
            if isinstance(cols[c][0], bool):
                line += f"{fmt(all(cols[c])):>22s}"
                continue
            ratio = None
            if scale and base is not None and name != base and c in rows[base]:
                ratio = med / statistics.median(rows[base][c])
            line += f"{fmt(med * (scale or 1), ratio):>22s}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=0.3, help="seconds of each 2-process mixed run")
    parser.add_argument("--gets", type=int, default=300, help="timed gets per store")
    parser.add_argument("--store-mb", type=int, default=12, help="MiB written per store (at least 48 values)")
    parser.add_argument("--limit-mb", type=int, default=12, help="the size bound in the bound phase")
    args = parser.parse_args()
    ctx = mp.get_context("fork")  # every store is closed in the parent before a fork
    tmp = Path(f"/tmp/diskbench-{os.getpid()}")
    print(f"start: {machine()}")
    print(f"diskcache {diskcache.__version__}, lmdb {lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))})")
    body = os.urandom(max(SIZES.values()))
    names = list(CONTENDERS)
    latency = {s: {n: {} for n in names} for s in SIZES}
    bound = {s: {n: {} for n in names} for s in SIZES}  # plain files too: an unbounded store
    t_start = time.perf_counter()
    try:
        for r in range(args.rounds):
            order = names if r % 2 == 0 else names[::-1]
            for label, size in SIZES.items():
                count = max(48, (args.store_mb << 20) // size)
                for name in order:
                    path = tmp / f"r{r}-{size}-{names.index(name)}"
                    row = measure(ctx, name, path, size, count, args.gets, args.duration, body)
                    shutil.rmtree(path)
                    for k, v in row.items():
                        latency[label][name].setdefault(k, []).append(v)
                    path = tmp / f"b{r}-{size}-{names.index(name)}"
                    row = measure_bound(name, path, size, args.limit_mb << 20, body)
                    shutil.rmtree(path)
                    for k, v in row.items():
                        bound[label][name].setdefault(k, []).append(v)
            print(f"round {r + 1}/{args.rounds} done at {time.perf_counter() - t_start:.0f} s", flush=True)
        races = {name: race_check(ctx, name, tmp / f"race-{i}", SIZES["256 KiB"], body)
                 for i, name in enumerate(names[1:])}
        full = {label: lmdb_full_check(tmp / f"full-{size}", size, args.limit_mb << 20, body)
                for label, size in SIZES.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    us = 1e6
    for label in SIZES:
        print_table(f"{label} values: latency in us, medians of {args.rounds} rounds (ratio to plain files)",
                    {"get p50": us, "get p95": us, "set p50": us, "set p95": us, "mixed ops/s": 1,
                     "mixed misses": 0, "mixed failed sets": 0}, latency[label], BASE)
    for label in SIZES:
        print_table(f"{label} values, bounded at {args.limit_mb} MiB and sent 2x that: set latency in us "
                    f"(ratio to plain files), bytes on disk / limit",
                    {"set p50 below": us, "set p50 above": us, "set p95 above": us, "set max above": us,
                     "peak/limit": 0, "final/limit": 0, "last kept": 0, "lmdb full at": 0, "lmdb evictions": 0},
                    bound[label], BASE)
    print("\nsame key set 100 times by each of 2 processes (256 KiB):")
    for name, result in races.items():
        print(f"  {name:26s} {result}")
    print(f"\nlmdb with no eviction, map_size {args.limit_mb} MiB:")
    for label, result in full.items():
        print(f"  {label:8s} {result}")
    print(f"\nend ({time.perf_counter() - t_start:.0f} s): {machine()}")


if __name__ == "__main__":
    main()
