"""The real Neuroglancer viewer in headless Chromium reads the precomputed and OME-Zarr views, sharded or not.

Each test opens a source as a person would (pasting `precomputed://`, `zarr://` or `zarr3://` into the viewer),
waits until every visible chunk is drawn, and checks three things: every request the viewer sent
was answered as the contract says, the panel is not blank, and what it shows is the source's
voxels (the panel's pixels against the written data, through the viewer's own position and zoom).
"""

from __future__ import annotations

import dataclasses
import re

import neuroglancer
import numpy as np
import pytest
import requests
from neuroglancer_browser import SIZE, Browser, check_exchanges, layers, link_state, voxels_under_pixels


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
    state = link_state(link)
    assert [layer.source[0].url for layer in state.layers] == [
        f"precomputed://{server.base}/ds/multi/c/{c}/precomputed" for c in range(3)]
    screen = browser.show(state, watch=server.base, scale=0.06)
    check_exchanges(screen, f"{server.base}/ds/multi")
    z, ys, xs = voxels_under_pixels(screen, src.data.shape[2:])
    red = screen.image[..., 0].astype(np.float64)  # only channel 1 (magenta) has red
    assert red.std() > 10 and screen.image[..., 1].std() > 10, "the rendered panel is blank"
    channel1 = src.data[0, 1, z][ys, xs].astype(np.float64)
    assert np.corrcoef(red.ravel(), channel1.ravel())[0, 1] > 0.99


def _only(screen, root: str):
    """The part of a screen shared by several layers that one layer's source asked for."""
    return dataclasses.replace(screen, exchanges=[ex for ex in screen.exchanges if ex.url.startswith(root + "/")])


def _coloured(source: str, rgb: str, **kw) -> neuroglancer.ImageLayer:
    """An image layer adding `rgb` (GLSL vec3 components) to the panel: layers sharing a panel each
    draw into their own colour component, so each is checked against its own voxels."""
    return neuroglancer.ImageLayer(source=source, shader=f"void main() {{ emitRGB(vec3({rgb})); }}",
                                   blend="additive", opacity=1.0, **kw)


def _value(channel: int | str = "") -> str:
    return f"toNormalized(getDataValue({channel}))"


SCALE = 0.15  # voxels a pixel: the panel shows 120 x 90 level-0 voxels


def _at_far_corner(state: neuroglancer.ViewerState, shape_zyx, voxel_size, ome: bool) -> None:
    """Look at the volume's far corner: the last x and y voxels at the panel's right and bottom edges,
    z in the last, partial chunk. There zarr edge chunks are padded, precomputed ones clipped, and
    edge shards hold unstored chunks. x, y, z come first (an explicit OME layer keeps the axis order
    t, z, y, x, whose first two are no plane of the data), in metres as the viewer reads the sources."""
    depth, height, width = shape_zyx
    centre = [n - 1 - int(np.floor((pixels / 2 - 0.5) * SCALE + 0.5)) for n, pixels in zip((width, height), SIZE)]
    centre.append(depth - 2)
    vz, vy, vx = (v * 1e-6 for v in voxel_size)
    if ome:  # an OME-Zarr voxel is centred on its index, and the data has a t axis
        state.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z", "t"], units=["m", "m", "m", ""],
                                                        scales=[vx, vy, vz, 1])
        state.position = [*centre, 0]
    else:  # a precomputed voxel i spans [i, i + 1)
        state.dimensions = neuroglancer.CoordinateSpace(names=["x", "y", "z"], units=["m"] * 3, scales=[vx, vy, vz])
        state.position = [c + 0.5 for c in centre]


def _voxels_at_far_corner(screen, shape_zyx):
    z, ys, xs = voxels_under_pixels(screen, shape_zyx)
    assert (z, ys.max(), xs.max()) == (shape_zyx[0] - 2, shape_zyx[1] - 1, shape_zyx[2] - 1), \
        f"the viewer did not keep the position: {screen.state.position}"
    return z, ys, xs


def _corner_key(root: str, channel: int, shape_zyx) -> str:
    """The key of the level-0 zarr v3 chunk (or shard) holding the far-corner voxel of the shown z."""
    chunk = requests.get(f"{root}/0/zarr.json").json()["chunk_grid"]["configuration"]["chunk_shape"]
    corner = (0, channel, shape_zyx[0] - 2, shape_zyx[1] - 1, shape_zyx[2] - 1)
    return "0/c/" + "/".join(str(i // n) for i, n in zip(corner, chunk))


def _drawn_from(screen, component: int, voxels: np.ndarray) -> float:
    """How closely one colour component of the panel follows these voxels (1: a linear map of them)."""
    drawn = screen.image[..., component].astype(np.float64)
    assert drawn.std() > 10, f"colour component {component} of the panel is blank"
    return np.corrcoef(drawn.ravel(), voxels.astype(np.float64).ravel())[0, 1]


@pytest.fixture(scope="module")
def zarr3_screen(server, sources, browser):
    """One viewer on both OME-Zarr 0.5 views of `grid` (2 channels, chunks 8x16x16): the plain one
    draws channel 0 in red, the sharded one (4x4x3 chunks a shard) channel 1 in green."""
    src = sources[0]["grid"]
    roots = {view: f"{server.base}/ds/grid/{view}" for view in ("zarr3", "zarr3-sharded")}
    channel = neuroglancer.CoordinateSpace(names=["c'"], units=[""], scales=[1])
    state = layers(plain=_coloured(f"zarr3://{roots['zarr3']}/", f"{_value()}, 0, 0",
                                   local_dimensions=channel, local_position=[0]),
                   sharded=_coloured(f"zarr3://{roots['zarr3-sharded']}/", f"0, {_value()}, 0",
                                     local_dimensions=channel, local_position=[1]))
    _at_far_corner(state, src.data.shape[2:], src.voxel_size, ome=True)
    screen = browser.show(state, watch=server.base, scale=SCALE)
    strays = [ex.url for ex in screen.exchanges if not ex.url.startswith(tuple(r + "/" for r in roots.values()))]
    assert not strays, f"requests outside the two sources: {strays}"
    assert [layer.local_position[0] for layer in screen.state.layers] == [0, 1]
    return screen, roots


def test_zarr3_source_is_drawn_from_the_source_voxels(zarr3_screen, sources):
    """`zarr3://` on the OME-Zarr 0.5 view: only `zarr.json` metadata, every key there (no 404),
    plain chunk keys `c/t/c/z/y/x`, and the red panel is channel 0's voxels."""
    screen, roots = zarr3_screen
    src, root = sources[0]["grid"], roots["zarr3"]
    mine = _only(screen, root)
    chunks = check_exchanges(mine, root, probes=set())
    metadata = {ex.url.removeprefix(root + "/") for ex in mine.exchanges if ex.url.endswith("/zarr.json")}
    assert {"zarr.json", "0/zarr.json"} <= metadata
    assert all(ex.url.endswith("/zarr.json") or "/c/" in ex.url for ex in mine.exchanges), \
        "a zarr3:// source asked for something other than zarr.json and chunks"
    assert all(re.fullmatch(r"\d+/c/0/0/\d+/\d+/\d+", k) for k in chunks), chunks
    assert _corner_key(root, 0, src.data.shape[2:]) in chunks, "the padded edge chunk was not read"
    odd = [ex for ex in mine.exchanges if ex.method != "GET" or ex.range is not None or ex.status not in (200, None)]
    assert not odd, f"unsharded zarr needs whole-file GETs only: {odd}"
    z, ys, xs = _voxels_at_far_corner(screen, src.data.shape[2:])
    assert _drawn_from(screen, 0, src.data[0, 0, z][ys, xs]) > 0.99


def test_zarr3_sharded_source_is_read_by_head_and_byte_ranges(zarr3_screen, sources):
    """`zarr3://` on the sharded view: per shard the viewer sends HEAD for its size, then reads the
    index at the end (16 bytes per inner chunk + a crc32c) and the inner chunks by byte range, every
    one answered 206 with its own Content-Range; the green panel is channel 1's voxels."""
    screen, roots = zarr3_screen
    src, root = sources[0]["grid"], roots["zarr3-sharded"]
    mine = _only(screen, root)
    chunks = check_exchanges(mine, root, probes=set())
    assert all(ex.url.endswith("/zarr.json") or "/c/" in ex.url for ex in mine.exchanges), \
        "a zarr3:// source asked for something other than zarr.json and shards"
    assert all(re.fullmatch(r"\d+/c/0/1/\d+/\d+/\d+", k) for k in chunks), chunks
    assert _corner_key(root, 1, src.data.shape[2:]) in chunks, "the edge shard was not read"
    inner = {}  # inner chunks per shard, by level
    for level in {k.split("/", 1)[0] for k in chunks}:
        meta = requests.get(f"{root}/{level}/zarr.json").json()
        (sharding,) = meta["codecs"]
        assert sharding["name"] == "sharding_indexed" and sharding["configuration"]["index_location"] == "end"
        inner[level] = int(np.prod(np.array(meta["chunk_grid"]["configuration"]["chunk_shape"])
                                   // sharding["configuration"]["chunk_shape"]))
    for url in {ex.url for ex in mine.exchanges if "/c/" in ex.url}:
        seen = [ex for ex in mine.exchanges if ex.url == url]  # in order, cancelled ones too
        assert seen[0].method == "HEAD", f"{url}: {seen[0].method} before HEAD"
        reads = [ex for ex in seen if ex.method == "GET"]
        assert all(ex.range for ex in reads), f"{url}: a GET without Range"
        if seen[0].status == 200 and reads:  # the index read: the last 16n + 4 bytes
            size, n = seen[0].content_length, inner[url.removeprefix(root + "/").split("/", 1)[0]]
            assert reads[0].range == f"bytes={size - 16 * n - 4}-{size - 1}", (url, size, reads[0].range)
    z, ys, xs = _voxels_at_far_corner(screen, src.data.shape[2:])
    assert _drawn_from(screen, 1, src.data[0, 1, z][ys, xs]) > 0.99


def test_precomputed_sharded_source_is_read_by_byte_ranges(server, sources, browser):
    """`precomputed://` on the sharded views of `grid`: both channels from `precomputed-sharded` (red,
    green) and channel 1 alone from `c/1/precomputed-sharded` (blue). Each shard `{level}/{hex}.shard`
    is read by byte ranges, the shard index entry first, every one answered 206 with its own
    Content-Range, and each colour is its channel's voxels."""
    src = sources[0]["grid"]
    roots = {"both": f"{server.base}/ds/grid/precomputed-sharded",
             "one": f"{server.base}/ds/grid/c/1/precomputed-sharded"}
    state = layers(both=_coloured(f"precomputed://{roots['both']}", f"{_value(0)}, {_value(1)}, 0"),
                   one=_coloured(f"precomputed://{roots['one']}", f"0, 0, {_value()}"))
    _at_far_corner(state, src.data.shape[2:], src.voxel_size, ome=False)
    screen = browser.show(state, watch=server.base, scale=SCALE)
    check_exchanges(screen, f"{server.base}/ds/grid", probes=set())
    strays = [ex.url for ex in screen.exchanges if not ex.url.startswith(tuple(r + "/" for r in roots.values()))]
    assert not strays, f"requests outside the two sources: {strays}"
    for root in roots.values():
        mine = _only(screen, root)
        assert mine.exchanges, f"nothing was asked of {root}"
        info = requests.get(f"{root}/info").json()
        shards = {scale["key"]: scale["sharding"] for scale in info["scales"]}
        for ex in mine.exchanges:
            key = ex.url.removeprefix(root + "/")
            if key == "info":
                continue
            level, file = key.split("/")
            digits = -(-shards[level]["shard_bits"] // 4)
            assert re.fullmatch(rf"[0-9a-f]{{{digits}}}\.shard", file) if digits else file == "0.shard", key
            assert ex.method == "GET" and ex.range, f"{ex.method} {key} without Range"
        assert any(ex.url.startswith(f"{root}/0/") for ex in mine.exchanges), f"no level-0 shard of {root} was read"
        for url in {ex.url for ex in mine.exchanges if ex.url.endswith(".shard")}:
            first = next(ex for ex in mine.exchanges if ex.url == url)
            level = url.removeprefix(root + "/").split("/")[0]
            index = 16 * 2 ** shards[level]["minishard_bits"]
            start, end = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", first.range).groups())
            assert end - start == 15 and end < index and start % 16 == 0, f"{url}: first read {first.range}"
    z, ys, xs = _voxels_at_far_corner(screen, src.data.shape[2:])
    truth = src.data[0, :, z][:, ys, xs]
    assert _drawn_from(screen, 0, truth[0]) > 0.99
    assert _drawn_from(screen, 1, truth[1]) > 0.99
    assert _drawn_from(screen, 2, truth[1]) > 0.99
