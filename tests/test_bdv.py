"""BigDataViewer HDF5 + XML, written by npy2bdv and pybdv, read through the server by the real clients:
every setup group and time point, native levels as the writers stored them, voxel sizes and
translations from voxelSize and the registrations, channel names; a broken or partial file fails only
the chunks that touch it, with the file and the view named."""

from __future__ import annotations

import shutil
import subprocess
import sys
import warnings

import h5py
import numpy as np
import pytest
import requests
import tensorstore as ts
import zarr
from conftest import Server, _blobs
from neuroglancer_browser import check_exchanges, show_link, voxels_under_pixels

import bil_transform.readers.bdv as bdv
from bil_transform.cache import Cache
from bil_transform.readers import SourceError, open_source

rng = np.random.default_rng(17)
SHAPE = (10, 70, 90)  # z, y, x of every npy2bdv view
SUBSAMP = ((1, 1, 1), (1, 2, 2), (2, 4, 4))  # z, y, x: three levels, z kept at level 1
VOXEL = (2.0, 0.5, 0.5)  # z, y, x micrometers: anisotropic
SHIFTS = [(10, 5, 2), (110, 5, 3)]  # each tile's translation, x, y, z in world units (x-pixels: calibration 1, 1, 4)
PB_VOXEL = (3.0, 0.4, 0.4)


def _npy2bdv(path, data: np.ndarray, block=(4, 64, 64), skip=()) -> None:
    """data[t, tile, channel] (z, y, x) uint16, as npy2bdv writes it: int16 cells, gzip, a calibration
    scaling z by 4, and a translation per tile (BigStitcher's layout)."""
    import npy2bdv

    nt, ntiles, nch = data.shape[:3]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = npy2bdv.BdvWriter(str(path), nchannels=nch, ntiles=ntiles, subsamp=SUBSAMP, blockdim=(block,),
                              compression="gzip")
        w.set_attribute_labels("channel", ("488nm", "561nm")[:nch])
        for t in range(nt):
            for tile in range(ntiles):
                for ch in range(nch):
                    if (t, tile, ch) in skip:
                        continue
                    x, y, z = SHIFTS[tile]
                    affine = np.array([[1.0, 0, 0, x], [0, 1, 0, y], [0, 0, 1, z]])
                    w.append_view(data[t, tile, ch], time=t, tile=tile, channel=ch, m_affine=affine,
                                  voxel_size_xyz=VOXEL[::-1], voxel_units="um", calibration=(1, 1, 4))
        w.write_xml()
        w.close()


def _pybdv(path, views: dict[tuple[int, int], np.ndarray], **kw) -> None:
    """views[(time point, setup)] (z, y, x), as pybdv writes them: small chunks, three levels."""
    import pybdv

    for (tp, setup), data in views.items():
        pybdv.make_bdv(data, str(path), downscale_factors=[[1, 2, 2], [2, 2, 2]], downscale_mode="mean",
                       resolution=list(PB_VOXEL), unit="micrometer", setup_id=setup, timepoint=tp, chunks=(8, 16, 16),
                       attributes={"channel": {"id": setup}}, setup_name=f"ch{setup}", **kw)


@pytest.fixture(scope="module")
def bdv_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("bdv")
    truth = {}
    # 2 channels x 2 tiles x 2 time points, uint16 over the whole range (int16 on disk), each view structured in y, x
    views = [_blobs(rng, SHAPE, 60000 - 3000 * i) for i in range(8)]
    tiles = np.stack(views).reshape(2, 2, 2, *SHAPE).astype(np.uint16)
    (root / "tiles").mkdir()
    _npy2bdv(root / "tiles" / "dataset.h5", tiles)
    truth["tiles"] = tiles[:, 0]  # t, c, z, y, x: tile 0, the group of setup 0
    truth["tile1"] = tiles[:, 1]
    truth["tiles-h5"] = tiles[:, 0]
    # pybdv: two channels at time points 0 and 2 (its XML then lists 0-2: time point 1 has no cells)
    pb = _blobs(rng, (2, 2, 12, 40, 50), 60000).astype(np.uint16)
    (root / "pb").mkdir()
    _pybdv(root / "pb" / "pb.h5", {(tp, s): pb[tp // 2, s] for tp in (0, 2) for s in (0, 1)})
    truth["pb"] = pb
    (root / "bare").mkdir()  # the same .h5 without its XML
    shutil.copy(root / "pb" / "pb.h5", root / "bare" / "views.h5")
    truth["bare"] = pb
    # a missing view (npy2bdv lists it in MissingViews), and a damaged chunk
    (root / "gappy").mkdir()
    _npy2bdv(root / "gappy" / "gappy.h5", tiles[:, :1], skip={(1, 0, 1)})
    shutil.copytree(root / "tiles", root / "broken")
    with h5py.File(root / "broken" / "dataset.h5", "r") as f:
        info = f["t00000/s00/0/cells"].id.get_chunk_info_by_coord((4, 0, 0))
    with open(root / "broken" / "dataset.h5", "r+b") as f:
        f.seek(info.byte_offset)
        f.write(bytes(range(256)) * (info.size // 256))
    entries = {"tiles": "tiles/dataset.xml", "tile1": ("tiles/dataset.xml", 1), "tiles-h5": "tiles/dataset.h5",
               "pb": "pb/pb.xml", "bare": "bare/views.h5", "gappy": "gappy/gappy.xml", "broken": "broken/dataset.xml",
               "nosuch": ("tiles/dataset.xml", 9)}
    catalog = root / "catalog.toml"
    text = ""
    for ds, where in entries.items():
        path, setup = where if isinstance(where, tuple) else (where, None)
        text += f'[[datasets]]\nid = "{ds}"\npath = "{root / path}"\n' + (f"setup = {setup}\n" if setup else "") + "\n"
    catalog.write_text(text)
    srv = Server(catalog)
    yield srv, root, truth
    srv.stop()


def _group(srv, ds: str) -> zarr.Group:
    return zarr.open_group(srv.url(f"/ds/{ds}/zarr"), mode="r")


def _transforms(group: zarr.Group) -> list[tuple[list[float], list[float]]]:
    return [(d["coordinateTransformations"][0]["scale"][2:], d["coordinateTransformations"][1]["translation"][2:])
            for d in group.attrs["multiscales"][0]["datasets"]]


@pytest.mark.parametrize("ds,times", [("tiles", [0, 1]), ("tile1", [0, 1]), ("tiles-h5", [0, 1]), ("pb", [0, 2]),
                                      ("bare", [0, 1])])
def test_level0_is_exact_through_zarr_and_tensorstore(bdv_files, ds, times):
    """Every setup group and time point, uint16 bit for bit from BDV's int16 cells; pybdv's XML lists
    time points 0-2 and the file holds 0 and 2, which serve; its bare .h5 has them as t = 0, 1."""
    srv, _, truth = bdv_files
    want = truth[ds]
    array = _group(srv, ds)["0"]
    stored = ts.open({"driver": "zarr", "kvstore": srv.url(f"/ds/{ds}/zarr/0/")}, read=True).result()
    assert array.dtype == np.uint16 and stored.dtype.numpy_dtype == np.uint16
    for i, t in enumerate(times):
        np.testing.assert_array_equal(array[t], want[i])
        np.testing.assert_array_equal(stored[t].read().result(), want[i])
    assert want.max() > 32767  # the values int16 would have made negative


def test_native_levels_are_served_as_the_writers_stored_them(bdv_files):
    import npy2bdv

    srv, root, _ = bdv_files
    editor = npy2bdv.BdvEditor(str(root / "tiles" / "dataset.xml"), mode="r")
    api = requests.get(srv.url("/api/datasets/tiles")).json()
    assert [lvl["native"] for lvl in api["levels"]][:3] == [True, True, True]
    for ds, tile in [("tiles", 0), ("tile1", 1)]:
        group = _group(srv, ds)
        for level in range(len(SUBSAMP)):
            served = group[str(level)][:]
            for t in range(2):
                for ch in range(2):
                    np.testing.assert_array_equal(served[t, ch], editor.read_view(
                        time=t, tile=tile, channel=ch, ilevel=level).astype(np.uint16))
    editor.finalize()
    group = _group(srv, "pb")
    with h5py.File(root / "pb" / "pb.h5", "r") as f:  # pybdv's own levels, as h5py reads them
        for level in range(3):
            for t in (0, 2):
                for s in (0, 1):
                    stored = f[f"t{t:05d}/s{s:02d}/{level}/cells"][()]
                    np.testing.assert_array_equal(group[str(level)][t, s], stored.view(np.uint16))


def test_voxel_sizes_translations_and_channel_names(bdv_files):
    """voxelSize is the scale at level 0 and level L's is it times the resolutions' factors; each tile's
    registration (in x-pixels, BigStitcher's calibration) is its translation in micrometers, and level
    L's voxel 0 sits (factor - 1) / 2 voxels in, as BDV's mipmap transform puts it."""
    srv, _, _ = bdv_files
    for ds, tile in [("tiles", 0), ("tile1", 1)]:
        group = _group(srv, ds)
        x, y, z = SHIFTS[tile]
        origin = [z * VOXEL[2], y * VOXEL[2], x * VOXEL[2]]
        for (scale, shift), factors in zip(_transforms(group), SUBSAMP):
            assert scale == pytest.approx([v * f for v, f in zip(VOXEL, factors)])
            assert shift == pytest.approx([o + (f - 1) / 2 * v for o, f, v in zip(origin, factors, VOXEL)])
        assert [c["label"] for c in group.attrs["omero"]["channels"]] == ["488nm", "561nm"]
    info = requests.get(srv.url("/ds/tiles/precomputed/info")).json()
    assert info["scales"][0]["resolution"] == pytest.approx([500, 500, 2000])
    assert [s["size"] for s in info["scales"][:3]] == [[90, 70, 10], [45, 35, 10], [23, 18, 5]]
    pb = _group(srv, "pb")
    assert _transforms(pb)[0] == (pytest.approx(list(PB_VOXEL)), pytest.approx([0, 0, 0]))
    assert [c["label"] for c in pb.attrs["omero"]["channels"]] == ["ch0", "ch1"]  # pybdv names setups, not channels
    bare = requests.get(srv.url("/api/datasets/bare")).json()
    assert bare["voxel_size_known"] is False and bare["shape"][:2] == [2, 2]
    assert [c["name"] for c in bare["channels"]] == ["setup 0", "setup 1"]


def test_setup_selects_a_group_and_a_missing_one_is_named(bdv_files):
    srv, root, _ = bdv_files
    listed = {d["id"]: d for d in requests.get(srv.url("/api/datasets")).json()["datasets"]}
    assert listed["nosuch"]["status"] == "error"
    assert "setup = 9 is not in this BigDataViewer dataset, whose setups are 0, 1, 2, 3" in listed["nosuch"]["error"]
    xml = root / "tiles" / "dataset.xml"
    groups = {s: open_source(xml, selection={"setup": s}).volume for s in range(4)}
    assert groups[0].origin == groups[2].origin != groups[1].origin == groups[3].origin  # channels share a tile
    assert any("setups 0, 2 (tile 0); setups 1, 3 (tile 1)" in n for n in groups[0].notes)


def test_a_region_decodes_only_the_chunks_it_needs(bdv_files, monkeypatch):
    _, root, truth = bdv_files
    decoded, sliced = [], []
    decode, getitem = bdv.decode_chunk, h5py.Dataset.__getitem__
    monkeypatch.setattr(bdv, "decode_chunk", lambda dsid, origin, layout: decoded.append(origin) or decode(
        dsid, origin, layout))
    monkeypatch.setattr(h5py.Dataset, "__getitem__", lambda d, key: sliced.append((d.name, key)) or getitem(d, key))
    segments = Cache(2**28).section("segments")
    reader = open_source(root / "tiles" / "dataset.xml", segments)
    assert decoded == [] and not [name for name, _ in sliced if name.endswith("cells")]  # opening reads no voxel
    region = (slice(1, 3), slice(10, 20), slice(60, 70))
    np.testing.assert_array_equal(reader.read(0, 1, 1, region), truth["tiles"][1, 1][region])
    assert sorted(decoded) == [(0, 0, 0), (0, 0, 64)]  # chunks are (4, 64, 64): x 0-63 and 64-89 at z 0-3
    reader.read(0, 1, 1, (slice(2, 4), slice(30, 40), slice(50, 80)))  # the same two chunks: kept
    assert len(decoded) == 2
    # pybdv's 8 x 16 x 16 chunks (4 KiB) too: decoded here, into their own size (HDF5's filter has no bound)
    reader = open_source(root / "pb" / "pb.xml", segments)
    sliced.clear()
    decoded.clear()
    region = (slice(3, 9), slice(5, 21), slice(17, 33))
    np.testing.assert_array_equal(reader.read(0, 2, 1, region), truth["pb"][1, 1][region])
    assert not [name for name, _ in sliced if name.endswith("cells")]
    assert sorted(decoded) == [(z, y, x) for z in (0, 8) for y in (0, 16) for x in (16, 32)]


def test_napari_reads_a_bdv_dataset_with_its_scale_and_colours(bdv_files):
    from napari_ome_zarr import napari_get_reader

    srv, root, truth = bdv_files
    url = srv.url("/ds/tiles/zarr")
    (data, kwargs, kind), = napari_get_reader(url)(url)
    assert kind == "image" and kwargs["channel_axis"] == 1
    assert kwargs["scale"][1:] == pytest.approx(VOXEL)
    assert kwargs["name"] == ["tiles: 488nm", "tiles: 561nm"]
    brightest = np.array([cmap.colors[-1][:3] for cmap in kwargs["colormap"]])
    np.testing.assert_allclose(brightest, [[0, 1, 0], [1, 0, 1]], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(data[0][1]), truth["tiles"][1])
    with h5py.File(root / "tiles" / "dataset.h5", "r") as f:
        np.testing.assert_array_equal(np.asarray(data[2][0, 1]), f["t00000/s02/2/cells"][()].view(np.uint16))


def test_neuroglancer_shows_a_bdv_dataset_in_its_channel_colours(bdv_files):
    """The "open in Neuroglancer" link: every request answered, and the red in the panel (only
    channel 1's magenta has red) is channel 1's voxels."""
    srv, _, truth = bdv_files
    data = truth["tiles"][0]
    screen = show_link(srv.base, "tiles", 0.1)
    check_exchanges(screen, f"{srv.base}/ds/tiles")
    z, ys, xs = voxels_under_pixels(screen, data.shape[1:])
    red = screen.image[..., 0].astype(np.float64)
    assert red.std() > 10, "the rendered panel is blank"
    assert np.corrcoef(red.ravel(), data[1, z][ys, xs].astype(np.float64).ravel())[0, 1] > 0.99


def test_broken_and_partial_files_fail_only_the_chunks_that_touch_them(bdv_files):
    srv, _, _ = bdv_files
    get = lambda ds, key: requests.get(srv.url(f"/ds/{ds}/zarr/0/{key}"))  # noqa: E731
    bad = get("broken", "0/0/0/0/0")  # level 0, t 0, channel 0 (setup 0), the chunk holding z 4-7
    assert bad.status_code == 500 and "dataset.h5" in bad.text and "t00000/s00/0/cells" in bad.text
    for fine in ("0/0/0/0/1", "0/1/0/0/0", "1/0/0/0/0"):  # another x, the other channel, the other time point
        assert get("broken", fine).status_code == 200
    missing = get("gappy", "1/1/0/0/0")  # time point 1, channel 1: not written, listed in MissingViews
    assert missing.status_code == 500 and "MissingViews" in missing.text and "time point 1, setup 1" in missing.text
    assert get("gappy", "1/0/0/0/0").status_code == 200 and get("gappy", "0/1/0/0/0").status_code == 200
    partial = get("pb", "1/0/0/0/0")  # pybdv's XML lists time point 1, the file has no cells for it
    assert partial.status_code == 500 and "pb.h5" in partial.text and "t00001/s00/0/cells" in partial.text
    assert get("pb", "2/0/0/0/0").status_code == 200 and get("tiles", "0/0/0/0/0").status_code == 200
    assert srv.alive()


def test_info_explains_a_bdv_dataset(bdv_files):
    _, root, _ = bdv_files

    def info(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "bil_transform", "info", *args], capture_output=True, text=True,
                              check=True).stdout

    out = info(str(root / "tiles" / "dataset.xml"), "--setup", "3")
    for says in ["format:        bdv", "shape:         (2, 2, 10, 70, 90) (t, c, z, y, x)", "dtype:         uint16",
                 "voxel size:    2 x 0.5 x 0.5 um (z, y, x)", "channels:      488nm (#00FF00), 561nm (#FF00FF)",
                 "native levels: 3", "2: shape (5, 18, 23), factors (2, 4, 4)"]:
        assert says in out, (says, out)
    assert "(not in the file; set voxel_size in the catalog)" in info(str(root / "bare" / "views.h5"))


def test_a_rotated_registration_is_served_as_stored_with_a_note(tmp_path):
    """pybdv's affine turning the view 90 degrees about z: OME-Zarr and precomputed cannot say it, so the
    view is served in its own grid at the origin, and the note says why."""
    data = _blobs(rng, (6, 20, 30), 4000).astype(np.uint16)
    rotate = [0.0, -0.4, 0.0, 7.0, 0.4, 0.0, 0.0, 8.0, 0.0, 0.0, 3.0, 9.0]
    _pybdv(tmp_path / "rot.h5", {(0, 0): data}, affine=rotate)
    volume = (reader := open_source(tmp_path / "rot.xml")).volume
    assert volume.origin == (0, 0, 0) and volume.voxel_size == pytest.approx(PB_VOXEL)
    assert any("rotates, shears or flips" in n and "served as stored" in n for n in volume.notes)
    np.testing.assert_array_equal(reader.read(0, 0, 0, (slice(0, 6), slice(0, 20), slice(0, 30))), data)


def test_another_loader_is_refused_in_one_sentence(tmp_path):
    import pybdv

    pybdv.make_bdv(np.zeros((4, 8, 8), np.uint8), str(tmp_path / "data.n5"))
    with pytest.raises(SourceError, match=r"data.xml: its image loader is 'bdv.n5' \(image data in data.n5\), "
                                          r"and this reader reads BigDataViewer HDF5 \('bdv.hdf5'\) only; "
                                          r"serve the N5 container \(data.n5\) itself, which holds the same setups$"):
        bdv.BdvReader(tmp_path / "data.xml")


def test_a_setup_missing_from_the_file_fails_alone(bdv_files, tmp_path):
    """A .h5 that lost setup 1's group (a partial copy): setup 0 still serves, setup 1 is refused by name."""
    _, root, truth = bdv_files
    for name in ("pb.h5", "pb.xml"):
        shutil.copy(root / "pb" / name, tmp_path / name)
    with h5py.File(tmp_path / "pb.h5", "a") as f:
        del f["s01"]
    reader = open_source(tmp_path / "pb.xml")
    assert reader.volume.shape[:2] == (3, 1) and any("setup 1 is not served: s01/resolutions" in n
                                                     for n in reader.volume.notes)
    with h5py.File(root / "pb" / "pb.h5", "r") as f:
        stored = f["t00002/s00/1/cells"][()].view(np.uint16)
    np.testing.assert_array_equal(reader.read(1, 2, 0, (slice(0, 12), slice(0, 20), slice(0, 25))), stored)
    with pytest.raises(SourceError, match=r"pb.h5: setup 1 cannot be served: s01/resolutions is missing"):
        open_source(tmp_path / "pb.xml", selection={"setup": 1})


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
def test_a_declared_data_type_is_served_as_declared(tmp_path, dtype):
    """npy2bdv marks types other than uint16 with the `dataType` attribute that BigDataViewer reads."""
    import npy2bdv

    data = (_blobs(rng, (5, 30, 40), 250)).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        w = npy2bdv.BdvWriter(str(tmp_path / "typed.h5"), subsamp=((1, 1, 1), (1, 2, 2)), blockdim=((5, 64, 64),),
                              compression="gzip", dtype=dtype)
        w.append_view(data, voxel_size_xyz=(0.3, 0.3, 1.0), voxel_units="µm")
        w.write_xml()
        w.close()
    reader = open_source(tmp_path / "typed.xml")
    assert reader.volume.dtype == np.dtype(dtype) and reader.volume.voxel_size == pytest.approx((1.0, 0.3, 0.3))
    np.testing.assert_array_equal(reader.read(0, 0, 0, (slice(0, 5), slice(0, 30), slice(0, 40))), data)


def test_the_index_and_the_api_name_the_format(bdv_files):
    srv, _, _ = bdv_files
    page = requests.get(srv.url("/"), params={"q": "format:bdv"}).text
    assert "tiles" in page and "read from bdv" in page
    assert requests.get(srv.url("/api/datasets"), params={"q": "tiles"}).json()["facets"]["format"]["bdv"] >= 1
