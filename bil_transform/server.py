"""HTTP: route, parse, hand CPU work to the worker pool, stream bytes. Never blocks the event loop."""

from __future__ import annotations

import array
import asyncio
import gzip
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from aiohttp import web

from . import pages
from .cache import ChunkCache
from .catalog import Dataset
from .readers import SourceError
from .writers import Resource, Shard, make_view
from .writers.resource import BINARY
from .writers.thumbnail import thumbnail

log = logging.getLogger("bil_transform")

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Content-Length, Content-Range, Content-Encoding, ETag, Accept-Ranges",
}
PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "range, if-none-match, if-range, content-type",
    "Access-Control-Max-Age": "86400",
}
DATASETS = web.AppKey("datasets", dict)
CACHE = web.AppKey("cache", ChunkCache)
POOL = web.AppKey("pool", ThreadPoolExecutor)
STATE = web.AppKey("state", dict)
VIEW = r"{view:(?:zarr3?|precomputed)(?:-[a-z0-9_-]+)?}"
RANGE = re.compile(r"bytes=(?P<first>\d*)-(?P<last>\d*)")
CACHE_CONTROL = "public, max-age=3600"  # derived bytes change only with the source, and then so do their ETags


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
        response = _error(exc.status, reason)
        response.headers.update({k: v for k, v in exc.headers.items() if k in ("Retry-After", "Content-Range")})
        return response
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


async def _cached(request: web.Request, key: Any, produce: Callable[[], bytes]) -> bytes:
    cache = request.app[CACHE]
    body = cache.get(key)
    return body if body is not None else await _in_pool(request, cache.get_or_compute, key, produce)


def _dataset(request: web.Request, *, usable: bool = True) -> Dataset:
    ident = request.match_info["id"]
    ds = request.app[DATASETS].get(ident)
    if ds is None:
        raise web.HTTPNotFound(text=f"No dataset with id {ident!r}")
    if usable and ds.pyramid is None:
        raise web.HTTPNotFound(text=f"Dataset {ident!r} is unavailable: {ds.error}")
    return ds


async def _current(request: web.Request) -> Dataset:
    """The dataset, reopened first if its files changed since they were last checked."""
    ds = _dataset(request, usable=False)
    if ds.check_due():
        await _in_pool(request, ds.refresh)
    return _dataset(request)


def _base_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


def _json(doc: Any) -> web.Response:
    return web.Response(body=json.dumps(doc, indent=1).encode(), content_type="application/json")


def _range_asked(request: web.Request, tag: str) -> re.Match | None:
    """The one byte range a request asks for, or None to send the whole body: no Range, a stale
    If-Range, several ranges or another unit (all of which a server may answer in full)."""
    spec = request.headers.get("Range", "").strip()
    if not spec.startswith("bytes=") or "," in spec or request.headers.get("If-Range", tag) != tag:
        return None
    m = RANGE.fullmatch(spec)
    if m is None or not (m["first"] or m["last"]) or (m["first"] and m["last"] and int(m["first"]) > int(m["last"])):
        raise web.HTTPBadRequest(text=f"Range {spec!r} must be bytes=FIRST-LAST, bytes=FIRST- or "
                                      "bytes=-SUFFIX_LENGTH, with FIRST <= LAST")
    return m


def _span(asked: re.Match, total: int) -> tuple[int, int]:
    """[start, stop) of a body of `total` bytes; 416 if none of it is there."""
    first, last = asked["first"], asked["last"]
    if first:
        start, stop = int(first), min(total, int(last) + 1) if last else total
    else:  # the last N bytes
        start, stop = (max(0, total - int(last)) if int(last) else total), total
    if start >= total:
        raise web.HTTPRequestRangeNotSatisfiable(
            text=f"The range {asked.string!r} starts past the end of the {total}-byte body",
            headers={"Content-Range": f"bytes */{total}"})
    return start, stop


def _if_none_match(request: web.Request, tag: str) -> bool:
    header = request.headers.get("If-None-Match")
    if header is None:
        return False
    return header.strip() == "*" or tag in (t.strip().removeprefix("W/") for t in header.split(","))


async def _shard_lengths(request: web.Request, shard: Shard) -> list[int]:
    """Every chunk's encoded length; only chunks whose length is not known in advance are encoded.
    Those lengths are kept in the cache, as clients read a shard in many ranges."""
    unknown = [c for c in shard.chunks if c is not None and c.length is None]
    if not unknown:
        return [0 if c is None else c.length for c in shard.chunks]
    key = ("shard-lengths", shard.key)
    known = request.app[CACHE].get(key)
    if known is None:
        bodies = await asyncio.gather(*(_cached(request, c.key, c.produce) for c in unknown))
        found = {c.key: len(b) for c, b in zip(unknown, bodies)}
        lengths = [0 if c is None else c.length if c.length is not None else found[c.key] for c in shard.chunks]
        known = request.app[CACHE].get_or_compute(key, lambda: array.array("Q", lengths).tobytes())
    return array.array("Q", known).tolist()


async def _shard_bytes(request: web.Request, shard: Shard, lengths: list[int], start: int, stop: int) -> bytes:
    """Bytes [start, stop) of the shard, encoding only the chunks they overlap."""

    async def part(offset: int, length: int, i: int | None) -> bytes:
        if i is None:
            data = shard.index(lengths)
        else:
            chunk = shard.chunks[i]
            data = await _cached(request, chunk.key, chunk.produce)
            if len(data) != length:
                raise RuntimeError(f"chunk {chunk.key} is {len(data)} bytes, not the {length} its index says")
        return data[max(0, start - offset):stop - offset]

    wanted = [s for s in shard.segments(lengths) if s[0] < stop and s[0] + s[1] > start]
    return b"".join(await asyncio.gather(*(part(*s) for s in wanted)))


async def _serve(request: web.Request, res: Resource | Shard) -> web.Response:
    """Bytes with a strong ETag, 304, byte ranges (206/416) and HEAD, computing no more than the
    answer needs. A whole-body GET of a compressible resource is gzip-encoded (and cached so) when
    the client accepts it; ranges and HEAD always describe the identity body."""
    tag = hashlib.blake2b(repr(res.key).encode(), digest_size=12).hexdigest()
    headers = {"Cache-Control": CACHE_CONTROL, "Accept-Ranges": "bytes"}
    content_type = BINARY if isinstance(res, Shard) else res.content_type
    compressible = isinstance(res, Resource) and res.compressible
    asked = _range_asked(request, f'"{tag}"')
    gzipped = (compressible and asked is None and request.method == "GET"
               and "gzip" in request.headers.get("Accept-Encoding", ""))
    if compressible:
        headers["Vary"] = "Accept-Encoding"
    headers["ETag"] = f'"{tag}-gzip"' if gzipped else f'"{tag}"'
    if _if_none_match(request, headers["ETag"]):
        return web.Response(status=304, headers=headers)

    if isinstance(res, Shard):
        lengths = await _shard_lengths(request, res)
        total = res.index_length + sum(lengths)

        async def read(start: int, stop: int) -> bytes:
            return await _shard_bytes(request, res, lengths, start, stop)
    else:
        body = None
        if res.length is None or request.method != "HEAD" or asked is not None:
            body = await _cached(request, res.key, res.produce)
        total = len(body) if body is not None else res.length

        async def read(start: int, stop: int) -> bytes:
            return body if (start, stop) == (0, len(body)) else body[start:stop]

    status, (start, stop) = (200, (0, total)) if asked is None else (206, _span(asked, total))
    if asked is not None:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
    if request.method == "HEAD":
        return web.Response(status=status, headers={**headers, "Content-Length": str(stop - start)},
                            content_type=content_type)
    data = await read(start, stop)
    if gzipped:
        data = await _cached(request, ("gzip", res.key), lambda: gzip.compress(data, compresslevel=5, mtime=0))
        headers["Content-Encoding"] = "gzip"
    return web.Response(status=status, body=data, content_type=content_type, headers=headers)


async def dataset_view(request: web.Request) -> web.Response:
    """/ds/{id}[/t/{t}][/c/{c}]/{view}/{key}: every format view of every dataset."""
    ds = await _current(request)
    name, key = request.match_info["view"], request.match_info["key"]
    t, c = (int(request.match_info[k]) if k in request.match_info else None for k in ("t", "c"))
    try:
        view = make_view(ds.pyramid, name, compression=ds.spec.compression, encoding=ds.spec.encoding, t=t, channel=c)
    except KeyError as exc:
        raise web.HTTPNotFound(text=exc.args[0]) from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    try:
        res = view.resource(key)
    except KeyError:
        raise web.HTTPNotFound(text=f"No key {key!r} in the {name} view of {ds.spec.id!r}") from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return await _serve(request, res)


async def dataset_thumbnail(request: web.Request) -> web.Response:
    return await _serve(request, thumbnail((await _current(request)).pyramid))


async def list_datasets(request: web.Request) -> web.Response:
    query, base = request.query.get("q", ""), _base_url(request)
    found = [ds for ds in request.app[DATASETS].values() if ds.matches(query)]
    viewer = request.app[STATE]["viewer"]
    return _json(await _in_pool(request, lambda: [{**ds.summary(), "links": pages.links(ds, base, viewer)}
                                                   for ds in found]))


async def get_dataset(request: web.Request) -> web.Response:
    ds = _dataset(request, usable=False)
    base, viewer = _base_url(request), request.app[STATE]["viewer"]
    return _json(await _in_pool(request, lambda: {**ds.describe(), "links": pages.links(ds, base, viewer)}))


async def index(request: web.Request) -> web.Response:
    datasets, base = list(request.app[DATASETS].values()), _base_url(request)
    page = await _in_pool(request, pages.index_html, datasets, base, request.app[STATE]["viewer"])
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


def create_app(datasets: dict[str, Dataset], cache: ChunkCache, workers: int | None = None,
               viewer: str = pages.DEFAULT_VIEWER) -> web.Application:
    app = web.Application(middlewares=[errors_and_cors])
    # One thread per core: chunk assembly is partly Python, and extra threads only fight over the
    # GIL (benchmarks/serve_throughput.py --workers N). Storage with high latency wants more.
    workers = workers or os.cpu_count() or 1
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bil-worker")
    app[DATASETS], app[CACHE], app[POOL] = datasets, cache, pool
    app[STATE] = {"queued": 0, "max_queued": workers * 256, "viewer": viewer}
    app.router.add_get("/", index)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/api/datasets", list_datasets)
    app.router.add_get("/api/datasets/{id}", get_dataset)
    app.router.add_get("/ds/{id}/thumbnail.png", dataset_thumbnail)
    for selector in ("", r"/t/{t:\d+}", r"/c/{c:\d+}", r"/t/{t:\d+}/c/{c:\d+}"):
        app.router.add_get(f"/ds/{{id}}{selector}/{VIEW}/{{key:.*}}", dataset_view)

    async def shutdown(app: web.Application) -> None:
        pool.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(shutdown)
    return app
