"""Landing pages (issue 12, part 7): a dataset's page for people, also what a browser gets at the bare
view URLs people are handed, while zarr clients and Neuroglancer probes are answered as before."""

from __future__ import annotations

import html
import urllib.parse

import pytest
import requests

BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}


def test_a_landing_page_says_how_to_open_every_view(server):
    page = requests.get(server.url("/ds/ome04/"), headers=BROWSER)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    text = html.unescape(page.text)
    root = server.url("/ds/ome04")
    assert "OME-Zarr 0.4 two channels" in text and "thumbnail.png" in text
    for view in ("zarr", "zarr3", "zarr3-sharded", "precomputed", "precomputed-sharded"):
        assert f"{root}/{view}</code>" in text
    assert f"napari --plugin napari-ome-zarr {root}/ome04.ome.zarr" in text  # napari-ome-zarr claims *.zarr only
    assert f"zarr.open_group('{root}/zarr', mode='r')" in text
    assert f"open_dataset('{root}')" in text and f"precomputed://{root}/precomputed" in text
    assert text.count("navigator.clipboard") >= 9 and "open in Neuroglancer" in text


@pytest.mark.parametrize("path", ["/ds/ome04/zarr", "/ds/ome04/zarr3/", "/ds/ome04/precomputed",
                                  "/ds/ome04/c/1/precomputed", "/ds/ome04", "/ds/ome04/zarr3-sharded-zstd"])
def test_a_browser_at_a_bare_view_url_gets_the_landing_page(server, path):
    page = requests.get(server.url(path), headers=BROWSER)
    assert page.status_code == 200 and "<h1>ome04</h1>" in page.text


def test_clients_see_the_views_as_before(server):
    # no browser: no page; the view's root is a directory (issue 14, point 7), whose listing fsspec reads
    bare = requests.get(server.url("/ds/ome04/zarr"), allow_redirects=False)
    assert bare.status_code == 307
    assert urllib.parse.urljoin(bare.url, bare.headers["Location"]) == server.url("/ds/ome04/zarr/")
    listing = requests.get(server.url("/ds/ome04/zarr/"), headers={"Accept": "*/*"})
    assert listing.status_code == 200 and "<a href=\".zattrs\">" in listing.text and "landing" not in listing.text
    assert requests.get(server.url("/ds/ome04/zarr/.zattrs"), headers=BROWSER).json()["multiscales"]
    assert requests.get(server.url("/ds/ome04/c/1/precomputed/info"), headers=BROWSER).json()["scales"]
    assert requests.get(server.url("/ds/no-such/"), headers=BROWSER).status_code == 404
