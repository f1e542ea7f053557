"""Bounding what the C allocator keeps after a request (glibc only; elsewhere these do nothing).

A volume request allocates hundreds of MB in several threads (the request's worker, the
preprocessing prefetch thread, ONNX Runtime's). glibc gives each thread that contends for the
heap an arena of its own (up to 8 per core) and keeps freed memory in them, so the server's
resident memory grew with every new thread that touched a volume: 613 MiB after 20 BraTS volumes
on 2 cores, 457 MiB with the arenas capped at 2 (scripts/bench.py, docs/benchmarks.md).
``limit_arenas`` caps them at start (``mallopt(M_ARENA_MAX)``, as ``MALLOC_ARENA_MAX`` would);
``trim`` hands free memory at the top of the heaps back after a volume (``malloc_trim``).

``keep_freed`` stops glibc from giving every large buffer back the moment it is freed. By default a
block above its mmap threshold (128 KiB, raised dynamically to at most 32 MiB) gets its own
``mmap`` and is unmapped on ``free``, and free memory above 128 KiB at the top of a heap is trimmed:
an ONNX Runtime session without its memory arena (``inference.backends.OnnxBackend``) then
page-faults fresh memory for its activations on every run. Measured in one process (the shipped
Attention U-Net INT8, batch 32, 2 threads, medians): 7.4 ms a slice with glibc's defaults, 4.9 ms
with both thresholds raised, 4.8 ms with ONNX Runtime's arena; U-Net++ INT8 14.9 / 9.8 / 10.5 ms
(docs/benchmarks.md). Freed blocks then stay in the heap for the next request; ``trim`` still
hands them back after a volume or a large slice.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger("brainseg.serving")
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # glibc's mallopt parameters
KEEP_FREED_MB = 256  # keep_freed's size for the server (BRAINSEG_MALLOC_KEEP_MB) and every brainseg command


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


def keep_freed(mib: int) -> bool:
    """Blocks under ``mib`` MiB come from the heap and stay there once freed (0: glibc's dynamic
    thresholds); True if the allocator took both settings."""
    if _LIBC is None or mib <= 0:
        return False
    size = int(mib) * 2**20
    ok = bool(_LIBC.mallopt(M_MMAP_THRESHOLD, size)) and bool(_LIBC.mallopt(M_TRIM_THRESHOLD, 2 * size))
    if not ok:
        log.warning("could not raise the malloc thresholds to %d MiB", mib)
    return ok


def trim() -> bool:
    """Return the allocator's free memory to the system; True if some was released."""
    return _LIBC is not None and bool(_LIBC.malloc_trim(0))
