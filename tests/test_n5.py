"""N5 written by independent libraries (z5py, tensorstore's n5 driver, pybdv; n5-java's lz4 framing built
here from the spec, since no Python library writes it) and read through the server by the real clients:
an n5-viewer multiscale group, a BigDataViewer N5 container, a plain 5-D array. Native levels are
served as stored, with their factors and voxel sizes; a broken block fails only what touches it."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import imagecodecs
import numpy as np
import pytest
import requests
import tensorstore as ts
import xxhash
import z5py
from conftest import Server, _blobs, ome_group
from neuroglancer_browser import check_exchanges, show_link, voxels_under_pixels

import bil_transform.readers.n5 as n5
from bil_transform.cache import Cache
from bil_transform.readers import SourceError, open_source

rng = np.random.default_rng(17)
VOXEL = (4.0, 0.5, 0.5)  # the n5-viewer group's, z, y, x um: anisotropic
VIEWER_FACTORS = [(1, 1, 1), (2, 2, 1), (4, 4, 2)]  # x, y, z, as n5-viewer writes them
BDV_RESOLUTION = (0.4, 0.4, 2.0)  # x, y, z, in the XML's unit (micrometres), no unit in the N5


def _strided(a: np.ndarray, factors_xyz) -> np.ndarray:
    fx, fy, fz = factors_xyz
    return a[..., ::fz, ::fy, ::fx].copy()


def _ts_write(path, data_xyz: np.ndarray, block_xyz, compression: dict) -> None:
    """tensorstore's n5 driver: edge blocks are stored whole."""
    spec = {"driver": "n5", "kvstore": {"driver": "file", "path": str(path)},
            "metadata": {"dimensions": list(data_xyz.shape), "blockSize": list(block_xyz),
                         "dataType": data_xyz.dtype.name, "compression": compression}}
    ts.open(spec, create=True).result()[...].write(data_xyz).result()


def _java_lz4(path, data: np.ndarray, block_zyx) -> None:
    """An n5-java lz4 dataset from the spec: edge blocks cut to the volume, each block an N5 header and
    lz4-java LZ4BlockOutputStream frames (64 KiB, xxHash32 checksums) closed by its end mark."""
    path.mkdir(parents=True)
    (path / "attributes.json").write_text(json.dumps({
        "dimensions": list(data.shape[::-1]), "blockSize": list(block_zyx[::-1]), "dataType": data.dtype.name,
        "compression": {"type": "lz4", "blockSize": 65536}}))
    for cell in np.ndindex(*[math.ceil(n / b) for n, b in zip(data.shape, block_zyx)]):
        part = data[tuple(slice(i * b, (i + 1) * b) for i, b in zip(cell, block_zyx))]
        body = part.astype(part.dtype.newbyteorder(">")).tobytes()
        out = [struct.pack(">HH3I", 0, 3, *part.shape[::-1])]
        for i in range(0, len(body), 65536):
            piece = body[i:i + 65536]
            packed = imagecodecs.lz4_encode(piece, header=False)
            check = xxhash.xxh32_intdigest(piece, seed=0x9747B28C) & 0x0FFFFFFF
            out.append(struct.pack("<8sBiii", b"LZ4Block", 0x26, len(packed), len(piece), check) + packed)
        out.append(struct.pack("<8sBiii", b"LZ4Block", 0x16, 0, 0, 0))
        (path / str(cell[2]) / str(cell[1])).mkdir(parents=True, exist_ok=True)
        (path / str(cell[2]) / str(cell[1]) / str(cell[0])).write_bytes(b"".join(out))


@pytest.fixture(scope="module")
def n5dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("n5")
    truth = {}

    # An n5-viewer multiscale group written by z5py (gzip; edge blocks cut), s0 s1 s2 with their
    # downsamplingFactors and pixelResolution; the container's root is given: its only image.
    base = _blobs(rng, (12, 150, 170), 60000).astype(np.uint16)
    f = z5py.File(str(root / "viewer.n5"), use_zarr_format=False, mode="a")
    group = f.create_group("volume")
    truth["viewer"] = []
    for k, factors in enumerate(VIEWER_FACTORS):
        level = _strided(base, factors)
        ds = group.create_dataset(f"s{k}", data=level, chunks=(4, 64, 64), compression="gzip")
        ds.attrs["downsamplingFactors"] = list(factors)
        ds.attrs["pixelResolution"] = {"dimensions": [VOXEL[2], VOXEL[1], VOXEL[0]], "unit": "um"}
        truth["viewer"].append(level[None, None])

    # A BigDataViewer N5 container: 2 setups x 2 time points x 2 levels of uint8; groups and their
    # attributes by z5py, the datasets by tensorstore (raw, edge blocks stored whole).
    bdv = rng.integers(0, 255, (2, 2, 8, 60, 70)).astype(np.uint8)  # t, c (setup), z, y, x
    f = z5py.File(str(root / "bdv.n5"), use_zarr_format=False, mode="a")
    for s in range(2):
        setup = f.create_group(f"setup{s}")
        setup.attrs["downsamplingFactors"] = [[1, 1, 1], [2, 2, 2]]
        setup.attrs["dataType"] = "uint8"
        for t in range(2):
            tp = setup.create_group(f"timepoint{t}")
            tp.attrs["resolution"] = list(BDV_RESOLUTION)
            tp.attrs["multiScale"] = True
            for k, factors in enumerate([(1, 1, 1), (2, 2, 2)]):
                _ts_write(root / "bdv.n5" / f"setup{s}" / f"timepoint{t}" / f"s{k}", _strided(bdv[t, s], factors).T,
                          (32, 32, 4), {"type": "raw"})
                tp[f"s{k}"].attrs["downsamplingFactors"] = list(factors)
    truth["bdv"] = [bdv, _strided(bdv, (2, 2, 2))]

    # A plain 5-D float32 array (x, y, z, c, t), gzip with useZlib, by tensorstore; voxel size in
    # Neuroglancer's convention (resolution with units), added by z5py. Blocks hold 2 channels.
    plain = rng.normal(100, 20, (2, 3, 6, 40, 50)).astype(np.float32)  # t, c, z, y, x
    z5py.File(str(root / "plain.n5"), use_zarr_format=False, mode="a")
    _ts_write(root / "plain.n5" / "arr", plain.transpose(4, 3, 2, 1, 0), (32, 32, 4, 2, 1),
              {"type": "gzip", "useZlib": True})
    arr = z5py.File(str(root / "plain.n5"), use_zarr_format=False, mode="a")["arr"]
    arr.attrs["resolution"] = [300, 300, 1500]
    arr.attrs["units"] = ["nm", "nm", "nm"]
    truth["plain"] = plain

    # Broken blocks (tensorstore, gzip, blocks [32, 32, 8]): x=1 cut in half, x=2 y=1 garbage, x=0 y=1 missing.
    broken = _blobs(rng, (8, 64, 96), 30000).astype(np.uint16)
    _ts_write(root / "broken", broken.T, (32, 32, 8), {"type": "gzip"})
    cut = root / "broken" / "1" / "0" / "0"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (root / "broken" / "2" / "1" / "0").write_bytes(b"\x00\x00\x00\x03" + bytes(40))
    (root / "broken" / "0" / "1" / "0").unlink()
    broken[:, 32:64, 0:32] = 0  # N5's fill value
    truth["broken"] = broken

    entries = {"viewer": "viewer.n5", "bdv": "bdv.n5", "plain": "plain.n5/arr", "broken": "broken"}
    catalog = root / "catalog.toml"
    catalog.write_text("".join(f'[[datasets]]\nid = "{i}"\npath = "{root / p}"\n' +
                               ('chunk = [8, 32, 32]\n' if i == "broken" else "") + "\n" for i, p in entries.items()))
    srv = Server(catalog)
    yield srv, root, truth
    srv.stop()


@pytest.mark.parametrize("ds", ["viewer", "bdv", "plain"])
def test_level0_is_exact_through_zarr_tensorstore_and_precomputed(n5dir, ds):
    srv, _, truth = n5dir
    want = truth[ds][0] if ds != "plain" else truth[ds]
    group, datasets = ome_group(srv, ds)
    np.testing.assert_array_equal(group[datasets[0]["path"]][:], want)
    level0 = ts.open({"driver": "zarr", "kvstore": srv.url(f"/ds/{ds}/zarr/0/")}, read=True).result()
    np.testing.assert_array_equal(level0.read().result(), want)
    for t in range(want.shape[0]):
        prefix = f"/ds/{ds}" + (f"/t/{t}" if t else "")
        spec = {"driver": "neuroglancer_precomputed", "kvstore": srv.url(f"{prefix}/precomputed/"), "scale_index": 0}
        got = ts.open(spec, read=True).result().read().result()  # x, y, z, channel
        np.testing.assert_array_equal(np.asarray(got).transpose(3, 2, 1, 0), want[t])


@pytest.mark.parametrize("ds,factors,voxel", [
    ("viewer", [(1, 1, 1), (1, 2, 2), (2, 4, 4)], VOXEL),
    ("bdv", [(1, 1, 1), (2, 2, 2)], BDV_RESOLUTION[::-1]),
])
def test_native_levels_are_served_as_stored_with_their_factors(n5dir, ds, factors, voxel):
    """Each stored level, as written, at its downsamplingFactors; the voxel size from pixelResolution
    (n5-viewer) or the time point's resolution (BigDataViewer), scaled per level."""
    srv, _, truth = n5dir
    group, datasets = ome_group(srv, ds)
    doc = requests.get(srv.url(f"/api/datasets/{ds}")).json()
    assert doc["format"] == "n5" and doc["voxel_size"] == pytest.approx(voxel) and doc["voxel_size_known"]
    native = [lvl for lvl in doc["levels"] if lvl["native"]]
    assert [tuple(lvl["factors"]) for lvl in native] == factors
    for k, (d, f) in enumerate(zip(datasets, factors)):
        assert d["coordinateTransformations"][0]["scale"][2:] == pytest.approx([v * x for v, x in zip(voxel, f)])
        np.testing.assert_array_equal(group[d["path"]][:], truth[ds][k])
    info = requests.get(srv.url(f"/ds/{ds}/precomputed/info")).json()
    assert info["scales"][0]["resolution"] == pytest.approx([v * 1000 for v in voxel[::-1]])
    assert [s["size"] for s in info["scales"][:len(factors)]] == [list(lv.shape[-1:-4:-1]) for lv in truth[ds]]


def test_channels_time_points_and_units(n5dir):
    """BigDataViewer setups are channels and its time points the t axis; a plain 5-D array's 4th axis
    is channels and its 5th time; Neuroglancer's `units` convert to micrometres."""
    srv, _, truth = n5dir
    bdv = requests.get(srv.url("/api/datasets/bdv")).json()
    assert bdv["shape"] == [2, 2, 8, 60, 70] and [c["name"] for c in bdv["channels"]] == ["setup0", "setup1"]
    plain = requests.get(srv.url("/api/datasets/plain")).json()
    assert plain["shape"] == [2, 3, 6, 40, 50] and plain["dtype"] == "float32"
    assert plain["voxel_size"] == pytest.approx([1.5, 0.3, 0.3])
    assert [lvl["native"] for lvl in plain["levels"]][0] and sum(lvl["native"] for lvl in plain["levels"]) == 1


def test_napari_reads_the_multiscale_group(n5dir):
    from napari_ome_zarr import napari_get_reader

    srv, _, truth = n5dir
    url = srv.url("/ds/bdv/bdv.ome.zarr")
    (data, kwargs, kind), = napari_get_reader(url)(url)
    assert kind == "image" and kwargs["channel_axis"] == 1
    assert kwargs["scale"][1:] == pytest.approx(BDV_RESOLUTION[::-1])
    assert kwargs["name"] == ["bdv: setup0", "bdv: setup1"]
    assert len(data) >= 2
    np.testing.assert_array_equal(np.asarray(data[1]), truth["bdv"][1])  # the stored level 1


def test_neuroglancer_shows_the_n5_voxels(n5dir):
    """The "open in Neuroglancer" link of the n5-viewer group: every request answered, and the panel
    is the level-0 voxels."""
    srv, _, truth = n5dir
    data = truth["viewer"][0]
    screen = show_link(srv.base, "viewer", 0.12)
    check_exchanges(screen, f"{srv.base}/ds/viewer")
    z, ys, xs = voxels_under_pixels(screen, data.shape[2:])
    gray = screen.image[..., 0].astype(np.float64)
    assert gray.std() > 10, "the rendered panel is blank"
    assert np.corrcoef(gray.ravel(), data[0, 0, z][ys, xs].astype(np.float64).ravel())[0, 1] > 0.99


def test_a_region_decodes_only_the_blocks_it_touches(n5dir, monkeypatch):
    _, root, truth = n5dir
    decoded = []
    decode = n5._decode
    monkeypatch.setattr(n5, "_decode", lambda array, position: decoded.append((array.path.name, position))
                        or decode(array, position))
    segments = Cache(2**28).section("segments")  # what the server hands its readers
    reader = open_source(root / "viewer.n5", segments)
    assert decoded == []  # opening parses attributes and decodes nothing
    region = (slice(3, 6), slice(60, 70), slice(100, 140))
    got = reader.read(0, 0, 0, region)
    np.testing.assert_array_equal(got, truth["viewer"][0][0, 0][region])
    # blocks (z 4, y 64, x 64), named x first: z 0-3 and 4-7, y 0-63 and 64-127, x 64-127 and 128-169
    assert sorted(p for _, p in decoded) == sorted((x, y, z) for x in (1, 2) for y in (0, 1) for z in (0, 1))
    reader.read(0, 0, 0, (slice(4, 8), slice(64, 100), slice(130, 150)))  # inside blocks already decoded: kept
    assert len(decoded) == 8
    decoded.clear()
    reader.read(2, 0, 0, (slice(0, 2), slice(0, 5), slice(0, 5)))
    assert decoded == [("s2", (0, 0, 0))]
    # one channel of the 5-D array, whose blocks hold two: the block is decoded once for both
    plain = open_source(root / "plain.n5" / "arr", segments)
    decoded.clear()
    for c in (0, 1):
        np.testing.assert_array_equal(plain.read(0, 1, c, (slice(0, 4), slice(0, 32), slice(0, 32))),
                                      truth["plain"][1, c, 0:4, 0:32, 0:32])
    assert decoded == [("arr", (0, 0, 0, 0, 1))]


def test_broken_blocks_fail_only_their_chunks_and_a_missing_block_is_zero(n5dir):
    srv, _, truth = n5dir
    want = truth["broken"]

    def chunk(y: int, x: int) -> requests.Response:
        return requests.get(srv.url(f"/ds/broken/zarr/0/0/0/0/{y}/{x}"))  # chunks of 8 x 32 x 32: one block each

    for y, x in [(0, 0), (1, 0), (1, 1), (0, 2)]:
        assert chunk(y, x).status_code == 200
    group, _ = ome_group(srv, "broken")
    level0 = group["0"]
    np.testing.assert_array_equal(level0[0, 0, :, 0:32, 0:32], want[:, 0:32, 0:32])
    np.testing.assert_array_equal(level0[0, 0, :, 32:64, 0:32], 0)  # the missing block
    np.testing.assert_array_equal(level0[0, 0, :, 0:32, 64:96], want[:, 0:32, 64:96])
    for (y, x), name in [((0, 1), "1/0/0"), ((1, 2), "2/1/0")]:
        r = chunk(y, x)
        assert r.status_code == 500 and name in r.text and "N5 block" in r.text, r.text
        assert str(srv.url("")) not in r.text
    assert chunk(0, 0).status_code == 200 and srv.alive()


def _tiny(root, name: str, data: np.ndarray) -> None:
    """A small uint16 dataset in blocks of (3, 8, 16) under `root`."""
    spec = {"gzip": {"type": "gzip"}, "raw": {"type": "raw"}, "bzip2": {"type": "bzip2"}, "xz": {"type": "xz"},
            "blosc": {"type": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1}, "zstd": {"type": "zstd"}}
    if name in spec:
        _ts_write(root / name, data.T, (16, 8, 3), spec[name])
    elif name == "lz4-java":
        _java_lz4(root / name, data, (3, 8, 16))
    else:  # z5py's lz4: one bare LZ4 block per N5 block, and the blocks of n5-java's and z5py's other writers
        f = z5py.File(str(root / "z5.n5"), use_zarr_format=False, mode="a")
        f.create_dataset(name, data=data, chunks=(3, 8, 16), compression=name.split("-")[1])


@pytest.mark.parametrize("name", ["raw", "gzip", "bzip2", "xz", "blosc", "zstd", "lz4-java", "z5py-lz4",
                                  "z5py-xz"])
def test_every_compression_reads_exactly(tmp_path, name):
    data = rng.integers(0, 65535, (7, 20, 37)).astype(np.uint16)
    _tiny(tmp_path, name, data)
    path = tmp_path / "z5.n5" / name if name.startswith("z5py") else tmp_path / name
    reader = open_source(path)
    assert reader.volume.format == "n5" and reader.volume.shape == (1, 1, 7, 20, 37)
    np.testing.assert_array_equal(reader.read(0, 0, 0, (slice(0, 7), slice(0, 20), slice(0, 37))), data)
    np.testing.assert_array_equal(reader.read(0, 0, 0, (slice(2, 7), slice(5, 19), slice(15, 37))),
                                  data[2:7, 5:19, 15:37])


def test_setups_that_share_no_grid_and_containers_of_several_images_are_refused(tmp_path):
    f = z5py.File(str(tmp_path / "tiles.n5"), use_zarr_format=False, mode="a")
    for s, shape in enumerate([(4, 20, 30), (4, 20, 31)]):
        f.create_group(f"setup{s}").attrs["downsamplingFactors"] = [[1, 1, 1]]
        f.create_dataset(f"setup{s}/timepoint0/s0", data=np.zeros(shape, np.uint8), chunks=(4, 16, 16))
    with pytest.raises(SourceError, match=r"setup1 and setup0 do not share one grid .* give the path of one setup "
                                          r".* or set setup = 1 in the catalog$"):
        open_source(tmp_path / "tiles.n5")
    one = open_source(tmp_path / "tiles.n5" / "setup1")  # its path, as the message says
    assert one.volume.shape == (1, 1, 4, 20, 31)
    assert open_source(tmp_path / "tiles.n5", selection={"setup": 1}).volume.shape == (1, 1, 4, 20, 31)  # catalog
    g = z5py.File(str(tmp_path / "two.n5"), use_zarr_format=False, mode="a")
    g.create_dataset("raw", data=np.zeros((2, 8, 8), np.uint8), chunks=(2, 8, 8))
    g.create_dataset("labels/s0", data=np.zeros((2, 8, 8), np.uint8), chunks=(2, 8, 8))
    with pytest.raises(SourceError, match=r"two.n5: holds 2 N5 images \(labels, raw\); give the path of one"):
        open_source(tmp_path / "two.n5")
    h = z5py.File(str(tmp_path / "jpeg.n5"), use_zarr_format=False, mode="a")
    h.create_dataset("img", data=np.zeros((2, 8, 8), np.uint8), chunks=(2, 8, 8))
    attrs = json.loads((tmp_path / "jpeg.n5" / "img" / "attributes.json").read_text())
    attrs["compression"] = {"type": "jpeg", "quality": 90}
    (tmp_path / "jpeg.n5" / "img" / "attributes.json").write_text(json.dumps(attrs))
    with pytest.raises(SourceError, match=r"compression .*jpeg.* is not one this reader decodes"):
        open_source(tmp_path / "jpeg.n5" / "img")


def test_pybdv_container_reads_as_bigdataviewer_writes_it(tmp_path):
    """pybdv (BigDataViewer's Python exporter, over z5py) writes two setups with a level reduced in x and
    y only: both setups are channels, the stored levels as z5py reads them, the XML's voxel size."""
    import pybdv

    data = _blobs(rng, (5, 40, 60), 3000).astype(np.uint16)
    for setup in range(2):
        pybdv.make_bdv(data + setup, str(tmp_path / "pb.n5"), downscale_factors=[[1, 2, 2]], resolution=[2.0, 0.5, 0.5],
                       unit="micrometer", setup_id=setup, timepoint=0)
    reader = open_source(tmp_path / "pb.n5")
    vol = reader.volume
    assert vol.shape == (1, 2, 5, 40, 60) and vol.voxel_size == pytest.approx((2.0, 0.5, 0.5))
    assert [lvl.factors for lvl in vol.native_levels] == [(1.0, 1.0, 1.0), (1.0, 2.0, 2.0)]
    stored = z5py.File(str(tmp_path / "pb.n5"), use_zarr_format=False, mode="r")
    for setup in range(2):
        for k, lvl in enumerate(vol.native_levels):
            np.testing.assert_array_equal(reader.read(k, 0, setup, tuple(slice(0, n) for n in lvl.shape)),
                                          stored[f"setup{setup}/timepoint0/s{k}"][:])


def test_n5_viewer_channel_groups_are_channels(tmp_path):
    """n5-viewer's multichannel root: c0, c1 multiscale groups sharing one grid are one image's channels."""
    data = rng.integers(0, 4000, (2, 6, 30, 40)).astype(np.uint16)
    f = z5py.File(str(tmp_path / "channels.n5"), use_zarr_format=False, mode="a")
    for c in range(2):
        for k, factors in enumerate([(1, 1, 1), (2, 2, 1)]):
            ds = f.create_dataset(f"c{c}/s{k}", data=_strided(data[c], factors), chunks=(3, 16, 16),
                                  compression="zstd")
            ds.attrs["downsamplingFactors"] = list(factors)
    reader = open_source(tmp_path / "channels.n5")
    assert [ch.name for ch in reader.volume.channels] == ["c0", "c1"] and reader.volume.shape == (1, 2, 6, 30, 40)
    assert reader.volume.notes[0] == "layout: n5-viewer channel groups: 2 channel(s), 2 levels"
    np.testing.assert_array_equal(reader.read(1, 0, 1, (slice(0, 6), slice(0, 15), slice(0, 20))),
                                  _strided(data[1], (2, 2, 1)))
    assert not reader.volume.voxel_size_known


def test_cosem_transform_gives_voxel_size_and_origin(tmp_path):
    """Janelia COSEM's per-level `transform` (C order, nanometres): voxel size, level factors and translation."""
    f = z5py.File(str(tmp_path / "em.n5"), use_zarr_format=False, mode="a")
    group = f.create_group("fibsem")
    for k in range(2):
        ds = group.create_dataset(f"s{k}", data=np.zeros((8 >> k, 16 >> k, 16 >> k), np.uint8), chunks=(4, 8, 8))
        ds.attrs["transform"] = {"axes": ["z", "y", "x"], "scale": [5.0 * 2**k, 4.0 * 2**k, 4.0 * 2**k],
                                 "translate": [2.5 * (2**k - 1), 2.0 * (2**k - 1), 100.0 + 2.0 * (2**k - 1)],
                                 "units": ["nm", "nm", "nm"]}
    vol = open_source(tmp_path / "em.n5" / "fibsem").volume
    assert vol.voxel_size == pytest.approx((0.005, 0.004, 0.004))
    assert vol.origin == pytest.approx((0.0, 0.0, 0.1))
    assert [lvl.factors for lvl in vol.native_levels] == [(1.0, 1.0, 1.0), (2.0, 2.0, 2.0)]
    assert vol.native_levels[1].translation == pytest.approx((0.0025, 0.002, 0.102))


@pytest.mark.parametrize("path,says", [
    ("viewer.n5", ["format:        n5", "voxel size:    4 x 0.5 x 0.5 um", "1: shape (12, 75, 85), factors (1, 2, 2)",
                   "2: shape (6, 38, 43), factors (2, 4, 4)"]),
    ("bdv.n5", ["format:        n5", "shape:         (2, 2, 8, 60, 70)", "setup0 (#00FF00), setup1 (#FF00FF)",
                "time points:   2"]),
])
def test_info_explains_the_n5(n5dir, path, says):
    _, root, _ = n5dir
    out = subprocess.run([sys.executable, "-m", "bil_transform", "info", str(root / path)], capture_output=True,
                         text=True, check=True).stdout
    for line in says:
        assert line in out, out


def test_notes_say_how_the_layout_was_read(n5dir):
    _, root, _ = n5dir
    viewer = open_source(root / "viewer.n5").volume
    assert viewer.notes[0].startswith("layout: a multiscale group of 3 levels (s0, s1, s2)")
    assert "the only image in viewer.n5 is volume" in viewer.notes[1]
    bdv = open_source(root / "bdv.n5").volume
    assert bdv.notes[0] == "layout: a BigDataViewer N5 container: 2 setup(s) as channels, 2 time point(s), 2 levels"
    assert any("resolution has no unit; read as micrometres" in note for note in bdv.notes)


def test_the_index_and_the_api_name_the_format(n5dir):
    srv, _, _ = n5dir
    page = requests.get(srv.url("/"), params={"q": "format:n5"}).text
    assert "viewer" in page and "read from n5" in page
    assert requests.get(srv.url("/api/datasets")).json()["facets"]["format"]["n5"] >= 3
