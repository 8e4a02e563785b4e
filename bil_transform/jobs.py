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
beyond those for the other datasets (`Shares`). A request's job waits, off the pool, until its
dataset may have a thread, and Workers.map spreads a job's subtasks over more threads only while
its dataset may have them (else the caller runs them itself). So a dataset whose every chunk needs
millions of blocks slows itself, not the others, and one viewer of one dataset still gets every
core.

Work outside a request (export, tests calling readers directly) has no token and no share: it is
never cancelled and may use every thread, as before.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import threading
from collections import deque
from collections.abc import Callable
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
    thread, at the price of sharing the cores for a while. A thread given back goes to the
    longest-waiting job that may have it."""

    def __init__(self, threads: int, reserve: int, limit: int):
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

    def _dispatch(self) -> list[tuple[Share, asyncio.AbstractEventLoop, asyncio.Future]]:
        """The waiting jobs that get the free threads now (under the lock)."""
        handed = []
        while self._waiting:
            candidates = [s for s in self._waiting if self._allows(s)]
            if not candidates:
                break
            share = min(candidates, key=lambda s: s._queue[0][0])
            _, loop, future = share._queue.popleft()
            if not share._queue:
                self._waiting.discard(share)
            self._take(share)
            handed.append((share, loop, future))
        return handed

    def _hand_over(self, handed: list[tuple[Share, asyncio.AbstractEventLoop, asyncio.Future]]) -> None:
        for share, loop, future in handed:
            try:
                loop.call_soon_threadsafe(share._hand, future)
            except RuntimeError:  # the loop is closed: the server has stopped
                pass


class Share:
    """One dataset's threads of the pool (Shares). A job waits for a thread on the event loop
    (`take`), a subtask only takes a free one (`try_take`)."""

    def __init__(self, shares: Shares):
        self._shares = shares
        self.busy = 0
        self._queue: deque[tuple[int, asyncio.AbstractEventLoop, asyncio.Future]] = deque()

    def try_take(self) -> bool:
        shares = self._shares
        with shares._lock:
            if self._queue or not shares._allows(self):  # its waiting jobs come first
                return False
            shares._take(self)
            return True

    async def take(self) -> None:
        """Wait until this dataset may have a thread, and hold it (give it back with `give_back`)."""
        shares, loop = self._shares, asyncio.get_running_loop()
        with shares._lock:
            if not self._queue and shares._allows(self):
                shares._take(self)
                return
            entry = (next(shares._order), loop, loop.create_future())
            self._queue.append(entry)
            shares._waiting.add(self)
        try:
            await entry[2]
        except asyncio.CancelledError:
            with shares._lock:
                queued = entry in self._queue
                if queued:
                    self._queue.remove(entry)
                    if not self._queue:
                        shares._waiting.discard(self)
                handed = shares._dispatch()  # another dataset may take what this one waited for
            shares._hand_over(handed)
            if not queued and entry[2].done() and not entry[2].cancelled():
                self.give_back()  # handed over just as its waiter left
            raise

    def give_back(self) -> None:
        shares = self._shares
        with shares._lock:
            self.busy -= 1
            shares.busy -= 1
            handed = shares._dispatch()
        shares._hand_over(handed)

    def _hand(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self.give_back()
        else:
            future.set_result(None)


def try_take_share() -> tuple[bool, Share | None]:
    """(whether this thread's work may use one more thread now, the share to give it back to)."""
    share = _share.get()
    return (True, None) if share is None else (share.try_take(), share)
