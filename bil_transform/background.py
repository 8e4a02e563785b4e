"""`serve --prepare`: the server prepares its unprepared datasets itself, one at a time, in a child
process at the lowest CPU priority, so a request for a chunk that is ready never waits for it.

The dataset viewed most recently goes first (a person is waiting for it), then the others in catalog
order. The child runs `prepare`'s plan task after task in its own memory (no cluster), leaving the same
markers: a restarted server resumes where the last one stopped, and the server reads the levels from
the moment the store is complete.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import threading

from .dataset import Dataset
from .pyramid.prepared import Derived

log = logging.getLogger("bil_transform")

IDLE = 10.0  # seconds between looks for work when every dataset is prepared
TASK_SIZE = 64 * 2**20  # source bytes one task reads: a small child beside the server
CACHE_SIZE = 512 * 2**20


def _child(spec, url: str, parent: int) -> None:
    """The child process: lowest priority, then one preparation; it ends with the server."""
    from .prepare import prepare_dataset
    from .processes import orphan_watch

    os.nice(19)
    orphan_watch(parent)

    args = argparse.Namespace(levels=None, task_size=TASK_SIZE, cache_size=CACHE_SIZE)
    logging.basicConfig(level=logging.WARNING)
    with open(os.devnull, "w") as quiet:
        ok = prepare_dataset(spec, Derived(url), args, client=None, stream=quiet)
    os._exit(0 if ok else 1)


class Preparer:
    """The background preparation of `datasets` into `derived`."""

    def __init__(self, datasets: dict[str, Dataset], derived: Derived):
        self.datasets, self.derived = datasets, derived
        self._failed: set[tuple[str, str]] = set()  # (id, version) that could not be prepared: not again
        self._stop = threading.Event()
        self._child: multiprocessing.process.BaseProcess | None = None
        self._thread = threading.Thread(target=self._run, name="bil-prepare", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        child = self._child
        if child is not None and child.is_alive():
            child.kill()  # its markers let the next start resume

    def _next(self) -> Dataset | None:
        waiting = [ds for ds in self.datasets.values()
                   if ds.pyramid is not None and ds.snapshot.preparation.state != "complete"
                   and (ds.spec.id, ds.pyramid.volume.version) not in self._failed]
        return max(waiting, key=lambda ds: ds.viewed, default=None)  # max keeps catalog order among equals

    def _run(self) -> None:
        context = multiprocessing.get_context("spawn")
        while not self._stop.is_set():
            for ds in self.datasets.values():
                if ds.snapshot.preparation.state != "complete":
                    ds.reattach()  # what was prepared meanwhile, elsewhere too
            ds = self._next()
            if ds is None:
                self._stop.wait(IDLE)
                continue
            version = ds.pyramid.volume.version
            log.info("%s: preparing its coarse levels in the background", ds.spec.id)
            self._child = context.Process(target=_child, args=(ds.spec, self.derived.url, os.getpid()), daemon=True)
            self._child.start()
            self._child.join()
            if self._stop.is_set():
                return
            ds.reattach()
            if ds.snapshot.preparation.state != "complete":
                self._failed.add((ds.spec.id, version))
                log.warning("%s: its coarse levels could not be prepared in the background (exit code %s); "
                            "`bil-transform prepare %s` says why", ds.spec.id, self._child.exitcode, ds.spec.id)
