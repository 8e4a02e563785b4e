"""The real Neuroglancer viewer, as a person would use it: the client bundled by the `neuroglancer`
package, served by that package's own server, rendered by Debian's Chromium (WebGL2 on SwiftShader,
no GPU) and driven by playwright. Used by tests/test_neuroglancer.py and benchmarks/.
"""

from __future__ import annotations

import io
import json
import math
import re
import shutil
import threading
import time
import urllib.parse
from dataclasses import dataclass

import neuroglancer
import numpy as np
import requests
from PIL import Image
from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--no-sandbox", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
]
SIZE = (800, 600)  # data panel, pixels


def link_state(link: str) -> neuroglancer.ViewerState:
    """The viewer state a Neuroglancer link carries after its `#!`."""
    return neuroglancer.ViewerState(json.loads(urllib.parse.unquote(link.split("#!", 1)[1])))


def show_link(base: str, ds: str, scale: float) -> Screen:
    """A dataset's "open in Neuroglancer" link (its /api/datasets/ID), shown in a Chromium of its own."""
    link = requests.get(f"{base}/api/datasets/{ds}").json()["links"]["neuroglancer"]
    browser = Browser()
    try:
        return browser.show(link_state(link), watch=base, scale=scale)
    finally:
        browser.close()


def layers(**named: neuroglancer.Layer) -> neuroglancer.ViewerState:
    """A viewer state holding just these layers."""
    state = neuroglancer.ViewerState()
    for name, layer in named.items():
        state.layers[name] = layer
    return state


@dataclass
class Exchange:
    method: str
    url: str
    status: int | None  # None: the request failed (network or CORS)
    error: str = ""
    range: str | None = None  # the request's Range header
    content_range: str | None = None  # the response's headers from here on
    content_length: int | None = None
    content_encoding: str | None = None


def _exchange(response) -> Exchange:
    headers = response.headers  # lower-case names
    length = headers.get("content-length")
    return Exchange(response.request.method, response.url, response.status,
                    range=response.request.headers.get("range"), content_range=headers.get("content-range"),
                    content_length=None if length is None else int(length),
                    content_encoding=headers.get("content-encoding"))


@dataclass
class Screen:
    image: np.ndarray  # (height, width, 4) uint8: the data panels only, no UI
    exchanges: list[Exchange]  # every request the page sent to the watched server, in order
    seconds: float  # from opening the page to every visible chunk drawn
    state: neuroglancer.ViewerState  # what the viewer settled on (position, dimensions, zoom)


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise RuntimeError("Debian's chromium is not installed: apt-get install chromium (.ci/run does this)")
    return path


def _wait(page, ready, deadline: float, message: str) -> None:
    """Poll `ready` while letting playwright deliver the page's events (it does so only inside its own calls)."""
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(message)
        page.wait_for_timeout(50)


def _one_screenshot(page, viewer: neuroglancer.Viewer, deadline: float, exchanges: list[Exchange]):
    """The viewer's own screenshot, which it takes once every visible chunk is drawn, with the state it drew."""
    done = threading.Event()
    replies: list = []
    viewer.async_screenshot(lambda reply: (replies.append(reply), done.set()))
    _wait(page, done.is_set, deadline, f"Neuroglancer did not finish drawing; requests: {exchanges}")
    return replies[0]


def _screenshot(page, viewer: neuroglancer.Viewer, deadline: float, exchanges: list[Exchange], ready):
    """A screenshot of a state that is `ready`, and that state. The page gets state changes and screenshot
    requests on separate channels, so a screenshot can be drawn before the last change arrives: take it
    again. The state it was drawn in is the truth: `viewer.state` can lag the page (it once lacked the
    `t` dimension the page drew in), and CI once compared a screenshot with a view it did not show."""
    while not ready((reply := _one_screenshot(page, viewer, deadline, exchanges)).viewer_state):
        if time.monotonic() > deadline:
            raise TimeoutError(f"Neuroglancer drew {reply.viewer_state} and never the state asked for")
    return reply


def _as_asked(drawn: neuroglancer.ViewerState, scale: float | None) -> bool:
    """Whether a screenshot drawn in state `drawn` shows what `show` asked for: palettes closed, the zoom set."""
    return not drawn.tool_palettes and (scale is None or math.isclose(drawn.cross_section_scale, scale, rel_tol=1e-6))


class Browser:
    """One headless Chromium for many views; each view gets a fresh Neuroglancer viewer and page."""

    def __init__(self):
        neuroglancer.set_server_bind_address("127.0.0.1")
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()

    def show(self, state: neuroglancer.ViewerState, watch: str, scale: float | None = None,
             layout: str = "xy", settled=lambda state: True, timeout: float = 120) -> Screen:
        """Open a viewer on `state` (in a fresh browser context: nothing cached), wait until everything
        visible is drawn, and return the pixels with every request the page sent to URLs under `watch`.

        `settled(state)` says when the viewer has finished setting itself up (for a pasted source it
        splits channels and opens a shader-controls palette over the data, which is closed here)."""
        viewer = neuroglancer.Viewer()
        viewer.set_state(state)
        with viewer.txn() as s:
            s.layout = layout
            s.show_axis_lines = s.show_default_annotations = s.show_scale_bar = False
        with viewer.config_state.txn() as s:
            s.show_ui_controls = s.show_panel_borders = False
            s.viewer_size = list(SIZE)
        exchanges: list[Exchange] = []
        page = self._browser.new_page(viewport={"width": SIZE[0], "height": SIZE[1]})
        page.on("response", lambda r: r.url.startswith(watch) and exchanges.append(_exchange(r)))
        page.on("requestfailed", lambda r: r.url.startswith(watch) and exchanges.append(
            Exchange(r.method, r.url, None, r.failure or "failed", range=r.headers.get("range"))))
        try:
            start = time.monotonic()
            page.goto(viewer.get_viewer_url())
            deadline = start + timeout
            _wait(page, lambda: viewer.state.dimensions.names and viewer.state.position is not None
                  and settled(viewer.state), deadline, f"Neuroglancer did not open the sources; requests: {exchanges}")
            with viewer.txn() as s:
                s.tool_palettes = {}
                if scale is not None:  # voxels per pixel, once the sources have said what a voxel is
                    s.cross_section_scale = scale
            reply = _screenshot(page, viewer, deadline, exchanges, lambda drawn: _as_asked(drawn, scale))
            seconds = time.monotonic() - start
            page.wait_for_timeout(100)  # deliver the last network events
            image = np.asarray(Image.open(io.BytesIO(reply.screenshot.image)).convert("RGBA"))
            return Screen(image, list(exchanges), seconds, reply.viewer_state)
        finally:
            page.close()


METADATA = {"info", ".zattrs", ".zarray", ".zgroup", "zarr.json"}
# Keys a zarr:// source probes that the OME-Zarr 0.4 view rightly lacks: v3 metadata, and array
# metadata at the group root (CONFORMANCE.md section 3).
PROBES_404 = {"zarr.json", ".zarray"}


def check_range(ex: Exchange) -> int:
    """A 206 answers exactly the requested `Range` (CONFORMANCE.md section 7): its Content-Range says the
    requested bytes (the end clipped to the file), Content-Length says as many, nothing re-encodes the
    bytes. Returns the file's total size."""
    got = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+)", ex.content_range or "")
    assert got, f"{ex.method} {ex.url} Range {ex.range!r}: 206 with Content-Range {ex.content_range!r}"
    start, end, total = map(int, got.groups())
    asked = re.fullmatch(r"bytes=(\d*)-(\d*)", ex.range or "")
    assert asked and asked.group(1) + asked.group(2), f"{ex.url}: 206 to the Range header {ex.range!r}"
    first, last = asked.groups()
    if first:
        want = (int(first), min(int(last), total - 1) if last else total - 1)
    else:  # suffix
        want = (max(total - int(last), 0), total - 1)
    assert (start, end) == want, f"{ex.url} Range {ex.range} answered with Content-Range {ex.content_range}"
    assert ex.content_length in (None, end - start + 1), \
        f"{ex.url} Range {ex.range}: Content-Length {ex.content_length} for {end - start + 1} bytes"
    assert ex.content_encoding in (None, "identity"), f"{ex.url} Range {ex.range}: encoded {ex.content_encoding}"
    return total


def check_exchanges(screen: Screen, root: str, probes: set[str] = PROBES_404) -> list[str]:
    """Every request answered as the contract says: 200 or 304; 206 to a Range request, with the right
    Content-Range; a HEAD with the Content-Length of the identity body (Neuroglancer reads a file's
    size from it before a suffix read); 404 only for a probe named in `probes`. Every answer about one
    file agrees on its size. Returns the keys of the data (non-metadata) GETs."""
    assert screen.exchanges, "the viewer sent no request to the server"
    chunks = []
    sizes: dict[str, int] = {}
    for ex in screen.exchanges:
        key = ex.url.removeprefix(root + "/")
        name = key.rsplit("/", 1)[-1]
        if ex.status is None:  # the viewer cancels requests it no longer needs; anything else is a failure
            assert "ERR_ABORTED" in ex.error, \
                f"{ex.method} {ex.url} Range {ex.range} failed in the browser: {ex.error}"
            continue
        allowed = {200, 304} | ({206} if ex.range else set()) | ({404} if name in probes else set())
        assert ex.status in allowed, f"{ex.method} {ex.url} Range {ex.range} answered {ex.status}"
        size = None
        if ex.status == 206:
            size = check_range(ex)
        elif ex.status == 200 and ex.method == "HEAD":
            assert ex.content_length is not None and ex.content_encoding in (None, "identity"), \
                f"HEAD {ex.url}: Content-Length {ex.content_length}, Content-Encoding {ex.content_encoding}"
            size = ex.content_length
        elif ex.status == 200 and ex.content_encoding in (None, "identity") and ex.content_length is not None:
            size = ex.content_length
        if size is not None:
            assert sizes.setdefault(ex.url, size) == size, f"{ex.url} is {sizes[ex.url]} bytes and {size} bytes"
        if ex.method == "GET" and name not in METADATA:
            chunks.append(key)
    assert chunks, "the viewer requested no chunk"
    return chunks


def voxels_under_pixels(screen: Screen, shape_zyx: tuple[int, int, int]) -> tuple[np.ndarray, ...]:
    """The (z, y, x) level-0 voxel each panel pixel shows, from the viewer's settled position and zoom.

    The viewer opens at a voxel's centre (precomputed voxel i spans [i, i + 1), an OME-Zarr one is
    centred on i); a pixel shows the voxel under its own centre."""
    state = screen.state
    pos = {n: float(p) for n, p in zip(state.dimensions.names, state.position)}
    height, width = screen.image.shape[:2]
    step = float(state.cross_section_scale)

    def voxels(axis: str, n: int) -> np.ndarray:
        offsets = (np.arange(n) + 0.5 - n / 2) * step
        return (np.floor(pos[axis]) + np.floor(offsets + 0.5)).astype(int)

    xs, ys, z = voxels("x", width), voxels("y", height), int(np.floor(pos["z"]))
    assert 0 <= z < shape_zyx[0] and 0 <= xs.min() and xs.max() < shape_zyx[2] and 0 <= ys.min() and \
        ys.max() < shape_zyx[1], f"the view {pos} at zoom {step} is not inside the volume {shape_zyx}"
    return z, ys[:, None], xs[None, :]
