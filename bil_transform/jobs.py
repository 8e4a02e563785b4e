"""What work on the pool is done for: the token that cancels it once nobody waits for its result,
and the share of the workers its dataset may hold.

Cancellation. A request's work runs under a token of its own, which the server cancels when the
client leaves. A single-flight computation (cache.Section.get_or_compute) runs under a token of
its own too, whose waiters are the tokens of everyone waiting for its result (requests, or other
computations waiting for this one): it is cancelled when its last waiter is, never while one still
waits. Work calls `checkpoint()` between pieces (between the blocks of the pyramid's fan-out, the
subtasks of Workers.map, the pieces of a checksum), which raises `Cancelled` once its token is
cancelled. Cancelled work is never cached: the next request for it computes it again.

Shares. One dataset holds at most one thread a core, and the pool keeps a reserve of threads
beyond those for the other datasets (`Shares`). A request's job waits in its dataset's queue until
the dataset may have a thread, and Workers.map spreads a job's subtasks over more threads only while
its dataset may have them (else the caller runs them itself). So a dataset whose every chunk needs
millions of blocks slows itself, not the others, and one viewer of one dataset still gets every
core.

Work outside a request (export, tests calling readers directly) has no token and no share: it is
never cancelled and may use every thread, as before.
"""

from __future__ import annotations

import contextvars
import itertools
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any


class Cancelled(Exception):
    """Everyone waiting for this work has left; nothing of it is cached."""

    def __init__(self) -> None:
        super().__init__("The work was cancelled: every client waiting for it has left")


_graph = threading.Lock()  # guards every token's waiters and flights


class Token:
    """Cancels a piece of work. A request's token is cancelled by the server; a flight's (a
    shared computation's) when its last waiter's is."""

    __slots__ = ("cancelled", "forever", "_waiters", "_flights")

    def __init__(self) -> None:
        self.cancelled = False
        self.forever = False  # waited for by work that cannot be cancelled: never cancelled
        self._waiters: set[Token] = set()  # tokens waiting for this (a flight's)
        self._flights: set[Token] = set()  # flights this token waits for

    def cancel(self) -> None:
        with _graph:
            self._cancel()

    def _cancel(self) -> None:
        if self.cancelled:
            return
        self.cancelled = True
        flights, self._flights = self._flights, set()
        for flight in flights:
            flight._waiters.discard(self)
            if not flight._waiters and not flight.forever:
                flight._cancel()

    def join(self, waiter: Token | None) -> bool:
        """Count `waiter` among this flight's waiters (None: work that is never cancelled).
        False if this flight is cancelled already: wait for it to end, then compute it again."""
        with _graph:
            if self.cancelled:
                return False
            if waiter is None:
                self.forever = True
            elif waiter.cancelled:
                raise Cancelled()
            else:
                self._waiters.add(waiter)
                waiter._flights.add(self)
            return True

    def leave(self, waiter: Token | None) -> None:
        """`waiter` has the flight's result (or its failure) and waits no more."""
        if waiter is None:
            return
        with _graph:
            self._waiters.discard(waiter)
            waiter._flights.discard(self)


_token: contextvars.ContextVar[Token | None] = contextvars.ContextVar("bil_token", default=None)
_share: contextvars.ContextVar[Share | None] = contextvars.ContextVar("bil_share", default=None)


def current() -> Token | None:
    """The token the work on this thread runs under (None outside a request)."""
    return _token.get()


def checkpoint() -> None:
    """Raise Cancelled if the work on this thread has nobody left to do it for."""
    token = _token.get()
    if token is not None and token.cancelled:
        raise Cancelled()


def run(token: Token | None, share: Share | None, fn: Callable[..., Any], *args) -> Any:
    """fn(*args) under a token and a dataset's share (on a pool thread)."""
    saved = _token.set(token), _share.set(share)
    try:
        checkpoint()  # it waited in the pool's queue: its client may be gone
        return fn(*args)
    finally:
        _token.reset(saved[0])
        _share.reset(saved[1])


def under(token: Token, fn: Callable[[], Any]) -> Any:
    """fn() with `token` in place of this thread's own (a flight's computation)."""
    saved = _token.set(token)
    try:
        return fn()
    finally:
        _token.reset(saved)


def carried(fn: Callable[[], Any]) -> Callable[[], Any]:
    """fn, to run on another thread under this thread's token and share (a subtask)."""
    context = contextvars.copy_context()  # one per subtask: a context runs on one thread at a time
    return lambda: context.run(fn)


class Shares:
    """The pool's threads, handed out by dataset. The pool has `threads` threads (one a core) and
    `reserve` more. One dataset may hold up to `threads` of them, so one viewer of one dataset gets
    every core; the reserve goes only to datasets holding fewer than `limit`, so however long one
    dataset's work runs (the coarsest chunk of a terabyte), another dataset's chunk always finds a
    thread, at the price of sharing the cores for a while. A job waits in its dataset's queue, and
    a thread given back starts the longest-waiting job that may have it, from the thread that gave
    it back (no trip through the event loop between two jobs)."""

    def __init__(self, pool: Executor, threads: int, reserve: int, limit: int):
        self.pool = pool  # threads + reserve threads
        self.threads, self.reserve, self.limit = max(1, threads), max(1, reserve), max(1, limit)
        self.busy = 0  # threads held by every dataset together
        self._lock = threading.Lock()
        self._shares: dict[str, Share] = {}
        self._waiting: set[Share] = set()  # shares with jobs waiting for a thread
        self._order = itertools.count()  # who waited first, across datasets

    def of(self, dataset: str) -> Share:
        with self._lock:
            share = self._shares.get(dataset)
            if share is None:
                share = self._shares[dataset] = Share(self)
            return share

    def _allows(self, share: Share) -> bool:
        """Whether `share` may hold one more thread (under the lock)."""
        if self.busy < self.threads:
            return True
        return self.busy < self.threads + self.reserve and share.busy < self.limit

    def _take(self, share: Share) -> None:
        share.busy += 1
        self.busy += 1

    def _dispatch(self) -> list[tuple[Share, _Job]]:
        """The waiting jobs that get the free threads now (under the lock); jobs whose request has
        gone are dropped on the way."""
        handed = []
        while self._waiting:
            for share in list(self._waiting):
                while share._queue and share._queue[0].future.cancelled():
                    share._queue.popleft()
                if not share._queue:
                    self._waiting.discard(share)
            candidates = [s for s in self._waiting if self._allows(s)]
            if not candidates:
                break
            share = min(candidates, key=lambda s: s._queue[0].order)
            job = share._queue.popleft()
            if not share._queue:
                self._waiting.discard(share)
            self._take(share)
            handed.append((share, job))
        return handed

    def _start(self, handed: list[tuple[Share, _Job]]) -> None:
        for share, job in handed:
            self.pool.submit(share._execute, job)


@dataclass(frozen=True)
class _Job:
    order: int
    future: Future
    token: Token | None
    fn: Callable[..., Any]
    args: tuple


class Share:
    """One dataset's threads of the pool (Shares). A request's job waits in its queue (`submit`),
    a subtask only takes a free thread (`try_take`)."""

    def __init__(self, shares: Shares):
        self._shares = shares
        self.busy = 0
        self._queue: deque[_Job] = deque()

    def submit(self, token: Token | None, fn: Callable[..., Any], *args) -> Future:
        """fn(*args) under `token` on a thread of this share, when it may have one; cancel the
        future to drop it while it waits."""
        shares, future = self._shares, Future()
        with shares._lock:
            self._queue.append(_Job(next(shares._order), future, token, fn, args))
            shares._waiting.add(self)
            handed = shares._dispatch()
        shares._start(handed)
        return future

    def try_take(self) -> bool:
        shares = self._shares
        with shares._lock:
            if self._queue or not shares._allows(self):  # its waiting jobs come first
                return False
            shares._take(self)
            return True

    def give_back(self) -> None:
        shares = self._shares
        with shares._lock:
            self.busy -= 1
            shares.busy -= 1
            handed = shares._dispatch()
        shares._start(handed)

    def _execute(self, job: _Job) -> None:
        """Run a job on the thread it was handed, then give the thread back (on the pool)."""
        try:
            if job.future.set_running_or_notify_cancel():
                try:
                    result = run(job.token, self, job.fn, *job.args)
                except BaseException as exc:
                    job.future.set_exception(exc)
                else:
                    job.future.set_result(result)
        finally:
            self.give_back()


def try_take_share() -> tuple[bool, Share | None]:
    """(whether this thread's work may use one more thread now, the share to give it back to)."""
    share = _share.get()
    return (True, None) if share is None else (share.try_take(), share)
