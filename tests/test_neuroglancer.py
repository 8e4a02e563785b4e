"""The real Neuroglancer viewer in headless Chromium reads the precomputed and OME-Zarr views.

Each test opens a source as a person would (pasting `precomputed://` or `zarr://` into the viewer),
waits until every visible chunk is drawn, and checks three things: every request the viewer sent
was answered as the contract says, the panel is not blank, and what it shows is the source's
voxels (the panel's pixels against the written data, through the viewer's own position and zoom).
"""

from __future__ import annotations

import json
import urllib.parse

import neuroglancer
import numpy as np
import pytest
import requests
from neuroglancer_browser import Browser, check_exchanges, layers, voxels_under_pixels


@pytest.fixture(scope="module")
def browser():
    b = Browser()
    yield b
    b.close()


IMAGES = [
    ("precomputed", "slices16", "precomputed://{base}/ds/slices16/precomputed"),  # raw uint16, gzip
    ("jpeg", "tiled8", "precomputed://{base}/ds/tiled8/precomputed-jpeg"),
]


@pytest.mark.parametrize("kind,ds,source", IMAGES, ids=[i[0] for i in IMAGES])
def test_image_is_drawn_from_the_source_voxels(server, sources, browser, kind, ds, source):
    src = sources[0][ds]
    root = source.format(base=server.base).split("://", 1)[1]
    screen = browser.show(layers(image=neuroglancer.ImageLayer(source=source.format(base=server.base))),
                          watch=server.base, scale=0.15)
    check_exchanges(screen, root)
    gray = screen.image[..., 0].astype(np.float64)
    assert gray.std() > 10, "the rendered panel is blank"
    z, ys, xs = voxels_under_pixels(screen, src.data.shape[2:])
    expected = src.data[0, 0, z][ys, xs].astype(np.float64)
    # 0.99: a linear contrast map of the right voxels (a one-voxel shift measures about 0.92)
    assert np.corrcoef(gray.ravel(), expected.ravel())[0, 1] > 0.99


def test_pasted_zarr_source_takes_its_channels_from_omero(server, sources, browser):
    """A source pasted without a layer type, as a person does: the viewer turns the OME-Zarr (t, c, z,
    y, x) into x, y, z, t, one additive layer per channel coloured and windowed by `omero`."""
    src = sources[0]["ome04"]
    root = f"{server.base}/ds/ome04/zarr"
    omero = requests.get(f"{root}/.zattrs").json()["omero"]["channels"]
    pasted = {"type": "auto", "source": f"zarr://{root}", "name": "ome04"}
    screen = browser.show(neuroglancer.ViewerState({"layers": [pasted]}), watch=server.base, scale=0.12,
                          settled=lambda s: len(s.layers) == len(omero)
                          and all("contrast" in layer.shader_controls for layer in s.layers))
    check_exchanges(screen, root)
    assert list(screen.state.dimensions.names)[:3] == ["x", "y", "z"]
    shown = list(screen.state.layers)
    assert [layer.shader_controls["color"] for layer in shown] == [f"#{c['color'].lower()}" for c in omero]
    for layer, channel in zip(shown, omero):  # integer data: the viewer rounds the window to integers
        assert list(layer.shader_controls["contrast"].range) == pytest.approx(
            [channel["window"]["start"], channel["window"]["end"]], abs=1)
    # channel 1 is magenta: the only one with red; drawn through its window
    z, ys, xs = voxels_under_pixels(screen, src.data.shape[2:])
    start, end = omero[1]["window"]["start"], omero[1]["window"]["end"]
    expected = np.clip((src.data[0, 1, z][ys, xs] - start) / (end - start), 0, 1)
    red = screen.image[..., 0].astype(np.float64)
    assert red.std() > 10 and np.corrcoef(red.ravel(), expected.ravel())[0, 1] > 0.99


def test_segmentation_is_drawn_one_colour_per_label(server, sources, browser):
    src = sources[0]["labels"]
    root = f"{server.base}/ds/labels/precomputed"
    screen = browser.show(layers(labels=neuroglancer.SegmentationLayer(source=f"precomputed://{root}")),
                          watch=server.base, scale=0.1)
    chunks = check_exchanges(screen, root)
    assert all(k.startswith(("0/", "1/", "2/")) for k in chunks)
    z, ys, xs = voxels_under_pixels(screen, src.data.shape[2:])
    labels = src.data[0, 0, z][ys, xs]
    colours = screen.image[..., :3].reshape(-1, 3) @ np.array([1, 256, 65536])
    by_label = {}
    for label in np.unique(labels):
        found, counts = np.unique(colours[labels.ravel() == label], return_counts=True)
        assert counts.max() > 0.9 * counts.sum(), f"label {label} is drawn in mixed colours"
        by_label[int(label)] = found[np.argmax(counts)]
    assert len(set(by_label.values())) == len(by_label) >= 4, f"labels share colours: {by_label}"


def test_open_in_neuroglancer_link_shows_every_channel_in_its_colour(server, sources, browser):
    """The index page's link carries a viewer state: one additive layer per channel, coloured as
    the source says (multi: green, magenta, cyan), each drawn from its own channel's voxels."""
    src = sources[0]["multi"]
    link = requests.get(server.url("/api/datasets/multi")).json()["links"]["neuroglancer"]
    state = neuroglancer.ViewerState(json.loads(urllib.parse.unquote(link.split("#!", 1)[1])))
    assert [layer.source[0].url for layer in state.layers] == [
        f"precomputed://{server.base}/ds/multi/c/{c}/precomputed" for c in range(3)]
    screen = browser.show(state, watch=server.base, scale=0.06)
    check_exchanges(screen, f"{server.base}/ds/multi")
    z, ys, xs = voxels_under_pixels(screen, src.data.shape[2:])
    red = screen.image[..., 0].astype(np.float64)  # only channel 1 (magenta) has red
    assert red.std() > 10 and screen.image[..., 1].std() > 10, "the rendered panel is blank"
    channel1 = src.data[0, 1, z][ys, xs].astype(np.float64)
    assert np.corrcoef(red.ravel(), channel1.ravel())[0, 1] > 0.99
