"""A dataset whose files change is reopened aside and swapped in whole (issue 13, points 4-6):
never a 404 or a zero-filled chunk while it reopens, new slices are seen, and the check of the
files never queues behind chunk work."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tifffile
from conftest import Server

SHAPE = (8, 48, 40)  # one chunk holds the whole stack: every answer shows every plane


def _plane(z: int, version: int) -> np.ndarray:
    """Plane z of version `version`: never 0 anywhere, and each (z, version) tells itself apart."""
    y, x = np.mgrid[:SHAPE[1], :SHAPE[2]]
    return (1 + z * 100 + version * 5000 + (y * SHAPE[2] + x) % 97).astype(np.uint16)


def _write(root, z: int, version: int) -> None:
    tifffile.imwrite(root / f"z{z:03d}.tif", _plane(z, version))


def _chunk(srv: Server, ds: str) -> requests.Response:
    return requests.get(srv.url(f"/ds/{ds}/zarr-none/0/0/0/0/0/0"), timeout=60)


@pytest.fixture()
def stack(tmp_path):
    root = tmp_path / "stack"
    root.mkdir()
    for z in range(SHAPE[0]):
        _write(root, z, 0)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "stack"\npath = "{root}"\nvoxel_size = [1.0, 1.0, 1.0]\n')
    srv = Server(catalog, ["--recheck", "0"])
    yield srv, root
    srv.stop()


def test_sixteen_readers_never_see_a_404_or_zeros_while_the_source_is_rewritten(stack):
    """Point 4: the reopen used to set the pyramid to None first, so readers got '404 unavailable'
    (zeros, to a zarr client) for as long as it took."""
    srv, root = stack
    stop = threading.Event()
    seen: list[tuple[int, bytes]] = []

    def read() -> None:
        while not stop.is_set():
            r = _chunk(srv, "stack")
            seen.append((r.status_code, r.content if r.status_code == 200 else r.text.encode()))

    with ThreadPoolExecutor(16) as pool:
        readers = [pool.submit(read) for _ in range(16)]
        for version in range(1, 7):
            for z in range(SHAPE[0]):
                _write(root, z, version)
            if version == 3:  # a new slice, then one of another shape: the stack cannot open for a while
                _write(root, SHAPE[0], version)
                tifffile.imwrite(root / f"z{SHAPE[0]:03d}.tif", np.ones((5, 5), np.uint16))
                time.sleep(0.3)
                (root / f"z{SHAPE[0]:03d}.tif").unlink()
            time.sleep(0.2)
        stop.set()
        for f in readers:
            f.result()

    statuses = {s for s, _ in seen}
    assert 404 not in statuses, [body[:200] for s, body in seen if s == 404][:3]
    assert statuses <= {200, 500, 503}, statuses
    assert sum(s == 200 for s, _ in seen) > len(seen) // 2
    for status, body in seen:
        if status != 200:
            assert b"stack" in body or b"z0" in body, body[:200]  # says which dataset or file
            continue
        got = np.frombuffer(body, "<u2").reshape(-1, *SHAPE[1:])  # 9 planes while the new slice is there
        assert got.min() > 0, "a zero-filled chunk was served"
        for z in range(len(got)):  # each plane is some version's plane z, whole
            assert any(np.array_equal(got[z], _plane(z, v)) for v in range(7)), f"plane {z} is no version's"
    final = _chunk(srv, "stack")
    assert final.status_code == 200
    np.testing.assert_array_equal(np.frombuffer(final.content, "<u2").reshape(SHAPE),
                                  np.stack([_plane(z, 6) for z in range(SHAPE[0])]))


def test_a_new_slice_is_picked_up_without_a_restart(stack):
    """Point 5: the directory's listing is part of the version."""
    srv, root = stack
    meta = srv.url("/ds/stack/zarr/0/.zarray")
    assert requests.get(meta).json()["shape"][2] == SHAPE[0]
    _write(root, SHAPE[0], 0)
    _write(root, SHAPE[0] + 1, 0)
    assert requests.get(meta).json()["shape"][2] == SHAPE[0] + 2
    r = requests.get(srv.url("/ds/stack/zarr-none/0/0/0/0/0/0"))
    got = np.frombuffer(r.content, "<u2").reshape(SHAPE[0] + 2, *SHAPE[1:])
    np.testing.assert_array_equal(got[-1], _plane(SHAPE[0] + 1, 0))


def test_a_cache_hit_never_waits_behind_cold_chunks(tmp_path):
    """Point 6: the file check ran in the chunk queue, so a cache hit that came when its dataset's
    check was due waited for every cold chunk queued before it. With one worker busy with 128 cold
    gzip chunks of another dataset, the hit must come back before most of the chunks queued when it
    was sent are done (counted, not timed: how fast the chunks go depends on the machine)."""
    data = np.random.default_rng(3).integers(1, 60000, (128, 512, 512), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "big.tif", data, photometric="minisblack")
    tifffile.imwrite(tmp_path / "small.tif", data[:4, :64, :64], photometric="minisblack")
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "big"\npath = "{tmp_path / "big.tif"}"\nchunk = [16, 128, 128]\n\n'
                       f'[[datasets]]\nid = "small"\npath = "{tmp_path / "small.tif"}"\n')
    srv = Server(catalog, ["--recheck", "0.5", "--workers", "1"])
    try:
        hit = srv.url("/ds/small/zarr/0/.zarray")
        assert requests.get(hit).status_code == 200  # cached from now on; its next check is due in 0.5 s
        done: list[float] = []

        def cold(key: str) -> None:
            assert requests.get(srv.url(f"/ds/big/zarr-gzip/0/0/0/{key}"), timeout=120).status_code == 200
            done.append(time.monotonic())

        with ThreadPoolExecutor(128) as pool:
            futures = [pool.submit(cold, f"{z}/{y}/{x}") for z in range(8) for y in range(4) for x in range(4)]
            time.sleep(0.7)
            sent, queued = time.monotonic(), len(futures) - len(done)
            assert requests.get(hit, timeout=120).status_code == 200  # its check is due now
            answered = time.monotonic()
            for f in futures:
                f.result()
        meanwhile = sum(sent < t <= answered for t in done)
        assert queued >= 16, f"only {queued} cold chunks were left when the hit was sent: nothing to wait behind"
        assert meanwhile < queued // 2, f"the hit waited for {meanwhile} of the {queued} cold chunks queued before it"
    finally:
        srv.stop()
