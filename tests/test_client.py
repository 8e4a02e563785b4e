"""The Python client (issue 12, part 4): the README's three notebook lines, run as written against a live
server, and the lazy levels, voxel sizes and regions against the independent numpy pyramid."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import Server
from reference import reference_levels

from bil_transform.client import ServerError, open_dataset

README = Path(__file__).resolve().parents[1] / "README.md"


def _truth(sources, server, ident):
    src = sources[0][ident]
    doc = requests.get(server.url(f"/api/datasets/{ident}")).json()
    factors = [tuple(round(f) for f in lvl["factors"]) for lvl in doc["levels"]]
    return src, reference_levels(src.data, factors, src.method, src.native), factors


def test_the_readme_notebook_lines_run_as_written(server, sources):
    block = re.search(r"```python\n(from bil_transform\.client .*?)```", README.read_text(), re.S).group(1)
    assert len(block.strip().splitlines()) == 3
    names: dict = {}
    exec(block.replace("http://HOST:8000", server.base).replace("/ds/ID", "/ds/slices16"), names)
    _, levels, _ = _truth(sources, server, "slices16")
    np.testing.assert_array_equal(names["box"], levels[1][:, 0, 0:8, 0:64, 0:64])


def test_levels_voxel_sizes_and_regions(server, sources):
    src, levels, factors = _truth(sources, server, "ome04")
    ds = open_dataset(server.url("/ds/ome04"))
    assert len(ds.levels) == len(levels)
    for level, want in enumerate(levels):
        np.testing.assert_array_equal(ds.levels[level].compute(), want)
        assert ds.voxel_size(level) == pytest.approx(tuple(v * f for v, f in zip(src.voxel_size, factors[level])))
    np.testing.assert_array_equal(ds.region(level=1, z=(2, 9), y=(5, 40), x=(0, 30), c=[1]),
                                  levels[1][:, [1], 2:9, 5:40, 0:30])
    np.testing.assert_array_equal(ds.region(level=0, t=0, c=1), levels[0][0, 1])


def test_a_token_opens_an_embargoed_dataset_and_a_refusal_says_why(sources, tmp_path):
    _, catalog = sources
    closed = catalog.with_name("catalog-client-embargo.toml")
    closed.write_text(catalog.read_text().replace("[[datasets]]\n", "[[datasets]]\nembargo = true\n"))
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[tokens]]\ntoken = "client-token-1234"\ndatasets = ["*"]\n')
    srv = Server(closed, ["--tokens", str(tokens)])
    try:
        ds = open_dataset(srv.url("/ds/slices16"), token="client-token-1234")
        np.testing.assert_array_equal(ds.region(level=0, z=(0, 3)), sources[0]["slices16"].data[:, :, 0:3])
        np.testing.assert_array_equal(ds.levels[0][:, :, :3].compute(), sources[0]["slices16"].data[:, :, :3])
        with pytest.raises(ServerError, match="401.*embargo"):
            open_dataset(srv.url("/ds/slices16")).region(level=0, z=(0, 1))
    finally:
        srv.stop()
