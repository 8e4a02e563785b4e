"""Independent numpy references for the pyramid and the precomputed skeleton format: written from the
definitions, not from the server's code.

A level-L voxel is the reduction of the level-(L-1) window it covers; windows at the far edge
hold only the voxels that exist. Integer means round half up.
"""

from __future__ import annotations

import struct

import numpy as np


def downsample_mean(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean over windows of the last three axes, by summing with np.add.reduceat."""
    sums = a.astype(np.float64)
    counts = np.ones(a.shape, np.float64)
    for axis, f in zip((-3, -2, -1), factors):
        starts = np.arange(0, a.shape[axis], f)
        sums = np.add.reduceat(sums, starts, axis=axis)
        counts = np.add.reduceat(counts, starts, axis=axis)
    mean = sums / counts
    if np.issubdtype(a.dtype, np.integer):
        mean = np.floor(mean + 0.5)
    return mean.astype(a.dtype)


def downsample_mode(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Most frequent value per window (smallest wins a tie), one window at a time."""
    fz, fy, fx = factors
    lead = a.shape[:-3]
    out = np.empty(lead + tuple(-(-n // f) for n, f in zip(a.shape[-3:], factors)), a.dtype)
    for idx in np.ndindex(out.shape):
        *pre, z, y, x = idx
        window = a[tuple(pre) + (slice(z * fz, (z + 1) * fz), slice(y * fy, (y + 1) * fy), slice(x * fx, (x + 1) * fx))]
        values, counts = np.unique(window, return_counts=True)
        out[idx] = values[np.argmax(counts)]
    return out


def downsample(a: np.ndarray, factors: tuple[int, int, int], method: str) -> np.ndarray:
    return {"mean": downsample_mean, "mode": downsample_mode}[method](a, factors)


def reference_levels(data: np.ndarray, factors: list[tuple[int, int, int]], method: str,
                     native: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """Expected (t, c, z, y, x) levels for per-level factors relative to level 0: native levels as
    written, then each level reduced from the one before it."""
    levels = []
    for i, f in enumerate(factors):
        if native and i < len(native):
            levels.append(native[i])
        elif i == 0:
            levels.append(data)
        else:
            step = tuple(a // b for a, b in zip(f, factors[i - 1]))
            levels.append(downsample(levels[-1], step, method))
    return levels


def compressed_morton(cell: tuple[int, ...], grid: tuple[int, ...]) -> int:
    """Neuroglancer's chunk id (sharded.md): bits of x, y, z interleaved from the lowest, bit i of a
    dimension taken only while 2**i < its grid size."""
    code, out, i = 0, 0, 0
    while any(2**i < g for g in grid):
        for c, g in zip(cell, grid):
            if 2**i < g:
                code |= ((c >> i) & 1) << out
                out += 1
        i += 1
    return code


def parse_skeleton(data: bytes, attributes: list[dict]) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """An independent reader of the body: the layout of skeletons.md, every byte accounted for."""
    n, m = struct.unpack_from("<II", data, 0)
    offset = 8
    vertices = np.frombuffer(data, "<f4", 3 * n, offset).reshape(n, 3)
    offset += 12 * n
    edges = np.frombuffer(data, "<u4", 2 * m, offset).reshape(m, 2)
    offset += 8 * m
    values = {}
    for attr in attributes:
        dtype = np.dtype(attr["data_type"]).newbyteorder("<")
        count = n * attr["num_components"]
        values[attr["id"]] = np.frombuffer(data, dtype, count, offset)
        offset += count * dtype.itemsize
    assert offset == len(data), "the body has bytes the info does not describe"
    return vertices, edges, values
