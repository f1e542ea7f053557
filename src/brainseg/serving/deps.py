"""FastAPI dependencies: the shared objects ``create_app`` puts on ``app.state``, and the caller.

Routes declare what they need (``engine: Engine = Depends(get_engine)``) instead of closing
over ``create_app``'s variables, so each route module stands alone and tests can swap a piece.
"""

from __future__ import annotations

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


def get_limiter(request: Request) -> anyio.CapacityLimiter:
    """At most ``BRAINSEG_MAX_CONCURRENT`` segmentations in worker threads at once."""
    return request.app.state.limiter


def get_owner(request: Request) -> str | None:
    """The hash of the API key the request came with (``middleware.ApiKey``); None without keys."""
    return getattr(request.state, "owner", None)
