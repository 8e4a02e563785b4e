"""Running the server (issue 13, points 7-10, 12-16): limits on what a request may hold, honest
logs, clear start-up and shut-down, and links that are right behind a proxy."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tifffile
from conftest import Server, _free_port, stop_process

HUGE = "9" * 5000  # Python's int() refuses more than 4,300 digits with a ValueError


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("operating")
    data = np.arange(3 * 70 * 90, dtype=np.uint16).reshape(3, 70, 90)
    tifffile.imwrite(root / "small.tif", data, photometric="minisblack")
    (root / "tokens.toml").write_text('[tokens]\n"s3cret-token" = ["small"]\n')
    catalog = root / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "small"\npath = "{root / "small.tif"}"\n')
    srv = Server(catalog, ["--idle-timeout", "2", "--trust-forwarded"])
    yield srv, data
    srv.stop()


def _raw(srv: Server, method: str, path: str, headers: dict | None = None) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=30)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


@pytest.mark.parametrize("path,headers", [
    ("/ds/small/zarr/0/0/0/0/0/0", {"Range": f"bytes={HUGE}-"}),
    ("/ds/small/zarr/0/0/0/0/0/0", {"Range": f"bytes=0-{HUGE}"}),
    ("/ds/small/zarr/0/0/0/0/0/0", {"Range": f"bytes=-{HUGE}"}),
    (f"/ds/small/t/{HUGE}/zarr/.zattrs", {}),
    (f"/ds/small/c/{HUGE}/precomputed/info", {}),
    (f"/ds/small/zarr/0/0/0/{HUGE}/0/0", {}),
    (f"/ds/small/region?level=0&z={HUGE}:1&y=0:1&x=0:1", {}),
    (f"/api/datasets?limit={HUGE}", {}),
])
def test_numbers_past_pythons_int_limit_are_client_errors(served, path, headers):
    """Point 7: they gave 500."""
    srv, data = served
    status, text = _raw(srv, "GET", path, headers)
    assert 400 <= status < 500 or status in (200, 206), (status, text[:200])
    if status >= 400:
        assert "Internal" not in text and len(text) < 400 and text.count("\n") == 1


def test_a_range_past_the_end_is_416_and_a_huge_last_byte_is_the_end(served):
    srv, data = served
    url = srv.url("/ds/small/zarr-none/0/0/0/0/0/0")
    whole = requests.get(url).content
    r = requests.get(url, headers={"Range": f"bytes={HUGE}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{len(whole)}"
    r = requests.get(url, headers={"Range": f"bytes=10-{HUGE}"})
    assert r.status_code == 206 and r.content == whole[10:]


def test_a_slow_header_sender_is_cut_off(served):
    """Point 8: 2,000 connections sending a byte a second were held open."""
    srv, _ = served
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        closed = False
        for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 60:
            try:
                s.sendall(bytes([byte]))
                time.sleep(0.25)
                s.settimeout(0.01)
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            except OSError:
                closed = True
                break
            finally:
                s.settimeout(30)
        assert closed, "the server kept a connection open through 20 s of a trickled header (--idle-timeout 2)"


def test_client_errors_are_one_short_line_each_and_never_a_traceback(served):
    """Point 9: every malformed request wrote an ERROR with a traceback, with pieces of the hostile header."""
    srv, _ = served
    before = srv.log.read_text()
    for i in range(40):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"GET /\x00\x01evil" + str(i).encode() + b" HTTP/1.1\r\nHost: x\r\n"
                      b"Bad Header\x7f: \x1b[31m\r\n\r\n")
            s.recv(1000)
        assert requests.get(srv.url(f"/ds/small/zarr/0/0/0/{'9' * 30}/0/0")).status_code in (400, 404)
    time.sleep(0.5)
    new = srv.log.read_text()[len(before):]
    assert "Traceback" not in new and "ERROR" not in new
    assert "\x1b" not in new and "\x00" not in new
    warnings = [line for line in new.splitlines() if line.startswith("WARNING aiohttp.server: malformed request")]
    assert 1 <= len(warnings) <= 20  # rate-limited: 20 a minute at most


def test_the_access_log_has_one_line_per_request_and_never_a_token(served):
    """Point 16."""
    srv, _ = served
    before = srv.log.read_text()
    requests.get(srv.url("/token/s3cret-token/ds/small/zarr/.zattrs?x=1"))
    requests.get(srv.url("/ds/small/zarr/.zattrs"), headers={"Authorization": "Bearer s3cret-token"})
    time.sleep(0.3)
    new = srv.log.read_text()[len(before):]
    assert "s3cret-token" not in srv.log.read_text()
    lines = [line for line in new.splitlines() if '"GET ' in line]
    assert len(lines) == 2
    assert '"GET /token/***/ds/small/zarr/.zattrs?x=1 HTTP/1.1" 200 ' in lines[0]
    assert lines[0].startswith("127.0.0.1 - - [")
    status, size, seconds = lines[1].rsplit(" ", 3)[1:]
    assert status == "200" and int(size) > 100 and float(seconds) >= 0


def test_links_follow_the_proxy_that_forwards_to_us(served):
    """Point 15: behind an https proxy every link said http://."""
    srv, _ = served
    doc = requests.get(srv.url("/api/datasets/small"),
                       headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "data.example.org"}).json()
    assert doc["links"]["zarr"] == "https://data.example.org/ds/small/zarr"
    doc = requests.get(srv.url("/api/datasets/small"),
                       headers={"Forwarded": 'for=1.2.3.4;proto=https;host="brains.example.org:8443"'}).json()
    assert doc["links"]["zarr"] == "https://brains.example.org:8443/ds/small/zarr"
    assert requests.get(srv.url("/api/datasets/small")).json()["links"]["zarr"] == srv.url("/ds/small/zarr")
    bad = requests.get(srv.url("/api/datasets/small"), headers={"X-Forwarded-Proto": "javascript"})
    assert bad.status_code == 400


def test_public_url_sets_every_link(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.ones((2, 8, 8), np.uint16), photometric="minisblack")
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "a"\npath = "{tmp_path / "a.tif"}"\n')
    srv = Server(catalog, ["--public-url", "https://atlas.example.org/bil/", "--log-format", "json"])
    try:
        doc = requests.get(srv.url("/api/datasets/a"), headers={"X-Forwarded-Proto": "http"}).json()
        assert doc["links"]["zarr"] == "https://atlas.example.org/bil/ds/a/zarr"
        assert "https://atlas.example.org/bil/ds/a/zarr" in srv.log.read_text()  # the start-up lines too
        time.sleep(0.3)
        access = [json.loads(line) for line in srv.log.read_text().splitlines() if line.startswith("{")]
        hit = [a for a in access if a.get("path") == "/api/datasets/a"]
        assert hit and hit[0]["status"] == 200 and hit[0]["method"] == "GET" and hit[0]["bytes"] > 0
        assert {"time", "level", "logger", "message", "duration", "remote"} <= set(hit[0])
    finally:
        srv.stop()


def _serve(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bil_transform", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd)


def test_a_port_in_use_is_one_line_and_exit_2(served, tmp_path):
    """Point 12: it printed 'serving ...' and then a traceback."""
    srv, _ = served
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "a"\npath = "{tmp_path}"\n')
    run = _serve(["serve", "--config", str(catalog), "--port", str(srv.port)], tmp_path)
    assert run.returncode == 2
    assert run.stderr.strip() == (f"bil-transform: cannot listen on 127.0.0.1:{srv.port}: it is in use "
                                  "(another server? choose another --port)")
    assert "serving" not in run.stdout and "Traceback" not in run.stderr


def test_a_server_where_nothing_opened_says_so_loudly(tmp_path):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text('[[datasets]]\nid = "gone"\npath = "does/not/exist"\n')
    srv = Server(catalog)
    try:
        log = srv.log.read_text()
        assert "gone: UNAVAILABLE: " in log and "no such file" in log
        assert "WARNING: none of the 1 dataset(s) could be opened" in log
        assert "serving 0 of 1 dataset(s)" in log
    finally:
        srv.stop()


def test_an_unquoted_glob_expanded_by_the_shell_gets_a_warning(tmp_path):
    """Point 13: `serve slices/z000*.tif` became one dataset per slice."""
    for z in range(5):
        tifffile.imwrite(tmp_path / f"z{z:03d}.tif", np.full((8, 8), z + 1, np.uint16))
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bil_transform", "serve", "--port", str(port),
                             *sorted(str(p) for p in tmp_path.glob("z*.tif"))],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "serving" in line:
                break
        text = "".join(lines)
        assert "WARNING: 5 PATH arguments look like slices of one stack" in text and "quote the glob" in text
    finally:  # not SIGINT: a test run started in the background ignores it, and so does its server until aiohttp runs
        stop_process(proc)


def test_version_and_the_cache_size_default_are_shown():
    """Point 14."""
    run = subprocess.run([sys.executable, "-m", "bil_transform", "--version"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("bil-transform ")
    run = subprocess.run([sys.executable, "-m", "bil_transform", "serve", "--help"], capture_output=True,
                         text=True, timeout=60)
    assert "a quarter of this machine's memory, " in " ".join(run.stdout.split()) and "GiB)" in run.stdout


def test_ctrl_c_during_long_work_stops_at_once_and_cleanly(tmp_path):
    """Point 14: the first Ctrl-C waited for the work in flight (Python joins the worker threads
    at exit), and a second printed 109 lines of tracebacks. The long work: the coarsest chunk of a
    64 GB TIFF with no overviews (a sparse file: its holes read as zeros, on disk it is tiny)."""
    huge = tifffile.memmap(tmp_path / "huge.tif", shape=(2048, 4096, 4096), dtype=np.uint16,
                           photometric="minisblack")
    del huge
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "huge"\npath = "{tmp_path / "huge.tif"}"\n')
    srv = Server(catalog, ["--workers", "1"])
    levels = len(requests.get(srv.url("/ds/huge/zarr/.zattrs")).json()["multiscales"][0]["datasets"])
    pool = ThreadPoolExecutor(2)

    def coarsest() -> None:
        try:
            requests.get(srv.url(f"/ds/huge/zarr/{levels - 1}/0/0/0/0/0"), timeout=120)
        except requests.RequestException:
            pass  # cut off by the shutdown: what this test does

    try:
        pool.submit(coarsest)
        time.sleep(1.5)  # the one worker is deep in the whole file
        srv.proc.send_signal(signal.SIGINT)
        srv.proc.wait(20)  # raises if it did not stop
        assert srv.proc.returncode in (0, 130)
        log = srv.log.read_text()
        assert "Traceback" not in log, log[-2000:]
    finally:
        srv.stop()
        pool.shutdown(wait=True)


def test_a_coarse_level_is_computed_once_whoever_asks(tmp_path):
    """Point 10: the coarsest chunk of a file with no overviews reads the whole file; it must not be
    read again per request, nor twice at once."""
    data = np.random.default_rng(1).integers(0, 60000, (40, 300, 300), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "flat.tif", data, photometric="minisblack")
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "flat"\npath = "{tmp_path / "flat.tif"}"\nchunk = [16, 32, 32]\n')
    srv = Server(catalog)
    try:
        levels = requests.get(srv.url("/ds/flat/zarr/.zattrs")).json()["multiscales"][0]["datasets"]
        coarsest = srv.url(f"/ds/flat/zarr-none/{len(levels) - 1}/0/0/0/0/0")

        def misses() -> int:
            text = requests.get(srv.url("/metrics")).text
            return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
                       if line.startswith("bil_transform_cache_misses_total{"))

        with ThreadPoolExecutor(6) as pool:
            bodies = list(pool.map(lambda _: requests.get(coarsest).content, range(6)))
        assert len(set(bodies)) == 1
        first = misses()
        for _ in range(3):
            assert requests.get(coarsest).content == bodies[0]
        assert misses() == first  # answered from the cache: the file is not read again
        factor = [round(data.shape[i] / s) for i, s in enumerate(
            requests.get(srv.url(f"/ds/flat/zarr/{len(levels) - 1}/.zarray")).json()["shape"][2:])]
        assert all(f > 1 for f in factor[1:])  # a real reduction of the whole file
    finally:
        srv.stop()


def test_metrics_speak_prometheus(served):
    """Point 17: read by prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    srv, _ = served
    bodies = 0  # bytes of the bodies as sent (identity: nothing for requests to inflate)
    for _ in range(3):
        bodies += len(requests.get(srv.url("/ds/small/zarr/0/0/0/0/0/0"),
                                   headers={"Accept-Encoding": "identity"}).content)
    requests.get(srv.url("/ds/small/precomputed/info"))
    requests.get(srv.url("/ds/small/zarr/9/0/0/0/0/0"))
    r = requests.get(srv.url("/metrics"))
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = [s for f in families.values() for s in f.samples]

    def value(name: str, **labels) -> float:
        found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
        assert found, f"no sample {name} {labels}"
        return sum(found)

    assert value("bil_transform_requests_total", view="zarr", status="200") >= 3
    assert value("bil_transform_requests_total", view="zarr", status="404") >= 1
    assert value("bil_transform_requests_total", view="precomputed", status="200") >= 1
    assert value("bil_transform_request_seconds_count", view="zarr") >= 4
    assert value("bil_transform_request_seconds_bucket", view="zarr", le="+Inf") >= 4
    for section in ("chunks", "blocks", "segments"):
        assert {"cache": section} in [s.labels for s in families["bil_transform_cache_hits"].samples]
    assert value("bil_transform_cache_hits_total", cache="chunks") >= 2
    assert value("bil_transform_cache_bytes", cache="blocks") > 0
    assert value("bil_transform_blocks_computed_total", level="0") >= 1
    assert value("bil_transform_compute_seconds_total", level="0") > 0
    source, served_bytes = value("bil_transform_source_bytes_total"), value("bil_transform_response_bytes_total")
    assert source >= 3 * 64 * 64 * 2  # at least chunk (0, 0, 0) was read
    assert served_bytes >= bodies > 0  # every whole body counted, a memoryview's too
    assert value("bil_transform_queued_jobs") == 0
    assert value("bil_transform_datasets", status="ok") == 1
