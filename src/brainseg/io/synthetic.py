"""A synthetic, clearly artificial brain-like slice, so the web page is usable without data.

It is NOT a real MRI: an ellipse of "brain" with a brighter rim, two dark "ventricles",
and one bright blob standing in for a lesion (brightest on FLAIR, as LGG lesions are).
Channels follow the LGG slices: (pre-contrast, FLAIR, post-contrast). numpy + OpenCV only.
"""

from __future__ import annotations

import cv2
import numpy as np

SYNTHETIC_LABEL = "Synthetic example — not a real MRI"


def synthetic_slice(size: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(size, size, 3) uint8 brain-like slice and its (size, size) bool "lesion" mask."""
    rng = np.random.default_rng(seed)
    c = size / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Head: ellipse; brain inside it, a thin brighter "skull" ring around.
    r_head = ((yy - c) / (0.44 * size)) ** 2 + ((xx - c) / (0.36 * size)) ** 2
    brain = r_head <= 0.85
    rim = (r_head > 0.85) & (r_head <= 1.0)
    # Ventricles: two dark crescents near the midline.
    vent = np.zeros((size, size), bool)
    for side in (-1, 1):
        v = ((yy - 0.47 * size) / (0.11 * size)) ** 2 + ((xx - (c + side * 0.06 * size)) / (0.035 * size)) ** 2
        vent |= v <= 1.0
    # Lesion: a lumpy blob in the right hemisphere (image left), a few % of the slice.
    ly, lx, lr = 0.38 * size, 0.36 * size, 0.075 * size
    angle = np.arctan2(yy - ly, xx - lx)
    lumpy = lr * (1 + 0.18 * np.sin(3 * angle + rng.uniform(0, 6.28)) + 0.08 * np.sin(5 * angle))
    lesion = np.hypot(yy - ly, xx - lx) <= lumpy
    lesion &= brain

    # Per channel (pre-contrast, FLAIR, post-contrast) intensities of brain, rim, ventricle, lesion.
    levels = {
        0: (95, 120, 40, 80),
        1: (90, 70, 25, 200),
        2: (100, 150, 45, 135),
    }
    texture = cv2.GaussianBlur(rng.normal(0, 1, (size, size)).astype(np.float32), (0, 0), size / 40)
    texture /= max(float(np.abs(texture).max()), 1e-6)
    out = np.zeros((size, size, 3), np.float32)
    for ch, (b, r, v, les) in levels.items():
        img = np.zeros((size, size), np.float32)
        img[brain] = b
        img[rim] = r
        img[vent] = v
        img[lesion] = les
        img = cv2.GaussianBlur(img, (0, 0), 1.2)
        img += brain * 10 * texture + rng.normal(0, 3, (size, size))
        img[r_head > 1.02] = 0  # keep the background black, as in skull-stripped data
        out[:, :, ch] = img
    return np.clip(out, 0, 255).astype(np.uint8), lesion


def synthetic_png(size: int = 256, seed: int = 0) -> bytes:
    """The synthetic slice encoded as an RGB PNG (what an upload of it would contain)."""
    from ..display.visualize import png_bytes

    image, _ = synthetic_slice(size, seed)
    return png_bytes(image)
