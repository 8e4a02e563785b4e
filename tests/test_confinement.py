"""Confinement: a source file cannot make the server read a file outside its dataset's root (HDF5 external
storage, external links and virtual datasets, BigDataViewer XML paths, N5 multiscale paths, a Zarr level or
a slice that is a symlink out), nor block a worker on a FIFO, nor read /dev/zero; an operator widens a
dataset's root in the catalog, never a file. Hostile files are written with h5py, plain XML, JSON and
tifffile; a canary (a fake tokens file) sits outside every dataset's root."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import requests
import tifffile
import zarr
from conftest import Server, bdv_xml
from imaris_writer import write_ims

SECRET = b"CANARY-tok3n-8c1f2e-"
CANARY = (SECRET * 512)[:8192]
SHAPE = (8, 32, 32)  # z, y, x of every hostile image: 8192 uint8 voxels, the canary's size
TIMEOUT = 10  # seconds a client waits to prove the server answers at all


def _bdv_h5(path: Path, cells: np.ndarray | None = None, **cells_kw) -> None:
    """A bare BigDataViewer .h5 (bigdataviewer-core's layout): one setup, one time point, one level."""
    with h5py.File(path, "w") as f:
        f["s00/resolutions"] = np.array([[1.0, 1.0, 1.0]])
        f["s00/subdivisions"] = np.array([[32, 32, 8]], np.int32)
        f["s00"].attrs["dataType"] = "uint8"
        if cells is not None:
            f.create_dataset("t00000/s00/0/cells", data=cells, chunks=(8, 32, 32))
        else:
            f.create_dataset("t00000/s00/0/cells", shape=SHAPE, dtype="u1", **cells_kw)


def _n5_dataset(path: Path, block: tuple[int, int, int] = (32, 32, 8), data: np.ndarray | None = None) -> None:
    """An uncompressed uint8 N5 dataset of SHAPE (x, y, z in the file) with one block 0/0/0 when `data`."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "attributes.json").write_text(json.dumps({
        "dimensions": list(SHAPE[::-1]), "blockSize": list(block), "dataType": "uint8",
        "compression": {"type": "raw"}}))
    if data is not None:
        (path / "0" / "0").mkdir(parents=True)
        (path / "0" / "0" / "0").write_bytes(struct.pack(">HH3I", 0, 3, *data.shape[::-1]) + data.tobytes())


def _ims(path: Path, values: np.ndarray) -> str:
    write_ims(path, [values], chunks=SHAPE, levels=1)
    return "DataSet/ResolutionLevel 0/TimePoint 0/Channel 0/Data"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """Every hostile source, each in its own directory of the archive, a canary and a genuine-looking
    image of canary bytes outside it, and a server serving them all."""
    base = tmp_path_factory.mktemp("confine")
    outside, archive = base / "outside", base / "archive"
    outside.mkdir()
    archive.mkdir()
    canary = outside / "tokens.txt"
    canary.write_bytes(CANARY)
    secret = np.frombuffer(CANARY, np.uint8).reshape(SHAPE)
    with h5py.File(outside / "secret.h5", "w") as f:
        f["data"] = secret
    _bdv_h5(outside / "bdv.h5", secret)
    _n5_dataset(outside / "n5data", data=secret)
    zarr.create_array(str(outside / "secret.zarr"), data=secret, chunks=SHAPE, zarr_format=2)
    tifffile.imwrite(outside / "z0002.tif", secret[2])
    entries = {}

    # a bare BigDataViewer .h5 whose cells use external storage: the canary's raw bytes
    (archive / "external").mkdir()
    _bdv_h5(archive / "external" / "bare.h5", external=[(str(canary), 0, len(CANARY))])
    entries["external"] = archive / "external" / "bare.h5"
    # an Imaris file whose Data is an external link to, and one whose Data is a virtual dataset over, a file outside
    for name in ("elink", "virtual"):
        (archive / name).mkdir()
        ims = archive / name / "brain.ims"
        data = _ims(ims, np.zeros(SHAPE, np.uint8))
        with h5py.File(ims, "a") as f:
            del f[data]
            if name == "elink":
                f[data] = h5py.ExternalLink(str(outside / "secret.h5"), "/data")
            else:
                layout = h5py.VirtualLayout(shape=SHAPE, dtype="u1")
                layout[:] = h5py.VirtualSource(str(outside / "secret.h5"), "data", shape=SHAPE)
                f.create_virtual_dataset(data, layout, fillvalue=0)
        entries[name] = ims
    # BigDataViewer XML naming an .h5 outside: absolute, and climbing with ../
    (archive / "xml_abs").mkdir()
    bdv_xml(archive / "xml_abs" / "dataset.xml", str(outside / "bdv.h5"), "absolute")
    entries["xml_abs"] = archive / "xml_abs" / "dataset.xml"
    (archive / "xml_up").mkdir()
    bdv_xml(archive / "xml_up" / "dataset.xml", "../../outside/bdv.h5")
    entries["xml_up"] = archive / "xml_up" / "dataset.xml"
    # an N5 (COSEM) multiscale group whose level climbs out with ../
    (archive / "n5_up" / "ms.n5").mkdir(parents=True)
    (archive / "n5_up" / "ms.n5" / "attributes.json").write_text(json.dumps(
        {"multiscales": [{"datasets": [{"path": "../../../outside/n5data"}]}]}))
    entries["n5_up"] = archive / "n5_up" / "ms.n5"
    # an OME-Zarr whose level 0 is a symlink out
    img = archive / "zarr_link" / "img.zarr"
    group = zarr.open_group(str(img), mode="w", zarr_format=2)
    group.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": a, "type": "space"} for a in "zyx"],
                                   "datasets": [{"path": "0", "coordinateTransformations": [
                                       {"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]
    (img / "0").symlink_to(outside / "secret.zarr")
    entries["zarr_link"] = img
    # a slice stack whose third slice is a symlink out
    (archive / "stack").mkdir()
    for z in range(SHAPE[0]):
        if z == 2:
            (archive / "stack" / "z0002.tif").symlink_to(outside / "z0002.tif")
        else:
            tifffile.imwrite(archive / "stack" / f"z{z:04d}.tif", np.full(SHAPE[1:], z, np.uint8))
    entries["stack"] = archive / "stack"
    # N5 blocks that are a FIFO, and a symlink to /dev/zero (under the default root, and a root widened to /)
    _n5_dataset(archive / "fifo" / "img.n5")
    (archive / "fifo" / "img.n5" / "0" / "0").mkdir(parents=True)
    os.mkfifo(archive / "fifo" / "img.n5" / "0" / "0" / "0")
    entries["fifo"] = archive / "fifo" / "img.n5"
    for name in ("zero", "zero_wide"):
        _n5_dataset(archive / name / "img.n5")
        (archive / name / "img.n5" / "0" / "0").mkdir(parents=True)
        (archive / name / "img.n5" / "0" / "0" / "0").symlink_to("/dev/zero")
        entries[name] = archive / name / "img.n5"
    # a healthy dataset, to show the others fail alone
    (archive / "fine").mkdir()
    fine = np.arange(np.prod(SHAPE), dtype=np.uint32).reshape(SHAPE).astype(np.uint8)
    _n5_dataset(archive / "fine" / "img.n5", data=fine)
    entries["fine"] = archive / "fine" / "img.n5"
    # a BigDataViewer XML beside a raw/ tree one level up: refused unless the catalog widens the root
    (archive / "lab" / "xml").mkdir(parents=True)
    (archive / "lab" / "raw").mkdir()
    up = np.random.default_rng(1).integers(0, 2**16, SHAPE, dtype=np.uint16)
    with h5py.File(archive / "lab" / "raw" / "data.h5", "w") as f:
        f["s00/resolutions"] = np.array([[1.0, 1.0, 1.0]])
        f["s00/subdivisions"] = np.array([[16, 16, 4]], np.int32)
        f["s00"].attrs["dataType"] = "uint16"
        f.create_dataset("t00000/s00/0/cells", data=up, chunks=(4, 16, 16))
    bdv_xml(archive / "lab" / "xml" / "dataset.xml", "../raw/data.h5")
    entries["up_default"] = archive / "lab" / "xml" / "dataset.xml"
    # SWC tracings on the fine image, one of them a symlink to a tokens file (its parse error would quote it)
    (outside / "tokens.swc").write_bytes(SECRET + b" lab1 read write 2026 12 07\n")
    (archive / "swc").mkdir()
    (archive / "swc" / "ok.swc").write_text("1 1 1.0 2.0 3.0 1.0 -1\n2 3 2.0 2.0 3.0 1.0 1\n")
    (archive / "swc" / "leak.swc").symlink_to(outside / "tokens.swc")
    lines = [f'[[datasets]]\nid = "{name}"\npath = "{path}"\n' for name, path in entries.items()]
    lines.append(f'[[datasets]]\nid = "swc"\npath = "{archive / "swc"}"\nkind = "skeletons"\nspace = "fine"\n')
    lines.append(f'[[datasets]]\nid = "up_wide"\npath = "{entries["up_default"]}"\nroot = "{archive / "lab"}"\n')
    lines = [line + ('root = "/"\n' if 'id = "zero_wide"' in line else "") for line in lines]
    catalog = base / "catalog.toml"
    catalog.write_text("\n".join(lines))
    srv = Server(catalog, ["--recheck", "600"])
    try:
        yield srv, base, up
    finally:
        srv.stop()


REFUSED = ["external", "elink", "virtual", "xml_abs", "xml_up", "n5_up", "zarr_link", "stack"]


def _listed(srv: Server) -> dict[str, dict]:
    return {d["id"]: d for d in requests.get(srv.url("/api/datasets"), timeout=TIMEOUT).json()["datasets"]}


@pytest.mark.parametrize("ds", REFUSED)
def test_a_source_reaching_outside_its_root_is_unavailable_and_never_serves_the_canary(hostile, ds):
    srv, base, _ = hostile
    listed = _listed(srv)[ds]
    assert listed["status"] == "error", listed
    error = listed["error"]
    assert "outside the dataset's root" in error and "widen the dataset's root" in error, error
    assert str(base / "outside") in error, error  # what the file pointed at
    r = requests.get(srv.url(f"/ds/{ds}/zarr/.zattrs"), timeout=TIMEOUT)
    assert r.status_code == 503 and "outside the dataset's root" in r.text, (r.status_code, r.text)
    for path in (f"/ds/{ds}/region?format=raw", f"/ds/{ds}/zarr/0/0/0/0/0/0", f"/ds/{ds}/zarr3/0/c/0/0/0/0/0",
                 f"/ds/{ds}/precomputed/1_1_1/0-32_0-32_0-8"):
        r = requests.get(srv.url(path), timeout=TIMEOUT)
        assert r.status_code >= 400 and SECRET not in r.content, (path, r.status_code)


def test_no_file_outside_the_root_is_open_while_hostile_sources_are_requested(hostile):
    srv, base, _ = hostile
    outside = str(base / "outside")
    stop = threading.Event()

    def ask() -> None:
        while not stop.is_set():
            for ds in ("external", "elink", "virtual", "xml_up", "stack"):
                requests.get(srv.url(f"/ds/{ds}/region?format=raw"), timeout=TIMEOUT)

    asker = threading.Thread(target=ask)
    asker.start()
    seen: set[str] = set()
    try:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            for fd in os.listdir(f"/proc/{srv.proc.pid}/fd"):
                try:
                    seen.add(os.readlink(f"/proc/{srv.proc.pid}/fd/{fd}"))
                except OSError:
                    pass  # closed while listed
    finally:
        stop.set()
        asker.join()
    assert seen and not [s for s in seen if s.startswith(outside)], sorted(seen)


def _answers_with_an_error(srv: Server, path: str, *says: str) -> str:
    r = requests.get(srv.url(path), timeout=TIMEOUT)
    assert r.status_code >= 500, (r.status_code, r.text)
    assert SECRET not in r.content
    for text in says:
        assert text in r.text, r.text
    return r.text


def test_a_fifo_block_fails_its_chunk_at_once_and_the_server_goes_on(hostile):
    srv, _, _ = hostile
    for _ in range(3):  # more requests than the pool has workers would hang if each one blocked
        _answers_with_an_error(srv, "/ds/fifo/zarr/0/0/0/0/0/0", "a FIFO, not a regular file")
    _answers_with_an_error(srv, "/ds/fifo/region?format=raw", "a FIFO")
    assert requests.get(srv.url("/api/datasets"), timeout=TIMEOUT).ok
    r = requests.get(srv.url("/ds/fine/region?format=npy"), timeout=TIMEOUT)
    assert r.status_code == 200


def test_a_block_linked_to_dev_zero_is_refused_without_reading_it(hostile):
    srv, _, _ = hostile
    _answers_with_an_error(srv, "/ds/zero/zarr/0/0/0/0/0/0", "refers to /dev/zero outside the dataset's root")
    # a root widened to / holds /dev/zero: still refused, as it is no regular file
    _answers_with_an_error(srv, "/ds/zero_wide/zarr/0/0/0/0/0/0", "a character device, not a regular file")
    assert srv.alive() and requests.get(srv.url("/ds/fine/zarr/.zattrs"), timeout=TIMEOUT).ok


def test_a_fifo_slice_fails_its_chunks_at_once(hostile, tmp_path):
    """A slice replaced by a FIFO after the stack was opened (slices are opened when first read)."""
    srv, base, _ = hostile
    stack = tmp_path / "stack"
    stack.mkdir()
    for z in range(4):
        tifffile.imwrite(stack / f"z{z:04d}.tif", np.full((16, 16), z, np.uint8))
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "stack"\npath = "{stack}"\nchunk = [1, 16, 16]\n')
    own = Server(catalog, ["--recheck", "600"])
    try:
        assert requests.get(own.url("/ds/stack/zarr/0/0/0/0/0/0"), timeout=TIMEOUT).ok  # slice 0, opened at start
        (stack / "z0002.tif").unlink()
        os.mkfifo(stack / "z0002.tif")
        for _ in range(3):
            _answers_with_an_error(own, "/ds/stack/zarr/0/0/0/2/0/0", "z0002.tif", "a FIFO")
        assert requests.get(own.url("/ds/stack/zarr/0/0/0/3/0/0"), timeout=TIMEOUT).ok
    finally:
        own.stop()


def test_a_widened_root_serves_an_xml_beside_its_raw_tree(hostile):
    srv, base, up = hostile
    listed = _listed(srv)
    assert listed["up_default"]["status"] == "error"
    error = listed["up_default"]["error"]
    assert error.startswith("dataset.xml: refers to ") and "lab/raw/data.h5 outside the dataset's root" in error
    assert listed["up_wide"]["status"] != "error", listed["up_wide"]
    r = requests.get(srv.url("/ds/up_wide/region?format=npy&level=0"), timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    served = np.load(io.BytesIO(r.content))
    np.testing.assert_array_equal(served.reshape(SHAPE), up)
    files = requests.get(srv.url("/ds/up_wide/manifest.json"), timeout=TIMEOUT).json()["files"]
    assert [f["name"] for f in files] == ["raw/data.h5", "xml/dataset.xml"]  # named within the widened root


def test_a_tracing_linked_outside_is_refused_without_quoting_it(hostile):
    srv, base, _ = hostile
    r = requests.get(srv.url("/api/datasets/swc"), timeout=TIMEOUT)
    assert r.ok and SECRET not in r.content, r.text
    neurons = {n["file"]: n for n in r.json()["neurons"]}
    assert neurons["ok.swc"]["status"] == "ok"
    assert neurons["leak.swc"]["status"] == "error"
    assert "outside the dataset's root" in neurons["leak.swc"]["error"], neurons["leak.swc"]
    r = requests.get(srv.url(f"/ds/swc/skeletons/{neurons['leak.swc']['segid']}"), timeout=TIMEOUT)
    assert r.status_code == 503 and SECRET not in r.content
    r = requests.get(srv.url("/ds/swc/manifest.json?checksums=sha256"), timeout=TIMEOUT)
    digest = hashlib.sha256((base / "outside" / "tokens.swc").read_bytes()).hexdigest()
    assert r.ok and "ok.swc" in r.text and "leak.swc" not in r.text and digest not in r.text, r.text


def test_the_catalog_refuses_a_root_that_does_not_hold_the_path(tmp_path):
    from bil_transform.catalog import CatalogError, load_catalog

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "x"\npath = "{tmp_path / "a" / "x.tif"}"\nroot = "{tmp_path / "b"}"\n')
    with pytest.raises(CatalogError, match="root .* does not hold the path"):
        load_catalog(catalog)
    catalog.write_text('[[datasets]]\nid = "x"\npath = "a/x.tif"\nroot = "."\n')
    assert load_catalog(catalog)[0].confinement == tmp_path


def test_hdf5_links_and_virtual_sources_inside_the_root_are_still_read(tmp_path, monkeypatch):
    from bil_transform.readers import open_source

    monkeypatch.chdir(tmp_path)  # HDF5 also looks for a relative name here: nothing of that name in it
    (tmp_path / "ds").mkdir()
    values = np.random.default_rng(0).integers(0, 255, SHAPE, dtype=np.uint8)
    with h5py.File(tmp_path / "ds" / "part.h5", "w") as f:
        f["data"] = values
    whole = (slice(0, SHAPE[0]), slice(0, SHAPE[1]), slice(0, SHAPE[2]))
    for name in ("elink", "virtual"):
        ims = tmp_path / "ds" / f"{name}.ims"
        data = _ims(ims, np.zeros(SHAPE, np.uint8))
        with h5py.File(ims, "a") as f:
            del f[data]
            if name == "elink":
                f[data] = h5py.ExternalLink("part.h5", "/data")
            else:
                layout = h5py.VirtualLayout(shape=SHAPE, dtype="u1")
                layout[:] = h5py.VirtualSource("part.h5", "data", shape=SHAPE)
                f.create_virtual_dataset(data, layout)
        np.testing.assert_array_equal(open_source(ims).read(0, 0, 0, whole), values)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_zarr_chunk_linked_outside_or_a_fifo_is_refused_by_the_reader(tmp_path, kind):
    from bil_transform.readers import SourceError, open_source

    canary = tmp_path / "tokens.txt"
    canary.write_bytes(CANARY)
    values = np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE)
    arr = zarr.create_array(tmp_path / "ds" / "a.zarr", shape=SHAPE, chunks=(8, 16, 32), dtype="uint8",
                            compressors=None)
    arr[:] = values
    chunk = tmp_path / "ds" / "a.zarr" / "c" / "0" / "1" / "0"
    chunk.unlink()
    if kind == "symlink":
        chunk.symlink_to(canary)
    else:
        os.mkfifo(chunk)
    reader = open_source(tmp_path / "ds" / "a.zarr")
    assert np.array_equal(reader.read(0, 0, 0, (slice(0, 8), slice(0, 16), slice(0, 32))), values[:, :16])
    done: list = []
    worker = threading.Thread(target=lambda: done.append(_attempt(reader)), daemon=True)
    worker.start()
    worker.join(10)  # a FIFO opened for reading without O_NONBLOCK would block here for good
    assert done and isinstance(done[0], SourceError), done
    said = str(done[0])
    assert ("outside the dataset's root" in said) if kind == "symlink" else ("a FIFO, not a regular file" in said)
    assert SECRET.decode() not in said


def _attempt(reader):
    try:
        return reader.read(0, 0, 0, (slice(0, 8), slice(16, 32), slice(0, 32)))
    except Exception as exc:  # the refusal, as the reader raises it
        return exc
