"""Shared fixtures: source files written by independent libraries, and the real server on loopback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import tifffile
import zarr


@dataclass
class Source:
    """What a test knows about a dataset independently of the server: the voxels it wrote."""

    id: str
    data: np.ndarray  # (t, c, z, y, x) level 0 as written
    voxel_size: tuple[float, float, float]
    method: str = "mean"
    native: list[np.ndarray] | None = None  # (t, c, z, y, x) native levels as written, level 0 first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], hi: float) -> np.ndarray:
    """Smooth structure plus noise, so downsampling has something to average."""
    grids = np.meshgrid(*[np.linspace(0, 6, n) for n in shape], indexing="ij")
    smooth = np.sin(grids[0] * 0.7 + grids[1]) * np.cos(grids[-1] * 1.3) + 1
    return smooth / 2 * hi * 0.8 + rng.uniform(0, hi * 0.2, shape)


def write_sources(root: Path) -> tuple[dict[str, Source], str]:
    """Write every test source with tifffile, zarr-python or ome-zarr-py; return them and a catalog."""
    rng = np.random.default_rng(7)
    sources: dict[str, Source] = {}
    entries: list[str] = []

    # 1. A directory of uint16 2-D slices, strips, odd sizes; voxel size from the catalog (4x anisotropic).
    a = _blobs(rng, (37, 150, 131), 60000).astype(np.uint16)
    (root / "slices16").mkdir()
    for z in range(a.shape[0]):
        tifffile.imwrite(root / "slices16" / f"plane_{z}.tif", a[z], rowsperstrip=7)
    sources["slices16"] = Source("slices16", a[None, None], (3.0, 0.75, 0.75))
    entries.append('id = "slices16"\npath = "slices16"\nvoxel_size = [3.0, 0.75, 0.75]\n'
                   'title = "Slice stack"\nspecies = "mouse"\ntechnique = "fMOST"')

    # 2. One tiled, zlib-compressed BigTIFF of uint8, voxel size from its resolution tags (cm).
    b = _blobs(rng, (45, 200, 170), 255).astype(np.uint8)
    tifffile.imwrite(root / "tiled8.tif", b, bigtiff=True, tile=(32, 48), compression="zlib",
                     photometric="minisblack", resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    sources["tiled8"] = Source("tiled8", b[None, None], (0.5, 0.5, 0.5))
    entries.append('id = "tiled8"\npath = "tiled8.tif"\ntitle = "Tiled BigTIFF"\nspecies = "rat"\nencoding = "png"')

    # 3. A float32 zarr v2 array written by zarr-python.
    c = rng.normal(100, 30, (29, 101, 87)).astype(np.float32)
    arr = zarr.create_array(root / "float32.zarr", shape=c.shape, chunks=(10, 32, 32), dtype="float32",
                            zarr_format=2)
    arr[:] = c
    sources["float32"] = Source("float32", c[None, None], (2.0, 1.0, 1.0))
    entries.append('id = "float32"\npath = "float32.zarr"\nvoxel_size = [2.0, 1.0, 1.0]')

    # 4. OME-Zarr 0.4 (zarr v2) from ome-zarr-py: two channels, native levels.
    import ome_zarr.format
    import ome_zarr.writer

    d = _blobs(rng, (2, 40, 130, 120), 4000).astype(np.uint16)
    group = zarr.open_group(root / "ome04.zarr", mode="w", zarr_format=2)
    ome_zarr.writer.write_image(d, group, scale_factors=[2], axes="czyx", fmt=ome_zarr.format.FormatV04(),
                                scale={"c": 1, "z": 1.5, "y": 0.4, "x": 0.4})
    native = [group[ds["path"]][:][None] for ds in group.attrs["multiscales"][0]["datasets"]]
    sources["ome04"] = Source("ome04", d[None], (1.5, 0.4, 0.4), native=native)
    entries.append('id = "ome04"\npath = "ome04.zarr"\ntitle = "OME-Zarr 0.4 two channels"')

    # 5. OME-Zarr 0.5 (zarr v3) from ome-zarr-py, uint8.
    e = _blobs(rng, (33, 140, 100), 255).astype(np.uint8)
    group = zarr.open_group(root / "ome05.zarr", mode="w", zarr_format=3)
    ome_zarr.writer.write_image(e, group, scale_factors=[2], axes="zyx", fmt=ome_zarr.format.FormatV05(),
                                scale={"z": 1.0, "y": 0.5, "x": 0.5}, axes_units={"z": "micrometer",
                                                                                 "y": "micrometer", "x": "micrometer"})
    native = [group[ds["path"]][:][None, None] for ds in group.attrs["ome"]["multiscales"][0]["datasets"]]
    sources["ome05"] = Source("ome05", e[None, None], (1.0, 0.5, 0.5), native=native)
    entries.append('id = "ome05"\npath = "ome05.zarr"')

    # 6. Labels: a uint32 zarr v3 array; served with mode downsampling.
    f = rng.integers(0, 5, (21, 70, 90)).astype(np.uint32) * 1000
    arr = zarr.create_array(root / "labels.zarr", shape=f.shape, chunks=(8, 32, 32), dtype="uint32")
    arr[:] = f
    sources["labels"] = Source("labels", f[None, None], (1.0, 1.0, 1.0), method="mode")
    entries.append('id = "labels"\npath = "labels.zarr"\nkind = "labels"')

    # 7. An OME-TIFF pyramid (SubIFDs) written by tifffile; physical sizes in OME-XML.
    g = _blobs(rng, (20, 260, 200), 30000).astype(np.uint16)
    levels = [g, g[:, ::2, ::2], g[:, ::4, ::4]]
    with tifffile.TiffWriter(root / "pyramid.ome.tif") as tw:
        opts = dict(tile=(64, 64), compression="zlib", photometric="minisblack")
        tw.write(g, subifds=2, metadata={"axes": "ZYX", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3,
                                         "PhysicalSizeZ": 2.0}, **opts)
        for lvl in levels[1:]:
            tw.write(lvl, subfiletype=1, **opts)
    sources["pyramid"] = Source("pyramid", g[None, None], (2.0, 0.3, 0.3), native=[x[None, None] for x in levels])
    entries.append('id = "pyramid"\npath = "pyramid.ome.tif"')

    # 8. Two time points of three uint8 channels: a 5-D zarr v2 array (axes t, c, z, y, x).
    h = _blobs(rng, (2, 3, 20, 70, 50), 255).astype(np.uint8)
    arr = zarr.create_array(root / "multi.zarr", shape=h.shape, chunks=(1, 1, 20, 32, 32), dtype="uint8",
                            zarr_format=2)
    arr[:] = h
    sources["multi"] = Source("multi", h, (1.0, 1.0, 1.0))
    entries.append('id = "multi"\npath = "multi.zarr"\ntitle = "Time series, three channels"')

    # 9. float64, which Neuroglancer cannot show: precomputed serves it as float32.
    k = rng.normal(0, 1e3, (10, 40, 30))
    arr = zarr.create_array(root / "f64.zarr", shape=k.shape, chunks=(10, 40, 30), dtype="float64")
    arr[:] = k
    sources["f64"] = Source("f64", k[None, None], (1.0, 1.0, 1.0))
    entries.append('id = "f64"\npath = "f64.zarr"')

    # 10. uint64 labels with ids past 2**32: compressed_segmentation's 64-bit form.
    m = (rng.integers(0, 4, (12, 45, 38)).astype(np.uint64) * (2**40 + 7))
    arr = zarr.create_array(root / "labels64.zarr", shape=m.shape, chunks=(12, 45, 38), dtype="uint64")
    arr[:] = m
    sources["labels64"] = Source("labels64", m[None, None], (1.0, 1.0, 1.0), method="mode")
    entries.append('id = "labels64"\npath = "labels64.zarr"\nkind = "labels"')

    # 11. Many small chunks, two uint16 channels: zarr v3 shards of 4x4x4 chunks with edge shards
    #     holding unstored chunks, and precomputed shards with several minishards (chunk from the catalog).
    n = _blobs(rng, (1, 2, 23, 150, 170), 50000).astype(np.uint16)
    arr = zarr.create_array(root / "grid.zarr", shape=n.shape, chunks=(1, 1, 23, 64, 64), dtype="uint16",
                            zarr_format=2)
    arr[:] = n
    sources["grid"] = Source("grid", n, (2.0, 0.5, 0.5))
    entries.append('id = "grid"\npath = "grid.zarr"\nvoxel_size = [2.0, 0.5, 0.5]\nchunk = [8, 16, 16]')

    catalog = "\n\n".join(f"[[datasets]]\n{e}" for e in entries) + "\n"
    return sources, catalog


class Server:
    def __init__(self, catalog: Path, extra: list[str] = ()):
        for _ in range(3):  # a port free when chosen may be taken before the server binds it: another one
            self.port = _free_port()
            self.base = f"http://127.0.0.1:{self.port}"
            self.log = catalog.with_suffix(f".{self.port}.log")
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bil_transform", "serve", "--config", str(catalog), "--port", str(self.port),
                 "--cache-size", "512MiB", *extra],
                stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
            )
            if self._started():
                return
        raise RuntimeError("no free port for the server in three tries")

    def _started(self) -> bool:
        """Wait until /healthz answers; False if the server exited because its port was taken."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log.read_text()
                if "it is in use" in text:
                    return False
                raise RuntimeError(f"server exited: {text}")
            try:
                if requests.get(self.base + "/healthz", timeout=5).ok:
                    return True
            except requests.RequestException:  # not listening yet, or too busy starting to answer
                time.sleep(0.1)
        self.proc.kill()
        raise RuntimeError("server did not start within 60 s")

    def url(self, path: str) -> str:
        return self.base + path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL if it has not exited within 10 s."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def sources(tmp_path_factory) -> tuple[dict[str, Source], Path]:
    root = tmp_path_factory.mktemp("sources")
    found, catalog = write_sources(root)
    path = root / "catalog.toml"
    path.write_text(catalog)
    return found, path


@pytest.fixture(scope="session")
def server(sources):
    srv = Server(sources[1])
    yield srv
    srv.stop()


def bdv_xml(path: Path, h5: str, kind: str = "relative", last_timepoint: str = "0",
            affine: str = "1 0 0 0 0 1 0 0 0 0 1 0") -> None:
    """A BigDataViewer XML of one 32 x 32 x 8 setup whose <hdf5> (`kind`: relative or absolute) names
    `h5`; hostile tests put what they want in each field, as text."""
    path.write_text(f"""<?xml version="1.0" encoding="UTF-8"?>
<SpimData version="0.2">
  <BasePath type="relative">.</BasePath>
  <SequenceDescription>
    <ImageLoader format="bdv.hdf5"><hdf5 type="{kind}">{h5}</hdf5></ImageLoader>
    <ViewSetups>
      <ViewSetup><id>0</id><name>s0</name><size>32 32 8</size>
        <voxelSize><unit>micrometer</unit><size>1 1 1</size></voxelSize></ViewSetup>
    </ViewSetups>
    <Timepoints type="range"><first>0</first><last>{last_timepoint}</last></Timepoints>
  </SequenceDescription>
  <ViewRegistrations>
    <ViewRegistration timepoint="0" setup="0"><ViewTransform type="affine"><affine>{affine}</affine></ViewTransform>
    </ViewRegistration>
  </ViewRegistrations>
</SpimData>
""")


def ome_group(server: Server, ds: str) -> tuple[zarr.Group, list[dict]]:
    """A dataset's served OME-Zarr 0.4 group, read by zarr-python, and its multiscales datasets."""
    group = zarr.open_group(server.url(f"/ds/{ds}/zarr"), mode="r")
    return group, group.attrs["multiscales"][0]["datasets"]
