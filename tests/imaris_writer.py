"""An independent writer of Imaris 5.5 ``.ims`` files, so tests have Imaris input whose voxels they know.

It is written from the file format (Imaris5FileFormat.pdf, ImarisWriter's ``bpWriterHDF5.cxx`` and
``bpOptimalBlockLayout.cxx``; ../shared/CONFORMANCE.md section 5) with plain h5py, and shares no code with
the server's reader. It deliberately produces the traps a reader must handle: datasets padded past
``ImageSize*`` with nonzero junk, strings stored as arrays of single characters, anisotropic pyramids
in which thin stacks keep their z size, and gzip or LZ4 (HDF5 filter 32004) chunks.

Example, a thin stack whose z is never halved (shapes computed by running this code)::

    >>> [a.shape for a in imaris_levels(np.zeros((3, 60, 90), np.uint16), levels=3)]
    [(3, 60, 90), (3, 30, 45), (3, 15, 23)]
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path

import h5py
import hdf5plugin
import numpy as np

MIN_VOXELS = 4 * 1024**2  # Imaris stops its pyramid once a level is this small
DEFAULT_COLORS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (1.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0)]
START = datetime.datetime(2026, 1, 1)


def halved_axes(shape: tuple[int, ...]) -> tuple[bool, bool, bool]:
    """Which of (z, y, x) Imaris halves next: an axis s only if (10*s)**2 > the product of the other two.

    This keeps thin axes (few z planes) whole while the large ones shrink, as in ImarisWriter's
    GetOptimalImagePyramid; an axis of size 1 is never halved.
    """
    z, y, x = shape
    return (
        z > 1 and (10 * z) ** 2 > x * y,
        y > 1 and (10 * y) ** 2 > x * z,
        x > 1 and (10 * x) ** 2 > y * z,
    )


def _pair_sum(a: np.ndarray, axis: int) -> np.ndarray:
    """Sum neighbouring pairs along axis; an odd edge voxel is paired with a zero (and a zero count)."""
    if a.shape[axis] % 2:
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, 1)
        a = np.pad(a, pad)
    shape = a.shape[:axis] + (a.shape[axis] // 2, 2) + a.shape[axis + 1 :]
    return a.reshape(shape).sum(axis=axis + 1)


def downsample(data: np.ndarray, halve: tuple[bool, bool, bool]) -> np.ndarray:
    """Imaris's reduction: the mean of the 2, 4 or 8 voxels, rounded up; at an odd edge only existing voxels count.

    Sums and counts are integers, so the ceiling is exact (no float rounding decides a voxel).
    """
    integer = np.issubdtype(data.dtype, np.integer)
    total = data.astype(np.int64 if integer else np.float64)
    count = np.ones(data.shape, np.int64)
    for axis, h in enumerate(halve):
        if h:
            total, count = _pair_sum(total, axis), _pair_sum(count, axis)
    mean = -(-total // count) if integer else total / count
    return mean.astype(data.dtype)


def imaris_levels(data: np.ndarray, *, levels: int | None = None, min_voxels: int = MIN_VOXELS) -> list[np.ndarray]:
    """data is (z, y, x) level 0. Returns all levels by the Imaris pyramid rule.

    New sizes are ceil(s/2) for a halved axis, so an odd axis keeps its edge voxel. (ImarisWriter's
    code uses floor; a reader must take each level's size from ImageSize* anyway, never compute it.)
    levels=None follows Imaris: a further level is made while the current one has more than min_voxels
    voxels and some axis can be halved. An int stops after that many levels (or earlier if no axis can
    be halved), whatever their size, so tests can use tiny volumes.
    """
    out = [data]
    while len(out) < levels if levels is not None else math.prod(out[-1].shape) > min_voxels:
        halve = halved_axes(out[-1].shape)
        if not any(halve):
            break
        out.append(downsample(out[-1], halve))
    return out


def _as_tczyx(channels: list[np.ndarray] | np.ndarray, time_points: int | None) -> np.ndarray:
    """Normalize the input to one (t, c, z, y, x) array.

    channels is a (t, c, z, y, x) array or a list of per-channel (z, y, x) or (t, z, y, x) arrays.
    If time_points asks for more time points than were given (only from one), time point t is the data
    rolled by t voxels along x: same statistics, different voxels, so a reader mixing up t is caught.
    """
    if isinstance(channels, np.ndarray):
        if channels.ndim != 5:
            raise ValueError("an array of channels must be shaped (t, c, z, y, x)")
        stacked = channels
    else:
        stacked = np.stack([c if c.ndim == 4 else c[None] for c in map(np.asarray, channels)], axis=1)
    if time_points is not None and time_points != stacked.shape[0]:
        if stacked.shape[0] != 1:
            raise ValueError(f"{stacked.shape[0]} time points given but time_points={time_points}")
        stacked = np.stack([np.roll(stacked[0], t, axis=-1) for t in range(time_points)])
    return stacked


def _set_str(obj: h5py.Group, name: str, value: object) -> None:
    """Store a string attribute the way Imaris does: a 1-D array of H5T_C_S1 (single null-terminated chars).

    The low-level API is needed because h5py's own fixed strings are null-padded, and writing
    single chars through a type conversion to H5T_C_S1 would blank them.
    """
    data = np.frombuffer(str(value).encode() or b"\0", dtype="S1")
    tid = h5py.h5t.C_S1.copy()
    space = h5py.h5s.create_simple((len(data),))
    if name in obj.attrs:
        del obj.attrs[name]
    h5py.h5a.create(obj.id, name.encode(), tid, space).write(data, mtype=tid)


def _f3(value: float) -> str:
    """Fixed, three decimals ("12.500"), like ImarisWriter's bpFloatToString for histogram bounds."""
    return f"{value:.3f}"


def _histogram(obj: h5py.Group, data: np.ndarray, bins: int, suffix: str) -> None:
    """Write Histogram{suffix} (uint64 counts over [min, max]) and its HistogramMin/Max{suffix} strings."""
    lo, hi = float(data.min()), float(data.max())
    counts, _ = np.histogram(data, bins=bins, range=(lo, hi))
    _set_str(obj, "HistogramMin" + suffix, _f3(lo))
    _set_str(obj, "HistogramMax" + suffix, _f3(hi))
    obj.create_dataset("Histogram" + suffix, data=counts.astype(np.uint64))


def _junk(dtype: np.dtype) -> int | float:
    """The padding value: the dtype's maximum, so a reader that forgets to crop sees bright borders."""
    return np.iinfo(dtype).max if np.issubdtype(dtype, np.integer) else np.finfo(dtype).max


def _filters(compression: str | None, shuffle: bool) -> dict:
    """h5py keyword arguments for gzip (deflate), LZ4 (filter 32004, via hdf5plugin) or no compression."""
    if compression == "gzip":
        return {"compression": "gzip", "shuffle": shuffle}
    if compression == "lz4":
        return {**hdf5plugin.LZ4(), "shuffle": shuffle}
    if compression is None:
        return {"shuffle": shuffle}
    raise ValueError(f"unknown compression {compression!r}")


def _thumbnail(f: h5py.File, volume: np.ndarray) -> None:
    """A grey RGBA max projection in /Thumbnail/Data, shaped (y, 4*x) like ImarisWriter's."""
    mip = volume.max(axis=0).astype(np.float64)
    span = float(mip.max() - mip.min()) or 1.0
    grey = ((mip - mip.min()) / span * 255).astype(np.uint8)
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    f.create_group("Thumbnail").create_dataset("Data", data=rgba.reshape(grey.shape[0], -1))


def write_ims(
    path,
    channels: list[np.ndarray] | np.ndarray,
    *,
    time_points: int | None = None,
    extent_min=(0.0, 0.0, 0.0),
    extent_max=None,
    names=None,
    colors=None,
    color_ranges=None,
    chunks=(8, 32, 32),
    compression="gzip",
    shuffle=False,
    levels=None,
    min_voxels: int = MIN_VOXELS,
    unit="um",
) -> list:
    """Write an Imaris 5.5 file; return the ground truth truth[r][t][c], the (z, y, x) voxels of each level.

    channels: a (t, c, z, y, x) array or a list of (z, y, x) / (t, z, y, x) arrays, one per channel.
    extent_min, extent_max: (x, y, z) in `unit`, on voxel borders (voxel size = extent / size);
    the default is 1-unit voxels. They are stored with three decimals ("12.500"; ImarisWriter itself
    writes six significant digits, "12.5"), so choose values that survive that.
    names, colors, color_ranges: per channel, a str, (r, g, b) in 0-1 and (min, max).
    chunks: (z, y, x) chunk shape, clipped to each level's size; each Data dataset is padded up to a
    multiple of it with junk, as Imaris pads to its block size.
    compression: "gzip", "lz4" or None; shuffle adds HDF5's shuffle filter before it.
    levels, min_voxels: see imaris_levels.
    """
    data = _as_tczyx(channels, time_points)
    n_t, n_c, size_z, size_y, size_x = data.shape
    size = (size_x, size_y, size_z)
    if extent_max is None:
        extent_max = tuple(lo + n for lo, n in zip(extent_min, size))
    names = names or ["(name not specified)"] * n_c
    colors = colors or [DEFAULT_COLORS[c % len(DEFAULT_COLORS)] for c in range(n_c)]
    color_ranges = color_ranges or [(float(data[:, c].min()), float(data[:, c].max())) for c in range(n_c)]
    per_tc = [[imaris_levels(data[t, c], levels=levels, min_voxels=min_voxels) for c in range(n_c)] for t in range(n_t)]
    truth = [[[per_tc[t][c][r] for c in range(n_c)] for t in range(n_t)] for r in range(len(per_tc[0][0]))]

    with h5py.File(Path(path), "w") as f:
        for name, value in [
            ("ImarisDataSet", "ImarisDataSet"),
            ("ImarisVersion", "5.5.0"),
            ("DataSetDirectoryName", "DataSet"),
            ("DataSetInfoDirectoryName", "DataSetInfo"),
            ("ThumbnailDirectoryName", "Thumbnail"),
        ]:
            _set_str(f, name, value)
        f.attrs.create("NumberOfDataSets", np.array([1], dtype=np.uint32))

        for r, level in enumerate(truth):
            shape = level[0][0].shape
            chunk = tuple(min(k, n) for k, n in zip(chunks, shape))
            padded = tuple(-(-n // k) * k for n, k in zip(shape, chunk))
            for t, per_channel in enumerate(level):
                for c, volume in enumerate(per_channel):
                    group = f.create_group(f"DataSet/ResolutionLevel {r}/TimePoint {t}/Channel {c}")
                    for axis, n in zip("ZYX", shape):
                        _set_str(group, f"ImageSize{axis}", n)
                    stored = np.full(padded, _junk(volume.dtype), dtype=volume.dtype)
                    stored[: shape[0], : shape[1], : shape[2]] = volume
                    group.create_dataset("Data", data=stored, chunks=chunk, **_filters(compression, shuffle))
                    _histogram(group, volume, 256, "")
                    if volume.dtype.itemsize == 2:
                        _histogram(group, volume, 1024, "1024")

        image = f.create_group("DataSetInfo/Image")
        for axis, n in zip("XYZ", size):
            _set_str(image, axis, n)
        for i in range(3):
            _set_str(image, f"ExtMin{i}", _f3(extent_min[i]))
            _set_str(image, f"ExtMax{i}", _f3(extent_max[i]))
        _set_str(image, "Unit", unit)
        _set_str(image, "Noc", n_c)
        _set_str(image, "Name", Path(path).stem)
        _set_str(image, "Description", "(description not specified)")
        _set_str(image, "RecordingDate", _timestamp(0))

        for c in range(n_c):
            channel = f.create_group(f"DataSetInfo/Channel {c}")
            _set_str(channel, "Name", names[c])
            _set_str(channel, "Description", "(description not specified)")
            _set_str(channel, "Color", " ".join(_f3(v) for v in colors[c]))
            _set_str(channel, "ColorRange", " ".join(_f3(v) for v in color_ranges[c]))
            _set_str(channel, "ColorOpacity", "1.000")
            _set_str(channel, "ColorMode", "BaseColor")

        time_info = f.create_group("DataSetInfo/TimeInfo")
        _set_str(time_info, "DataSetTimePoints", n_t)
        _set_str(time_info, "FileTimePoints", n_t)
        for t in range(n_t):
            _set_str(time_info, f"TimePoint{t + 1}", _timestamp(t))  # numbered from 1, as ImarisWriter does

        _thumbnail(f, truth[-1][0][0])
    return truth


def _timestamp(t: int) -> str:
    """Time point t is t seconds after the recording start, formatted "YYYY-MM-DD HH:MM:SS.SSS"."""
    return (START + datetime.timedelta(seconds=t)).strftime("%Y-%m-%d %H:%M:%S.000")
