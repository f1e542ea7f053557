"""Pictures a person would rather look at than read: overlays and the preprocessing overview."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import cv2
import numpy as np

from ..preprocessing import clahe, to_uint8

LESION_RGB = (255, 40, 40)


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.4, color=LESION_RGB, outline: bool = True) -> np.ndarray:
    """(H, W, 3) image (any dtype) + (H, W) bool mask -> (H, W, 3) uint8 RGB with the lesion tinted and outlined."""
    base = to_uint8(image)
    if base.ndim == 2:
        base = np.repeat(base[:, :, None], 3, axis=2)
    out = base.astype(np.float32)
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    out = out.astype(np.uint8)
    if outline and m.any():
        contours, _ = cv2.findContours(m.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(out, contours, -1, color, 1)
    return out


def display_channel(image: np.ndarray, channel: int = 1) -> np.ndarray:
    """One channel as grey RGB (default FLAIR, where LGG lesions show)."""
    ch = to_uint8(image)[:, :, channel]
    return np.repeat(ch[:, :, None], 3, axis=2)


def png_bytes(rgb_or_grey: np.ndarray) -> bytes:
    """(H, W) grey or (H, W, 3) RGB uint8 -> PNG bytes."""
    arr = cv2.cvtColor(rgb_or_grey, cv2.COLOR_RGB2BGR) if rgb_or_grey.ndim == 3 else rgb_or_grey
    ok, buf = cv2.imencode(".png", arr)
    if not ok:
        raise ValueError("could not encode PNG")
    return buf.tobytes()


def b64png(img: np.ndarray) -> str:
    """``png_bytes`` as base64 text, for JSON answers and self-contained HTML."""
    return base64.b64encode(png_bytes(img)).decode("ascii")


def save_png(path: os.PathLike | str, rgb_or_grey: np.ndarray) -> None:
    """Write a PNG atomically (RGB or grey uint8)."""
    from ..io.files import write_bytes_atomic

    write_bytes_atomic(path, png_bytes(rgb_or_grey))


def save_figure(fig, path: os.PathLike | str) -> Path:
    """Write a matplotlib figure as PNG atomically, then close it."""
    import io

    import matplotlib.pyplot as plt

    from ..io.files import write_bytes_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)


def preprocessing_overview(ds, cfg, path: os.PathLike | str, n_samples: int = 3, seed: int = 0) -> Path:
    """Raw vs CLAHE vs augmented samples (mask outlined) for a few lesion-positive slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.datasets import read_pair
    from ..preprocessing import build_augmentation, prepare

    rng = np.random.default_rng(seed)
    slices = [s for p in ds.patients for s in p.slices]
    rng.shuffle(slices)
    chosen, smaller = [], []
    for s in slices:  # the first few with a clearly visible lesion
        img, m = read_pair(s.image_path, s.mask_path)
        if m.sum() > 200:
            chosen.append((s, img, m))
        elif len(smaller) < n_samples:
            smaller.append((int(m.sum()), len(smaller), s, img, m))
        if len(chosen) == n_samples:
            break
    if not chosen:  # small lesions only (or none): show the largest of those seen
        chosen = [(s, img, m) for _, _, s, img, m in sorted(smaller, key=lambda t: (-t[0], t[1]))]
    aug = build_augmentation(cfg.augment)
    cols = 5
    fig, axes = plt.subplots(len(chosen), cols, figsize=(cols * 2.4, len(chosen) * 2.5), dpi=90)
    axes = np.atleast_2d(axes)
    from ..preprocessing import resize_mask

    for row, (s, img, m) in enumerate(chosen):
        prepped = prepare(img, cfg.preprocess)
        small_mask = resize_mask(m, cfg.preprocess.input_size)
        panels = [
            ("raw", to_uint8(img), m),
            (
                f"CLAHE {cfg.preprocess.clahe_clip_limit}/{cfg.preprocess.clahe_tile_grid}",
                clahe(to_uint8(img), cfg.preprocess.clahe_clip_limit, cfg.preprocess.clahe_tile_grid),
                m,
            ),
        ]
        for k in range(cols - 2):
            out = aug(image=prepped, mask=small_mask.astype(np.uint8))
            panels.append((f"augmented {k + 1}", out["image"], out["mask"].astype(bool)))
        for col, (title, im, mk) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(overlay(im, mk, alpha=0.0))
            ax.set_title(title if row == 0 else "", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(Path(s.image_path).stem[-12:], fontsize=7)
    fig.suptitle("Preprocessing: raw vs CLAHE vs training augmentation (lesion outlined in red)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def render(display: np.ndarray, mask: np.ndarray, view: str = "overlay", channel: int = 1, alpha: float = 0.4) -> np.ndarray:
    """One display slice (H, W, 3) uint8 as ``image``, ``overlay`` or ``mask`` (RGB / grey uint8).

    ``channel`` 0 / 1 / 2 shows pre-contrast / FLAIR / post-contrast in grey; -1 shows the three as RGB.
    """
    if view == "mask":
        return mask.astype(np.uint8) * 255
    base = display if channel < 0 else display_channel(display, channel)
    if view == "image":
        return np.ascontiguousarray(base)
    return overlay(base, mask, alpha=alpha)
