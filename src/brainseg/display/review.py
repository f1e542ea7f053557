"""What a reader needs to review a mask: the model's probabilities as a heat map, and window / level.

Results keep the display slices as uint8, windowed from the input's values by a per-channel
``[low, high]`` (0.5-99.5 percentile, see ``preprocessing.to_uint8``); ``display_window``
records that window in the answer, so a window given in the input's own units (a DICOM
WindowCenter / WindowWidth) can be applied to the display values. Values the first window
clipped stay clipped, and a window much narrower than it shows the 256 display levels coarsely.
Pure numpy / OpenCV.
"""

from __future__ import annotations

import cv2
import numpy as np


def probability_u8(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] (any shape) -> uint8 0..255, as results keep them."""
    return (np.clip(np.asarray(prob, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def heatmap(prob_u8: np.ndarray) -> np.ndarray:
    """(H, W) uint8 probability -> (H, W, 3) RGB heat map (inferno: black 0, purple, orange, yellow 1)."""
    bgr = cv2.applyColorMap(np.ascontiguousarray(prob_u8, dtype=np.uint8), cv2.COLORMAP_INFERNO)
    return np.ascontiguousarray(bgr[..., ::-1])


def display_window(window) -> dict:
    """The answer's ``display_window`` from ``(low, high)`` per channel (None: uint8 input, shown as is)."""
    if window is None:
        return {"low": [0.0, 0.0, 0.0], "high": [255.0, 255.0, 255.0]}
    low, high = (np.broadcast_to(np.asarray(v, np.float64).ravel(), (3,)) for v in window)
    return {"low": [round(float(v), 4) for v in low], "high": [round(float(v), 4) for v in high]}


def window_level(display: np.ndarray, window: dict, center: float, width: float, channels=(0, 1, 2)) -> np.ndarray:
    """(H, W, 3) uint8 display slice re-windowed to ``center`` +- ``width`` / 2 in the input's units.

    ``window`` is the result's ``display_window``; only ``channels`` are changed.
    """
    if not width > 0:
        raise ValueError("width must be positive")
    out = np.array(display, dtype=np.uint8, copy=True)
    for c in channels:
        lo, hi = float(window["low"][c]), float(window["high"][c])
        scale = 255.0 / max(hi - lo, 1e-6)  # input units -> display units
        a, b = (center - width / 2 - lo) * scale, (center + width / 2 - lo) * scale
        out[..., c] = (np.clip((display[..., c].astype(np.float32) - a) / max(b - a, 1e-6), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return out
