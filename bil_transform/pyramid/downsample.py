"""Block downsampling by integer factors. Output shape is ceil(shape / factor); an edge
window that runs past the data is reduced over the voxels that exist.

The pyramid only uses factors of 1 and 2, so those take fast paths built from strided views
(no transposing copy); larger factors take the general path, which lays every window out
along a last axis. Both give the same bits.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import DTypeLike

# Comparator networks that sort 4 and 8 values (Batcher's odd-even merge sort).
_SORT = {
    4: ((0, 1), (2, 3), (0, 2), (1, 3), (1, 2)),
    8: ((0, 2), (1, 3), (4, 6), (5, 7), (0, 4), (1, 5), (2, 6), (3, 7), (0, 1), (2, 3), (4, 5), (6, 7),
        (2, 4), (3, 5), (1, 4), (3, 6), (1, 2), (3, 4), (5, 6)),
}


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


def _even(block: np.ndarray, factors: tuple[int, ...], mode: str) -> np.ndarray:
    """Pad odd axes that reduce by 2 by one voxel (a copy, so only at the volume's far edges).

    "edge" repeats the last voxel: a lone voxel then counts twice, which doubles every value's
    count in its window alike, so the mode (ties included) is unchanged; likewise it doubles a
    window's sum and count, leaving the rounded mean unchanged. "constant" adds zeros, as the
    general path does, for the float64 sums that must match it bit for bit.
    """
    pad = [(0, (f == 2) * (n % 2)) for n, f in zip(block.shape, factors)]
    return np.pad(block, pad, mode=mode) if any(p for _, p in pad) else block


def _views(block: np.ndarray, factors: tuple[int, ...]) -> list[np.ndarray]:
    """Strided views of each window position, in window order (z slowest, x fastest)."""
    fz, fy, fx = factors
    return [block[z::fz, y::fy, x::fx] for z in range(fz) for y in range(fy) for x in range(fx)]


def _pair_sum(a: np.ndarray, axis: int, dtype: DTypeLike) -> np.ndarray:
    """Neighbour pairs along `axis` added in `dtype`; a lone last voxel is added to itself, as an
    "edge" pad would (see _even), without copying the block."""
    n = a.shape[axis]
    lead = (slice(None),) * axis
    even, odd = a[(*lead, slice(0, n - 1, 2))], a[(*lead, slice(1, None, 2))]
    if n % 2 == 0:
        return np.add(even, odd, dtype=dtype)
    out = np.empty((*a.shape[:axis], n // 2 + 1, *a.shape[axis + 1:]), dtype)
    last = a[(*lead, slice(n - 1, n))]
    np.add(even, odd, out=out[(*lead, slice(0, -1))], dtype=dtype)
    np.add(last, last, out=out[(*lead, slice(-1, None))], dtype=dtype)
    return out


def mean(block: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Mean; integers round half up and are accumulated wide enough never to overflow.

    Integers up to 32 bits sum exactly in an integer twice as wide. Everything else sums in
    float64 in the order numpy's sum over a window axis uses (8 values pairwise: x pairs,
    then y, then z; fewer left to right), so the fast path matches the general one bit for bit.
    """
    if factors == (1, 1, 1):
        return block.copy()
    k = math.prod(factors)
    small_int = block.dtype.kind in "iu" and block.dtype.itemsize <= 4
    if max(factors) > 2:
        w, _ = _windows(block, factors)
        sums = w.sum(axis=-1, dtype=np.int64 if small_int else np.float64)
        counts = _counts(block.shape, factors)
        if small_int:
            return ((2 * sums + counts) // (2 * counts)).astype(block.dtype)
    elif small_int:
        # With lone edge voxels doubled, every window sums k = 2**m voxels: round half up is (sum + k/2) >> m.
        sums = block
        acc = np.dtype(f"{block.dtype.kind}{2 * block.dtype.itemsize}")
        for axis in (0, 1, 2):  # z first: the largest add runs over whole contiguous planes
            if factors[axis] == 2:
                sums = _pair_sum(sums, axis, acc)
        sums += k // 2
        sums >>= k.bit_length() - 1
        return sums.astype(block.dtype)
    else:
        padded = _even(block, factors, "constant")
        if k == 4:
            a, b, c, d = _views(padded, factors)
            sums = np.add(a, b, dtype=np.float64)
            sums += c
            sums += d
        else:
            sums = padded
            for axis in (2, 1, 0):
                if factors[axis] == 2:
                    sums = _pair_sum(sums, axis, np.float64)
        sums += 0.0  # numpy's sum starts from +0.0, which turns a sum of -0.0s into +0.0
        counts = k if padded is block else _counts(block.shape, factors)
    result = sums / counts
    if np.issubdtype(block.dtype, np.integer):
        result += 0.5
        np.floor(result, out=result)
    return result.astype(block.dtype)


def mode(block: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Most frequent value per window (labels); ties go to the smallest value.

    For factors of 1 and 2 each window's values are sorted with a comparator network; the
    first longest run in sorted order is then the mode, smallest value first on ties.
    """
    if factors == (1, 1, 1):
        return block.copy()
    if max(factors) > 2 or block.dtype.kind not in "biu":  # floats keep the general path's NaN and -0 handling
        return _general_mode(block, factors)
    v = _views(_even(block, factors, "edge"), factors)
    if len(v) == 2:
        return np.minimum(v[0], v[1])  # two equal values or a tie
    for i, j in _SORT[len(v)]:
        v[i], v[j] = np.minimum(v[i], v[j]), np.maximum(v[i], v[j])
    best = v[0]
    run = np.zeros(best.shape, np.uint8)  # length - 1 of the run of equal values ending here
    best_run = np.zeros(best.shape, np.uint8)
    for prev, cur in zip(v, v[1:]):
        run += 1
        run *= cur == prev
        best = np.where(run > best_run, cur, best)
        np.maximum(best_run, run, out=best_run)
    return best


def _general_mode(block: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Any factors: count each window value against the whole window."""
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
