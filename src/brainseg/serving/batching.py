"""Micro-batching: network inputs of concurrent slice requests run as one batch.

Each request thread preprocesses its own slice, then hands the network input to ``MicroBatcher``
(``submit``) and waits. One dispatcher thread takes the oldest waiting input, waits a short window
(``wait_s``, a few ms) for more inputs with the same key (model, precision, TTA), runs them as one
batch of at most ``max_rows`` rows and hands each request its rows of the output. The window is
only waited while more requests are on their way (``expecting``): a lone client is not slowed.
When nothing is queued, running or on its way, the submitter runs its input itself, in its own
thread: a lone client's slice does not pay two thread hand-offs. Either way one batch runs at a
time. The queue is bounded (``max_pending`` rows): a submitter waits for room.

``BatchedBackend`` puts this behind the backend interface (``(B, 3, S, S) -> (B, S, S)``), so
``Segmenter.probabilities`` (preprocessing, TTA, resizing back) is the same code with or without it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("brainseg.serving")


@dataclass
class _Job:
    key: tuple
    run: object  # the backend: (B, 3, S, S) float32 -> (B, S, S)
    x: np.ndarray
    arrived: float = field(default_factory=time.perf_counter)
    done: threading.Event = field(default_factory=threading.Event)
    out: np.ndarray | None = None
    error: BaseException | None = None


class MicroBatcher:
    """Runs submitted inputs in batches, one batch at a time, on its own dispatcher thread."""

    def __init__(self, max_rows: int = 16, wait_s: float = 0.005, max_pending: int = 256):
        self.max_rows, self.wait_s, self.max_pending = max_rows, wait_s, max(max_pending, max_rows)
        self._queues: dict[tuple, deque[_Job]] = {}
        self._pending = 0  # rows waiting
        self._expected = 0  # requests inside ``expecting`` that have not submitted yet
        self._local = threading.local()
        self._cond = threading.Condition()
        self._closed = False
        self._running = False  # a batch is running (on the dispatcher, or inline in a submitter)
        self.batches = 0  # batches run, and rows in them (for tests and logs)
        self.rows = 0
        self.inline = 0  # of them, run by a lone submitter in its own thread
        self._thread = threading.Thread(target=self._loop, name="brainseg-batcher", daemon=True)
        self._thread.start()

    @contextmanager
    def expecting(self):
        """Announce that this thread will submit soon (so the dispatcher waits its window for it)."""
        with self._cond:
            self._expected += 1
            self._local.announced = True
        try:
            yield
        finally:
            with self._cond:
                if getattr(self._local, "announced", False):
                    self._expected -= 1
                    self._local.announced = False
                    self._cond.notify_all()

    def submit(self, key: tuple, run, x: np.ndarray) -> np.ndarray:
        """Run ``x`` (rows of one request) with ``run``, batched with other requests of the same key; blocks."""
        job = _Job(key, run, x)
        with self._cond:
            while self._pending + len(x) > self.max_pending and self._pending and not self._closed:
                self._cond.wait()
            if self._closed:
                raise RuntimeError("the batcher is closed")
            if getattr(self._local, "announced", False):
                self._expected -= 1
                self._local.announced = False
            alone = not self._running and not self._pending and not self._expected
            if alone:  # nobody to batch with: run it here
                self._running = True
            else:
                self._queues.setdefault(key, deque()).append(job)
                self._pending += len(x)
                self._cond.notify_all()
        if alone:
            self.inline += 1
            self._run([job])
        else:
            job.done.wait()
        if job.error is not None:
            raise job.error
        return job.out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    # ------------------------------------------------------------ the dispatcher

    def _rows(self, key: tuple) -> int:
        return sum(len(j.x) for j in self._queues[key])

    def _next_batch(self) -> list[_Job] | None:
        """Under the lock: wait for work, then for the window, and take one batch (None when closed)."""
        while self._running or not any(self._queues.values()):
            if self._closed and not any(self._queues.values()):
                return None
            self._cond.wait()
        key = min((k for k, q in self._queues.items() if q), key=lambda k: self._queues[k][0].arrived)
        deadline = self._queues[key][0].arrived + self.wait_s
        while self._rows(key) < self.max_rows and self._expected > 0 and not self._closed:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._cond.wait(left)
        queue, jobs, rows = self._queues[key], [], 0
        while queue and (not jobs or rows + len(queue[0].x) <= self.max_rows):
            jobs.append(queue.popleft())
            rows += len(jobs[-1].x)
        self._pending -= rows
        self._running = True
        self._cond.notify_all()  # room for waiting submitters
        return jobs

    def _loop(self) -> None:
        while True:
            with self._cond:
                jobs = self._next_batch()
            if jobs is None:
                return
            self._run(jobs)

    def _run(self, jobs: list[_Job]) -> None:
        try:
            x = jobs[0].x if len(jobs) == 1 else np.concatenate([j.x for j in jobs])
            out = jobs[0].run(x)
            self.batches += 1
            self.rows += len(x)
            start = 0
            for j in jobs:
                j.out = out[start : start + len(j.x)]
                start += len(j.x)
        except BaseException as exc:  # every waiting request gets the batch's error (a server fault)
            for j in jobs:
                j.error = exc
        finally:
            with self._cond:
                self._running = False
                self._cond.notify_all()
            for j in jobs:
                j.done.set()


@dataclass
class BatchedBackend:
    """A backend whose calls go through a ``MicroBatcher`` under ``key``; otherwise the wrapped one."""

    inner: object
    batcher: MicroBatcher
    key: tuple

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.batcher.submit(self.key, self.inner, np.ascontiguousarray(batch, dtype=np.float32))

    def __getattr__(self, name):  # config, info, kind, precision of the wrapped backend
        return getattr(self.inner, name)
