"""HTTP: route, parse, hand CPU work to the worker pool, stream bytes. Never blocks the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import html
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from .cache import ChunkCache
from .catalog import Dataset
from .readers import SourceError
from .writers.omezarr import OmeZarrV2, Resource

log = logging.getLogger("bil_transform")

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Content-Length, Content-Range, Content-Encoding, ETag, Accept-Ranges",
}
PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "range, if-none-match, content-type",
    "Access-Control-Max-Age": "86400",
}
DATASETS = web.AppKey("datasets", dict)
CACHE = web.AppKey("cache", ChunkCache)
POOL = web.AppKey("pool", ThreadPoolExecutor)
STATE = web.AppKey("state", dict)


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message.rstrip(".") + ".\n", headers=CORS)


@web.middleware
async def errors_and_cors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every response carries CORS headers; every failure is one sentence with the right status.
    OPTIONS preflights are answered here for every path, so routes need not list them."""
    if request.method == "OPTIONS":
        return web.Response(status=204, headers=PREFLIGHT)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            exc.headers.update(CORS)
            raise
        reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        return _error(exc.status, reason)
    except SourceError as exc:
        log.warning("source error on %s: %s", request.path, exc)
        return _error(500, f"The source data cannot be read: {exc}")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("internal error on %s", request.path)
        return _error(500, f"Internal error while serving {request.path}: {type(exc).__name__}")
    response.headers.update(CORS)
    return response


async def _in_pool(request: web.Request, fn: Callable[..., Any], *args) -> Any:
    """Run CPU or I/O work in the worker pool; shed load with 503 when the queue is too deep."""
    state = request.app[STATE]
    if state["queued"] >= state["max_queued"]:
        raise web.HTTPServiceUnavailable(text="The server is busy; retry shortly", headers={"Retry-After": "1"})
    state["queued"] += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(request.app[POOL], fn, *args)
    finally:
        state["queued"] -= 1


def _dataset(request: web.Request) -> Dataset:
    ident = request.match_info["id"]
    ds = request.app[DATASETS].get(ident)
    if ds is None:
        raise web.HTTPNotFound(text=f"No dataset with id {ident!r}")
    if ds.pyramid is None:
        raise web.HTTPNotFound(text=f"Dataset {ident!r} is unavailable: {ds.error}")
    return ds


def _base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _json(doc: Any) -> web.Response:
    return web.Response(body=json.dumps(doc, indent=1).encode(), content_type="application/json")


async def _serve_resource(request: web.Request, res: Resource) -> web.Response:
    cache = request.app[CACHE]
    body = cache.get(res.key)
    if body is None:
        body = await _in_pool(request, cache.get_or_compute, res.key, res.produce)
    etag = '"' + hashlib.blake2b(repr(res.key).encode(), digest_size=12).hexdigest() + '"'
    headers = {"ETag": etag, "Cache-Control": "public, max-age=3600"}
    if etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=res.content_type, headers=headers)


async def zarr_v2(request: web.Request) -> web.Response:
    ds = _dataset(request)
    view = OmeZarrV2(ds.pyramid, ds.spec.id, ds.spec.compression)
    key = request.match_info["key"]
    try:
        res = view.resource(key)
    except KeyError:
        raise web.HTTPNotFound(text=f"No key {key!r} in the OME-Zarr view of {ds.spec.id!r}") from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return await _serve_resource(request, res)


async def list_datasets(request: web.Request) -> web.Response:
    query = request.query.get("q", "")
    base = _base_url(request)
    found = [ds for ds in request.app[DATASETS].values() if ds.matches(query)]
    return _json([{**ds.summary(), "links": _links(base, ds)} for ds in found])


async def get_dataset(request: web.Request) -> web.Response:
    ident = request.match_info["id"]
    ds = request.app[DATASETS].get(ident)
    if ds is None:
        raise web.HTTPNotFound(text=f"No dataset with id {ident!r}")
    doc = await _in_pool(request, ds.describe)
    return _json({**doc, "links": _links(_base_url(request), ds)})


def _links(base: str, ds: Dataset) -> dict:
    links = {"self": f"{base}/api/datasets/{ds.spec.id}"}
    if ds.pyramid is not None:
        links["zarr"] = f"{base}/ds/{ds.spec.id}/zarr"
    return links


async def index(request: web.Request) -> web.Response:
    base = _base_url(request)
    rows = []
    for ds in request.app[DATASETS].values():
        s = ds.summary()
        title = html.escape(str(s.get("title", ds.spec.id)))
        if ds.pyramid is None:
            rows.append(f"<tr><td>{html.escape(ds.spec.id)}</td><td>{title}</td><td colspan=4>unavailable: "
                        f"{html.escape(ds.error or '')}</td></tr>")
            continue
        zarr_url = html.escape(_links(base, ds)["zarr"])
        rows.append(
            f"<tr><td>{html.escape(ds.spec.id)}</td><td>{title}</td><td>{' x '.join(map(str, s['shape']))}</td>"
            f"<td>{s['dtype']}</td><td>{' x '.join(f'{v:g}' for v in s['voxel_size'])} &micro;m</td>"
            f"<td><a href=\"{zarr_url}/.zattrs\">{zarr_url}</a></td></tr>"
        )
    page = (
        "<!doctype html><html><head><meta charset=utf-8><meta name=viewport content='width=device-width'>"
        "<title>bil-transform</title><style>body{font-family:sans-serif;margin:1em}td,th{padding:.3em .6em;"
        "text-align:left}tr:nth-child(even){background:#f4f4f4}</style></head><body><h1>bil-transform</h1>"
        "<table><tr><th>id</th><th>title</th><th>shape (t, c, z, y, x)</th><th>dtype</th>"
        "<th>voxel (z, y, x)</th><th>OME-Zarr</th></tr>" + "".join(rows) + "</table></body></html>"
    )
    return web.Response(text=page, content_type="text/html")


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def metrics(request: web.Request) -> web.Response:
    stats = request.app[CACHE].stats()
    lines = [f"bil_transform_cache_{k} {v}" for k, v in stats.items()]
    lines.append(f"bil_transform_queued_jobs {request.app[STATE]['queued']}")
    datasets = request.app[DATASETS].values()
    lines.append(f"bil_transform_datasets{{status=\"ok\"}} {sum(ds.pyramid is not None for ds in datasets)}")
    lines.append(f"bil_transform_datasets{{status=\"error\"}} {sum(ds.pyramid is None for ds in datasets)}")
    return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


def create_app(datasets: dict[str, Dataset], cache: ChunkCache, workers: int | None = None) -> web.Application:
    app = web.Application(middlewares=[errors_and_cors])
    # One thread per core: chunk assembly is partly Python, and extra threads only fight over the
    # GIL (benchmarks/serve_throughput.py --workers N). Storage with high latency wants more.
    workers = workers or os.cpu_count() or 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bil-worker")
    app[DATASETS], app[CACHE], app[POOL] = datasets, cache, pool
    app[STATE] = {"queued": 0, "max_queued": workers * 256}
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/datasets", list_datasets)
    app.router.add_get("/api/datasets/{id}", get_dataset)
    app.router.add_get("/ds/{id}/zarr/{key:.*}", zarr_v2)

    async def shutdown(app: web.Application) -> None:
        pool.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(shutdown)
    return app
