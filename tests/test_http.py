"""HTTP behaviour clients rely on: 404 for missing keys, CORS everywhere, HEAD, 400 for malformed keys."""

from __future__ import annotations

import pytest
import requests

MISSING = [
    "/ds/slices16/zarr/zarr.json",  # zarr v3 probe
    "/ds/slices16/zarr3/.zattrs",
    "/ds/slices16/zarr/labels/.zattrs",  # ome-zarr-py's labels probe
    "/ds/slices16/zarr/labels/.zgroup",
    "/ds/slices16/zarr/labels/zarr.json",
    "/ds/slices16/zarr/0/zarr.json",
    "/ds/slices16/zarr/0/.zgroup",
    "/ds/slices16/zarr/9/.zarray",  # no such level
    "/ds/slices16/zarr/0/0/0/5/0/0",  # past the chunk grid
    "/ds/slices16/zarr/0/1/0/0/0/0",  # no channel 1
    "/ds/nope/zarr/.zattrs",  # unknown dataset
    "/api/datasets/nope",
    "/no/such/route",
]


@pytest.mark.parametrize("path", MISSING)
def test_missing_keys_are_404_with_cors(server, path):
    r = requests.get(server.url(path))
    assert r.status_code == 404
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert r.text.strip().endswith(".") and "\n" not in r.text.strip()  # one sentence


def test_cors_on_success_and_preflight(server):
    r = requests.get(server.url("/ds/slices16/zarr/.zattrs"), headers={"Origin": "http://example.org"})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    assert "ETag" in r.headers["Access-Control-Expose-Headers"]
    r = requests.options(server.url("/ds/slices16/zarr/0/0/0/0/0/0"),
                         headers={"Origin": "http://example.org", "Access-Control-Request-Method": "GET",
                                  "Access-Control-Request-Headers": "range"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "GET" in r.headers["Access-Control-Allow-Methods"]
    assert "range" in r.headers["Access-Control-Allow-Headers"].lower()


@pytest.mark.parametrize("path", ["/ds/slices16/zarr/0/.zarray", "/ds/slices16/zarr/1/0/0/0/1/1"])
def test_head_has_the_get_length_and_no_body(server, path):
    get = requests.get(server.url(path), headers={"Accept-Encoding": "identity"})
    head = requests.head(server.url(path))
    assert head.status_code == get.status_code == 200
    assert int(head.headers["Content-Length"]) == len(get.content) > 0
    assert head.content == b""
    assert head.headers["ETag"] == get.headers["ETag"]


def test_gzip_only_when_accepted_and_only_where_it_helps(server):
    url = server.url("/ds/slices16/zarr/.zattrs")
    plain = requests.get(url, headers={"Accept-Encoding": "identity"})
    zipped = requests.get(url, headers={"Accept-Encoding": "gzip, deflate"})
    assert "Content-Encoding" not in plain.headers and zipped.headers["Content-Encoding"] == "gzip"
    assert zipped.content == plain.content  # requests decodes it
    assert zipped.headers["ETag"] != plain.headers["ETag"] and zipped.headers["Vary"] == "Accept-Encoding"
    chunk = requests.get(server.url("/ds/slices16/zarr/0/0/0/0/0/0"), headers={"Accept-Encoding": "gzip"})
    assert "Content-Encoding" not in chunk.headers  # already blosc-compressed


def test_etag_round_trip(server):
    r = requests.get(server.url("/ds/tiled8/zarr/0/0/0/0/0/0"))
    again = requests.get(server.url("/ds/tiled8/zarr/0/0/0/0/0/0"), headers={"If-None-Match": r.headers["ETag"]})
    assert again.status_code == 304 and again.content == b""


@pytest.mark.parametrize("path", ["/ds/slices16/zarr/0/0/0/a/0/0", "/ds/slices16/zarr/0/0/0/-1/0/0",
                                  "/ds/slices16/zarr/0/x.0.0.0.0"])
def test_malformed_chunk_keys_are_404_with_a_reason(server, path):
    """A zarr key that cannot exist is a missing one (issue 14, point 7): zarr clients and fsspec read
    404 as 'no such key'; the sentence still says what a chunk key looks like."""
    r = requests.get(server.url(path))
    assert r.status_code == 404
    assert "chunk key" in r.text and r.headers["Access-Control-Allow-Origin"] == "*"


def test_dot_separated_chunk_keys_are_accepted(server):
    nested = requests.get(server.url("/ds/slices16/zarr/0/0/0/0/1/1"))
    dotted = requests.get(server.url("/ds/slices16/zarr/0/0.0.0.1.1"))
    assert nested.status_code == dotted.status_code == 200 and nested.content == dotted.content


def test_all_zero_chunks_are_served(server, sources):
    # the far corner chunk of the labels dataset exists even where values are 0; zarr never sees a 404 in bounds
    r = requests.get(server.url("/ds/labels/zarr/0/0/0/0/0/0"))
    assert r.status_code == 200 and len(r.content) > 0


def test_api_lists_queries_and_links(server, sources):
    everything = requests.get(server.url("/api/datasets")).json()["datasets"]
    assert {d["id"] for d in everything} == set(sources[0])
    mice = requests.get(server.url("/api/datasets"), params={"q": "MOUSE fmost"}).json()["datasets"]
    assert [d["id"] for d in mice] == ["slices16"]
    assert requests.get(server.url("/api/datasets"), params={"q": "no-such-word"}).json()["datasets"] == []
    one = requests.get(server.url("/api/datasets/ome04")).json()
    assert one["shape"] == [1, 2, 40, 130, 120] and one["dtype"] == "uint16"
    assert one["voxel_size"] == pytest.approx([1.5, 0.4, 0.4])
    assert len(one["channels"]) == 2 and len(one["levels"]) >= 2
    assert one["links"]["zarr"] == server.url("/ds/ome04/zarr")
    assert requests.get(one["links"]["zarr"] + "/.zattrs").status_code == 200


def test_index_page_health_and_metrics(server):
    page = requests.get(server.url("/"))
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert "/ds/slices16/'" in page.text  # each dataset links its landing page
    assert requests.get(server.url("/healthz")).text.strip() == "ok"
    metrics = requests.get(server.url("/metrics")).text
    assert "bil_transform_cache_hits" in metrics and "bil_transform_cache_bytes" in metrics
