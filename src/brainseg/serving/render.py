"""What the service draws: display slices, overlays and masks as PNG (or base64 PNG for JSON)."""

from __future__ import annotations

import numpy as np

from ..display.visualize import b64png, png_bytes, render  # noqa: F401  (render: the drawing itself lives with the other pictures)
from ..inference.backends import window_for_volume
from ..preprocessing import to_uint8


def mask_png(mask: np.ndarray) -> bytes:
    """A (H, W) bool mask as a 0 / 255 grey PNG."""
    return png_bytes(np.asarray(mask).astype(np.uint8) * 255)


def display_slice(image: np.ndarray) -> np.ndarray:
    """One (H, W, 3) input slice of any dtype -> uint8 for display."""
    return to_uint8(image)


def display_volume(slices: np.ndarray, window: tuple | None = None) -> np.ndarray:
    """(Z, H, W, 3) any dtype -> uint8 for display, with the same volume-wide window the model saw
    (``window``: ``inference.window_for_volume(slices)`` when the caller has it already).

    Windowed one slice at a time, so the float temporaries stay one slice large.
    """
    window = window_for_volume(slices) if window is None else window
    if window is None:
        return slices
    out = np.empty(slices.shape, np.uint8)
    for k in range(slices.shape[0]):
        out[k] = to_uint8(slices[k], *window)
    return out
