"""What work on the pool is done for: the token that cancels it once nobody waits for its result,
and the share of the workers its dataset may hold.

Cancellation. A request's work runs under a token of its own, which the server cancels when the
client leaves. A single-flight computation (cache.Section.get_or_compute) runs under a token of
its own too, whose waiters are the tokens of everyone waiting for its result (requests, or other
computations waiting for this one): it is cancelled when its last waiter is, never while one still
waits. Work calls `checkpoint()` between pieces (between the blocks of the pyramid's fan-out, the
subtasks of Workers.map, the pieces of a checksum), which raises `Cancelled` once its token is
cancelled. Cancelled work is never cached: the next request for it computes it again.

Shares. One dataset cannot hold more than a share of the pool's threads at once (`Share`): a
request's job waits, off the pool, until its dataset has a free thread, and Workers.map spreads a
job's subtasks over more threads only while its dataset has free ones (else the caller runs them
itself). So a dataset whose every chunk needs millions of blocks slows itself, not the others.

Work outside a request (export, tests calling readers directly) has no token and no share: it is
never cancelled and may use every thread, as before.
"""

from __future__ import annotations

import asyncio
import contextvars
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


class Share:
    """At most `limit` threads working for one dataset at once: its requests' jobs and their
    subtasks together. A job waits for a thread on the event loop (`take`), a subtask only takes
    a free one (`try_take`); a thread given back goes to the longest-waiting job first."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.busy = 0
        self._lock = threading.Lock()
        self._waiting: deque[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = deque()

    def try_take(self) -> bool:
        with self._lock:
            if self.busy < self.limit and not self._waiting:
                self.busy += 1
                return True
            return False

    async def take(self) -> None:
        """Wait until a thread of this share is free, and hold it (give it back with `give_back`)."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if self.busy < self.limit and not self._waiting:
                self.busy += 1
                return
            entry = (loop, loop.create_future())
            self._waiting.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            with self._lock:
                queued = entry in self._waiting
                if queued:
                    self._waiting.remove(entry)
            if not queued and entry[1].done() and not entry[1].cancelled():
                self.give_back()  # handed over just as its waiter left
            raise

    def give_back(self) -> None:
        with self._lock:
            if not self._waiting:
                self.busy -= 1
                return
            loop, future = self._waiting.popleft()  # the thread goes on working for this share
        try:
            loop.call_soon_threadsafe(self._hand, future)
        except RuntimeError:  # the loop is closed: the server has stopped
            pass

    def _hand(self, future: asyncio.Future) -> None:
        if future.cancelled():
            self.give_back()
        else:
            future.set_result(None)


def try_take_share() -> tuple[bool, Share | None]:
    """(whether this thread's work may use one more thread now, the share to give it back to)."""
    share = _share.get()
    return (True, None) if share is None else (share.try_take(), share)
