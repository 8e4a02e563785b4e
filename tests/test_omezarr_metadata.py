"""OME-Zarr metadata every client reads the same way (issue 14, points 3, 4, 6, 8): zarr v3 group
members through consolidated metadata, xarray without NaN for 0, the source's translations kept,
and a catalog switch for zero origins."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import tifffile
import xarray as xr
import zarr
from conftest import Server

SHAPE = (20, 96, 80)


def _volume() -> np.ndarray:
    """A third of it 0 (outside the brain), the rest counts: NaN for 0 would show at once."""
    data = np.random.default_rng(11).integers(1, 60000, SHAPE, dtype=np.uint16)
    data[:, :32] = 0
    return data


def _box_mean(a: np.ndarray, step: tuple[int, int, int]) -> np.ndarray:
    """Independent box mean over `step` windows (edges: the voxels there are), rounded half up."""
    out_shape = [-(-n // s) for n, s in zip(a.shape, step)]
    total, count = np.zeros(out_shape, np.uint64), np.zeros(out_shape, np.uint64)
    for offset in np.ndindex(*step):
        part = a[tuple(slice(o, None, s) for o, s in zip(offset, step))]
        total[tuple(slice(0, n) for n in part.shape)] += part
        count[tuple(slice(0, n) for n in part.shape)] += 1
    return ((total + count // 2) // count).astype(a.dtype)


def _level1(srv: Server, ident: str, data: np.ndarray) -> np.ndarray:
    factors = requests.get(srv.url(f"/api/datasets/{ident}")).json()["levels"][1]["factors"]
    return _box_mean(data, tuple(round(f) for f in factors))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("omezarr_metadata")
    data = _volume()
    tifffile.imwrite(root / "zeros.tif", data, photometric="minisblack")
    # An OME-Zarr 0.4 source written with zarr-python by hand: level-0 translation [0, 1.5, 0, 0] (c, z, y, x)
    # as in the issue, a stored level 1 with its own translation, and a multiscale-level translation.
    group = zarr.open_group(root / "shifted.zarr", mode="w", zarr_format=2)
    levels = [data[None], data[None, :, ::2, ::2]]
    for i, level in enumerate(levels):
        group.create_array(str(i), shape=level.shape, chunks=(1, 8, 32, 32), dtype=level.dtype)[:] = level
    group.attrs["multiscales"] = [{
        "version": "0.4", "name": "shifted",
        "axes": [{"name": "c", "type": "channel"}, *({"name": a, "type": "space", "unit": "micrometer"}
                                                      for a in "zyx")],
        "datasets": [
            {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 2.0, 0.5, 0.5]},
                                                        {"type": "translation", "translation": [0, 1.5, 0, 0]}]},
            {"path": "1", "coordinateTransformations": [{"type": "scale", "scale": [1, 2.0, 1.0, 1.0]},
                                                        {"type": "translation", "translation": [0, 1.5, 0.25, 0.3]}]},
        ],
        "coordinateTransformations": [{"type": "translation", "translation": [0, 0, 10.0, -4.0]}],
    }]
    catalog = root / "catalog.toml"
    catalog.write_text(
        f'[[datasets]]\nid = "zeros"\npath = "{root / "zeros.tif"}"\nvoxel_size = [2.0, 1.0, 1.0]\n\n'
        f'[[datasets]]\nid = "shifted"\npath = "{root / "shifted.zarr"}"\n\n'
        f'[[datasets]]\nid = "flat"\npath = "{root / "shifted.zarr"}"\norigin = "zero"\n')
    srv = Server(catalog)
    yield srv, data
    srv.stop()


def test_zarr_python_lists_the_members_of_a_zarr3_group(served):
    """Point 3: group.keys() was empty on /zarr3 (no listing, no consolidated metadata)."""
    srv, data = served
    levels = requests.get(srv.url("/api/datasets/zeros")).json()["levels"]
    group = zarr.open_group(srv.url("/ds/zeros/zarr3"), mode="r")
    assert sorted(group.keys(), key=int) == [str(i) for i in range(len(levels))]
    assert [group[str(i)].shape[2:] for i in range(len(levels))] == [tuple(lvl["shape"]) for lvl in levels]
    np.testing.assert_array_equal(group["0"][0, 0], data)
    np.testing.assert_array_equal(group["1"][0, 0], _level1(srv, "zeros", data))
    root = requests.get(srv.url("/ds/zeros/zarr3/zarr.json")).json()
    meta = root["consolidated_metadata"]
    assert meta["kind"] == "inline" and set(meta["metadata"]) == set(group.keys())
    for name, doc in meta["metadata"].items():  # the same documents the levels answer themselves
        assert doc == requests.get(srv.url(f"/ds/zeros/zarr3/{name}/zarr.json")).json()


def test_xarray_reads_zeros_as_zeros_on_every_level(served):
    """Point 4: `fill_value: 0` made xarray mask every 0 voxel as NaN. The v2 view declares no fill
    value (every chunk is answered) and names each level's spatial dimensions apart, so
    xarray.open_zarr with its defaults opens the whole pyramid."""
    srv, data = served
    assert requests.get(srv.url("/ds/zeros/zarr/0/.zarray")).json()["fill_value"] is None
    ds = xr.open_zarr(srv.url("/ds/zeros/zarr"))
    levels = requests.get(srv.url("/api/datasets/zeros")).json()["levels"]
    assert sorted(ds.data_vars, key=int) == [str(i) for i in range(len(levels))]
    level0, level1 = ds["0"].values, ds["1"].values
    assert level0.dtype == np.uint16 and not np.isnan(level0.astype(float)).any()
    np.testing.assert_array_equal(level0[0, 0], data)
    np.testing.assert_array_equal(level1[0, 0], _level1(srv, "zeros", data))
    assert ds["0"].dims == ("t", "c", "z", "y", "x") and ds["1"].dims == ("t", "c", "z1", "y1", "x1")
    for i, lvl in enumerate(levels):
        assert ds[str(i)].shape[2:] == tuple(lvl["shape"])
    # zarr v3: NGFF 0.5 makes every level's dimension_names the axis names, so xarray opens one level
    # at a time (the others dropped); it keeps a v3 array's fill value out of its mask
    names = [str(i) for i in range(len(levels))]
    for name in names:
        v3 = xr.open_zarr(srv.url("/ds/zeros/zarr3"), drop_variables=[n for n in names if n != name])
        assert list(v3.data_vars) == [name] and v3[name].dims == ("t", "c", "z", "y", "x")
        assert v3[name].dtype == np.uint16 and v3[name].shape[2:] == tuple(levels[int(name)]["shape"])
        if name in ("0", "1"):
            np.testing.assert_array_equal(v3[name].values[0, 0], data if name == "0" else _level1(srv, "zeros", data))


def _translations(srv: Server, ident: str, view: str = "zarr") -> list[list[float]]:
    if view == "zarr":
        ms = requests.get(srv.url(f"/ds/{ident}/zarr/.zattrs")).json()["multiscales"][0]
    else:
        ms = requests.get(srv.url(f"/ds/{ident}/zarr3/zarr.json")).json()["attributes"]["ome"]["multiscales"][0]
    return [next(t["translation"] for t in d["coordinateTransformations"] if t["type"] == "translation")
            for d in ms["datasets"]]


@pytest.mark.parametrize("view", ["zarr", "zarr3"])
def test_a_source_translation_is_kept_on_every_level(served, view):
    """Point 6: a source's translation was served as zeros while its scale was kept."""
    srv, data = served
    shifts = _translations(srv, "shifted", view)
    # stored levels: their own translation plus the multiscale's (NGFF applies it after them)
    assert shifts[0] == [0.0, 0.0, 1.5, 10.0, -4.0]
    assert shifts[1] == [0.0, 0.0, 1.5, 10.25, -3.7]
    # computed levels: each voxel's centre is the centre of the parent voxels it averages
    ms = requests.get(srv.url("/ds/shifted/zarr/.zattrs")).json()["multiscales"][0]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    for i in range(2, len(shifts)):
        step = [round(a / b) for a, b in zip(scales[i][2:], scales[i - 1][2:])]
        expected = [t + (s - 1) / 2 * v for t, s, v in zip(shifts[i - 1][2:], step, scales[i - 1][2:])]
        np.testing.assert_allclose(shifts[i][2:], expected)
    np.testing.assert_array_equal(zarr.open_group(srv.url("/ds/shifted/zarr"), mode="r")["0"][0, 0], data)


def test_origin_zero_puts_voxel_zero_at_zero(served):
    """Point 8: a catalog switch for viewers that mis-draw an offset volume."""
    srv, _ = served
    shifts = _translations(srv, "flat")
    assert shifts[0] == [0.0] * 5
    assert shifts[1] == [0.0, 0.0, 0.0, 0.25, 0.25]  # level 1 (2 x 2 in y, x) as if box-downsampled from 0
