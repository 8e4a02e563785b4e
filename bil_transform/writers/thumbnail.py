"""A small PNG of the middle z plane, at the finest level that fits, coloured like the channels."""

from __future__ import annotations

import imagecodecs
import numpy as np

from ..cache import Section
from ..pyramid import Pyramid
from .resource import Resource

SIZE = 256
MAX_CHANNELS = 3


def _level(pyramid: Pyramid) -> int:
    """The finest level whose plane fits in SIZE x SIZE (else the coarsest)."""
    for i, lvl in enumerate(pyramid.levels):
        if max(lvl.shape[1:]) <= SIZE:
            return i
    return len(pyramid.levels) - 1


def _label_colors(plane: np.ndarray) -> np.ndarray:
    """A stable pseudo-random colour per label; 0 stays black."""
    h = (plane.astype(np.uint64) * np.uint64(2654435761)) & np.uint64(0xFFFFFF)
    rgb = np.stack([(h >> np.uint64(s)) & np.uint64(0xFF) for s in (16, 8, 0)], -1).astype(np.uint8) | 0x40
    rgb[plane == 0] = 0
    return rgb


def render(pyramid: Pyramid) -> bytes:
    level = _level(pyramid)
    lvl = pyramid.levels[level]
    z = lvl.shape[0] // 2
    region = (slice(z, z + 1), slice(0, lvl.shape[1]), slice(0, lvl.shape[2]))
    vol = pyramid.volume
    if vol.kind == "labels":
        return imagecodecs.png_encode(_label_colors(pyramid.read(level, 0, 0, region)[0]))
    rgb = np.zeros((*lvl.shape[1:], 3), np.float32)
    for c in range(min(vol.shape[1], MAX_CHANNELS)):
        start, end = pyramid.display_window(c)
        plane = pyramid.read(level, 0, c, region)[0].astype(np.float32)
        scaled = np.clip((plane - start) / (end - start), 0, 1)
        color = np.array([int(vol.channels[c].color[i:i + 2], 16) / 255 for i in (0, 2, 4)], np.float32)
        rgb += scaled[..., None] * color
    return imagecodecs.png_encode((np.clip(rgb, 0, 1) * 255).astype(np.uint8))


def thumbnail(pyramid: Pyramid, cache: Section) -> Resource:
    return Resource(("thumbnail", *pyramid.key), lambda: render(pyramid), "image/png", cache)
