"""Responses within the memory budget, never a clean 200 with a short body, a readiness signal,
clients that leave counted as 499, and token-free logs (issue 22, points 3, 10, 11, 14).

The sources are written with zarr-python and tifffile; expected voxels are the test's numpy."""

from __future__ import annotations

import io
import re
import socket
import threading
import time

import numpy as np
import psutil
import pytest
import requests
import tifffile
import zarr
from conftest import Server

MiB = 2**20
CACHE = 64 * MiB
TOKEN = "tok-9f8e7d6c5b4a"  # opens "secret"; must never reach the log


def _big() -> np.ndarray:
    """128 MiB of uint16 that a wrong byte order or a misplaced piece would show."""
    z, y, x = np.ogrid[:128, :1024, :512]
    return ((z * 7919 + y * 31 + x) % 65521).astype(np.uint16)


def _wide() -> np.ndarray:
    """Rows longer than any piece the server makes with this cache (x splits too)."""
    z, y, x = np.ogrid[:3, :5, :300_000]
    return ((z * 13 + y * 101 + x) % 65000).astype(np.uint16)


def _damaged() -> np.ndarray:
    z, y, x = np.ogrid[:384, :256, :256]
    return ((z * 3 + y + x) % 60000).astype(np.uint16)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("bounded")
    arr = zarr.create_array(root / "big.zarr", shape=(128, 1024, 512), chunks=(32, 256, 256), dtype="uint16",
                            zarr_format=2)
    arr[:] = _big()
    arr = zarr.create_array(root / "wide.zarr", shape=(3, 5, 300_000), chunks=(3, 5, 65536), dtype="uint16",
                            zarr_format=2)
    arr[:] = _wide()
    # Its last chunk along z is garbage: the first planes read, the last fail, after headers went out
    # (48 MiB: more than one native read, 32 MiB, decodes at once).
    arr = zarr.create_array(root / "damaged.zarr", shape=(384, 256, 256), chunks=(16, 256, 256), dtype="uint16",
                            zarr_format=2)
    arr[:] = _damaged()
    (root / "damaged.zarr" / "23.0.0").write_bytes(b"this is no compressed chunk" * 100)
    (root / "broken.tif").write_bytes(b"II*\0" + b"not a tiff" * 10)
    tifffile.imwrite(root / "secret.tif", np.zeros((2, 16, 16), np.uint8), photometric="minisblack")
    (root / "tokens.toml").write_text(f'[[tokens]]\ntoken = "{TOKEN}"\ndatasets = ["secret"]\n')
    catalog = root / "catalog.toml"
    catalog.write_text("".join(f'[[datasets]]\nid = "{i}"\npath = "{root / p}"\n{extra}\n' for i, p, extra in [
        ("big", "big.zarr", ""), ("wide", "wide.zarr", ""), ("damaged", "damaged.zarr", ""),
        ("broken", "broken.tif", ""), ("secret", "secret.tif", "embargo = true")]))
    srv = Server(catalog, ["--cache-size", "64MiB", "--tokens", str(root / "tokens.toml")])
    yield srv
    srv.stop()


def _slow_reader(srv: Server, path: str, stop: threading.Event, got: list) -> None:
    """A client that reads 4 KB every 0.2 s through a small receive buffer, until told to stop."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
        s.connect(("127.0.0.1", srv.port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        n, first = 0, b""
        while not stop.is_set():
            data = s.recv(4096)
            if not data:
                break
            first, n = first or data.split(b"\r\n")[0], n + len(data)
            time.sleep(0.2)
        got.append((first, n))


def _peak_rss_while_slow_readers(srv: Server, path: str, readers: int, seconds: float = 8.0) -> tuple[int, list]:
    proc = psutil.Process(srv.proc.pid)
    stop, got = threading.Event(), []
    threads = [threading.Thread(target=_slow_reader, args=(srv, path, stop, got)) for _ in range(readers)]
    for t in threads:
        t.start()
    peak, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        peak = max(peak, proc.memory_info().rss)
        time.sleep(0.05)
    stop.set()
    for t in threads:
        t.join(30)
    return peak, got


def _status_count(srv: Server, view: str, status: str) -> float:
    text = requests.get(srv.url("/metrics"), timeout=10).text
    m = re.search(rf'bil_transform_requests_total\{{status="{status}",view="{view}"\}} (\S+)', text) or re.search(
        rf'bil_transform_requests_total\{{view="{view}",status="{status}"\}} (\S+)', text)
    return float(m[1]) if m else 0.0


def test_twenty_slow_readers_of_a_128_mib_region_stay_within_the_cache_budget(served):
    """Point 3: each response held a chunk-deep band over the whole y/x extent (5.6 GB for this)."""
    peak, got = _peak_rss_while_slow_readers(served, "/ds/big/region?format=npy", 20)
    assert got == [(b"HTTP/1.1 200 OK", n) for _, n in got] and len(got) == 20, got  # all 20 answered, none refused
    assert peak < CACHE + 300 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
    r = requests.get(served.url("/ds/big/region?format=npy"), timeout=120)
    assert r.status_code == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(r.content)), _big()[None, None])


def test_a_big_tiff_region_streams_within_the_budget_and_is_a_valid_tiff(served):
    """Point 3: a TIFF region was built whole (~3.5x the region), and twice per GET."""
    peak, got = _peak_rss_while_slow_readers(served, "/ds/big/region?format=tiff", 4)
    assert got == [(b"HTTP/1.1 200 OK", n) for _, n in got] and len(got) == 4, got
    assert peak < CACHE + 300 * MiB, f"peak RSS {peak / MiB:.0f} MiB"
    r = requests.get(served.url("/ds/big/region?format=tiff"), timeout=120)
    assert r.status_code == 200 and int(r.headers["Content-Length"]) == len(r.content)
    with tifffile.TiffFile(io.BytesIO(r.content)) as tif:
        assert tif.is_imagej
        np.testing.assert_array_equal(tif.asarray().reshape(_big().shape), _big())
    part = requests.get(served.url("/ds/big/region?format=tiff"), headers={"Range": "bytes=1000000-1999999"})
    assert part.status_code == 206 and part.content == r.content[1_000_000:2_000_000]


@pytest.mark.parametrize("fmt", ["npy", "raw", "tiff"])
def test_rows_longer_than_a_piece_come_back_whole(served, fmt):
    """Point 3: pieces split along x too; their order is the region's."""
    r = requests.get(served.url(f"/ds/wide/region?format={fmt}&x=1:299999"), timeout=60)
    assert r.status_code == 200, r.text
    want = _wide()[:, :, 1:299999]
    if fmt == "npy":
        got = np.load(io.BytesIO(r.content))[0, 0]
    elif fmt == "raw":
        got = np.frombuffer(r.content, "<u2").reshape(want.shape)
    else:
        got = tifffile.imread(io.BytesIO(r.content)).reshape(want.shape)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", ["npy", "raw", "tiff"])
def test_a_failure_before_any_voxel_is_sent_gets_its_status(served, fmt):
    """Point 14: the npy header went out with a 200 before the first band was read."""
    r = requests.get(served.url(f"/ds/damaged/region?format={fmt}&z=368:384"), timeout=60)
    assert r.status_code >= 500, (r.status_code, len(r.content))


@pytest.mark.parametrize("fmt", ["npy", "raw", "tiff"])
def test_a_failure_after_the_headers_is_never_a_clean_short_200(served, fmt):
    """Point 14: a source that fails mid-stream cuts the connection; the client sees an error."""
    with pytest.raises((requests.exceptions.ChunkedEncodingError, requests.exceptions.ConnectionError)):
        r = requests.get(served.url(f"/ds/damaged/region?format={fmt}"), timeout=60)
        raise AssertionError(f"a clean {r.status_code} with {len(r.content)} bytes")
    with socket.create_connection(("127.0.0.1", served.port), timeout=60) as s:
        s.sendall(f"GET /ds/damaged/region?format={fmt} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = b""
        while data := s.recv(65536):
            raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    length = int(re.search(rb"Content-Length: (\d+)", head)[1])
    assert len(body) < length  # cut short, and the connection closed: never a whole-looking body


def test_readyz_counts_the_datasets_that_can_be_served(served):
    r = requests.get(served.url("/readyz"), timeout=10)
    assert r.status_code == 200 and r.text.strip() == "ready: 4 of 5 datasets can be served"
    assert requests.get(served.url("/healthz"), timeout=10).status_code == 200


def test_readyz_fails_when_no_dataset_can_be_served(tmp_path):
    (tmp_path / "broken.tif").write_bytes(b"II*\0" + b"not a tiff" * 10)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "broken"\npath = "{tmp_path / "broken.tif"}"\n')
    srv = Server(catalog)
    try:
        assert requests.get(srv.url("/healthz"), timeout=10).status_code == 200  # alive
        r = requests.get(srv.url("/readyz"), timeout=10)
        assert r.status_code == 503 and r.text.strip() == "ready: 0 of 1 datasets can be served"
        assert int(r.headers["Retry-After"]) >= 1
    finally:
        srv.stop()


def test_a_client_that_leaves_mid_stream_is_a_499_without_a_traceback(served):
    """Point 11: it was an internal error with a traceback, counted as a 500."""
    before, errors = _status_count(served, "dataset_region", "499"), _status_count(served, "dataset_region", "500")
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", served.port)) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            s.sendall(b"GET /ds/big/region?format=raw HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")  # a reset, as a killed client
    deadline = time.monotonic() + 30
    while _status_count(served, "dataset_region", "499") < before + 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _status_count(served, "dataset_region", "499") == before + 3
    assert _status_count(served, "dataset_region", "500") == errors
    log = served.log.read_text()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    assert log.count("the client left") >= 3


CRAFTED = [
    f"GET /token/{TOKEN}/ds/secret/region\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /token/{TOKEN}/ds/secret/region HTTP/9.9\r\nHost: x\r\n\r\n",
    f"GET /token/{TOKEN}/ds/secret/{'a' * 8200} HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /ds/secret/region HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}{'b' * 8200}\r\n\r\n",
    f"GET /ds/secret/region HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\x01\r\n\r\n",
    f"GET /ds/\x7f/token/{TOKEN}/x HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET //token/{TOKEN}/ds/secret/region HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /ds/secret/region?token={TOKEN} HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /token/{TOKEN}/ds/secret/region?format=npy HTTP/1.1\r\nHost: x\r\n\r\n",
    f"GET /ds/secret/region HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n",
]


@pytest.mark.parametrize("request_text", CRAFTED, ids=range(len(CRAFTED)))
def test_no_token_reaches_the_log(served, request_text):
    """Point 10: aiohttp's malformed-request messages quoted the raw line, token and all."""
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as s:
        s.sendall(request_text.encode("latin-1"))
        s.shutdown(socket.SHUT_WR)
        while s.recv(65536):
            pass
    time.sleep(0.3)  # the log line is written as the answer goes
    log = served.log.read_text()
    assert TOKEN not in log, [line for line in log.splitlines() if TOKEN in line][:3]


def test_no_token_reaches_a_json_log(tmp_path):
    """Point 10, with --log-format json: the access line's own fields are redacted too."""
    tifffile.imwrite(tmp_path / "secret.tif", np.zeros((2, 16, 16), np.uint8), photometric="minisblack")
    (tmp_path / "tokens.toml").write_text(f'[[tokens]]\ntoken = "{TOKEN}"\ndatasets = ["secret"]\n')
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "secret"\npath = "{tmp_path / "secret.tif"}"\nembargo = true\n')
    srv = Server(catalog, ["--log-format", "json", "--tokens", str(tmp_path / "tokens.toml")])
    try:
        for text in CRAFTED:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                s.sendall(text.encode("latin-1"))
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
        assert requests.get(srv.url(f"/token/{TOKEN}/ds/secret/region"), timeout=10).status_code == 200
        time.sleep(0.3)
        log = srv.log.read_text()
        assert '"status": 200' in log and TOKEN not in log, [line for line in log.splitlines() if TOKEN in line][:3]
    finally:
        srv.stop()


def test_the_in_flight_budget_queues_then_refuses():
    """Point 3: a response waits for its share of the budget, and gets Busy (503) when it stays full."""
    import asyncio

    from bil_transform.budget import Busy, InFlight

    async def run() -> list[str]:
        budget, seen = InFlight(100, wait=0.5), []

        async def holder(name: str, n: int, hold: float) -> None:
            try:
                async with budget.hold(n):
                    seen.append(f"{name} in")
                    await asyncio.sleep(hold)
            except Busy:
                seen.append(f"{name} busy")

        first = asyncio.create_task(holder("a", 80, 0.2))
        await asyncio.sleep(0.05)
        await asyncio.gather(holder("b", 40, 0), first)  # b waits until a leaves
        stuck = asyncio.create_task(holder("c", 100, 2))
        await asyncio.sleep(0.05)
        await holder("d", 1, 0)  # c holds it all for longer than d waits
        stuck.cancel()
        await asyncio.gather(stuck, return_exceptions=True)
        assert budget.used == 0  # a response that ends, however, gives its share back
        return seen

    assert asyncio.run(run()) == ["a in", "b in", "c in", "d busy"]
