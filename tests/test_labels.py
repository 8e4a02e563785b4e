"""Labels served as labels (issue 14, point 1): a kind = "labels" dataset carries NGFF image-label
metadata, and label datasets attached to an image are served under its labels/ group in both zarr
views, placed on the image level whose shape they have."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse

import numpy as np
import pytest
import requests
import tifffile
import zarr
from conftest import Server, _free_port

SHAPE = (16, 128, 96)
COLORS = [{"label-value": 1, "rgba": [255, 0, 0, 255]}, {"label-value": 2, "rgba": [0, 128, 255, 255]}]


def _write_label_zarr(path, data: np.ndarray, colors: list | None) -> None:
    """An OME-Zarr 0.4 label image written with zarr-python by hand: one level, image-label colours."""
    group = zarr.open_group(path, mode="w", zarr_format=2)
    group.create_array("0", shape=data.shape, chunks=(8, 64, 64), dtype=data.dtype)[:] = data
    group.attrs["multiscales"] = [{"version": "0.4", "name": path.name, "axes": [
        {"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]
    if colors:
        group.attrs["image-label"] = {"version": "0.4", "colors": colors}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    rng = np.random.default_rng(2)
    image = rng.integers(100, 4000, SHAPE, dtype=np.uint16)
    tifffile.imwrite(root / "image.tif", image, photometric="minisblack")
    atlas = np.zeros(SHAPE, np.uint32)
    atlas[:, :64], atlas[:, 64:] = 1, 2  # two regions
    cells = np.zeros((8, 64, 48), np.uint16)  # the image's level 1 (isotropic voxels: all axes halve)
    cells[2:6, 10:30, 10:20], cells[4:8, 40:60, 30:40] = 7, 9
    _write_label_zarr(root / "atlas.zarr", atlas, COLORS)
    _write_label_zarr(root / "cells.zarr", cells, None)
    catalog = root / "catalog.toml"
    catalog.write_text(
        f'[[datasets]]\nid = "brain"\npath = "{root / "image.tif"}"\nvoxel_size = [2.0, 2.0, 2.0]\n'
        'labels = ["atlas", "cells"]\n\n'
        f'[[datasets]]\nid = "atlas"\npath = "{root / "atlas.zarr"}"\nkind = "labels"\n\n'
        f'[[datasets]]\nid = "cells"\npath = "{root / "cells.zarr"}"\nkind = "labels"\n')
    srv = Server(catalog)
    yield srv, root, image, atlas, cells
    srv.stop()


def _transforms(attrs: dict) -> list[tuple[list, list]]:
    ms = attrs["multiscales"][0]
    return [tuple(next(t[k] for t in d["coordinateTransformations"] if t["type"] == k)
                  for k in ("scale", "translation")) for d in ms["datasets"]]


def test_a_labels_dataset_says_it_is_one(labelled):
    srv = labelled[0]
    attrs = requests.get(srv.url("/ds/atlas/zarr/.zattrs")).json()
    assert attrs["image-label"] == {"version": "0.4", "colors": COLORS} and "omero" not in attrs
    v3 = requests.get(srv.url("/ds/atlas/zarr3/zarr.json")).json()["attributes"]["ome"]
    assert v3["image-label"] == {"colors": COLORS}


@pytest.mark.parametrize("view", ["zarr", "zarr3"])
def test_attached_labels_are_a_labels_group_placed_on_their_level(labelled, view):
    srv, _, image, atlas, cells = labelled
    group = zarr.open_group(srv.url(f"/ds/brain/{view}"), mode="r")
    labels = group["labels"]
    assert dict(labels.attrs).get("labels", dict(labels.attrs).get("ome", {}).get("labels")) == ["atlas", "cells"]
    np.testing.assert_array_equal(group["0"][0, 0], image)
    np.testing.assert_array_equal(labels["atlas"]["0"][0, 0], atlas)
    np.testing.assert_array_equal(labels["cells"]["0"][0, 0], cells)
    def meta(attrs: dict) -> dict:
        return attrs.get("ome", attrs)

    brain = _transforms(meta(dict(group.attrs)))
    placed = {name: _transforms(meta(dict(labels[name].attrs))) for name in ("atlas", "cells")}
    assert placed["atlas"][0] == brain[0]  # level 0 of the image: the same voxels in space
    assert placed["cells"][0] == brain[1]  # level 1 of the image
    source = meta(dict(labels["atlas"].attrs))["image-label"]
    assert source["source"] == {"image": "../../"} and source["colors"] == COLORS


def test_napari_ome_zarr_opens_the_image_with_its_label_layers(labelled):
    from napari_ome_zarr import napari_get_reader

    srv, _, image, atlas, cells = labelled
    url = srv.url("/ds/brain/zarr")
    layers = napari_get_reader(url)(url)
    kinds = [kind for _, _, kind in layers]
    assert kinds.count("image") == 1 and kinds.count("labels") == 2, kinds
    # ome-zarr-py names a label layer by its path (labels/labels/NAME in this version)
    by_name = {kwargs["name"].rsplit("/", 1)[-1]: (data, kwargs) for data, kwargs, kind in layers if kind == "labels"}
    assert set(by_name) == {"atlas", "cells"}
    data, kwargs = by_name["cells"]
    np.testing.assert_array_equal(np.asarray(data[0]).reshape(cells.shape), cells)
    image_scale = next(kw for _, kw, kind in layers if kind == "image")["scale"]
    # cells lies on level 1: its voxels are twice the image's in every spatial axis
    np.testing.assert_allclose(kwargs["scale"][-3:], [2 * s for s in image_scale[-3:]])


def test_a_label_of_no_level_of_its_image_is_refused_at_start(tmp_path):
    tifffile.imwrite(tmp_path / "image.tif", np.ones((4, 64, 64), np.uint16), photometric="minisblack")
    _write_label_zarr(tmp_path / "odd.zarr", np.ones((4, 50, 64), np.uint8), None)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "img"\npath = "{tmp_path / "image.tif"}"\nlabels = ["odd"]\n\n'
                       f'[[datasets]]\nid = "odd"\npath = "{tmp_path / "odd.zarr"}"\nkind = "labels"\n')
    run = subprocess.run([sys.executable, "-m", "bil_transform", "serve", "--config", str(catalog),
                          "--port", str(_free_port())], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1] == (
        "bil-transform: dataset 'img': its label dataset 'odd' is 4x50x64 (z, y, x), the shape of none of "
        "the image's levels (4x64x64)")


@pytest.mark.parametrize("entry,says", [
    ('labels = ["nope"]', "labels names 'nope', which is no dataset of the catalog"),
    ('labels = ["img2"]', "labels names 'img2', whose kind is 'image'"),
    ('labels = "atlas"', "labels must be a list of distinct dataset ids"),
])
def test_labels_in_the_catalog_name_label_datasets(tmp_path, entry, says):
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "img"\npath = "a.tif"\n{entry}\n\n'
                       '[[datasets]]\nid = "img2"\npath = "b.tif"\n')
    run = subprocess.run([sys.executable, "-m", "bil_transform", "serve", "--config", str(catalog),
                          "--port", str(_free_port())], capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and says in run.stderr and "Traceback" not in run.stderr


def test_the_viewer_state_adds_the_labels_over_the_image(labelled):
    srv = labelled[0]
    url = requests.get(srv.url("/api/datasets/brain")).json()["links"]["neuroglancer"]
    state = json.loads(urllib.parse.unquote(url.split("#!", 1)[1]))
    layers = state["layers"]
    assert [layer["type"] for layer in layers] == ["image", "segmentation", "segmentation"]
    for layer, name in zip(layers[1:], ("atlas", "cells")):
        assert layer["name"] == name and layer["source"] == f"zarr://{srv.url(f'/ds/brain/zarr/labels/{name}/')}"
        group = zarr.open_group(layer["source"].removeprefix("zarr://"), mode="r")  # it is there
        assert "image-label" in dict(group.attrs)


def test_neuroglancer_draws_the_labels_with_the_image(labelled):
    """The index page's viewer state, opened in the real Neuroglancer (Chromium): the label groups
    load as segmentation layers, every request answered as the contract says."""
    from neuroglancer_browser import check_exchanges, show_link

    srv = labelled[0]
    screen = show_link(srv.base, "brain", 1.0)
    keys = check_exchanges(screen, srv.url("/ds/brain"))
    for name in ("atlas", "cells"):
        fetched = [k for k in keys if k.startswith(f"zarr/labels/{name}/0/")]
        assert fetched, f"no chunk of the {name} labels was fetched: {keys}"
    assert [layer.type for layer in screen.state.layers] == ["image", "segmentation", "segmentation"]
    assert screen.image[..., :3].std() > 5, "the rendered panel is blank"


def test_an_embargoed_label_stays_out_of_a_public_image(tmp_path):
    """The image's labels/ group carries the label's voxels: it lists an embargoed label only to a
    request whose token opens that label."""
    tifffile.imwrite(tmp_path / "image.tif", np.ones((4, 64, 64), np.uint16), photometric="minisblack")
    secret = np.full((4, 64, 64), 5, np.uint8)
    _write_label_zarr(tmp_path / "secret.zarr", secret, None)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "img"\npath = "{tmp_path / "image.tif"}"\nlabels = ["secret"]\n\n'
                       f'[[datasets]]\nid = "secret"\npath = "{tmp_path / "secret.zarr"}"\nkind = "labels"\n'
                       'embargo = true\n')
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[tokens]]\ntoken = "opens-the-labels"\ndatasets = ["secret"]\n')
    srv = Server(catalog, ["--tokens", str(tokens)])
    try:
        for view, meta in (("zarr", ".zattrs"), ("zarr3", "zarr.json")):
            public = f"/ds/img/{view}/labels/secret/0/{meta.replace('.zattrs', '.zarray')}"
            assert requests.get(srv.url(f"/ds/img/{view}/labels/{meta}")).status_code == 404
            assert requests.get(srv.url(public)).status_code == 404
            root = requests.get(srv.url(f"/ds/img/{view}/{meta}"))
            assert "labels" not in json.dumps(root.json())
            assert root.headers["Cache-Control"].startswith("private")  # it differs by token: no shared cache
            opened = requests.get(srv.url(public), headers={"Authorization": "Bearer opens-the-labels"})
            assert opened.status_code == 200
        group = zarr.open_group(srv.url("/token/opens-the-labels/ds/img/zarr"), mode="r")
        np.testing.assert_array_equal(group["labels"]["secret"]["0"][0, 0], secret)
    finally:
        srv.stop()
