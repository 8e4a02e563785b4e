"""`bil-transform export` (issue 15, point 4): a dataset's pyramid written as files on a dask.distributed
cluster is the served view byte for byte, file for file, in every format; zarr-python, tensorstore and
the real Neuroglancer open it; OUT may be any fsspec URL; bad input is one line and exit code 2.

The exports run through one LocalCluster of two worker processes shared by the module (--scheduler),
with tiny tasks so that every dataset is cut into cells handing blocks up a tree; one runs the real
command line in a subprocess on its own default LocalCluster, writing to S3 (a loopback moto server).
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import io
import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

import fsspec
import neuroglancer
import numpy as np
import pytest
import requests
import tensorstore as ts
import zarr
from conftest import Server
from distributed import LocalCluster
from neuroglancer_browser import Browser, check_exchanges, layers, voxels_under_pixels

from bil_transform.cli import main

VIEWS = ("zarr", "zarr3", "zarr3-sharded", "precomputed", "precomputed-sharded")
IDENTITY = {"Accept-Encoding": "identity"}
SERVED_AS = {"float64": np.float32}  # precomputed: what Neuroglancer cannot show, served as a type it can
READ = re.compile(r"read [0-9.]+ MB of source voxels \((\d+) bytes\)")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as c:
        yield c.scheduler_address


@pytest.fixture(scope="module")
def web():
    with requests.Session() as s:
        yield s


def export(*argv: str) -> tuple[int, str]:
    """`bil-transform export ARGV` in this process: (exit code, stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["export", *argv])
    return code, err.getvalue()


@pytest.fixture(scope="module")
def exported(sources, cluster, tmp_path_factory):
    """export(view, id) -> (its directory, the source voxel bytes it says it read), once per pair.
    Tasks of at most 4 KiB: every dataset is cut into as many cells as its slabs and files allow.
    The zarr3 exports are given as file:// URLs."""
    _, catalog = sources
    root = tmp_path_factory.mktemp("exports")
    done: dict[tuple[str, str], tuple[Path, int]] = {}

    def get(view: str, ident: str) -> tuple[Path, int]:
        if (view, ident) not in done:
            out = root / f"{ident}-{view}"
            to = out.as_uri() if view == "zarr3" else str(out)
            code, err = export(ident, "--config", str(catalog), "--to", to, "--format", view,
                               "--scheduler", cluster, "--task-size", "4KiB")
            assert code == 0, err
            summary = err.strip().splitlines()[-1]
            assert summary.startswith("bil-transform export: wrote"), err
            done[(view, ident)] = out, int(READ.search(summary).group(1))
        return done[(view, ident)]

    return get


def served_keys(base: str) -> set[str]:
    """Every file of a served view, walking its directory listings as fsspec's HTTP filesystem reads them."""
    fs = fsspec.filesystem("http", skip_instance_cache=True, use_listings_cache=False)
    keys, directories = set(), [base + "/"]
    while directories:
        for entry in fs.ls(directories.pop(), detail=True):
            if entry["type"] == "directory":
                directories.append(entry["name"])
            else:
                keys.add(entry["name"].removeprefix(base + "/"))
    return keys


def files_in(out: Path) -> dict[str, Path]:
    return {p.relative_to(out).as_posix(): p for p in out.rglob("*") if p.is_file()}


def stored_voxel_bytes(src, t: slice = slice(None)) -> int:
    """What a complete export reads from the source: every level the files store, once."""
    return sum(level[t].nbytes for level in (src.native or [src.data]))


@pytest.mark.parametrize("view", VIEWS)
def test_every_exported_file_is_the_served_one(sources, server, exported, web, view):
    """For every held-in dataset: the same files as the view's listings, each the bytes a GET of the
    same key answers; every stored source voxel read exactly once (never twice across tasks)."""
    found, _ = sources
    for ident, src in found.items():
        out, read = exported(view, ident)
        base = server.url(f"/ds/{ident}/{view}")
        written = files_in(out)
        assert set(written) == served_keys(base), ident
        for key, path in written.items():
            r = web.get(f"{base}/{key}", headers=IDENTITY)
            assert r.status_code == 200 and r.content == path.read_bytes(), f"{ident} {view} {key}"
        # a precomputed view is one time point
        assert read == stored_voxel_bytes(src, slice(0, 1) if view.startswith("precomputed") else slice(None)), ident


@pytest.mark.parametrize("view", ["zarr", "zarr3", "zarr3-sharded"])
def test_zarr_python_and_tensorstore_read_the_source_voxels(sources, exported, view):
    found, _ = sources
    driver = "zarr" if view == "zarr" else "zarr3"
    for ident, src in found.items():
        out, _ = exported(view, ident)
        group = zarr.open_group(str(out), mode="r")
        np.testing.assert_array_equal(group["0"][:], src.data, err_msg=f"{ident} {view}")
        level0 = ts.open({"driver": driver, "kvstore": {"driver": "file", "path": str(out / "0")}},
                         read=True).result()
        np.testing.assert_array_equal(level0.read().result(), src.data, err_msg=f"{ident} {view} tensorstore")
        if src.native:  # the levels the source stores, as it stores them
            for i, level in enumerate(src.native):
                np.testing.assert_array_equal(group[str(i)][:], level, err_msg=f"{ident} {view} level {i}")


@pytest.mark.parametrize("view", ["precomputed", "precomputed-sharded"])
def test_tensorstore_reads_the_precomputed_exports(sources, exported, view):
    found, _ = sources
    for ident, src in found.items():
        out, _ = exported(view, ident)
        volume = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(out)},
                          "scale_index": 0}, read=True).result()
        expected = src.data[0].astype(SERVED_AS.get(src.data.dtype.name, src.data.dtype))  # (c, z, y, x)
        np.testing.assert_array_equal(volume.read().result(), expected.transpose(3, 2, 1, 0), err_msg=ident)


class _StaticCORS(http.server.SimpleHTTPRequestHandler):
    """Plain files with CORS, as a bucket serves them."""

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        super().end_headers()

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def static_server(directory: Path):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_StaticCORS, directory=directory))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join()


def test_neuroglancer_draws_an_export_from_plain_files(sources, exported):
    """The precomputed export of the slice stack, on a static file server: every request answered,
    and the panel is the source's voxels."""
    src = sources[0]["slices16"]
    out, _ = exported("precomputed", "slices16")
    browser = Browser()
    try:
        with static_server(out) as base:
            screen = browser.show(layers(image=neuroglancer.ImageLayer(source=f"precomputed://{base}")), watch=base,
                                  scale=0.15)
    finally:
        browser.close()
    check_exchanges(screen, base)
    gray = screen.image[..., 0].astype(np.float64)
    assert gray.std() > 10, "the rendered panel is blank"
    z, ys, xs = voxels_under_pixels(screen, src.data.shape[2:])
    assert np.corrcoef(gray.ravel(), src.data[0, 0, z][ys, xs].astype(np.float64).ravel())[0, 1] > 0.99


def test_levels_make_a_complete_multiscale_of_those_levels(sources, server, cluster, tmp_path, web):
    """--levels 1:3: only levels 1 and 2 are written, each file as served, and the root documents list
    exactly those levels (the server's entries for them), so no reader looks for a level that is not there."""
    _, catalog = sources
    for view, root_doc in (("zarr", ".zattrs"), ("zarr3", "zarr.json")):
        out = tmp_path / view
        code, err = export("grid", "--config", str(catalog), "--to", str(out), "--format", view, "--levels", "1:3",
                           "--scheduler", cluster, "--task-size", "4KiB")
        assert code == 0, err
        base = server.url(f"/ds/grid/{view}")
        written = files_in(out)
        served = served_keys(base)
        assert {k for k in written if k.split("/")[0].isdigit()} == {k for k in served if k.split("/")[0] in ("1", "2")}
        for key in written:
            if key.split("/")[0] in ("1", "2"):
                assert written[key].read_bytes() == web.get(f"{base}/{key}", headers=IDENTITY).content, key
        served_doc, doc = web.get(f"{base}/{root_doc}").json(), json.loads(written[root_doc].read_text())
        ms = (lambda d: d["multiscales"][0]) if view == "zarr" else (lambda d: d["attributes"]["ome"]["multiscales"][0])
        assert ms(doc)["datasets"] == ms(served_doc)["datasets"][1:3]
        if view == "zarr":
            meta = json.loads(written[".zmetadata"].read_text())["metadata"]
            assert {k for k in meta if k[0].isdigit()} == {"1/.zarray", "1/.zattrs", "2/.zarray", "2/.zattrs"}
            assert meta[".zattrs"] == doc
        else:
            assert set(doc["consolidated_metadata"]["metadata"]) == {"1", "2"}
        group = zarr.open_group(str(out), mode="r")
        assert sorted(group.array_keys()) == ["1", "2"]
        if view == "zarr":  # valid NGFF 0.4: every dataset the multiscale lists is an array of the group
            from ome_zarr_models.v04 import Image

            assert [d.path for d in Image.from_zarr(group).attributes.multiscales[0].datasets] == ["1", "2"]
        remote = zarr.open_group(base, mode="r")
        for level in ("1", "2"):
            np.testing.assert_array_equal(group[level][:], remote[level][:])

    out = tmp_path / "coarsest"  # precomputed, the coarsest level alone
    code, err = export("tiled8", "--config", str(catalog), "--to", str(out), "--format", "precomputed",
                       "--levels=-1", "--scheduler", cluster)
    assert code == 0, err
    info, served = json.loads((out / "info").read_text()), web.get(server.url("/ds/tiled8/precomputed/info")).json()
    assert info["scales"] == served["scales"][-1:]
    top = info["scales"][0]["key"]
    assert {p.split("/")[0] for p in files_in(out)} == {"info", top}
    volume = ts.open({"driver": "neuroglancer_precomputed", "kvstore": {"driver": "file", "path": str(out)}},
                     read=True).result()
    coarsest = np.load(io.BytesIO(web.get(server.url(f"/ds/tiled8/region?level={top}")).content))
    np.testing.assert_array_equal(volume.read().result(), coarsest[0].transpose(3, 2, 1, 0))


@pytest.fixture
def moto():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    yield env
    server.stop()


def test_the_command_line_on_its_own_local_cluster_writes_to_s3(sources, server, moto, web):
    """`bil-transform export ID --to s3://...` with no --scheduler: a LocalCluster of --workers processes,
    the default format (zarr), a progress bar and one summary line on stderr, every object as served."""
    _, catalog = sources
    s3 = fsspec.filesystem("s3", endpoint_url=moto["AWS_ENDPOINT_URL"], key="test", secret="test",
                           skip_instance_cache=True)
    s3.mkdir("exports")
    done = subprocess.run([sys.executable, "-m", "bil_transform", "export", "ome04", "--config", str(catalog),
                           "--to", "s3://exports/ome04", "--workers", "2"],
                          env={**os.environ, **moto}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-2].startswith("export [####################]") and "files" in lines[-2], done.stderr
    assert lines[-1].startswith("bil-transform export: wrote") and "on 2 worker process(es)" in lines[-1]
    assert not done.stdout
    base = server.url("/ds/ome04/zarr")
    written = {p.removeprefix("exports/ome04/") for p in s3.find("exports/ome04")}
    assert written == served_keys(base)
    for key in written:
        assert s3.cat_file(f"exports/ome04/{key}") == web.get(f"{base}/{key}", headers=IDENTITY).content, key


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """An image with a label dataset attached under its labels/ group."""
    import tifffile

    root = tmp_path_factory.mktemp("export-labels")
    rng = np.random.default_rng(5)
    image = rng.integers(0, 4000, (16, 96, 80), dtype=np.uint16)
    tifffile.imwrite(root / "image.tif", image)
    atlas = np.repeat(np.arange(4, dtype=np.uint32), 24)[None, :, None] * np.ones((16, 1, 80), np.uint32)
    zarr.create_array(root / "atlas.zarr", shape=atlas.shape, chunks=(8, 32, 32), dtype="uint32")[:] = atlas
    catalog = root / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "brain"\npath = "{root / "image.tif"}"\nvoxel_size = [1.0, 1.0, 1.0]\n'
                       f'labels = ["atlas"]\n\n[[datasets]]\nid = "atlas"\npath = "{root / "atlas.zarr"}"\n'
                       'kind = "labels"\n')
    srv = Server(catalog)
    yield srv, catalog, image, atlas
    srv.stop()


@pytest.mark.parametrize("view", ["zarr", "zarr3-sharded"])
def test_attached_labels_are_exported_under_labels(labelled, cluster, tmp_path, web, view):
    srv, catalog, image, atlas = labelled
    out = tmp_path / view
    code, err = export("brain", "--config", str(catalog), "--to", str(out), "--format", view, "--scheduler", cluster,
                       "--task-size", "4KiB")
    assert code == 0, err
    base = srv.url(f"/ds/brain/{view}")
    written = files_in(out)
    assert set(written) == served_keys(base) and any(k.startswith("labels/atlas/0/") for k in written)
    for key, path in written.items():
        assert path.read_bytes() == web.get(f"{base}/{key}", headers=IDENTITY).content, key
    group = zarr.open_group(str(out), mode="r")
    np.testing.assert_array_equal(group["0"][0, 0], image)
    np.testing.assert_array_equal(group["labels"]["atlas"]["0"][0, 0], atlas)


BAD = [
    (["nope"], "has no dataset with id 'nope'"),
    (["grid", "--format", "zarr4"], "No view 'zarr4'"),
    (["grid", "--format", "zarr3-lz9"], "after zarr3- comes one of"),
    (["grid", "--format", "precomputed-jpeg"], "jpeg encoding cannot hold"),
    (["grid", "--levels", "9"], "there is no level 9; the dataset has levels 0 to 4"),
    (["grid", "--levels", "3:1"], "--levels 3:1 names no level"),
    (["grid", "--levels", "one"], "write levels as START:STOP"),
    (["grid", "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"], "--workers sets the local cluster's size"),
]


@pytest.mark.parametrize("argv,says", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_is_one_line_and_exit_code_2(sources, tmp_path, argv, says):
    _, catalog = sources
    out = tmp_path / "out"
    code, err = export(*argv, "--config", str(catalog), "--to", str(out))
    assert code == 2 and says in err, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("bil-transform export: "), err
    assert not out.exists()


def test_out_is_never_next_to_the_data_and_never_mixed_with_other_files(sources, tmp_path):
    _, catalog = sources
    root = catalog.parent
    cases = [
        (["slices16", "--config", str(catalog), "--to", str(root / "slices16" / "copy")], "inside the directory of"),
        (["tiled8", "--config", str(catalog), "--to", str(root / "tiled8-copy")], "inside the directory of"),
        ([str(root / "tiled8.tif"), "--to", (root / "copy").as_uri()], "inside the directory of"),
        ([str(root / "float32.zarr"), "--to", str(root / "float32.zarr" / "x")], "inside the directory of"),
        (["tiled8", "--to", str(tmp_path / "a")], "is no file or directory (to export a catalog's dataset by id, "
                                                  "give --config"),
    ]
    full = tmp_path / "full"
    full.mkdir()
    (full / "notes.txt").write_text("mine")
    cases.append((["grid", "--config", str(catalog), "--to", str(full)], "is not empty"))
    before = sorted(p.name for p in root.rglob("*"))
    for argv, says in cases:
        code, err = export(*argv)
        assert code == 2 and says in err and len(err.strip().splitlines()) == 1, (argv, err)
    assert sorted(p.name for p in root.rglob("*")) == before and (full / "notes.txt").read_text() == "mine"


def test_a_broken_source_file_fails_the_export_in_one_line_and_writes_no_metadata(cluster, tmp_path):
    """A slice whose data is cut short opens (its header is whole) and fails where it is read, on a
    worker: exit code 1, one line naming the file, and no metadata, so the copy is never taken as whole."""
    import tifffile

    stack = tmp_path / "stack"
    stack.mkdir()
    planes = np.random.default_rng(3).integers(0, 60000, (12, 80, 70), dtype=np.uint16)
    for z, plane in enumerate(planes):
        tifffile.imwrite(stack / f"p_{z:02d}.tif", plane)
    broken = stack / "p_07.tif"
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size // 2)
    out = tmp_path / "out"
    code, err = export(str(stack), "--to", str(out), "--scheduler", cluster)
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("bil-transform export: failed: SourceError: ") and str(broken) in last, err
    assert "is incomplete (its metadata was not written)" in last
    assert not any(name in files_in(out) for name in (".zattrs", ".zgroup", ".zmetadata"))
