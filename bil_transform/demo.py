"""The embedded demo: a synthetic whole-brain-like stack of 2-D TIFF slices, made once per machine."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import tifffile

DEMO_SHAPE = (256, 1024, 1024)  # z, y, x
DEMO_VOXEL = (2.0, 0.5, 0.5)  # micrometers: z steps 4x coarser than x/y, as in serial-section imaging
DEMO_NAME = "demo-brain-v2"
CELL_PERIOD = 16  # slices


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bil-transform"


def _cell_texture(rng: np.random.Generator, shape: tuple[int, int], count: int, radius: float) -> np.ndarray:
    """Sparse bright round cells: random points blurred by a Gaussian (in Fourier space, once)."""
    points = np.zeros(shape, np.float32)
    points[rng.integers(0, shape[0], count), rng.integers(0, shape[1], count)] = rng.uniform(0.5, 1.0, count)
    fy, fx = np.fft.fftfreq(shape[0])[:, None], np.fft.rfftfreq(shape[1])[None, :]
    kernel = np.exp(-2 * (np.pi * radius) ** 2 * (fy**2 + fx**2))
    tex = np.fft.irfft2(np.fft.rfft2(points) * kernel, s=shape)
    return (tex / tex.max()).astype(np.float32)


def brain_slice(z: int, shape: tuple[int, int, int], textures: list[np.ndarray],
                rng: np.random.Generator) -> np.ndarray:
    """One coronal-like section: two hemispheres, layered cortex, cells, a ventricle, shot noise."""
    nz, ny, nx = shape
    zn = 2 * (z + 0.5) / nz - 1
    yn = np.linspace(-1, 1, ny, dtype=np.float32)[:, None]
    xn = np.linspace(-1, 1, nx, dtype=np.float32)[None, :]
    r = np.sqrt((xn / 0.9) ** 2 + (yn / 0.7) ** 2 + zn**2)
    inside = (r < 1) & (np.abs(xn) > 0.015 * (1 - zn**2))  # midline fissure between hemispheres
    depth = np.clip(1 - r, 0, 1)
    layers = 0.6 + 0.4 * np.cos(depth * 40) * np.exp(-depth * 6)
    ventricle = np.exp(-(((np.abs(xn) - 0.18) / 0.06) ** 2 + (yn / 0.25) ** 2 + (zn / 0.5) ** 2))
    cells = np.zeros((ny, nx), np.float32)
    for k, tex in enumerate(textures):  # each cell layer lives a few slices, then moves: round 3-D cells
        phase = (z / CELL_PERIOD - k / len(textures)) % 1.0
        cells += np.exp(-(((phase - 0.5) / 0.12) ** 2)) * np.roll(tex, int(z // CELL_PERIOD) * 97, axis=1)
    signal = inside * (600 * layers + 2500 * cells - 500 * ventricle) + 100
    noisy = rng.poisson(np.clip(signal, 0, None)).astype(np.float32)
    return np.clip(noisy, 0, 65535).astype(np.uint16)


def make_demo(data_dir: Path | None = None, shape: tuple[int, int, int] = DEMO_SHAPE) -> Path:
    """Write the demo slices (ImageJ-tagged with the voxel size) unless they already exist."""
    target = (data_dir or default_data_dir()) / DEMO_NAME
    if (target / "complete").exists():
        return target
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rng = np.random.default_rng(2026)
    textures = [_cell_texture(rng, shape[1:], 1500, 4.0) for _ in range(4)]
    for z in range(shape[0]):
        plane = brain_slice(z, shape, textures, rng)
        tifffile.imwrite(
            tmp / f"slice_{z:04d}.tif", plane, imagej=True,
            resolution=(1 / DEMO_VOXEL[2], 1 / DEMO_VOXEL[1]), metadata={"spacing": DEMO_VOXEL[0], "unit": "um"},
        )
        if z % 32 == 31:
            print(f"  demo data: {z + 1}/{shape[0]} slices", file=sys.stderr)
    (tmp / "complete").touch()
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
