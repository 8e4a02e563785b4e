"""Block downsampling speed: the current mean and mode against the previous implementation, in the same run.

Why: every synthesized pyramid block is one `mean` (or `mode`, for labels) call, which was about a
third of a worker's time in the cold path. The previous implementation is kept below, unchanged,
as the baseline. Contender and baseline runs alternate, so load from other work on the machine
hits both alike; each time is the median over --repeat rounds of a timeit batch. Results are
checked equal (bit for bit) before timing.

Run: python benchmarks/downsample_speed.py [--repeat N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import timeit

import numpy as np

from bil_transform.pyramid.downsample import _counts, _general_mode, _windows, mean, mode

# ---- The old implementation, kept for comparison (not used by the server). Its window helpers
# and its mode live on in downsample.py as the general path for factors above 2.


def old_mean(block, factors):
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


def old_mode(block, factors):
    return block if factors == (1, 1, 1) else _general_mode(block, factors)


# ---- End of the old implementation. ----


def intensity(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Smooth structure plus noise over most of the dtype's range, read-only like a cached block."""
    grids = np.meshgrid(*[np.linspace(0, 6, n) for n in shape], indexing="ij")
    smooth = (np.sin(grids[0] * 0.7 + grids[1]) * np.cos(grids[2] * 1.3) + 1) / 2
    hi = np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else 1000.0
    a = (smooth * 0.8 + rng.uniform(0, 0.2, shape)) * hi
    a = a.astype(dtype)
    a.flags.writeable = False
    return a


def labels(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Segments of a few voxels across (so windows mix 1-4 labels), with ids past 2**32 for uint64."""
    coarse = rng.integers(1, 200, [-(-n // 3) for n in shape])
    a = coarse.repeat(3, 0).repeat(3, 1).repeat(3, 2)[: shape[0], : shape[1], : shape[2]]
    a = np.roll(a, (1, 2, 1), axis=(0, 1, 2)).astype(dtype) * (2**33 + 1 if dtype == np.uint64 else 1)
    a.flags.writeable = False
    return a


def time_ms(fn, block: np.ndarray, factors: tuple[int, int, int], number: int) -> float:
    """Milliseconds per call, averaged over a batch of `number` calls."""
    return timeit.timeit(lambda: fn(block, factors), number=number) / number * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=15, help="rounds per case (default 15)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"numpy {np.__version__}, load average at start {os.getloadavg()}")
    cases = [("mean", mean, old_mean, intensity, dt, shape, f)
             for dt in (np.uint16, np.uint8, np.uint32, np.float32)
             for shape in ((64, 64, 64),)
             for f in ((2, 2, 2), (1, 2, 2))]
    cases.append(("mean", mean, old_mean, intensity, np.uint16, (63, 63, 63), (2, 2, 2)))  # a far-edge block
    cases += [("mode", mode, old_mode, labels, dt, (64, 64, 64), f)
              for dt in (np.uint32, np.uint64) for f in ((2, 2, 2), (1, 2, 2))]
    print(f"{'method':6} {'dtype':8} {'block':10} {'factors':9} {'new ms':>8} {'old ms':>8} {'speedup':>8}")
    for name, new, old, make, dtype, shape, factors in cases:
        block = make(rng, shape, dtype)
        got, want = new(block, factors), old(block, factors)
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), (name, dtype, factors)
        number = max(1, int(20 / time_ms(new, block, factors, 1)))  # batches of about 20 ms
        new_t: list[float] = []
        old_t: list[float] = []
        for _ in range(args.repeat):  # interleaved, so both see the same background load
            new_t.append(time_ms(new, block, factors, number))
            old_t.append(time_ms(old, block, factors, max(1, number // 8)))
        n, o = statistics.median(new_t), statistics.median(old_t)
        block_s = "x".join(map(str, shape))
        print(f"{name:6} {np.dtype(dtype).name:8} {block_s:10} {str(factors):9} {n:8.3f} {o:8.3f} {o / n:7.1f}x")
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
