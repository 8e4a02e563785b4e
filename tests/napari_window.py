"""Real napari in a real Qt window: run as a script (never imported by pytest, so Qt never loads there).

    python napari_window.py OUT_DIR NAME=URL [NAME=URL ...]

For each URL it opens a fresh `napari.Viewer(show=True)` (on the X display in $DISPLAY), opens the URL
with the napari-ome-zarr plugin as a person would (`viewer.open(url, plugin="napari-ome-zarr")`), waits
until every layer has loaded the data it shows, and writes OUT_DIR/NAME.png (the canvas, as
`viewer.screenshot(canvas_only=True)` gives it) and OUT_DIR/NAME.json: every layer as napari holds it
(type, name, colormap, contrast limits, scale and translate of every level, level shapes, the level
drawn) and the view (dims point, camera centre and zoom, canvas size) that maps screenshot pixels
to world coordinates. Used by tests/test_napari_window.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

CANVAS = (640, 800)  # window size in pixels (height, width); the canvas is what is left by the dock widgets
LOAD_SECONDS = 60


def _wait_loaded(viewer, app, deadline: float) -> None:
    """Process Qt events until every layer reports its visible data loaded (napari may slice asynchronously)."""
    settled = 0
    while settled < 10:  # loaded, then a few more event rounds so the canvas has drawn it
        app.processEvents()
        time.sleep(0.02)
        if all(getattr(layer, "loaded", True) for layer in viewer.layers):
            settled += 1
        else:
            settled = 0
        if time.monotonic() > deadline:
            raise TimeoutError(f"layers not loaded within {LOAD_SECONDS} s: "
                               f"{[(layer.name, layer.loaded) for layer in viewer.layers]}")


def _layer(layer, point) -> dict:
    multiscale = bool(getattr(layer, "multiscale", False))
    levels = list(layer.data) if multiscale else [layer.data]
    colormap = getattr(layer, "colormap", None)
    return {
        "type": layer._type_string,
        "name": layer.name,
        "visible": bool(layer.visible),
        "blending": str(layer.blending),
        "colormap": None if colormap is None else colormap.name,
        "colormap_colors": None if getattr(colormap, "colors", None) is None
        else [[float(v) for v in c] for c in colormap.colors],
        "contrast_limits": [float(v) for v in layer.contrast_limits] if hasattr(layer, "contrast_limits") else None,
        "scale": [float(v) for v in layer.scale],
        "translate": [float(v) for v in layer.translate],
        # what napari's multiscale slicing applies on top of layer.scale for each level: the level's downsample
        "level_shapes": [[int(n) for n in level.shape] for level in levels],
        "level_downsample": [[float(v) for v in f] for f in layer.downsample_factors] if multiscale else [],
        "data_level": int(layer.data_level) if multiscale else 0,
        "multiscale": multiscale,
        "dtype": str(levels[0].dtype),
        "axis_labels": list(getattr(layer, "axis_labels", [])),
        "data_point": [float(v) for v in layer.world_to_data(point)],  # level-0 index under the dims point
    }


def show(url: str, png: Path, out: Path, app) -> None:
    import napari
    from PIL import Image

    started = time.monotonic()
    viewer = napari.Viewer(show=True, title=url)
    viewer.window._qt_window.resize(CANVAS[1], CANVAS[0])
    app.processEvents()
    layers = viewer.open(url, plugin="napari-ome-zarr")
    viewer.reset_view()
    _wait_loaded(viewer, app, started + LOAD_SECONDS)
    image = viewer.screenshot(canvas_only=True, flash=False)
    Image.fromarray(image).save(png)
    point = [float(v) for v in viewer.dims.point]
    camera = viewer.scene.camera
    report = {
        "url": url,
        "opened": [layer.name for layer in layers],
        "layers": [_layer(layer, point) for layer in viewer.layers],
        "dims": {"point": point, "axis_labels": list(viewer.dims.axis_labels), "ndisplay": viewer.dims.ndisplay,
                 "order": list(viewer.dims.order)},
        "camera": {"center": [float(v) for v in camera.center], "zoom": float(camera.zoom)},
        "canvas_size": [int(v) for v in viewer.canvas.size],  # logical pixels
        "screenshot_shape": list(image.shape),
        "seconds": time.monotonic() - started,
    }
    out.write_text(json.dumps(report, indent=1))
    viewer.close()
    app.processEvents()


def main(argv: list[str]) -> int:
    from napari.qt import get_qapp

    app = get_qapp()
    out_dir = Path(argv[0])
    for spec in argv[1:]:
        name, url = spec.split("=", 1)
        show(url, out_dir / f"{name}.png", out_dir / f"{name}.json", app)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
