"""Stopping the work of a segment request whose client has gone.

``routes.segment`` sets a ``threading.Event`` when ``request.is_disconnected()`` turns true. A
request still waiting for a worker is dropped before it starts; a running one sees the event
between steps: after decoding, and before each batch of slices goes to the network
(``CancellableBackend``), so a volume stops within one batch (``predict.VOLUME_BATCH`` slices).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from ..inference.backends import Ensemble, Segmenter


class Cancelled(Exception):
    """The client of a segment request disconnected; ``stage`` says where its work stopped
    (``queued``: before it ran; ``running``: between steps of its work)."""

    def __init__(self, stage: str):
        super().__init__(stage)
        self.stage = stage


@dataclass
class CancellableBackend:
    """A backend that raises ``Cancelled`` instead of running a batch once ``cancel`` is set."""

    inner: object
    cancel: threading.Event

    def __call__(self, batch):
        if self.cancel.is_set():
            raise Cancelled("running")
        return self.inner(batch)

    def __getattr__(self, name):  # config, info, kind, precision of the wrapped backend
        return getattr(self.inner, name)


def cancellable(model, cancel: threading.Event):
    """``model`` (a Segmenter or an Ensemble) whose network calls check ``cancel`` first."""
    if isinstance(model, Ensemble):
        return Ensemble([cancellable(m, cancel) for m in model.members])
    return Segmenter(CancellableBackend(model.backend, cancel), model.name, model.path)
