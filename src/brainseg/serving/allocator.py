"""Bounding what the C allocator keeps after a request (glibc only; elsewhere these do nothing).

A volume request allocates hundreds of MB in several threads (the request's worker, the
preprocessing prefetch thread, ONNX Runtime's). glibc gives each thread that contends for the
heap an arena of its own (up to 8 per core) and keeps freed memory in them, so the server's
resident memory grew with every new thread that touched a volume: 613 MiB after 20 BraTS volumes
on 2 cores, 457 MiB with the arenas capped at 2 (scripts/bench.py, docs/benchmarks.md).
``limit_arenas`` caps them at start (``mallopt(M_ARENA_MAX)``, as ``MALLOC_ARENA_MAX`` would);
``trim`` hands free memory at the top of the heaps back after a volume (``malloc_trim``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("brainseg.serving")
M_ARENA_MAX = -8  # glibc's mallopt parameter


def _libc():
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def limit_arenas(arenas: int) -> bool:
    """At most ``arenas`` malloc arenas from now on (0: glibc's default); True if the allocator took it."""
    if _LIBC is None or arenas <= 0:
        return False
    ok = bool(_LIBC.mallopt(M_ARENA_MAX, int(arenas)))
    if not ok:
        log.warning("could not limit the malloc arenas to %d", arenas)
    return ok


def trim() -> bool:
    """Return the allocator's free memory to the system; True if some was released."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))
