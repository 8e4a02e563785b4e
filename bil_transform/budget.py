"""The bytes that responses hold while they stream, bounded server-wide (a share of --cache-size).

A streamed body (a region) reserves what it may hold at once (a piece being made and its copy
in the socket's buffer) for as long as it is sent. A request that cannot get its share within
`wait` seconds is answered 503 with Retry-After before anything is computed, so slow readers
queue instead of growing the process.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

SHARE = 4  # the in-flight budget is a quarter of the cache
PIECES = 64  # a piece is at most 1/64 of the budget, so that many streams fit in it at once
MIN_PIECE, MAX_PIECE = 64 * 2**10, 4 * 2**20


class Busy(Exception):
    """The budget stayed full for the whole wait."""


class InFlight:
    """A byte semaphore on the event loop: first come, first served."""

    def __init__(self, limit: int, wait: float = 10.0):
        self.limit, self.wait = limit, wait
        self.used = 0
        self._changed = asyncio.Condition()

    @classmethod
    def for_cache(cls, cache_bytes: int) -> InFlight:
        return cls(max(cache_bytes // SHARE, 2 * PIECES * MIN_PIECE))

    @property
    def piece_bytes(self) -> int:
        """The most one piece of a streamed body should hold."""
        return max(MIN_PIECE, min(MAX_PIECE, self.limit // PIECES))

    @asynccontextmanager
    async def hold(self, n: int) -> AsyncIterator[None]:
        """Reserve `n` bytes (at most the whole budget) while the block runs; Busy if they are
        not free within `wait` seconds."""
        n = min(n, self.limit)
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self.used + n <= self.limit), self.wait)
            except TimeoutError:
                raise Busy(f"{self.used} of {self.limit} in-flight bytes are held by other responses") from None
            self.used += n
        try:
            yield
        finally:
            async with self._changed:
                self.used -= n
                self._changed.notify_all()
