"""Hostile and implausible source files (issue 22, points 2, 4, 5, 9, 13 and 14): a source claiming
more than its files hold is unavailable with one sentence, and the rest of the server keeps
answering; a decompression bomb costs the block's size, not what it inflates to; an XML's millions
of time points cost nothing; numbers that are not finite never reach JSON; a rewrite keeping size
and mtime is seen; channels of different shapes are refused at open.

Every hostile file is written here by independent means: json + numpy + the standard library's
codecs (numcodecs for lz4, blosc and zstd) for N5, h5py for HDF5, plain text for XML and SWC."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import os
import re
import struct
import threading
import time
import zlib

import h5py
import numcodecs
import numpy as np
import psutil
import pytest
import requests
import tifffile
from conftest import Server, bdv_xml

import bil_transform.readers.n5 as n5
from bil_transform.readers import SourceError, open_source
from bil_transform.readers.swc import read_swc

BLOCK = (8, 32, 32)  # z, y, x: 16 KiB of uint16, the block every bomb below claims to be
GIB = 2**30


def _n5_dataset(path, dims_xyz, block_xyz, compression="raw", dtype="uint16") -> None:
    path.mkdir(parents=True)
    (path / "attributes.json").write_text(json.dumps(
        {"dimensions": list(dims_xyz), "blockSize": list(block_xyz), "dataType": dtype,
         "compression": {"type": compression, **({"useZlib": False} if compression == "gzip" else {})}}))


def _n5_block(path, position_xyz, shape_xyz, payload: bytes) -> None:
    """One N5 block file: mode 0, its dimensions, then the (compressed) big-endian elements."""
    file = path.joinpath(*map(str, position_xyz))
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_bytes(struct.pack(">HH", 0, len(shape_xyz)) + struct.pack(f">{len(shape_xyz)}I", *shape_xyz) + payload)


def _gzip_bomb(size: int) -> bytes:
    """A gzip member inflating to `size` zero bytes (a multiple of 1 MiB), built from one fully flushed
    deflate segment repeated, so it costs milliseconds to make and about size / 1000 bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(bytes(2**20)) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH)  # an empty final block
    crc, zeros = 0, bytes(2**20)
    for _ in range(size // 2**20):
        crc = zlib.crc32(zeros, crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03" + segment * (size // 2**20) + end
            + struct.pack("<II", crc, size % 2**32))


def _tiff_stack(path, planes: np.ndarray) -> None:
    path.mkdir(parents=True)
    for z, plane in enumerate(planes):
        tifffile.imwrite(path / f"z{z:03d}.tif", plane)


def _bdv_h5(path, data: np.ndarray | None, shape=None, timepoints=(0,)) -> None:
    """A BigDataViewer .h5 by h5py: setup 0, one level; `data` written, or (None) a `shape` never written."""
    with h5py.File(path, "w") as f:
        f["s00/resolutions"] = np.ones((1, 3))
        f["s00/subdivisions"] = np.array([[32, 32, 8]], np.int32)
        for tp in timepoints:
            if data is not None:
                f.create_dataset(f"t{tp:05d}/s00/0/cells", data=data.astype(np.int16),
                                 chunks=tuple(min(b, n) for b, n in zip(BLOCK, data.shape)))
            else:
                f.create_dataset(f"t{tp:05d}/s00/0/cells", shape=shape, dtype=np.int16, chunks=(64, 64, 64))


def _strict(text: str):
    """JSON as a browser parses it: NaN and Infinity are errors."""
    def refuse(constant: str):
        raise ValueError(f"{constant} in JSON")
    return json.loads(text, parse_constant=refuse)


GOOD = np.arange(np.prod((8, 32, 32)), dtype=np.uint16).reshape(8, 32, 32)


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    # a plausible, small dataset: the one that must keep answering
    _tiff_stack(root / "good", GOOD)
    # 150 bytes of attributes claiming 2^40 voxels a side, and no block
    _n5_dataset(root / "huge.n5", [2**40] * 3, [64, 64, 64])
    # a mutated header: 10^300 voxels along x
    _n5_dataset(root / "e300.n5", [10**300, 64, 64], [64, 64, 64])
    # in a dataset of 16 KiB blocks: a gzip block of 64 KB inflating to 64 MiB (small enough to be
    # read: the decoder must stop it), and one of 1 MB inflating to 1 GiB (too large to be a block)
    for name, inflated in (("bomb", 64 * 2**20), ("bigbomb", GIB)):
        _n5_dataset(root / f"{name}.n5", [32, 32, 8], [32, 32, 8], "gzip")
        _n5_block(root / f"{name}.n5", (0, 0, 0), (32, 32, 8), _gzip_bomb(inflated))
    # a BigDataViewer XML claiming 30 million time points beside a .h5 holding one
    (root / "bdv").mkdir()
    _bdv_h5(root / "bdv" / "one.h5", GOOD)
    bdv_xml(root / "bdv" / "one.xml", "one.h5", last_timepoint="29999999")
    # channel directories whose slices differ in shape
    _tiff_stack(root / "mixed" / "c0", np.ones((4, 32, 32), np.uint16))
    _tiff_stack(root / "mixed" / "c1", np.ones((4, 32, 40), np.uint16))
    # SWC tracings on the good image: one with a coordinate of 1e308, one sound
    (root / "swc").mkdir()
    (root / "swc" / "far.swc").write_text("1 1 10 10 4 1 -1\n2 3 1e308 10 4 1 1\n")
    (root / "swc" / "near.swc").write_text("1 1 10 10 4 1 -1\n2 3 12 10 4 1 1\n")
    ids = {"good": "good", "huge": "huge.n5", "e300": "e300.n5", "bomb": "bomb.n5", "bigbomb": "bigbomb.n5",
           "bdv": "bdv/one.xml", "mixed": "mixed"}
    text = "".join(f'[[datasets]]\nid = "{i}"\npath = "{root / p}"\nvoxel_size = [1.0, 1.0, 1.0]\n\n'
                   for i, p in ids.items())
    text += f'[[datasets]]\nid = "traced"\nkind = "skeletons"\nspace = "good"\npath = "{root / "swc"}"\n'
    (root / "catalog.toml").write_text(text)
    srv = Server(root / "catalog.toml")
    yield srv, root
    srv.stop()


def _others_answer(srv: Server) -> None:
    """The API, a landing page and another dataset's metadata and voxels still answer."""
    assert requests.get(srv.url("/api/datasets"), timeout=1).status_code == 200
    assert requests.get(srv.url("/api/datasets/good"), timeout=1).status_code == 200
    assert requests.get(srv.url("/ds/good/zarr/.zattrs"), timeout=1).status_code == 200
    chunk = requests.get(srv.url("/ds/good/zarr-none/0/0/0/0/0/0"), timeout=5)
    assert chunk.status_code == 200
    assert np.array_equal(np.frombuffer(chunk.content, "<u2").reshape(GOOD.shape), GOOD)


def test_an_n5_claiming_2_to_the_40_voxels_a_side_is_unavailable_and_wedges_nothing(hostile):
    srv, _ = hostile
    doc = requests.get(srv.url("/api/datasets/huge"), timeout=5).json()
    assert doc["status"] == "error" and "huge.n5" in doc["error"] and "claims about 10^" in doc["error"], doc
    coarse = requests.get(srv.url("/ds/huge/zarr/.zattrs"), timeout=5)
    assert coarse.status_code == 503 and "claims" in coarse.text
    chunk = requests.get(srv.url("/ds/huge/precomputed/info"), timeout=5)
    assert chunk.status_code == 503
    _others_answer(srv)


def test_a_header_of_10_to_the_300_is_refused_in_a_short_sentence(hostile):
    srv, _ = hostile
    doc = requests.get(srv.url("/api/datasets/e300"), timeout=5).json()
    assert doc["status"] == "error" and re.search(r"claims about 10\^30\d", doc["error"]), doc
    assert "0" * 40 not in json.dumps(doc) and len(doc["error"]) < 300


def test_within_the_limits_a_dataset_that_holds_nothing_is_refused_and_a_sparse_one_served(tmp_path):
    """What the files can hold: 2^14 voxels a side (8 TB of uint16) with no block or chunk written is
    refused; the same claim with one block written (sparse, the rest read as fill) is served."""
    _n5_dataset(tmp_path / "empty.n5", [2**14] * 3, [64, 64, 64])
    with pytest.raises(SourceError, match=r"empty.n5: the dataset claims 8,796,093,022,208 bytes and holds 0"):
        open_source(tmp_path / "empty.n5")
    _n5_dataset(tmp_path / "sparse.n5", [2**14] * 3, [64, 64, 64])
    block = np.full((64, 64, 64), 7, ">u2")
    _n5_block(tmp_path / "sparse.n5", (1, 2, 3), (64, 64, 64), block.tobytes())
    reader = open_source(tmp_path / "sparse.n5")
    assert reader.volume.shape == (1, 1, 2**14, 2**14, 2**14)
    assert (reader.read(0, 0, 0, (slice(190, 194), slice(126, 130), slice(62, 66))) == 7).sum() == 2 * 2 * 2
    _bdv_h5(tmp_path / "unwritten.h5", None, shape=(2**30,) * 3)  # the 2^30-cubed HDF5
    with pytest.raises(SourceError, match=r"unwritten.h5: .*claims about 10\^2\d "):
        open_source(tmp_path / "unwritten.h5")
    _bdv_h5(tmp_path / "hollow.h5", None, shape=(2**14,) * 3)
    with pytest.raises(SourceError, match=r"hollow.h5: /t00000/s00/0/cells claims 8,796,093,022,208 bytes and holds 0"):
        open_source(tmp_path / "hollow.h5")
    with h5py.File(tmp_path / "hollow.ims", "w") as f:  # the same claim as an Imaris file
        group = f.create_group("DataSet/ResolutionLevel 0/TimePoint 0/Channel 0")
        for axis in "XYZ":
            group.attrs[f"ImageSize{axis}"] = np.array(list(str(2**14)), dtype="S1")
        group.create_dataset("Data", shape=(2**14,) * 3, dtype=np.uint16, chunks=(64, 64, 64))
    with pytest.raises(SourceError, match=r"hollow.ims: /DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data claims "
                                          r"8,796,093,022,208 bytes and holds 0"):
        open_source(tmp_path / "hollow.ims")


def test_30_million_time_points_in_an_xml_cost_nothing(hostile):
    srv, _ = hostile
    r = requests.get(srv.url("/api/datasets/bdv"), timeout=5)
    doc = r.json()
    assert doc["status"] == "ok" and doc["shape"][0] == 1, doc
    assert any("30,000,000 time points" in n and "1 served" in n for n in doc["notes"]), doc["notes"]
    assert len(r.content) < 64 * 1024
    listing = requests.get(srv.url("/api/datasets?limit=10"), timeout=5)
    assert listing.status_code == 200 and len(listing.content) < 64 * 1024
    chunk = requests.get(srv.url("/ds/bdv/zarr-none/0/0/0/0/0/0"), timeout=5)
    assert np.array_equal(np.frombuffer(chunk.content, "<u2").reshape(GOOD.shape), GOOD)


def test_links_give_templates_not_a_url_per_time_point(tmp_path):
    """An XML of 5,000 time points whose .h5 holds them all: the links hold one template each."""
    _bdv_h5(tmp_path / "many.h5", GOOD[:1, :8, :8], timepoints=(0, 4999))
    bdv_xml(tmp_path / "many.xml", "many.h5", last_timepoint="4999")
    (tmp_path / "catalog.toml").write_text(f'[[datasets]]\nid = "many"\npath = "{tmp_path / "many.xml"}"\n')
    srv = Server(tmp_path / "catalog.toml")
    try:
        r = requests.get(srv.url("/api/datasets/many"), timeout=10)
        assert r.json()["shape"][0] == 5000 and len(r.content) < 16 * 1024
        template = r.json()["links"]["precomputed_t"]
        assert template == srv.url("/ds/many/t/{t}/precomputed")
        assert requests.get(template.format(t=4999) + "/info", timeout=10).status_code == 200
    finally:
        srv.stop()


def test_a_gzip_bomb_is_an_error_and_costs_its_block_not_a_gib(hostile):
    srv, _ = hostile
    proc = psutil.Process(srv.proc.pid)
    before = proc.memory_info().rss
    peak, done = [before], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak.append(proc.memory_info().rss)
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        small = requests.get(srv.url("/ds/bomb/zarr-none/0/0/0/0/0/0"), timeout=60)
        large = requests.get(srv.url("/ds/bigbomb/zarr-none/0/0/0/0/0/0"), timeout=60)
    finally:
        done.set()
        watcher.join()
    assert small.status_code == 500 and "16384 bytes its header says" in small.text, (small.status_code, small.text)
    assert large.status_code == 500 and "more than the 98332 bytes a block" in large.text, (large.status_code,
                                                                                           large.text)
    assert max(peak) - before < 200 * 2**20, f"the server grew by {(max(peak) - before) / 2**20:.0f} MiB"
    _others_answer(srv)


def _bomb(codec: str, size: int) -> tuple[str, bytes]:
    """An N5 compression name and a payload of `codec` inflating to `size` zero bytes."""
    zeros = bytes(size)
    if codec == "zlib":
        return "gzip", zlib.compress(zeros, 9)
    if codec == "gzip-members":  # a small first member, then a large one: the multi-member path
        return "gzip", gzip.compress(bytes(1000)) + gzip.compress(zeros)
    if codec == "bzip2":
        return "bzip2", bz2.compress(zeros)
    if codec == "xz":
        return "xz", lzma.compress(zeros)
    if codec == "zstd":
        return "zstd", numcodecs.Zstd().encode(zeros)
    if codec == "blosc":
        return "blosc", numcodecs.Blosc().encode(zeros)
    if codec == "lz4-bare":
        return "lz4", numcodecs.LZ4().encode(zeros)[4:]  # numcodecs prefixes the size
    # n5-java's LZ4BlockOutputStream framing: blocks of up to 64 KiB, each with its own header
    each = min(size, 2**16)
    piece = numcodecs.LZ4().encode(bytes(each))[4:]
    frame = struct.pack("<8sBiii", b"LZ4Block", 0x20 | 10, len(piece), each, 0) + piece
    return "lz4", frame * (size // each) + struct.pack("<8sBiii", b"LZ4Block", 0x10, 0, 0, 0)


@pytest.mark.parametrize("codec", ["zlib", "gzip-members", "bzip2", "xz", "zstd", "blosc", "lz4-bare", "lz4-java"])
def test_every_n5_codec_decodes_into_the_block_size_only(tmp_path, codec):
    name, payload = _bomb(codec, 16 * 2**20)
    _n5_dataset(tmp_path / "b.n5", [32, 32, 8], [32, 32, 8], name)
    _n5_block(tmp_path / "b.n5", (0, 0, 0), (32, 32, 8), payload)
    reader = open_source(tmp_path / "b.n5")
    array = reader._image.levels[0][0][0][0]
    with pytest.raises(ValueError, match="16384 bytes its header says"):
        n5._decode(array, (0, 0, 0))
    with pytest.raises(SourceError, match="b.n5"):
        reader.read(0, 0, 0, (slice(0, 8), slice(0, 32), slice(0, 32)))
    # the same codec with a block of the right size still decodes
    ok_name, good = _bomb(codec, 16384) if codec != "gzip-members" else ("gzip", gzip.compress(bytes(16384)))
    _n5_dataset(tmp_path / "ok.n5", [32, 32, 8], [32, 32, 8], ok_name)
    _n5_block(tmp_path / "ok.n5", (0, 0, 0), (32, 32, 8), good)
    assert not open_source(tmp_path / "ok.n5").read(0, 0, 0, (slice(0, 8), slice(0, 32), slice(0, 32))).any()


def test_swc_ids_beyond_2_to_the_53_stay_exact_and_beyond_int64_are_refused(tmp_path):
    exact = tmp_path / "exact.swc"
    exact.write_text("1 1 0 0 0 1 -1\n9007199254740993 3 1 0 0 1 1\n9007199254740995 3 2 0 0 1 9007199254740993\n")
    t = read_swc(exact)
    assert t.ids.tolist() == [1, 2**53 + 1, 2**53 + 3] and t.parents.tolist() == [-1, 0, 1]
    # float64 made both 2^53 + 1 (missing) and 2^53 (present) one number: a wrong edge, drawn
    collapse = tmp_path / "collapse.swc"
    collapse.write_text("1 1 0 0 0 1 -1\n9007199254740992 3 1 0 0 1 1\n5 3 2 0 0 1 9007199254740993\n")
    with pytest.raises(SourceError, match=r"collapse.swc, line 3: node 5 names parent 9007199254740993, which is "
                                          r"not a node of the file"):
        read_swc(collapse)
    for line, field in ((f"{2**63} 3 1 0 0 1 1", "id"), (f"2 3 1 0 0 1 {2**64}", "parent"),
                        (f"2 3 1 0 0 1 -{2**63 + 1}", "parent"), (f"2 {2**31} 1 0 0 1 1", "type")):
        wide = tmp_path / "wide.swc"
        wide.write_text(f"1 1 0 0 0 1 -1\n{line}\n")
        with pytest.raises(SourceError, match=rf"wide.swc, line 2: the {field} field '.*' is beyond the (64|32)-bit"):
            read_swc(wide)


def test_coordinates_of_1e308_never_put_infinity_in_json(hostile):
    srv, _ = hostile
    doc = _strict(requests.get(srv.url("/api/datasets/traced"), timeout=10).text)
    neurons = {n["file"]: n for n in doc["neurons"]}
    assert neurons["near.swc"]["status"] == "ok"
    assert neurons["far.swc"]["status"] == "error" and "far.swc, line 2" in neurons["far.swc"]["error"]
    info = _strict(requests.get(srv.url("/ds/traced/skeletons/info"), timeout=10).text)
    where = info.get("segment_properties", "segment_properties")
    props = _strict(requests.get(srv.url(f"/ds/traced/skeletons/{where}/info"), timeout=10).text)
    assert len(props["inline"]["ids"]) == 1


def test_a_nan_registration_is_refused_at_open(tmp_path):
    _bdv_h5(tmp_path / "reg.h5", GOOD)
    bdv_xml(tmp_path / "reg.xml", "reg.h5", affine="1 0 0 nan 0 1 0 0 0 0 1 0")
    with pytest.raises(SourceError, match=r"reg.xml: unreadable BigDataViewer metadata: an affine with a number that "
                                          r"is not finite"):
        open_source(tmp_path / "reg.xml")


def test_channel_directories_of_different_shapes_are_unavailable_not_cut_short(hostile):
    srv, _ = hostile
    r = requests.get(srv.url("/ds/mixed/region?format=raw"), timeout=10)
    assert r.status_code == 503, (r.status_code, len(r.content))
    assert "channel directories c0 (32x32x1 uint16) and c1 (32x40x1 uint16) differ" in r.text


def test_a_rewrite_keeping_size_and_mtime_is_served_new(tmp_path):
    """`cp -p` / `rsync -a` of a corrected file: the same size and mtime, other voxels."""
    path = tmp_path / "one.tif"
    old = np.full((4, 16, 16), 1000, np.uint16)
    tifffile.imwrite(path, old)
    (tmp_path / "catalog.toml").write_text(f'[[datasets]]\nid = "one"\npath = "{path}"\n')
    srv = Server(tmp_path / "catalog.toml", ["--recheck", "0"])
    try:
        get = lambda: requests.get(srv.url("/ds/one/zarr-none/0/0/0/0/0/0"), timeout=10)  # noqa: E731
        assert np.all(np.frombuffer(get().content, "<u2") == 1000)
        st = os.stat(path)
        new = np.full((4, 16, 16), 2000, np.uint16)
        tifffile.imwrite(path, new)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not np.all(np.frombuffer(get().content, "<u2") == 2000):
            time.sleep(0.2)
        assert np.all(np.frombuffer(get().content, "<u2") == 2000)
    finally:
        srv.stop()


def test_a_mutated_czi_claiming_a_million_planes_is_refused(tmp_path):
    """Two 64 x 64 planes written by pylibCZIrw; then the second subblock's Z start says 2^20 (in its
    segment and in the directory, as a bit flip in a header would): 8 GiB claimed over 16 KiB of pixels."""
    from pylibCZIrw import czi as pyczi

    path = tmp_path / "flip.czi"
    with pyczi.create_czi(str(path)) as w:
        for z in range(2):
            w.write(np.full((64, 64, 1), z + 1, np.uint16), plane={"C": 0, "Z": z, "T": 0})
    buf = bytearray(path.read_bytes())
    entries = []  # the DV entries (ZISRAW: see tests/test_czi.py _make_pyramid for the layout)
    at = buf.find(b"DV")
    while at >= 0:
        count = struct.unpack_from("<i", buf, at + 28)[0] if at + 32 <= len(buf) else 0
        if 0 < count < 16 and all(bytes(buf[at + 32 + 20 * k:at + 36 + 20 * k]).rstrip(b"\0").isalpha()
                                  for k in range(count)):
            entries.append(at)
        at = buf.find(b"DV", at + 1)
    flipped = 0
    for entry in entries:
        for k in range(struct.unpack_from("<i", buf, entry + 28)[0]):
            dim = entry + 32 + 20 * k
            if bytes(buf[dim:dim + 4]).rstrip(b"\0") == b"Z" and struct.unpack_from("<i", buf, dim + 4)[0] == 1:
                struct.pack_into("<i", buf, dim + 4, 2**20)
                flipped += 1
    assert flipped == 2, "the second plane's entry, in its segment and in the directory"
    path.write_bytes(bytes(buf))
    with pytest.raises(SourceError, match=r"flip.czi: .*claims 8,589,942,784 bytes and holds 16,384"):
        open_source(path)


def test_an_hdf5_deflate_bomb_is_refused_not_inflated(tmp_path):
    """A BigDataViewer chunk of 16 KiB (Fiji-sized, once left to HDF5's own filter, which inflates
    as far as the stream goes: 1 GiB here) stored as a 1 MB deflate stream of 1 GiB."""
    _bdv_h5(tmp_path / "bomb.h5", GOOD)
    with h5py.File(tmp_path / "bomb.h5", "a") as f:
        del f["t00000/s00/0/cells"]
        cells = f.create_dataset("t00000/s00/0/cells", shape=(8, 32, 32), dtype=np.int16, chunks=(8, 32, 32),
                                 compression="gzip")
        gz = _gzip_bomb(GIB)  # the same deflate data, in HDF5's zlib framing
        adler = 1
        for _ in range(GIB // 2**20):
            adler = zlib.adler32(bytes(2**20), adler)
        cells.id.write_direct_chunk((0, 0, 0), b"\x78\xda" + gz[10:-8] + adler.to_bytes(4, "big"))
    reader = open_source(tmp_path / "bomb.h5")
    with pytest.raises(SourceError, match=r"bomb.h5: the chunk at voxel \(0, 0, 0\)"):
        reader.read(0, 0, 0, (slice(0, 2), slice(0, 2), slice(0, 2)))
