"""`bil-transform prepare`: datasets' coarse levels computed once, on a dask.distributed cluster, into a
derived store outside every dataset (pyramid/prepared.py), which `serve --derived` then reads.

    bil-transform prepare [ID|PATH ...] [--all] [--config CATALOG.toml] --derived DIR_OR_URL [--levels LEVELS]
                          [--scheduler ADDRESS | --workers N] [--task-size SIZE] [--cache-size SIZE]

Why: the coarsest chunk, which Neuroglancer asks for first, needs every voxel of the dataset; computed
on request it keeps the first viewer of a terabyte waiting for an hour. The levels from the third 2x
halving up hold about 0.2% of level 0: prepared once, every chunk of every level is at most 64 source
chunks away.

The work is export's (export.py): cells of space that read each source voxel once, writing the
zarr3-sharded view's files of the chosen levels. Each finished task leaves a marker with the blocks it
hands on; a prepare that stopped starts again from them: finished tasks do not run again and their
parents take their blocks from the markers (the plan, fixed by its task size, is kept beside them).
The record is written last, and the markers are then removed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import uuid

from .cache import Cache
from .catalog import DatasetSpec, holding, load_catalog, specs_from_paths
from .dataset import Dataset
from .export import (
    ExportError,
    Job,
    Node,
    Progress,
    cluster_client,
    compute,
    finish,
    marker,
    megabytes,
    parse_levels,
    plan,
    size_arg,
    sizes,
    write_last,
    write_node,
)
from .pyramid.prepared import PROGRESS, RECORD, Derived, default_levels, fingerprint, store_key
from .writers import make_view
from .writers.listing import files

VIEW = "zarr3-sharded"  # an OME-Zarr any reader opens, in few files


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Compute datasets' coarse levels once into a derived store outside the data, so that `serve "
                     "--derived` answers their first screen at once; on a dask.distributed cluster, resumable.")
    p.add_argument("sources", nargs="*", metavar="ID|PATH",
                   help="dataset ids of --config, or paths as `serve PATH` takes them")
    p.add_argument("--all", action="store_true", help="every image and label dataset of --config")
    p.add_argument("--config", metavar="CATALOG.toml", help="the catalog that defines the ids")
    p.add_argument("--derived", metavar="DIR_OR_URL",
                   help="the derived store: a directory or an fsspec URL (s3://bucket/prefix), outside every "
                        "dataset (default: the catalog's `derived`)")
    p.add_argument("--levels", metavar="LEVELS",
                   help="levels to prepare: START:STOP, N, or a comma-separated list of these (default: the "
                        "coarsest levels that together hold at most 1%% of level 0)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="a running dask.distributed scheduler (tcp://host:8786), e.g. a dask-jobqueue "
                        "SLURMCluster's; its workers must reach the datasets and the store (default: a local cluster)")
    p.add_argument("--workers", type=int, metavar="N",
                   help=f"worker processes of the local cluster (default one per core: {os.cpu_count()})")
    p.add_argument("--task-size", type=size_arg, metavar="SIZE",
                   help="source voxels one task covers at most (default: enough tasks for every worker, 16MiB to "
                        "256MiB; a resumed preparation keeps the size it started with)")
    p.add_argument("--cache-size", type=size_arg, metavar="SIZE",
                   help="memory each worker process keeps decoded data in (default 1GiB or a third of a worker's "
                        "memory limit)")


def _targets(args: argparse.Namespace) -> tuple[list[DatasetSpec], str | None]:
    """The datasets to prepare, and the catalog's derived store."""
    if args.all and not args.config:
        raise ExportError("--all prepares every dataset of a catalog: give --config CATALOG.toml")
    if not args.all and not args.sources:
        raise ExportError("name the datasets to prepare (ids of --config, or paths), or give --all with --config")
    if args.config:
        catalog = load_catalog(args.config)
        by_id = {s.id: s for s in catalog}
        missing = [i for i in args.sources if i not in by_id]
        if missing:
            raise ExportError(f"{args.config} has no dataset with id {missing[0]!r}")
        chosen = catalog if args.all else [by_id[i] for i in args.sources]
        derived = catalog[0].derived if catalog else None
    else:
        for path in args.sources:
            if "*" not in path and not os.path.exists(os.path.expanduser(path)):
                raise ExportError(f"{path} is no file or directory (to prepare a catalog's dataset by id, give "
                                  "--config CATALOG.toml)")
        chosen, derived = specs_from_paths(args.sources), None
    return [s for s in chosen if s.kind != "skeletons" or not args.all], derived


def _store(url: str, specs: list[DatasetSpec]) -> Derived:
    try:
        derived = Derived(url)
    except (ValueError, ImportError) as exc:
        raise ExportError(f"--derived {url}: not a path or a URL fsspec can write to ({exc})") from None
    if "file" in (derived.fs.protocol if isinstance(derived.fs.protocol, tuple) else (derived.fs.protocol,)):
        if (spec := holding(derived.root, specs)) is not None:
            raise ExportError(f"--derived {url} is inside the directory of dataset {spec.id!r} ({spec.root}); "
                              "nothing is ever written next to the data: choose a directory elsewhere")
    return derived


def run(args: argparse.Namespace) -> int:
    try:
        if args.scheduler and args.workers:
            raise ExportError("--workers sets the local cluster's size; a --scheduler's cluster has its own workers")
        if args.workers is not None and args.workers < 1:
            raise ExportError(f"--workers {args.workers}: give at least 1")
        specs, catalogs = _targets(args)
        url = args.derived or catalogs
        if not url:
            raise ExportError("give --derived DIR_OR_URL (or `derived = ...` in the catalog): where the prepared "
                              "levels are kept")
        derived = _store(url, specs)
        for spec in specs:
            if spec.kind == "skeletons":
                raise ExportError(f"dataset {spec.id!r} is a skeleton source: it has no levels to prepare")
        failed = 0
        with cluster_client(args) as client:
            for spec in specs:
                failed += not prepare_dataset(spec, derived, args, client)
        return 1 if failed else 0
    except ExportError as exc:
        print(f"bil-transform prepare: {exc}", file=sys.stderr)
        return 2


def _say(text: str, stream=None) -> None:
    print(f"bil-transform prepare: {text}", file=stream or sys.stderr, flush=True)


def prepare_dataset(spec: DatasetSpec, derived: Derived, args: argparse.Namespace, client=None,
                    stream=None) -> bool:
    """Prepare one dataset's levels on `client`'s cluster (None: here, in this process, task after
    task). False, with the reason said, if it could not be."""
    start = time.monotonic()
    cache = Cache(64 * 2**20)  # planning reads nothing but headers
    ds = Dataset(spec, cache, recheck=math.inf)
    if ds.pyramid is None:
        _say(f"{spec.id}: cannot be opened: {ds.error}", stream)
        return False
    pyramid = ds.pyramid
    levels = parse_levels(args.levels, len(pyramid.levels)) if args.levels else default_levels(pyramid)
    levels = tuple(i for i in levels if pyramid.levels[i].native is None)
    if not levels:
        _say(f"{spec.id}: nothing to prepare (the source stores these levels itself)", stream)
        return True
    current = fingerprint(pyramid, spec.selection)
    folder = derived.folder(spec.id, store_key(current, levels))
    fs, root = derived.fs, derived.fs._strip_protocol(folder)
    if fs.exists(f"{root}/{RECORD}"):
        _say(f"{spec.id}: already prepared (levels {', '.join(map(str, levels))}) in {folder}", stream)
        return True
    view = make_view(pyramid, VIEW, cache.section("chunks"), compression=spec.compression, encoding=None)
    chosen = [f for f in files(view) if f.label is None and (f.level is None or f.level in levels)]
    vol = pyramid.volume
    level0 = math.prod(vol.shape) * vol.dtype.itemsize

    markers = f"{root}/{PROGRESS}"
    started = _json(fs, f"{markers}/plan.json")
    if started is not None and started.get("fingerprint") != current:
        started = None
    if client is not None:
        budget, cache_size = sizes(args, client, level0)
    else:
        budget, cache_size = args.task_size or 64 * 2**20, args.cache_size or 2**30
    if started is not None:
        budget = started["task_size"]
        cache_size = max(cache_size, 4 * budget)
    nodes, last = plan({None: pyramid}, chosen, budget, f"prepare-{store_key(current, levels)}")
    if started is None:
        fs.makedirs(markers, exist_ok=True)
        fs.pipe_file(f"{markers}/plan.json", json.dumps({
            "fingerprint": current, "levels": list(levels), "task_size": budget, "tasks": len(nodes)}).encode())
    done = {p.rsplit("/", 1)[-1] for p in fs.ls(markers, detail=False)}
    finished = frozenset(n.name for n in nodes if marker(n.name) in done)
    nodes = _resumed(nodes, finished)
    job = Job(uuid.uuid4().hex[:12], (spec,), VIEW, folder, (pyramid.key,), cache_size, levels,
              markers=derived.fs.unstrip_protocol(markers), finished=finished)
    progress = Progress(len(nodes) + 1, len(chosen), stream, name=f"prepare {spec.id}")
    try:
        if client is not None:
            failed = compute(client, job, nodes, last, progress)
            stats = client.run(finish, job.run)
        else:
            failed = _compute_here(job, nodes, last, progress)
            stats = {"here": finish(job.run)}
    finally:
        progress.close()
    if failed:
        _say(f"{spec.id}: failed: {failed}; run it again to resume ({len(finished)} of {len(nodes)} tasks were done "
             "before this run)", stream)
        return False
    written = fs.du(root, total=True) - fs.du(markers, total=True)
    read = sum(s["source_bytes"] for s in stats.values())
    seconds = time.monotonic() - start
    fs.pipe_file(f"{root}/{RECORD}", json.dumps({
        "dataset": spec.id, "fingerprint": current, "levels": list(levels), "bytes": written,
        "source_bytes_read": read, "seconds": round(seconds, 3),
        "prepared": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}, indent=1).encode())
    fs.rm(markers, recursive=True)
    resumed = f", resumed after {len(finished)} finished tasks" if finished else ""
    _say(f"{spec.id}: prepared levels {', '.join(map(str, levels))} in {seconds:.1f} s{resumed}: read "
         f"{megabytes(read)} of source voxels, wrote {megabytes(written)} ({100 * written / max(1, level0):.2f}% "
         f"of level 0's {megabytes(level0)}) to {folder}", stream)
    return True


def _json(fs, path: str) -> dict | None:
    try:
        return json.loads(fs.cat_file(path))
    except (OSError, ValueError):
        return None


def _resumed(nodes: list[Node], finished: frozenset[str]) -> list[Node]:
    """The plan left to run: a finished node hands on its marker's blocks and needs no children; the
    nodes under it need not run at all."""
    skipped: set[str] = set()
    for node in reversed(nodes):  # parents come after their children
        if node.name in finished or node.name in skipped:
            skipped.update(node.children)
    return [Node(n.name, (), (), n.handoff) if n.name in finished else n for n in nodes if n.name not in skipped]


def _compute_here(job: Job, nodes: list[Node], last: list[str], progress: Progress) -> str | None:
    """The plan run in this process, task after task (children first): a server's background
    preparation needs no cluster."""
    results: dict[str, list] = {}
    try:
        for node in nodes:
            results[node.name] = write_node(job, node, *(results.pop(k) for k in node.children))
            progress.update(len(node.keys))
        write_last(job, last)
    except Exception as exc:  # the first failure, in one line, as on a cluster
        return f"{type(exc).__name__}: {exc}"
    progress.update(len(last))
    return None
