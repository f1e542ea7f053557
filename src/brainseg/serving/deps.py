"""FastAPI dependencies: the shared objects ``create_app`` puts on ``app.state``, and the caller.

Routes declare what they need (``engine: Engine = Depends(get_engine)``) instead of closing
over ``create_app``'s variables, so each route module stands alone and tests can swap a piece.
"""

from __future__ import annotations

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


def get_owner(request: Request) -> str | None:
    """The hash of the API key the request came with (``middleware.ApiKey``); None without keys."""
    return getattr(request.state, "owner", None)
