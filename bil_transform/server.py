"""HTTP: route, parse, hand CPU work to the worker pool, stream bytes. Never blocks the event loop."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from aiohttp import web

from . import access, jobs, openapi, pages, records, search
from .access import AccessDenied, Tokens
from .budget import Busy, InFlight
from .cache import Cache, Section
from .dataset import Dataset, Snapshot
from .logs import shown_path
from .metrics import CONTENT_TYPE, Metrics
from .pyramid import Pyramid
from .readers import SourceError
from .readers.files import checksummer, source_files, volume_files
from .workers import Workers
from .writers import ZARR_FORMATS, listing, make_view, parse_view
from .writers.manifest import Manifest
from .writers.region import Region, RegionBody, RegionTooLarge
from .writers.resource import Body
from .writers.skeleton_files import NoNeuron, SkeletonFiles, Unreadable
from .writers.thumbnail import thumbnail

log = logging.getLogger("bil_transform")

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Expose-Headers": "Content-Length, Content-Range, Content-Encoding, ETag, Accept-Ranges, "
                                     "X-Shape, X-Dtype",
}
PREFLIGHT = {
    **CORS,
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
    "Access-Control-Allow-Headers": "range, if-none-match, if-range, content-type, authorization",
    "Access-Control-Max-Age": "86400",
}
DATASETS = web.AppKey("datasets", dict)
SKELETONS = web.AppKey("skeletons", dict)  # skeleton sources (catalog kind = "skeletons"), by id
TRACED_ON = web.AppKey("traced_on", dict)  # image id -> the skeleton sources traced on it (the catalog's `space`)
CACHE = web.AppKey("cache", Cache)
CHUNKS = web.AppKey("chunks", Section)  # encoded bodies: chunks, metadata documents, shard lengths
WORKERS = web.AppKey("workers", Workers)
STATE = web.AppKey("state", dict)
METRICS = web.AppKey("metrics", Metrics)
TOKENS = web.AppKey("tokens", Tokens)
VIEW = r"{view:(?:zarr3?|precomputed)(?:-[a-z0-9_-]+)?}"
ALIAS = r"{view:[^/]+\.ome\.zarr}"  # ID.ome.zarr, ID.VIEW.ome.zarr: a zarr view under a name ending in .zarr
RANGE = re.compile(r"bytes=(?P<first>\d*)-(?P<last>\d*)")
HUGE = 10**18  # past the end of every body, every level and every axis
PROGRESS_EVERY = 10  # seconds between log lines about one long computation
POLL = 0.25  # seconds between looks at whether a waiting request's client is still there
METADATA = frozenset({".zattrs", ".zgroup", ".zarray", ".zmetadata", "zarr.json", "info"})  # light work
MAX_PAGE = 1000  # datasets in one page of /api/datasets
INDEX_PAGE = 50  # datasets on one page of the HTML index
CACHE_CONTROL = "public, max-age=3600"  # derived bytes change only with the source, and then so do their ETags
# An answer that an embargo had a say in: a browser may keep it, a shared cache (nginx, a CDN) must
# not, or it would hand it to the next client, token or not.
PRIVATE = "private, max-age=3600"


LONG_WORD = re.compile(r"\S{200,}")


def _error(status: int, message: str) -> web.Response:
    """One sentence. Messages quote what the client sent (a key, an id, a range): a long quote is
    cut, so an answer stays short whatever came in."""
    message = LONG_WORD.sub(lambda m: m[0][:150] + "...", message)
    return web.Response(status=status, text=message.rstrip(".") + ".\n")


def _shown_path(request: web.Request) -> str:
    return shown_path(request.path)


def _count(digits: str) -> int:
    """A byte offset or index from a request. Longer numbers than any body or index mean the same
    as HUGE, and never reach int(), which refuses 4,300 digits or more with a ValueError."""
    return int(digits) if len(digits) <= 18 else HUGE


async def _cors(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries CORS headers, streamed ones too (added as their headers go out)."""
    response.headers.update(CORS)


async def _private(request: web.Request, response: web.StreamResponse) -> None:
    """An answer that an embargo had a say in (request["private"]: a listing, a page, an API
    document) is kept from shared caches, whatever route made it."""
    if request.get("private"):
        response.headers["Cache-Control"] = PRIVATE if response.headers.get("Cache-Control") else "private"


@web.middleware
async def errors_and_preflights(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every failure is one sentence with the right status. OPTIONS preflights are answered
    here for every path, so routes need not list them."""
    if request.method == "OPTIONS":
        return web.Response(status=204, headers=PREFLIGHT)
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        reason = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        response = _error(exc.status, reason)
        response.headers.update({k: v for k, v in exc.headers.items()
                                 if k in ("Retry-After", "Content-Range", "WWW-Authenticate")})
        return response
    except AccessDenied as exc:
        response = _error(exc.status, str(exc))
        if exc.status == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="bil-transform"'
        return response
    except SourceError as exc:
        log.warning("source error on %s: %s", _shown_path(request), exc)  # the operator sees full paths
        ds = request.app[DATASETS].get(request.match_info.get("id", ""))
        shown = [ds] if ds else request.app[DATASETS].values()  # a listing: whichever dataset it was
        message = str(exc)
        for each in shown:
            message = each.public(message)
        return _error(500, f"The source data cannot be read: {message}")
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        if _client_left(request, exc):  # while its answer was being made: no fault of ours
            log.info("%s: the client left before its answer was sent", _shown_path(request))
            return web.Response(status=499)
        log.exception("internal error on %s", _shown_path(request))
        return _error(500, f"Internal error while serving {_shown_path(request)}: {type(exc).__name__}")
    return response


def _client_left(request: web.Request, exc: BaseException) -> bool:
    """Whether `exc` is the client's connection gone (then the request is counted as 499), not a
    fault of ours that happens to be a ConnectionError."""
    gone = isinstance(exc, ConnectionError) and _gone(request)
    if gone:
        request["client_left"] = True
    return gone


async def _in_pool(request: web.Request, fn: Callable[..., Any], *args, light: bool = False) -> Any:
    """Run CPU or I/O work on the workers; shed load with 503 when the queue is too deep.

    Catalog answers, pages and metadata documents (light) go to a small pool of their own, so
    that chunk work never delays them. Other work counts against its dataset's share: one dataset
    holds at most a thread a core, its jobs and their subtasks together, and the pool's reserve
    threads go to datasets holding little (jobs.Shares); a job waits for its turn in its
    dataset's queue, holding no thread.
    A client that leaves cancels its job (jobs.Token): queued, it never runs; running, it stops
    at its next checkpoint, unless another request waits for the same computation. The request
    then ends as cancelled (a 499 in /metrics)."""
    state = request.app[STATE]
    if state["queued"] >= state["max_queued"]:
        raise web.HTTPServiceUnavailable(text="The server is busy; retry shortly", headers={"Retry-After": "1"})
    workers, loop = request.app[WORKERS], asyncio.get_running_loop()
    light = light or _light(request)
    share = None if light else _share(request)
    token = jobs.Token()
    state["queued"] += 1
    job = (share.submit(token, fn, *args) if share is not None
           else (workers.light if light else workers.pool).submit(jobs.run, token, None, fn, *args))

    def ended() -> None:  # the job's thread is free again (or the job never started)
        state["queued"] -= 1

    def done(_) -> None:
        try:
            loop.call_soon_threadsafe(ended)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    job.add_done_callback(done)
    try:
        return await _attended(request, job, token)
    except BaseException:
        token.cancel()
        job.cancel()  # not started yet: it never will be
        raise


async def _attended(request: web.Request, job: Future, token: jobs.Token) -> Any:
    """The result of a job on the workers, waited for while the client is there: once it has gone,
    the token is cancelled and the request ends as cancelled. Long work logs its progress."""
    waited, last = 0.0, 0.0
    future = asyncio.wrap_future(job)
    try:
        while not (await asyncio.wait({future}, timeout=POLL))[0]:
            if _gone(request):
                raise asyncio.CancelledError()  # nobody to answer: as aiohttp does when it cancels a handler
            waited += POLL
            if waited - last >= PROGRESS_EVERY:
                last = waited  # a long computation (a coarse level of a file with no overviews) shows itself
                blocks = sum(n for n, _ in request.app[WORKERS].meter.snapshot()["levels"].values())
                log.info("%s: still computing after %d s (%d blocks computed so far, server-wide; %d jobs queued)",
                         _shown_path(request), waited, blocks, request.app[STATE]["queued"])
    except BaseException:
        token.cancel()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # its end is nobody's news
        raise
    return future.result()


def _gone(request: web.Request) -> bool:
    """Whether the client has closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()


def _light(request: web.Request) -> bool:
    """Whether a request's work is a metadata document's (zarr metadata, a precomputed info)."""
    return request.path.rsplit("/", 1)[-1] in METADATA


def _share(request: web.Request) -> jobs.Share | None:
    """The share of the workers of the dataset a request names (None for no dataset)."""
    ident = request.match_info.get("id")
    if ident is None:
        return None
    return request.app[WORKERS].shares.of(ident)


def _dataset(request: web.Request) -> Dataset:
    """The image (or labels) dataset a request names."""
    ident = request.match_info["id"]
    ds = request.app[DATASETS].get(ident)
    if ds is None:
        if ident in request.app[SKELETONS]:
            raise web.HTTPNotFound(text=f"{ident!r} is a skeleton source, with no voxels: its skeletons are under "
                                        f"/ds/{ident}/skeletons/")
        raise web.HTTPNotFound(text=f"No dataset with id {ident!r}")
    return ds


def _any_dataset(request: web.Request) -> Dataset:
    """The dataset or skeleton source a request names."""
    source = request.app[SKELETONS].get(request.match_info["id"])
    return source if source is not None else _dataset(request)


def _token(request: web.Request) -> str | None:
    """The token a request carries: in its path (/token/TOKEN/..., for viewers that cannot send
    headers) or as 'Authorization: Bearer TOKEN'."""
    if "token" in request.match_info:
        return request.match_info["token"]
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


def _may_read(request: web.Request, ds: Dataset) -> bool:
    """Whether this request may read a dataset's data; an answer that asked is private when the
    answer could differ by token (the dataset is under embargo, its own or an image's)."""
    if access.embargoed(ds):
        request["private"] = True
    return access.readable(ds, _token(request), request.app[TOKENS])


async def _current(request: web.Request, ds: Dataset) -> Snapshot:
    """The snapshot whose data a request reads: the access check every data route passes (before
    anything is computed or revealed, a 304 included), then the check of its files when one is
    due. An unavailable dataset answers 503 with Retry-After, never 404: a zarr client reads a 404
    chunk as zeros."""
    access.check_dataset(ds, _token(request), request.app[TOKENS])
    if access.embargoed(ds):
        request["private"] = True
    ds.viewed = time.monotonic()
    ds.look_for_prepared()
    pending = ds.check()
    if pending is not None:  # shielded: a client that leaves must not cancel a check others rely on
        await asyncio.shield(asyncio.wrap_future(pending))
    snap = ds.snapshot
    if snap.error is not None:
        raise _unavailable(ds, f"Dataset {ds.spec.id!r} is unavailable: {ds.public(snap.error)}")
    return snap


def _unavailable(ds: Dataset, message: str) -> web.HTTPServiceUnavailable:
    """503, to be retried after the next check of the files."""
    return web.HTTPServiceUnavailable(text=message, headers={"Retry-After": str(max(1, math.ceil(ds.recheck)))})


async def _voxels(request: web.Request) -> tuple[Dataset, Pyramid]:
    """The dataset whose voxels a request reads, and the pyramid of its current snapshot."""
    ds = _dataset(request)
    return ds, (await _current(request, ds)).pyramid


async def _skeleton_files(request: web.Request) -> tuple[Dataset, SkeletonFiles]:
    """The skeleton source a request reads, and the files of its current snapshot."""
    ds = request.app[SKELETONS].get(request.match_info["id"])
    if ds is None:
        _dataset(request)  # 404: no dataset, or one that is no skeleton source
        raise web.HTTPNotFound(text=f"Dataset {request.match_info['id']!r} is no skeleton source: it has no "
                                    "skeletons")
    snap = await _current(request, ds)
    return ds, SkeletonFiles(ds.spec.id, snap.tracings, ds.revision, request.app[CHUNKS])


FORWARDED = re.compile(r'(proto|host)="?([^;,"]+)"?', re.I)


def _base_url(request: web.Request) -> str:
    """Where links for this request point: --public-url when given; else the scheme and host the
    client used, taken from a trusted proxy's Forwarded or X-Forwarded-* headers (--trust-forwarded)
    or from the request. A request that came with its token in the path gets links that keep it,
    so a viewer handed one can follow them."""
    state = request.app[STATE]
    prefix = f"/token/{request.match_info['token']}" if "token" in request.match_info else ""
    if state["public_url"]:
        return state["public_url"] + prefix
    scheme, host = request.scheme, request.host
    if state["trust_forwarded"]:
        first = dict((k.lower(), v) for k, v in FORWARDED.findall(request.headers.get("Forwarded", "").split(",")[0]))
        scheme = first.get("proto") or request.headers.get("X-Forwarded-Proto", scheme).split(",")[0].strip()
        host = first.get("host") or request.headers.get("X-Forwarded-Host", host).split(",")[0].strip()
    if scheme not in ("http", "https") or not re.fullmatch(r"[A-Za-z0-9._:\[\]-]+", host):
        raise web.HTTPBadRequest(text="The Host or forwarded scheme and host of this request are malformed")
    return f"{scheme}://{host}{prefix}"


def _dumps(doc: Any) -> bytes:
    """A JSON answer's bytes: made on the light pool (a large document would hold the loop)."""
    return json.dumps(doc, indent=1).encode()


def _json(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="application/json")


def _range_asked(request: web.Request, tag: str) -> re.Match | None:
    """The one byte range a request asks for, or None to send the whole body: no Range, a stale
    If-Range, several ranges or another unit (all of which a server may answer in full)."""
    spec = request.headers.get("Range", "").strip()
    if not spec.startswith("bytes=") or "," in spec or request.headers.get("If-Range", tag) != tag:
        return None
    m = RANGE.fullmatch(spec)
    first, last = (m["first"], m["last"]) if m else ("", "")
    if m is None or not (first or last) or (first and last and _count(first) > _count(last)):
        raise web.HTTPBadRequest(text=f"Range {spec!r} must be bytes=FIRST-LAST, bytes=FIRST- or "
                                      "bytes=-SUFFIX_LENGTH, with FIRST <= LAST")
    return m


def _span(asked: re.Match, total: int) -> tuple[int, int]:
    """[start, stop) of a body of `total` bytes; 416 if none of it is there."""
    first, last = asked["first"], asked["last"]
    if first:
        start, stop = _count(first), min(total, _count(last) + 1) if last else total
    else:  # the last N bytes
        start, stop = (max(0, total - _count(last)) if _count(last) else total), total
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


async def _serve(request: web.Request, body: Body) -> web.StreamResponse:
    """A body (writers/resource.py) with a strong ETag, 304, byte ranges (206/416) and HEAD,
    computing no more than the answer needs and streaming what is not at hand in pieces. A
    whole-body GET of a compressible body is gzip-encoded (and kept so) when the client accepts
    it; ranges and HEAD always describe the identity body."""
    tag = hashlib.blake2b(repr(body.key).encode(), digest_size=12).hexdigest()
    headers = {"Cache-Control": PRIVATE if request.get("private") else CACHE_CONTROL, "Accept-Ranges": "bytes",
               **body.headers}
    asked = _range_asked(request, f'"{tag}"')
    gzipped = (body.compressible and asked is None and request.method == "GET"
               and "gzip" in request.headers.get("Accept-Encoding", ""))
    if body.compressible:
        headers["Vary"] = "Accept-Encoding"
    headers["ETag"] = f'"{tag}-gzip"' if gzipped else f'"{tag}"'
    if _if_none_match(request, headers["ETag"]):
        return web.Response(status=304, headers=headers)
    if gzipped:
        data = body.peek_gzipped() or await _in_pool(request, body.gzipped)
        return web.Response(body=data, content_type=body.content_type,
                            headers={**headers, "Content-Encoding": "gzip"})

    if body.streamed and asked is None and request.method == "GET":
        response = web.StreamResponse(status=200, headers=headers)
        response.enable_chunked_encoding()
        return await _stream(request, body, response, 0, 2**63)
    whole = body.peek()
    if whole is not None:
        total = len(whole)
    elif body.length is not None:
        total = body.length  # known without computing anything
    else:
        total = await _in_pool(request, body.size)
        whole = body.peek()
    status, (start, stop) = (200, (0, total)) if asked is None else (206, _span(asked, total))
    if asked is not None:
        headers["Content-Range"] = f"bytes {start}-{stop - 1}/{total}"
    if request.method == "HEAD":
        return web.Response(status=status, headers={**headers, "Content-Length": str(stop - start)},
                            content_type=body.content_type)
    if whole is not None:
        return web.Response(status=status, body=memoryview(whole)[start:stop], content_type=body.content_type,
                            headers=headers)
    response = web.StreamResponse(status=status, headers=headers)
    response.content_length = stop - start
    return await _stream(request, body, response, start, stop)


async def _stream(request: web.Request, body: Body, response: web.StreamResponse, start: int,
                  stop: int) -> web.StreamResponse:
    """Send bytes [start, stop) of a body piece by piece as the workers make them (chunked when the
    response has no length). A body that says what it holds while it streams (`in_flight`) holds
    that much of the server's in-flight budget until it is sent, or is answered 503 when the
    budget stays full."""
    held = getattr(body, "in_flight", 0)
    if not held:
        return await _send(request, body, response, start, stop)
    try:
        async with request.app[STATE]["in_flight"].hold(held):
            return await _send(request, body, response, start, stop)
    except Busy as exc:
        raise web.HTTPServiceUnavailable(text=f"The server is busy streaming other answers ({exc}); retry shortly",
                                         headers={"Retry-After": "1"}) from None


async def _send(request: web.Request, body: Body, response: web.StreamResponse, start: int,
                stop: int) -> web.StreamResponse:
    """The first piece is made before the status goes out, so what fails there gets its status.
    A failure after it aborts the connection (no terminating chunk; fewer bytes than the
    Content-Length), so that no client takes a short body for a whole one. A client that leaves
    is logged once, without a traceback, and counted as 499."""
    pieces = body.read(start, stop)
    try:
        piece = await _in_pool(request, next, pieces, None)  # a failure before any byte is sent gets its status
        response.content_type = body.content_type
        try:
            await response.prepare(request)
            while piece is not None:
                await response.write(piece)
                piece = None  # not held while the next one is made
                piece = await _in_pool(request, next, pieces, None)
            await response.write_eof()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if _client_left(request, exc):
                log.info("%s: the client left after %d of its bytes were sent", _shown_path(request),
                         response.body_length)
                return response
            request["failed_after_headers"] = True
            log.warning("%s failed after %d of its bytes were sent; the connection is cut: %s",
                        _shown_path(request), response.body_length, exc)
            if request.transport is not None:
                request.transport.close()
    finally:
        try:
            pieces.close()
        except ValueError:  # still running on a worker for a client that left: it ends at its next
            pass            # checkpoint, and is closed when collected
    return response


def _view_name(match_info) -> str | None:
    """The view a request names: the URL's view name, or the zarr view an alias stands for (None
    for a name that is neither)."""
    name = match_info.get("view")
    if name is None or not name.endswith(listing.SUFFIX):
        return name
    return listing.unsuffixed(match_info.get("id", ""), name)


async def dataset_view(request: web.Request) -> web.Response:
    """/ds/{id}[/t/{t}][/c/{c}]/{view}/{key}: every format view of every dataset, and the aliases
    of the zarr views. A key ending in '/' (or none) is a directory: its listing."""
    key = request.match_info["key"]
    if not key and _navigating(request):
        return await landing(request)
    ds, pyramid = await _voxels(request)
    name = _view_name(request.match_info)
    if name is None:
        raise web.HTTPNotFound(text=f"No view {request.match_info['view']!r} of {ds.spec.id!r}")
    t, c = (_count(request.match_info[k]) if k in request.match_info else None for k in ("t", "c"))
    try:
        view = make_view(pyramid, name, request.app[CHUNKS], compression=ds.spec.compression,
                         encoding=ds.spec.encoding, t=t, channel=c, labels=_labels(request, ds))
    except KeyError as exc:
        raise web.HTTPNotFound(text=exc.args[0]) from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    zarr = parse_view(name)[0] in ZARR_FORMATS
    if zarr and _lists_closed(request, ds, key):
        request["private"] = True
    if not key or key.endswith("/"):
        return _listing(request, view, key)
    try:
        res = view.resource(key)
    except KeyError:
        raise web.HTTPNotFound(text=f"No key {key!r} in the {name} view of {ds.spec.id!r}") from None
    except ValueError as exc:
        if zarr:  # a path that cannot exist is a missing one: zarr clients and fsspec read 404 so
            raise web.HTTPNotFound(text=f"No key {key!r} in the {name} view of {ds.spec.id!r}: {exc}") from None
        raise web.HTTPBadRequest(text=str(exc)) from None
    return await _serve(request, res)


def _listing(request: web.Request, view, prefix: str) -> web.Response:
    """A directory of a view: an HTML index of the names directly under it (fsspec's HTTP `ls`
    and Neuroglancer's path completion read its links), 404 if there is no such directory."""
    names = listing.children(view, prefix)
    if names is None:
        raise web.HTTPNotFound(text=f"No directory {prefix!r} in the {request.match_info['view']} view")
    note = "" if names or prefix == "" else f"More than {listing.MAX_LISTED} files: too many to list"
    response = _html(listing.page(f"{request.match_info['view']}/{prefix}", names, note))
    response.headers["Vary"] = "Accept, Sec-Fetch-Mode"  # the root answers a browser with the landing page
    return response


def _labels(request: web.Request, image: Dataset) -> dict[str, Pyramid]:
    """The label datasets attached to an image that are open now and that this request may read
    (an embargoed label stays out of a public image's labels/ group). Asking marks nothing
    private: only the keys that list or hold a closed label differ by token (_lists_closed)."""
    found = {}
    for name in image.spec.labels:
        label = request.app[DATASETS].get(name)
        pyramid = label.pyramid if label is not None else None
        if pyramid is not None and access.readable(label, _token(request), request.app[TOKENS]):
            found[name] = pyramid
    return found


def _lists_closed(request: web.Request, image: Dataset, key: str) -> bool:
    """Whether a key of an image's zarr view differs by token because of its labels: the root's
    documents and listing and the labels/ group's list the labels this request may read, and
    labels/NAME/ holds NAME's voxels; an image's own arrays never do (so they stay public)."""
    closed = {name for name in image.spec.labels
              if (label := request.app[DATASETS].get(name)) is not None and access.embargoed(label)}
    if not closed or ("/" in key and not key.startswith("labels/")):
        return False
    name, _, rest = key.removeprefix("labels/").partition("/")
    return "/" not in key or name in closed or name not in image.spec.labels  # the group's own keys


async def dataset_region(request: web.Request) -> web.StreamResponse:
    """/ds/{id}/region?level=&z=&y=&x=[&t=][&c=][&coords=][&format=]: any box of any level."""
    _, pyramid = await _voxels(request)
    limit = request.app[STATE]["max_region"]
    try:
        region = Region.parse(pyramid, request.query, limit)
    except RegionTooLarge as exc:
        raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=0, text=str(exc)) from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return await _serve(request, RegionBody(region, request.app[STATE]["in_flight"].piece_bytes))


async def dataset_manifest(request: web.Request) -> web.StreamResponse:
    """/ds/{id}/manifest.json[?checksums=sha256]: the source files, streamed file by file."""
    ds = _any_dataset(request)
    snap = await _current(request, ds)
    checksum = request.query.get("checksums")
    try:
        digest = (checksummer(checksum, request.app[CHUNKS], request.app[WORKERS].meter)
                  if checksum is not None else None)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None

    def listed() -> list:  # a Zarr store's every file: a walk of its tree, off the loop
        return source_files(snap.tracings.files if snap.tracings is not None else volume_files(snap.pyramid.volume),
                            ds.spec.confinement)

    files = await _in_pool(request, listed)
    return await _serve(request, Manifest(ds.spec.id, files, checksum, digest))


async def skeleton_file(request: web.Request) -> web.StreamResponse:
    """/ds/{id}/skeletons/{key}: a skeleton source's info, segment properties and skeletons. A
    neuron whose file is malformed answers 503 naming the file and line (it is there, and a fixed
    file is served after the next check), never 404."""
    ds, files = await _skeleton_files(request)
    key = request.match_info["key"]
    try:
        body = files.resource(key)
    except NoNeuron as exc:
        raise web.HTTPNotFound(text=str(exc)) from None
    except Unreadable as exc:
        raise _unavailable(ds, ds.public(str(exc))) from None
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    return await _serve(request, body)


async def skeleton_volume_info(request: web.Request) -> web.StreamResponse:
    """/ds/{id}/info: the info of a volume holding a skeleton source's skeletons and no voxels."""
    return await _serve(request, (await _skeleton_files(request))[1].volume_info())


async def dataset_thumbnail(request: web.Request) -> web.Response:
    return await _serve(request, thumbnail((await _voxels(request))[1], request.app[CHUNKS]))


def _search(request: web.Request, default_limit: int) -> tuple[list[Dataset], dict, int, int, str]:
    """(matching datasets, their facets, limit, offset, query) of ?q=&limit=&offset= or ?id=A&id=B;
    400 with one sentence for a malformed one. Runs on the workers: it reads every dataset's fields."""
    datasets, query = request.app[DATASETS], request.query.get("q", "")
    try:
        limit, offset = (int(request.query.get(k, d)) for k, d in (("limit", default_limit), ("offset", 0)))
        terms = search.parse(query)
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc) if isinstance(exc, search.QueryError)
                                 else "limit and offset must be whole numbers") from None
    if not (1 <= limit <= MAX_PAGE and offset >= 0):
        raise web.HTTPBadRequest(text=f"limit must be 1 to {MAX_PAGE} and offset 0 or more")
    everything = {**datasets, **request.app[SKELETONS]}
    ids = request.query.getall("id", [])
    candidates = [everything[i] for i in ids if i in everything] if ids else list(everything.values())
    fields = [(ds, records.searchable(ds)) for ds in candidates]
    found = [(ds, f) for ds, f in fields if ids or search.matches(terms, f)]
    return [ds for ds, _ in found], search.facets([f for _, f in found]), limit, offset, query


def _traced_on(request: web.Request, image: Dataset) -> list[Dataset]:
    """The skeleton sources traced on an image."""
    return request.app[TRACED_ON].get(image.spec.id, [])


def _shown_with(request: web.Request, image: Dataset) -> list[Dataset]:
    """The skeleton sources the image's Neuroglancer state shows: open ones this request may read."""
    return [s for s in _traced_on(request, image) if s.tracings is not None and _may_read(request, s)]


def _shown_labels(request: web.Request, image: Dataset | None) -> list[str]:
    """The labels the image's Neuroglancer state shows: those this request may read."""
    datasets = request.app[DATASETS]
    return [name for name in (image.spec.labels if image is not None else ())
            if name in datasets and _may_read(request, datasets[name])]


def _links(request: web.Request, ds: Dataset) -> dict:
    """pages.links for this request (runs on the workers)."""
    return pages.links(ds, _base_url(request), request.app[STATE]["viewer"], _may_read(request, ds),
                       _shown_with(request, ds), _shown_labels(request, ds.space or ds))


async def list_datasets(request: web.Request) -> web.Response:
    """/api/datasets?q=&limit=&offset= (search) or ?id=A&id=B (retrieve): a page of matches, their
    total and facets."""
    _base_url(request)  # a malformed Host is a 400 before any work

    def answer() -> dict:
        found, facets, limit, offset, _ = _search(request, 100)
        page = [{**records.summary(ds), "links": _links(request, ds)} for ds in found[offset:offset + limit]]
        return {"total": len(found), "offset": offset, "limit": limit, "datasets": page, "facets": facets}

    return _json(await _in_pool(request, lambda: _dumps(answer()), light=True))


async def get_dataset(request: web.Request) -> web.Response:
    """/api/datasets/{id}[?q=]: one dataset; an image lists its skeleton sources, a skeleton source
    its neurons (those matching q, searched like datasets)."""
    ds = _any_dataset(request)
    _base_url(request)
    try:
        terms = search.parse(request.query.get("q", ""))
    except search.QueryError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    reveal = _may_read(request, ds)
    return _json(await _in_pool(request, lambda: _dumps({
        **records.describe(ds, reveal, _traced_on(request, ds), terms), "links": _links(request, ds)}), light=True))


def _html(page: str) -> web.Response:
    # links on a page reached with a token carry it: never send them on as a Referer
    return web.Response(text=page, content_type="text/html", headers={"Referrer-Policy": "no-referrer"})


async def index(request: web.Request) -> web.Response:
    """The catalog for people: a search box, facets, and one page of matches at a time."""
    base = _base_url(request)

    def render() -> str:
        found, facets, limit, offset, query = _search(request, INDEX_PAGE)
        shown = found[offset:offset + limit]
        rows = {ds.spec.id: (_may_read(request, ds), _links(request, ds)) for ds in shown}
        return pages.index_html(shown, len(found), offset, limit, facets, query, base, rows)

    return _html(await _in_pool(request, render, light=True))


async def landing(request: web.Request) -> web.Response:
    """/ds/{id}/: a dataset's (or a skeleton source's) page for people."""
    ds = _any_dataset(request)
    base = _base_url(request)
    return _html(await _in_pool(request, lambda: pages.landing_html(
        ds, base, _may_read(request, ds), _links(request, ds), _traced_on(request, ds)), light=True))


def _navigating(request: web.Request) -> bool:
    """Whether a browser is loading a page (Sec-Fetch-Mode: navigate; without Sec-Fetch headers,
    an Accept that lists text/html among others). Neuroglancer asks for a directory listing with
    `Accept: text/html` alone, from a fetch (Sec-Fetch-Mode: cors): it gets the listing."""
    mode = request.headers.get("Sec-Fetch-Mode")
    if mode:
        return mode.strip().lower() == "navigate"
    accept = request.headers.get("Accept", "")
    return "text/html" in accept and accept.strip().lower() != "text/html"


async def view_root(request: web.Request) -> web.Response:
    """A view's bare root (/ds/ID/zarr, the URL people are given): a browser gets the landing page,
    any other client is sent on to the root's listing (VIEW/), relative so a token prefix stays."""
    if _navigating(request):
        return await landing(request)
    ds, name = _dataset(request), _view_name(request.match_info)
    try:
        parse_view(name or "")
    except KeyError as exc:
        raise web.HTTPNotFound(text=f"{exc.args[0] if name else 'No view ' + repr(request.match_info['view'])} "
                                    f"of {ds.spec.id!r}") from None
    raise web.HTTPTemporaryRedirect(location=request.match_info["view"] + "/",
                                    headers={"Vary": "Accept, Sec-Fetch-Mode"})


async def openapi_document(request: web.Request) -> web.Response:
    return _json(await _in_pool(request, lambda: _dumps(openapi.document()), light=True))


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.Response(text="ok\n")


async def readyz(request: web.Request) -> web.Response:
    """Readiness: how many datasets (skeleton sources included) can be served now; 503 when
    none can, so a load balancer sends requests elsewhere."""
    every = [*request.app[DATASETS].values(), *request.app[SKELETONS].values()]
    ready = sum(ds.error is None for ds in every)
    text = f"ready: {ready} of {len(every)} datasets can be served\n"
    if not ready:
        retry = max((ds.recheck for ds in every), default=1)
        return web.Response(status=503, text=text, headers={"Retry-After": str(max(1, math.ceil(retry)))})
    return web.Response(text=text)


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].exposition(), headers={"Content-Type": CONTENT_TYPE})


@web.middleware
async def observed(request: web.Request, handler: Callable) -> web.StreamResponse:
    """Every answer counted by view and status, with its latency (streamed bodies to their end)."""
    start = time.perf_counter()
    status, response = 500, None
    try:
        response = await handler(request)
        status = 499 if request.get("client_left") else 500 if request.get("failed_after_headers") else response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client went away first (nginx's name for it)
        raise
    finally:
        info = request.match_info  # the label set stays bounded whatever the path: zarr, zarr3, precomputed, ...
        view = (_view_name(info) or "").split("-")[0]
        view = view if view in ("zarr", "zarr3", "precomputed") else (
            info.handler.__name__ if getattr(info.route, "resource", None) is not None else "unrouted")
        request.app[METRICS].observe(view, status, time.perf_counter() - start, _body_bytes(response))


def _body_bytes(response: web.StreamResponse | None) -> int:
    """A streamed body is sent by now; a whole one is sent after the middleware returns, and its
    length is known (aiohttp wraps a memoryview body in a payload, which knows its size)."""
    if response is None:
        return 0
    if response.prepared:
        return response.body_length
    if response.content_length is not None:
        return response.content_length
    return getattr(getattr(response, "body", None), "size", None) or 0


async def _expect(request: web.Request) -> web.Response | None:
    """Requests here carry no body, so 'Expect: 100-continue' needs no interim answer; any other
    expectation cannot be met (this runs before the middleware, so it answers with _error itself)."""
    expectation = request.headers.get("Expect", "")
    if expectation.strip().lower() != "100-continue":
        return _error(417, f"Expect: {expectation!r} cannot be met; send the request without it")
    return None


def create_app(datasets: dict[str, Dataset], cache: Cache, workers: Workers,
               viewer: str = pages.DEFAULT_VIEWER, tokens: Tokens | None = None,
               max_region: int = 2**30, public_url: str | None = None,
               trust_forwarded: bool = False, skeletons: dict[str, Dataset] | None = None) -> web.Application:
    """The app over datasets opened with this cache and these workers (handed to them too).
    Every route also answers under /token/TOKEN/, for clients that cannot send headers."""
    app = web.Application(middlewares=[observed, errors_and_preflights])
    app.on_response_prepare.append(_cors)
    app.on_response_prepare.append(_private)
    app[DATASETS], app[CACHE], app[CHUNKS], app[WORKERS] = datasets, cache, cache.section("chunks"), workers
    app[SKELETONS] = skeletons or {}
    app[TRACED_ON] = {}
    for source in app[SKELETONS].values():
        app[TRACED_ON].setdefault(source.spec.space, []).append(source)
    app[TOKENS] = tokens or Tokens()
    app[STATE] = {"queued": 0, "max_queued": workers.threads * 256, "viewer": viewer, "max_region": max_region,
                  "public_url": public_url.rstrip("/") if public_url else None, "trust_forwarded": trust_forwarded}
    app[STATE]["in_flight"] = InFlight.for_cache(cache.max_bytes)
    app[METRICS] = Metrics(cache, workers.meter, {**datasets, **app[SKELETONS]}, lambda: app[STATE]["queued"])
    routes = [("/", index), ("/healthz", healthz), ("/metrics", metrics), ("/api/datasets", list_datasets),
              ("/api/openapi.json", openapi_document), ("/readyz", readyz),
              ("/api/datasets/{id}", get_dataset), ("/ds/{id}/thumbnail.png", dataset_thumbnail),
              ("/ds/{id}/region", dataset_region), ("/ds/{id}/manifest.json", dataset_manifest),
              ("/ds/{id}/info", skeleton_volume_info), ("/ds/{id}/skeletons/{key:.+}", skeleton_file)]
    routes += [("/ds/{id}", landing), ("/ds/{id}/", landing)]
    for selector in ("", r"/t/{t:\d+}", r"/c/{c:\d+}", r"/t/{t:\d+}/c/{c:\d+}"):
        root = f"/ds/{{id}}{selector}/{VIEW}"
        routes += [(root, view_root), (root + "/{key:.*}", dataset_view)]
    routes += [(f"/ds/{{id}}/{ALIAS}", view_root), (f"/ds/{{id}}/{ALIAS}/{{key:.*}}", dataset_view)]
    for path, handler in routes:
        app.router.add_get(path, handler, expect_handler=_expect)
        app.router.add_get("/token/{token:[^/]+}" + path, handler, expect_handler=_expect)

    async def shutdown(app: web.Application) -> None:
        workers.shutdown()

    app.on_cleanup.append(shutdown)
    if app[METRICS].mirror is not None:
        app.cleanup_ctx.append(_mirroring)
    return app


async def _mirroring(app: web.Application):
    """One of several processes: its live values reach every process's /metrics within a second."""

    async def every_second() -> None:
        while True:
            await asyncio.sleep(1.0)
            app[METRICS].mirror.sync()

    task = asyncio.create_task(every_second())
    yield
    task.cancel()
