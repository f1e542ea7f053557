"""FastAPI dependencies: the shared objects ``create_app`` puts on ``app.state``, and the caller.

Routes declare what they need (``engine: Engine = Depends(get_engine)``) instead of closing
over ``create_app``'s variables, so each route module stands alone and tests can swap a piece.
"""

from __future__ import annotations

from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from fastapi import Request

from .engine import Engine
from .settings import Settings
from .uploads import Limits


def get_engine(request: Request) -> Engine:
    return request.app.state.engine


def get_store(request: Request):
    """The result store (``store.ResultStore``: ``put`` / ``get`` / ``delete`` / ``len``)."""
    return request.app.state.store


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_limits(request: Request) -> Limits:
    return request.app.state.limits


@dataclass(frozen=True)
class Limiters:
    """Tokens a segmentation holds while it is worked on: one of ``BRAINSEG_MAX_CONCURRENT`` always,
    and first one of ``BRAINSEG_MAX_CONCURRENT_VOLUMES`` for a volume (taken before the worker's)."""

    worker: anyio.CapacityLimiter
    volume: anyio.CapacityLimiter

    @classmethod
    def of(cls, settings: Settings) -> Limiters:
        return cls(anyio.CapacityLimiter(settings.max_concurrent), anyio.CapacityLimiter(settings.max_concurrent_volumes))

    @property
    def volume_and_worker(self) -> list[anyio.CapacityLimiter]:
        return [self.volume, self.worker]

    @property
    def worker_only(self) -> list[anyio.CapacityLimiter]:
        return [self.worker]


def get_limiters(request: Request) -> Limiters:
    return request.app.state.limiters


class MemoryBudget:
    """Bytes of working memory the segmentations of this process may hold together
    (``BRAINSEG_MEMORY_BUDGET_MB``). A request is charged what its headers say it will need
    (``uploads.memory_need``) before anything is decoded, and waits, first come first served, until
    that fits beside what the running ones hold; a waiter cancelled (its client gone) leaves the
    line. Used from the event loop only: no lock.
    """

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self.waited = 0  # requests that had to wait for memory, since start
        self._line: deque[tuple[int, anyio.Event]] = deque()

    @asynccontextmanager
    async def hold(self, n: int):
        """Hold ``n`` bytes (at most ``total``) while the block runs."""
        n = min(int(n), self.total)
        await self._acquire(n)
        try:
            yield
        finally:
            self._release(n)

    async def _acquire(self, n: int) -> None:
        if not self._line and self.used + n <= self.total:
            self.used += n
            return
        self.waited += 1
        entry = (n, anyio.Event())
        self._line.append(entry)
        try:
            await entry[1].wait()
        except BaseException:  # cancelled: give back what was granted meanwhile, or leave the line
            if entry[1].is_set():
                self._release(n)
            else:
                self._line.remove(entry)
                self._grant()
            raise

    def _release(self, n: int) -> None:
        self.used -= n
        self._grant()

    def _grant(self) -> None:
        while self._line and self.used + self._line[0][0] <= self.total:
            n, ready = self._line.popleft()
            self.used += n
            ready.set()


def get_memory(request: Request) -> MemoryBudget:
    return request.app.state.memory


def get_owner(request: Request) -> str | None:
    """The hash of the API key the request came with (``middleware.ApiKey``); None without keys."""
    return getattr(request.state, "owner", None)
