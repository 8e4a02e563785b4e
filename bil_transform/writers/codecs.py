"""Byte compressors shared by the Zarr views, by name, with their zarr v2 and v3 metadata."""

from __future__ import annotations

import numcodecs
import numpy as np
from numcodecs.abc import Codec

COMPRESSORS: dict[str, Codec | None] = {
    "blosc": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
    "blosc-zstd": numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
    "zstd": numcodecs.Zstd(level=3),
    "gzip": numcodecs.GZip(level=5),
    "none": None,
}
BLOSC_SHUFFLE = {numcodecs.Blosc.NOSHUFFLE: "noshuffle", numcodecs.Blosc.SHUFFLE: "shuffle",
                 numcodecs.Blosc.BITSHUFFLE: "bitshuffle"}


class Compressor:
    """One named compressor: how it encodes a chunk and how each zarr version describes it."""

    def __init__(self, name: str):
        if name not in COMPRESSORS:
            raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}")
        self.name, self.codec = name, COMPRESSORS[name]

    def encode(self, chunk: np.ndarray) -> bytes:
        """C-order little-endian bytes, compressed. Blosc is handed the array so that it
        shuffles by the item size, which is what makes it worth using on 16-bit data."""
        chunk = np.ascontiguousarray(chunk, dtype=chunk.dtype.newbyteorder("<"))
        return bytes(self.codec.encode(chunk)) if self.codec else chunk.tobytes()

    def v2(self) -> dict | None:
        return self.codec.get_config() if self.codec else None

    def v3(self, dtype: np.dtype) -> list[dict]:
        """The bytes-to-bytes codecs after `bytes` in a zarr v3 codec chain."""
        if self.codec is None:
            return []
        conf = self.codec.get_config()
        if conf["id"] == "blosc":
            return [{"name": "blosc", "configuration": {
                "cname": conf["cname"], "clevel": conf["clevel"], "shuffle": BLOSC_SHUFFLE[conf["shuffle"]],
                "typesize": dtype.itemsize, "blocksize": conf["blocksize"]}}]
        if conf["id"] == "zstd":
            checksum = conf.get("checksum", False)
            return [{"name": "zstd", "configuration": {"level": conf["level"], "checksum": checksum}}]
        return [{"name": "gzip", "configuration": {"level": conf["level"]}}]
