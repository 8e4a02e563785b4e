"""The real Neuroglancer in headless Chromium shows SWC tracings served as precomputed skeletons on their brain.

The test writes a small image (TIFF slices) and three neurons (SWC files in voxels of that image, with an
offset), opens the viewer state of the image's own "open in Neuroglancer" link (/api/datasets/brain) and
checks that every request the viewer sent was answered, and that each neuron is drawn in its colour exactly
where the test put it: the projection of its segments, computed here with numpy from the SWC it wrote,
through the viewer's own position and zoom.
"""

from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import neuroglancer
import numpy as np
import pytest
import requests
import tifffile
from conftest import Server
from neuroglancer_browser import Browser, check_exchanges, voxels_under_pixels

SHAPE = (8, 256, 256)  # z, y, x voxels of the image
VOXEL = (2.0, 0.5, 0.5)  # z, y, x micrometres
OFFSET = (1.0, 3.0, -5.0)  # z, y, x voxels the catalog adds to every node
PLANE = 2  # the SWC z of every node: image plane PLANE + OFFSET[0] = 3, the one shown
WINDOW = 1000  # the image's display window, over voxels 0-199: dim grey
SCALE = 0.1  # voxels a pixel: a half-voxel error moves a line by 5 pixels
CENTRE = (120.5, 100.5)  # x, y of the view: a voxel's centre; the panel shows x 80.5-160.5, y 70.5-130.5

# Each neuron: (SWC id, type, x, y, radius, parent id) in SWC voxel coordinates (before OFFSET), a soma
# (type 1) and dendrites (type 3) branching in several directions; ids not from 1 in one of them.
NEURONS = {
    "a.swc": [
        (1, 1, 100.0, 82.0, 3.5, -1),
        (2, 3, 93.25, 75.75, 1.0, 1),
        (3, 3, 89.0, 71.5, 0.75, 2),
        (4, 3, 97.5, 70.0, 0.5, 2),
        (5, 3, 100.0, 97.0, 1.25, 1),
        (6, 3, 95.0, 107.0, 0.5, 5),
        (7, 3, 106.0, 109.0, 0.5, 5),
    ],
    "b.swc": [
        (10, 1, 125.0, 92.0, 4.0, -1),
        (11, 3, 135.5, 87.0, 1.0, 10),
        (12, 3, 146.0, 82.0, 0.75, 11),
        (13, 3, 154.0, 74.5, 0.5, 12),
        (14, 3, 151.0, 93.0, 0.5, 12),
        (15, 3, 124.0, 78.0, 0.75, 10),
        (16, 3, 118.0, 72.0, 0.5, 15),
    ],
    "c.swc": [
        (1, 1, 130.0, 115.0, 3.0, -1),
        (2, 3, 140.0, 118.5, 1.0, 1),
        (3, 3, 155.0, 116.0, 0.5, 2),
        (4, 3, 148.0, 123.0, 0.5, 2),
        (5, 3, 120.0, 120.0, 0.75, 1),
        (6, 3, 113.5, 112.0, 0.5, 5),
        (7, 3, 117.0, 124.5, 0.5, 5),
    ],
}


def write_swc(path: Path, rows: list[tuple]) -> None:
    """The test's own SWC writer: a comment header, then `id type x y z radius parent` lines."""
    lines = ["# test_skeletons_neuroglancer", "# units: voxels of the brain image", "# id type x y z radius parent"]
    lines += [f"{i} {t} {x:.3f} {y:.3f} {PLANE:.3f} {r:.3f} {p}" for i, t, x, y, r, p in rows]
    path.write_text("\n".join(lines) + "\n")


def image_voxels(rows: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """The neuron in the image's continuous voxel coordinates (x, y, z), as Neuroglancer's global
    coordinates of the precomputed image (voxel i spans [i, i + 1)): a node at SWC voxel v is the centre
    of voxel v + offset. Also the (child, parent) vertex index pairs."""
    xyz = np.array([(x, y, PLANE) for _, _, x, y, _, _ in rows], np.float64)
    xyz += np.array(OFFSET[::-1]) + 0.5
    index = {row[0]: k for k, row in enumerate(rows)}
    edges = np.array([(k, index[row[5]]) for k, row in enumerate(rows) if row[5] != -1], np.int64)
    return xyz, edges


def segment_distance(px: np.ndarray, py: np.ndarray, xy: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Distance (pixels) from each pixel centre (px, py) to the nearest drawn segment (or node) of xy (pixels)."""
    best = np.full(np.broadcast(px, py).shape, np.inf)
    pairs = np.concatenate([edges, np.stack([np.arange(len(xy))] * 2, axis=1)])  # nodes as zero-length segments
    for a, b in pairs:
        (ax, ay), (bx, by) = xy[a], xy[b]
        dx, dy = bx - ax, by - ay
        length2 = dx * dx + dy * dy
        t = np.clip(((px - ax) * dx + (py - ay) * dy) / length2, 0, 1) if length2 else 0.0
        best = np.minimum(best, np.hypot(px - (ax + t * dx), py - (ay + t * dy)))
    return best


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    """Write the image and the neurons, serve them, and show the image's Neuroglancer link: one screen."""
    root = tmp_path_factory.mktemp("skeletons")
    rng = np.random.default_rng(11)
    image = rng.integers(0, 200, SHAPE).astype(np.uint16)
    (root / "slices").mkdir()
    for z in range(SHAPE[0]):
        tifffile.imwrite(root / "slices" / f"z{z:02d}.tif", image[z])
    (root / "swc").mkdir()
    for name, rows in NEURONS.items():
        write_swc(root / "swc" / name, rows)
    catalog = root / "catalog.toml"
    catalog.write_text(
        '[[datasets]]\nid = "brain"\npath = "slices"\nvoxel_size = [2.0, 0.5, 0.5]\ncompression = "none"\n\n'
        '[[datasets]]\nid = "neurons"\nkind = "skeletons"\npath = "swc"\nspace = "brain"\nunits = "voxel"\n'
        f"offset = [{', '.join(map(str, OFFSET))}]\n")
    server = Server(catalog)
    browser = None
    try:
        neurons = requests.get(server.url("/api/datasets/neurons"), timeout=30).json()["neurons"]
        links = requests.get(server.url("/api/datasets/brain"), timeout=30).json()["links"]
        state_json = json.loads(urllib.parse.unquote(links["neuroglancer"].split("#!", 1)[1]))
        state = neuroglancer.ViewerState(state_json)
        # One xy panel on the plane of the neurons at a known zoom; the image dim grey (0-199 of a window
        # 0-1000: at most 51 of 255) so the neuron colours stand out.
        image_layer, skeleton_layer = state.layers[0], state.layers[1]
        image_layer.shader_controls = {"normalized": {"range": [0, WINDOW]}}
        skeleton_layer.skeleton_rendering = {"mode2d": "lines_and_points", "lineWidth2d": 2}
        state.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units=["m"] * 3,
                                                        scales=[v * 1e-6 for v in VOXEL[::-1]])
        state.position = [*CENTRE, PLANE + OFFSET[0] + 0.5]
        browser = Browser()
        screen = browser.show(state, watch=server.base, scale=SCALE, layout="xy")
        yield server, neurons, state_json, screen, image
    finally:
        if browser is not None:
            browser.close()
        server.stop()


def test_link_state_shows_every_neuron_of_the_source(shown):
    server, neurons, state_json, screen, _ = shown
    assert sorted(n["file"] for n in neurons) == sorted(NEURONS) and all(n["status"] == "ok" for n in neurons)
    image_layer, skeleton_layer = state_json["layers"]
    assert state_json["layout"] == "4panel"
    assert image_layer["type"] == "image" and image_layer["source"] == f"precomputed://{server.base}/ds/brain/precomputed"
    assert skeleton_layer["type"] == "segmentation" and skeleton_layer["name"] == "neurons"
    assert skeleton_layer["source"] == f"precomputed://{server.base}/ds/neurons/skeletons"
    segids = sorted(str(n["segid"]) for n in neurons)
    assert sorted(skeleton_layer["segments"]) == segids and sorted(skeleton_layer["segmentColors"]) == segids
    assert len(set(skeleton_layer["segmentColors"].values())) == len(segids), "neurons share a colour"
    # what the viewer settled on: every neuron shown, the view the test asked for
    assert sorted(str(s) for s in screen.state.layers[1].segments) == segids
    assert [float(p) for p in screen.state.position] == [*CENTRE, PLANE + OFFSET[0] + 0.5]


def test_every_request_of_the_viewer_is_answered(shown):
    server, neurons, _, screen, _ = shown
    chunks = check_exchanges(screen, f"{server.base}/ds", probes=set())
    asked = {ex.url.removeprefix(server.base + "/ds/") for ex in screen.exchanges}
    assert {"brain/precomputed/info", "neurons/skeletons/info"} <= asked, asked
    assert any(k.startswith("brain/precomputed/") for k in chunks), f"no image chunk was read: {chunks}"
    for n in neurons:  # each shown neuron's skeleton was fetched (and answered, above)
        assert f"neurons/skeletons/{n['segid']}" in chunks, f"{n['file']} (segment {n['segid']}) not fetched"
    strays = [url for url in asked if not url.startswith(("brain/precomputed/", "neurons/skeletons/"))]
    assert not strays, f"requests outside the two sources: {strays}"


def test_each_neuron_is_drawn_in_its_colour_where_it_was_placed(shown):
    _, neurons, state_json, screen, image = shown
    colours = state_json["layers"][1]["segmentColors"]
    height, width = screen.image.shape[:2]
    pos = {n: float(p) for n, p in zip(screen.state.dimensions.names, screen.state.position)}
    step = float(screen.state.cross_section_scale)
    assert step == pytest.approx(SCALE)
    # pixel centre (column c, row r) shows continuous voxel x = pos_x + (c + 0.5 - width / 2) * step: the
    # harness's mapping, whose voxel indices this must floor to
    x_of = pos["x"] + (np.arange(width) + 0.5 - width / 2) * step
    y_of = pos["y"] + (np.arange(height) + 0.5 - height / 2) * step
    z, ys, xs = voxels_under_pixels(screen, SHAPE)
    assert z == PLANE + OFFSET[0]
    assert (np.floor(x_of).astype(int) == xs[0]).all() and (np.floor(y_of).astype(int) == ys[:, 0]).all()
    rgb = screen.image[..., :3].astype(np.int64)
    py, px = np.mgrid[0:height, 0:width] + 0.0
    nearest = np.full((height, width), np.inf)  # pixels from the nearest segment of any neuron
    for n in neurons:
        xyz, edges = image_voxels(NEURONS[n["file"]])
        assert np.all(xyz[:, 2] == pos["z"])
        # to pixels: column (x - pos_x) / step + width / 2 - 0.5 is the pixel whose centre shows x
        pixels = np.stack([(xyz[:, 0] - pos["x"]) / step + width / 2 - 0.5,
                           (xyz[:, 1] - pos["y"]) / step + height / 2 - 0.5], axis=1)
        assert (pixels > 20).all() and (pixels < [width - 20, height - 20]).all(), "a neuron is off the panel"
        colour = np.array([int(colours[str(n["segid"])][i:i + 2], 16) for i in (1, 3, 5)])
        mine = np.abs(rgb - colour).max(axis=2) <= 24
        distance = segment_distance(px, py, pixels, edges)
        nearest = np.minimum(nearest, distance)
        # none far: every pixel of its colour within a line's (and a node's) half width of its segments
        assert mine.sum() > 200, f"{n['file']}: only {mine.sum()} pixels of its colour {colour}"
        far = distance[mine]
        assert far.max() <= 3.5, (f"{n['file']}: pixels of its colour {far.max():.1f} pixels from its segments "
                                  f"(at {np.argwhere(mine & (distance > 3.5))[:5].tolist()} row, column)")
        # drawn along its segments: the pixels on their centre lines are of its colour
        centre_line = distance <= 0.5
        assert mine[centre_line].mean() > 0.9, f"{n['file']}: {mine[centre_line].mean():.2f} of its lines drawn"
        # and at every node, including each tip: a pixel of its colour within a node's radius
        for k, (cx, cy) in enumerate(pixels):
            near = np.hypot(px - cx, py - cy) <= 2.0
            assert mine[near].any(), f"{n['file']}: nothing of its colour at node {k} ({xyz[k]} voxels)"
    # colour only near the neurons: the image is grey (r = g = b), a line's edge blends its colour into it
    coloured = rgb.max(axis=2) - rgb.min(axis=2) > 6
    assert nearest[coloured].max() <= 4.5, f"colour drawn {nearest[coloured].max():.1f} pixels from every neuron"
    # and away from them the panel is the image's plane z, drawn through its window
    away = nearest > 6
    grey = rgb[..., 0][away].astype(np.float64)
    assert grey.std() > 3 and np.corrcoef(grey, image[z][ys, xs][away])[0, 1] > 0.99
