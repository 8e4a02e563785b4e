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
DEMO_TRACINGS = "demo-neurons-v1"
REGIONS = ("cortex, layer 2/3", "cortex, layer 5", "striatum", "thalamus", "hippocampus")
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


def make_demo_tracings(data_dir: Path | None = None, shape: tuple[int, int, int] = DEMO_SHAPE,
                       count: int = len(REGIONS)) -> Path:
    """Write a few traced-looking neurons as SWC files (voxel coordinates of the demo volume):
    a soma inside the brain and dendrites that wander and branch from it."""
    target = (data_dir or default_data_dir()) / DEMO_TRACINGS
    if (target / "complete").exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(16)
    nz, ny, nx = shape
    for n in range(count):
        soma = np.array([nx * rng.uniform(0.25, 0.75), ny * rng.uniform(0.3, 0.7), nz * rng.uniform(0.4, 0.6)])
        rows = [(1, 1, *soma, 6.0, -1)]
        tips = [(1, soma, rng.uniform(0, 2 * np.pi)) for _ in range(int(rng.integers(4, 7)))]
        while tips and len(rows) < 400:
            parent, at, heading = tips.pop()
            for _ in range(int(rng.integers(15, 40))):
                heading += rng.normal(0, 0.25)
                step = [4 * np.cos(heading), 4 * np.sin(heading), rng.normal(0, 0.5)]
                at = np.clip(at + step, 0, [nx - 1, ny - 1, nz - 1])
                rows.append((len(rows) + 1, 3, *at, max(0.5, 2.5 - 0.05 * len(rows) ** 0.5), parent))
                parent = len(rows)
                if rng.random() < 0.04:
                    tips.append((parent, at, heading + rng.choice([-0.8, 0.8])))
        lines = [f"# SOMA_REGION: {REGIONS[n % len(REGIONS)]}", "# a synthetic tracing of the bil-transform demo",
                 *(f"{i} {t} {x:.2f} {y:.2f} {z:.2f} {r:.2f} {p}" for i, t, x, y, z, r, p in rows)]
        (target / f"neuron_{n + 1:02d}.swc").write_text("\n".join(lines) + "\n")
    (target / "complete").touch()
    return target
