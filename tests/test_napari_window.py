"""napari itself, in a real Qt window on Xvfb, opens the OME-Zarr views as a person would.

A module fixture starts Debian's Xvfb and runs tests/napari_window.py in a subprocess (Qt never loads
into pytest): it opens each view with `viewer.open(url, plugin="napari-ome-zarr")` in a fresh
`napari.Viewer(show=True)`, waits until the layers have loaded, and writes what napari holds (layers,
dims, camera) as JSON and the canvas as a screenshot. The tests check the layers against the served
metadata and the written voxels, and the screenshot's pixels against an independent numpy rendering
of the plane napari shows (the middle z plane), through the same contrast limits and colours.

Both views are opened: the OME-Zarr 0.4 (zarr v2) and 0.5 (zarr v3) ones, by the `.ome.zarr`-suffixed
links the API gives (napari-ome-zarr's reader claims only paths matching `*.zarr` / `*.zarr*`, so napari
refuses the bare `/ds/ID/zarr` with "No compatible readers are available").
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
import zarr
from conftest import Server
from PIL import Image

HELPER = Path(__file__).with_name("napari_window.py")
VOXEL = (2.0, 0.5, 0.5)  # z, y, x from the catalog (4x anisotropic: z is never halved)
SHAPE = (16, 256, 256)
BLOCK = 64
VIEWS = {"zarr": "zarr_suffixed", "zarr3": "zarr3_suffixed"}  # the view, and the API link napari can open
# napari's colormap for a channel colour (napari-ome-zarr maps black -> colour onto napari's own maps)
NAPARI_COLORMAPS = {"FFFFFF": "gray", "FF0000": "red", "00FF00": "green", "0000FF": "blue",
                    "FF00FF": "magenta", "00FFFF": "cyan", "FFFF00": "yellow"}
GREY, TWO = "napari-grey", "napari-two"
LABELLED, REGIONS = "napari-labelled", "napari-regions"  # an image with a label dataset attached
COLOURS = {TWO: ["FF00FF", "00FF00"]}  # magenta and green: the screenshot's red is channel 0, its green channel 1


def _blocks(shift: int) -> np.ndarray:
    """4 x 4 blocks of 64 x 64 voxels, 16 distinct levels in every plane, in an order that changes with z
    (so a wrong plane, a transposed or a shifted one, does not match)."""
    z, y, x = np.ogrid[: SHAPE[0], : SHAPE[1], : SHAPE[2]]
    index = (4 * (y // BLOCK) + x // BLOCK + 5 * z + shift) % 16
    return (1000 + 700 * index).astype(np.uint16)


def _write(root: Path) -> dict[str, np.ndarray]:
    """A single-channel uint16 zarr v2 array (zarr-python) and a two-channel uint16 OME-TIFF (tifffile)
    with channel names and colours; voxel sizes from the catalog. Returns (c, z, y, x) per dataset."""
    grey = _blocks(0)
    zarr.create_array(root / "grey.zarr", shape=SHAPE, chunks=(8, 64, 64), dtype="uint16", zarr_format=2)[:] = grey
    two = np.stack([_blocks(3), _blocks(11)[:, ::-1]])

    def rgba(hex_rgb: str) -> int:  # OME-XML Color: signed 32-bit RGBA
        return int.from_bytes(bytes.fromhex(hex_rgb + "FF"), "big", signed=True)

    tifffile.imwrite(root / "two.ome.tif", two, photometric="minisblack",
                     metadata={"axes": "CZYX", "Channel": {"Name": ["DAPI", "GFP"],
                                                           "Color": [rgba(c) for c in COLOURS[TWO]]}})
    labelled = _blocks(7)
    zarr.create_array(root / "labelled.zarr", shape=SHAPE, chunks=(8, 64, 64), dtype="uint16",
                      zarr_format=2)[:] = labelled
    zarr.create_array(root / "regions.zarr", shape=SHAPE, chunks=(8, 64, 64), dtype="uint8",
                      zarr_format=2)[:] = _regions()
    vs = f"voxel_size = [{', '.join(map(str, VOXEL))}]"
    (root / "catalog.toml").write_text(
        f'[[datasets]]\nid = "{GREY}"\npath = "grey.zarr"\n{vs}\n\n'
        f'[[datasets]]\nid = "{TWO}"\npath = "two.ome.tif"\n{vs}\n\n'
        f'[[datasets]]\nid = "{LABELLED}"\npath = "labelled.zarr"\n{vs}\nlabels = ["{REGIONS}"]\n\n'
        f'[[datasets]]\nid = "{REGIONS}"\npath = "regions.zarr"\nkind = "labels"\n')
    return {GREY: grey[None], TWO: two, LABELLED: labelled[None]}


def _regions() -> np.ndarray:
    """Three labelled boxes on 0."""
    regions = np.zeros(SHAPE, np.uint8)
    regions[2:10, 20:100, 30:120], regions[6:14, 150:230, 100:200], regions[:, 200:, :40] = 1, 2, 3
    return regions


def _xvfb(tmp: Path):
    """Debian's Xvfb on a display it picks itself (-displayfd): never one another process holds."""
    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError("Xvfb is not installed: apt-get install xvfb (.ci/run does this)")
    read, write = os.pipe()
    proc = subprocess.Popen([xvfb, "-displayfd", str(write), "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
                            pass_fds=(write,), stdout=subprocess.DEVNULL, stderr=open(tmp / "xvfb.log", "w"))
    os.close(write)
    got = b""
    try:  # Xvfb writes the number, then a newline: read both before closing (or its second write fails)
        while not got.endswith(b"\n") and select.select([read], [], [], 30)[0]:
            chunk = os.read(read, 64)
            if not chunk:
                break
            got += chunk
    finally:
        os.close(read)
    number = got.decode().strip()
    if not number.isdigit():
        proc.kill()
        raise RuntimeError(f"Xvfb did not start: {(tmp / 'xvfb.log').read_text()}")
    return proc, f":{number}"


@pytest.fixture(scope="module")
def napari_run(tmp_path_factory):
    """Serve the two datasets, open both views of each in real napari, return what it showed."""
    tmp = tmp_path_factory.mktemp("napari")
    written = _write(tmp)
    server = Server(tmp / "catalog.toml")
    xvfb, display = _xvfb(tmp)
    try:
        runtime = tmp / "xdg-runtime"
        runtime.mkdir(mode=0o700)
        env = {**os.environ, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb", "XDG_RUNTIME_DIR": str(runtime),
               "NAPARI_CONFIG": str(tmp / "napari-settings.yaml"), "PYTHONUNBUFFERED": "1"}
        api = {ds: requests.get(server.url(f"/api/datasets/{ds}")).json() for ds in written}
        specs = [f"{ds}.{view}={api[ds]['links'][link]}" for ds in written for view, link in VIEWS.items()]
        out = tmp / "shown"
        out.mkdir()
        run = subprocess.run([sys.executable, str(HELPER), str(out), *specs], env=env, capture_output=True,
                             text=True, timeout=180)
        assert run.returncode == 0, f"napari failed ({run.returncode}):\n{run.stderr[-6000:]}"
        shown = {}
        for ds in written:
            for view in VIEWS:
                report = json.loads((out / f"{ds}.{view}.json").read_text())
                report["image"] = np.asarray(Image.open(out / f"{ds}.{view}.png"))
                report["attrs"] = _ome_attrs(server.url(f"/ds/{ds}/{view}"), view)
                report["served_shapes"] = [zarr.open_array(server.url(f"/ds/{ds}/{view}/{d['path']}"), mode="r").shape
                                           for d in report["attrs"]["multiscales"][0]["datasets"]]
                shown[ds, view] = report
        label_urls = {view: server.url(f"/ds/{LABELLED}/{view}/labels/{REGIONS}") for view in VIEWS}
        yield {"written": written, "api": api, "shown": shown, "stderr": run.stderr, "label_urls": label_urls}
    finally:
        xvfb.kill()
        xvfb.wait(10)
        server.stop()


def _ome_attrs(root: str, view: str) -> dict:
    """The OME metadata as served: .zattrs (0.4) or zarr.json's attributes.ome (0.5)."""
    if view == "zarr":
        return requests.get(f"{root}/.zattrs").json()
    return requests.get(f"{root}/zarr.json").json()["attributes"]["ome"]


CASES = [(ds, view) for ds in (GREY, TWO) for view in VIEWS]
IDS = [f"{ds}-{view}" for ds, view in CASES]


def _check_image_layers(report: dict, api: dict, written: np.ndarray) -> None:
    """One image layer per channel: named, coloured and windowed by the channel the server reports (its
    omero entry), scaled by the catalog voxel size times each level's factor, holding the served levels."""
    layers = report["layers"]
    attrs = report["attrs"]
    channels, omero = api["channels"], attrs["omero"]["channels"]
    assert [c["label"] for c in omero] == [c["name"] for c in channels]
    assert [layer["type"] for layer in layers] == ["image"] * len(channels)
    name = attrs["multiscales"][0]["name"]
    assert name == api["id"]
    assert [layer["name"] for layer in layers] == [f"{name}: {c['name']}" for c in channels]
    assert report["opened"] == [layer["name"] for layer in layers]
    for layer, channel, entry in zip(layers, channels, omero):
        assert layer["visible"] and entry["active"]
        colour = channel["color"].upper()
        assert entry["color"].upper() == colour
        assert layer["colormap"] == NAPARI_COLORMAPS[colour]
        rgb = [int(colour[i: i + 2], 16) / 255 for i in (0, 2, 4)]
        assert layer["colormap_colors"][0][:3] == [0, 0, 0] and layer["colormap_colors"][-1][:3] == pytest.approx(rgb)
        assert layer["contrast_limits"] == pytest.approx(channel["window"])
        assert layer["contrast_limits"] == pytest.approx([entry["window"]["start"], entry["window"]["end"]])
        assert layer["axis_labels"] == ["t", "z", "y", "x"]
        assert layer["dtype"] == "uint16" and layer["multiscale"]

        # levels: the served arrays without their channel axis, level 0 the written shape
        served = [list(s[:1]) + list(s[2:]) for s in report["served_shapes"]]
        assert layer["level_shapes"] == served and len(served) >= 3
        assert served[0] == [1, *written.shape[1:]]
        # scale per level = catalog voxel size x the level's factor, the factor computed from the shapes
        # (napari holds level 0's scale and each level's downsample factors)
        transforms = [d["coordinateTransformations"][0]["scale"] for d in attrs["multiscales"][0]["datasets"]]
        assert layer["scale"] == pytest.approx([1.0, *VOXEL])
        for shape, factors, transform in zip(layer["level_shapes"], layer["level_downsample"], transforms):
            independent = [round(n0 / n) for n0, n in zip(served[0][1:], shape[1:])]
            assert factors[1:] == pytest.approx(independent)
            napari_scale = [s * f for s, f in zip(layer["scale"], factors)]
            assert napari_scale[1:] == pytest.approx([v * f for v, f in zip(VOXEL, independent)])
            assert napari_scale == pytest.approx(transform[:1] + transform[2:])  # the OME scale, c removed


LAYER_CHECKS = {"image": _check_image_layers}


@pytest.mark.parametrize("view", VIEWS)
def test_an_image_opens_with_its_labels_layer(napari_run, view):
    """Issue 14, points 1-2: the attached label dataset is a labels layer over the image, on its voxels."""
    report = napari_run["shown"][LABELLED, view]
    images = [layer for layer in report["layers"] if layer["type"] == "image"]
    labels = [layer for layer in report["layers"] if layer["type"] == "labels"]
    _check_image_layers({**report, "layers": images, "opened": [layer["name"] for layer in images]},
                        napari_run["api"][LABELLED], napari_run["written"][LABELLED])
    assert len(labels) == 1 and labels[0]["name"].rsplit("/", 1)[-1] == REGIONS
    layer = labels[0]
    assert layer["dtype"] == "uint8"  # (ome-zarr-py opens label layers hidden, for the user to switch on)
    assert layer["level_shapes"][0][-3:] == list(SHAPE)  # the image's level 0 ...
    assert layer["scale"][-3:] == pytest.approx(list(VOXEL))  # ... at the image's voxel size
    assert layer["translate"][-3:] == pytest.approx(images[0]["translate"][-3:])
    regions = zarr.open_array(napari_run["label_urls"][view] + "/0", mode="r")[...]
    np.testing.assert_array_equal(np.asarray(regions).reshape(SHAPE), _regions())


@pytest.mark.parametrize("ds,view", CASES, ids=IDS)
def test_layers_follow_the_served_metadata(napari_run, ds, view):
    report = napari_run["shown"][ds, view]
    kinds = {layer["type"] for layer in report["layers"]}
    assert kinds <= LAYER_CHECKS.keys(), f"no check for {kinds - LAYER_CHECKS.keys()} layers"
    for kind in kinds:
        LAYER_CHECKS[kind](report, napari_run["api"][ds], napari_run["written"][ds])


def _voxels_under_pixels(report: dict, shape_zyx) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """The level-0 voxel (z; y, x index grids; inside mask) under each screenshot pixel, from napari's own
    view: dims point for z, camera centre and zoom for y and x (world units per screen pixel = 1 / zoom,
    a voxel i centred on world i * scale)."""
    height, width = report["image"].shape[:2]
    assert [height, width] == report["canvas_size"] or [width, height] == report["canvas_size"]
    layer = report["layers"][0]
    z = layer["data_point"][1]
    assert z == int(z)
    cy, cx = report["camera"]["center"][-2:]
    zoom = report["camera"]["zoom"]
    rows = cy + (np.arange(height) + 0.5 - height / 2) / zoom
    cols = cx + (np.arange(width) + 0.5 - width / 2) / zoom
    ys = np.floor((rows - layer["translate"][2]) / layer["scale"][2] + 0.5).astype(int)
    xs = np.floor((cols - layer["translate"][3]) / layer["scale"][3] + 0.5).astype(int)
    inside = ((ys >= 0) & (ys < shape_zyx[1]))[:, None] & ((xs >= 0) & (xs < shape_zyx[2]))[None, :]
    ys, xs = np.meshgrid(np.clip(ys, 0, shape_zyx[1] - 1), np.clip(xs, 0, shape_zyx[2] - 1), indexing="ij")
    return int(z), ys, xs, inside


def _through_window(values: np.ndarray, window) -> np.ndarray:
    lo, hi = window
    return np.clip((values.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255


def _assert_drawn(got: np.ndarray, expected: np.ndarray, what: str) -> None:
    """Block interiors must match to a few grey levels; block edges may fall either side by a pixel."""
    assert got.std() > 20, f"{what}: the canvas is blank"
    assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] > 0.99, what
    close = np.abs(got - expected) <= 3
    assert close.mean() > 0.97, f"{what}: only {close.mean():.3f} of the pixels within 3 grey levels"


@pytest.mark.parametrize("ds,view", CASES, ids=IDS)
def test_screenshot_shows_the_middle_plane_through_the_windows(napari_run, ds, view):
    report = napari_run["shown"][ds, view]
    written = napari_run["written"][ds]
    windows = [layer["contrast_limits"] for layer in report["layers"]]
    z, ys, xs, inside = _voxels_under_pixels(report, written.shape[1:])
    assert z == (written.shape[1] - 1) // 2, "napari opens on the middle z plane"
    assert inside.mean() > 0.3, "the image fills too little of the canvas to check"
    image = report["image"][..., :3].astype(np.float64)
    assert image[~inside].max(axis=-1).mean() < 2, "outside the image the canvas is not its black background"
    if ds == GREY:  # grey colormap: red, green and blue all show the one channel
        expected = _through_window(written[0, z][ys, xs], windows[0])[inside]
        for i, colour in enumerate("rgb"):
            _assert_drawn(image[..., i][inside], expected, f"{colour} of the grey image")
    else:  # magenta (red + blue) is channel 0, green channel 1, blended additively
        ch0 = _through_window(written[0, z][ys, xs], windows[0])[inside]
        ch1 = _through_window(written[1, z][ys, xs], windows[1])[inside]
        _assert_drawn(image[..., 0][inside], ch0, "red: channel 0 (magenta)")
        _assert_drawn(image[..., 2][inside], ch0, "blue: channel 0 (magenta)")
        _assert_drawn(image[..., 1][inside], ch1, "green: channel 1 (green)")


@pytest.mark.parametrize("ds", [GREY, TWO])
def test_both_views_look_the_same(napari_run, ds):
    """OME-Zarr 0.4 on zarr v2 and 0.5 on zarr v3 give napari the same layers and the same picture."""
    v2, v3 = napari_run["shown"][ds, "zarr"], napari_run["shown"][ds, "zarr3"]
    assert v2["layers"] == v3["layers"]
    assert (v2["dims"], v2["camera"], v2["canvas_size"]) == (v3["dims"], v3["camera"], v3["canvas_size"])
    assert np.array_equal(v2["image"], v3["image"])
