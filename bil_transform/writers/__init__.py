"""The views a dataset is served as, by URL name."""

from __future__ import annotations

from ..pyramid import Pyramid
from .omezarr import OmeZarrV2, Resource
from .precomputed import ENCODINGS, Precomputed, default_encoding, served_dtype, supported

VIEW_NAMES = ("zarr", "precomputed", *(f"precomputed-{e}" for e in ENCODINGS))


def make_view(pyramid: Pyramid, name: str, *, compression: str, encoding: str | None,
              t: int | None = None, channel: int | None = None) -> OmeZarrV2 | Precomputed:
    """The view called `name`. KeyError if there is no such view, ValueError if it cannot hold this data."""
    if name == "zarr" and t is None and channel is None:
        return OmeZarrV2(pyramid, pyramid.key[0], compression)
    if name.startswith("precomputed") and name in VIEW_NAMES:
        chosen = name.removeprefix("precomputed-") if name != "precomputed" else encoding
        return Precomputed(pyramid, chosen, t or 0, channel)
    raise KeyError(name)


def precomputed_encodings(pyramid: Pyramid) -> list[str]:
    """Encodings the precomputed view of all channels can use for this dataset."""
    vol = pyramid.volume
    dtype = served_dtype(vol.dtype, vol.kind)
    return [e for e in ENCODINGS if supported(e, dtype, vol.shape[1])]


__all__ = ["Resource", "VIEW_NAMES", "make_view", "precomputed_encodings", "default_encoding", "served_dtype"]
