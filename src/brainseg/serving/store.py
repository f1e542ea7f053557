"""Results kept in memory for download and slice browsing: least recently used go first.

Bounded by a count and by bytes. An entry is complete before it is inserted (under a lock),
so a reader never sees half a result; the NIfTI mask is encoded on first download and kept.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np


@dataclass
class StoredResult:
    kind: str  # "slice" or "volume"
    display: np.ndarray  # (Z, H, W, 3) uint8, windowed for display (Z = 1 for a slice)
    mask: np.ndarray  # (Z, H, W) bool
    summary: dict  # the JSON answer without its images
    affine: np.ndarray | None = None  # (4, 4) of the input volume
    name: str = "result"
    owner: str | None = None  # which API key made it (a hash); only that key reads it back
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: float = field(default_factory=time.time)
    _nifti: bytes | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def nbytes(self) -> int:
        return int(self.display.nbytes + self.mask.nbytes + (len(self._nifti) if self._nifti else 0))

    def nifti(self) -> bytes:
        """The mask as .nii.gz on the input's voxel grid and affine (volumes only)."""
        from ..volumes import mask_to_volume, nifti_bytes

        if self.affine is None:
            raise ValueError("only volume results have a NIfTI mask")
        with self._lock:
            if self._nifti is None:
                self._nifti = nifti_bytes(mask_to_volume(self.mask), self.affine)
            return self._nifti


class ResultStore:
    """In memory only (nothing is written to disk, so nothing is left behind by a crash).

    ``ttl_s``: a result older than this is gone (None: kept until evicted).
    """

    def __init__(self, max_items: int = 16, max_bytes: int = 1 << 30, ttl_s: float | None = None):
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, StoredResult] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, result: StoredResult) -> str:
        with self._lock:
            self._items[result.id] = result
            self._items.move_to_end(result.id)
            self._evict()
        return result.id

    def get(self, rid: str) -> StoredResult | None:
        with self._lock:
            self._expire()
            res = self._items.get(rid)
            if res is not None:
                self._items.move_to_end(rid)
            return res

    def delete(self, rid: str) -> bool:
        with self._lock:
            return self._items.pop(rid, None) is not None

    def _expire(self) -> None:
        if self.ttl_s is None:
            return
        old = time.time() - self.ttl_s
        for rid in [rid for rid, r in self._items.items() if r.created < old]:
            del self._items[rid]

    def _evict(self) -> None:
        self._expire()
        total = sum(r.nbytes for r in self._items.values())
        # The newest entry always stays, even alone above the byte limit.
        while len(self._items) > 1 and (len(self._items) > self.max_items or total > self.max_bytes):
            _, old = self._items.popitem(last=False)
            total -= old.nbytes

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._items)
