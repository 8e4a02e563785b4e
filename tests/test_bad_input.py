"""Broken sources fail only the chunks that touch them, with the file named; the server stays up."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tifffile
import zarr
from conftest import Server

Z = 70  # two z-chunks of 64: chunk 0 holds planes 0-63, chunk 1 planes 64-69
BAD_PLANE = 66


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    plane = np.arange(40 * 50, dtype=np.uint16).reshape(40, 50)
    for name in ("good", "truncated", "mismatched"):
        (root / name).mkdir()
        for z in range(Z):
            tifffile.imwrite(root / name / f"z{z:03d}.tif", plane + z)
    bad = root / "truncated" / f"z{BAD_PLANE:03d}.tif"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    tifffile.imwrite(root / "mismatched" / f"z{BAD_PLANE:03d}.tif", np.zeros((41, 50), np.uint16))
    (root / "notasource").mkdir()
    (root / "notasource" / "readme.txt").write_text("hello")
    catalog = root / "catalog.toml"
    catalog.write_text("".join(f'[[datasets]]\nid = "{n}"\npath = "{p}"\n\n' for n, p in [
        ("good", "good"), ("truncated", "truncated"), ("mismatched", "mismatched"),
        ("missing", "does/not/exist"), ("notasource", "notasource")]))
    srv = Server(catalog)
    yield srv, root, plane
    srv.stop()


def test_unreadable_paths_are_listed_with_their_reason(broken):
    srv, root, _ = broken
    listed = {d["id"]: d for d in requests.get(srv.url("/api/datasets")).json()["datasets"]}
    assert listed["good"]["status"] == listed["truncated"]["status"] == "ok"
    # named relative to the dataset's own root (here: the missing path's own name), never by absolute path
    assert listed["missing"]["status"] == "error" and listed["missing"]["error"].startswith("exist: no such file")
    assert str(root) not in listed["missing"]["error"]
    assert listed["notasource"]["status"] == "error" and "not a supported source" in listed["notasource"]["error"]
    r = requests.get(srv.url("/ds/missing/zarr/.zattrs"))
    assert r.status_code == 503 and r.headers["Retry-After"] == "2"  # never 404: a zarr client reads that as zeros
    assert "unavailable" in r.text and "exist: no such file" in r.text


@pytest.mark.parametrize("ds,why", [("truncated", "truncated"), ("mismatched", "41x50")])
def test_only_chunks_touching_the_bad_slice_fail(broken, ds, why):
    srv, root, plane = broken
    ok = requests.get(srv.url(f"/ds/{ds}/zarr/0/0/0/0/0/0"))
    assert ok.status_code == 200
    bad = requests.get(srv.url(f"/ds/{ds}/zarr/0/0/0/1/0/0"))
    assert bad.status_code == 500
    assert f"z{BAD_PLANE:03d}.tif" in bad.text and why in bad.text
    assert bad.headers["Access-Control-Allow-Origin"] == "*"
    # a coarser level built from the bad slice fails the same way, and is not cached as a success
    coarse = requests.get(srv.url(f"/ds/{ds}/zarr/1/0/0/0/0/0"))
    assert coarse.status_code == 500 and f"z{BAD_PLANE:03d}.tif" in coarse.text
    # zarr-python reads the good part exactly
    array = zarr.open_group(srv.url(f"/ds/{ds}/zarr"), mode="r")["0"]
    expected = np.stack([plane + z for z in range(64)])
    np.testing.assert_array_equal(array[0, 0, :64], expected)


def test_server_keeps_serving_after_errors(broken):
    srv, _, plane = broken
    for _ in range(3):
        requests.get(srv.url("/ds/truncated/zarr/0/0/0/1/0/0"))
    assert srv.alive()
    good = zarr.open_group(srv.url("/ds/good/zarr"), mode="r")["0"][0, 0]
    np.testing.assert_array_equal(good, np.stack([plane + z for z in range(Z)]))


def test_bad_catalog_is_a_clear_cli_error(tmp_path):
    import subprocess
    import sys

    catalog = tmp_path / "bad.toml"
    catalog.write_text('[[datasets]]\nid = "a b"\npath = "x"\n')
    run = subprocess.run([sys.executable, "-m", "bil_transform", "serve", "--config", str(catalog)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "id 'a b' may use only letters" in run.stderr


def test_a_damaged_file_marks_only_its_dataset_unavailable_and_the_server_starts(tmp_path):
    """Issue 13, point 1: files that trip a parser outside its own checks (a TIFF cut after its header
    gave IndexError) no longer stop the start-up; the dataset says which file and what is wrong."""
    tifffile.imwrite(tmp_path / "good.tif", np.arange(4 * 32 * 32, dtype=np.uint16).reshape(4, 32, 32),
                     photometric="minisblack")
    (tmp_path / "cut.tif").write_bytes((tmp_path / "good.tif").read_bytes()[:8])  # a header and nothing else
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(f'[[datasets]]\nid = "cut"\npath = "{tmp_path / "cut.tif"}"\n\n'
                       f'[[datasets]]\nid = "good"\npath = "{tmp_path / "good.tif"}"\n')
    srv = Server(catalog)
    try:
        listed = {d["id"]: d for d in requests.get(srv.url("/api/datasets")).json()["datasets"]}
        assert listed["good"]["status"] == "ok"
        assert listed["cut"]["status"] == "error" and listed["cut"]["error"].startswith("cut.tif: ")
        assert "IndexError" in listed["cut"]["error"] and str(tmp_path) not in listed["cut"]["error"]
        assert requests.get(srv.url("/ds/good/zarr/0/0/0/0/0/0")).status_code == 200
    finally:
        srv.stop()


def test_an_ims_with_a_corrupted_middle_never_stops_the_start(tmp_path):
    """Issue 13, point 1: an .ims whose middle bytes are garbage raised KeyError at start-up."""
    from imaris_writer import write_ims

    data = np.random.default_rng(5).integers(0, 4000, (24, 64, 64), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "good.tif", data, photometric="minisblack")
    for name in ("meta", "data"):
        write_ims(tmp_path / f"{name}.ims", [data])
    for name, fraction in (("meta", 0.02), ("data", 0.5)):  # its headers, then its chunks
        path = tmp_path / f"{name}.ims"
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.seek(int(size * fraction))
            f.write(bytes(range(256)) * 16)
    catalog = tmp_path / "catalog.toml"
    catalog.write_text("".join(f'[[datasets]]\nid = "{n}"\npath = "{tmp_path / f}"\n\n'
                               for n, f in (("meta", "meta.ims"), ("data", "data.ims"), ("good", "good.tif"))))
    srv = Server(catalog)
    try:
        listed = {d["id"]: d for d in requests.get(srv.url("/api/datasets")).json()["datasets"]}
        assert listed["good"]["status"] == "ok"
        assert requests.get(srv.url("/ds/good/zarr/0/0/0/0/0/0")).status_code == 200
        for name in ("meta", "data"):
            if listed[name]["status"] == "error":
                assert listed[name]["error"].startswith(f"{name}.ims: "), listed[name]["error"]
                continue
            r = requests.get(srv.url(f"/ds/{name}/zarr-none/0/0/0/0/0/0"))  # opened: exact, or a 500 naming it
            assert r.status_code in (200, 500), r.text
            if r.status_code == 500:
                assert f"{name}.ims" in r.text and "damaged" in r.text
            else:
                np.testing.assert_array_equal(np.frombuffer(r.content, "<u2").reshape(data.shape), data)
        assert listed["meta"]["status"] == "error" or listed["data"]["status"] == "ok"
        assert srv.alive()
    finally:
        srv.stop()
