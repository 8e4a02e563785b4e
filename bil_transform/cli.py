"""`bil-transform serve | demo | info`."""

from __future__ import annotations

import argparse
import errno
import importlib
import importlib.metadata
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from aiohttp import web

from . import logs
from .access import Tokens, TokensError
from .cache import Cache
from .catalog import CatalogError, DatasetSpec, expanded_glob_warning, holding, load_catalog, specs_from_paths
from .dataset import Dataset
from .export import add_arguments as add_export_arguments
from .export import run as run_export
from .logs import ACCESS, FORMATS, AccessLogger
from .pages import DEFAULT_VIEWER
from .prepare import add_arguments as add_prepare_arguments
from .prepare import run as run_prepare
from .readers import SELECTIONS, SourceError, open_source, selection_of
from .readers.bounds import Limits, configure
from .workers import Workers

UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "kib": 2**10, "m": 1e6, "mb": 1e6, "mib": 2**20,
         "g": 1e9, "gb": 1e9, "gib": 2**30, "t": 1e12, "tb": 1e12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'1GiB', '512MB', '1e9' -> bytes."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write it like 1GiB, 512MB or 1000000")
    return int(float(m.group(1)) * UNITS[m.group(2).lower()])


def default_cache_size() -> int:
    """A quarter of the memory this process may use (the machine's, or a container's limit): the
    demo's whole pyramid with its blocks fits in a few GiB, and the rest is left to the OS page
    cache, which holds the source files."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**30
    try:  # cgroup v2 (docker --memory, Kubernetes limits); "max" when there is none
        memory = min(memory, int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):
        pass
    return max(2**28, memory // 4)


DISK_CACHE_SIZE = 64 * 2**30
BACKLOG = 1024  # connections the kernel queues before the server accepts them (a viewer opens dozens)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    cache = default_cache_size()
    p.add_argument("--cache-size", type=parse_size, default=cache,
                   help="memory for everything the server keeps: encoded chunks, decoded blocks and source "
                        f"segments, shared out among --processes (default: a quarter of this machine's memory, "
                        f"{cache / 2**30:.1f}GiB)")
    p.add_argument("--processes", type=_positive, default=1, metavar="N",
                   help="server processes on the one port (SO_REUSEPORT), each with its own Python and memory "
                        "cache, sharing --disk-cache (default 1)")
    p.add_argument("--disk-cache", metavar="DIR",
                   help="keep encoded chunks on local disk too, across restarts and shared by --processes "
                        "(memory, then disk, then compute); never inside a dataset's directory")
    p.add_argument("--disk-cache-size", type=parse_size, default=None, metavar="SIZE",
                   help=f"bound of --disk-cache (default: {DISK_CACHE_SIZE / 2**30:.0f}GiB, or half the free space "
                        "there if less)")
    p.add_argument("--neuroglancer", default=DEFAULT_VIEWER, metavar="URL",
                   help=f"Neuroglancer used by 'open in Neuroglancer' links (default {DEFAULT_VIEWER})")
    p.add_argument("--recheck", type=float, default=2.0, metavar="SECONDS",
                   help="how often a requested dataset's files are checked for changes (default 2)")
    p.add_argument("--workers", type=_positive, default=None,
                   help="worker threads per process (default: the cores shared out among --processes; more for "
                        "high-latency storage)")
    p.add_argument("--max-region", type=parse_size, default=2**30, metavar="SIZE",
                   help="largest box /ds/ID/region returns (default 1GiB); larger ones answer 413")
    p.add_argument("--max-voxels", type=_positive, default=Limits.voxels, metavar="N",
                   help="largest source served, in voxels of level 0 (t x c x z x y x x; default 2^46, 140 TB of "
                        "uint16); a source claiming more is unavailable")
    p.add_argument("--tokens", metavar="TOKENS.toml",
                   help="tokens that open embargoed datasets (kept apart from the catalog, which may be public)")
    p.add_argument("--public-url", metavar="URL",
                   help="the URL clients reach this server at (e.g. https://data.example.org behind a proxy); "
                        "every generated link starts with it")
    p.add_argument("--trust-forwarded", action="store_true",
                   help="take the scheme and host of generated links from a proxy's Forwarded or "
                        "X-Forwarded-Proto/-Host headers (only behind a proxy that sets them)")
    p.add_argument("--idle-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="close a connection that sends no complete request for this long, its first one "
                        "included, so slow header senders cannot hold connections (default 15)")
    p.add_argument("--derived", metavar="DIR_OR_URL",
                   help="the store of prepared coarse levels (`bil-transform prepare`): a directory or an fsspec "
                        "URL; a dataset's prepared levels are read from there while its files are those they were "
                        "prepared from (default: the catalog's `derived`)")
    p.add_argument("--prepare", action="store_true",
                   help="prepare, in the background and at the lowest priority, the datasets that have no "
                        "prepared levels in --derived (those being viewed first)")
    p.add_argument("--log-format", choices=FORMATS, default="text",
                   help="text (the access log in Apache's format) or json, one object a line (default text)")


def no_huge_pages_for_numpy() -> None:
    """numpy asks Linux for transparent huge pages on every array of 4 MiB or more. The server
    reads each source slab into such an array and drops it a moment later, and a fresh huge page
    can make a worker wait while the kernel compacts memory: the coldest request of the demo
    took 1.33-1.58 s with them and 1.05-1.16 s without (interleaved runs of benchmarks/run_all.py
    row 2's request). Cached blocks are far below 4 MiB either way."""
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            importlib.import_module(module)._set_madvise_hugepage(False)
            return
        except (ImportError, AttributeError):
            continue


SHUTDOWN_GRACE = 1.0  # seconds answers in flight get after Ctrl-C (aiohttp's default, 60, made it wait for them)


class ServeError(Exception):
    """The server cannot start; the message says why in one sentence."""


def _listen(host: str, port: int, shared: bool = False, accept: bool = True) -> socket.socket:
    """The listening socket, bound before anything is printed, so a port in use is one clear line.
    `shared`: with SO_REUSEPORT, so the server's other processes can bind the port too; a socket
    that does not `accept` only holds the port (the kernel hands connections to listening ones)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if shared:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if accept:
            sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        why = "it is in use (another server? choose another --port)" if exc.errno == errno.EADDRINUSE \
            else exc.strerror or str(exc)
        raise ServeError(f"cannot listen on {host}:{port}: {why}") from None
    sock.setblocking(False)
    return sock


def _disk_cache(args: argparse.Namespace, specs: list[DatasetSpec]) -> None:
    """Check --disk-cache before anything starts: never inside a dataset (the server does not
    write next to the data), and a directory it can create, write and make its own (0700)."""
    if not args.disk_cache:
        return
    where = Path(args.disk_cache).expanduser().resolve()
    if (spec := holding(where, specs)) is not None:
        raise ServeError(f"--disk-cache {args.disk_cache} is inside dataset {spec.id!r} ({spec.root}); "
                         "choose a directory outside every dataset")
    try:
        where.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=where).close()
    except OSError as exc:
        raise ServeError(f"--disk-cache {args.disk_cache} cannot be written: {exc.strerror or exc}") from None
    try:
        where.chmod(0o700)  # embargoed voxels are kept there: the server's user's alone
    except OSError as exc:
        raise ServeError(f"--disk-cache {args.disk_cache} cannot be made private (chmod 700): "
                         f"{exc.strerror or exc}; choose a directory the server's user owns") from None
    args.disk_cache = str(where)
    if args.disk_cache_size is None:
        args.disk_cache_size = min(DISK_CACHE_SIZE, shutil.disk_usage(where).free // 2)


def _base(args: argparse.Namespace) -> str:
    """The URL the start-up lines give: the public one, or one that reaches this machine."""
    return (args.public_url or f"http://{_reachable(args.host)}:{args.port}").rstrip("/")


def _reachable(host: str) -> str:
    """The host part of a URL that reaches a server listening on `host` (all interfaces: this machine)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else f"[{host}]" if ":" in host else host


def _check_labels(datasets: dict[str, Dataset]) -> None:
    """A label dataset attached to an image must have the shape of one of the image's levels
    (checked where both opened; an unavailable one says so on its own line)."""
    from .writers.omezarr import label_frame

    for ds in datasets.values():
        for name in ds.spec.labels:
            image, label = ds.pyramid, datasets[name].pyramid
            if image is not None and label is not None and label_frame(image, label) is None:
                shapes = ", ".join("x".join(map(str, lvl.shape)) for lvl in image.levels)
                raise ServeError(f"dataset {ds.spec.id!r}: its label dataset {name!r} is "
                                 f"{'x'.join(map(str, label.levels[0].shape))} (z, y, x), the shape of none of "
                                 f"the image's levels ({shapes})")


def run_server(specs: list[DatasetSpec], args: argparse.Namespace) -> int:
    no_huge_pages_for_numpy()
    tokens = Tokens.load(args.tokens) if args.tokens else Tokens()
    _disk_cache(args, specs)
    base = _base(args)
    listening = f" (listening on {args.host}:{args.port})" if base != f"http://{args.host}:{args.port}" else ""

    def started(opened: list[int]) -> None:
        processes = f"{args.processes} processes; " if args.processes > 1 else ""
        print(f"bil-transform serving {opened[0]} of {len(specs)} dataset(s) at {base}/{listening} "
              f"({processes}Ctrl-C to stop)", flush=True)

    if args.processes == 1:
        serve(specs, args, tokens, _listen(args.host, args.port), 0, lambda opened: started([opened]))
        return 0
    from .processes import supervise

    # A plain bind first: a port shared with SO_REUSEPORT would also let another server's processes in.
    _listen(args.host, args.port, accept=False).close()
    held = _listen(args.host, args.port, shared=True, accept=False)  # claims the port until the end
    try:
        return supervise(args.processes, serve_process, (specs, args, tokens), started)
    finally:
        held.close()


def serve_process(specs: list[DatasetSpec], args: argparse.Namespace, tokens: Tokens, index: int,
                  reports) -> None:
    """One of --processes: binds the shared port, opens the datasets, serves until stopped."""
    from .processes import orphan_watch

    orphan_watch(os.getppid())
    logs.configure(args.log_format)
    no_huge_pages_for_numpy()
    try:
        sock = _listen(args.host, args.port, shared=True)
        serve(specs, args, tokens, sock, index, lambda opened: reports.put((index, opened)))
    except ServeError as exc:
        if index == 0:
            print(f"bil-transform: {exc}", file=sys.stderr, flush=True)
        os._exit(2)
    except KeyboardInterrupt:
        pass
    os._exit(0)


def serve(specs: list[DatasetSpec], args: argparse.Namespace, tokens: Tokens, sock: socket.socket, index: int,
          ready: Callable[[int], None]) -> None:
    """Open the datasets and serve them on `sock`; process `index` 0 prints what opened, and
    `ready` hears how many did before the first request is taken."""
    from .cache.disk import DiskTier
    from .server import create_app

    share = args.processes
    configure(Limits(voxels=args.max_voxels))
    disk = DiskTier(args.disk_cache, args.disk_cache_size) if args.disk_cache else None
    cache = Cache(args.cache_size // share, disk)
    workers = Workers(args.workers or max(1, (os.cpu_count() or 1) // share))
    derived = _derived(args, specs)
    datasets = {s.id: Dataset(s, cache, recheck=args.recheck, workers=workers, derived=derived) for s in specs
                if s.kind != "skeletons"}
    skeletons = {s.id: Dataset(s, cache, recheck=args.recheck, workers=workers, space=datasets[s.space])
                 for s in specs if s.kind == "skeletons"}  # after the images whose frames they are in
    for ds in datasets.values():  # a label dataset falls under the embargo of every image it is attached to
        ds.images = tuple(image for image in datasets.values() if ds.spec.id in image.spec.labels)
    _check_labels(datasets)
    base = _base(args)
    if index == 0:
        for ds in (*datasets.values(), *skeletons.values()):
            root = f"{base}/ds/{ds.spec.id}"
            if ds.error:
                print(f"  {ds.spec.id}: UNAVAILABLE: {ds.error}", file=sys.stderr)
            elif ds.tracings is not None:
                served = sum(t.error is None for t in ds.tracings.neurons)
                print(f"  {ds.spec.id}: ok  {served} neuron{'s' if served != 1 else ''} on {ds.spec.space}  "
                      f"precomputed://{root}/skeletons")
                for t in ds.tracings.neurons:
                    if t.error:
                        print(f"    {t.name}: UNAVAILABLE: {t.error}", file=sys.stderr)
            else:
                print(f"  {ds.spec.id}: ok  {root}/zarr  {root}/zarr3  precomputed://{root}/precomputed")
    opened = sum(ds.error is None for ds in (*datasets.values(), *skeletons.values()))
    if not opened and index == 0:
        print(f"bil-transform: WARNING: none of the {len(datasets)} dataset(s) could be opened (reasons above); "
              "each answers 503 until its files are fixed", file=sys.stderr)
    ready(opened)
    app = create_app(datasets, cache, workers, args.neuroglancer, tokens, args.max_region,
                     public_url=args.public_url, trust_forwarded=args.trust_forwarded, skeletons=skeletons)
    if args.prepare and index == 0:  # one process prepares; the others read what it wrote
        from .background import Preparer

        preparer = Preparer(datasets, derived)
        preparer.start()

        async def stop_preparing(_app) -> None:
            preparer.stop()

        app.on_cleanup.append(stop_preparing)
    web.run_app(app, sock=sock, print=None, access_log=ACCESS, access_log_class=AccessLogger,
                keepalive_timeout=args.idle_timeout, shutdown_timeout=SHUTDOWN_GRACE, backlog=BACKLOG)


def _derived(args: argparse.Namespace, specs: list[DatasetSpec]):
    """The store of prepared levels: --derived, else the catalog's; ServeError if it cannot be used."""
    from .pyramid.prepared import Derived

    url = args.derived or next((s.derived for s in specs if s.derived), None)
    if url is None:
        if args.prepare:
            raise ServeError("--prepare writes prepared levels to the derived store: give --derived DIR_OR_URL too")
        return None
    try:
        derived = Derived(url)
    except (ValueError, ImportError, OSError) as exc:
        raise ServeError(f"--derived {url}: not a directory or a URL fsspec can reach ({exc})") from None
    if (spec := holding(derived.root, specs)) is not None and "://" not in url:
        raise ServeError(f"--derived {url} is inside the directory of dataset {spec.id!r}; nothing is ever written "
                         "next to the data: choose a directory elsewhere")
    return derived


def cmd_serve(args: argparse.Namespace) -> int:
    if not args.config and not args.paths:
        print("bil-transform serve: give a --config CATALOG.toml or at least one PATH", file=sys.stderr)
        return 2
    specs = load_catalog(args.config) if args.config else []
    if warning := expanded_glob_warning(args.paths):
        print(f"bil-transform: WARNING: {warning}", file=sys.stderr)
    specs += specs_from_paths(args.paths)
    return run_server(specs, args)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_SHAPE, make_demo, make_demo_tracings
    from .writers.listing import suffixed

    print(f"Preparing the demo volume ({' x '.join(map(str, DEMO_SHAPE))} uint16 TIFF slices; first run only)...",
          file=sys.stderr)
    data_dir = Path(args.data_dir) if args.data_dir else None
    path = make_demo(data_dir)
    spec = DatasetSpec(id="demo", path=str(path), metadata={
        "title": "Synthetic mouse-brain-like stack (demo)", "technique": "synthetic serial-section fluorescence"})
    neurons = DatasetSpec(id="demo-neurons", path=str(make_demo_tracings(data_dir)), kind="skeletons", space="demo",
                          units="voxel", metadata={"title": "Synthetic neuron tracings on the demo brain (SWC)"})
    base = f"http://{_reachable(args.host)}:{args.port}"
    url = f"{base}/ds/demo/zarr"
    zarr_line = (f"python -c \"import zarr; a = zarr.open_group('{url}', mode='r')['0']; "
                 "print(a.shape, a[0, 0, 128, 500:504, 500:504])\"")
    print(f"""
Demo data: {path}
Open it with:
  napari:      napari --plugin napari-ome-zarr {base}/ds/demo/{suffixed("demo", "zarr")}
  Neuroglancer: paste precomputed://{base}/ds/demo/precomputed (or zarr://{url}),
               or follow "open in Neuroglancer" on the index page
  zarr-python: {zarr_line}
  browser:     {base}/  (the demo's Neuroglancer link shows its traced neurons too)
""")
    return run_server([spec, neurons], args)


def _factors(factors) -> str:
    return "(" + ", ".join(f"{f:.4g}" for f in factors) + ")"


def cmd_info(args: argparse.Namespace) -> int:
    from .pyramid import DEFAULT_CHUNK, plan_levels

    if Path(args.path).suffix.lower() == ".swc" and Path(args.path).is_file():
        return _swc_info(args.path)
    try:
        reader = open_source(args.path, selection=selection_of(args), root=args.root)
    except SourceError as exc:
        print(f"bil-transform info: {exc}", file=sys.stderr)
        return 1
    v = reader.volume
    print(f"path:          {v.path}")
    print(f"format:        {v.format}")
    print(f"shape:         {v.shape} (t, c, z, y, x)")
    print(f"dtype:         {v.dtype.name}")
    known = "" if v.voxel_size_known else " (not in the file; set voxel_size in the catalog)"
    print(f"voxel size:    {' x '.join(f'{s:g}' for s in v.voxel_size)} um (z, y, x){known}")
    print(f"block shape:   {v.block_shape} (z, y, x)")
    print(f"channels:      {', '.join(f'{c.name} (#{c.color})' for c in v.channels)}")
    if v.shape[0] > 1:
        print(f"time points:   {v.shape[0]}")
    print(f"native levels: {len(v.native_levels)}")
    for i, lvl in enumerate(v.native_levels):
        print(f"  {i}: shape {lvl.shape}, factors {_factors(lvl.factors)}")
    levels = plan_levels(reader, DEFAULT_CHUNK)
    print(f"served levels: {len(levels)} (chunk {DEFAULT_CHUNK})")
    for i, lvl in enumerate(levels):
        print(f"  {i}: shape {lvl.shape}, factors {_factors(lvl.factors)}, "
              f"{'native' if lvl.native is not None else 'computed'}")
    for note in v.notes:
        print(f"note:          {note}")
    return 0


def _swc_info(path: str) -> int:
    """What `info` says of one SWC tracing: what the reader sees, or the line that is wrong."""
    import numpy as np

    from .readers.swc import read_swc

    try:
        tracing = read_swc(path)
    except SourceError as exc:
        print(f"bil-transform info: {exc}", file=sys.stderr)
        return 1
    types = dict(zip(*np.unique(tracing.types, return_counts=True)))
    low, high = tracing.xyz.min(axis=0), tracing.xyz.max(axis=0)
    print(f"path:          {tracing.path}")
    print("format:        swc (a traced neuron; serve it as a catalog entry with kind = \"skeletons\")")
    print(f"nodes:         {tracing.n_nodes} in {len(tracing.roots)} tree(s)")
    print(f"node types:    {', '.join(f'{t}: {n}' for t, n in types.items())} (1 soma, 2 axon, 3 basal, 4 apical)")
    print(f"extent:        x {low[0]:g} to {high[0]:g}, y {low[1]:g} to {high[1]:g}, z {low[2]:g} to {high[2]:g} "
          "(the file's units)")
    for key, value in tracing.header.items():
        print(f"header:        {key}: {value}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bil-transform",
                                     description="Serve microscopy volumes as OME-Zarr, on the fly.")
    parser.add_argument("--version", action="version", version=f"bil-transform {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve datasets from a catalog and/or paths")
    serve.add_argument("paths", nargs="*", metavar="PATH",
                       help="TIFF, JPEG2000, Imaris, BigDataViewer or CZI file, slice directory or glob, Zarr or N5")
    serve.add_argument("--config", metavar="CATALOG.toml", help="catalog of datasets")
    _add_server_args(serve)
    demo = sub.add_parser("demo", help="generate (once) and serve a synthetic brain volume")
    demo.add_argument("--data-dir", help="where to keep the demo data (default ~/.cache/bil-transform)")
    _add_server_args(demo)
    info = sub.add_parser("info", help="print what the reader sees in PATH")
    info.add_argument("path", metavar="PATH")
    for name, source, _ in SELECTIONS:
        info.add_argument(f"--{name}", type=int, metavar="N", help=f"the {name} of a {source} to describe")
    info.add_argument("--root", metavar="DIR", help="the directory its files may be read from, as a catalog's root "
                      "(default: PATH if a directory, else its directory)")
    export = sub.add_parser("export", help="write a dataset's pyramid as files, computed on dask.distributed")
    add_export_arguments(export)
    prepare = sub.add_parser("prepare", help="compute datasets' coarse levels once, into a derived store")
    add_prepare_arguments(prepare)
    args = parser.parse_args(argv)
    logs.configure(getattr(args, "log_format", "text"))
    try:
        code = {"serve": cmd_serve, "demo": cmd_demo, "info": cmd_info, "export": run_export,
                "prepare": run_prepare}[args.command](args)
    except (CatalogError, TokensError, ServeError) as exc:
        print(f"bil-transform: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        code = 130
    if args.command in ("serve", "demo"):
        # Stop at once: the workers may be deep in a computation nobody waits for any more, and
        # Python would join them at exit (where a second Ctrl-C printed a traceback per thread).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _version() -> str:
    try:
        return importlib.metadata.version("bil-transform")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


if __name__ == "__main__":
    sys.exit(main())
