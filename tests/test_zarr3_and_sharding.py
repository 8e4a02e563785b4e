"""OME-Zarr 0.5 on zarr v3 (plain and sharded), sharded precomputed, compressor choice and consolidated
metadata, read over HTTP by zarr-python, tensorstore, cloud-volume, ome-zarr-py and napari-ome-zarr."""

from __future__ import annotations

import math

import crc32c
import numcodecs
import numpy as np
import pytest
import requests
import tensorstore as ts
import tifffile
import zarr
from cloudvolume import CloudVolume
from conftest import Server, Source
from ome_zarr.io import parse_url
from ome_zarr.reader import Reader
from reference import compressed_morton, downsample
from test_omezarr_clients import _assert_equal, _expected_step
from test_precomputed import _expected, _info, _tensorstore

V3_VIEWS = ["zarr3", "zarr3-sharded"]
COMPRESSORS = ["blosc", "blosc-zstd", "zstd", "gzip", "none"]
EMPTY = 2**64 - 1  # a sharding_indexed index entry for an inner chunk that is not stored


def _json(server, path: str) -> dict:
    r = requests.get(server.url(path))
    assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
    return r.json()


def _reference_pyramid(src: Source, n_levels: int) -> tuple[list[tuple[int, int, int]], list[np.ndarray]]:
    """Factors relative to level 0 and expected (t, c, z, y, x) arrays of the first n levels, from the
    source alone: native levels as written, then the documented step rule applied to the level before."""
    native = src.native or []
    levels, factors = [native[0] if native else src.data], [(1, 1, 1)]
    for i in range(1, n_levels):
        if i < len(native):
            step = tuple(round(a / b) for a, b in zip(native[i - 1].shape[2:], native[i].shape[2:]))
            levels.append(native[i])
        else:
            voxel = [v * f for v, f in zip(src.voxel_size, factors[-1])]
            step = _expected_step(levels[-1].shape[2:], voxel)
            levels.append(downsample(levels[-1], step, src.method))
        factors.append(tuple(f * s for f, s in zip(factors[-1], step)))
    return factors, levels


def _multiscale(server, ds: str, view: str = "zarr3") -> dict:
    return _json(server, f"/ds/{ds}/{view}/zarr.json")["attributes"]["ome"]["multiscales"][0]


# 1. zarr-python 3 and the zarr v3 metadata rules


@pytest.mark.parametrize("view", V3_VIEWS)
@pytest.mark.parametrize("ds", ["slices16", "ome04", "labels", "multi", "f64", "labels64"])
def test_zarr_python_reads_level_0_exactly(server, sources, ds, view):
    group = zarr.open_group(server.url(f"/ds/{ds}/{view}"), mode="r")
    assert group.metadata.zarr_format == 3
    _assert_equal(group["0"][:], sources[0][ds].data)


@pytest.mark.parametrize("view", V3_VIEWS)
def test_zarr_python_reads_every_level_of_grid(server, sources, view):
    src = sources[0]["grid"]
    group = zarr.open_group(server.url(f"/ds/grid/{view}"), mode="r")
    datasets = group.attrs["ome"]["multiscales"][0]["datasets"]
    assert len(datasets) >= 4
    factors, levels = _reference_pyramid(src, len(datasets))
    for d, f, want in zip(datasets, factors, levels):
        scale, translation = (t[k] for t, k in zip(d["coordinateTransformations"], ("scale", "translation")))
        assert scale[2:] == pytest.approx([v * n for v, n in zip(src.voxel_size, f)])
        assert translation[2:] == pytest.approx([(n - 1) / 2 * v for n, v in zip(f, src.voxel_size)])
        _assert_equal(group[d["path"]][:], want)


@pytest.mark.parametrize("view", V3_VIEWS)
def test_zarr3_metadata_follows_ngff_0_5(server, sources, view):
    src = sources[0]["grid"]
    group = _json(server, f"/ds/grid/{view}/zarr.json")
    assert (group["zarr_format"], group["node_type"]) == (3, "group")
    ome = group["attributes"]["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert "version" not in ms  # 0.5 keeps the version in ome.version only
    assert [a["name"] for a in ms["axes"]] == ["t", "c", "z", "y", "x"]
    assert len(ome["omero"]["channels"]) == 2
    for d in ms["datasets"]:
        array = _json(server, f"/ds/grid/{view}/{d['path']}/zarr.json")
        assert (array["zarr_format"], array["node_type"], array["data_type"]) == (3, "array", "uint16")
        assert array["dimension_names"] == ["t", "c", "z", "y", "x"]
        assert array["chunk_key_encoding"] == {"name": "default", "configuration": {"separator": "/"}}
        assert array["chunk_grid"]["name"] == "regular"
        assert array["fill_value"] == 0
        outer = array["chunk_grid"]["configuration"]["chunk_shape"]
        codecs = array["codecs"]
        if view == "zarr3-sharded":
            (sharding,) = codecs
            assert sharding["name"] == "sharding_indexed"
            conf = sharding["configuration"]
            inner = conf["chunk_shape"]
            assert conf["index_codecs"] == [{"name": "bytes", "configuration": {"endian": "little"}},
                                            {"name": "crc32c"}]
            assert conf["index_location"] in ("start", "end")
            assert outer[:2] == [1, 1] and inner[:2] == [1, 1]
            # a shard holds whole inner chunks, at most 4 along each spatial axis
            assert all(o % i == 0 and 1 <= o // i <= 4 for o, i in zip(outer[2:], inner[2:]))
            codecs = conf["codecs"]
        assert codecs[0] == {"name": "bytes", "configuration": {"endian": "little"}}
        assert [c["name"] for c in codecs[1:]] == ["blosc"]  # the catalog default
        assert codecs[1]["configuration"]["typesize"] == 2
    level0 = _json(server, f"/ds/grid/{view}/0/zarr.json")
    assert level0["shape"] == list(src.data.shape)
    if view == "zarr3":
        assert level0["chunk_grid"]["configuration"]["chunk_shape"] == [1, 1, 8, 16, 16]  # the catalog's chunk


def test_zarr_v2_and_v3_metadata_never_share_a_path(server):
    for path in ["zarr3/.zattrs", "zarr3/.zgroup", "zarr3/0/.zarray", "zarr3/0/.zattrs", "zarr3-sharded/.zattrs",
                 "zarr3-sharded/0/.zarray", "zarr/zarr.json", "zarr/0/zarr.json"]:
        assert requests.get(server.url(f"/ds/grid/{path}")).status_code == 404, path
    assert requests.get(server.url("/ds/grid/zarr/.zattrs")).status_code == 200
    assert requests.get(server.url("/ds/grid/zarr3/zarr.json")).status_code == 200


def test_edge_shard_index_marks_chunks_outside_the_array_as_empty(server, sources):
    """The last y/x shard of level 0 reaches past the array; its index (fetched with a suffix range, as
    zarr-python does) marks those inner chunks empty, and every stored one decodes to the padded truth."""
    data = sources[0]["grid"].data
    array = _json(server, "/ds/grid/zarr3-sharded/0/zarr.json")
    outer = array["chunk_grid"]["configuration"]["chunk_shape"]
    conf = array["codecs"][0]["configuration"]
    inner = conf["chunk_shape"]
    assert conf["index_location"] == "end"
    shard = [math.ceil(n / o) - 1 for n, o in zip(data.shape, outer)]  # the last one: channel 1, far y/x corner
    per_shard = [o // i for o, i in zip(outer, inner)]
    index_size = 16 * math.prod(per_shard) + 4
    url = server.url("/ds/grid/zarr3-sharded/0/c/" + "/".join(map(str, shard)))
    r = requests.get(url, headers={"Range": f"bytes=-{index_size}"})
    assert r.status_code == 206 and len(r.content) == index_size
    total = int(r.headers["Content-Range"].rsplit("/", 1)[1])
    index, checksum = r.content[:-4], r.content[-4:]
    assert int.from_bytes(checksum, "little") == crc32c.crc32c(index)
    entries = np.frombuffer(index, "<u8").reshape(*per_shard, 2)
    blosc = numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    stored = 0
    for pos in np.ndindex(*per_shard):
        offset, nbytes = (int(v) for v in entries[pos])
        start = [(s * o + p * i) for s, o, p, i in zip(shard, outer, pos, inner)]
        if any(a >= n for a, n in zip(start, data.shape)):
            assert offset == nbytes == EMPTY, pos
            continue
        stored += 1
        assert offset + nbytes <= total - index_size
        body = requests.get(url, headers={"Range": f"bytes={offset}-{offset + nbytes - 1}"}).content
        got = np.frombuffer(blosc.decode(body), "<u2").reshape(inner)
        want = np.zeros(inner, np.uint16)  # an edge chunk is full size, padded with the fill value
        region = data[tuple(slice(a, a + i) for a, i in zip(start, inner))]
        want[tuple(slice(0, n) for n in region.shape)] = region
        np.testing.assert_array_equal(got, want)
    assert 0 < stored < math.prod(per_shard)


# 2. tensorstore: zarr3 driver on both v3 views, neuroglancer_precomputed on the sharded view


@pytest.mark.parametrize("view", V3_VIEWS)
@pytest.mark.parametrize("ds", ["grid", "multi", "labels64"])
def test_tensorstore_zarr3_reads_every_level(server, sources, ds, view):
    src = sources[0][ds]
    n = len(_multiscale(server, ds, view)["datasets"])
    for i, want in enumerate(_reference_pyramid(src, n)[1]):
        spec = {"driver": "zarr3", "kvstore": server.url(f"/ds/{ds}/{view}/{i}/")}
        got = ts.open(spec, read=True).result().read().result()
        _assert_equal(got, want)


@pytest.mark.parametrize("ds,path,t,channels", [
    ("grid", "/ds/grid/precomputed-sharded", 0, None),
    ("grid", "/ds/grid/c/1/precomputed-sharded", 0, [1]),
    ("multi", "/ds/multi/t/1/precomputed-sharded", 1, None),
    ("labels", "/ds/labels/precomputed-sharded", 0, None),  # compressed_segmentation in shards
    ("tiled8", "/ds/tiled8/precomputed-sharded", 0, None),  # png in shards, the catalog's encoding
])
def test_tensorstore_reads_sharded_precomputed(server, sources, ds, path, t, channels):
    src = sources[0][ds]
    info = _info(server, path)
    assert info["num_channels"] == (len(channels) if channels else src.data.shape[1])
    assert info["scales"][0]["resolution"] == pytest.approx([v * 1000 for v in src.voxel_size[::-1]])
    assert all(s["sharding"]["@type"] == "neuroglancer_uint64_sharded_v1" for s in info["scales"])
    assert len(info["scales"]) >= 2
    for i, want in enumerate(_expected(src, info, t, channels)):
        _assert_equal(_tensorstore(server, path, i), want)


def test_grid_spreads_over_several_shards_and_minishards(server):
    info = _info(server, "/ds/grid/precomputed-sharded")
    scale = info["scales"][0]
    sharding = scale["sharding"]
    assert sharding["hash"] == "identity"  # so the placement below follows from the spec alone
    grid = tuple(math.ceil(n / c) for n, c in zip(scale["size"], scale["chunk_sizes"][0]))
    places = set()
    for cell in np.ndindex(*grid):
        h = compressed_morton(cell, grid) >> sharding["preshift_bits"]
        minishard = h & ((1 << sharding["minishard_bits"]) - 1)
        shard = (h >> sharding["minishard_bits"]) & ((1 << sharding["shard_bits"]) - 1)
        places.add((shard, minishard))
    shards = {s for s, _ in places}
    assert len(shards) > 1 and len(places) > len(shards)
    digits = math.ceil(sharding["shard_bits"] / 4)
    for shard in shards:
        r = requests.head(server.url(f"/ds/grid/precomputed-sharded/{scale['key']}/{shard:0{digits}x}.shard"))
        assert r.status_code == 200 and r.headers["Accept-Ranges"] == "bytes"
        assert int(r.headers["Content-Length"]) > 16 << sharding["minishard_bits"]


# 3. cloud-volume


def test_cloud_volume_reads_sharded_precomputed(server, sources):
    src = sources[0]["grid"]
    info = _info(server, "/ds/grid/precomputed-sharded")
    url = f"precomputed://{server.url('/ds/grid/precomputed-sharded')}"
    for mip, want in enumerate(_expected(src, info)):
        vol = CloudVolume(url, mip=mip, progress=False, cache=False, fill_missing=False)
        assert vol.image.is_sharded(mip)
        _assert_equal(np.asarray(vol[:, :, :]), want)


# 4. ome-zarr-py and napari-ome-zarr on /zarr3/


@pytest.mark.parametrize("ds", ["grid", "ome04"])
def test_ome_zarr_py_reads_every_level_of_zarr3(server, sources, ds):
    src = sources[0][ds]
    n = len(_multiscale(server, ds)["datasets"])
    factors, levels = _reference_pyramid(src, n)
    image = list(Reader(parse_url(server.url(f"/ds/{ds}/zarr3")))())[0]
    assert [tuple(level.shape) for level in image.data] == [want.shape for want in levels]
    for transforms, f in zip(image.metadata["coordinateTransformations"], factors):
        assert transforms[0]["scale"][2:] == pytest.approx([v * n for v, n in zip(src.voxel_size, f)])
    assert [a["name"] for a in image.metadata["axes"]] == ["t", "c", "z", "y", "x"]
    _assert_equal(np.asarray(image.data[0]), src.data)
    _assert_equal(np.asarray(image.data[-1]), levels[-1])


@pytest.mark.parametrize("ds", ["grid", "multi"])
def test_napari_ome_zarr_reads_zarr3(server, sources, ds):
    from napari_ome_zarr import napari_get_reader

    src = sources[0][ds]
    url = server.url(f"/ds/{ds}/zarr3")
    (data, kwargs, kind), = napari_get_reader(url)(url)
    n = len(_multiscale(server, ds)["datasets"])
    factors, levels = _reference_pyramid(src, n)
    assert kind == "image" and kwargs["channel_axis"] == 1
    assert kwargs["scale"][1:] == pytest.approx(src.voxel_size)  # z, y, x after the channel axis is split off
    assert kwargs["axis_labels"] == ("t", "z", "y", "x")
    assert len(kwargs["contrast_limits"]) == src.data.shape[1]
    assert [tuple(level.shape) for level in data] == [want.shape for want in levels]
    # napari derives each level's scale from level 0's and the shape ratio; it must match the pyramid's factors
    for level, f in zip(data, factors):
        ratio = [a / b for a, b in zip(data[0].shape[2:], level.shape[2:])]
        assert ratio == pytest.approx(f, rel=0.1)
    _assert_equal(np.asarray(data[-1]), levels[-1])
    _assert_equal(np.asarray(data[0][:, :, 4]), src.data[:, :, 4])


# 5. Compressor per URL and per catalog entry


def _v2_compressor(conf: dict | None) -> str:
    if conf is None:
        return "none"
    if conf["id"] == "blosc":
        return {"lz4": "blosc", "zstd": "blosc-zstd"}[conf["cname"]]
    return conf["id"]


def _v3_compressor(codecs: list[dict]) -> str:
    assert codecs[0]["name"] == "bytes"
    if len(codecs) == 1:
        return "none"
    (codec,) = codecs[1:]
    if codec["name"] == "blosc":
        assert codec["configuration"]["shuffle"] in ("noshuffle", "shuffle", "bitshuffle")
        return {"lz4": "blosc", "zstd": "blosc-zstd"}[codec["configuration"]["cname"]]
    assert codec["name"] in ("zstd", "gzip")
    return codec["name"]


@pytest.mark.parametrize("name", COMPRESSORS)
def test_compressor_in_the_url(server, sources, name):
    src = sources[0]["slices16"]
    zarray = _json(server, f"/ds/slices16/zarr-{name}/0/.zarray")
    assert _v2_compressor(zarray["compressor"]) == name and zarray["filters"] is None
    assert _v3_compressor(_json(server, f"/ds/slices16/zarr3-{name}/0/zarr.json")["codecs"]) == name
    sharded = _json(server, f"/ds/slices16/zarr3-sharded-{name}/0/zarr.json")["codecs"][0]["configuration"]
    assert _v3_compressor(sharded["codecs"]) == name
    for view in (f"zarr-{name}", f"zarr3-{name}", f"zarr3-sharded-{name}"):
        _assert_equal(zarr.open_group(server.url(f"/ds/slices16/{view}"), mode="r")["0"][:], src.data)


def test_unknown_compressor_is_a_404_naming_the_choices(server):
    for path in ["zarr-lzma/.zarray", "zarr3-lzma/zarr.json", "zarr3-sharded-lzma/zarr.json"]:
        r = requests.get(server.url(f"/ds/grid/{path}"))
        assert r.status_code == 404, path
        body = r.text.strip()
        assert len(body.splitlines()) == 1 and body.endswith(".") and body.count(". ") == 0, body
        assert "lzma" in body and all(name in body for name in COMPRESSORS), body


@pytest.fixture(scope="module")
def zstd_server(tmp_path_factory):
    """A second server whose only dataset says `compression = "zstd"` in the catalog."""
    root = tmp_path_factory.mktemp("zstd")
    data = np.random.default_rng(11).integers(0, 4000, (14, 70, 90), np.uint16)
    tifffile.imwrite(root / "vol.tif", data, photometric="minisblack")
    catalog = root / "catalog.toml"
    catalog.write_text('[[datasets]]\nid = "vol"\npath = "vol.tif"\nvoxel_size = [1.0, 0.5, 0.5]\n'
                       'compression = "zstd"\n')
    srv = Server(catalog)
    yield srv, data
    srv.stop()


def test_catalog_compression_is_the_default(zstd_server):
    srv, data = zstd_server
    zarray = _json(srv, "/ds/vol/zarr/0/.zarray")
    assert zarray["compressor"]["id"] == "zstd"
    assert _v3_compressor(_json(srv, "/ds/vol/zarr3/0/zarr.json")["codecs"]) == "zstd"
    sharded = _json(srv, "/ds/vol/zarr3-sharded/0/zarr.json")["codecs"][0]["configuration"]
    assert _v3_compressor(sharded["codecs"]) == "zstd"
    assert _v2_compressor(_json(srv, "/ds/vol/zarr-blosc/0/.zarray")["compressor"]) == "blosc"  # the URL wins
    for view in ("zarr", "zarr3", "zarr3-sharded"):
        _assert_equal(zarr.open_group(srv.url(f"/ds/vol/{view}"), mode="r")["0"][:], data[None, None])
    assert srv.alive()


# 6. Consolidated metadata of the v2 view


@pytest.mark.parametrize("ds", ["grid", "ome04"])
def test_zmetadata_matches_every_key(server, sources, ds):
    consolidated = _json(server, f"/ds/{ds}/zarr/.zmetadata")
    assert set(consolidated) == {"zarr_consolidated_format", "metadata"}
    assert consolidated["zarr_consolidated_format"] == 1
    metadata = consolidated["metadata"]
    paths = [d["path"] for d in _json(server, f"/ds/{ds}/zarr/.zattrs")["multiscales"][0]["datasets"]]
    assert len(paths) >= 2
    assert set(metadata) == {".zgroup", ".zattrs"} | {f"{p}/{k}" for p in paths for k in (".zarray", ".zattrs")}
    for key, doc in metadata.items():
        assert doc == _json(server, f"/ds/{ds}/zarr/{key}"), key
    group = zarr.open_consolidated(server.url(f"/ds/{ds}/zarr"), mode="r")
    assert group.metadata.consolidated_metadata is not None
    assert sorted(group.metadata.consolidated_metadata.metadata) == sorted(paths)
    _assert_equal(group[paths[0]][:], sources[0][ds].data)


# 7. Links


def test_links_include_the_new_views(server):
    links = _json(server, "/api/datasets/grid")["links"]
    for name in ("zarr3", "zarr3-sharded", "precomputed-sharded"):
        assert links[name] == server.url(f"/ds/grid/{name}")
    for name in ("zarr3", "zarr3-sharded"):
        r = requests.get(links[name] + "/zarr.json")
        assert r.status_code == 200 and r.json()["node_type"] == "group"
    r = requests.get(links["precomputed-sharded"] + "/info")
    assert r.status_code == 200 and "sharding" in r.json()["scales"][0]
