"""The manifest (issue 12, part 8): a dataset's source files named relative to its root, with sizes,
times and, on request, sha256 checksums computed independently here with hashlib."""

from __future__ import annotations

import datetime
import hashlib
import os

import requests


def _expected(root, names, checksums=False):
    out = []
    for name in names:
        st = os.stat(root / name)
        entry = {"name": name, "size": st.st_size, "mtime": datetime.datetime.fromtimestamp(
            st.st_mtime_ns / 1e9, datetime.UTC).isoformat().replace("+00:00", "Z")}
        if checksums:
            entry["sha256"] = hashlib.sha256((root / name).read_bytes()).hexdigest()
        out.append(entry)
    return out


def test_a_slice_stack_lists_its_slices(server, sources):
    root = sources[1].parent / "slices16"
    names = sorted(p.name for p in root.iterdir())
    doc = requests.get(server.url("/ds/slices16/manifest.json")).json()
    assert doc == {"id": "slices16", "files": _expected(root, names)}
    r = requests.get(server.url("/ds/slices16/manifest.json?checksums=sha256"))
    assert r.headers.get("Transfer-Encoding") == "chunked"  # streamed as the checksums are made
    assert r.json()["files"] == _expected(root, names, checksums=True)
    assert r.json() == requests.get(server.url("/ds/slices16/manifest.json?checksums=sha256")).json()


def test_a_zarr_store_lists_every_file_and_a_single_file_its_name(server, sources):
    store = sources[1].parent / "float32.zarr"
    names = sorted(p.relative_to(store).as_posix() for p in store.rglob("*") if p.is_file())
    doc = requests.get(server.url("/ds/float32/manifest.json?checksums=sha256")).json()
    assert [f["name"] for f in doc["files"]] == names and len(names) > 4
    assert doc["files"] == _expected(store, names, checksums=True)
    tiff = requests.get(server.url("/ds/tiled8/manifest.json")).json()
    assert tiff["files"] == _expected(sources[1].parent, ["tiled8.tif"])


def test_a_manifest_answers_head_ranges_and_bad_requests(server):
    url = server.url("/ds/slices16/manifest.json")
    whole = requests.get(url, headers={"Accept-Encoding": "identity"}).content
    assert int(requests.head(url).headers["Content-Length"]) == len(whole)
    part = requests.get(url, headers={"Range": "bytes=10-99"})
    assert part.status_code == 206 and part.content == whole[10:100]
    bad = requests.get(url + "?checksums=md5")
    assert bad.status_code == 400 and "sha256" in bad.text
