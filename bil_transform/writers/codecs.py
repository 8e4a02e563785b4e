"""Byte compressors shared by the Zarr views, by name."""

from __future__ import annotations

import numcodecs
from numcodecs.abc import Codec

COMPRESSORS: dict[str, Codec | None] = {
    "blosc": numcodecs.Blosc(cname="lz4", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
    "blosc-zstd": numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
    "zstd": numcodecs.Zstd(level=3),
    "gzip": numcodecs.GZip(level=5),
    "none": None,
}


def compressor(name: str) -> Codec | None:
    try:
        return COMPRESSORS[name]
    except KeyError:
        raise ValueError(f"unknown compressor {name!r}; choose one of {', '.join(COMPRESSORS)}") from None
