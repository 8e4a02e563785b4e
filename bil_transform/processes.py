"""Several server processes on one port (--processes N): each binds it with SO_REUSEPORT, so the
kernel spreads connections over them and each runs its own Python (its own GIL and memory cache,
sharing the disk tier). This module starts them, restarts one that dies, and stops them all.

The processes are spawned, not forked: a fork of a process that already runs threads may copy
a lock some thread holds. They report back once their datasets are open, so the parent can say
when all of them serve, or stop every one when one cannot start.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bil_transform")

STOP_GRACE = 5.0  # seconds a process gets to finish its answers in flight before it is killed
RESTART_PAUSE = 1.0  # a process that keeps dying is restarted at most this often


class StartError(Exception):
    """A process could not start; its own message was printed already."""


def orphan_watch(parent: int) -> None:
    """Exit when the parent is gone (killed outright, it could not stop us): an orphaned process
    would go on answering on the port with nobody to stop or restart it."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="bil-orphan-watch", daemon=True).start()


def supervise(n: int, target: Callable[..., Any], args: tuple, started: Callable[[list[Any]], None]) -> int:
    """Run `target(*args, index, reports)` in n processes. Each puts `(index, value)` in the
    `reports` queue once it is ready; `started` gets the n values. Returns the exit code: 0 after
    Ctrl-C or SIGTERM, 2 if a process failed to start."""
    ctx = multiprocessing.get_context("spawn")
    reports: multiprocessing.Queue = ctx.Queue()
    metrics = tempfile.mkdtemp(prefix="bil-transform-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics  # set before the processes import prometheus-client

    def spawn(index: int) -> multiprocessing.process.BaseProcess:
        proc = ctx.Process(target=target, args=(*args, index, reports), name=f"bil-transform-{index}")
        proc.start()
        return proc

    signal.signal(signal.SIGTERM, _raise_interrupt)
    procs: dict[int, multiprocessing.process.BaseProcess] = {}
    try:
        procs = {i: spawn(i) for i in range(n)}
        started(_wait_ready(procs, reports))
        _keep_running(procs, spawn)
    except StartError:
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        _stop(list(procs.values()))
        shutil.rmtree(metrics, ignore_errors=True)
    return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _wait_ready(procs: dict[int, multiprocessing.process.BaseProcess], reports: multiprocessing.Queue) -> list:
    ready: dict[int, Any] = {}
    while len(ready) < len(procs):
        for index, proc in procs.items():
            if index not in ready and not proc.is_alive():
                raise StartError(f"process {index} exited with code {proc.exitcode} while starting")
        try:
            index, value = reports.get(timeout=0.2)
        except queue.Empty:  # look at the processes again
            continue
        ready[index] = value
    return [ready[i] for i in sorted(ready)]


def _keep_running(procs: dict[int, multiprocessing.process.BaseProcess], spawn: Callable) -> None:
    """Restart any process that dies, until interrupted."""
    from prometheus_client import multiprocess

    while True:
        multiprocessing.connection.wait([p.sentinel for p in procs.values()])
        for index, proc in list(procs.items()):
            if proc.is_alive():
                continue
            log.error("server process %d (pid %s) exited with code %s; starting another", index, proc.pid,
                      proc.exitcode)
            multiprocess.mark_process_dead(proc.pid)  # its gauges go; its counters stay counted
            time.sleep(RESTART_PAUSE)
            procs[index] = spawn(index)


def _stop(procs: list) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # SIGTERM: aiohttp finishes what is in flight, then the process exits
    deadline = time.monotonic() + STOP_GRACE
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join()
