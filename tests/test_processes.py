"""Several server processes on one port (--processes) sharing a disk tier (--disk-cache), read
through the real server: a chunk computed in one process is served from disk by the other and
after a restart, a rewritten source or catalog entry is never served stale, and a process that
dies is replaced. /metrics adds up every process (prometheus-client's multiprocess mode)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
import zarr
from conftest import Server, _free_port
from prometheus_client.parser import text_string_to_metric_families

SHAPE = (40, 300, 260)  # z, y, x: three levels of 64^3 chunks


def write_stack(root: Path, seed: int) -> np.ndarray:
    """uint16 slices written by tifffile; the voxels the test expects, independently of the server."""
    data = np.random.default_rng(seed).integers(0, 60000, SHAPE, dtype=np.uint16)
    root.mkdir(exist_ok=True)
    for z, plane in enumerate(data):
        tifffile.imwrite(root / f"s_{z:03}.tif", plane)
    return data


def write_catalog(path: Path, stack: Path, voxel_z: float = 2.0) -> Path:
    path.write_text(f'[[datasets]]\nid = "stack"\npath = "{stack}"\nvoxel_size = [{voxel_z}, 0.5, 0.5]\n'
                    'compression = "none"\n')
    return path


class Fleet(Server):
    """The real server with --processes 2 and a disk tier, started once every process serves."""

    def __init__(self, catalog: Path, disk: Path, processes: int = 2):
        super().__init__(catalog, ["--processes", str(processes), "--disk-cache", str(disk), "--recheck", "0.2"])
        deadline = time.monotonic() + 60
        while "serving" not in self.log.read_text():
            assert time.monotonic() < deadline, self.log.read_text()
            time.sleep(0.1)

    def children(self) -> list[int]:
        """The server processes (multiprocessing's resource tracker is a child too)."""
        kids = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
        return [int(p) for p in kids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]

    def chunk(self, key: str) -> bytes:
        """A chunk on a connection of its own, so the kernel may hand it to either process."""
        with requests.Session() as s:
            r = s.get(self.url(f"/ds/stack/zarr/{key}"), timeout=60)
        assert r.status_code == 200, r.text
        return r.content

    def metrics(self) -> dict[str, float]:
        text = requests.get(self.url("/metrics"), timeout=30).text
        found = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                found[s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))] = s.value
        return found

    def settled(self, name: str, at_least: float) -> dict[str, float]:
        """/metrics once `name` reached `at_least`: each process publishes its live values every second."""
        deadline = time.monotonic() + 20
        while (m := self.metrics()).get(name, 0) < at_least:
            assert time.monotonic() < deadline, f"{name} stayed {m.get(name, 0)} < {at_least}"
            time.sleep(0.2)
        time.sleep(1.2)  # one more round, so every process has published
        return self.metrics()


def blocks_computed(m: dict[str, float]) -> float:
    return sum(v for k, v in m.items() if k.startswith("bil_transform_blocks_computed_total"))


def level0_chunk(data: np.ndarray, z: int, y: int, x: int) -> bytes:
    """The uncompressed zarr v2 chunk at grid (z, y, x): 64^3, or the whole extent where a level is
    smaller (z here), edges filled with 0."""
    shape = tuple(min(64, n) for n in data.shape)
    out = np.zeros(shape, np.uint16)
    part = data[z * shape[0]:(z + 1) * shape[0], y * 64:(y + 1) * 64, x * 64:(x + 1) * 64]
    out[:part.shape[0], :part.shape[1], :part.shape[2]] = part
    return out.tobytes()


@pytest.fixture
def stack(tmp_path):
    data = write_stack(tmp_path / "slices", seed=1)
    return data, write_catalog(tmp_path / "catalog.toml", tmp_path / "slices"), tmp_path / "disk"


def test_a_chunk_computed_in_one_process_is_served_from_disk_by_the_other_and_after_a_restart(stack):
    data, catalog, disk = stack
    fleet = Fleet(catalog, disk)
    try:
        assert len(fleet.children()) == 2
        first = fleet.chunk("0/0/0/0/1/2")
        assert first == level0_chunk(data, 0, 1, 2)
        coarsest = fleet.chunk("3/0/0/0/0/0")  # every computed level's blocks go to disk on the way
        computed = blocks_computed(fleet.settled("bil_transform_disk_cache_writes_total", 2))
        for _ in range(60):  # fresh connections until one lands on the process that did not compute it
            assert fleet.chunk("0/0/0/0/1/2") == first
            if fleet.metrics().get("bil_transform_disk_cache_hits_total", 0) >= 1:
                break
        m = fleet.settled("bil_transform_disk_cache_hits_total", 1)
        assert blocks_computed(m) == computed  # served from disk, not computed again
        assert m["bil_transform_cache_misses_total,cache=chunks"] >= 2  # two processes' memories missed it
    finally:
        fleet.stop()
    assert not fleet.alive()

    fleet = Fleet(catalog, disk)  # a restart: nothing in memory, everything on disk
    try:
        assert fleet.chunk("0/0/0/0/1/2") == first
        # Another view of the coarsest level: made from its block on disk, not from the source again.
        scale = requests.get(fleet.url("/ds/stack/precomputed/info")).json()["scales"][-1]
        x, y, z = scale["size"]
        assert scale["encoding"] == "raw" and scale["chunk_sizes"][0] == [x, y, z]
        r = requests.get(fleet.url(f"/ds/stack/precomputed/{scale['key']}/0-{x}_0-{y}_0-{z}"))
        assert r.status_code == 200 and r.content == coarsest  # both the raw z, y, x voxels, unpadded
        m = fleet.settled("bil_transform_disk_cache_hits_total", 2)
        assert blocks_computed(m) == 0 and m["bil_transform_source_bytes_total"] == 0
        assert m["bil_transform_disk_cache_misses_total"] == 2  # the precomputed info and chunk; the block was there
        level0 = zarr.open_group(fleet.url("/ds/stack/zarr"), mode="r")["0"][0, 0]
        np.testing.assert_array_equal(level0, data)
    finally:
        fleet.stop()


def test_a_rewritten_source_or_catalog_entry_is_never_served_stale_from_disk(stack, tmp_path):
    data, catalog, disk = stack
    fleet = Fleet(catalog, disk)
    try:
        assert fleet.chunk("0/0/0/0/0/0") == level0_chunk(data, 0, 0, 0)
        assert requests.get(fleet.url("/ds/stack/zarr/.zattrs")).json()["multiscales"][0]["datasets"][0][
            "coordinateTransformations"][0]["scale"][2] == 2.0
        fleet.settled("bil_transform_disk_cache_writes_total", 2)
        newer = write_stack(tmp_path / "slices", seed=2)  # rewritten while it serves
        deadline = time.monotonic() + 20
        while fleet.chunk("0/0/0/0/0/0") != level0_chunk(newer, 0, 0, 0):
            assert time.monotonic() < deadline, "the rewritten source was still served stale"
            time.sleep(0.3)
        for _ in range(10):  # whichever process answers
            assert fleet.chunk("0/0/0/0/0/0") == level0_chunk(newer, 0, 0, 0)
    finally:
        fleet.stop()

    newest = write_stack(tmp_path / "slices", seed=3)  # rewritten while it is down
    write_catalog(catalog, tmp_path / "slices", voxel_z=3.0)  # and the catalog edited
    fleet = Fleet(catalog, disk)
    try:
        for _ in range(6):
            assert fleet.chunk("0/0/0/0/0/0") == level0_chunk(newest, 0, 0, 0)
        attrs = requests.get(fleet.url("/ds/stack/zarr/.zattrs")).json()
        assert attrs["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"][2] == 3.0
    finally:
        fleet.stop()


def test_concurrent_misses_in_two_processes_compute_once(stack):
    data, catalog, disk = stack
    fleet = Fleet(catalog, disk)
    try:
        waited = 0.0
        level1 = data.reshape(40, 150, 2, 130, 2).mean((2, 4))  # z is coarse already: level 1 halves y and x
        for x in range(3):
            before = fleet.metrics().get("bil_transform_blocks_computed_total,level=1", 0)
            with ThreadPoolExecutor(8) as pool:
                bodies = list(pool.map(fleet.chunk, [f"1/0/0/0/0/{x}"] * 8))
            assert len(set(bodies)) == 1
            m = fleet.settled("bil_transform_disk_cache_writes_total", x + 1)
            assert m["bil_transform_blocks_computed_total,level=1"] - before == 1
            got = np.frombuffer(bodies[0], np.uint16).reshape(40, 64, 64)[:, :, :min(64, 130 - 64 * x)]
            assert np.abs(got - level1[:, :64, 64 * x:64 * x + 64]).max() <= 0.5
            waited = m["bil_transform_disk_cache_waits_total"]
            if waited:
                break
        assert waited >= 1  # some request waited for the other process instead of computing the chunk
    finally:
        fleet.stop()


def test_a_process_that_dies_is_replaced_and_the_port_keeps_answering(stack):
    data, catalog, disk = stack
    fleet = Fleet(catalog, disk)
    try:
        victim = fleet.children()[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        # Connections queued on its socket when it died are lost with it; the supervisor logs the death
        # once it has reaped the process, so its socket is closed by then (a dying process leaves the
        # children list, its cmdline emptied, before its files are closed).
        while "exited with code -9; starting another" not in fleet.log.read_text():
            assert time.monotonic() < deadline, fleet.log.read_text()
            time.sleep(0.05)
        for _ in range(20):  # the other process answers alone until the new one listens, then both do
            assert fleet.chunk("0/0/0/0/0/1") == level0_chunk(data, 0, 0, 1)
        while len(fleet.children()) < 2:
            assert time.monotonic() < deadline, fleet.log.read_text()
            time.sleep(0.2)
        for _ in range(20):  # connections the new one takes wait until it has opened the datasets
            assert fleet.chunk("0/0/0/0/0/1") == level0_chunk(data, 0, 0, 1)
    finally:
        fleet.stop()
    assert not fleet.alive()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bil_transform", *args], capture_output=True, text=True, timeout=60)


def test_a_disk_cache_inside_a_dataset_is_refused(stack, tmp_path):
    _, catalog, _ = stack
    run = _cli("serve", "--config", str(catalog), "--port", str(_free_port()), "--disk-cache",
               str(tmp_path / "slices" / "cache"))
    assert run.returncode == 2
    assert run.stderr.strip().startswith("bil-transform: --disk-cache ") and "inside dataset 'stack'" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "slices" / "cache").exists()


def test_a_port_in_use_stops_every_process_with_one_line(stack):
    _, catalog, disk = stack
    fleet = Fleet(catalog, disk)
    try:
        run = _cli("serve", "--config", str(catalog), "--port", str(fleet.port), "--processes", "2")
        assert run.returncode == 2
        assert run.stderr.strip() == (f"bil-transform: cannot listen on 127.0.0.1:{fleet.port}: it is in use "
                                      "(another server? choose another --port)")
    finally:
        fleet.stop()


def test_a_torn_disk_entry_is_a_miss_and_never_served(stack):
    """diskcache never fsyncs its value files: after a power cut an entry may point at a cut file."""
    data, catalog, disk = stack
    fleet = Fleet(catalog, disk)
    try:
        assert fleet.chunk("0/0/0/0/2/0") == level0_chunk(data, 0, 2, 0)
        fleet.settled("bil_transform_disk_cache_writes_total", 1)
    finally:
        fleet.stop()
    values = list(disk.rglob("*.val"))
    assert values  # the chunk (and the documents' gzip bodies, if any) live in files of their own
    for path in values:
        with path.open("r+b") as f:
            f.truncate(path.stat().st_size // 2)
    fleet = Fleet(catalog, disk)
    try:
        for _ in range(4):
            assert fleet.chunk("0/0/0/0/2/0") == level0_chunk(data, 0, 2, 0)
        m = fleet.settled("bil_transform_disk_cache_damaged_total", 1)
        assert m["bil_transform_blocks_computed_total,level=0"] >= 1  # computed again, not read torn
    finally:
        fleet.stop()


def test_the_disk_tier_keeps_arrays_whole_and_within_its_bound(tmp_path):
    """Blocks go to disk as raw voxels with their dtype and shape; the bound counts their bytes."""
    from bil_transform.cache.disk import WAL, DiskTier

    block = np.random.default_rng(5).integers(0, 60000, (40, 64, 64), dtype=np.uint16)
    tier = DiskTier(tmp_path / "tier", 2**24)
    tier.put("block", block)
    back = tier.get("block")
    assert back.dtype == block.dtype and back.shape == block.shape and not back.flags.writeable
    np.testing.assert_array_equal(back, block)
    small = DiskTier(tmp_path / "small", WAL + block.nbytes // 2)  # less than its bytes, more than its first axis
    small.put("block", block)
    assert small.get("block") is None and small.stats()["writes"] == 0  # never written, only to be culled


# A process that claims a chunk's key on the disk tier as a server process would, says so, and
# then waits to be killed mid-"computation".
CLAIMANT = """
import sys, time
from bil_transform.cache import Cache
from bil_transform.cache.disk import DiskTier, disk_key
from bil_transform.catalog import load_catalog
from bil_transform.dataset import Dataset
from bil_transform.writers import make_view

spec = load_catalog(sys.argv[1])[0]
cache = Cache(2**26)
ds = Dataset(spec, cache)
view = make_view(ds.pyramid, "zarr", cache.section("chunks"), compression=spec.compression, encoding=spec.encoding)
key = disk_key("chunks", view.resource(sys.argv[3]).key)
assert DiskTier(sys.argv[2], 2**40).claim(key)
print("claimed", flush=True)
time.sleep(600)
"""


def test_a_killed_processs_claim_is_taken_over_at_once(stack):
    """A process killed while it computes a chunk leaves its claim on the disk tier; the claim names
    the process, so the server sees it is gone and computes the chunk at once, not after the lease."""
    data, catalog, disk = stack
    fleet = Fleet(catalog, disk)
    claimant = subprocess.Popen([sys.executable, "-c", CLAIMANT, str(catalog), str(disk), "0/0/0/0/1/1"],
                                stdout=subprocess.PIPE, env=os.environ)
    try:
        assert claimant.stdout.readline().strip() == b"claimed"
        claimant.kill()
        claimant.wait()
        with requests.Session() as s:  # the lease is 60 s: a client that gives up after 20 s proves it
            r = s.get(fleet.url("/ds/stack/zarr/0/0/0/0/1/1"), timeout=20)
        assert r.status_code == 200 and r.content == level0_chunk(data, 0, 1, 1)
        assert fleet.chunk("0/0/0/0/1/1") == r.content
        m = fleet.settled("bil_transform_disk_cache_waits_total", 1)  # it did find the claim and waited on it
        assert m["bil_transform_disk_cache_writes_total"] >= 1
    finally:
        claimant.kill()
        fleet.stop()


def test_the_disk_tier_is_its_users_alone(stack):
    """Embargoed voxels are stored there: 0700 directories and 0600 files, whatever the umask."""
    import stat

    data, catalog, disk = stack
    before = os.umask(0o022)  # the server inherits it: the usual one, which makes 0755 and 0644
    try:
        fleet = Fleet(catalog, disk)
    finally:
        os.umask(before)
    try:
        assert fleet.chunk("0/0/0/0/0/0") == level0_chunk(data, 0, 0, 0)
        fleet.settled("bil_transform_disk_cache_writes_total", 1)
    finally:
        fleet.stop()
    found = [disk, *disk.rglob("*")]
    assert any(p.suffix == ".val" for p in found) and any(p.name == "cache.db" for p in found)
    for path in found:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (str(path), oct(mode))


def test_a_claim_of_a_live_process_holds_and_a_reused_pids_does_not(tmp_path):
    """A claim names its process by pid namespace, pid and start time: a live claimant is waited for
    (its value arrives), a claim whose pid now belongs to a later process is taken over at once."""
    import threading

    from bil_transform.cache.disk import DiskTier

    tier = DiskTier(tmp_path / "tier", 2**24)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
        start = int(Path(f"/proc/{live.pid}/stat").read_bytes().rpartition(b")")[2].split()[19])  # proc(5) field 22
        tier.store.set(("computing", "live"), (namespace, live.pid, start), expire=60)
        tier.store.set(("computing", "reused"), (namespace, live.pid, start - 1), expire=60)  # an earlier process's
        assert tier.wait("reused") is None  # computed here, at once
        assert tier.store.get(("computing", "reused")) not in (None, (namespace, live.pid, start - 1))  # now ours
        tier.release("reused")
        assert tier.store.get(("computing", "reused")) is None
        threading.Timer(1.0, tier.put, ("live", b"computed by the live claimant")).start()
        assert tier.wait("live") == b"computed by the live claimant"
        tier.release("live")  # not ours: left to its claimant
        assert tier.store.get(("computing", "live")) == (namespace, live.pid, start)
    finally:
        live.kill()
        live.wait()
