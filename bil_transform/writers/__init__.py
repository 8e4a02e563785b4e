"""The views a dataset is served as, by URL name: a format, optionally followed by `-` and the
compressor (zarr views: `zarr3-zstd`) or the encoding (precomputed views: `precomputed-sharded-jpeg`)."""

from __future__ import annotations

from ..cache import Section
from ..pyramid import Pyramid
from .codecs import COMPRESSORS
from .omezarr import OmeZarrV2, OmeZarrV3, label_frame
from .precomputed import ENCODINGS, Precomputed, default_encoding, served_dtype, supported
from .resource import Resource
from .sharding import Shard

ZARR_FORMATS = ("zarr", "zarr3", "zarr3-sharded")
PRECOMPUTED_FORMATS = ("precomputed", "precomputed-sharded")


def parse_view(name: str) -> tuple[str, str | None]:
    """(format, option) of a view name. KeyError, with a sentence, if there is no such view."""
    for fmt in sorted((*ZARR_FORMATS, *PRECOMPUTED_FORMATS), key=len, reverse=True):
        if name == fmt or name.startswith(fmt + "-"):
            option = name[len(fmt) + 1:] or None
            choices = COMPRESSORS if fmt in ZARR_FORMATS else ENCODINGS
            if option is not None and option not in choices:
                raise KeyError(f"No view {name!r}: after {fmt}- comes one of {', '.join(choices)}")
            return fmt, option
    raise KeyError(f"No view {name!r}; the views are {', '.join((*ZARR_FORMATS, *PRECOMPUTED_FORMATS))}")


def make_view(pyramid: Pyramid, name: str, chunks: Section, *, compression: str, encoding: str | None,
              t: int | None = None, channel: int | None = None,
              labels: dict[str, Pyramid] | None = None) -> OmeZarrV2 | OmeZarrV3 | Precomputed:
    """The view called `name`, with the dataset's compression and encoding unless the name picks
    one, keeping what it encodes in `chunks`; zarr views serve `labels` (label pyramids by name)
    under labels/, each placed on the image level whose shape it has (others are left out).
    KeyError if there is no such view, ValueError if it cannot hold this data."""
    fmt, option = parse_view(name)
    if fmt in ZARR_FORMATS:
        if t is not None or channel is not None:
            raise KeyError(f"No view {name!r} of one time point or channel: zarr views hold them all")
        placed = {n: (p, frame) for n, p in (labels or {}).items() if (frame := label_frame(pyramid, p))}
        if fmt == "zarr":
            return OmeZarrV2(pyramid, chunks, pyramid.key[0], option or compression, labels=placed)
        return OmeZarrV3(pyramid, chunks, pyramid.key[0], option or compression, sharded=fmt == "zarr3-sharded",
                         labels=placed)
    return Precomputed(pyramid, chunks, option or encoding, t or 0, channel, sharded=fmt == "precomputed-sharded")


def precomputed_encodings(pyramid: Pyramid) -> list[str]:
    """Encodings the precomputed view of all channels can use for this dataset."""
    vol = pyramid.volume
    dtype = served_dtype(vol.dtype, vol.kind)
    return [e for e in ENCODINGS if supported(e, dtype, vol.shape[1])]


__all__ = ["Resource", "Shard", "make_view", "parse_view", "precomputed_encodings", "default_encoding",
           "served_dtype"]
