"""HDF5 chunks read raw and decompressed here, outside h5py's global lock (h5py serializes every
HDF5 call, so decompressing inside it keeps a second worker idle): shared by the Imaris and
BigDataViewer readers. One HDF5 call a chunk; each filter decodes into a buffer of the known
size (benchmarks/bdv_readers.py: 1.3-4x faster than a chunk lookup, a read and zlib)."""

from __future__ import annotations

from dataclasses import dataclass

import h5py
import imagecodecs
import numpy as np

# The HDF5 filters microscopy writers use (Imaris: deflate, shuffle, LZ4; Fiji and h5py: deflate, lzf,
# shuffle, fletcher32), undone in reverse order of the pipeline.
DEFLATE, SHUFFLE, FLETCHER32, LZF, LZ4 = 1, 2, 3, 32000, 32004


@dataclass(frozen=True)
class Chunked:
    """How one dataset's chunks are decoded; read once, as h5py's properties each call HDF5."""

    pipeline: tuple[int, ...]  # filter ids in write order
    chunks: tuple[int, int, int]
    dtype: np.dtype
    fill: object
    nbytes: int


def chunk_layout(data: h5py.Dataset, min_bytes: int = 0) -> Chunked | None:
    """The dataset's chunking and filters; None where HDF5 had better read a region itself: not
    chunked, a filter not decoded here, or chunks under `min_bytes`."""
    if data.chunks is None:
        return None
    plist = data.id.get_create_plist()
    ids = tuple(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
    nbytes = data.dtype.itemsize * int(np.prod(data.chunks))
    if not set(ids) <= {DEFLATE, SHUFFLE, FLETCHER32, LZF, LZ4} or nbytes < min_bytes:
        return None
    return Chunked(ids, data.chunks, data.dtype, data.fillvalue, nbytes)


def decode_chunk(dsid: h5py.h5d.DatasetID, origin: tuple[int, ...], layout: Chunked) -> np.ndarray:
    """One whole chunk, read-only: its raw bytes read through HDF5 (a chunk never written is looked
    up only when that read fails: the fill value), then decompressed here."""
    try:
        mask, raw = dsid.read_direct_chunk(origin)
    except Exception:
        if dsid.get_chunk_info_by_coord(origin).byte_offset is None:
            return np.full(layout.chunks, layout.fill, layout.dtype)
        raise
    pipeline = layout.pipeline
    for i in reversed(range(len(pipeline))):
        if mask & (1 << i):
            continue  # the writer skipped this filter for this chunk
        size = layout.nbytes + 4 * (FLETCHER32 in pipeline[:i])  # what this filter was given when written
        if pipeline[i] == DEFLATE:
            raw = imagecodecs.deflate_decode(raw, out=size)
        elif pipeline[i] == LZF:
            raw = imagecodecs.lzf_decode(raw, header=False, out=size)
        elif pipeline[i] == LZ4:
            raw = imagecodecs.lz4h5_decode(raw, out=size)
        elif pipeline[i] == SHUFFLE:
            raw = np.frombuffer(raw, np.uint8).reshape(layout.dtype.itemsize, -1).T.tobytes()
        elif pipeline[i] == FLETCHER32:
            raw = raw[:-4]
    block = np.frombuffer(raw, layout.dtype).reshape(layout.chunks)
    block.flags.writeable = False
    return block
