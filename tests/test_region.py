"""The region endpoint (issue 12, part 3): any box of any level as npy, ImageJ TIFF or raw, equal to the
same slice of the independent numpy pyramid; 413 past the limit, 400 with one sentence otherwise."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import requests
import tifffile
from conftest import Server
from reference import reference_levels


def _levels(sources, server, ident):
    """The independent pyramid of a held-in dataset, with the level factors the server reports."""
    src = sources[0][ident]
    doc = requests.get(server.url(f"/api/datasets/{ident}")).json()
    factors = [tuple(round(f) for f in lvl["factors"]) for lvl in doc["levels"]]
    return reference_levels(src.data, factors, src.method, src.native), doc


def _decode(response: requests.Response, fmt: str) -> np.ndarray:
    assert response.status_code == 200, response.text
    if fmt == "npy":
        return np.load(io.BytesIO(response.content))
    if fmt == "raw":
        shape = tuple(int(n) for n in response.headers["X-Shape"].split(","))
        return np.frombuffer(response.content, np.dtype(response.headers["X-Dtype"])).reshape(shape)
    with tifffile.TiffFile(io.BytesIO(response.content)) as tif:
        series = tif.series[0]
        assert tif.is_imagej and series.get_axes(False).startswith("TZCYX")  # a hyperstack (S: one sample)
        return tif.asarray().reshape(series.get_shape(False)[:5]).transpose(0, 2, 1, 3, 4)


@pytest.mark.parametrize("fmt", ["npy", "raw", "tiff"])
@pytest.mark.parametrize("ident,level,box,extra", [
    ("slices16", 0, ((3, 30), (10, 141), (0, 131)), {}),
    ("slices16", 1, ((0, 37), (5, 40), (7, 60)), {}),
    ("ome04", 1, ((2, 19), (0, 65), (11, 60)), {"c": "1"}),
    ("multi", 0, ((4, 20), (9, 70), (0, 33)), {"t": "1", "c": "0,2"}),
    ("grid", 2, ((0, 6), (3, 30), (5, 40)), {}),
])
def test_a_box_equals_the_slice_of_the_level(server, sources, fmt, ident, level, box, extra):
    levels, _ = _levels(sources, server, ident)
    if fmt == "tiff" and levels[level].dtype.name not in ("uint8", "uint16", "float32"):
        pytest.fail("every dataset chosen here fits an ImageJ TIFF")
    query = {"level": level, **dict(zip("zyx", (f"{a}:{b}" for a, b in box))), "format": fmt, **extra}
    got = _decode(requests.get(server.url(f"/ds/{ident}/region"), params=query), fmt)
    t = [int(extra["t"])] if "t" in extra else slice(None)
    c = [int(v) for v in extra["c"].split(",")] if "c" in extra else slice(None)
    want = levels[level][t][:, c][(slice(None), slice(None), *(slice(a, b) for a, b in box))]
    np.testing.assert_array_equal(got, want)


def test_full_coordinates_pick_the_level_voxels_that_cover_them(server, sources):
    levels, doc = _levels(sources, server, "slices16")
    fz, fy, fx = doc["levels"][2]["factors"]
    box = ((3, 30), (17, 141), (1, 128))  # level-0 voxels
    got = np.load(io.BytesIO(requests.get(server.url("/ds/slices16/region"), params={
        "level": 2, "coords": "full", "z": "3:30", "y": "17:141", "x": "1:128"}).content))
    covered = [slice(int(a // f), math.ceil(b / f)) for (a, b), f in zip(box, (fz, fy, fx))]
    np.testing.assert_array_equal(got, levels[2][:, :, covered[0], covered[1], covered[2]])


def test_a_region_streams_and_answers_head_and_ranges(server, sources):
    url = server.url("/ds/slices16/region?level=0&z=0:37&format=raw")
    whole = requests.get(url)
    head = requests.head(url)
    assert head.status_code == 200 and int(head.headers["Content-Length"]) == len(whole.content)
    part = requests.get(url, headers={"Range": "bytes=1000-99999"})
    assert part.status_code == 206 and part.content == whole.content[1000:100000]
    np.testing.assert_array_equal(np.frombuffer(whole.content, "<u2").reshape(sources[0]["slices16"].data.shape),
                                  sources[0]["slices16"].data)


@pytest.mark.parametrize("query,says", [
    ("level=9", "level='9' must be a level number"),
    ("z=5:2", "z='5:2' is outside"),
    ("x=0:9999", "x='0:9999' is outside"),
    ("y=a:b", "y='a:b' must be START:STOP"),
    ("c=0,7", "names a channel outside"),
    ("format=png", "format='png' is not one of"),
    ("coords=world", "coords='world' must be"),
    ("zz=1", "unknown parameter 'zz'"),
])
def test_a_malformed_box_gets_one_sentence(server, query, says):
    r = requests.get(server.url(f"/ds/slices16/region?{query}"))
    assert r.status_code == 400 and says in r.text and r.text.count("\n") == 1


def test_tiff_refuses_what_imagej_cannot_hold(server):
    r = requests.get(server.url("/ds/labels/region?format=tiff"))
    assert r.status_code == 400 and "ImageJ TIFF holds" in r.text


def test_a_box_larger_than_the_limit_is_413(sources):
    srv = Server(sources[1], ["--max-region", "100kB"])
    try:
        r = requests.get(srv.url("/ds/slices16/region?level=0"))  # 37 x 150 x 131 x 2 bytes
        assert r.status_code == 413 and "1454100 bytes" in r.text and "100000" in r.text
        assert requests.get(srv.url("/ds/slices16/region?level=0&z=0:2")).status_code == 200
    finally:
        srv.stop()


def test_tiff_carries_the_level_voxel_size_in_micrometers(server, sources):
    r = requests.get(server.url("/ds/slices16/region"), params={"level": 1, "z": "0:4", "format": "tiff"})
    doc = requests.get(server.url("/api/datasets/slices16")).json()
    vz, vy, vx = (v * f for v, f in zip(sources[0]["slices16"].voxel_size, doc["levels"][1]["factors"]))
    with tifffile.TiffFile(io.BytesIO(r.content)) as tif:
        tags = tif.pages[0].tags
        xres, yres = (n / d for n, d in (tags["XResolution"].value, tags["YResolution"].value))
        assert tif.imagej_metadata["unit"] == "um" and tif.imagej_metadata["spacing"] == pytest.approx(vz)
        assert (1 / yres, 1 / xres) == pytest.approx((vy, vx), rel=1e-5)
