"""A Python client for analysis code: a dataset's metadata, its levels as lazy dask arrays, and
any box at any scale as a numpy array, in three lines:

    from bil_transform.client import open_dataset
    ds = open_dataset("http://HOST:8000/ds/ID")
    box = ds.region(level=1, z=(0, 8), y=(0, 64), x=(0, 64), c=0)

Levels read the OME-Zarr view chunk by chunk (through zarr-python), regions come from the server's
region endpoint in one request. An embargoed dataset takes `token=`; it travels in the path
(/token/TOKEN/), which every client library passes on unchanged.
"""

from __future__ import annotations

import io
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from functools import cached_property

import dask.array as da
import numpy as np
import zarr

DATASET_URL = re.compile(r"(?P<base>https?://[^/]+)(?P<token>/token/[^/]+)?/ds/(?P<id>[^/?#]+)/?")


class ServerError(RuntimeError):
    """The server refused or failed a request; the message is its own sentence."""


def _get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=600) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        raise ServerError(f"{exc.code} from {url.split('/token/')[0]}...: {exc.read().decode().strip()}") from None


@dataclass(frozen=True)
class Dataset:
    root: str  # http://HOST[/token/TOKEN]/ds/ID
    metadata: dict  # what /api/datasets/ID says

    @cached_property
    def levels(self) -> list[da.Array]:
        """Every level as a lazy (t, c, z, y, x) dask array, chunked like the server's chunks."""
        group = zarr.open_group(f"{self.root}/zarr", mode="r")
        return [da.from_zarr(group[str(i)]) for i in range(len(self.metadata["levels"]))]

    def voxel_size(self, level: int = 0) -> tuple[float, float, float]:
        """(z, y, x) micrometers of a level's voxels."""
        factors = self.metadata["levels"][level]["factors"]
        return tuple(v * f for v, f in zip(self.metadata["voxel_size"], factors))

    def region(self, level: int = 0, z: tuple[int, int] | None = None, y: tuple[int, int] | None = None,
               x: tuple[int, int] | None = None, t: int | tuple[int, int] | None = None,
               c: int | tuple[int, int] | list[int] | None = None, coords: str = "level") -> np.ndarray:
        """A box of a level as numpy, (t, c, z, y, x); a `t` or `c` given as one number drops that
        axis, as numpy indexing does. Ranges are [start, stop) in the level's voxels, or level 0's
        with coords="full"."""
        query = {"level": level, "coords": coords}
        for axis, span in (("z", z), ("y", y), ("x", x), ("t", t), ("c", c)):
            if isinstance(span, int):
                query[axis] = str(span)
            elif isinstance(span, list):
                query[axis] = ",".join(map(str, span))
            elif span is not None:
                query[axis] = f"{span[0]}:{span[1]}"
        box = np.load(io.BytesIO(_get(f"{self.root}/region?{urllib.parse.urlencode(query)}")))
        return box[tuple(0 if isinstance(s, int) else slice(None) for s in (t, c))]


def open_dataset(url: str, token: str | None = None) -> Dataset:
    """The dataset at http://HOST/ds/ID (as the server's pages and API name it)."""
    m = DATASET_URL.fullmatch(url)
    if m is None:
        raise ValueError(f"{url!r} is not a dataset URL like http://HOST:8000/ds/ID")
    prefix = f"/token/{urllib.parse.quote(token, safe='')}" if token else (m["token"] or "")
    api = f"{m['base']}{prefix}/api/datasets/{m['id']}"
    return Dataset(f"{m['base']}{prefix}/ds/{m['id']}", json.loads(_get(api)))
