"""Replicas behind a load balancer (issue 15, point 3): deploy/nginx.conf run for real by Debian's
nginx in front of three servers on loopback, and deploy/compose.yaml checked against it and the CLI.

The nginx configuration run here is the shipped file with only its replica `server` lines, its
`listen`, its cache directory and its log directory replaced (and, for the second nginx, its
`proxy_cache` switched off, which the file says is optional), so the shipped directives are what
is tested."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import yaml
from conftest import Server, _free_port, stop_process
from prometheus_client.parser import text_string_to_metric_families

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NGINX_CONF = DEPLOY / "nginx.conf"
COMPOSE = DEPLOY / "compose.yaml"
UPSTREAM_SERVER = re.compile(r"(?m)^(\s*server\s+)([A-Za-z0-9.-]+):(\d+)((?:\s+[^;\s]+)*)\s*;")
TOKEN = "replica-t0ken"
GZIP, IDENTITY = {"Accept-Encoding": "gzip"}, {"Accept-Encoding": "identity"}


# ---------------------------------------------------------------------------------------------
# nginx, from the shipped file


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
    if found is None:
        pytest.fail("nginx is not installed: tests/test_replicas.py runs deploy/nginx.conf with Debian's nginx "
                    "(apt-get install nginx; .ci/run installs it)", pytrace=False)
    return found


def _replace(text: str, old: str, new: str, count: int) -> str:
    """Replace `old` in the directives (not the comments), which must hold it exactly `count` times,
    so an edit of the shipped file that moves what the test substitutes fails here instead of
    quietly testing something else."""
    lines = text.splitlines(keepends=True)
    directives = [i for i, line in enumerate(lines) if not line.lstrip().startswith("#")]
    found = sum(lines[i].count(old) for i in directives)
    assert found == count, f"deploy/nginx.conf's directives hold {old!r} {found} time(s), not {count}"
    for i in directives:
        lines[i] = lines[i].replace(old, new)
    return "".join(lines)


def upstream_servers(conf: str) -> list[tuple[str, int, str]]:
    """(host, port, parameters) of the upstream's server lines."""
    return [(m[2], int(m[3]), m[4].strip()) for m in UPSTREAM_SERVER.finditer(conf)]


def derive_conf(replica_ports: list[int], listen: int, root: Path, cache: bool = True) -> str:
    conf = NGINX_CONF.read_text()
    shipped = upstream_servers(conf)
    assert len(shipped) == len(replica_ports), f"deploy/nginx.conf names {len(shipped)} replicas"
    ports = iter(replica_ports)
    conf = UPSTREAM_SERVER.sub(lambda m: f"{m[1]}127.0.0.1:{next(ports)}{m[4]};", conf)  # parameters kept
    conf = _replace(conf, "listen 80;", f"listen 127.0.0.1:{listen};", 1)
    conf = _replace(conf, "/var/cache/nginx/bil", str(root / "cache"), 1)
    conf = _replace(conf, "/var/log/nginx/", f"{root}/", 1)
    if not cache:
        conf = _replace(conf, "proxy_cache bil;", "proxy_cache off;", 1)
    return conf


def _started(proc: subprocess.Popen, ready, log: Path, what: str) -> bool:
    """Wait for nginx's `ready()`; False if it exited because its port was taken meanwhile (the
    port was free when chosen), so the caller starts it again on another."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text()
            if "in use" in text:
                return False
            raise RuntimeError(f"{what} exited: {text}")
        try:
            if ready():
                return True
        except (OSError, requests.RequestException):
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not answer within 60 s: {log.read_text()}")


class Nginx:
    """Debian's nginx as an ordinary process: its own prefix, pid, temp paths and loopback port."""

    def __init__(self, replica_ports: list[int], root: Path, cache: bool = True):
        root.mkdir(parents=True)
        self.root = root
        temp = "\n".join(f"    {kind}_temp_path {root}/{kind};"
                         for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        (root / "nginx.conf").write_text(
            # as root (CI), workers would run as nobody, who cannot enter pytest's 0700 directories
            ("user root;\n" if os.geteuid() == 0 else "")
            + f"pid {root}/nginx.pid;\nerror_log {root}/error.log warn;\nevents {{ worker_connections 512; }}\n"
            f"http {{\n{temp}\n    include {root}/bil.conf;\n}}\n")
        command = [nginx_binary(), "-p", str(root), "-c", str(root / "nginx.conf"), "-e", str(root / "error.log")]
        for _ in range(3):
            self.port = _free_port()
            self.base = f"http://127.0.0.1:{self.port}"
            (root / "bil.conf").write_text(derive_conf(replica_ports, self.port, root, cache))
            check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
            assert check.returncode == 0, \
                f"nginx -t refused the configuration derived from deploy/nginx.conf:\n{check.stderr}"
            self.proc = subprocess.Popen([*command, "-g", "daemon off;"], stdout=open(root / "stdout", "w"),
                                         stderr=subprocess.STDOUT)
            if _started(self.proc, lambda: socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
                        or True, root / "error.log", "nginx"):
                return
        raise RuntimeError("no free port for nginx in three tries")

    def url(self, path: str) -> str:
        return self.base + path

    def error_log(self) -> str:
        return (self.root / "error.log").read_text()

    def stop(self) -> None:
        stop_process(self.proc)


def test_debians_nginx_is_installed():
    """Every test here runs nginx: without it they fail (never skip), this one saying why first."""
    version = subprocess.run([nginx_binary(), "-v"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and "nginx/" in version.stderr


class Fleet:
    """Three replicas (`serve --config CATALOG --port P --trust-forwarded`) and two nginx in front:
    `cached` runs deploy/nginx.conf as shipped, `direct` with its proxy_cache off, so every request
    through it reaches a replica (two load balancers that must agree on where each key goes)."""

    def __init__(self, root: Path, catalog: Path, tokens: Path):
        self.replicas: list[Server] = []
        self.nginx: list[Nginx] = []
        try:
            with ThreadPoolExecutor(3) as pool:
                starting = [pool.submit(Server, catalog, ["--trust-forwarded", "--tokens", str(tokens)])
                            for _ in range(3)]
                failed = None
                for future in starting:  # keep every one that started, to stop it if another did not
                    try:
                        self.replicas.append(future.result())
                    except Exception as exc:
                        failed = exc
                if failed is not None:
                    raise failed
            ports = [r.port for r in self.replicas]
            self.nginx.append(Nginx(ports, root / "cached"))
            self.nginx.append(Nginx(ports, root / "direct", cache=False))
        except BaseException:
            self.stop()
            raise
        self.cached, self.direct = self.nginx

    def stop(self) -> None:
        for process in self.nginx + self.replicas:
            process.stop()


def _catalog(sources, root: Path) -> tuple[Path, Path]:
    """The test datasets (absolute paths), plus `secret`: tiled8.tif again, under embargo."""
    _, catalog = sources
    text = re.sub(r'(?m)^path = "(.*)"$', lambda m: f'path = "{catalog.parent / m[1]}"', catalog.read_text())
    text += f'\n[[datasets]]\nid = "secret"\npath = "{catalog.parent / "tiled8.tif"}"\nembargo = true\n'
    (root / "catalog.toml").write_text(text)
    (root / "tokens.toml").write_text(f'[[tokens]]\ntoken = "{TOKEN}"\ndatasets = ["secret"]\n')
    return root / "catalog.toml", root / "tokens.toml"


@pytest.fixture(scope="module")
def fleet(sources, tmp_path_factory):
    nginx_binary()
    root = tmp_path_factory.mktemp("replicas")
    fleet = Fleet(root, *_catalog(sources, root))
    yield fleet
    fleet.stop()


# ---------------------------------------------------------------------------------------------
# what the replicas say about themselves, and what the test knows independently


def _value(base: str, name: str, **labels) -> float:
    text = requests.get(base + "/metrics", timeout=10).text
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def chunk_misses(fleet: Fleet) -> list[float]:
    """Per replica: encoded bodies it had to compute (misses of its chunk cache)."""
    return [_value(r.base, "bil_transform_cache_misses_total", cache="chunks") for r in fleet.replicas]


def answered(fleet: Fleet, view: str) -> float:
    """Requests of a view the replicas answered, all of them together."""
    return sum(_value(r.base, "bil_transform_requests_total", view=view) for r in fleet.replicas)


def precomputed_chunks(ident: str, shape: tuple[int, int, int], chunk: tuple[int, int, int],
                       limit: int | None = None) -> list[tuple[str, tuple[slice, ...]]]:
    """Level-0 chunk paths of a raw precomputed view and the (z, y, x) box each holds."""
    keys = []
    for z0 in range(0, shape[0], chunk[0]):
        for y0 in range(0, shape[1], chunk[1]):
            for x0 in range(0, shape[2], chunk[2]):
                z1, y1, x1 = (min(a + c, n) for a, c, n in zip((z0, y0, x0), chunk, shape))
                keys.append((f"/ds/{ident}/precomputed/0/{x0}-{x1}_{y0}-{y1}_{z0}-{z1}",
                             (slice(z0, z1), slice(y0, y1), slice(x0, x1))))
    return keys[:limit]


def decode_precomputed(body: bytes, want: np.ndarray) -> np.ndarray:
    """A raw precomputed chunk is Fortran-ordered [x, y, z, c]: C-ordered (c, z, y, x)."""
    return np.frombuffer(body, want.dtype.newbyteorder("<")).reshape(want.shape)


def zarr_chunks(ident: str, shape: tuple[int, int, int], chunk: tuple[int, int, int]):
    """Level-0 chunk paths of the uncompressed zarr v2 view (t=0, c=0) and the box each holds."""
    grid = [range(-(-n // c)) for n, c in zip(shape, chunk)]
    return [(f"/ds/{ident}/zarr-none/0/0/0/{z}/{y}/{x}",
             tuple(slice(i * c, min((i + 1) * c, n)) for i, c, n in zip((z, y, x), chunk, shape)))
            for z in grid[0] for y in grid[1] for x in grid[2]]


def decode_zarr(body: bytes, dtype: np.dtype, chunk: tuple[int, int, int], box: tuple[slice, ...]) -> np.ndarray:
    """zarr v2 edge chunks are stored whole: the part inside the array is the chunk's corner."""
    full = np.frombuffer(body, dtype.newbyteorder("<")).reshape(chunk)
    return full[tuple(slice(0, s.stop - s.start) for s in box)]


def grid_keys(sources, limit: int | None = None):
    """The two-channel uint16 `grid` dataset: many small precomputed chunks (8 x 16 x 16)."""
    data = sources[0]["grid"].data[0]  # (c, z, y, x)
    return [(path, data[(slice(None), *box)]) for path, box in precomputed_chunks("grid", data.shape[1:],
                                                                                  (8, 16, 16), limit)]


# ---------------------------------------------------------------------------------------------
# (a) one replica per key


def test_each_chunk_is_computed_by_exactly_one_replica(fleet, sources):
    """Every request below reaches a replica (the direct nginx stores nothing; the cached one misses
    once), in two encodings and through two nginx processes: each key is computed on one replica,
    the same one every time, and the keys are spread over the replicas."""
    owners = {}
    for path, want in grid_keys(sources, limit=48):
        before, reached = chunk_misses(fleet), answered(fleet, "precomputed")
        for nginx, headers in ((fleet.direct, GZIP), (fleet.direct, IDENTITY), (fleet.cached, GZIP)):
            r = requests.get(nginx.url(path), headers=headers, timeout=60)
            assert r.status_code == 200, (path, r.status_code, r.text[:200])
            np.testing.assert_array_equal(decode_precomputed(r.content, want), want)
        after = chunk_misses(fleet)
        assert answered(fleet, "precomputed") - reached == 3, "a request was answered without reaching a replica"
        computed_by = [i for i in range(3) if after[i] > before[i]]
        assert len(computed_by) == 1, f"{path} was computed by replicas {computed_by} ({before} -> {after})"
        owners[path] = computed_by[0]
    assert len(set(owners.values())) >= 2, f"48 keys all went to one replica: {owners}"


def _established_to(ports: set[int]) -> int:
    """Open TCP connections whose server end is one of `ports` (Linux: /proc/net/tcp)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(int(row[1].rsplit(":", 1)[1], 16) in ports and row[3] == "01" for row in rows)


def test_nginx_keeps_its_connections_to_the_replicas_open(fleet, sources):
    """HTTP/1.1 keepalive upstream: after the requests are answered their connections stay open for
    the next ones (without `keepalive`, or over HTTP/1.0, nginx closes each after its answer)."""
    ports = {r.port for r in fleet.replicas}
    for path, _ in grid_keys(sources, limit=12):
        assert requests.get(fleet.direct.url(path), timeout=60).status_code == 200
    assert _established_to(ports) >= 1


# ---------------------------------------------------------------------------------------------
# (b) every replica serves the right bytes, with the same ETags


@pytest.mark.parametrize("ident", ["tiled8", "slices16"])
def test_every_replica_and_both_proxies_serve_the_right_voxels(fleet, sources, ident):
    data = sources[0][ident].data[0, 0]  # (z, y, x) as written by tifffile
    meta = requests.get(fleet.replicas[0].url(f"/ds/{ident}/zarr-none/0/.zarray"), timeout=30).json()
    dtype, chunk = np.dtype(meta["dtype"]), tuple(meta["chunks"][2:])
    assert dtype == data.dtype and meta["shape"][2:] == list(data.shape)
    for path, box in zarr_chunks(ident, data.shape, chunk):
        tags = set()
        for base in [r.base for r in fleet.replicas] + [fleet.cached.base, fleet.direct.base]:
            r = requests.get(base + path, timeout=60)
            assert r.status_code == 200, (base, path, r.status_code, r.text[:200])
            np.testing.assert_array_equal(decode_zarr(r.content, dtype, chunk, box), data[box])
            tags.add(r.headers["ETag"])
        assert len(tags) == 1 and not tags.pop().startswith("W/"), f"{path}: the replicas disagree on its ETag"


def test_links_name_the_proxy_and_a_client_cannot_forge_them(fleet):
    """X-Forwarded-* from nginx (replicas run --trust-forwarded); whatever forwarding headers a
    client sends itself are replaced, and pages and the API are never stored in the shared cache."""
    for nginx in (fleet.cached, fleet.direct):
        for forged in ({}, {"Forwarded": 'proto=https;host="evil.example"'},
                       {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https"}):
            r = requests.get(nginx.url("/api/datasets/grid"), headers=forged, timeout=30)
            assert r.status_code == 200 and r.headers.get("X-Cache-Status") != "HIT"
            assert r.json()["links"]["zarr"] == nginx.url("/ds/grid/zarr"), forged
        r = requests.get(nginx.url("/api/datasets/grid"), headers={"Host": "data.example.org"}, timeout=30)
        assert r.json()["links"]["zarr"] == "http://data.example.org/ds/grid/zarr"


# ---------------------------------------------------------------------------------------------
# (d) the shared cache keeps the replicas' strong ETags


def test_the_cache_hits_with_the_replicas_etag_and_answers_304(fleet, sources):
    data = sources[0]["slices16"].data[0]  # (c=1, z, y, x); raw precomputed chunks are gzip-encoded on request
    for path, box in precomputed_chunks("slices16", data.shape[1:], (37, 64, 64)):
        want = data[(slice(None), *box)]
        first = requests.get(fleet.cached.url(path), headers=GZIP, timeout=60)
        assert first.status_code == 200 and first.headers["X-Cache-Status"] == "MISS"
        assert first.headers["Content-Encoding"] == "gzip" and first.headers["Vary"] == "Accept-Encoding"
        np.testing.assert_array_equal(decode_precomputed(first.content, want), want)
        tag = first.headers["ETag"]
        assert re.fullmatch(r'"[0-9a-f]+-gzip"', tag)
        assert {requests.get(r.url(path), headers=GZIP, timeout=60).headers["ETag"] for r in fleet.replicas} == {tag}

        reached = answered(fleet, "precomputed")
        again = requests.get(fleet.cached.url(path), headers=GZIP, timeout=60)
        assert again.headers["X-Cache-Status"] == "HIT" and again.headers["ETag"] == tag
        assert again.content == first.content
        for header in (tag, f'"elsewhere", {tag}'):
            r = requests.get(fleet.cached.url(path), headers={**GZIP, "If-None-Match": header}, timeout=60)
            assert r.status_code == 304 and r.headers["ETag"] == tag and r.content == b""
        stale = requests.get(fleet.cached.url(path), headers={**GZIP, "If-None-Match": '"elsewhere"'}, timeout=60)
        assert stale.status_code == 200 and stale.content == first.content
        assert answered(fleet, "precomputed") == reached, "a hit or a 304 went to a replica"

        # the identity form is another entry, with the identity ETag; a range is cut from it
        plain = requests.get(fleet.cached.url(path), headers=IDENTITY, timeout=60)
        assert plain.status_code == 200 and "Content-Encoding" not in plain.headers
        identity_tag = plain.headers["ETag"]
        assert identity_tag == tag.replace("-gzip", "")
        np.testing.assert_array_equal(decode_precomputed(plain.content, want), want)
        r = requests.get(fleet.cached.url(path), headers={**IDENTITY, "If-None-Match": identity_tag}, timeout=60)
        assert r.status_code == 304 and r.headers["X-Cache-Status"] == "HIT"
        part = requests.get(fleet.cached.url(path), headers={**GZIP, "Range": "bytes=100-299"}, timeout=60)
        assert part.status_code == 206 and "Content-Encoding" not in part.headers
        assert part.headers["Content-Range"] == f"bytes 100-299/{len(plain.content)}"
        assert part.content == plain.content[100:300] and part.headers["ETag"] == identity_tag


def test_concurrent_misses_of_one_key_reach_one_replica_once(fleet, sources):
    """proxy_cache_lock: a cold chunk asked for by many clients at once is fetched once."""
    path, want = grid_keys(sources)[-1]  # a key no other test asks the cached nginx for
    reached = answered(fleet, "precomputed")
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: requests.get(fleet.cached.url(path), headers=GZIP, timeout=60), range(8)))
    assert [r.status_code for r in replies] == [200] * 8
    assert len({r.headers["ETag"] for r in replies}) == 1
    for r in replies:
        np.testing.assert_array_equal(decode_precomputed(r.content, want), want)
    assert answered(fleet, "precomputed") - reached == 1


def test_embargoed_voxels_never_enter_the_shared_cache(fleet, sources):
    """A shared cache that stored a body fetched with a token would give it to anyone. The replicas
    mark embargoed answers Cache-Control: private, and nginx.conf keeps token requests out besides."""
    data = sources[0]["tiled8"].data[0, 0]
    path, box = zarr_chunks("secret", data.shape, (45, 64, 64))[0]
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for headers, url in ((bearer, fleet.cached.url(path)), ({}, fleet.cached.url(f"/token/{TOKEN}{path}"))):
        for _ in range(2):
            r = requests.get(url, headers=headers, timeout=60)
            assert r.status_code == 200, r.text[:200]
            # bypassed with a token header; not cached at all in the /token/ location
            assert r.headers.get("X-Cache-Status") == ("BYPASS" if headers else None), r.headers
            assert r.headers["Cache-Control"] == "private, max-age=3600"
            np.testing.assert_array_equal(decode_zarr(r.content, data.dtype, (45, 64, 64), box), data[box])
        anonymous = requests.get(fleet.cached.url(path), timeout=60)
        assert anonymous.status_code == 401, "an embargoed chunk was served to a request without a token"
    # a token URL's ranges and conditional requests reach the replica as sent
    whole = requests.get(fleet.cached.url(f"/token/{TOKEN}{path}"), timeout=60)
    r = requests.get(fleet.cached.url(f"/token/{TOKEN}{path}"), headers={"Range": "bytes=5-9"}, timeout=60)
    assert r.status_code == 206 and r.headers["Content-Range"] == f"bytes 5-9/{len(whole.content)}"
    assert r.content == whole.content[5:10]
    r = requests.get(fleet.cached.url(f"/token/{TOKEN}{path}"), headers={"If-None-Match": whole.headers["ETag"]},
                     timeout=60)
    assert r.status_code == 304
    stored = b"".join(p.read_bytes() for p in (fleet.cached.root / "cache").rglob("*") if p.is_file())
    assert b"/ds/secret/" not in stored and TOKEN.encode() not in stored


# ---------------------------------------------------------------------------------------------
# (c) a replica stops


def test_a_stopped_replicas_keys_move_to_the_others_without_a_client_error(sources, tmp_path):
    nginx_binary()
    fleet = Fleet(tmp_path, *_catalog(sources, tmp_path))
    try:
        keys = grid_keys(sources, limit=36)
        owners = {}
        for path, _ in keys:  # warm every key on its replica, learning which one that is
            before = chunk_misses(fleet)
            r = requests.get(fleet.direct.url(path), headers=GZIP, timeout=60)
            assert r.status_code == 200
            owners[path] = [i for i, (a, b) in enumerate(zip(before, chunk_misses(fleet))) if b > a]
            assert len(owners[path]) == 1, (path, owners[path])
        counts = [sum(o == [i] for o in owners.values()) for i in range(3)]
        victim = counts.index(max(counts))
        moved = [(p, w) for p, w in keys if owners[p] == [victim]]
        kept = [(p, w) for p, w in keys if owners[p] != [victim]]
        assert len(moved) >= len(keys) // 3
        fleet.replicas[victim].stop()
        survivors = [i for i in range(3) if i != victim]

        def misses() -> list[float]:
            return [_value(fleet.replicas[i].base, "bil_transform_cache_misses_total", cache="chunks")
                    for i in survivors]

        for path, want in moved + kept:
            before = misses()
            r = requests.get(fleet.direct.url(path), headers=GZIP, timeout=60)
            assert r.status_code == 200, (path, r.status_code, r.text[:200])
            np.testing.assert_array_equal(decode_precomputed(r.content, want), want)
            grew = [survivors[i] for i, (a, b) in enumerate(zip(before, misses())) if b > a]
            if owners[path] == [victim]:
                assert len(grew) == 1, f"{path}, whose replica stopped, was computed by {grew}"
            else:
                assert grew == [], f"{path} left its running replica for {grew}"
        assert "Connection refused" in fleet.direct.error_log()  # the stopped replica was tried, and retried past

        # while it is down its keys stay where they went, and the cached nginx fails over too
        before = misses()
        for path, want in moved:
            for nginx in (fleet.direct, fleet.cached):
                r = requests.get(nginx.url(path), headers=GZIP, timeout=60)
                assert r.status_code == 200, (nginx.base, path, r.status_code)
                np.testing.assert_array_equal(decode_precomputed(r.content, want), want)
        assert misses() == before, "a moved key was computed again, on another replica"
        assert "Connection refused" in fleet.cached.error_log()
    finally:
        fleet.stop()


# ---------------------------------------------------------------------------------------------
# deploy/compose.yaml, without docker


PARSE = """
import json, sys
import bil_transform.cli as cli
class Parsed(Exception):
    pass
def capture(args):
    raise Parsed(args)
cli.cmd_serve = capture
for argv in json.loads(sys.argv[1]):
    try:
        cli.main(argv)
    except Parsed as parsed:
        print(json.dumps(vars(parsed.args[0]), default=str))
"""


def _parse_serve(commands: list[list[str]]) -> list[dict]:
    """Each argv parsed by the real CLI (bil_transform.cli.main, with serving replaced by a report)."""
    run = subprocess.run([sys.executable, "-c", PARSE, json.dumps(commands)], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, f"a command does not parse: {run.stderr}"
    parsed = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(parsed) == len(commands), f"not every command is a `serve`: {commands}"
    return parsed


def test_compose_runs_the_replicas_nginx_conf_names():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    replicas = {name: s for name, s in services.items() if "serve" in (s.get("command") or [])}
    upstream = upstream_servers(NGINX_CONF.read_text())
    assert sorted(replicas) == sorted(host for host, _, _ in upstream)
    assert len(replicas) == 3

    volumes = None
    parsed = _parse_serve([s["command"] for s in replicas.values()])  # the image's ENTRYPOINT is bil-transform
    for (name, service), args in zip(replicas.items(), parsed):
        assert (DEPLOY / service["build"]["context"] / service["build"].get("dockerfile", "Dockerfile")).is_file()
        assert args["command"] == "serve" and args["trust_forwarded"] is True
        assert args["host"] == "0.0.0.0" and (name, args["port"]) in {(h, p) for h, p, _ in upstream}
        cache = [v for v in service["volumes"] if v.endswith(f":{args['disk_cache']}")]  # the one writable mount
        assert len(cache) == 1 and cache[0].split(":")[0] in compose["volumes"], f"{name}: --disk-cache {cache}"
        mounts = [v.rsplit(":", 2) for v in service["volumes"] if v not in cache]
        assert all(len(m) == 3 and m[2] == "ro" for m in mounts), f"{name}: mount the data read-only"
        assert any(args["config"] == target or args["config"].startswith(target.rstrip("/") + "/")
                   for _, target, _ in mounts), f"{name}: its catalog {args['config']} is not mounted"
        assert volumes in (None, service["volumes"]), "the replicas must serve the same data"
        volumes = service["volumes"]
        assert not service.get("ports"), f"{name} is published: clients must go through nginx"

    nginx = services["nginx"]
    assert nginx["image"].startswith("nginx")
    assert sorted(nginx["depends_on"]) == sorted(replicas)
    assert "./nginx.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert len(published) == 1 and published[0].rsplit(":", 1)[1] == "80"  # nginx.conf's `listen 80;`
