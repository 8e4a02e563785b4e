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
screenshot-when-ready signal), the best of --repeat. Requests are listed by kind and level.

Run: python benchmarks/neuroglancer_first_screen.py [--repeat N] [--data-dir DIR]
Needs the test extra (neuroglancer, playwright) and Debian's chromium, as the test suite does.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best counts")
    parser.add_argument("--data-dir", help="where the demo data is kept (default: the demo's own cache)")
    args = parser.parse_args()
    data = make_demo(Path(args.data_dir) if args.data_dir else None)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="bil-ng-") as tmp, contextlib.ExitStack() as stack:
        catalog = Path(tmp) / "catalog.toml"
        catalog.write_text(f'[[datasets]]\nid = "demo"\npath = "{data}"\n')
        browser = Browser()
        stack.callback(browser.close)
        for view, source in VIEWS.items():
            times: dict[str, float] = collections.defaultdict(lambda: float("inf"))
            for run in range(args.repeat):
                with contextlib.ExitStack() as server:
                    base = start_server(server, catalog, Path(tmp) / "server.log")
                    cold = open_view(browser, source, base)
                    warm = open_view(browser, source, base)
                    times["cold"], times["warm"] = min(times["cold"], cold.seconds), min(times["warm"], warm.seconds)
                    if run == 0:
                        print(f"{view}: {len(cold.exchanges)} requests: {requests_by_kind(cold)}", flush=True)
                        static_root = Path(tmp) / f"static-{view}"
                        mirror(warm, base, static_root)
            port = free_port()
            with contextlib.ExitStack() as static:
                start(static, [sys.executable, "-c", CORS_STATIC_SERVER, str(static_root), str(port)], port,
                      "/ds/demo/" + ("precomputed/info" if view == "precomputed" else "zarr/.zattrs"),
                      Path(tmp) / "static.log")
                for _ in range(args.repeat):
                    times["static"] = min(times["static"], open_view(browser, source, f"http://127.0.0.1:{port}").seconds)
            results[view] = dict(times)
            print(f"{view}: first screen cold {times['cold']:.2f} s, warm {times['warm']:.2f} s, "
                  f"static files {times['static']:.2f} s", flush=True)
    print("\nfirst screen, seconds (best of", args.repeat, ")")
    print(f"{'view':12s} {'cold':>6s} {'warm':>6s} {'static':>7s} {'cold/static':>12s} {'warm/static':>12s}")
    for view, t in results.items():
        print(f"{view:12s} {t['cold']:6.2f} {t['warm']:6.2f} {t['static']:7.2f} {t['cold'] / t['static']:12.2f} "
              f"{t['warm'] / t['static']:12.2f}")


if __name__ == "__main__":
    main()
