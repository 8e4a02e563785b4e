"""Block downsampling by integer factors. Output shape is ceil(shape / factor); an edge
window that runs past the data is reduced over the voxels that exist."""

from __future__ import annotations

import numpy as np


def _windows(block: np.ndarray, factors: tuple[int, ...], fill=0) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pad `block` to whole windows and view it as (out_z, out_y, out_x, fz*fy*fx)."""
    out = tuple(-(-n // f) for n, f in zip(block.shape, factors))
    pad = [(0, o * f - n) for o, f, n in zip(out, factors, block.shape)]
    padded = np.pad(block, pad, constant_values=fill) if any(p for _, p in pad) else block
    fz, fy, fx = factors
    w = padded.reshape(out[0], fz, out[1], fy, out[2], fx).transpose(0, 2, 4, 1, 3, 5)
    return w.reshape(*out, fz * fy * fx), out


def _counts(shape: tuple[int, ...], factors: tuple[int, ...]) -> np.ndarray:
    """How many real voxels each output window holds (fewer only along the far edges)."""
    per_axis = []
    for n, f in zip(shape, factors):
        c = np.full(-(-n // f), f, np.int64)
        c[-1] = n - f * (len(c) - 1)
        per_axis.append(c)
    return per_axis[0][:, None, None] * per_axis[1][None, :, None] * per_axis[2][None, None, :]


def mean(block: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean; integers round half up and are accumulated wide enough never to overflow."""
    if factors == (1, 1, 1):
        return block
    integer = np.issubdtype(block.dtype, np.integer) and block.dtype.itemsize <= 4
    acc = np.int64 if integer else np.float64
    w, _ = _windows(block, factors)
    sums = w.sum(axis=-1, dtype=acc)
    counts = _counts(block.shape, factors)
    if integer:
        return ((2 * sums + counts) // (2 * counts)).astype(block.dtype)
    result = sums / counts
    if np.issubdtype(block.dtype, np.integer):
        result = np.floor(result + 0.5)
    return result.astype(block.dtype)


def mode(block: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Most frequent value per window (labels); ties go to the smallest value."""
    if factors == (1, 1, 1):
        return block
    w, out = _windows(block, factors)
    valid, _ = _windows(np.ones(block.shape, bool), factors, fill=False)
    k = w.shape[-1]
    best = w[..., 0].copy()
    best_count = np.zeros(out, np.int64)
    for j in range(k):
        candidate = w[..., j]
        count = ((w == candidate[..., None]) & valid).sum(axis=-1) * valid[..., j]
        better = (count > best_count) | ((count == best_count) & (count > 0) & (candidate < best))
        best = np.where(better, candidate, best)
        best_count = np.where(better, count, best_count)
    return best


def stride(block: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Every f-th voxel, starting at the first."""
    fz, fy, fx = factors
    return block[::fz, ::fy, ::fx]


METHODS = {"mean": mean, "mode": mode, "stride": stride}
