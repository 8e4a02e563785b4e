"""Embargo, one rule (issue 22, point 8): a label dataset or skeleton source attached to an embargoed
image falls under the image's embargo under its own id too; the API reports the effective embargo;
an anonymous viewer state lists only layers its reader may open; and only the answers that differ by
token are private, so a public image's chunks stay in shared caches when an embargoed label is attached."""

from __future__ import annotations

import io
import json
import urllib.parse

import numpy as np
import pytest
import requests
import tifffile
import zarr
from conftest import Server

SHAPE = (4, 64, 64)
IMAGE_TOKEN = "opens-the-closed-image"  # opens closed_img only
LABEL_TOKEN = "opens-the-secret-label"  # opens secret_lbl only


def _write_label_zarr(path, data: np.ndarray) -> None:
    """An OME-Zarr 0.4 label image written with zarr-python: one level."""
    group = zarr.open_group(path, mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, chunks=(4, 64, 64), dtype=data.dtype)[:] = data
    group.attrs["multiscales"] = [{"version": "0.4", "name": path.name, "axes": [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """open_img (public) with the embargoed label secret_lbl; closed_img (embargoed) with the public-by-
    its-entry label pub_lbl and the public-by-its-entry skeleton source skel traced on it."""
    root = tmp_path_factory.mktemp("embargo-rules")
    rng = np.random.default_rng(22)
    for name in ("open", "closed"):
        tifffile.imwrite(root / f"{name}.tif", rng.integers(1, 4000, SHAPE, dtype=np.uint16), photometric="minisblack")
    secret = np.zeros(SHAPE, np.uint16)
    secret[:, 10:30, 20:40] = 5
    public_label = rng.integers(0, 7, SHAPE, dtype=np.uint16)
    _write_label_zarr(root / "secret.zarr", secret)
    _write_label_zarr(root / "pub.zarr", public_label)
    (root / "swc").mkdir()
    (root / "swc" / "n.swc").write_text("1 1 10 10 2 1.5 -1\n2 3 20 12 2 1.0 1\n3 3 30 14 3 1.0 2\n")
    catalog = root / "catalog.toml"
    catalog.write_text(
        f'[[datasets]]\nid = "open_img"\npath = "{root / "open.tif"}"\nlabels = ["secret_lbl"]\n\n'
        f'[[datasets]]\nid = "secret_lbl"\npath = "{root / "secret.zarr"}"\nkind = "labels"\nembargo = true\n\n'
        f'[[datasets]]\nid = "closed_img"\npath = "{root / "closed.tif"}"\nlabels = ["pub_lbl"]\nembargo = true\n\n'
        f'[[datasets]]\nid = "pub_lbl"\npath = "{root / "pub.zarr"}"\nkind = "labels"\n\n'
        f'[[datasets]]\nid = "skel"\nkind = "skeletons"\npath = "{root / "swc"}"\nspace = "closed_img"\n'
        'units = "voxel"\n')
    tokens = root / "tokens.toml"
    tokens.write_text(f'[[tokens]]\ntoken = "{IMAGE_TOKEN}"\ndatasets = ["closed_img"]\n\n'
                      f'[[tokens]]\ntoken = "{LABEL_TOKEN}"\ndatasets = ["secret_lbl"]\n')
    srv = Server(catalog, ["--tokens", str(tokens)])
    yield srv, public_label
    srv.stop()


def _bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}", "Accept-Encoding": "identity"}


def test_a_public_label_of_an_embargoed_image_needs_the_images_token_under_its_own_id(world):
    srv, public_label = world
    paths = ["/ds/pub_lbl/zarr/0/0/0/0/0/0", "/ds/pub_lbl/zarr/.zattrs", "/ds/pub_lbl/zarr3/zarr.json",
             "/ds/pub_lbl/precomputed/info", "/ds/pub_lbl/region?level=0&z=0:4&y=0:64&x=0:64",
             "/ds/pub_lbl/thumbnail.png", "/ds/pub_lbl/manifest.json", "/ds/pub_lbl/zarr/"]
    for path in paths:
        anonymous = requests.get(srv.url(path), headers={"Accept-Encoding": "identity"})
        assert anonymous.status_code == 401, (path, anonymous.status_code, anonymous.text[:200])
        assert "closed_img" in anonymous.text, anonymous.text  # says whose embargo it is
        other = requests.get(srv.url(path), headers=_bearer(LABEL_TOKEN))
        assert other.status_code == 403, (path, other.status_code)
        opened = requests.get(srv.url(path), headers=_bearer(IMAGE_TOKEN))
        assert opened.status_code == 200, (path, opened.status_code, opened.text[:200])
        assert opened.headers["Cache-Control"].startswith("private"), (path, opened.headers.get("Cache-Control"))
    region = requests.get(srv.url("/ds/pub_lbl/region?level=0&z=0:4&y=0:64&x=0:64"), headers=_bearer(IMAGE_TOKEN))
    np.testing.assert_array_equal(np.load(io.BytesIO(region.content))[0, 0], public_label)
    # and through a path token, as a real client reads it
    group = zarr.open_group(srv.url(f"/token/{IMAGE_TOKEN}/ds/pub_lbl/zarr"), mode="r")
    np.testing.assert_array_equal(group["0"][0, 0], public_label)


def test_the_api_reports_the_effective_embargo(world):
    srv = world[0]
    expected = {"open_img": False, "secret_lbl": True, "closed_img": True, "pub_lbl": True, "skel": True}
    for ident, embargo in expected.items():
        assert requests.get(srv.url(f"/api/datasets/{ident}")).json()["embargo"] is embargo, ident
    listed = requests.get(srv.url("/api/datasets")).json()["datasets"]
    assert {d["id"]: d["embargo"] for d in listed} == expected
    image = requests.get(srv.url("/api/datasets/closed_img"), headers=_bearer(IMAGE_TOKEN)).json()
    assert [s["embargo"] for s in image["skeletons"]] == [True]
    for ident in ("skel", "pub_lbl"):  # the pages say so too
        page = requests.get(srv.url(f"/ds/{ident}/"), headers={"Accept": "text/html"}).text
        assert "Under embargo" in page, ident
    index = requests.get(srv.url("/?q=pub_lbl"), headers={"Accept": "text/html"}).text
    assert "under embargo" in index


def _state(link: str) -> dict:
    return json.loads(urllib.parse.unquote(link.split("#!", 1)[1]))


def test_an_anonymous_viewer_state_lists_only_layers_its_reader_may_open(world):
    srv = world[0]
    anonymous = requests.get(srv.url("/api/datasets/open_img")).json()["links"]["neuroglancer"]
    names = [layer["name"] for layer in _state(anonymous)["layers"]]
    assert names == ["open_img"], names
    opened = requests.get(srv.url("/api/datasets/open_img"), headers=_bearer(LABEL_TOKEN)).json()["links"]
    names = [layer["name"] for layer in _state(opened["neuroglancer"])["layers"]]
    assert names == ["open_img", "secret_lbl"], names
    # each layer the anonymous state lists answers that reader
    for layer in _state(anonymous)["layers"]:
        url = layer["source"].split("://", 1)[1].rstrip("/")
        assert requests.get(url + "/info").status_code == 200, url
    # the landing page and index carry the same state
    page = requests.get(srv.url("/ds/open_img/"), headers={"Accept": "text/html"}).text
    assert "secret_lbl" not in page
    # a skeleton source's link shows its image with the labels its reader may open
    skel = requests.get(srv.url("/api/datasets/skel"), headers=_bearer(IMAGE_TOKEN)).json()["links"]
    names = [layer["name"] for layer in _state(skel["neuroglancer"])["layers"]]
    assert names == ["closed_img", "pub_lbl", "skel"], names


def test_only_answers_that_differ_by_token_are_private(world):
    srv = world[0]
    public = ["/ds/open_img/zarr/0/0/0/0/0/0", "/ds/open_img/zarr/0/.zarray", "/ds/open_img/zarr3/0/c/0/0/0/0/0",
              "/ds/open_img/zarr3/0/zarr.json", "/ds/open_img/precomputed/info", "/ds/open_img/thumbnail.png"]
    for path in public:
        for headers in ({}, _bearer(LABEL_TOKEN)):
            r = requests.get(srv.url(path), headers=headers)
            assert r.status_code == 200, (path, r.status_code)
            assert r.headers["Cache-Control"] == "public, max-age=3600", (path, r.headers["Cache-Control"])
    differing = ["/ds/open_img/zarr/.zmetadata", "/ds/open_img/zarr3/zarr.json", "/ds/open_img/zarr/",
                 "/ds/open_img/zarr/labels/.zattrs", "/ds/open_img/zarr/labels/", "/ds/open_img/zarr3/labels/zarr.json",
                 "/ds/open_img/zarr/labels/secret_lbl/0/.zarray", "/api/datasets/open_img", "/ds/open_img/"]
    for path in differing:
        anonymous = requests.get(srv.url(path))
        opened = requests.get(srv.url(path), headers=_bearer(LABEL_TOKEN))
        assert opened.status_code == 200, (path, opened.status_code)
        assert anonymous.status_code in (200, 404) and anonymous.content != opened.content, path
        for r in (anonymous, opened):
            assert r.headers.get("Cache-Control", "").startswith("private"), (path, r.headers.get("Cache-Control"))
