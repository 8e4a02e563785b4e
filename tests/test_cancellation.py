"""Bounded, cancellable work (issue 22, points 2 and 7): a computation whose every client has left
stops; one dataset holds no more than its share of the workers; catalog answers, pages and other
datasets answer while a dataset's coarsest chunk fans out over a huge volume; manifest checksums
are hashed once per file version, in pieces, and stop when their clients leave."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import requests
import zarr
from conftest import Server

from bil_transform import jobs
from bil_transform.cache import Cache
from bil_transform.readers.files import SourceFile, checksummer
from bil_transform.workers import Meter, Workers

ANSWERS = 10  # seconds a client waits for an answer that must come at once (a bound, not a timing)


def _huge_zarr(path: Path) -> tuple[int, int, int]:
    """A 256 GiB uint8 volume on a few MB of disk: every chunk is the same compressed bytes. It has
    no overviews, so its coarsest chunk reads and reduces all of it."""
    shape, chunks = (4096, 8192, 8192), (128, 512, 512)
    arr = zarr.create_array(path, shape=shape, chunks=chunks, dtype="uint8", zarr_format=2,
                            compressors=numcodecs.Zstd(level=1), fill_value=0)
    arr[:chunks[0], :chunks[1], :chunks[2]] = 1
    first = path / "0.0.0"
    for index in np.ndindex(*(s // c for s, c in zip(shape, chunks))):
        name = path / ".".join(map(str, index))
        if name != first:
            shutil.copyfile(first, name)
    return shape


def _small_zarr(path: Path) -> None:
    data = np.random.default_rng(3).integers(0, 60000, (40, 90, 80), dtype=np.uint16)
    arr = zarr.create_array(path, shape=data.shape, chunks=(20, 45, 40), dtype="uint16", zarr_format=2)
    arr[:] = data


def _sparse(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: costs nothing on disk, reads as zeros


def _metric(srv: Server, name: str) -> float:
    """The sum of a metric's samples over its labels."""
    text = requests.get(srv.url("/metrics"), timeout=ANSWERS).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


def _settles(srv: Server, name: str, deadline: float = 30.0) -> float:
    """The metric's value once it has stopped growing (unchanged over 2 s); fails if it keeps
    growing past the deadline."""
    end = time.monotonic() + deadline
    last = _metric(srv, name)
    while time.monotonic() < end:
        time.sleep(2.0)
        now = _metric(srv, name)
        if now == last:
            return now
        last = now
    pytest.fail(f"{name} still grows {deadline:.0f} s after every client left: the work was not cancelled")


def _hang(srv: Server, path: str) -> socket.socket:
    """A client that asks and waits (until the test closes its socket)."""
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    return s


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    shape = _huge_zarr(root / "huge.zarr")
    _small_zarr(root / "small.zarr")
    (root / "hashed.zarr").mkdir()
    _small_zarr(root / "hashed.zarr" / "data.zarr")
    _sparse(root / "hashed.zarr" / "data.zarr" / "big.bin", 16 * 2**30)
    (root / "twice.zarr").mkdir()
    _small_zarr(root / "twice.zarr" / "data.zarr")
    _sparse(root / "twice.zarr" / "data.zarr" / "zeros.bin", 192 * 2**20)
    catalog = root / "catalog.toml"
    catalog.write_text("".join(f'[[datasets]]\nid = "{name}"\npath = "{path}"\n\n' for name, path in (
        ("huge", root / "huge.zarr"), ("small", root / "small.zarr"), ("hashed", root / "hashed.zarr" / "data.zarr"),
        ("twice", root / "twice.zarr" / "data.zarr"))))
    srv = Server(catalog, ["--workers", "2"])
    levels = requests.get(srv.url("/ds/huge/zarr/.zattrs"), timeout=60).json()["multiscales"][0]["datasets"]
    assert len(levels) > 7  # the coarsest level is one chunk over all 256 GiB of voxels
    yield srv, f"/ds/huge/zarr-none/{len(levels) - 1}/0/0/0/0/0", shape
    srv.stop()


def test_a_huge_coarse_chunk_leaves_the_catalog_pages_and_other_datasets_answering(hostile):
    srv, coarsest, _ = hostile
    client = _hang(srv, coarsest)
    try:
        end = time.monotonic() + ANSWERS
        while _metric(srv, "bil_transform_blocks_computed_total") == 0:  # the hostile work has begun
            assert time.monotonic() < end, "the coarse chunk's work never began"
            time.sleep(0.2)
        for path in ("/api/datasets", "/api/datasets/small", "/ds/small/", "/", "/ds/huge/", "/ds/huge/zarr/.zattrs",
                     "/ds/small/zarr/0/.zarray", "/ds/small/precomputed/info", "/ds/small/zarr-none/0/0/0/0/0/0"):
            r = requests.get(srv.url(path), timeout=ANSWERS, headers={"Accept": "text/html"})
            assert r.status_code == 200, (path, r.status_code, r.text)
        chunk = np.frombuffer(requests.get(srv.url("/ds/small/zarr-none/0/0/0/0/0/0"), timeout=ANSWERS).content,
                              np.uint16)
        expected = zarr.open_array(Path(srv.log).parent / "small.zarr", mode="r")[:, :64, :64]
        assert np.array_equal(chunk.reshape(expected.shape), expected)
        assert _metric(srv, "bil_transform_blocks_computed_total") > 0
    finally:
        client.close()
    _settles(srv, "bil_transform_blocks_computed_total")


def test_a_client_that_leaves_cancels_its_computation(hostile):
    srv, coarsest, _ = hostile
    before = _metric(srv, "bil_transform_blocks_computed_total")
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(srv.url(coarsest), timeout=2)
    after = _settles(srv, "bil_transform_blocks_computed_total")
    assert after > before  # it had begun, and stopped
    assert _metric(srv, "bil_transform_queued_jobs") == 0  # nothing of it holds a worker or waits for one
    text = requests.get(srv.url("/metrics"), timeout=ANSWERS).text
    assert 'status="499"' in text  # the request ended as cancelled, not as an error


def test_checksums_of_a_huge_file_stop_when_their_clients_leave(hostile):
    srv = hostile[0]
    clients = [_hang(srv, "/ds/hashed/manifest.json?checksums=sha256") for _ in range(2)]
    try:
        end = time.monotonic() + ANSWERS
        while _metric(srv, "bil_transform_checksummed_bytes_total") == 0:
            assert time.monotonic() < end, "the hashing never began"
            time.sleep(0.1)
        r = requests.get(srv.url("/ds/small/zarr-none/0/0/0/0/1/1"), timeout=ANSWERS)  # another dataset, cold
        assert r.status_code == 200 and len(r.content) == 40 * 64 * 64 * 2
    finally:
        for client in clients:
            client.close()
    hashed = _settles(srv, "bil_transform_checksummed_bytes_total")
    assert 0 < hashed < 16 * 2**30  # stopped half-way, not hashed to the end (nor twice)
    assert _metric(srv, "bil_transform_queued_jobs") == 0
    # the dataset's own work is served at once: no worker is left hashing
    r = requests.get(srv.url("/ds/hashed/zarr-none/0/0/0/0/0/0"), timeout=ANSWERS)
    assert r.status_code == 200
    listed = requests.get(srv.url("/ds/hashed/manifest.json"), timeout=ANSWERS).json()
    assert {"name": "big.bin", "size": 16 * 2**30} in [{k: f[k] for k in ("name", "size")} for f in listed["files"]]


def test_concurrent_requests_for_one_checksum_hash_the_file_once(hostile):
    srv = hostile[0]
    size = 192 * 2**20
    before = _metric(srv, "bil_transform_checksummed_bytes_total")
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: requests.get(srv.url("/ds/twice/manifest.json?checksums=sha256"),
                                                       timeout=120), range(3)))
    expected = hashlib.sha256()
    block = bytes(2**20)
    for _ in range(size // len(block)):
        expected.update(block)
    for r in answers:
        assert r.status_code == 200
        entry = next(f for f in r.json()["files"] if f["name"] == "zeros.bin")
        assert entry["sha256"] == expected.hexdigest()
    listed = sum(f["size"] for f in answers[0].json()["files"])  # zeros.bin, and the array's own files
    assert _metric(srv, "bil_transform_checksummed_bytes_total") - before == listed  # each file once


# In-process: the rules the server's behaviour above rests on.

def _until(condition, deadline: float = 10.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        assert time.monotonic() < end, "the condition never came true"
        time.sleep(0.01)


def test_a_shared_computation_stops_only_when_its_last_waiter_leaves_and_is_never_cached():
    section = Cache(2**20).section("chunks")
    started, runs = threading.Event(), []

    def compute() -> bytes:
        runs.append(1)
        started.set()
        while True:  # until cancelled: a computation with no end of its own
            jobs.checkpoint()
            time.sleep(0.01)

    first, second = jobs.Token(), jobs.Token()
    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(jobs.run, first, None, section.get_or_compute, "key", compute)
        assert started.wait(10)
        b = pool.submit(jobs.run, second, None, section.get_or_compute, "key", compute)
        flight = section.cache._inflight[("chunks", "key")][1]
        _until(lambda: len(flight._waiters) == 2)  # b has joined a's computation
        first.cancel()
        time.sleep(0.3)
        assert not a.done() and not b.done()  # b still waits: the computation goes on
        second.cancel()
        for future in (a, b):
            with pytest.raises(jobs.Cancelled):
                future.result(10)
    assert runs == [1]  # one computation for both
    assert section.get("key") is None  # nothing cached
    assert section.get_or_compute("key", lambda: b"again") == b"again"  # a later request computes it


def test_map_stops_between_items_and_keeps_to_the_share():
    workers = Workers(4)
    share = jobs.Shares(workers.pool, 2, reserve=1, limit=1).of("ds")
    token, seen, busy, most = jobs.Token(), [], [0], [0]
    lock = threading.Lock()

    def item(i: int) -> int:
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        seen.append(i)
        time.sleep(0.02)
        if len(seen) == 20:
            token.cancel()
        with lock:
            busy[0] -= 1
        return i

    assert share.try_take()  # the job's own thread
    with pytest.raises(jobs.Cancelled):
        workers.pool.submit(jobs.run, token, share, workers.map, item, range(10_000)).result(30)
    assert 20 <= len(seen) < 40 and most[0] <= 2
    share.give_back()
    _until(lambda: share.busy == 0)  # every thread given back, once the helper has ended its item
    assert workers.map(lambda i: i * 2, range(100)) == [i * 2 for i in range(100)]  # no job: all of it
    workers.shutdown()


def test_a_cancelled_checksum_resumes_where_it_stopped(tmp_path):
    path, size = tmp_path / "zeros.bin", 64 * 2**20
    _sparse(path, size)
    st = os.stat(path)
    f = SourceFile(path, "zeros.bin", st.st_size, st.st_mtime_ns)
    token = jobs.Token()

    class Cancelling(Meter):
        def hashed(self, nbytes: int) -> None:
            super().hashed(nbytes)
            token.cancel()  # the client leaves after the first piece

    meter = Cancelling()
    digest = checksummer("sha256", Cache(2**20).section("chunks"), meter)
    with pytest.raises(jobs.Cancelled):
        jobs.run(token, None, digest, f)
    first = meter.snapshot()["hashed_bytes"]
    assert 0 < first < size
    token = jobs.Token()  # a later request, which stays
    meter.hashed = Meter.hashed.__get__(meter)
    assert jobs.run(token, None, digest, f) == hashlib.sha256(bytes(size)).hexdigest()
    assert meter.snapshot()["hashed_bytes"] == size  # resumed, not hashed again from the start
