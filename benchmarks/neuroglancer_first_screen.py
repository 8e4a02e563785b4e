"""How long the real Neuroglancer viewer takes to fill its first screen of the demo, and what it asks for.

Why: the person pasting a URL into Neuroglancer waits for every chunk of the first view to be
computed on request. Baseline, in the same run: the very bytes the viewer fetched, written to disk
and served as static files (what converting the data ahead of time would give).

For each view (precomputed://, zarr://) the viewer opens in a fresh browser context (no HTTP
cache) in its default four-panel layout, 800 x 600, with the URL pasted as a person does:
  cold    a fresh server process (empty chunk cache; the OS page cache holds the slices)
  warm    the same server again (every chunk the view needs is cached)
  static  aiohttp's static file handler serving the bodies the warm run received
Times run from opening the page to Neuroglancer reporting every visible chunk drawn (its own
screenshot-when-ready signal). Runs are interleaved (each round: cold, warm, static for one view,
then the other view) and the median of --repeat rounds counts. The static server must return the
very bytes the server did. Requests are listed by kind and level.

Run: python benchmarks/neuroglancer_first_screen.py [--repeat N] [--data-dir DIR]
Needs the test extra (neuroglancer, playwright) and Debian's chromium, as the test suite does.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import statistics
import sys
import tempfile
import urllib.parse
from pathlib import Path

import neuroglancer
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from neuroglancer_browser import Browser, Screen  # noqa: E402
from serve_throughput import free_port, start  # noqa: E402

from bil_transform.demo import make_demo  # noqa: E402

CORS_STATIC_SERVER = """
import sys
from aiohttp import web

@web.middleware
async def cors(request, handler):
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
    response.headers["Access-Control-Allow-Origin"] = "*"
    return response

app = web.Application(middlewares=[cors])
app.add_routes([web.static("/", sys.argv[1])])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[2]), print=None, access_log=None)
"""
VIEWS = {"precomputed": "precomputed://{base}/ds/demo/precomputed", "zarr": "zarr://{base}/ds/demo/zarr"}


def start_server(stack: contextlib.ExitStack, catalog: Path, log: Path) -> str:
    port = free_port()
    cmd = [sys.executable, "-m", "bil_transform", "serve", "--config", str(catalog), "--port", str(port)]
    start(stack, cmd, port, "/healthz", log)
    return f"http://127.0.0.1:{port}"


def open_view(browser: Browser, source: str, base: str) -> Screen:
    pasted = {"type": "auto", "source": source.format(base=base), "name": "demo"}  # as a person pastes it
    screen = browser.show(neuroglancer.ViewerState({"layers": [pasted]}), watch=base, layout="4panel")
    failed = [e for e in screen.exchanges if e.status not in (200, 404) and "ERR_ABORTED" not in e.error]
    if failed:
        raise RuntimeError(f"requests failed: {failed}")
    return screen


def requests_by_kind(screen: Screen) -> str:
    """'info 200 x1, level 0 chunk x12, ...' for one page load."""
    kinds: collections.Counter = collections.Counter()
    for e in screen.exchanges:
        key = urllib.parse.urlsplit(e.url).path.split("/", 4)[-1]  # what follows /ds/demo/<view>/
        metadata = key.rsplit("/", 1)[-1] in ("info", ".zattrs", ".zarray", ".zgroup", "zarr.json")
        kinds[f"{e.method} {key} {e.status or e.error}" if metadata else f"level {key.split('/', 1)[0]} chunk"] += 1
    return ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items()))


def mirror(screen: Screen, base: str, root: Path) -> None:
    """Write every 200 body the viewer fetched, as identity bytes, under its URL path."""
    for e in screen.exchanges:
        if e.status == 200:
            path = root / urllib.parse.urlsplit(e.url).path.lstrip("/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(requests.get(e.url, headers={"Accept-Encoding": "identity"}, timeout=60).content)


class FirstScreens:
    """Interleaved first-screen runs of the demo: each `round(view)` gives one cold, warm and static time.

    The first round of a view also lists its requests and mirrors the bodies the warm run received into
    the static server's root (one static server for every view; it starts on first use)."""

    def __init__(self, stack: contextlib.ExitStack, browser: Browser, catalog: Path, tmp: Path):
        self.stack, self.browser, self.catalog, self.tmp = stack, browser, catalog, tmp
        self.static_root = tmp / "static-first-screen"
        self.static_base: str | None = None
        self.mirrored: set[str] = set()
        self.browser_ready = False

    def _static(self, view: str) -> str:
        if self.static_base is None:
            port = free_port()
            ready = "/ds/demo/" + ("precomputed/info" if view == "precomputed" else "zarr/.zattrs")
            start(self.stack, [sys.executable, "-c", CORS_STATIC_SERVER, str(self.static_root), str(port)], port,
                  ready, self.tmp / "static.log")
            self.static_base = f"http://127.0.0.1:{port}"
        return self.static_base

    def round(self, view: str) -> dict[str, float]:
        source = VIEWS[view]
        if not self.browser_ready:  # the browser's first page load compiles the viewer itself: pay it untimed
            with contextlib.ExitStack() as server:
                open_view(self.browser, source, start_server(server, self.catalog, self.tmp / "server.log"))
            self.browser_ready = True
        with contextlib.ExitStack() as server:
            base = start_server(server, self.catalog, self.tmp / "server.log")
            cold = open_view(self.browser, source, base)
            warm = open_view(self.browser, source, base)
            if view not in self.mirrored:
                print(f"{view}: {len(cold.exchanges)} requests: {requests_by_kind(cold)}", flush=True)
                mirror(warm, base, self.static_root)
                self.mirrored.add(view)
                static_base = self._static(view)
                for e in warm.exchanges:  # the baseline must serve the very same bytes
                    if e.status == 200:
                        path = urllib.parse.urlsplit(e.url).path
                        if requests.get(static_base + path, timeout=60).content != (
                                self.static_root / path.lstrip("/")).read_bytes():
                            raise AssertionError(f"the static server returned other bytes for {path}")
        static = open_view(self.browser, source, self._static(view))
        return {"cold": cold.seconds, "warm": warm.seconds, "static": static.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each measurement; the median counts")
    parser.add_argument("--data-dir", help="where the demo data is kept (default: the demo's own cache)")
    args = parser.parse_args()
    data = make_demo(Path(args.data_dir) if args.data_dir else None)
    runs: dict[str, dict[str, list[float]]] = {view: collections.defaultdict(list) for view in VIEWS}
    with tempfile.TemporaryDirectory(prefix="bil-ng-") as tmp, contextlib.ExitStack() as stack:
        catalog = Path(tmp) / "catalog.toml"
        catalog.write_text(f'[[datasets]]\nid = "demo"\npath = "{data}"\n')
        browser = Browser()
        stack.callback(browser.close)
        screens = FirstScreens(stack, browser, catalog, Path(tmp))
        for run in range(args.repeat):
            for view in VIEWS:
                for kind, seconds in screens.round(view).items():
                    runs[view][kind].append(seconds)
                print(f"round {run + 1} {view}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs[view].items()),
                      flush=True)
    print(f"\nfirst screen, seconds (median of {args.repeat})")
    print(f"{'view':12s} {'cold':>6s} {'warm':>6s} {'static':>7s} {'cold/static':>12s} {'warm/static':>12s}")
    for view, r in runs.items():
        t = {kind: statistics.median(v) for kind, v in r.items()}
        print(f"{view:12s} {t['cold']:6.2f} {t['warm']:6.2f} {t['static']:7.2f} {t['cold'] / t['static']:12.2f} "
              f"{t['warm'] / t['static']:12.2f}")


if __name__ == "__main__":
    main()
