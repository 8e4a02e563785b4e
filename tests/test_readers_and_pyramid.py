"""Readers touch only what a region needs; the pyramid plans, reduces and exposes levels as dask arrays."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import numpy as np
import pytest
import tifffile
import zarr
from reference import downsample_mean, downsample_mode

from bil_transform.cache import Cache
from bil_transform.catalog import DatasetSpec
from bil_transform.dataset import Dataset
from bil_transform.demo import DEMO_VOXEL, make_demo
from bil_transform.pyramid.downsample import mean, mode
from bil_transform.readers import SourceError, open_source


class Counter:
    """Counts constructions of tifffile.TiffFile (file opens) and TiffPage.decode calls (segments decoded)."""

    def __init__(self, monkeypatch):
        self.opens, self.decodes = [], 0
        original_init = tifffile.TiffFile.__init__
        make_decoder = tifffile.TiffPage.__dict__["decode"].func  # a cached_property returning the decoder
        counter = self

        def init(self, arg, *a, **k):
            counter.opens.append(str(arg))
            original_init(self, arg, *a, **k)

        def decoder(self):
            decode = make_decoder(self)

            def counted(*a, **k):
                counter.decodes += 1
                return decode(*a, **k)

            return counted

        monkeypatch.setattr(tifffile.TiffFile, "__init__", init)
        monkeypatch.setattr(tifffile.TiffPage, "decode", property(decoder))


def test_slice_stack_opens_one_header_then_only_the_slices_a_block_spans(tmp_path, monkeypatch):
    for z in range(300):
        tifffile.imwrite(tmp_path / f"s{z}.tif", np.full((20, 30), z, np.uint16))
    count = Counter(monkeypatch)
    reader = open_source(tmp_path)
    assert len(count.opens) == 1  # the dataset opens by reading one slice's header
    assert reader.volume.shape == (1, 1, 300, 20, 30)
    count.opens.clear()
    block = reader.read(0, 0, 0, (slice(100, 164), slice(0, 20), slice(0, 30)))
    assert sorted(count.opens) == sorted(str(tmp_path / f"s{z}.tif") for z in range(100, 164))
    np.testing.assert_array_equal(block[:, 0, 0], np.arange(100, 164))


def test_natural_sort_order(tmp_path):
    for z in range(1, 13):
        tifffile.imwrite(tmp_path / f"img_{z}.tif", np.full((4, 4), z, np.uint8))
    reader = open_source(tmp_path)
    got = reader.read(0, 0, 0, (slice(0, 12), slice(0, 1), slice(0, 1)))[:, 0, 0]
    assert list(got) == list(range(1, 13))  # img_2 before img_10


def test_glob_selects_slices_and_checks_each_one(tmp_path):
    for z in range(12):
        tifffile.imwrite(tmp_path / f"ch1_z{z}.tif", np.full((6, 5), z, np.uint8))
        tifffile.imwrite(tmp_path / f"ch2_z{z}.tif", np.full((6, 5), 100 + z, np.uint8))
    reader = open_source(tmp_path / "ch2_z*.tif")
    assert reader.volume.shape == (1, 1, 12, 6, 5)
    np.testing.assert_array_equal(reader.read(0, 0, 0, (slice(0, 4), slice(0, 1), slice(0, 1)))[:, 0, 0],
                                  100 + np.arange(4))
    tifffile.imwrite(tmp_path / "ch2_z5.tif", np.zeros((6, 5), np.uint16))  # not yet touched by a read
    with pytest.raises(SourceError, match=r"ch2_z5\.tif: slice is 6x5x1 uint16, the stack is 6x5x1 uint8"):
        reader.read(0, 0, 0, (slice(4, 6), slice(0, 6), slice(0, 5)))


def test_tiled_file_decodes_only_overlapping_tiles(tmp_path, monkeypatch):
    data = np.random.default_rng(1).integers(0, 255, (5, 256, 256), np.uint8)
    tifffile.imwrite(tmp_path / "t.tif", data, tile=(64, 64), compression="zlib", photometric="minisblack")
    reader = open_source(tmp_path / "t.tif")
    count = Counter(monkeypatch)
    region = (slice(1, 3), slice(70, 130), slice(10, 60))  # tile rows 1-2, tile column 0, two pages
    np.testing.assert_array_equal(reader.read(0, 0, 0, region), data[region])
    assert count.decodes == 2 * 2 * 1


def test_strip_file_decodes_only_overlapping_strips(tmp_path, monkeypatch):
    data = np.random.default_rng(2).integers(0, 60000, (3, 100, 40), np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", data, rowsperstrip=10, compression="zlib", photometric="minisblack")
    reader = open_source(tmp_path / "s.tif")
    count = Counter(monkeypatch)
    region = (slice(2, 3), slice(15, 35), slice(0, 40))  # strips 1, 2, 3 of the last page
    np.testing.assert_array_equal(reader.read(0, 0, 0, region), data[region])
    assert count.decodes == 3


def test_compressed_plane_is_decoded_once_for_many_regions(tmp_path, monkeypatch):
    data = np.random.default_rng(7).integers(0, 255, (1, 256, 256), np.uint8)
    tifffile.imwrite(tmp_path / "z.tif", data, rowsperstrip=256, compression="zlib", photometric="minisblack")
    reader = open_source(tmp_path / "z.tif", Cache(2**20).section("segments"))
    count = Counter(monkeypatch)
    for y, x in [(0, 0), (0, 128), (128, 0), (128, 128)]:
        region = (slice(0, 1), slice(y, y + 128), slice(x, x + 128))
        np.testing.assert_array_equal(reader.read(0, 0, 0, region), data[region])
    assert count.decodes == 1


def test_uncompressed_plane_reads_only_the_rows_a_region_needs(tmp_path, monkeypatch):
    data = np.random.default_rng(6).integers(0, 60000, (2, 1000, 500), np.uint16)
    tifffile.imwrite(tmp_path / "u.tif", data, photometric="minisblack")  # one strip per plane
    reader = open_source(tmp_path / "u.tif")
    region = (slice(1, 2), slice(100, 164), slice(200, 264))
    np.testing.assert_array_equal(reader.read(0, 0, 0, region), data[region])  # opens the thread's handle
    read_sizes = []
    original = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, offset: read_sizes.append(n) or original(fd, n, offset))
    np.testing.assert_array_equal(reader.read(0, 0, 0, region), data[region])
    assert read_sizes == [64 * 500 * 2]  # 64 whole rows, not the 1 MB plane


def test_unsupported_paths_say_why(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="not a supported source"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.uint32, np.float32])
@pytest.mark.parametrize("shape", [(8, 8, 8), (5, 7, 9), (1, 3, 2)])
def test_mean_matches_reference_and_never_overflows(dtype, shape):
    rng = np.random.default_rng(3)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    block = (rng.integers(info.min, info.max, shape, endpoint=True).astype(dtype) if info
             else rng.normal(0, 1000, shape).astype(dtype))
    if info:
        block[:2] = info.max  # sums of maxima must not wrap
    for factors in [(2, 2, 2), (1, 2, 2)]:
        got, want = mean(block, factors), downsample_mean(block, factors)
        if info:
            np.testing.assert_array_equal(got, want)
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_mode_matches_reference_with_ties_and_edges():
    rng = np.random.default_rng(4)
    block = rng.integers(0, 3, (7, 9, 5)).astype(np.uint64) * 2**40
    for factors in [(2, 2, 2), (1, 2, 2)]:
        np.testing.assert_array_equal(mode(block, factors), downsample_mode(block, factors))
    tie = np.array([5, 3, 3, 5, 7, 7, 9, 9], np.uint32).reshape(2, 2, 2)
    assert mode(tie, (2, 2, 2)).item() == 3  # four values tie at two each: the smallest wins


def _dataset(path, **spec) -> Dataset:
    ds = Dataset(DatasetSpec(id="d", path=str(path), **spec), Cache(2**28))
    assert ds.error is None, ds.error
    return ds


def test_anisotropic_levels_keep_z_until_xy_catch_up(tmp_path):
    tifffile.imwrite(tmp_path / "a.tif", np.zeros((100, 600, 500), np.uint8), photometric="minisblack")
    levels = _dataset(tmp_path / "a.tif", voxel_size=(5.0, 1.0, 1.0)).pyramid.levels
    factors = [lvl.factors for lvl in levels]
    # x/y voxel 1, 2, 4, 8: z (5 um) halves only once x/y reach 8 um, i.e. from the fourth step
    assert factors[:5] == [(1, 1, 1), (1, 2, 2), (1, 4, 4), (1, 8, 8), (2, 16, 16)]
    assert all(s <= 64 for s in levels[-1].shape) and any(s > 64 for s in levels[-2].shape)


def test_levels_as_dask_arrays_are_lazy_and_exact(tmp_path):
    data = np.random.default_rng(5).integers(0, 4000, (70, 90, 130), np.uint16)
    tifffile.imwrite(tmp_path / "v.tif", data, photometric="minisblack")
    ds = _dataset(tmp_path / "v.tif")
    level1 = ds.pyramid.dask_array(1)
    assert level1.shape == (1, 1, 35, 45, 65) and level1.dtype == np.uint16
    window = level1[0, 0, 3:30, 10:44, 60:65].compute()
    np.testing.assert_array_equal(window, downsample_mean(data, (2, 2, 2))[3:30, 10:44, 60:65])
    np.testing.assert_array_equal(ds.pyramid.dask_array(0).compute()[0, 0], data)


def test_concurrent_requests_for_one_block_compute_it_once(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", np.ones((64, 64, 64), np.uint8), photometric="minisblack")
    ds = _dataset(tmp_path / "v.tif")
    calls = []
    original = ds.pyramid.reader.read

    def slow_read(*a):
        calls.append(a)
        threading.Event().wait(0.2)
        return original(*a)

    ds.pyramid.reader.read = slow_read
    threads = [threading.Thread(target=ds.pyramid.block, args=(0, 0, 0, (0, 0, 0))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert ds.pyramid.blocks.stats()["misses"] == 1 and ds.pyramid.blocks.stats()["hits"] == 0


def test_cache_stays_within_its_byte_budget():
    cache = Cache(1000)
    for i in range(50):
        cache.section("a" if i % 2 else "b").get_or_compute(i, lambda: b"x" * 100)
    stats = cache.stats()["all"]
    assert stats["bytes"] <= 1000 and stats["entries"] == 10 and stats["evictions"] == 40


def test_demo_data_carries_its_voxel_size(tmp_path):
    path = make_demo(tmp_path, shape=(8, 96, 80))
    reader = open_source(path)
    assert reader.volume.shape == (1, 1, 8, 96, 80) and reader.volume.dtype == np.uint16
    assert reader.volume.voxel_size == pytest.approx(DEMO_VOXEL)
    assert reader.read(0, 0, 0, (slice(4, 5), slice(0, 96), slice(0, 80))).std() > 0


def test_info_command_prints_what_the_reader_sees(tmp_path):
    tifffile.imwrite(tmp_path / "v.tif", np.zeros((3, 70, 80), np.uint16), photometric="minisblack")
    run = subprocess.run([sys.executable, "-m", "bil_transform", "info", str(tmp_path / "v.tif")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0
    assert "format:        tiff" in run.stdout and "(1, 1, 3, 70, 80)" in run.stdout and "uint16" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "bil_transform", "info", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no such file" in bad.stderr


def test_a_sharded_zarr_source_reads_exactly_through_byte_ranges(tmp_path):
    data = np.random.default_rng(3).integers(0, 60000, (20, 70, 90), dtype=np.uint16)
    arr = zarr.create_array(tmp_path / "sharded.zarr", shape=data.shape, chunks=(8, 16, 16), shards=(16, 32, 32),
                            dtype="uint16")
    arr[:] = data
    reader = open_source(tmp_path / "sharded.zarr")
    region = (slice(3, 19), slice(5, 66), slice(0, 90))
    assert np.array_equal(reader.read(0, 0, 0, region), data[region])
