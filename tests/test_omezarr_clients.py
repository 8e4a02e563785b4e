"""The OME-Zarr 0.4 view read over HTTP by zarr-python, ome-zarr-py and ome-zarr-models."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from reference import downsample

DATASETS = ["slices16", "tiled8", "float32", "ome04", "ome05", "labels", "pyramid", "multi", "f64"]


def _assert_equal(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    if np.issubdtype(want.dtype, np.floating):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


def _expected_step(prev_shape, prev_voxel) -> tuple[int, int, int]:
    """The documented rule: x and y halve; z halves once its voxel is no coarser than x/y's."""
    z, y, x = prev_shape
    vz, vy, vx = prev_voxel
    return (2 if z > 1 and vz <= max(vy, vx) else 1, 2 if y > 1 else 1, 2 if x > 1 else 1)


@pytest.mark.parametrize("ds", DATASETS)
def test_zarr_python_reads_every_level(server, sources, ds):
    src = sources[0][ds]
    group = zarr.open_group(server.url(f"/ds/{ds}/zarr"), mode="r")
    ms = group.attrs["multiscales"][0]
    assert ms["version"] == "0.4"
    assert [a["name"] for a in ms["axes"]] == ["t", "c", "z", "y", "x"]
    scales = [d["coordinateTransformations"][0]["scale"] for d in ms["datasets"]]
    assert scales[0][2:] == pytest.approx(src.voxel_size)

    expected = src.data
    prev_factors = (1, 1, 1)
    for i, d in enumerate(ms["datasets"]):
        array = group[d["path"]]
        factors = tuple(round(s / b) for s, b in zip(scales[i][2:], scales[0][2:]))
        assert scales[i][2:] == pytest.approx([v * f for v, f in zip(src.voxel_size, factors)])
        translation = d["coordinateTransformations"][1]["translation"]
        assert translation[2:] == pytest.approx([(f - 1) / 2 * v for f, v in zip(factors, src.voxel_size)])
        if src.native and i < len(src.native):
            expected = src.native[i]  # native levels are served as stored
        elif i > 0:
            step = tuple(f // p for f, p in zip(factors, prev_factors))
            prev_voxel = [v * p for v, p in zip(src.voxel_size, prev_factors)]
            assert step == _expected_step(expected.shape[2:], prev_voxel)
            expected = downsample(expected, step, src.method)
        _assert_equal(array[:], expected)
        prev_factors = factors
    # the coarsest level is one chunk; the one before it is not
    assert all(s <= c for s, c in zip(array.shape[2:], array.chunks[2:]))
    if len(ms["datasets"]) > 1:
        before = group[ms["datasets"][-2]["path"]]
        assert any(s > c for s, c in zip(before.shape[2:], before.chunks[2:])) or src.native


@pytest.mark.parametrize("ds", ["slices16", "ome04"])
def test_zarr_python_reads_regions_across_chunks(server, sources, ds):
    src = sources[0][ds]
    array = zarr.open_group(server.url(f"/ds/{ds}/zarr"), mode="r")["0"]
    region = (0, slice(None), slice(3, 30), slice(60, 129), slice(5, 101))
    _assert_equal(array[region], src.data[region])


@pytest.mark.parametrize("ds", ["slices16", "ome04", "pyramid"])
def test_ome_zarr_py_reader(server, sources, ds):
    src = sources[0][ds]
    nodes = list(Reader(parse_url(server.url(f"/ds/{ds}/zarr")))())
    image = nodes[0]
    group = zarr.open_group(server.url(f"/ds/{ds}/zarr"), mode="r")
    paths = [d["path"] for d in group.attrs["multiscales"][0]["datasets"]]
    assert [tuple(level.shape) for level in image.data] == [group[p].shape for p in paths]
    _assert_equal(np.asarray(image.data[0]), src.data)
    # napari's contrast limits come from omero window start/end, one pair per channel
    limits = image.metadata["contrast_limits"]
    assert len(limits) == src.data.shape[1]
    assert all(lo < hi for lo, hi in limits)
    assert [a["name"] for a in image.metadata["axes"]] == ["t", "c", "z", "y", "x"]


@pytest.mark.parametrize("ds", DATASETS)
def test_metadata_validates_with_ome_zarr_models(server, ds):
    from ome_zarr_models.v04 import Image

    image = Image.from_zarr(zarr.open_group(server.url(f"/ds/{ds}/zarr"), mode="r"))
    assert image.attributes.multiscales[0].axes[2].unit == "micrometer"


def test_omero_channels_follow_the_source(server, sources):
    omero = zarr.open_group(server.url("/ds/ome04/zarr"), mode="r").attrs["omero"]
    assert len(omero["channels"]) == 2
    for ch in omero["channels"]:
        assert len(ch["color"]) == 6 and int(ch["color"], 16) >= 0
        w = ch["window"]
        assert w["min"] <= w["start"] < w["end"] <= w["max"]


@pytest.mark.parametrize("ds", ["slices16", "ome04"])
def test_napari_ome_zarr_reader(server, sources, ds):
    from napari_ome_zarr import napari_get_reader

    src = sources[0][ds]
    url = server.url(f"/ds/{ds}/zarr")
    (data, kwargs, kind), = napari_get_reader(url)(url)
    assert kind == "image" and kwargs["channel_axis"] == 1
    assert kwargs["scale"][1:] == pytest.approx(src.voxel_size)  # z, y, x after the channel axis is split off
    assert len(kwargs["contrast_limits"]) == src.data.shape[1]
    assert data[0].shape == src.data.shape and len(data) >= 2
    _assert_equal(np.asarray(data[-1]), zarr.open_group(url, mode="r")[str(len(data) - 1)][:])
    _assert_equal(np.asarray(data[0][0, :, 5]), src.data[0, :, 5])
