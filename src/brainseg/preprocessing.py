"""The one preprocessing path shared by training, evaluation, prediction and serving.

``preprocess_slice(image, cfg)`` = ``normalize(prepare(image, cfg), cfg)``:

1. ``to_uint8``: 16-bit or float input is windowed to uint8 (0.5-99.5 percentile of the
   non-zero pixels of the whole slice or volume); uint8 input passes unchanged.
2. ``clahe``: contrast-limited adaptive histogram equalisation per channel (OpenCV), at
   the native resolution.
3. ``resize`` to ``cfg.input_size`` (area interpolation) - whole slices, never patches.
4. ``normalize`` over the whole slice: to [0, 1], or per-channel z-score (``zscore_volume``: over the
   whole volume, ``volume_stats``; a lone slice falls back to its own).

Training inserts augmentation between ``prepare`` and ``normalize`` (on uint8, where
albumentations is at home). No torch here: the server imports this module.
"""

from __future__ import annotations

import cv2
import numpy as np

from .config import CONDITIONS, NORMALIZATIONS, SHIFT_CONDITIONS, AugmentConfig, PreprocessConfig


def to_uint8(image: np.ndarray, lo: np.ndarray | float | None = None, hi: np.ndarray | float | None = None) -> np.ndarray:
    """Window an image of any dtype into uint8 (H, W[, C]).

    uint8 is returned as is. Otherwise each channel is mapped linearly from [lo, hi] to
    [0, 255], where lo / hi default to the 0.5 / 99.5 percentiles of its non-zero pixels
    (volumes pass their own, computed over the whole volume, via ``intensity_window``).
    """
    if image.dtype == np.uint8:
        return image
    img = image.astype(np.float32)
    if not np.isfinite(img).all():
        raise ValueError("image contains NaN or infinite values")
    if lo is None or hi is None:
        lo, hi = intensity_window(img)
    span = np.maximum(np.asarray(hi, np.float32) - lo, 1e-6)
    if np.result_type(img, lo, span) != np.float32:  # a float64 window: computed as NumPy promotes it
        return (np.clip((img - lo) / span, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    # The same float32 operations in place on the one copy: no temporaries (a BraTS volume: 5 fewer 100 MB arrays).
    np.subtract(img, lo, out=img)
    np.divide(img, span, out=img)
    np.clip(img, 0.0, 1.0, out=img)
    np.multiply(img, 255.0, out=img)
    np.add(img, 0.5, out=img)
    return img.astype(np.uint8)


def intensity_window(data: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (last axis if the array has 3 or 4 dims and few channels) percentile window of non-zero values."""
    data = np.asarray(data, dtype=np.float32)
    chans = [data[..., c] for c in range(data.shape[-1])] if data.ndim >= 3 and data.shape[-1] <= 4 else [data]
    los, his = [], []
    for ch in chans:
        nz = ch[ch != 0]
        if nz.size == 0:
            nz = ch.ravel()
        lo, hi = np.percentile(nz, [low_pct, high_pct])
        if lo > 0 and (ch == 0).any():
            lo = 0.0  # keep the zero background black
        los.append(lo)
        his.append(hi if hi > lo else lo + 1.0)
    if len(chans) == 1:
        return np.float32(los[0]), np.float32(his[0])
    return np.asarray(los, np.float32), np.asarray(his, np.float32)


def clahe(image: np.ndarray, clip_limit: float = 2.0, tile_grid: int = 8) -> np.ndarray:
    """CLAHE on each channel of a uint8 (H, W[, C]) image; returns the same shape and dtype."""
    if image.dtype != np.uint8:
        raise TypeError(f"CLAHE expects uint8, got {image.dtype}")
    op = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tile_grid), int(tile_grid)))
    if image.ndim == 2:
        return op.apply(image)
    return np.stack([op.apply(np.ascontiguousarray(image[:, :, c])) for c in range(image.shape[2])], axis=2)


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Resize (H, W[, C]) to (size, size[, C]); area interpolation to shrink, linear to grow."""
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    interp = cv2.INTER_AREA if size < min(h, w) else cv2.INTER_LINEAR
    return cv2.resize(image, (size, size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """(H, W) bool -> (size, size) bool; area-average then > 0.5 keeps thin lesions fairer than nearest."""
    small = cv2.resize(mask.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return small > 0.5


def prepare(image: np.ndarray, cfg: PreprocessConfig, window: tuple | None = None) -> np.ndarray:
    """Raw (H, W, 3) slice -> uint8 (S, S, 3) after windowing, CLAHE and resizing."""
    lo, hi = window if window is not None else (None, None)
    img = to_uint8(image, lo, hi)
    if cfg.clahe:
        img = clahe(img, cfg.clahe_clip_limit, cfg.clahe_tile_grid)
    return resize(img, cfg.input_size)


def normalize(image: np.ndarray, cfg: PreprocessConfig, stats: np.ndarray | None = None) -> np.ndarray:
    """uint8 (S, S, C) -> float32 (C, S, S), normalised over the whole slice (each channel: /255, and
    with ``zscore`` to mean 0, standard deviation 1) or, with ``zscore_volume`` and the volume's
    ``stats`` (``volume_stats``: (3, 2) per sequence, applied to every slice of a 2.5D input), over the
    whole volume; ``zscore_volume`` without ``stats`` (a lone slice) is the slice's own z-score.
    OpenCV's ``meanStdDev`` and one scale-and-shift per channel: 20x faster than NumPy's strided
    reductions over (S, S, C) (1.0 vs 0.05 ms a slice)."""
    if cfg.normalization not in NORMALIZATIONS:
        raise ValueError(f"unknown normalization {cfg.normalization!r} (use one of {', '.join(NORMALIZATIONS)})")
    per_volume = cfg.normalization == "zscore_volume" and stats is not None
    planes = np.ascontiguousarray(np.moveaxis(image, -1, 0))
    out = np.empty(planes.shape, np.float32)
    for c, (plane, x) in enumerate(zip(planes, out, strict=True)):
        scale, shift = 1.0 / 255.0, 0.0
        if cfg.normalization != "minmax":
            mean, std = stats[c % len(stats)] / 255.0 if per_volume else (v.item() / 255.0 for v in cv2.meanStdDev(plane))
            std = max(float(std), 1e-6)
            scale, shift = scale / std, -float(mean) / std
        np.multiply(plane, np.float32(scale), out=x, dtype=np.float32)
        if shift:
            x += np.float32(shift)
    return out


def volume_stats(slices) -> np.ndarray:
    """(mean, std) of each channel over every pixel of a volume's prepared uint8 (S, S, 3) slices, as a
    (3, 2) float64 array in uint8 units: what ``zscore_volume`` normalises every slice of it with."""
    ms = np.array([np.concatenate(cv2.meanStdDev(np.ascontiguousarray(s)), axis=1) for s in slices], np.float64)  # (Z, C, 2)
    if ms.size == 0:
        raise ValueError("volume_stats: no slices")
    mean = ms[:, :, 0].mean(axis=0)
    var = (ms[:, :, 1] ** 2 + ms[:, :, 0] ** 2).mean(axis=0) - mean**2  # equal pixel counts per slice
    return np.stack([mean, np.sqrt(np.maximum(var, 0.0))], axis=1)


def preprocess_slice(image: np.ndarray, cfg: PreprocessConfig, window: tuple | None = None) -> np.ndarray:
    """Raw (H, W, 3) slice -> network input float32 (3, S, S). The single shared path."""
    return normalize(prepare(image, cfg, window), cfg)


def restore_size(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """Network-size probabilities (S, S) -> (height, width), bilinear, float32 in [0, 1]."""
    if prob.shape == (height, width):
        return prob.astype(np.float32)
    return np.clip(cv2.resize(prob.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)


def brain_mask(image: np.ndarray, erosion: float = 0.04) -> np.ndarray:
    """A simple brain mask of one raw (H, W[, C]) slice: (H, W) bool.

    Threshold (half of Otsu's on the brightest channel) -> erosion by ``erosion`` x the image
    height (cuts the scalp off the brain) -> the largest component -> dilation by half that
    (back to the brain's edge, not the scalp's) -> holes filled. The "threshold + erosion"
    skull stripping that tools without a brain-extraction model do; good on mid-brain slices,
    rough at the skull base and the vertex. Used to measure (the ``skull_stripped`` conditions)
    and to train for skull-stripped data; the network never depends on it at inference.
    """
    from scipy import ndimage

    grey = to_uint8(image)
    grey = grey.max(axis=-1) if grey.ndim == 3 else grey
    if not grey.any():
        return np.zeros(grey.shape, bool)
    otsu, _ = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    head = (grey > 0.5 * otsu).astype(np.uint8)
    r = max(1, int(round(erosion * grey.shape[0])))
    core = cv2.erode(head, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1)))
    labels, n = ndimage.label(core)
    if n == 0:
        return np.zeros(grey.shape, bool)
    core = (labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))).astype(np.uint8)
    brain = cv2.dilate(core, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (r + 1, r + 1))) & head
    return ndimage.binary_fill_holes(brain)


def skull_strip(image: np.ndarray, erosion: float = 0.04) -> np.ndarray:
    """``image`` with everything outside ``brain_mask`` set to 0 (same shape and dtype)."""
    keep = brain_mask(image, erosion)
    return image * (keep[..., None] if image.ndim == 3 else keep).astype(image.dtype)


def zoom_about_centre(image: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """Shrink (factor < 1) or enlarge an (H, W[, C]) image about its centre on the same canvas
    (zero outside): another field of view. Returns the image and its 2x3 affine (``cv2.warpAffine``)."""
    h, w = image.shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2, (h - 1) / 2), 0.0, factor)
    return cv2.warpAffine(image, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0), m


def unzoom(prob: np.ndarray, m: np.ndarray) -> np.ndarray:
    """(H, W) probabilities on a ``zoom_about_centre`` canvas -> back onto the original pixels."""
    h, w = prob.shape
    return cv2.warpAffine(prob.astype(np.float32), m, (w, h), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def shift_condition(image: np.ndarray, condition: str) -> tuple[np.ndarray, np.ndarray | None]:
    """One raw (H, W, 3) slice as under a domain-shift condition (``config.SHIFT_CONDITIONS``):
    its channel condition, then skull stripping, then (BraTS-like) a smaller brain in the same
    canvas. Returns the image and the 2x3 affine to undo on the prediction (None: same pixels)."""
    channels, strip, zoom = SHIFT_CONDITIONS[condition]
    img = apply_condition(image, channels)
    if strip:
        img = skull_strip(img)
    if zoom == 1.0:
        return img, None
    return zoom_about_centre(img, zoom)


def apply_condition(image: np.ndarray, condition: str) -> np.ndarray:
    """(..., 3) channel-last image(s) as under ``condition`` (missing sequences become FLAIR copies)."""
    if condition in SHIFT_CONDITIONS and image.ndim == 3 and SHIFT_CONDITIONS[condition][2] == 1.0:
        return shift_condition(image, condition)[0]
    if condition not in CONDITIONS:
        raise ValueError(f"unknown input condition {condition!r}; choose one of {sorted(CONDITIONS)}")
    order = CONDITIONS[condition]
    if order == (0, 1, 2):
        return image
    return np.ascontiguousarray(image[..., list(order)])


def drop_sequences(image: np.ndarray, rng: np.random.Generator, missing_pre: float, missing_post: float) -> np.ndarray:
    """Training-time sequence dropout on a (H, W, 3k) image (k slices of a 2.5D input): pre / post
    replaced by FLAIR independently, the same sequences in every slice."""
    pre, post = rng.random() < missing_pre, rng.random() < missing_post
    if not (pre or post):
        return image
    cond = "flair_only" if pre and post else "pre_missing" if pre else "post_missing"
    return per_slice(image, lambda img: apply_condition(img, cond))


def per_slice(image: np.ndarray, fn) -> np.ndarray:
    """Apply ``fn`` (on (H, W, 3)) to each slice of a (H, W, 3k) 2.5D input; a 3-channel image as is."""
    if image.shape[-1] == 3:
        return fn(image)
    return np.concatenate([fn(np.ascontiguousarray(image[..., c : c + 3])) for c in range(0, image.shape[-1], 3)], axis=-1)


def context_indices(i: int, n: int, context: int, stacked: bool = True) -> list[int]:
    """Slice indices of the 2.5D input of slice ``i`` of ``n``: [i - context, ..., i + context],
    clamped at the volume's edges. ``stacked=False`` (a lone slice): ``i`` repeated, the fallback."""
    if not stacked:
        return [i] * (2 * context + 1)
    return [min(max(j, 0), n - 1) for j in range(i - context, i + context + 1)]


def slabs(n: int, depth: int = 32, margin: int = 8) -> list[tuple[int, int, int, int]]:
    """How a 3D network covers ``n`` slices in bounded memory: ``(start, stop, keep_start, keep_stop)``
    slabs of at most ``depth + 2 * margin`` slices; each slab's prediction is kept on
    [keep_start, keep_stop), ``margin`` slices away from its cut edges, and the kept parts tile [0, n)."""
    out = []
    for keep in range(0, n, depth):
        keep_stop = min(keep + depth, n)
        start, stop = max(0, keep - margin), min(n, keep_stop + margin)
        out.append((start, stop, keep - start, keep_stop - start))
    return out


def over_slabs(n: int, run, wanted: set[int] | None = None) -> np.ndarray:
    """``run(start, stop)`` (an array with one row per slice of [start, stop)) on each of ``slabs(n)``,
    the kept rows stitched into one array of ``n`` rows. With ``wanted``, slabs that keep none of
    those slices are not run (their rows stay zero); None when no slab runs."""
    out = None
    for start, stop, keep0, keep1 in slabs(n):
        if wanted is not None and not wanted.intersection(range(start + keep0, start + keep1)):
            continue
        part = np.asarray(run(start, stop))[keep0:keep1]
        if out is None:
            out = np.zeros((n, *part.shape[1:]), part.dtype)
        out[start + keep0 : start + keep1] = part
    return out


def context_stack(slices: list[np.ndarray]) -> np.ndarray:
    """(S, S, 3) uint8 slices (below to above) -> one (S, S, 3k) 2.5D input."""
    return slices[0] if len(slices) == 1 else np.concatenate(slices, axis=-1)


def build_augmentation(cfg: AugmentConfig, channels: int = 3):
    """Joint image/mask training augmentation (albumentations) on uint8 (S, S, ``channels``) images
    (3, or 3k for a 2.5D input: every slice moves and changes together)."""
    import albumentations as A

    return A.Compose(
        [
            A.HorizontalFlip(p=cfg.hflip),
            A.VerticalFlip(p=cfg.vflip),
            A.Affine(
                scale=(1 - cfg.scale, 1 + cfg.scale),
                translate_percent=(-cfg.shift, cfg.shift),
                rotate=(-cfg.rotate, cfg.rotate),
                border_mode=cv2.BORDER_CONSTANT,
                fill=0,
                fill_mask=0,
                p=cfg.affine,
            ),
            A.ElasticTransform(alpha=20, sigma=5, border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=cfg.elastic),
            A.RandomBrightnessContrast(brightness_limit=0.15, contrast_limit=0.15, p=cfg.brightness_contrast),
            A.RandomGamma(gamma_limit=(80, 120), p=cfg.gamma),
            A.GaussNoise(std_range=(0.01, 0.04), p=cfg.noise),
            *_domain_shift_transforms(cfg, channels),
        ]
    )


def _domain_shift_transforms(cfg: AugmentConfig, channels: int = 3) -> list:
    """The augmentations for other scanners and protocols (nnU-Net's defaults and SynthSeg in
    spirit): a smaller brain in the canvas, a smooth bias field, lower resolution, blur.
    Only those switched on are added, after the others, so older configurations draw the same."""
    import albumentations as A

    out = []
    if cfg.zoom_out > 0:
        out.append(A.Affine(scale=(cfg.zoom_min, 1.0), border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=0, p=cfg.zoom_out))
    if cfg.bias_field > 0:
        out.append(
            A.OneOf(
                [A.Illumination(mode="linear", intensity_range=(0.05, 0.2)), A.Illumination(mode="gaussian", intensity_range=(0.05, 0.2))], p=cfg.bias_field
            )
        )
    if cfg.low_resolution > 0:
        down = cv2.INTER_AREA if channels <= 4 else cv2.INTER_LINEAR  # OpenCV's area resize takes at most 4 channels
        out.append(A.Downscale(scale_range=(0.4, 0.8), interpolation_pair={"downscale": down, "upscale": cv2.INTER_LINEAR}, p=cfg.low_resolution))
    if cfg.blur > 0:
        out.append(A.GaussianBlur(sigma_limit=(0.3, 1.2), p=cfg.blur))
    return out
