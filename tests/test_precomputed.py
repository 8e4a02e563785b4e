"""The precomputed view read over HTTP by tensorstore and cloud-volume, against independent references."""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
import pytest
import requests
import tensorstore as ts
from cloudvolume import CloudVolume
from PIL import Image
from reference import reference_levels


def _info(server, path: str) -> dict:
    return requests.get(server.url(f"{path}/info")).json()


def _expected(src, info: dict, t: int = 0, channels=None) -> list[np.ndarray]:
    """Expected [x, y, z, c] arrays per scale, from the scales' resolutions and the source voxels."""
    res0 = info["scales"][0]["resolution"]
    factors = [tuple(round(r / r0) for r, r0 in zip(s["resolution"][::-1], res0[::-1])) for s in info["scales"]]
    levels = reference_levels(src.data, factors, src.method, src.native)
    picked = [lvl[t] if channels is None else lvl[t, channels] for lvl in levels]
    return [lvl.transpose(3, 2, 1, 0) for lvl in picked]


def _tensorstore(server, path: str, scale: int) -> np.ndarray:
    spec = {"driver": "neuroglancer_precomputed", "kvstore": server.url(f"{path}/"), "scale_index": scale}
    return ts.open(spec, read=True).result().read().result()


def _assert_equal(got, want):
    assert got.shape == want.shape
    if np.issubdtype(want.dtype, np.floating):
        np.testing.assert_allclose(got, want, rtol=1e-6)
    else:
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("ds", ["slices16", "tiled8", "ome04", "pyramid", "labels", "labels64", "float32"])
def test_tensorstore_reads_every_scale(server, sources, ds):
    src = sources[0][ds]
    info = _info(server, f"/ds/{ds}/precomputed")
    assert info["scales"][0]["resolution"] == pytest.approx([v * 1000 for v in src.voxel_size[::-1]])
    assert info["num_channels"] == src.data.shape[1]
    for i, want in enumerate(_expected(src, info)):
        got = _tensorstore(server, f"/ds/{ds}/precomputed", i)
        assert list(got.shape[:3]) == info["scales"][i]["size"]
        _assert_equal(got, want.astype(got.dtype))


@pytest.mark.parametrize("ds", ["slices16", "labels", "labels64", "ome04"])
def test_cloud_volume_reads_every_mip(server, sources, ds):
    src = sources[0][ds]
    url = f"precomputed://{server.url(f'/ds/{ds}/precomputed')}"
    info = _info(server, f"/ds/{ds}/precomputed")
    for mip, want in enumerate(_expected(src, info)):
        vol = CloudVolume(url, mip=mip, progress=False, cache=False, fill_missing=False)
        _assert_equal(np.asarray(vol[:, :, :]), want)


def test_labels_are_segmentation_in_compressed_segmentation(server, sources):
    info = _info(server, "/ds/labels/precomputed")
    assert info["type"] == "segmentation" and info["data_type"] == "uint32"
    assert all(s["encoding"] == "compressed_segmentation" for s in info["scales"])
    assert all(s["compressed_segmentation_block_size"] == [8, 8, 8] for s in info["scales"])
    raw = _tensorstore(server, "/ds/labels/precomputed-raw", 0)
    np.testing.assert_array_equal(raw[..., 0], sources[0]["labels"].data[0, 0].T)


def test_chunk_names_and_clipped_edge_chunks(server, sources):
    src = sources[0]["multi"]  # 2 t, 3 c, 20 x 70 x 50 (z, y, x) uint8
    info = _info(server, "/ds/multi/precomputed")
    scale = info["scales"][0]
    cx, cy, cz = scale["chunk_sizes"][0]
    x, y, z = scale["size"]
    gx, gy, gz = (-(-n // c) for n, c in zip((x, y, z), (cx, cy, cz)))
    x0, y0, z0 = (gx - 1) * cx, (gy - 1) * cy, (gz - 1) * cz
    name = f"{scale['key']}/{x0}-{x}_{y0}-{y}_{z0}-{z}"
    r = requests.get(server.url(f"/ds/multi/precomputed/{name}"), headers={"Accept-Encoding": "identity"})
    assert r.status_code == 200
    assert len(r.content) == (x - x0) * (y - y0) * (z - z0) * 3  # clipped, three uint8 channels
    chunk = np.frombuffer(r.content, np.uint8).reshape(3, z - z0, y - y0, x - x0)  # = Fortran [x, y, z, c]
    np.testing.assert_array_equal(chunk, src.data[0, :, z0:z, y0:y, x0:x])
    # past the grid, or not on it: 404; malformed: 400
    assert requests.get(server.url(f"/ds/multi/precomputed/0/{x}-{x + cx}_0-{cy}_0-{cz}")).status_code == 404
    assert requests.get(server.url(f"/ds/multi/precomputed/0/1-{cx + 1}_0-{cy}_0-{cz}")).status_code == 404
    assert requests.get(server.url("/ds/multi/precomputed/0/garbage")).status_code == 400


def test_all_zero_in_bounds_chunks_are_served(server):
    # cloud-volume fails on a 404 for an in-bounds chunk, so even empty chunks must be 200
    info = _info(server, "/ds/f64/precomputed")
    x, y, z = info["scales"][0]["size"]
    assert requests.get(server.url(f"/ds/f64/precomputed/0/0-{x}_0-{y}_0-{z}")).status_code == 200


def test_raw_is_gzip_encoded_when_accepted(server):
    url = server.url("/ds/slices16/precomputed/info")
    scale = requests.get(url).json()["scales"][0]
    cx, cy, cz = scale["chunk_sizes"][0]
    chunk = server.url(f"/ds/slices16/precomputed/0/0-{cx}_0-{cy}_0-{cz}")
    zipped = requests.get(chunk, headers={"Accept-Encoding": "gzip"})
    plain = requests.get(chunk, headers={"Accept-Encoding": "identity"})
    assert zipped.headers["Content-Encoding"] == "gzip" and zipped.content == plain.content
    assert int(zipped.headers["Content-Length"]) < len(plain.content)


def test_channels_and_time_points_as_their_own_sources(server, sources):
    src = sources[0]["multi"]
    for path, t, channels, n in [("/ds/multi/precomputed", 0, None, 3),
                                 ("/ds/multi/t/1/precomputed", 1, None, 3),
                                 ("/ds/multi/c/2/precomputed", 0, [2], 1),
                                 ("/ds/multi/t/1/c/0/precomputed", 1, [0], 1)]:
        info = _info(server, path)
        assert info["num_channels"] == n
        for i, want in enumerate(_expected(src, info, t, channels)):
            _assert_equal(_tensorstore(server, path, i), want)
    assert requests.get(server.url("/ds/multi/t/2/precomputed/info")).status_code == 404
    assert requests.get(server.url("/ds/multi/c/3/precomputed/info")).status_code == 404


def test_catalog_encoding_is_the_default_view(server):
    # tiled8's catalog entry says encoding = "png": the plain view, the API and the index agree
    assert _info(server, "/ds/tiled8/precomputed")["scales"][0]["encoding"] == "png"
    assert requests.get(server.url("/api/datasets/tiled8")).json()["precomputed"]["encoding"] == "png"
    index = requests.get(server.url("/")).text
    assert f"precomputed://{server.base}/ds/tiled8/precomputed</code> (png)" in index


def test_png_is_exact(server, sources):
    for ds in ("slices16", "tiled8"):
        info = _info(server, f"/ds/{ds}/precomputed-png")
        assert info["scales"][0]["encoding"] == "png"
        for i, want in enumerate(_expected(sources[0][ds], info)):
            _assert_equal(_tensorstore(server, f"/ds/{ds}/precomputed-png", i), want)


def _pillow_jpeg_round_trip(a: np.ndarray) -> np.ndarray:
    """[x, y, z, c] uint8 through Pillow's JPEG encoder at the server's settings (quality 90, 4:4:4)."""
    x, y, z, c = a.shape
    rows = np.ascontiguousarray(a.transpose(2, 1, 0, 3).reshape(z * y, x, c))
    image = Image.fromarray(rows[..., 0] if c == 1 else rows)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90, subsampling=0)
    return np.asarray(Image.open(buf)).reshape(z, y, x, c).transpose(2, 1, 0, 3)


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((a.astype(np.float64) - b) ** 2)))


@pytest.mark.parametrize("ds", ["tiled8", "multi"])
def test_jpeg_is_within_lossy_tolerance(server, sources, ds):
    """The error is what an independent JPEG encoder at the same quality makes, not more."""
    info = _info(server, f"/ds/{ds}/precomputed-jpeg")
    assert info["scales"][0]["encoding"] == "jpeg"
    for i, want in enumerate(_expected(sources[0][ds], info)):
        got = _tensorstore(server, f"/ds/{ds}/precomputed-jpeg", i)
        assert _rmse(got, want) <= 1.2 * _rmse(_pillow_jpeg_round_trip(want), want) + 0.5


def test_jpeg_chunk_is_a_jpeg_of_x_by_y_times_z(server, sources):
    info = _info(server, "/ds/tiled8/precomputed-jpeg")
    cx, cy, cz = info["scales"][0]["chunk_sizes"][0]
    body = requests.get(server.url(f"/ds/tiled8/precomputed-jpeg/0/0-{cx}_0-{cy}_0-{cz}")).content
    assert imagecodecs.jpeg8_decode(body).shape == (cy * cz, cx)


def test_unsupported_encodings_are_refused(server):
    r = requests.get(server.url("/ds/slices16/precomputed-jpeg/info"))  # uint16 cannot be JPEG
    assert r.status_code == 400 and "jpeg" in r.text and "raw" in r.text
    assert requests.get(server.url("/ds/slices16/precomputed-webp/info")).status_code == 404


def test_float64_is_served_as_float32_and_said_so(server, sources):
    info = _info(server, "/ds/f64/precomputed")
    assert info["data_type"] == "float32"
    described = requests.get(server.url("/api/datasets/f64")).json()
    assert described["dtype"] == "float64" and described["precomputed"]["data_type"] == "float32"
    for i, want in enumerate(_expected(sources[0]["f64"], info)):
        _assert_equal(_tensorstore(server, "/ds/f64/precomputed", i), want.astype(np.float32))


def test_links_list_every_view(server):
    links = requests.get(server.url("/api/datasets/multi")).json()["links"]
    assert links["precomputed"] == server.url("/ds/multi/precomputed")
    assert {"precomputed-raw", "precomputed-jpeg", "precomputed-png"} <= set(links)
    assert "precomputed-compressed_segmentation" not in links
    assert links["precomputed_c"].format(c=2) == server.url("/ds/multi/c/2/precomputed")
    assert links["precomputed_t"].format(t=1) == server.url("/ds/multi/t/1/precomputed")
    assert links["neuroglancer"].startswith("https://") and "precomputed%3A%2F%2F" in links["neuroglancer"]
    for name in ("precomputed", "precomputed-jpeg", "zarr"):
        assert requests.get(links[name] + ("/info" if "precomputed" in name else "/.zattrs")).status_code == 200


def test_index_page_has_thumbnails_and_viewer_links(server):
    page = requests.get(server.url("/")).text
    assert "open in Neuroglancer" in page and "/ds/slices16/thumbnail.png" in page
    png = requests.get(server.url("/ds/slices16/thumbnail.png"))
    assert png.status_code == 200 and png.headers["Content-Type"] == "image/png"
    image = imagecodecs.png_decode(png.content)
    assert image.ndim == 3 and image.shape[2] == 3 and image.std() > 0
    labels = imagecodecs.png_decode(requests.get(server.url("/ds/labels/thumbnail.png")).content)
    assert image.std() > 0 and labels.shape[2] == 3
