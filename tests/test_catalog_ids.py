"""Dataset identifiers (issue 12, part 6): an entry without `id` gets three pronounceable triplets derived
from its path, the same on every start, unique within the catalog."""

from __future__ import annotations

import re

import requests
from conftest import Server

from bil_transform.catalog import load_catalog, pronounceable_id

TRIPLETS = re.compile(r"[a-z]{3}-[a-z]{3}-[a-z]{3}")


def _catalog(tmp_path, entries: list[str]):
    path = tmp_path / "catalog.toml"
    path.write_text("".join(f"[[datasets]]\n{e}\n\n" for e in entries))
    return path


def test_ids_are_triplets_stable_and_unique(tmp_path):
    catalog = _catalog(tmp_path, [f'path = "brains/brain{i:03d}"' for i in range(300)] + ['id = "kept"\npath = "x"'])
    first, again = load_catalog(catalog), load_catalog(catalog)
    ids = [s.id for s in first]
    assert ids == [s.id for s in again]  # identical on every start
    assert ids[-1] == "kept" and all(TRIPLETS.fullmatch(i) for i in ids[:-1])
    assert len(set(ids)) == len(ids)
    assert ids[0] == pronounceable_id("brains/brain000")  # derived from the path as the catalog writes it


def test_a_derived_id_steps_around_one_already_taken(tmp_path):
    taken = pronounceable_id("a/b")
    ids = [s.id for s in load_catalog(_catalog(tmp_path, [f'id = "{taken}"\npath = "elsewhere"', 'path = "a/b"']))]
    assert ids[0] == taken and ids[1] != taken and TRIPLETS.fullmatch(ids[1])


def test_the_server_serves_datasets_by_their_derived_ids(sources, tmp_path):
    _, catalog = sources
    root = catalog.parent
    path = _catalog(tmp_path, [f'path = "{root / "slices16"}"', f'path = "{root / "tiled8.tif"}"'])
    srv = Server(path)
    try:
        listed = [d["id"] for d in requests.get(srv.url("/api/datasets")).json()["datasets"]]
        assert listed == [s.id for s in load_catalog(path)] and all(TRIPLETS.fullmatch(i) for i in listed)
        assert requests.get(srv.url(f"/ds/{listed[0]}/zarr/0/.zarray")).status_code == 200
    finally:
        srv.stop()
