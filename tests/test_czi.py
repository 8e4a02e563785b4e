"""Zeiss CZI written by ZEISS's own writer (pylibCZIrw) and read through the server by the real clients:
a two-tile mosaic with a gap, two channels, a z stack, two scenes and a stored pyramid; an RGB file;
a damaged and a truncated file next to them.

pylibCZIrw writes no pyramid subblocks, so the test makes some: it writes half-size tiles with
pylibCZIrw and then sets their logical size to twice their stored size, in the subblock's directory
entry and in its own header, as the ZISRAW format defines a pyramid subblock (`_make_pyramid`).
Every expected value is an array this file wrote, placed where it wrote it.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import threading
import types

import numpy as np
import pytest
import requests
import tensorstore as ts
from conftest import Server, _blobs, ome_group
from neuroglancer_browser import check_exchanges, show_link, voxels_under_pixels
from pylibCZIrw import czi as pyczi

import bil_transform.readers.czi as czi_reader
from bil_transform.cache import Cache
from bil_transform.readers import SourceError, open_source

rng = np.random.default_rng(17)
C, Z = 2, 5
TILE = (80, 96)  # y, x of each mosaic tile
AT = {"A": (-40, 25), "B": (66, 35)}  # x, y of each tile's corner in the file's pixel coordinates
SCENE1_AT, SCENE1_TILE = (400, 300), (40, 50)
VOXEL = (2.0, 0.5, 0.5)  # z, y, x micrometres (the file says metres)
NAMES, COLORS = ["GFP", "tdTomato"], ["00FF00", "FF8000"]
LOW_HIGH = [(0.1, 0.5), (0.0, 1.0)]  # display settings, fractions of the 16-bit range
ZSTD = "zstd1:ExplicitLevel=1;PreProcess=HiLoByteUnpack"  # ZEN's current compression


def _subblocks(buf: bytearray) -> list[int]:
    """File offsets of the subblock segments, in the order pylibCZIrw wrote them."""
    found, at = [], buf.find(b"ZISRAWSUBBLOCK")
    while at >= 0:
        found.append(at)
        at = buf.find(b"ZISRAWSUBBLOCK", at + 1)
    return found


def _make_pyramid(buf: bytearray, segment: int, factor: int) -> None:
    """Make the subblock at file offset `segment` a pyramid subblock: its X and Y Size (logical) become
    `factor` x its StoredSize, in its header and in its directory entry (ZISRAW: a DV entry is
    SchemaType[2] PixelType[4] FilePosition[8] FilePart[4] Compression[4] PyramidType[1] spare[5]
    DimensionCount[4], then per dimension Dimension[4] Start[4] Size[4] StartCoordinate[4] StoredSize[4];
    a subblock segment has a 32-byte header, then MetadataSize[4] AttachmentSize[4] DataSize[8] and its
    DV entry; the directory segment has EntryCount[4] and 124 reserved bytes before its entries)."""
    entries = [segment + 32 + 16]
    directory = buf.find(b"ZISRAWDIRECTORY")
    at = directory + 32 + 128
    for _ in range(struct.unpack_from("<i", buf, directory + 32)[0]):
        if struct.unpack_from("<q", buf, at + 6)[0] == segment:
            entries.append(at)
        at += 32 + 20 * struct.unpack_from("<i", buf, at + 28)[0]
    assert len(entries) == 2, "the directory lists the subblock once"
    for entry in entries:
        assert buf[entry:entry + 2] == b"DV"
        buf[entry + 22] = 2  # PyramidType: MultiSubBlock
        for k in range(struct.unpack_from("<i", buf, entry + 28)[0]):
            dim = entry + 32 + 20 * k
            if bytes(buf[dim:dim + 4]).rstrip(b"\0") in (b"X", b"Y"):
                struct.pack_into("<i", buf, dim + 8, factor * struct.unpack_from("<i", buf, dim + 16)[0])


def _display(c: int) -> pyczi.ChannelDisplaySettingsDataClass:
    r, g, b = (np.uint8(int(COLORS[c][i:i + 2], 16)) for i in (0, 2, 4))
    return pyczi.ChannelDisplaySettingsDataClass(True, pyczi.TintingMode.Color, pyczi.Rgb8Color(r, g, b), *LOW_HIGH[c])


@pytest.fixture(scope="module")
def czi(tmp_path_factory):
    root = tmp_path_factory.mktemp("czi")
    truth = {}
    tiles = {k: _blobs(rng, (C, Z, *TILE), 60000).astype(np.uint16) for k in AT}
    scene1 = _blobs(rng, (C, Z, *SCENE1_TILE), 60000).astype(np.uint16)
    with pyczi.create_czi(str(root / "mosaic.czi"), compression_options=ZSTD) as w:
        for c in range(C):
            for z in range(Z):
                for k, at in AT.items():
                    w.write(tiles[k][c, z, ..., None], plane={"C": c, "Z": z, "T": 0}, location=at, scene=0)
        for c in range(C):
            for z in range(Z):
                w.write(scene1[c, z, ..., None], plane={"C": c, "Z": z, "T": 0}, location=SCENE1_AT, scene=1)
        for c in range(C):  # the pyramid layer of scene 0, made a pyramid below
            for z in range(Z):
                for k, at in AT.items():
                    w.write(np.ascontiguousarray(tiles[k][c, z, ::2, ::2, None]), plane={"C": c, "Z": z, "T": 0},
                            location=at, scene=0)
        w.write_metadata(channel_names=dict(enumerate(NAMES)), scale_x=VOXEL[2] * 1e-6, scale_y=VOXEL[1] * 1e-6,
                         scale_z=VOXEL[0] * 1e-6, display_settings={c: _display(c) for c in range(C)})
    buf = bytearray((root / "mosaic.czi").read_bytes())
    segments = _subblocks(buf)
    assert len(segments) == 5 * C * Z
    for segment in segments[3 * C * Z:]:
        _make_pyramid(buf, segment, 2)
    (root / "mosaic.czi").write_bytes(buf)

    # Level 0: the bounding box of both tiles, voxel (0, 0) at its corner; the 10 columns between the tiles,
    # the 10 rows below A and those above B are background (0). Level 1: the half tiles at half positions.
    x0, y0 = min(x for x, _ in AT.values()), min(y for _, y in AT.values())
    level0 = np.zeros((1, C, Z, 90, 202), np.uint16)
    level1 = np.zeros((1, C, Z, 45, 101), np.uint16)
    for k, (x, y) in AT.items():
        level0[0, :, :, y - y0:y - y0 + TILE[0], x - x0:x - x0 + TILE[1]] = tiles[k]
        level1[0, :, :, (y - y0) // 2:(y - y0) // 2 + TILE[0] // 2, (x - x0) // 2:(x - x0) // 2 + TILE[1] // 2] = \
            tiles[k][..., ::2, ::2]
    truth["mosaic"], truth["level1"], truth["scene1"], truth["corner"] = level0, level1, scene1[None], (x0, y0)

    # RGB: Bgr24 (pylibCZIrw takes the samples in memory order blue, green, red).
    bgr = rng.integers(0, 255, (3, 30, 40, 3)).astype(np.uint8)
    with pyczi.create_czi(str(root / "rgb.czi"), compression_options="zstd0:ExplicitLevel=1") as w:
        for z in range(3):
            w.write(bgr[z], plane={"C": 0, "Z": z, "T": 0})
        w.write_metadata(scale_x=1e-6, scale_y=1e-6, scale_z=1e-6)
    truth["rgb"] = bgr[..., ::-1].transpose(3, 0, 1, 2)[None]  # red, green, blue channels

    # Damaged: tile A of channel 1 at z 3 loses its segment id. Truncated: the second half (and with it
    # the subblock directory at the end) is gone.
    broken = bytearray(buf)
    bad = segments[(1 * Z + 3) * 2]
    broken[bad:bad + 14] = b"NOTASUBBLOCK!!"
    (root / "damaged.czi").write_bytes(broken)
    (root / "truncated.czi").write_bytes(buf[: len(buf) // 2])

    entries = {"mosaic": ("mosaic.czi", ""), "scene1": ("mosaic.czi", "scene = 1\n"), "rgb": ("rgb.czi", ""),
               "damaged": ("damaged.czi", ""), "truncated": ("truncated.czi", ""),
               "noscene": ("mosaic.czi", "scene = 7\n")}
    catalog = root / "catalog.toml"
    catalog.write_text("".join(f'[[datasets]]\nid = "{i}"\npath = "{root / name}"\n{extra}\n'
                               for i, (name, extra) in entries.items()))
    srv = Server(catalog)
    yield srv, root, truth
    srv.stop()


@pytest.mark.parametrize("ds", ["mosaic", "scene1", "rgb"])
def test_level0_is_exact_through_zarr_python_and_tensorstore(czi, ds):
    """The stitched mosaic (tiles at their positions, the gap 0), another scene, RGB as three channels."""
    srv, _, truth = czi
    want = truth[ds]
    group, datasets = ome_group(srv, ds)
    np.testing.assert_array_equal(group[datasets[0]["path"]][:], want)
    v2 = ts.open({"driver": "zarr", "kvstore": srv.url(f"/ds/{ds}/zarr/0/")}, read=True).result()
    np.testing.assert_array_equal(v2.read().result(), want)
    v3 = ts.open({"driver": "zarr3", "kvstore": srv.url(f"/ds/{ds}/zarr3/0/")}, read=True).result()
    np.testing.assert_array_equal(v3.read().result(), want)
    spec = {"driver": "neuroglancer_precomputed", "kvstore": srv.url(f"/ds/{ds}/precomputed/"), "scale_index": 0}
    got = ts.open(spec, read=True).result().read().result()  # x, y, z, channel
    np.testing.assert_array_equal(np.asarray(got).transpose(3, 2, 1, 0), want[0])


def test_the_stored_pyramid_is_the_native_level_1(czi):
    """Level 1 is the file's pyramid layer as stored; a scene without one has level 0 only (the server
    computes the rest); every level of scene 0 sits over level 0 (box-downsampled placement)."""
    srv, _, truth = czi
    group, datasets = ome_group(srv, "mosaic")
    levels = requests.get(srv.url("/api/datasets/mosaic")).json()["levels"]
    assert [lvl["native"] for lvl in levels[:3]] == [True, True, False]
    assert levels[1]["factors"] == [1.0, 2.0, 2.0] and levels[1]["shape"] == [Z, 45, 101]
    np.testing.assert_array_equal(group[datasets[1]["path"]][:], truth["level1"])
    scale0, scale1 = (d["coordinateTransformations"][0]["scale"][2:] for d in datasets[:2])
    assert scale1 == pytest.approx([scale0[0], scale0[1] * 2, scale0[2] * 2])
    shift0, shift1 = (d["coordinateTransformations"][1]["translation"][2:] for d in datasets[:2])
    assert shift1 == pytest.approx([shift0[0], shift0[1] + VOXEL[1] / 2, shift0[2] + VOXEL[2] / 2])
    other = requests.get(srv.url("/api/datasets/scene1")).json()["levels"]
    assert [lvl["native"] for lvl in other] == [True] + [False] * (len(other) - 1)


def test_voxel_size_origin_channel_names_colours_and_windows(czi):
    srv, _, truth = czi
    group, datasets = ome_group(srv, "mosaic")
    assert datasets[0]["coordinateTransformations"][0]["scale"][2:] == pytest.approx(VOXEL)
    # no stage position in the file: the box corner in the file's pixel coordinates, times the voxel size
    x0, y0 = truth["corner"]
    assert datasets[0]["coordinateTransformations"][1]["translation"][2:] == pytest.approx(
        [0.0, y0 * VOXEL[1] + VOXEL[1] / 2, x0 * VOXEL[2] + VOXEL[2] / 2])
    channels = group.attrs["omero"]["channels"]
    assert [(ch["label"], ch["color"]) for ch in channels] == list(zip(NAMES, COLORS))
    assert [(ch["window"]["start"], ch["window"]["end"]) for ch in channels] == [
        pytest.approx((lo * 65535, hi * 65535)) for lo, hi in LOW_HIGH]
    info = requests.get(srv.url("/ds/mosaic/precomputed/info")).json()
    assert info["scales"][0]["resolution"] == pytest.approx([v * 1000 for v in VOXEL[::-1]])
    rgb = ome_group(srv, "rgb")[0].attrs["omero"]["channels"]
    assert [(ch["label"], ch["color"]) for ch in rgb] == [("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF")]


def test_napari_ome_zarr_opens_a_czi_dataset(czi):
    from napari_ome_zarr import napari_get_reader

    srv, _, truth = czi
    url = srv.url("/ds/mosaic/mosaic.ome.zarr")
    (data, kwargs, kind), = napari_get_reader(url)(url)
    assert kind == "image" and kwargs["channel_axis"] == 1
    assert kwargs["scale"][1:] == pytest.approx(VOXEL)
    assert kwargs["name"] == [f"mosaic: {n}" for n in NAMES]
    brightest = np.array([cmap.colors[-1][:3] for cmap in kwargs["colormap"]])
    np.testing.assert_allclose(brightest, [[0, 1, 0], [1, 128 / 255, 0]], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(data[0]), truth["mosaic"])
    np.testing.assert_array_equal(np.asarray(data[1]), truth["level1"])


def test_neuroglancer_shows_the_mosaic_in_its_channel_colours(czi):
    """The "open in Neuroglancer" state: every request answered, and the red in the panel (only
    channel 1's orange has red) is channel 1's voxels, gap included."""
    srv, _, truth = czi
    screen = show_link(srv.base, "mosaic", 0.1)
    check_exchanges(screen, f"{srv.base}/ds/mosaic")
    data = truth["mosaic"][0]
    z, ys, xs = voxels_under_pixels(screen, data.shape[1:])
    red = screen.image[..., 0].astype(np.float64)
    assert red.std() > 10, "the rendered panel is blank"
    assert np.corrcoef(red.ravel(), data[1, z][ys, xs].astype(np.float64).ravel())[0, 1] > 0.99


def _counting(monkeypatch) -> tuple[list, list]:
    """Every document the reader opens keeps libCZI's own subblock cache (so its size counts the
    subblocks libCZI has read), and logs every composition asked of it."""
    opened, calls = [], []

    class Counting(pyczi.CziReader):
        def __init__(self, path: str):
            super().__init__(path, cache_options=pyczi.CacheOptions(max_memory_usage=2**30, max_sub_block_count=10**6))
            opened.append(self)

        def read(self, **kwargs):
            calls.append(kwargs)
            return super().read(**kwargs)

    monkeypatch.setattr(czi_reader, "pyczi", types.SimpleNamespace(CziReader=Counting))
    return opened, calls


def test_a_region_reads_only_the_subblocks_it_touches(czi, monkeypatch):
    _, root, truth = czi
    opened, calls = _counting(monkeypatch)

    def subblocks_read() -> int:
        return sum(doc.get_cache_info().elements_count for doc in opened)

    reader = open_source(root / "mosaic.czi", Cache(2**28).section("segments"))
    assert calls == [] and subblocks_read() == 0  # opening reads the directory and metadata only
    region = (slice(1, 4), slice(5, 30), slice(10, 50))  # inside tile A
    np.testing.assert_array_equal(reader.read(0, 0, 1, region), truth["mosaic"][0, 1][region])
    assert subblocks_read() == 3 and len(calls) == 3  # tile A's subblock of each of the three planes
    region = (slice(1, 4), slice(40, 70), slice(60, 90))  # elsewhere in A: its composed tile is kept
    np.testing.assert_array_equal(reader.read(0, 0, 1, region), truth["mosaic"][0, 1][region])
    assert subblocks_read() == 3 and len(calls) == 3
    region = (slice(0, 1), slice(0, 90), slice(0, 202))  # a whole plane: both tiles, each once
    np.testing.assert_array_equal(reader.read(0, 0, 0, region), truth["mosaic"][0, 0][region])
    assert subblocks_read() == 5
    region = (slice(4, 5), slice(10, 40), slice(60, 90))  # level 1 reads the pyramid subblocks, not level 0's
    np.testing.assert_array_equal(reader.read(1, 0, 0, region), truth["level1"][0, 0][region])
    assert subblocks_read() == 7 and calls[-1]["zoom"] == 0.5


def test_threads_share_one_reader(czi):
    """Random regions of both levels from four threads at once (a libCZI document per thread, the
    composed windows shared) are each what was written."""
    _, root, truth = czi
    reader = open_source(root / "mosaic.czi", Cache(2**26).section("segments"))
    wrong: list = []
    done: list = []

    def work(seed: int) -> None:
        r = np.random.default_rng(seed)
        for _ in range(40):
            level = int(r.integers(2))
            want = (truth["mosaic"], truth["level1"])[level][0]
            c = int(r.integers(C))
            region = tuple(slice(a, a + int(r.integers(1, n - a + 1))) for a, n in
                           ((int(r.integers(n)), n) for n in want.shape[1:]))
            try:
                if not np.array_equal(reader.read(level, 0, c, region), want[c][region]):
                    wrong.append((level, c, region))
            except Exception as exc:  # a thread's exception would otherwise only be printed
                wrong.append((level, c, region, exc))
            done.append(region)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [] and len(done) == 160


def test_a_damaged_subblock_fails_only_what_touches_it(czi):
    srv, root, truth = czi
    reader = open_source(root / "damaged.czi")
    # tile B of the same plane, and tile A of the other channel, read as written
    np.testing.assert_array_equal(reader.read(0, 0, 1, (slice(3, 4), slice(20, 90), slice(110, 202))),
                                  truth["mosaic"][0, 1, 3:4, 20:90, 110:202])
    np.testing.assert_array_equal(reader.read(0, 0, 0, (slice(3, 4), slice(0, 80), slice(0, 96))),
                                  truth["mosaic"][0, 0, 3:4, :80, :96])
    with pytest.raises(SourceError, match=r"damaged\.czi: the subblocks of scene 0 at T=0 C=1 Z=3"):
        reader.read(0, 0, 1, (slice(2, 5), slice(0, 10), slice(0, 10)))
    # served: chunks (5, 64, 64), read in slabs of 3 along x (192 columns, which A's tile spans)
    bad = requests.get(srv.url("/ds/damaged/zarr/0/0/1/0/0/0"))
    assert bad.status_code == 500 and "damaged.czi" in bad.text and "Z=3" in bad.text
    for key in ("0/0/0/0/0/0", "0/0/1/0/0/3", "0/0/0/0/1/1"):
        assert requests.get(srv.url(f"/ds/damaged/zarr/{key}")).status_code == 200, key
    assert requests.get(srv.url("/ds/mosaic/zarr/0/0/1/0/0/0")).status_code == 200 and srv.alive()


def test_files_and_scenes_that_cannot_be_served_say_why(czi):
    srv, root, _ = czi
    listed = {d["id"]: d for d in requests.get(srv.url("/api/datasets")).json()["datasets"]}
    assert listed["truncated"]["status"] == "error"
    assert "truncated.czi: the file header or subblock directory cannot be read" in listed["truncated"]["error"]
    assert listed["noscene"]["status"] == "error"
    assert "scene = 7 does not exist; the file has scenes 0 and 1: set scene to one of them" in \
        listed["noscene"]["error"]
    assert all(listed[ds]["status"] == "ok" for ds in ("mosaic", "scene1", "rgb", "damaged"))
    assert "the file holds 2 scenes (0 and 1); this is scene 1" in open_source(
        root / "mosaic.czi", selection={"scene": 1}).volume.notes[0]
    with pytest.raises(SourceError, match="the file has one scene, 0: leave scene out"):
        open_source(root / "rgb.czi", selection={"scene": 1})
    with pytest.raises(SourceError, match=r"mosaic\.czi: setup = 1 names a .*BigDataViewer.* czi source"):
        open_source(root / "mosaic.czi", selection={"setup": 1})


@pytest.mark.parametrize("args,says", [
    ([], ["format:        czi", "shape:         (1, 2, 5, 90, 202)", "voxel size:    2 x 0.5 x 0.5 um",
          "GFP (#00FF00), tdTomato (#FF8000)", "native levels: 2", "1: shape (5, 45, 101), factors (1, 2, 2)"]),
    (["--scene", "1"], ["shape:         (1, 2, 5, 40, 50)", "native levels: 1"]),
])
def test_info_explains_a_czi(czi, args, says):
    _, root, _ = czi
    out = subprocess.run([sys.executable, "-m", "bil_transform", "info", str(root / "mosaic.czi"), *args],
                         capture_output=True, text=True, check=True).stdout
    for line in says:
        assert line in out, out


def test_a_pyramid_layer_only_some_planes_have_is_computed_instead(tmp_path):
    """A layer is native only where every plane has it: libCZI would fill the other planes' level from
    full-size subblocks by nearest neighbour, so the server's own (mean) pyramid computes it instead."""
    planes = rng.integers(0, 255, (2, 40, 60)).astype(np.uint8)
    path = tmp_path / "partial.czi"
    with pyczi.create_czi(str(path)) as w:
        for z in range(2):
            w.write(planes[z], plane={"Z": z})
        w.write(np.ascontiguousarray(planes[0, ::2, ::2]), plane={"Z": 0})
    buf = bytearray(path.read_bytes())
    _make_pyramid(buf, _subblocks(buf)[2], 2)
    path.write_bytes(buf)
    volume = open_source(path).volume
    assert [lvl.shape for lvl in volume.native_levels] == [(2, 40, 60)]
    assert "pyramid subblocks at factor 2 exist for 1 of 2 planes only" in volume.notes[0]
    np.testing.assert_array_equal(open_source(path).read(0, 0, 0, (slice(0, 2), slice(0, 40), slice(0, 60))), planes)


def test_the_index_and_the_api_name_the_format(czi):
    srv, _, _ = czi
    page = requests.get(srv.url("/"), params={"q": "format:czi"}).text
    assert "mosaic" in page and "read from czi" in page
    assert requests.get(srv.url("/api/datasets")).json()["facets"]["format"]["czi"] >= 2
