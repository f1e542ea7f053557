"""The HTTP protocol to run the service with: uvicorn's h11 protocol plus a deadline for the request head.

uvicorn has no setting for this: ``timeout_keep_alive`` only covers the idle time between two
requests and restarts on every byte received, so a client that sends a request head one byte at
a time (slowloris), or connects and sends nothing, holds its connection for as long as it likes.
Here a connection that has not sent a whole request head within ``BRAINSEG_HEADER_TIMEOUT_S`` of
connecting (or of its previous answer, when kept alive) gets a 408 and is closed. The time to
send the body is bounded by ``middleware.BodyTimeout``; a request whose head and body have
arrived may take as long as its work takes.

Use it with ``uvicorn app:app --http brainseg.serving.protocol:H11WithHeaderTimeout`` (``brainseg
serve`` and ``scripts/run_app.sh`` do).
"""

from __future__ import annotations

import asyncio
import functools
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import Settings

log = logging.getLogger("brainseg.serving")

SPEC = "brainseg.serving.protocol:H11WithHeaderTimeout"  # uvicorn's --http value
TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 22\r\nconnection: close\r\n\r\nrequest head too slow\n"


@functools.cache
def header_timeout_s() -> float:
    """``BRAINSEG_HEADER_TIMEOUT_S``, read once per process."""
    return Settings.from_env().header_timeout_s


class H11WithHeaderTimeout(H11Protocol):
    """uvicorn's h11 protocol; a request head must arrive within ``header_timeout_s()``."""

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():  # kept alive: the next head has the same deadline
            self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(header_timeout_s(), self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return  # a request is in progress (its body has its own deadline) or the connection is going
        partial = bool(self.conn.trailing_data[0])
        if partial:  # a client in the middle of a head is told why
            log.info("closed a connection whose request head did not arrive within %.0f s (BRAINSEG_HEADER_TIMEOUT_S)", header_timeout_s())
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()
