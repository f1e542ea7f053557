"""Segmentation metrics on binary masks: overlap, surface distance, lesion-wise.

Pure numpy/scipy on purpose: the inference server imports this module and must
not pull in torch.

Conventions used throughout:

* Masks are boolean (or 0/1 integer/float) numpy arrays, either a 2D slice of
  shape (H, W) or a 3D volume of shape (Z, H, W); prediction and ground truth
  must have the same shape. Any other values (e.g. probabilities) raise
  ValueError, so a forgotten threshold cannot silently count as "lesion".
* ``spacing`` is a tuple with one physical voxel size per axis (e.g. mm, in the
  array's axis order); ``None`` means 1 per axis, so distances are in pixels
  (2D) or voxels (3D).
* Connectivity for connected components is full by default: 8-connectivity in
  2D, 26-connectivity in 3D.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = [
    "LesionMatch",
    "bootstrap_ci",
    "confusion",
    "connected_components",
    "dice",
    "hd95",
    "iou",
    "match_lesions",
    "remove_small_components",
    "size_bin",
]


# --------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------


def _as_bool(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """Return ``mask`` as a boolean array; reject anything that is not 0/1.

    Probabilities or label maps with values > 1 would otherwise be silently
    binarised with ``!= 0``, which hides a missing threshold step.
    """
    arr = np.asarray(mask)
    if arr.ndim == 0:
        raise ValueError(f"{name} must be an array with at least 1 dimension, got a scalar")
    if arr.dtype == np.bool_:
        return arr
    if not np.isin(arr, (0, 1)).all():
        raise ValueError(f"{name} must be boolean or contain only 0/1 values (dtype {arr.dtype})")
    return arr.astype(bool)


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (prediction, ground truth) pair: same shape, binary values."""
    p = np.asarray(pred)
    t = np.asarray(truth)
    if p.shape != t.shape:
        raise ValueError(f"shape mismatch: pred has shape {p.shape}, truth has shape {t.shape}")
    return _as_bool(p, "pred"), _as_bool(t, "truth")


def _spacing(spacing: Sequence[float] | None, ndim: int) -> tuple[float, ...]:
    """Resolve ``spacing`` to one positive float per axis (default 1.0 each)."""
    if spacing is None:
        return (1.0,) * ndim
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim:
        raise ValueError(f"spacing has {len(sp)} entries but the masks have {ndim} dimensions")
    if any(not (s > 0 and math.isfinite(s)) for s in sp):
        raise ValueError(f"spacing entries must be positive and finite, got {sp}")
    return sp


# --------------------------------------------------------------------------
# Overlap scores
# --------------------------------------------------------------------------


def confusion(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int, int]:
    """Voxel-wise confusion counts between two binary masks.

    Like ``segmentation_models_pytorch.metrics.get_stats`` for one binary
    image; every overlap score in this module is derived from these counts.

    Args:
        pred: predicted mask, shape (H, W) or (Z, H, W), bool or 0/1.
        truth: ground-truth mask, same shape as ``pred``.

    Returns:
        ``(tp, fp, fn, tn)`` as Python ints, in voxels.

    Raises:
        ValueError: if the shapes differ or values are not binary.
    """
    p, t = _pair(pred, truth)
    tp = int(np.count_nonzero(p & t))
    fp = int(np.count_nonzero(p & ~t))
    fn = int(np.count_nonzero(~p & t))
    tn = int(p.size - tp - fp - fn)
    return tp, fp, fn, tn


def dice(pred: np.ndarray, truth: np.ndarray, empty_value: float = 1.0) -> float:
    """Dice similarity coefficient ``2tp / (2tp + fp + fn)``, in [0, 1].

    Args:
        pred: predicted mask, shape (H, W) or (Z, H, W), bool or 0/1.
        truth: ground-truth mask, same shape as ``pred``.
        empty_value: returned when both masks are empty (Dice is 0/0 there).
            The default applies the "both empty = 1" rule (a correct
            "no lesion" call counts as perfect); pass ``float('nan')`` to
            exclude such cases from a ``nanmean`` aggregate instead.

    Returns:
        The Dice score as a float; 0.0 when exactly one mask is empty.
    """
    tp, fp, fn, _ = confusion(pred, truth)
    denom = 2 * tp + fp + fn
    if denom == 0:
        return float(empty_value)
    return 2.0 * tp / denom


def iou(pred: np.ndarray, truth: np.ndarray, empty_value: float = 1.0) -> float:
    """Intersection over union (Jaccard) ``tp / (tp + fp + fn)``, in [0, 1].

    Args:
        pred: predicted mask, shape (H, W) or (Z, H, W), bool or 0/1.
        truth: ground-truth mask, same shape as ``pred``.
        empty_value: returned when both masks are empty ("both empty = 1"
            rule by default; pass ``float('nan')`` to exclude).

    Returns:
        The IoU as a float; 0.0 when exactly one mask is empty.
    """
    tp, fp, fn, _ = confusion(pred, truth)
    denom = tp + fp + fn
    if denom == 0:
        return float(empty_value)
    return tp / denom


# --------------------------------------------------------------------------
# Surface distance
# --------------------------------------------------------------------------


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask: ``mask XOR binary_erosion(mask)``.

    Erosion uses scipy's default cross-shaped structure and treats voxels
    outside the array as background, so a mask touching the array edge has
    its edge voxels on the surface.
    """
    return mask ^ ndimage.binary_erosion(mask)


def hd95(
    pred: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float] | None = None,
) -> float:
    """95th-percentile symmetric Hausdorff distance between mask surfaces.

    Definition (MONAI ``compute_hausdorff_distance(percentile=95)``, its
    default non-directed mode): surfaces are the boundary voxels
    ``mask XOR binary_erosion(mask)``. For every surface voxel of ``pred`` the
    Euclidean distance to the nearest surface voxel of ``truth`` is taken
    (``scipy.ndimage.distance_transform_edt`` with ``sampling=spacing``), and
    vice versa. The 95th percentile (linear interpolation) of each of the two
    directed distance sets is computed and the **maximum of the two** is
    returned -- not the percentile of the pooled set.

    Args:
        pred: predicted mask, shape (H, W) or (Z, H, W), bool or 0/1.
        truth: ground-truth mask, same shape as ``pred``.
        spacing: physical voxel size per axis, in array axis order (e.g.
            ``(z_mm, y_mm, x_mm)``). ``None`` means 1 per axis, giving a result
            in pixels/voxels; otherwise the result is in the spacing's unit.

    Returns:
        The distance as a float. 0.0 when both masks are empty (perfect
        agreement); ``float('nan')`` when exactly one is empty, because the
        distance is undefined -- aggregate over the defined cases and report
        how many were undefined (as ``evaluation.aggregate`` does).
    """
    p, t = _pair(pred, truth)
    sp = _spacing(spacing, p.ndim)
    p_any, t_any = bool(p.any()), bool(t.any())
    if not p_any and not t_any:
        return 0.0
    if p_any != t_any:
        return float("nan")

    p_surf, t_surf = _surface(p), _surface(t)
    # EDT of the complement gives, at every voxel, the distance to the nearest
    # surface voxel of the other mask.
    dist_to_t = ndimage.distance_transform_edt(~t_surf, sampling=sp)
    dist_to_p = ndimage.distance_transform_edt(~p_surf, sampling=sp)
    d_pt = np.percentile(dist_to_t[p_surf], 95)
    d_tp = np.percentile(dist_to_p[t_surf], 95)
    return float(max(d_pt, d_tp))


# --------------------------------------------------------------------------
# Connected components
# --------------------------------------------------------------------------


def connected_components(mask: np.ndarray, connectivity: int | None = None) -> tuple[np.ndarray, int]:
    """Label the connected components of a binary mask.

    Args:
        mask: binary mask, shape (H, W) or (Z, H, W), bool or 0/1.
        connectivity: neighbourhood rank for
            ``scipy.ndimage.generate_binary_structure(ndim, connectivity)``,
            1..ndim. ``None`` (default) means full connectivity (``ndim``):
            8-connectivity in 2D, 26-connectivity in 3D, so diagonally
            touching voxels belong to the same lesion.

    Returns:
        ``(labels, n)``: an int array of the mask's shape with 0 for
        background and 1..n for components, and the number of components.
    """
    m = _as_bool(mask)
    rank = m.ndim if connectivity is None else int(connectivity)
    if not 1 <= rank <= m.ndim:
        raise ValueError(f"connectivity must be in 1..{m.ndim} for a {m.ndim}D mask, got {connectivity}")
    structure = ndimage.generate_binary_structure(m.ndim, rank)
    labels, n = ndimage.label(m, structure=structure)
    return labels, int(n)


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop connected components (full connectivity) smaller than ``min_size``.

    Args:
        mask: binary mask, shape (H, W) or (Z, H, W), bool or 0/1.
        min_size: minimum component size in voxels; components with fewer
            voxels are removed. ``min_size <= 0`` returns an unchanged copy.

    Returns:
        A new boolean array of the mask's shape.
    """
    m = _as_bool(mask)
    if min_size <= 0:
        return m.copy()
    labels, n = connected_components(m)
    if n == 0:
        return m.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_size
    keep[0] = False  # label 0 is background
    return keep[labels]


# --------------------------------------------------------------------------
# Lesion-wise evaluation
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionMatch:
    """Result of :func:`match_lesions` for one image or volume.

    Attributes:
        lesion_sizes: size in voxels of each ground-truth lesion, in label order.
        lesion_detected: per GT lesion, whether any predicted component
            overlaps it by at least one voxel.
        lesion_dice: per GT lesion, Dice between the lesion and the union of
            the predicted components overlapping it (0.0 if missed).
        false_positives: predicted components overlapping no GT lesion.
        n_pred_components: total number of predicted components.
    """

    lesion_sizes: tuple[int, ...]
    lesion_detected: tuple[bool, ...]
    lesion_dice: tuple[float, ...]
    false_positives: int
    n_pred_components: int

    @property
    def n_lesions(self) -> int:
        """Number of ground-truth lesions."""
        return len(self.lesion_sizes)

    @property
    def n_detected(self) -> int:
        """Number of ground-truth lesions hit by at least one prediction."""
        return sum(self.lesion_detected)

    @property
    def sensitivity(self) -> float:
        """Lesion-wise detection rate ``n_detected / n_lesions`` (NaN if no lesions)."""
        if self.n_lesions == 0:
            return float("nan")
        return self.n_detected / self.n_lesions

    @property
    def lesionwise_dice(self) -> float:
        """BraTS-style lesion-wise Dice: ``sum(lesion_dice) / (n_lesions + FP)``.

        Each false-positive component counts as a lesion with Dice 0. With no
        GT lesions and no false positives the result is 1.0 (nothing to find,
        nothing wrongly found).
        """
        denom = self.n_lesions + self.false_positives
        if denom == 0:
            return 1.0
        return float(sum(self.lesion_dice)) / denom


def match_lesions(pred: np.ndarray, truth: np.ndarray) -> LesionMatch:
    """Lesion-wise matching of predicted and ground-truth components.

    A simplified version of the BraTS 2023 METS lesion-wise evaluation (no GT
    dilation, no minimum lesion size -- apply :func:`remove_small_components`
    beforehand if wanted). GT and predicted masks are split into connected
    components with full connectivity (8 in 2D, 26 in 3D). A GT lesion counts
    as detected if any predicted component overlaps it by >= 1 voxel; its
    lesion-wise Dice is computed against the union of all predicted components
    overlapping it, so a lesion predicted in several pieces is not penalised
    for the split. Predicted components overlapping no GT lesion are false
    positives. A predicted component bridging two GT lesions contributes to
    both.

    Args:
        pred: predicted mask, shape (H, W) or (Z, H, W), bool or 0/1.
        truth: ground-truth mask, same shape as ``pred``.

    Returns:
        A :class:`LesionMatch` with per-lesion sizes (voxels), detection flags
        and Dice scores, plus the false-positive and predicted-component counts.
    """
    p, t = _pair(pred, truth)
    t_labels, n_t = connected_components(t)
    p_labels, n_p = connected_components(p)

    sizes: list[int] = []
    detected: list[bool] = []
    dices: list[float] = []
    for k in range(1, n_t + 1):
        lesion = t_labels == k
        hit = np.unique(p_labels[lesion])
        hit = hit[hit != 0]
        sizes.append(int(np.count_nonzero(lesion)))
        detected.append(hit.size > 0)
        if hit.size == 0:
            dices.append(0.0)
        else:
            dices.append(dice(np.isin(p_labels, hit), lesion))

    # Predicted labels that touch any GT voxel; the rest are false positives.
    touching = np.unique(p_labels[t])
    n_touching = int(np.count_nonzero(touching))
    return LesionMatch(
        lesion_sizes=tuple(sizes),
        lesion_detected=tuple(detected),
        lesion_dice=tuple(dices),
        false_positives=n_p - n_touching,
        n_pred_components=n_p,
    )


# --------------------------------------------------------------------------
# Aggregation helpers
# --------------------------------------------------------------------------


def size_bin(n_voxels: int, edges: Sequence[int] = (100, 1000)) -> str:
    """Label of the size bin a lesion of ``n_voxels`` voxels falls into.

    With edges ``(e0, e1, ..., ek)`` (strictly increasing integers, voxels)
    the bins are ``"<e0"``, ``"e0-(e1-1)"``, ..., ``">=ek"``; bounds are
    inclusive. The default gives ``"<100"``, ``"100-999"``, ``">=1000"``.

    Raises:
        ValueError: if ``edges`` is empty or not strictly increasing.
    """
    e = [int(x) for x in edges]
    if not e:
        raise ValueError("edges must contain at least one value")
    if any(b <= a for a, b in zip(e, e[1:], strict=False)):
        raise ValueError(f"edges must be strictly increasing, got {tuple(edges)}")
    if n_voxels < e[0]:
        return f"<{e[0]}"
    for lo, hi in zip(e, e[1:], strict=False):
        if n_voxels < hi:
            return f"{lo}-{hi - 1}"
    return f">={e[-1]}"


def bootstrap_ci(values: Sequence[float], statistic=np.mean, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` over cases (patients), resampled with replacement.

    ``values`` is one number per case, or an (n_cases, k) array whose rows are resampled
    together (e.g. numerator and denominator of a pooled rate, with a ``statistic`` that
    takes the resampled array). NaN cases are dropped; fewer than 2 cases give (nan, nan).
    """
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr).reshape(len(arr), -1).any(1)] if arr.size else arr
    if len(arr) < 2:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arr), size=(n_boot, len(arr)))
    stats = np.asarray([statistic(arr[i]) for i in idx], dtype=float)
    alpha = (1.0 - level) / 2
    return (float(np.quantile(stats, alpha)), float(np.quantile(stats, 1 - alpha)))
