"""Listings and aliases (issue 14, points 5 and 7): the zarr views also answer under names ending in
.zarr (ID.ome.zarr, ID.zarr3.ome.zarr), byte for byte; directory URLs of the views answer with an
HTML index of the next path component (what fsspec's HTTP `ls` and Neuroglancer's completion read);
every missing path, at any depth and with or without a trailing slash, answers 404."""

from __future__ import annotations

import hashlib
import html

import fsspec
import numpy as np
import pytest
import requests
import zarr
from conftest import Server

BROWSER = {"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
TOKEN = "listing-token-0123456789"


@pytest.fixture(scope="module")
def fs():
    return fsspec.filesystem("http", skip_instance_cache=True, use_listings_cache=False)


def _names(fs, url: str) -> set[str]:
    return {entry.removeprefix(url.rstrip("/") + "/") for entry in fs.ls(url, detail=False)}


def _grid(server, path: str) -> list[int]:
    """The chunk grid of an array, from its own metadata document."""
    meta = requests.get(server.url(path)).json()
    if meta.get("zarr_format") == 3:
        chunks = meta["chunk_grid"]["configuration"]["chunk_shape"]
    else:
        chunks = meta["chunks"]
    return [-(-s // c) for s, c in zip(meta["shape"], chunks)]


def test_fsspec_lists_a_v2_view_one_level_at_a_time(server, fs):
    root = server.url("/ds/grid/zarr/")
    levels = len(requests.get(root + ".zattrs").json()["multiscales"][0]["datasets"])
    assert levels >= 2
    assert _names(fs, root) == {".zattrs", ".zgroup", ".zmetadata", *(f"{i}/" for i in range(levels))}
    assert _names(fs, root.rstrip("/")) == _names(fs, root)  # the bare URL people are given lists too
    grid = _grid(server, "/ds/grid/zarr/0/.zarray")
    assert grid[:2] == [1, 2] and grid[4] > 1
    assert _names(fs, root + "0/") == {".zarray", ".zattrs", "0/"}
    assert _names(fs, root + "0/0/") == {"0/", "1/"}
    assert _names(fs, root + "0/0/1/") == {f"{z}/" for z in range(grid[2])}
    last = f"0/0/1/{grid[2] - 1}/{grid[3] - 1}/"
    assert _names(fs, root + last) == {str(x) for x in range(grid[4])}
    for entry in fs.ls(root + last):
        assert entry["type"] == "file" and fs.cat(entry["name"]) == requests.get(entry["name"]).content
    assert {e["type"] for e in fs.ls(root + "0/0/")} == {"directory"}


def test_fsspec_lists_a_v3_view_and_its_shards(server, fs):
    for view in ("zarr3", "zarr3-sharded"):
        root = server.url(f"/ds/grid/{view}/")
        levels = len(requests.get(root + "zarr.json").json()["attributes"]["ome"]["multiscales"][0]["datasets"])
        assert _names(fs, root) == {"zarr.json", *(f"{i}/" for i in range(levels))}
        assert _names(fs, root + "0/") == {"zarr.json", "c/"}
        assert _names(fs, root + "0/c/") == {"0/"}
        assert _names(fs, root + "0/c/0/") == {"0/", "1/"}
        grid = _grid(server, f"/ds/grid/{view}/0/zarr.json")
        assert _names(fs, root + "0/c/0/1/0/0/") == {str(x) for x in range(grid[4])}
        chunk = root + f"0/c/0/1/0/0/{grid[4] - 1}"
        assert requests.get(chunk).status_code == 200
        with pytest.raises(FileNotFoundError):
            fs.ls(chunk + "/")


@pytest.mark.parametrize("path", [
    "zarr/nope/", "zarr/0/0/0/0/0/0/", "zarr/0/0/0/0/99/", "zarr/0/0/0/0/0/0/0/", "zarr/0/2/", "zarr/0/0/9/",
    "zarr/9/", "zarr/.zattrs/", "zarr/0/.zarray/", "zarr/0/01/", "zarr/0//", "zarr3/0/0/", "zarr3/0/c/0/0/0/0/0/",
    "zarr3/0/c/0/0/0/0/0/0/", "zarr3/zarr.json/", "zarr3/0/c/1/", "zarr3-sharded/0/c/0/0/9/", "precomputed/info/",
    "precomputed/9/", "precomputed/0/0/", "grid.ome.zarr/nope/", "grid.ome.zarr/0/0/0/0/0/0/",
])
def test_missing_directories_raise_file_not_found(server, fs, path):
    url = server.url(f"/ds/grid/{path}")
    with pytest.raises(FileNotFoundError):
        fs.ls(url)
    assert requests.get(url).status_code == 404
    assert requests.get(url, headers=BROWSER).status_code == 404


@pytest.mark.parametrize("path", ["zarr/0/0/0/a/0/0", "zarr/0/0/0/-1/0/0", "zarr/0/x.0.0.0.0", "zarr/0/0/0/0/0/0/",
                                  "zarr3/0/c/0/0/x/0/0", "zarr3/0/c/0/0/0/0/0/", "grid.zarr3.ome.zarr/0/c/a/0/0/0/0"])
def test_malformed_zarr_keys_are_missing_keys(server, path):
    r = requests.get(server.url(f"/ds/grid/{path}"))
    assert r.status_code == 404 and r.text.strip().endswith(".") and "\n" not in r.text.strip()
    assert requests.get(server.url("/ds/grid/precomputed/0/garbage")).status_code == 400  # not a zarr view


def test_precomputed_directories_list_info_levels_and_chunks(server, fs):
    root = server.url("/ds/grid/precomputed/")
    info = requests.get(root + "info").json()
    assert _names(fs, root) == {"info", *(f"{s['key']}/" for s in info["scales"])}
    scale = info["scales"][-1]
    names = _names(fs, root + scale["key"] + "/")
    assert names and all(requests.head(root + f"{scale['key']}/{n}").status_code == 200 for n in sorted(names)[:3])
    sharded = server.url("/ds/grid/precomputed-sharded/0/")
    assert all(n.endswith(".shard") for n in _names(fs, sharded))


def test_a_browser_gets_the_landing_page_and_neuroglancer_the_listing(server):
    root = server.url("/ds/grid/zarr3/")
    assert "<h1>grid</h1>" in requests.get(root, headers=BROWSER).text
    navigate = requests.get(root, headers={"Accept": "text/html", "Sec-Fetch-Mode": "navigate"})
    assert "<h1>grid</h1>" in navigate.text
    # Neuroglancer's completion: fetch(url, {headers: {accept: "text/html"}}) from the page
    for headers in ({"Accept": "text/html", "Sec-Fetch-Mode": "cors"}, {"Accept": "text/html"}):
        listing = requests.get(root, headers=headers)
        assert listing.status_code == 200 and "text/html" in listing.headers["Content-Type"]
        assert '<a href="zarr.json">' in listing.text and '<a href="0/">' in listing.text
    below = requests.get(root + "0/", headers=BROWSER)  # below the root a browser sees the listing too
    assert '<a href="c/">' in below.text
    bare = requests.get(root.rstrip("/"), allow_redirects=False)
    assert bare.status_code == 307 and bare.headers["Location"] == "zarr3/"
    assert requests.get(server.url("/ds/nope/zarr"), allow_redirects=False).status_code == 404
    assert requests.get(server.url("/ds/grid/zarr-foo"), allow_redirects=False).status_code == 404


def test_aliases_serve_the_same_bytes_and_etags(server):
    pairs = [("zarr", "grid.ome.zarr", ".zattrs"), ("zarr", "grid.ome.zarr", "0/0/1/2/3/4"),
             ("zarr3", "grid.zarr3.ome.zarr", "zarr.json"), ("zarr3", "grid.zarr3.ome.zarr", "1/c/0/0/0/0/0"),
             ("zarr3-sharded", "grid.zarr3-sharded.ome.zarr", "0/c/0/1/0/1/1"),
             ("zarr-gzip", "grid.zarr-gzip.ome.zarr", "0/0/0/0/0/0")]
    for view, alias, key in pairs:
        plain = requests.get(server.url(f"/ds/grid/{view}/{key}"), headers={"Accept-Encoding": "identity"})
        aliased = requests.get(server.url(f"/ds/grid/{alias}/{key}"), headers={"Accept-Encoding": "identity"})
        assert plain.status_code == aliased.status_code == 200, (alias, key)
        assert plain.content == aliased.content and plain.headers["ETag"] == aliased.headers["ETag"]
    for bad in ("nope.ome.zarr", "grid.precomputed.ome.zarr", "grid.zarr9.ome.zarr", "grid.zarr-foo.ome.zarr",
                "gridx.ome.zarr", "grid..ome.zarr", "ome04.ome.zarr"):
        assert requests.get(server.url(f"/ds/grid/{bad}/.zattrs")).status_code == 404, bad
        assert requests.get(server.url(f"/ds/grid/{bad}/zarr.json")).status_code == 404, bad


def test_zarr_python_reads_exact_voxels_through_the_aliases(server, sources):
    found, _ = sources
    for ident, alias in (("ome04", "ome04.ome.zarr"), ("ome05", "ome05.zarr3.ome.zarr"),
                         ("grid", "grid.zarr3-sharded.ome.zarr")):
        group = zarr.open_group(server.url(f"/ds/{ident}/{alias}"), mode="r")
        np.testing.assert_array_equal(group["0"][:], found[ident].data)


def test_a_suffix_choosing_reader_opens_the_alias_and_not_the_bare_view(server, sources):
    from bioio import BioImage
    from bioio_base.exceptions import UnsupportedFileFormatError

    found, _ = sources
    links = requests.get(server.url("/api/datasets/ome04")).json()["links"]
    with pytest.raises(UnsupportedFileFormatError):
        BioImage(links["zarr"])
    for ident, key in (("ome04", "zarr_suffixed"), ("ome05", "zarr3_suffixed")):
        url = requests.get(server.url(f"/api/datasets/{ident}")).json()["links"][key]
        image = BioImage(url)
        np.testing.assert_array_equal(image.get_image_data("TCZYX"), found[ident].data)


def test_links_and_landing_page_name_the_aliases(server):
    links = requests.get(server.url("/api/datasets/ome04")).json()["links"]
    root = server.url("/ds/ome04")
    assert links["zarr_suffixed"] == f"{root}/ome04.ome.zarr"
    assert links["zarr3_suffixed"] == f"{root}/ome04.zarr3.ome.zarr"
    assert links["zarr3-sharded_suffixed"] == f"{root}/ome04.zarr3-sharded.ome.zarr"
    for key in ("zarr_suffixed", "zarr3_suffixed", "zarr3-sharded_suffixed"):
        assert requests.get(links[key] + "/", allow_redirects=False).status_code == 200
    text = html.unescape(requests.get(server.url("/ds/ome04/"), headers=BROWSER).text)
    assert f"from bioio import BioImage; img = BioImage('{root}/ome04.ome.zarr')" in text
    assert f"{root}/ome04.zarr3.ome.zarr</code>" in text
    assert "<h1>ome04</h1>" in requests.get(links["zarr_suffixed"], headers=BROWSER).text


@pytest.fixture(scope="module")
def closed(sources, tmp_path_factory):
    _, catalog = sources
    text = catalog.read_text().replace("[[datasets]]\n", "[[datasets]]\nembargo = true\n")
    path = catalog.with_name("catalog-listings-embargoed.toml")
    path.write_text(text)
    tokens = tmp_path_factory.mktemp("listing-secrets") / "tokens.toml"
    tokens.write_text(f'[[tokens]]\nsha256 = "{hashlib.sha256(TOKEN.encode()).hexdigest()}"\ndatasets = ["grid"]\n')
    srv = Server(path, ["--tokens", str(tokens)])
    yield srv
    srv.stop()


def test_aliases_and_listings_pass_the_same_access_check(closed, server):
    for path in ("/ds/grid/grid.ome.zarr/.zattrs", "/ds/grid/grid.zarr3.ome.zarr/zarr.json", "/ds/grid/zarr/",
                 "/ds/grid/grid.ome.zarr/0/", "/ds/grid/zarr3/0/c/0/"):
        assert requests.get(closed.url(path)).status_code == 401, path
        bearer = requests.get(closed.url(path), headers={"Authorization": f"Bearer {TOKEN}"})
        in_path = requests.get(closed.url(f"/token/{TOKEN}{path}"))
        public = requests.get(server.url(path))
        assert bearer.status_code == in_path.status_code == 200, path
        assert bearer.content == in_path.content == public.content, path
    assert requests.get(closed.url("/ds/ome04/ome04.ome.zarr/.zattrs"),
                        headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403
    redirect = requests.get(closed.url(f"/token/{TOKEN}/ds/grid/grid.ome.zarr"), allow_redirects=False)
    assert redirect.status_code == 307 and redirect.headers["Location"] == "grid.ome.zarr/"
