"""Issue 13: a source damaged before or after the server opened it fails loudly, naming the file and
what is wrong with it; it is never served as other data. Also planar multi-sample TIFFs, and
JPEG2000 without a usable OpenJPEG (issue 13, point 18)."""

from __future__ import annotations

import threading

import glymur
import h5py
import numpy as np
import pytest
import requests
import tifffile
import zarr
from conftest import Server
from imaris_writer import write_ims

from bil_transform.readers import SourceError, open_source

PAGES = 37
BAD_CHUNK = (8, 0, 0)  # the .ims chunk whose bytes are overwritten while the server serves the file


def _big(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (PAGES, 64, 80), dtype=np.uint8)


def _cut(path, keep: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


def _garble(path, offset: int, count: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(range(256)) * (count // 256) + bytes(count % 256))


def _in_new_thread(fn):
    """fn() run on a fresh thread (whose readers reopen the file), returning what it returned or raised."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return result


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """A server (that never rechecks its files) over sources damaged before it starts, and an .ims it
    has opened whose chunk bytes are then overwritten."""
    root = tmp_path_factory.mktemp("damaged")
    truth = {}
    # cut in half: tifffile stops at page 19's directory past the end and would offer fewer pages
    tifffile.imwrite(root / "tiled_big.tif", _big(1), tile=(32, 32), compression="zlib", photometric="minisblack")
    _cut(root / "tiled_big.tif", (root / "tiled_big.tif").stat().st_size // 2)
    # every directory intact (tifffile writes each compressed page's directory before its data), but the
    # last page's last strip cut short
    tifffile.imwrite(root / "strips_cut.tif", _big(2), rowsperstrip=16, compression="zlib", photometric="minisblack")
    _cut(root / "strips_cut.tif", (root / "strips_cut.tif").stat().st_size - 10)
    # one compressed tile overwritten with bytes zlib cannot inflate
    truth["bad_tile"] = _big(3)
    tifffile.imwrite(root / "bad_tile.tif", truth["bad_tile"], tile=(32, 32), compression="zlib",
                     photometric="minisblack")
    with tifffile.TiffFile(root / "bad_tile.tif") as tf:
        page = tf.pages[20]
        _garble(root / "bad_tile.tif", page.dataoffsets[0], page.databytecounts[0])
    # planar 4-sample TIFFs: RGB plus alpha (what tifffile 2026 writes for a (4, H, W) array by default) in
    # strips, and grey plus three unspecified extra samples in compressed tiles
    planar = np.random.default_rng(4).integers(0, 60000, (4, 40, 50), np.uint16)
    for name, options in [
        ("planar4", {"photometric": "rgb", "extrasamples": ["unassalpha"], "rowsperstrip": 8}),
        ("planar4_tiled", {"photometric": "minisblack", "extrasamples": ["unspecified"] * 3, "tile": (16, 16),
                           "compression": "zlib"}),
    ]:
        tifffile.imwrite(root / f"{name}.tif", planar, planarconfig="separate", **options)
        truth[name] = tifffile.imread(root / f"{name}.tif")
    ims = np.arange(24 * 40 * 130, dtype=np.uint16).reshape(24, 40, 130)  # three 64-wide chunk columns served
    truth["ims"] = write_ims(root / "a.ims", [ims], levels=1, chunks=(8, 32, 32))[0][0][0]
    catalog = root / "catalog.toml"
    catalog.write_text("".join(f'[[datasets]]\nid = "{name}"\npath = "{name}{suffix}"\n\n' for name, suffix in [
        ("tiled_big", ".tif"), ("strips_cut", ".tif"), ("bad_tile", ".tif"), ("planar4", ".tif"),
        ("planar4_tiled", ".tif"), ("a", ".ims")]))
    srv = Server(catalog, ["--recheck", "3600"])
    try:
        assert requests.get(srv.url("/ds/a/zarr/0/0/0/0/0/2")).status_code == 200  # opened and served
        with h5py.File(root / "a.ims", "r") as f:
            info = f["DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data"].id.get_chunk_info_by_coord(BAD_CHUNK)
        _garble(root / "a.ims", info.byte_offset, info.size)
        yield srv, root, truth
    finally:
        srv.stop()


def _unreadable(srv: Server, root, path: str, *names: str) -> str:
    r = requests.get(srv.url(path))
    assert r.status_code == 500, (r.status_code, r.text)
    assert r.text.startswith("The source data cannot be read: ") and str(root) not in r.text
    for name in names:
        assert name in r.text, r.text
    return r.text


@pytest.mark.parametrize("name,says", [
    ("tiled_big", "page 19 says the next page starts at byte"),
    ("strips_cut", f"the strip data of page {PAGES} of {PAGES} ends at byte"),
])
def test_a_cut_multipage_tiff_is_unavailable_not_fewer_planes(damaged, name, says):
    srv, root, _ = damaged
    listed = {d["id"]: d for d in requests.get(srv.url("/api/datasets")).json()["datasets"]}
    assert listed[name]["status"] == "error", listed[name]
    error = listed[name]["error"]
    assert error.startswith(f"{name}.tif: the file is truncated: ") and says in error and "-byte file" in error
    assert str(root) not in error


def test_a_corrupt_compressed_tile_names_the_file_and_page(damaged):
    srv, root, truth = damaged
    text = _unreadable(srv, root, "/ds/bad_tile/zarr/0/0/0/0/0/0", "bad_tile.tif: page 21 of 37", "damaged")
    assert "Internal error" not in text
    # the chunk of columns 64-79 never touches the garbled tile (columns 0-31): still exact
    array = zarr.open_group(srv.url("/ds/bad_tile/zarr"), mode="r")["0"]
    np.testing.assert_array_equal(array[0, 0, :, :, 64:], truth["bad_tile"][:, :, 64:])


def test_ims_chunk_damaged_while_served_names_the_file_and_chunk(damaged):
    srv, root, truth = damaged
    _unreadable(srv, root, "/ds/a/zarr/0/0/0/0/0/0", "a.ims: the chunk at voxel (8, 0, 0) of DataSet/ResolutionLevel 0",
                "damaged")
    # a served chunk that does not touch the damaged HDF5 chunk (columns 0-31) is still exact
    array = zarr.open_group(srv.url("/ds/a/zarr"), mode="r")["0"]
    np.testing.assert_array_equal(array[0, 0, :, :, 64:128], truth["ims"][:, :, 64:128])
    assert srv.alive()


@pytest.mark.parametrize("name", ["planar4", "planar4_tiled"])
def test_planar_four_sample_tiff_reads_exactly(damaged, name):
    srv, _, truth = damaged
    with tifffile.TiffFile(damaged[1] / f"{name}.tif") as tf:
        assert tf.series[0].axes == "SYX"  # tifffile sees samples, so they are channels, not z-planes
    array = zarr.open_group(srv.url(f"/ds/{name}/zarr"), mode="r")["0"]
    assert array.shape == (1, 4, 1, 40, 50)
    np.testing.assert_array_equal(array[0, :, 0], truth[name])


def test_a_tiff_cut_after_opening_fails_on_every_thread(tmp_path):
    """A thread that read before the cut finds its strips short; a new thread reopens the file and
    finds it no longer holds its pages. Neither reads zeros, other bytes or fewer pages."""
    data = _big(5)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, data, rowsperstrip=16, photometric="minisblack")
    reader = open_source(path)
    whole = (slice(0, PAGES), slice(0, 64), slice(0, 80))
    np.testing.assert_array_equal(reader.read(0, 0, 0, whole), data)
    _cut(path, path.stat().st_size // 2)
    with pytest.raises(SourceError, match=r"stack\.tif: the file is truncated: the image data at bytes \d+-\d+ "
                                          r"is cut short \(\d+ of its \d+ bytes are there\)"):
        reader.read(0, 0, 0, whole)
    fresh = _in_new_thread(lambda: reader.read(0, 0, 0, whole))
    assert isinstance(fresh.get("error"), SourceError), fresh
    assert str(fresh["error"]).startswith(f"{path}: the file is truncated: page ")


def test_a_pyramid_tiff_cut_after_opening_is_a_source_error_on_a_new_thread(tmp_path):
    """Before: a new thread reopened the cut file, found fewer levels and raised IndexError (a 500 'Internal
    error')."""
    data = _big(6)[:8]
    path = tmp_path / "pyramid.ome.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(data, subifds=1, metadata={"axes": "ZYX"}, tile=(32, 32), compression="zlib",
                 photometric="minisblack")
        tw.write(data[:, ::2, ::2], subfiletype=1, tile=(32, 32), compression="zlib", photometric="minisblack")
    reader = open_source(path)
    assert len(reader.volume.native_levels) == 2
    _cut(path, 600)
    got = _in_new_thread(lambda: reader.read(1, 0, 0, (slice(0, 8), slice(0, 32), slice(0, 40))))
    assert isinstance(got.get("error"), SourceError), got
    assert str(got["error"]).startswith(f"{path}: ")


def test_jpeg2000_without_openjpeg_is_unavailable_with_what_to_install(tmp_path, monkeypatch):
    data = np.random.default_rng(7).integers(0, 4000, (48, 40), np.uint16)
    path = tmp_path / "slice.jp2"
    glymur.Jp2k(str(path), data=data, numres=2)  # written with the system OpenJPEG, lossless
    reader = open_source(path)  # with OpenJPEG: opens and decodes exactly
    np.testing.assert_array_equal(reader.read(0, 0, 0, (slice(0, 1), slice(0, 48), slice(0, 40)))[0], data)
    monkeypatch.setattr(glymur.version, "openjpeg_version", "0.0.0")
    monkeypatch.setattr(glymur.version, "openjpeg_version_tuple", (0, 0, 0))
    with pytest.raises(SourceError) as caught:
        open_source(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: JPEG2000 decoding needs the OpenJPEG library 2.4 or newer")
    assert "(it found 0.0.0)" in message and message.endswith("apt-get install libopenjp2-7)")


def test_a_damaged_middle_slice_fails_its_chunks_not_the_listing(tmp_path):
    """The listing, the metadata documents and the pages show a display window estimated from the
    middle plane; one damaged plane there made /api/datasets answer 500 for every dataset, with
    an absolute path."""
    stack = tmp_path / "stack"
    stack.mkdir()
    planes = [np.full((40, 50), 100 + z, np.uint16) for z in range(9)]
    for z, plane in enumerate(planes):
        tifffile.imwrite(stack / f"z{z:02d}.tif", plane, compression="zlib")
    _cut(stack / "z04.tif", (stack / "z04.tif").stat().st_size - 20)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "stack"\npath = "{stack}"\nchunk = [4, 64, 64]\n')
    srv = Server(catalog)
    try:
        listing = requests.get(srv.url("/api/datasets"))
        assert listing.status_code == 200 and listing.json()["datasets"][0]["status"] == "ok"
        assert requests.get(srv.url("/api/datasets/stack")).status_code == 200
        assert requests.get(srv.url("/ds/stack/zarr/.zattrs")).status_code == 200
        assert requests.get(srv.url("/")).status_code == 200
        good = requests.get(srv.url("/ds/stack/zarr-none/0/0/0/0/0/0"))  # planes 0-3
        assert good.status_code == 200
        np.testing.assert_array_equal(np.frombuffer(good.content, "<u2").reshape(4, 40, 50),
                                      np.stack(planes[:4]))
        bad = requests.get(srv.url("/ds/stack/zarr-none/0/0/0/1/0/0"))  # planes 4-7
        assert bad.status_code == 500 and "z04.tif" in bad.text and str(tmp_path) not in bad.text
    finally:
        srv.stop()
