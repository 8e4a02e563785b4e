"""The archive's own formats, written by independent libraries and read through the server by the
real clients: JPEG2000 slice stacks (imagecodecs), Imaris .ims (h5py, Imaris 5.5 layout), and the
rest of TIFF (tifffile). Native levels are served as stored; broken files fail only what they touch."""

from __future__ import annotations

import re
import subprocess
import sys

import glymur
import imagecodecs
import numpy as np
import pytest
import requests
import tensorstore as ts
import tifffile
import zarr
from conftest import Server, _blobs
from imaris_writer import write_ims
from neuroglancer_browser import check_exchanges, show_link, voxels_under_pixels
from PIL import Image

from bil_transform.cache import Cache
from bil_transform.readers import open_source

rng = np.random.default_rng(11)
JP2_SHAPE = (9, 150, 230)
JP2_RESOLUTIONS = 4  # three wavelet reductions: 150 x 230 -> 75 x 115 -> 38 x 58 -> 19 x 29
IMS_EXTENT_MIN = (30.0, 20.0, 10.0)  # x, y, z micrometers, as Imaris stores them
IMS_VOXEL = (2.0, 0.5, 0.5)  # z, y, x


def _jp2(data: np.ndarray, codecformat: str = "jp2", resolutions: int = JP2_RESOLUTIONS) -> bytes:
    return imagecodecs.jpeg2k_encode(data, level=0, codecformat=codecformat, reversible=True, resolutions=resolutions)


def _pillow_reduced(path, r: int) -> np.ndarray:
    """An independent decoder (Pillow's bundled OpenJPEG) at wavelet reduction r."""
    im = Image.open(path)
    im.reduce = r
    im.load()
    return np.asarray(im)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("archive")
    truth = {}

    # JPEG2000: one directory per channel, uint16, written by imagecodecs (OpenJPEG encoder).
    jp2 = _blobs(rng, (2, *JP2_SHAPE), 60000).astype(np.uint16)
    for c, name in enumerate(["488nm", "561nm"]):
        (root / "jp2" / name).mkdir(parents=True)
        for z in range(JP2_SHAPE[0]):
            (root / "jp2" / name / f"z{z:03d}.jp2").write_bytes(_jp2(jp2[c, z]))
    truth["jp2"] = jp2[None]
    # uint8 raw codestreams in 32 x 32 tiles (glymur writes tiles; imagecodecs cannot), picked by a glob
    jp8 = rng.integers(0, 255, (7, 90, 70)).astype(np.uint8)
    (root / "j2k").mkdir()
    for z in range(jp8.shape[0]):
        glymur.Jp2k(root / "j2k" / f"slice_{z + 1}.j2k", data=jp8[z], tilesize=(32, 32), numres=2)
        (root / "j2k" / f"other_{z + 1}.j2k").write_bytes(_jp2(jp8[z] // 2, "j2k", 2))
    truth["j2k"] = jp8[None, None]

    # Imaris: 2 channels, 2 time points, 3 levels (z kept at level 1), padded, gzip; and LZ4 + shuffle.
    ims = _blobs(rng, (2, 2, 5, 61, 93), 12000).astype(np.uint16)  # smooth, inside both channels' ranges
    size_xyz = (93, 61, 5)
    extent_max = tuple(lo + n * v for lo, n, v in zip(IMS_EXTENT_MIN, size_xyz, IMS_VOXEL[::-1]))
    truth["ims"] = write_ims(root / "brain.ims", ims, levels=3, chunks=(2, 16, 32), extent_min=IMS_EXTENT_MIN,
                             extent_max=extent_max, names=["GFP", "tdTomato"], colors=[(0, 1, 0), (1, 0.5, 0)],
                             color_ranges=[(100, 30000), (0, 12000)], compression="gzip")
    lz4 = rng.integers(0, 255, (1, 2, 12, 40, 44)).astype(np.uint8)
    truth["ims-lz4"] = write_ims(root / "lz4.ims", lz4, levels=2, chunks=(4, 16, 16), compression="lz4",
                                 shuffle=True)

    # TIFF: channel directories of slices; an ImageJ hyperstack; OME-TIFF with channel names; RGB pages.
    tch = rng.integers(0, 4000, (3, 6, 40, 50)).astype(np.uint16)
    for c in range(3):
        (root / "tiffch" / f"ch{c}").mkdir(parents=True)
        for z in range(6):
            tifffile.imwrite(root / "tiffch" / f"ch{c}" / f"img_{z:04d}.tif", tch[c, z])
    truth["tiffch"] = tch[None]
    hyper = rng.integers(0, 4000, (2, 6, 3, 20, 30)).astype(np.uint16)  # t, z, c, y, x
    luts = [np.zeros((3, 256), np.uint8) for _ in range(3)]
    for i, lut in enumerate(luts):
        lut[i] = np.arange(256)  # red, green, blue
    tifffile.imwrite(root / "hyper.tif", hyper, imagej=True, resolution=(1 / 0.5, 1 / 0.5),
                     metadata={"axes": "TZCYX", "spacing": 2.5, "unit": "um", "Ranges": (0, 1000, 10, 2000, 5, 3000),
                               "LUTs": luts})
    truth["hyper"] = hyper.transpose(0, 2, 1, 3, 4)
    ome = rng.integers(0, 4000, (2, 6, 20, 30)).astype(np.uint16)
    tifffile.imwrite(root / "cells.ome.tif", ome, metadata={
        "axes": "CZYX", "PhysicalSizeX": 0.4, "PhysicalSizeY": 0.4, "PhysicalSizeZ": 3.0,
        "Channel": {"Name": ["DAPI", "GFP"], "Color": [0x0000FFFF, 0x00FF00FF]}})
    truth["ometiff"] = ome[None]
    rgb = rng.integers(0, 255, (4, 20, 30, 3)).astype(np.uint8)
    tifffile.imwrite(root / "rgb.tif", rgb, photometric="rgb")
    truth["rgb"] = rgb.transpose(3, 0, 1, 2)[None]

    # Broken inputs, next to the good ones in the same catalog.
    plane = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    for name in ("truncated", "garbage", "gap", "stray"):
        (root / name).mkdir()
        for z in range(70):
            if name != "gap" or z != 30:
                (root / name / f"z{z:03d}.jp2").write_bytes(_jp2(plane + z))
    bad = root / "truncated" / "z066.jp2"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    (root / "garbage" / "z066.jp2").write_bytes(b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(200))
    (root / "stray" / "thumbnail.jp2").write_bytes(_jp2(plane))
    write_ims(root / "nolevel.ims", ims[:, :1], levels=3, chunks=(2, 16, 32))
    import h5py

    with h5py.File(root / "nolevel.ims", "a") as f:
        del f["DataSet/ResolutionLevel 1"]
    with h5py.File(root / "plain.h5", "w") as f:
        f["data"] = np.zeros((4, 4))

    entries = {"jp2": "jp2", "j2k": "j2k/slice_*.j2k", "ims": "brain.ims", "ims-lz4": "lz4.ims", "tiffch": "tiffch",
               "hyper": "hyper.tif", "ometiff": "cells.ome.tif", "rgb": "rgb.tif", "truncated": "truncated",
               "garbage": "garbage", "gap": "gap", "stray": "stray", "nolevel": "nolevel.ims", "plain": "plain.h5"}
    catalog = root / "catalog.toml"
    catalog.write_text("".join(f'[[datasets]]\nid = "{i}"\npath = "{root / p}"\n\n' for i, p in entries.items()))
    srv = Server(catalog)
    yield srv, root, truth
    srv.stop()


def _levels(srv, ds: str) -> tuple[zarr.Group, list[dict]]:
    group = zarr.open_group(srv.url(f"/ds/{ds}/zarr"), mode="r")
    return group, group.attrs["multiscales"][0]["datasets"]


def _scale(d: dict) -> list[float]:
    return d["coordinateTransformations"][0]["scale"][2:]


@pytest.mark.parametrize("ds", ["jp2", "j2k", "ims", "ims-lz4", "tiffch", "hyper", "ometiff", "rgb"])
def test_level0_is_exact_through_zarr_and_precomputed(archive, ds):
    srv, _, truth = archive
    want = truth[ds] if not ds.startswith("ims") else np.stack(
        [np.stack(channels) for channels in truth[ds][0]])  # truth[level][t][c]
    group, datasets = _levels(srv, ds)
    np.testing.assert_array_equal(group[datasets[0]["path"]][:], want)
    for t in range(want.shape[0]):
        prefix = f"/ds/{ds}" + (f"/t/{t}" if t else "")
        spec = {"driver": "neuroglancer_precomputed", "kvstore": srv.url(f"{prefix}/precomputed/"), "scale_index": 0}
        got = ts.open(spec, read=True).result().read().result()  # x, y, z, channel
        np.testing.assert_array_equal(np.asarray(got).transpose(3, 2, 1, 0), want[t])


def test_jpeg2000_reductions_are_the_native_levels(archive):
    """Each served level is the file's own wavelet reduction, as another decoder (Pillow) gives it."""
    srv, root, truth = archive
    group, datasets = _levels(srv, "jp2")
    assert len(datasets) == JP2_RESOLUTIONS
    for r, d in enumerate(datasets):
        assert _scale(d) == pytest.approx([1.0, 2.0**r, 2.0**r])  # no voxel size in the files: 1 um
        level = group[d["path"]][:]
        for c, name in enumerate(["488nm", "561nm"]):
            want = np.stack([_pillow_reduced(root / "jp2" / name / f"z{z:03d}.jp2", r) for z in range(JP2_SHAPE[0])])
            np.testing.assert_array_equal(level[0, c], want)
    info = requests.get(srv.url("/ds/jp2/precomputed/info")).json()
    assert [s["size"] for s in info["scales"]] == [[230, 150, 9], [115, 75, 9], [58, 38, 9], [29, 19, 9]]
    omero = group.attrs["omero"]["channels"]
    assert [ch["label"] for ch in omero] == ["488nm", "561nm"]


def test_imaris_levels_geometry_and_channels(archive):
    """Levels as stored with their real voxel sizes (extent / size, not powers of two), the
    ExtMin corner as the translation, and the channels' names, colours and ranges."""
    srv, _, truth = archive
    group, datasets = _levels(srv, "ims")
    levels = truth["ims"]
    assert len(datasets) == 3
    extent = [n * v for n, v in zip(levels[0][0][0].shape, IMS_VOXEL)]
    for r, d in enumerate(datasets):
        shape = levels[r][0][0].shape
        assert r != 1 or shape[0] == levels[0][0][0].shape[0]  # the thin z is kept at level 1
        voxel = [e / n for e, n in zip(extent, shape)]
        assert _scale(d) == pytest.approx(voxel)
        corner = [IMS_EXTENT_MIN[2], IMS_EXTENT_MIN[1], IMS_EXTENT_MIN[0]]
        assert d["coordinateTransformations"][1]["translation"][2:] == pytest.approx(
            [lo + v / 2 for lo, v in zip(corner, voxel)])  # OME places voxel centres
        served = group[d["path"]][:]
        for t in range(2):
            for c in range(2):
                np.testing.assert_array_equal(served[t, c], levels[r][t][c])
    info = requests.get(srv.url("/ds/ims/precomputed/info")).json()
    for r, scale in enumerate(info["scales"]):
        shape = levels[r][0][0].shape
        assert scale["size"] == list(shape[::-1])
        assert scale["resolution"] == pytest.approx([e / n * 1000 for e, n in zip(extent[::-1], shape[::-1])])
    channels = group.attrs["omero"]["channels"]
    assert [(ch["label"], ch["color"]) for ch in channels] == [("GFP", "00FF00"), ("tdTomato", "FF8000")]
    assert [(ch["window"]["start"], ch["window"]["end"]) for ch in channels] == [(100, 30000), (0, 12000)]
    # the Neuroglancer link carries the same colours and ranges as layer defaults
    link = requests.get(srv.url("/api/datasets/ims")).json()["links"]["neuroglancer"]
    assert "00ff00" in link.lower() and "ff8000" in link.lower() and "30000" in link


def test_imaris_matches_an_independent_reader(archive):
    """imaris-ims-file-reader on the same files: the same voxels at every level and the same voxel sizes."""
    from imaris_ims_file_reader.ims import ims

    srv, root, _ = archive
    for ds, name in [("ims", "brain.ims"), ("ims-lz4", "lz4.ims")]:
        theirs = ims(str(root / name), squeeze_output=False)
        group, datasets = _levels(srv, ds)
        assert len(datasets) == theirs.ResolutionLevels
        for r, d in enumerate(datasets):
            served = group[d["path"]][:]
            for t in range(theirs.TimePoints):
                for c in range(theirs.Channels):
                    np.testing.assert_array_equal(served[t, c], np.asarray(theirs[r, t, c, :, :, :]).squeeze(
                        axis=(0, 1)))
            assert _scale(d) == pytest.approx(theirs.metaData[r, 0, 0, "resolution"], abs=1e-3)
        del theirs


def test_tiff_channel_metadata(archive):
    srv, _, _ = archive
    omero = {ds: _levels(srv, ds)[0].attrs["omero"]["channels"] for ds in ("hyper", "ometiff", "rgb", "tiffch")}
    assert [(c["color"], c["window"]["start"], c["window"]["end"]) for c in omero["hyper"]] == [
        ("FF0000", 0, 1000), ("00FF00", 10, 2000), ("0000FF", 5, 3000)]  # ImageJ LUTs and display ranges
    assert [(c["label"], c["color"]) for c in omero["ometiff"]] == [("DAPI", "0000FF"), ("GFP", "00FF00")]
    assert [(c["label"], c["color"]) for c in omero["rgb"]] == [
        ("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF")]
    assert [c["label"] for c in omero["tiffch"]] == ["ch0", "ch1", "ch2"]
    scales = {ds: _scale(_levels(srv, ds)[1][0]) for ds in ("hyper", "ometiff")}
    assert scales == {"hyper": pytest.approx([2.5, 0.5, 0.5]), "ometiff": pytest.approx([3.0, 0.4, 0.4])}


@pytest.mark.parametrize("ds,voxel,names,top", [
    ("ims", IMS_VOXEL, ["GFP", "tdTomato"], [[0, 1, 0], [1, 128 / 255, 0]]),
    ("jp2", (1.0, 1.0, 1.0), ["488nm", "561nm"], [[0, 1, 0], [1, 0, 1]]),
    ("tiffch", (1.0, 1.0, 1.0), ["ch0", "ch1", "ch2"], [[0, 1, 0], [1, 0, 1], [0, 1, 1]]),
])
def test_napari_reads_each_format_with_its_scale_and_colours(archive, ds, voxel, names, top):
    from napari_ome_zarr import napari_get_reader

    srv, _, truth = archive
    want = np.stack([np.stack(ch) for ch in truth[ds][-1]]) if ds == "ims" else None
    url = srv.url(f"/ds/{ds}/zarr")
    (data, kwargs, kind), = napari_get_reader(url)(url)
    assert kind == "image" and kwargs["channel_axis"] == 1
    assert kwargs["scale"][1:] == pytest.approx(voxel)
    assert kwargs["name"] == [f"{ds}: {n}" for n in names]  # napari-ome-zarr prefixes the image's name
    brightest = np.array([cmap.colors[-1][:3] for cmap in kwargs["colormap"]])
    np.testing.assert_allclose(brightest, top, atol=1e-6)
    if ds == "ims":
        assert len(data) == 3 and kwargs["contrast_limits"] == [[100, 30000], [0, 12000]]
        np.testing.assert_array_equal(np.asarray(data[-1]), want)  # the coarsest level, as stored
    else:
        np.testing.assert_array_equal(np.asarray(data[0][0, :, 4]), truth[ds][0, :, 4])


def test_jpeg2000_voxel_size_from_the_resolution_box(tmp_path):
    for z in range(2):  # 2e6 pixels per metre down, 4e6 across: 0.5 um x 0.25 um
        glymur.Jp2k(tmp_path / f"z{z}.jp2", data=np.zeros((64, 64), np.uint8), numres=2,
                    capture_resolution=(2e6, 4e6))
    assert open_source(tmp_path).volume.voxel_size == pytest.approx((0.25, 0.5, 0.25))


@pytest.mark.parametrize("ds,scale", [("ims", 0.08), ("jp2", 0.15), ("tiffch", 0.06)])
def test_neuroglancer_shows_each_format_in_its_channel_colours(archive, ds, scale):
    """The index page's "open in Neuroglancer" state: every request answered, and the red in the
    panel (only channel 1's colour has red: magenta by default, orange in the .ims) is channel 1's voxels."""
    srv, _, truth = archive
    data = np.stack([np.stack(ch) for ch in truth[ds][0]]) if ds == "ims" else truth[ds]
    screen = show_link(srv.base, ds, scale)
    check_exchanges(screen, f"{srv.base}/ds/{ds}")
    z, ys, xs = voxels_under_pixels(screen, data.shape[2:])
    red = screen.image[..., 0].astype(np.float64)
    assert red.std() > 10, "the rendered panel is blank"
    assert np.corrcoef(red.ravel(), data[0, 1, z][ys, xs].astype(np.float64).ravel())[0, 1] > 0.99


class DecodeLog:
    """Records every JPEG2000 decode (file, rows, cols) and every Imaris chunk decoded."""

    def __init__(self, monkeypatch):
        import bil_transform.readers.imaris as imaris

        self.jp2, self.chunks = [], []
        getitem, decode = glymur.Jp2k.__getitem__, imaris.decode_chunk

        def counted_getitem(jp2, index):
            self.jp2.append((jp2.path.name, index))
            return getitem(jp2, index)

        def counted_decode(dsid, origin, layout):
            self.chunks.append(origin)
            return decode(dsid, origin, layout)

        monkeypatch.setattr(glymur.Jp2k, "__getitem__", counted_getitem)
        monkeypatch.setattr(imaris, "decode_chunk", counted_decode)


def test_a_region_decodes_only_what_it_needs(archive, monkeypatch):
    _, root, _ = archive
    log = DecodeLog(monkeypatch)
    segments = Cache(2**28).section("segments")  # what the server hands its readers
    reader = open_source(root / "jp2", segments)
    assert log.jp2 == []  # opening parses one header and decodes nothing
    block = reader.read(1, 0, 1, (slice(2, 5), slice(10, 40), slice(20, 60)))
    # three slices of channel 1, each decoded once, at reduction 1 (every 2nd full-resolution voxel)
    assert [name for name, _ in log.jp2] == ["z002.jp2", "z003.jp2", "z004.jp2"]
    assert all(rows.step == 2 and cols.step == 2 for _, (rows, cols) in log.jp2)
    np.testing.assert_array_equal(block[1], _pillow_reduced(root / "jp2" / "561nm" / "z003.jp2", 1)[10:40, 20:60])
    reader.read(1, 0, 1, (slice(2, 5), slice(40, 70), slice(60, 100)))  # same decode windows: kept
    assert len(log.jp2) == 3

    reader = open_source(root / "brain.ims", segments)
    region = (slice(1, 3), slice(10, 20), slice(40, 50))
    got = reader.read(0, 1, 1, region)
    # chunks are (2, 16, 32): z 0-1 and 2-3, y 0-15 and 16-31, x 32-63
    assert sorted(log.chunks) == [(0, 0, 32), (0, 16, 32), (2, 0, 32), (2, 16, 32)]
    import h5py

    with h5py.File(root / "brain.ims") as f:
        np.testing.assert_array_equal(got, f["DataSet/ResolutionLevel 0/TimePoint 1/Channel 1/Data"][region])


def test_broken_inputs_fail_with_the_file_named_and_the_rest_keeps_serving(archive):
    srv, root, _ = archive
    listed = {d["id"]: d for d in requests.get(srv.url("/api/datasets")).json()["datasets"]}
    assert listed["gap"]["status"] == "error"
    assert "1 slice is missing between z029.jp2 and z031.jp2" in listed["gap"]["error"]
    assert listed["stray"]["status"] == "error" and "thumbnail.jp2: stray file" in listed["stray"]["error"]
    assert listed["nolevel"]["status"] == "error"
    assert "nolevel.ims: ResolutionLevel 1 is missing" in listed["nolevel"]["error"]
    assert listed["plain"]["status"] == "error" and "not an Imaris .ims file" in listed["plain"]["error"]
    for ds in ("truncated", "garbage"):
        assert listed[ds]["status"] == "ok"
        assert requests.get(srv.url(f"/ds/{ds}/zarr/0/0/0/0/0/0")).status_code == 200  # planes 0-63
        bad = requests.get(srv.url(f"/ds/{ds}/zarr/0/0/0/1/0/0"))  # planes 64-69 hold z066.jp2
        assert bad.status_code == 500 and "z066.jp2" in bad.text
    assert requests.get(srv.url("/ds/jp2/zarr/0/0/0/0/0/0")).status_code == 200 and srv.alive()
    assert not any(p.name.startswith(".") or p.suffix not in (".jp2",) for p in (root / "truncated").iterdir())


@pytest.mark.parametrize("path,says", [
    ("jp2", "format:        jpeg2000-stack"),
    ("j2k/slice_1.j2k", "format:        jpeg2000-stack"),
    ("brain.ims", "format:        imaris"),
    ("tiffch", "format:        tiff-stack"),
    ("hyper.tif", "format:        tiff"),
])
def test_info_names_the_format(archive, path, says):
    _, root, _ = archive
    out = subprocess.run([sys.executable, "-m", "bil_transform", "info", str(root / path)], capture_output=True,
                         text=True, check=True).stdout
    assert says in out


def test_info_says_why_a_path_is_not_a_source(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("x")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    for path, says in [(tmp_path / "notes", "a directory holding 1 .txt files"),
                       (tmp_path / "img.png",
                        "not TIFF, JPEG2000, HDF5 (Imaris, BigDataViewer), a BigDataViewer XML or CZI")]:
        result = subprocess.run([sys.executable, "-m", "bil_transform", "info", str(path)], capture_output=True,
                                text=True)
        assert result.returncode == 1 and says in result.stderr and str(path) in result.stderr


def test_no_public_response_names_a_path_on_the_server(archive):
    """Crawl every link from / and the API, and the answers about broken files: every file is named
    relative to its dataset's own root; only the operator's log shows full paths."""
    srv, root, _ = archive
    bodies = {}

    def get(url: str) -> requests.Response:
        r = requests.get(url, headers={"Accept-Encoding": "identity"})
        bodies[url] = r.text if r.headers.get("Content-Type", "").startswith(("text", "application/json")) else ""
        return r

    index = get(srv.url("/")).text
    for link in re.findall(r"(?:href|src)='([^']+)'", index):
        if link.startswith(srv.base):
            get(link)
    for doc in get(srv.url("/api/datasets")).json()["datasets"]:
        get(srv.url(f"/api/datasets/{doc['id']}"))
        for name, link in doc["links"].items():
            for url in link if isinstance(link, list) else [link]:
                if not url.startswith(srv.base):
                    continue
                suffix = {"zarr": "/.zattrs", "zarr3": "/zarr.json", "zarr3-sharded": "/zarr.json"}.get(
                    name, "/info" if "precomputed" in name else "")
                get(url + suffix)
    for ds in ("truncated", "garbage"):
        assert "z066.jp2" in get(srv.url(f"/ds/{ds}/zarr/0/0/0/1/0/0")).text
    assert "1 slice is missing" in get(srv.url("/ds/gap/zarr/.zattrs")).text
    assert len(bodies) > 100
    leaks = [url for url, text in bodies.items() if str(root) in text]
    assert not leaks, f"{len(leaks)} public responses name {root}, e.g. {leaks[0]}"
    assert str(root) in srv.log.read_text()  # the operator still sees where a broken file is
