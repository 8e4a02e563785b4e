"""Embargo (issue 12, part 1): an embargoed dataset's voxels reach only requests with a token that
opens it, by every route that carries them, while its catalog metadata stays public.

Every held-in source (TIFF stacks and files, OME-TIFF, Zarr v2/v3, OME-Zarr 0.4/0.5, and below
JPEG2000 and Imaris) is served a second time, embargoed; its bytes with a valid token must be
exactly what the public server sends for the same dataset and key.
"""

from __future__ import annotations

import hashlib
import urllib.parse

import aiohttp
import imagecodecs
import neuroglancer
import numpy as np
import pytest
import requests
import tensorstore as ts
import zarr
from conftest import Server
from imaris_writer import write_ims
from neuroglancer_browser import Browser, check_exchanges, layers, voxels_under_pixels

EVERYTHING = "open-all-datasets-0123"  # a token that opens every dataset
GRID_ONLY = "grid-only-token-4567"  # written in the tokens file as its sha256
WRONG = "not-a-token-at-all-89"
IDENTITY = {"Accept-Encoding": "identity"}


@pytest.fixture(scope="module")
def embargoed(sources, tmp_path_factory):
    """A server of the same catalog, every dataset embargoed, with a tokens file."""
    _, catalog = sources
    text = catalog.read_text().replace("[[datasets]]\n", "[[datasets]]\nembargo = true\n")
    closed = catalog.with_name("catalog-embargoed.toml")
    closed.write_text(text)
    tokens = tmp_path_factory.mktemp("secrets") / "tokens.toml"
    tokens.write_text(f'[[tokens]]\ntoken = "{EVERYTHING}"\ndatasets = ["*"]\n\n'
                      f'[[tokens]]\nsha256 = "{hashlib.sha256(GRID_ONLY.encode()).hexdigest()}"\n'
                      'datasets = ["grid"]\n')
    srv = Server(closed, ["--tokens", str(tokens)])
    yield srv
    srv.stop()


def _voxel_keys(public: Server, ident: str) -> list[str]:
    """Paths under /ds/ID that carry voxels or documents computed for them: every view's metadata,
    a chunk of every level of each view, channel and time point views, the thumbnail."""
    doc = requests.get(public.url(f"/api/datasets/{ident}")).json()
    n_t, n_c = doc["shape"][:2]
    keys = ["zarr/.zattrs", "zarr/.zgroup", "zarr/.zmetadata", "zarr3/zarr.json", "zarr3-sharded/zarr.json",
            "precomputed/info", "precomputed-sharded/info", "precomputed-sharded/0/0.shard", "thumbnail.png",
            "region?level=0&z=0:1&format=raw", "manifest.json", "manifest.json?checksums=sha256",
            "zarr3-sharded/0/c/0/0/0/0/0", f"c/{n_c - 1}/precomputed/info", f"t/{n_t - 1}/precomputed/info"]
    info = requests.get(public.url(f"/ds/{ident}/precomputed/info")).json()
    for level, scale in enumerate(info["scales"]):
        keys += [f"zarr/{level}/.zarray", f"zarr/{level}/0/0/0/0/0", f"zarr3/{level}/c/0/0/0/0/0"]
        x, y, z = (min(c, s) for c, s in zip(scale["chunk_sizes"][0], scale["size"]))
        keys.append(f"precomputed/{scale['key']}/0-{x}_0-{y}_0-{z}")
    return keys


def test_every_voxel_route_needs_a_token_that_opens_the_dataset(server, embargoed, sources):
    for ident in sources[0]:
        for key in _voxel_keys(server, ident):
            path = f"/ds/{ident}/{key}"
            public = requests.get(server.url(path), headers=IDENTITY)
            assert public.status_code == 200, path

            anonymous = requests.get(embargoed.url(path), headers=IDENTITY)
            assert anonymous.status_code == 401, path
            assert anonymous.headers["WWW-Authenticate"].startswith("Bearer"), path
            assert "embargo" in anonymous.text and anonymous.text.count("\n") == 1, path
            assert anonymous.headers["Access-Control-Allow-Origin"] == "*"

            wrong = requests.get(embargoed.url(path), headers={**IDENTITY, "Authorization": f"Bearer {WRONG}"})
            assert wrong.status_code == 403 and WRONG not in wrong.text, path
            other = requests.get(embargoed.url(f"/token/{GRID_ONLY}{path}"), headers=IDENTITY)
            assert other.status_code == (200 if ident == "grid" else 403), path

            by_header = requests.get(embargoed.url(path), headers={**IDENTITY, "Authorization": f"Bearer {EVERYTHING}"})
            by_path = requests.get(embargoed.url(f"/token/{EVERYTHING}{path}"), headers=IDENTITY)
            assert by_header.status_code == by_path.status_code == 200, path
            if not key.endswith(("zattrs", "zmetadata", "zarr.json", "info")):  # documents name the dataset's links
                assert by_header.content == by_path.content == public.content, path


def test_embargoed_answers_are_private_so_no_shared_cache_keeps_them(server, embargoed):
    """A proxy cache or CDN honours Cache-Control: had it stored a chunk read with a token as
    `public`, it would hand it to the next client without one."""
    for key in ("zarr/0/0/0/0/0/0", "zarr/.zattrs", "precomputed/info", "thumbnail.png", "manifest.json"):
        path = f"/ds/slices16/{key}"
        opened = requests.get(embargoed.url(path), headers={"Authorization": f"Bearer {EVERYTHING}"})
        assert opened.status_code == 200 and opened.headers["Cache-Control"] == "private, max-age=3600", path
        public = requests.get(server.url(path))
        assert public.status_code == 200 and public.headers["Cache-Control"] == "public, max-age=3600", path


def test_no_304_or_head_without_the_token(server, embargoed):
    path = "/ds/slices16/zarr/0/0/0/0/0/0"
    tag = requests.get(embargoed.url(path), headers={"Authorization": f"Bearer {EVERYTHING}"}).headers["ETag"]
    assert requests.get(embargoed.url(path), headers={"If-None-Match": tag}).status_code == 401
    assert requests.head(embargoed.url(path)).status_code == 401


def test_metadata_stays_public_but_nothing_computed_from_the_voxels(embargoed, sources):
    listed = requests.get(embargoed.url("/api/datasets?q=mouse")).json()["datasets"]
    assert [d["id"] for d in listed] == ["slices16"] and listed[0]["embargo"] is True
    assert "thumbnail" not in listed[0]["links"] and "neuroglancer" not in listed[0]["links"]
    doc = requests.get(embargoed.url("/api/datasets/ome04")).json()
    assert doc["shape"] == list(sources[0]["ome04"].data.shape)
    assert all("window" not in ch for ch in doc["channels"])
    opened = requests.get(embargoed.url("/api/datasets/ome04"), headers={"Authorization": f"Bearer {EVERYTHING}"})
    assert all("window" in ch for ch in opened.json()["channels"]) and "thumbnail" in opened.json()["links"]
    page = requests.get(embargoed.url("/"))
    assert "thumbnail.png" not in page.text and "open in Neuroglancer" not in page.text
    assert page.headers["Referrer-Policy"] == "no-referrer"


def test_links_of_a_request_with_a_path_token_keep_it(embargoed):
    doc = requests.get(embargoed.url(f"/token/{EVERYTHING}/api/datasets/grid")).json()
    assert doc["links"]["zarr"] == embargoed.url(f"/token/{EVERYTHING}/ds/grid/zarr")
    assert f"/token/{EVERYTHING}/ds/grid/c/0/precomputed" in urllib.parse.unquote(doc["links"]["neuroglancer"])


def test_preflight_allows_the_authorization_header(embargoed):
    r = requests.options(embargoed.url("/ds/grid/zarr/.zattrs"), headers={
        "Origin": "http://viewer.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization"})
    assert r.status_code == 204 and "authorization" in r.headers["Access-Control-Allow-Headers"]


def test_real_clients_read_the_embargoed_data_through_a_path_token(embargoed, sources):
    src = sources[0]["slices16"]
    group = zarr.open_group(embargoed.url(f"/token/{EVERYTHING}/ds/slices16/zarr"), mode="r")
    np.testing.assert_array_equal(group["0"][:], src.data)
    store = ts.open({"driver": "neuroglancer_precomputed",
                     "kvstore": embargoed.url(f"/token/{EVERYTHING}/ds/slices16/precomputed/")}).result()
    np.testing.assert_array_equal(store[ts.d["channel"][0]].read().result().transpose(2, 1, 0), src.data[0, 0])
    with pytest.raises(aiohttp.ClientResponseError, match="401"):  # refused without it, never handed zeros
        zarr.open_group(embargoed.url("/ds/slices16/zarr"), mode="r")["0"][:]


def test_tokens_never_reach_the_log(embargoed):
    requests.get(embargoed.url(f"/token/{EVERYTHING}/ds/slices16/zarr/0/0/0/not-a-number/0/0"))
    requests.get(embargoed.url(f"/token/{WRONG}/ds/slices16/zarr/0/0/0/0/0/0"))
    log = embargoed.log.read_text()
    assert EVERYTHING not in log and WRONG not in log and GRID_ONLY not in log


def test_neuroglancer_reads_the_embargoed_data_through_a_path_token(embargoed, sources):
    """The real viewer in Chromium, given the path-prefixed URL as a curator would hand it out."""
    src = sources[0]["slices16"]
    source = f"precomputed://{embargoed.base}/token/{EVERYTHING}/ds/slices16/precomputed"
    browser = Browser()
    try:
        screen = browser.show(layers(image=neuroglancer.ImageLayer(source=source)), watch=embargoed.base, scale=0.15)
    finally:
        browser.close()
    check_exchanges(screen, source.split("://", 1)[1])
    gray = screen.image[..., 0].astype(np.float64)
    assert gray.std() > 10, "the rendered panel is blank"
    z, ys, xs = voxels_under_pixels(screen, src.data.shape[2:])
    assert np.corrcoef(gray.ravel(), src.data[0, 0, z][ys, xs].astype(np.float64).ravel())[0, 1] > 0.99


def test_an_embargoed_landing_page_shows_metadata_but_no_pictures(embargoed):
    closed = requests.get(embargoed.url("/ds/slices16/"), headers={"Accept": "text/html"}).text
    assert "Slice stack" in closed and "Under embargo" in closed and "thumbnail.png" not in closed
    opened = requests.get(embargoed.url(f"/token/{EVERYTHING}/ds/slices16/"), headers={"Accept": "text/html"}).text
    assert f"/token/{EVERYTHING}/ds/slices16/thumbnail.png" in opened


@pytest.fixture(scope="module")
def archive_pair(tmp_path_factory):
    """A JPEG2000 stack and an Imaris file, each in the catalog twice: open, and embargoed."""
    root = tmp_path_factory.mktemp("embargo-archive")
    rng = np.random.default_rng(3)
    (root / "jp2").mkdir()
    for z in range(5):
        (root / "jp2" / f"z{z}.jp2").write_bytes(imagecodecs.jpeg2k_encode(
            rng.integers(0, 60000, (70, 90)).astype(np.uint16), level=0, codecformat="jp2", reversible=True))
    write_ims(root / "brain.ims", rng.integers(0, 250, (1, 2, 9, 40, 50)).astype(np.uint8), levels=2,
              chunks=(4, 16, 16))
    catalog = root / "catalog.toml"
    catalog.write_text("".join(f'[[datasets]]\nid = "{i}{s}"\npath = "{root / p}"\nembargo = {str(e).lower()}\n\n'
                               for i, p in (("jp2", "jp2"), ("ims", "brain.ims"))
                               for s, e in (("", True), ("-open", False))))
    tokens = root / "tokens.toml"
    tokens.write_text(f'[[tokens]]\ntoken = "{EVERYTHING}"\ndatasets = ["*"]\n')
    srv = Server(catalog, ["--tokens", str(tokens)])
    yield srv
    srv.stop()


@pytest.mark.parametrize("ident", ["jp2", "ims"])
def test_jpeg2000_and_imaris_are_embargoed_too(archive_pair, ident):
    srv = archive_pair
    for key in ("zarr/0/0/0/0/0/0", "zarr/1/0/0/0/0/0", "zarr3/0/c/0/0/0/0/0", "precomputed-sharded/0/0.shard",
                "region?level=0&format=raw", "manifest.json", "thumbnail.png"):
        path = f"/ds/{ident}/{key}"
        assert requests.get(srv.url(path)).status_code == 401, path
        opened = requests.get(srv.url(f"/token/{EVERYTHING}{path}"), headers=IDENTITY)
        public = requests.get(srv.url(path.replace(f"/ds/{ident}/", f"/ds/{ident}-open/")), headers=IDENTITY)
        assert opened.status_code == public.status_code == 200, path
        if "manifest" not in key:  # a manifest names its dataset
            assert opened.content == public.content, path
