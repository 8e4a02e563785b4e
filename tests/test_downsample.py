"""Block reduction (pyramid.downsample) equals independent references bit for bit, for every integer dtype,
odd shapes, partial edge windows, extreme values and ties; floats equal the reference within rounding."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from reference import downsample_mean, downsample_mode

from bil_transform.pyramid.downsample import METHODS, mean, mode

INTS = [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64, np.int64]
FACTORS = [*itertools.product((1, 2), repeat=3), (3, 3, 3), (4, 2, 1)]
SHAPES = [(1, 1, 1), (3, 5, 7), (37, 40, 33), (64, 64, 64), (65, 63, 1)]  # (37, 40, 33): slices16 cropped


def exact_mean(a: np.ndarray, factors: tuple[int, int, int]) -> np.ndarray:
    """Integer mean from the definition: window sums and counts in int64, rounded half up with integer division."""
    sums, counts = a.astype(np.int64), np.ones(a.shape, np.int64)
    for axis, f in enumerate(factors):
        starts = np.arange(0, a.shape[axis], f)
        sums = np.add.reduceat(sums, starts, axis=axis)
        counts = np.add.reduceat(counts, starts, axis=axis)
    return ((2 * sums + counts) // (2 * counts)).astype(a.dtype)


def frozen(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False  # blocks come read-only from the cache
    return a


def random_ints(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Full range up to 32 bits; 64-bit values within +-2**40, where the float64 mean rounds exactly."""
    info = np.iinfo(dtype)
    lo, hi = (info.min, info.max) if info.bits <= 32 else (max(info.min, -(2**40)), 2**40)
    return frozen(rng.integers(lo, hi, shape, dtype=dtype, endpoint=True))


def check_result(got: np.ndarray, block: np.ndarray, factors: tuple[int, int, int]) -> None:
    assert got.dtype == block.dtype and got.flags.c_contiguous and not np.shares_memory(got, block)
    assert got.shape == tuple(-(-n // f) for n, f in zip(block.shape, factors))


@pytest.mark.parametrize("factors", FACTORS, ids=str)
@pytest.mark.parametrize("dtype", INTS, ids=lambda d: np.dtype(d).name)
def test_integer_mean_is_exact(dtype, factors):
    rng = np.random.default_rng(11)
    for shape in SHAPES:
        block = random_ints(rng, shape, dtype)
        got = mean(block, factors)
        check_result(got, block, factors)
        np.testing.assert_array_equal(got, exact_mean(block, factors), strict=True)
        np.testing.assert_array_equal(got, downsample_mean(block, factors), strict=True)


@pytest.mark.parametrize("factors", FACTORS, ids=str)
@pytest.mark.parametrize("dtype", INTS, ids=lambda d: np.dtype(d).name)
def test_integer_mean_at_the_extremes(dtype, factors):
    """Sums of maxima reach the top of the accumulator; minima and mixed windows exercise negative rounding."""
    info, rng = np.iinfo(dtype), np.random.default_rng(12)
    for shape in [(1, 1, 1), (3, 5, 7), (16, 17, 15)]:
        mixed = rng.choice(np.array([info.min, info.max, info.max - 1, info.min + 1], dtype), shape)
        for block in [np.full(shape, info.min, dtype), np.full(shape, info.max, dtype), mixed]:
            block = frozen(block)
            if info.bits <= 32:
                np.testing.assert_array_equal(mean(block, factors), exact_mean(block, factors), strict=True)
                np.testing.assert_array_equal(mean(block, factors), downsample_mean(block, factors), strict=True)
            else:
                # 64-bit integers keep the float64 definition (the reference's): exact up to 2**53, and
                # the cast back overflows for means that round up to 2**63 or 2**64.
                # Here every float64 sum is exact in any order, so the result must match the reference;
                # factors (1, 1, 1) are the identity, with no float round trip.
                with np.errstate(invalid="ignore"):
                    want = block if factors == (1, 1, 1) else downsample_mean(block, factors)
                    np.testing.assert_array_equal(mean(block, factors), want, strict=True)


def test_negative_means_round_half_up():
    block = frozen(np.array([-3, -2, -1, -2, 5, 6, -7, -8], np.int16).reshape(1, 2, 4))
    # windows (1, 2, 2): {-3, -2, 5, 6} -> 1.5 -> 2; {-1, -2, -7, -8} -> -4.5 -> -4
    np.testing.assert_array_equal(mean(block, (1, 2, 2)), np.array([[[2, -4]]], np.int16))
    np.testing.assert_array_equal(mean(block, (1, 1, 2)), np.array([[[-2, -1], [6, -7]]], np.int16))  # -2.5 -> -2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float_mean(dtype):
    rng = np.random.default_rng(13)
    for shape, factors in itertools.product(SHAPES[:3] + [(65, 63, 1)], FACTORS):
        whole = frozen(rng.integers(-1000, 1000, shape).astype(dtype) / 8)  # float64 sums are exact
        np.testing.assert_array_equal(mean(whole, factors), downsample_mean(whole, factors), strict=True)
        block = frozen(rng.uniform(1, 1000, shape).astype(dtype))
        got = mean(block, factors)
        check_result(got, block, factors)
        np.testing.assert_allclose(got, downsample_mean(block, factors), rtol=1e-6 if dtype == np.float32 else 1e-13)


def test_float_mean_of_negative_zeros_is_positive_zero():
    # numpy's window sum starts from +0.0, so the general path never returns -0.0; the fast path must not either.
    for dtype, factors in itertools.product([np.float32, np.float64], FACTORS[1:]):
        got = mean(frozen(np.full((3, 4, 5), -0.0, dtype)), factors)
        assert not np.signbit(got).any(), (dtype, factors)


def test_bool_mean_is_any():
    block = frozen(np.random.default_rng(14).random((5, 6, 7)) < 0.2)
    for factors in FACTORS:
        np.testing.assert_array_equal(mean(block, factors), downsample_mean(block, factors), strict=True)


@pytest.mark.parametrize("factors", FACTORS, ids=str)
@pytest.mark.parametrize("dtype", [*INTS, np.bool_], ids=lambda d: np.dtype(d).name)
def test_mode_matches_reference(dtype, factors):
    rng = np.random.default_rng(15)
    if dtype == np.bool_:
        values = np.array([False, True])
    else:
        info = np.iinfo(dtype)
        values = np.array([info.min, info.max, 0, 1, info.max // 2], dtype)  # few labels: ties are common
    for shape in [(1, 1, 1), (3, 5, 7), (9, 10, 11), (65, 7, 1), (12, 16, 10)]:
        for n in (2, 3, len(values)):
            block = frozen(rng.choice(values[:n], shape))
            got = mode(block, factors)
            check_result(got, block, factors)
            np.testing.assert_array_equal(got, downsample_mode(block, factors), strict=True)


def test_mode_of_a_whole_block():
    block = frozen((np.random.default_rng(16).integers(0, 4, (64, 64, 64)) * (2**40 + 7)).astype(np.uint64))
    np.testing.assert_array_equal(mode(block, (2, 2, 2)), downsample_mode(block, (2, 2, 2)), strict=True)


def test_mode_ties_go_to_the_smallest_value_and_edges_count_only_real_voxels():
    tie = frozen(np.array([5, 3, 3, 5, 7, 7, 9, 9], np.int32).reshape(2, 2, 2))
    assert mode(tie, (2, 2, 2)).item() == 3
    assert mode(-tie, (2, 2, 2)).item() == -9
    np.testing.assert_array_equal(mode(tie, (1, 2, 2)), [[[3]], [[7]]])
    np.testing.assert_array_equal(mode(tie, (1, 1, 2)), [[[3], [3]], [[7], [9]]])
    # x = 3: the edge windows hold (z, y) x 1 voxels; zeros beyond the edge must not count.
    edge = frozen(np.array([[[1, 1, 8], [1, 1, 8]], [[2, 2, 9], [2, 2, 6]]], np.uint16))
    np.testing.assert_array_equal(mode(edge, (2, 2, 2)), [[[1, 8]]])  # {8, 8, 9, 6}: 8
    np.testing.assert_array_equal(mode(edge, (1, 2, 2)), [[[1, 8]], [[2, 6]]])  # {9, 6} tie: 6
    lone = frozen(np.array([[[4, 4, 7]]], np.uint8))
    np.testing.assert_array_equal(mode(lone, (2, 2, 2)), [[[4, 7]]])


def test_read_only_input_is_left_alone_and_never_returned():
    block = frozen(np.random.default_rng(17).integers(0, 5, (5, 6, 7)).astype(np.uint16))
    before = block.copy()
    for method, factors in itertools.product(("mean", "mode"), [*FACTORS, (1, 1, 1)]):
        got = METHODS[method](block, factors)
        check_result(got, block, factors)
        got[...] = 0  # a new array the caller owns
    np.testing.assert_array_equal(block, before)


def test_non_contiguous_input():
    base = np.random.default_rng(18).integers(0, 60000, (12, 13, 14)).astype(np.uint16)
    for block in [base[::-1, 1:, ::3], base.transpose(2, 0, 1), base.astype(">u2")]:
        for factors in FACTORS:
            np.testing.assert_array_equal(mean(block, factors), exact_mean(block, factors), strict=True)
            np.testing.assert_array_equal(mode(block % 3, factors), downsample_mode(block % 3, factors), strict=True)
