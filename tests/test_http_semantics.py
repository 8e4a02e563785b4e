"""HTTP semantics clients rely on (CONFORMANCE.md §0, §4, §7): byte ranges on shards and on ordinary
resources, shards computed lazily, gzip, ETag/304, a changed source file, CORS.

Shard layouts are decoded here from the specs (zarr v3 sharding_indexed; Neuroglancer sharded.md) with
numpy, crc32c and numcodecs, and compared with the voxels the sources were written with; nothing here
uses the server's own code.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import shutil

import crc32c
import numcodecs
import numpy as np
import pytest
import requests
import tifffile
from conftest import Server
from reference import compressed_morton

EMPTY = 2**64 - 1  # zarr sharding_indexed: an inner chunk that is not stored
GZIP = {"Accept-Encoding": "gzip"}
# The grid dataset (t, c, z, y, x) = (1, 2, 23, 150, 170), chunk 8 x 16 x 16: a zarr3 shard of 3 x 4 x 4 inner
# chunks. Shard (z, y, x) = (0, 2, 2) is at the far y/x corner, so only 3 x 2 x 3 of its inner chunks exist.
ZARR_SHARD = "/ds/grid/zarr3-sharded/0/c/0/1/0/2/2"
EXPOSED = ("content-range", "content-length", "etag", "content-encoding")


def _one_sentence(text: str) -> bool:
    text = text.strip()
    return text.endswith(".") and "\n" not in text and len(text) > 10


def _misses(srv: Server) -> int:
    """Chunks encoded so far (misses of the encoded-chunk cache; a source slab read once for many
    blocks is counted in other sections)."""
    text = requests.get(srv.url("/metrics")).text
    return int(float(re.search(r'^bil_transform_cache_misses_total\{cache="chunks"\} (\S+)$', text, re.M).group(1)))


def _padded(region: np.ndarray, shape) -> np.ndarray:
    """A zarr edge chunk: the region at the origin of a zero chunk of the full chunk shape."""
    out = np.zeros(shape, region.dtype)
    out[tuple(slice(0, n) for n in region.shape)] = region
    return out


def _zarr_shard_layout(srv: Server, view: str = "zarr3-sharded") -> tuple[list[int], list[int], dict]:
    """(inner chunk shape, inner chunks per shard along z, y, x, the sharding codec) from level 0's zarr.json."""
    meta = requests.get(srv.url(f"/ds/grid/{view}/0/zarr.json")).json()
    (codec,) = meta["codecs"]
    assert codec["name"] == "sharding_indexed" and codec["configuration"]["index_location"] == "end"
    inner = codec["configuration"]["chunk_shape"][2:]
    outer = meta["chunk_grid"]["configuration"]["chunk_shape"][2:]
    assert all(o % i == 0 and 1 <= o // i <= 4 for o, i in zip(outer, inner))
    return inner, [o // i for o, i in zip(outer, inner)], codec


def _inner_cells(shard: tuple[int, int, int], counts: list[int], inner: list[int], shape) -> list[tuple | None]:
    """Each inner chunk's grid cell (z, y, x) in C order, or None where it lies wholly past the array."""
    cells = []
    for within in np.ndindex(*counts):
        cell = tuple(s * n + w for s, n, w in zip(shard, counts, within))
        cells.append(cell if all(c * i < s for c, i, s in zip(cell, inner, shape)) else None)
    return cells


def _region(data: np.ndarray, cell, chunk) -> np.ndarray:
    """The voxels of grid cell `cell` (z, y, x) of a (..., z, y, x) array, clipped to the array."""
    return data[(..., *(slice(c * n, (c + 1) * n) for c, n in zip(cell, chunk)))]


# --- 1. Ranges on shards, and the shard layouts decoded independently -----------------------------------

def _check_ranges(url: str) -> bytes:
    """Whole body, then first/middle/open-ended/suffix ranges, unsatisfiable ranges and HEAD; returns the body."""
    whole = requests.get(url, headers=GZIP)
    assert whole.status_code == 200 and whole.headers["Accept-Ranges"] == "bytes"
    assert "Content-Encoding" not in whole.headers  # a shard is never gzipped: clients range into it
    body = whole.content
    total = len(body)
    assert int(whole.headers["Content-Length"]) == total > 1000
    mid = total // 3
    cases = {
        "bytes=0-99": (0, 100),
        f"bytes={mid}-{mid + 499}": (mid, mid + 500),
        f"bytes={total - 300}-": (total - 300, total),
        "bytes=-68": (total - 68, total),
        f"bytes=-{total + 50}": (0, total),  # a suffix longer than the body is the whole body
        f"bytes={total - 10}-{total + 1000}": (total - 10, total),  # a last byte past the end is clipped
    }
    for spec, (start, stop) in cases.items():
        r = requests.get(url, headers={"Range": spec, **GZIP})
        assert r.status_code == 206, spec
        assert r.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{total}", spec
        assert "Content-Encoding" not in r.headers, spec
        assert int(r.headers["Content-Length"]) == stop - start and r.content == body[start:stop], spec
        assert r.headers["ETag"] == whole.headers["ETag"]
    for spec in (f"bytes={total}-", f"bytes={total + 5}-{total + 10}"):
        r = requests.get(url, headers={"Range": spec})
        assert r.status_code == 416, spec
        assert r.headers["Content-Range"] == f"bytes */{total}", spec
    head = requests.head(url, headers=GZIP)
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["Content-Length"]) == total and "Content-Encoding" not in head.headers
    assert head.headers["ETag"] == whole.headers["ETag"]
    head = requests.head(url, headers={"Range": "bytes=-68"})
    assert head.status_code == 206 and head.content == b"" and int(head.headers["Content-Length"]) == 68
    assert head.headers["Content-Range"] == f"bytes {total - 68}-{total - 1}/{total}"
    return body


def test_zarr_shard_ranges_and_index(server, sources):
    body = _check_ranges(server.url(ZARR_SHARD))
    inner, counts, codec = _zarr_shard_layout(server)
    assert [c["name"] for c in codec["configuration"]["index_codecs"]] == ["bytes", "crc32c"]
    assert codec["configuration"]["codecs"][-1]["name"] == "blosc"
    n = math.prod(counts)
    index_bytes, checksum = body[-(16 * n + 4):-4], body[-4:]
    assert crc32c.crc32c(index_bytes) == int.from_bytes(checksum, "little")
    index = np.frombuffer(index_bytes, "<u8").reshape(n, 2)
    truth = sources[0]["grid"].data[0, 1]  # channel 1 at t 0
    cells = _inner_cells((0, 2, 2), counts, inner, truth.shape)
    spans = []
    for cell, (offset, nbytes) in zip(cells, index.tolist()):
        if cell is None:
            assert offset == nbytes == EMPTY
            continue
        assert offset + nbytes <= len(body) - len(index_bytes) - 4
        spans.append((offset, offset + nbytes))
        decoded = np.frombuffer(numcodecs.Blosc().decode(body[offset:offset + nbytes]), "<u2").reshape(inner)
        np.testing.assert_array_equal(decoded, _padded(_region(truth, cell, inner), inner))
    assert 0 < len(spans) < n  # an edge shard: some inner chunks stored, some not
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # stored chunks do not overlap


def test_precomputed_shard_ranges_and_index(server, sources):
    info = requests.get(server.url("/ds/grid/precomputed-sharded/info")).json()
    scale = info["scales"][0]
    spec = scale["sharding"]
    assert spec["@type"] == "neuroglancer_uint64_sharded_v1" and spec["hash"] == "identity"
    assert spec["minishard_index_encoding"] == spec["data_encoding"] == "raw" and scale["encoding"] == "raw"
    assert info["data_type"] == "uint16" and info["num_channels"] == 2
    pre, mbits, sbits = spec["preshift_bits"], spec["minishard_bits"], spec["shard_bits"]
    size, chunk = scale["size"], scale["chunk_sizes"][0]  # x, y, z
    grid = [-(-s // c) for s, c in zip(size, chunk)]
    corner = tuple(g - 1 for g in grid)  # clipped along every axis
    cells = {compressed_morton(cell, grid): cell for cell in np.ndindex(*grid)}
    assert len(cells) == math.prod(grid)  # the code is one-to-one on the grid
    h = compressed_morton(corner, grid) >> pre
    shard = (h >> mbits) & (2**sbits - 1)
    name = f"{shard:0{max(1, -(-sbits // 4))}x}.shard"
    body = _check_ranges(server.url(f"/ds/grid/precomputed-sharded/{scale['key']}/{name}"))

    index_end = 16 * 2**mbits
    shard_index = np.frombuffer(body[:index_end], "<u8").reshape(-1, 2).tolist()
    found = {}
    for minishard, (start, end) in enumerate(shard_index):
        assert start <= end and (end - start) % 24 == 0
        table = np.frombuffer(body[index_end + start:index_end + end], "<u8").reshape(3, -1).tolist()
        ids = np.cumsum(table[0], dtype=np.uint64).tolist()
        position = index_end  # the first offset is relative to the end of the shard index
        for ident, delta, nbytes in zip(ids, table[1], table[2]):
            position += delta  # later ones to the end of the previous chunk
            assert (ident >> pre) & (2**mbits - 1) == minishard and (ident >> pre >> mbits) == shard
            assert position + nbytes <= len(body)
            found[ident] = body[position:position + nbytes]
            position += nbytes
    assert set(found) == {code for code in cells if (code >> pre >> mbits) & (2**sbits - 1) == shard}
    assert compressed_morton(corner, grid) in found
    truth = sources[0]["grid"].data[0]  # (c, z, y, x)
    for ident, data in found.items():
        want = _region(truth, cells[ident][::-1], chunk[::-1])  # clipped, not padded
        # raw: [x, y, z, channel] with x fastest, i.e. the C-order bytes of (c, z, y, x)
        np.testing.assert_array_equal(np.frombuffer(data, "<u2").reshape(want.shape), want)


# --- 2. and 5. A server of our own: a cold cache, and sources checked on every request ------------------

TOUCH_SHAPE = (6, 30, 40)


@pytest.fixture(scope="module")
def fresh(sources, tmp_path_factory):
    """A server over copies of `grid` and of a small TIFF, with a cold cache and --recheck 0."""
    root = tmp_path_factory.mktemp("fresh")
    shutil.copytree(sources[1].parent / "grid.zarr", root / "grid.zarr")
    first = np.random.default_rng(1).integers(0, 60000, TOUCH_SHAPE, dtype=np.uint16)
    tifffile.imwrite(root / "touch.tif", first)
    catalog = root / "catalog.toml"
    catalog.write_text('[[datasets]]\nid = "grid"\npath = "grid.zarr"\nvoxel_size = [2.0, 0.5, 0.5]\n'
                       'chunk = [8, 16, 16]\n\n'
                       '[[datasets]]\nid = "touch"\npath = "touch.tif"\nvoxel_size = [1.0, 1.0, 1.0]\n')
    srv = Server(catalog, ["--recheck", "0"])
    yield srv, root, first
    srv.stop()


def test_a_range_computes_only_the_chunks_it_covers(fresh, sources):
    srv = fresh[0]
    inner, counts, codec = _zarr_shard_layout(srv, "zarr3-sharded-none")
    assert [c["name"] for c in codec["configuration"]["codecs"]] == ["bytes"]  # uncompressed inner chunks
    truth = sources[0]["grid"].data
    chunk_bytes = math.prod(inner) * truth.dtype.itemsize
    # channel 0 and channel 1 of the same corner shard: never requested, the same number of stored chunks
    cells = _inner_cells((0, 2, 2), counts, inner, truth.shape[2:])
    stored = [c for c in cells if c is not None]
    k = len(stored) // 2
    url = srv.url("/ds/grid/zarr3-sharded-none/0/c/0/0/0/2/2")

    before = _misses(srv)
    part = requests.get(url, headers={"Range": f"bytes={k * chunk_bytes}-{(k + 1) * chunk_bytes - 1}"})
    range_misses = _misses(srv) - before
    assert part.status_code == 206
    total = chunk_bytes * len(stored) + 16 * len(cells) + 4
    assert part.headers["Content-Range"] == f"bytes {k * chunk_bytes}-{(k + 1) * chunk_bytes - 1}/{total}"
    got = np.frombuffer(part.content, "<u2").reshape(inner)
    np.testing.assert_array_equal(got, _padded(_region(truth[0, 0], stored[k], inner), inner))

    before = _misses(srv)
    whole = requests.get(srv.url("/ds/grid/zarr3-sharded-none/0/c/0/1/0/2/2"))
    whole_misses = _misses(srv) - before
    assert whole.status_code == 200 and len(whole.content) == total
    assert range_misses >= 1  # the covered chunk itself had to be computed ...
    assert range_misses * len(stored) <= whole_misses  # ... but no more than one chunk's share of the whole shard

    before = _misses(srv)
    assert requests.get(url).content[k * chunk_bytes:(k + 1) * chunk_bytes] == part.content
    assert len(stored) - 1 <= _misses(srv) - before  # the rest of that shard is computed only now
    before = _misses(srv)
    assert requests.get(url).status_code == 200 and _misses(srv) == before  # and then cached


def test_head_and_index_range_compute_no_chunk(fresh, sources):
    srv = fresh[0]
    inner, counts, _ = _zarr_shard_layout(srv, "zarr3-sharded-none")
    truth = sources[0]["grid"].data
    chunk_bytes = math.prod(inner) * truth.dtype.itemsize
    n = math.prod(counts)  # shard (0, 0, 0) is full: every inner chunk is stored
    total = n * chunk_bytes + 16 * n + 4
    url = srv.url("/ds/grid/zarr3-sharded-none/0/c/0/1/0/0/0")

    before = _misses(srv)
    head = requests.head(url)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == total and head.content == b""
    index = requests.get(url, headers={"Range": f"bytes=-{16 * n + 4}"})  # what zarr-python reads first
    assert _misses(srv) == before  # neither computed a chunk
    assert index.status_code == 206
    assert index.headers["Content-Range"] == f"bytes {n * chunk_bytes}-{total - 1}/{total}"
    pairs = np.frombuffer(index.content[:-4], "<u8").reshape(n, 2)
    np.testing.assert_array_equal(pairs, [[i * chunk_bytes, chunk_bytes] for i in range(n)])
    assert crc32c.crc32c(index.content[:-4]) == int.from_bytes(index.content[-4:], "little")


def test_a_changed_source_changes_etag_and_bytes(fresh):
    srv, root, first = fresh
    url = srv.url("/ds/touch/zarr-none/0/0/0/0/0/0")  # the volume is smaller than a chunk: one chunk, unpadded
    old = requests.get(url)
    assert old.status_code == 200
    np.testing.assert_array_equal(np.frombuffer(old.content, "<u2").reshape(TOUCH_SHAPE), first)
    old_tag = old.headers["ETag"]
    assert requests.get(url, headers={"If-None-Match": old_tag}).status_code == 304

    path = root / "touch.tif"
    second = (first[::-1] // 2 + 7).astype(np.uint16)
    assert not np.array_equal(first, second)
    tifffile.imwrite(path, second)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))

    new = requests.get(url)
    assert new.status_code == 200 and new.headers["ETag"] != old_tag
    np.testing.assert_array_equal(np.frombuffer(new.content, "<u2").reshape(TOUCH_SHAPE), second)
    stale = requests.get(url, headers={"If-None-Match": old_tag})
    assert stale.status_code == 200 and stale.content == new.content
    assert requests.get(url, headers={"If-None-Match": new.headers["ETag"]}).status_code == 304


# --- 3. Ranges and gzip on ordinary resources ---------------------------------------------------------

ORDINARY = [
    "/ds/slices16/zarr/0/0/0/0/1/1",  # a blosc zarr chunk
    "/ds/slices16/precomputed/0/0-64_0-64_0-37",  # a raw precomputed chunk: gzipped when whole
    "/ds/grid/precomputed/info",
    "/ds/slices16/zarr/0/.zarray",
]


@pytest.mark.parametrize("path", ORDINARY)
def test_ranges_on_ordinary_resources_are_never_gzipped(server, path):
    url = server.url(path)
    body = requests.get(url, headers={"Accept-Encoding": "identity"}).content
    total = len(body)
    assert total > 100
    for spec, (start, stop) in {"bytes=0-49": (0, 50), "bytes=20-": (20, total), "bytes=-30": (total - 30, total),
                                f"bytes=10-{total + 99}": (10, total)}.items():
        r = requests.get(url, headers={"Range": spec, **GZIP})
        assert r.status_code == 206, spec
        assert "Content-Encoding" not in r.headers, spec
        assert r.headers["Content-Range"] == f"bytes {start}-{stop - 1}/{total}", spec
        assert r.content == body[start:stop], spec
    r = requests.get(url, headers={"Range": f"bytes={total}-"})
    assert r.status_code == 416 and r.headers["Content-Range"] == f"bytes */{total}"


@pytest.mark.parametrize("path", ["/ds/grid/precomputed/info", "/ds/slices16/zarr/0/.zarray",
                                  "/ds/slices16/precomputed/0/0-64_0-64_0-37"])
def test_whole_compressible_bodies_are_gzipped_and_head_reports_identity(server, path):
    url = server.url(path)
    plain = requests.get(url, headers={"Accept-Encoding": "identity"})
    assert plain.status_code == 200 and "Content-Encoding" not in plain.headers
    zipped = requests.get(url, headers=GZIP, stream=True)
    raw = zipped.raw.read(decode_content=False)
    assert zipped.status_code == 200 and zipped.headers["Content-Encoding"] == "gzip"
    assert "accept-encoding" in zipped.headers["Vary"].lower()
    assert int(zipped.headers["Content-Length"]) == len(raw) and gzip.decompress(raw) == plain.content
    head = requests.head(url, headers=GZIP)
    assert head.status_code == 200 and "Content-Encoding" not in head.headers and head.content == b""
    assert int(head.headers["Content-Length"]) == len(plain.content)
    assert head.headers["ETag"] == plain.headers["ETag"]


@pytest.mark.parametrize("spec", ["bytes=abc", "bytes=5-2", "bytes=-"])
@pytest.mark.parametrize("path", ["/ds/slices16/zarr/0/.zarray", ZARR_SHARD])
def test_malformed_ranges_are_400_with_one_sentence(server, path, spec):
    r = requests.get(server.url(path), headers={"Range": spec})
    assert r.status_code == 400, spec
    assert _one_sentence(r.text), r.text
    assert r.headers["Access-Control-Allow-Origin"] == "*"


@pytest.mark.parametrize("spec", ["pages=0-5", "bytes=0-5,7-9"])
def test_other_units_and_multiple_ranges_may_get_the_whole_body(server, spec):
    # RFC 9110 §14.2: a Range in a unit the server does not know is ignored; several ranges may be answered whole
    url = server.url("/ds/slices16/zarr/0/.zarray")
    r = requests.get(url, headers={"Range": spec, "Accept-Encoding": "identity"})
    assert r.status_code == 200 and "Content-Range" not in r.headers
    assert r.content == requests.get(url, headers={"Accept-Encoding": "identity"}).content


# --- 4. ETag and 304 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/ds/slices16/zarr/0/.zarray", "/ds/tiled8/zarr3/0/c/0/0/0/0/0", ZARR_SHARD])
def test_etag_and_conditional_get(server, path):
    url = server.url(path)
    r = requests.get(url, headers={"Accept-Encoding": "identity"})
    tag = r.headers["ETag"]
    assert r.status_code == 200 and re.fullmatch(r'"[!#-~]+"', tag)  # strong, quoted, no W/
    assert "max-age" in r.headers["Cache-Control"]
    same = requests.get(url, headers={"If-None-Match": tag, "Accept-Encoding": "identity"})
    assert same.status_code == 304 and same.content == b"" and same.headers["ETag"] == tag
    assert "max-age" in same.headers["Cache-Control"]
    listed = requests.get(url, headers={"If-None-Match": f'"nope", {tag}', "Accept-Encoding": "identity"})
    assert listed.status_code == 304
    other = requests.get(url, headers={"If-None-Match": '"not-this-one"', "Accept-Encoding": "identity"})
    assert other.status_code == 200 and other.content == r.content and other.headers["ETag"] == tag
    ranged = requests.get(url, headers={"If-None-Match": tag, "Range": "bytes=0-9"})
    assert ranged.status_code == 304 and ranged.content == b""
    assert requests.head(url, headers={"If-None-Match": tag}).status_code == 304


def test_the_gzip_variant_has_its_own_etag(server):
    url = server.url("/ds/grid/precomputed/info")
    plain = requests.get(url, headers={"Accept-Encoding": "identity"})
    zipped = requests.get(url, headers=GZIP)
    assert zipped.headers["Content-Encoding"] == "gzip"
    assert zipped.headers["ETag"] != plain.headers["ETag"] and not zipped.headers["ETag"].startswith("W/")
    again = requests.get(url, headers={"If-None-Match": zipped.headers["ETag"], **GZIP})
    assert again.status_code == 304 and again.headers["ETag"] == zipped.headers["ETag"]


# --- 6. CORS ---------------------------------------------------------------------------------------------

def _cors_statuses(server) -> dict[int, requests.Response]:
    url = server.url(ZARR_SHARD)
    ok = requests.get(url, headers={"Origin": "http://example.org"})
    total = len(ok.content)
    with_origin = {"Origin": "http://example.org"}
    return {
        200: ok,
        206: requests.get(url, headers={"Range": "bytes=-68", **with_origin}),
        304: requests.get(url, headers={"If-None-Match": ok.headers["ETag"], **with_origin}),
        400: requests.get(url, headers={"Range": "bytes=abc", **with_origin}),
        404: requests.get(server.url("/ds/grid/zarr3-sharded/0/c/0/1/0/9/9"), headers=with_origin),
        416: requests.get(url, headers={"Range": f"bytes={total}-", **with_origin}),
    }


def test_cors_on_every_status(server):
    for status, r in _cors_statuses(server).items():
        assert r.status_code == status
        assert r.headers.get("Access-Control-Allow-Origin") == "*", status
        exposed = {h.strip().lower() for h in r.headers.get("Access-Control-Expose-Headers", "").split(",")}
        assert "*" in exposed or exposed >= set(EXPOSED), (status, exposed)


@pytest.mark.parametrize("path", [ZARR_SHARD, "/ds/grid/precomputed-sharded/info", "/ds/nope/zarr/.zattrs"])
def test_preflight_allows_range_reads(server, path):
    r = requests.options(server.url(path), headers={"Origin": "http://example.org",
                                                    "Access-Control-Request-Method": "GET",
                                                    "Access-Control-Request-Headers": "range"})
    assert 200 <= r.status_code < 300
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    methods = {m.strip().upper() for m in r.headers["Access-Control-Allow-Methods"].split(",")}
    assert {"GET", "HEAD"} <= methods
    allowed = {h.strip().lower() for h in r.headers["Access-Control-Allow-Headers"].split(",")}
    assert "range" in allowed or "*" in allowed
