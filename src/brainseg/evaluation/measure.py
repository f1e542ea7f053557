"""Per-lesion measurements as a neuro-radiologist reads them (RANO-BM), from a mask alone: pure numpy / OpenCV.

For each connected component (3-D in a volume, 2-D in a slice):

- the **longest axial diameter**: the longest distance between two points of the component's outline within
  one axial slice, over all its slices, in mm from the pixel geometry (``plane_metric``: the displayed
  row and column axes of ``Volume.display_affine``, or a slice's pixel spacing; anisotropic and sheared
  pixels included);
- the **perpendicular diameter**: on that slice, the longest chord of the outline exactly perpendicular
  (90 degrees) to the longest diameter. Readers allow +-5 degrees because they draw by hand; measured
  exactly, no tolerance is needed and none is used;
- whether it is **measurable** (RANO-BM: longest diameter >= 10 mm, or >= twice the slice spacing when
  slices are thicker than 5 mm), and the **target lesions**: up to 5 measurable lesions, the largest
  first (RANO-BM's 5 intracranial targets; the 2-per-organ rule of RECIST does not apply within one
  brain), with the sum of their longest diameters.

The outline of a component on a slice is the convex hull of its pixels taken as squares, through the
midpoints of their edges: a single pixel measures one pixel across, an axis-aligned run of n pixels n
pixels, so a lesion drawn from a shape of length L measures L within one pixel. A concave lesion is
measured across its convex outline, as calipers laid on the image would. Positions are voxel indices
``(slice, row, column)`` of the displayed orientation (``Volume.slices``), as floats.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

MEASURABLE_MIN_MM = 10.0  # RANO-BM: the smallest longest diameter of a measurable lesion
THICK_SLICE_MM = 5.0  # slices thicker than this: measurable from twice the slice spacing
MAX_TARGETS = 5  # RANO-BM: up to 5 target lesions, all intracranial

_EDGE_MIDPOINTS = np.array([[-0.5, 0.0], [0.5, 0.0], [0.0, -0.5], [0.0, 0.5]])  # (row, col) offsets from a pixel's centre


PIXEL_SPACING_HELP = "pixel_spacing_mm must be one number (square pixels) or two, row,col (DICOM PixelSpacing order), each above 0 and at most 100 mm"
MAX_PIXEL_SPACING_MM = 100.0


def parse_pixel_spacing(raw: str | None) -> tuple[float, float] | None:
    """A slice's pixel spacing as text: "0.5" (square pixels) or "0.5,0.8" / "0.5\\0.8" (row, col: the spacing between
    rows, then between columns, as DICOM PixelSpacing); None when empty. ``ValueError`` (``PIXEL_SPACING_HELP``) otherwise."""
    v = "" if raw is None else str(raw).strip()
    if v == "":
        return None
    parts = [p.strip() for p in v.replace("\\", ",").split(",")]
    try:
        values = [float(p) for p in parts]
    except (ValueError, OverflowError):
        raise ValueError(PIXEL_SPACING_HELP) from None
    if len(values) not in (1, 2) or not all(np.isfinite(x) and 0.0 < x <= MAX_PIXEL_SPACING_MM for x in values):
        raise ValueError(PIXEL_SPACING_HELP)
    return (values[0], values[-1])


def plane_metric(affine: np.ndarray) -> np.ndarray:
    """(2, 2) upper-triangular ``R`` such that ``R @ (drow, dcol)`` are in-plane mm coordinates: distances between
    them are the world distances, for an affine of (slice, row, column) voxels (``Volume.display_affine``)."""
    axes = np.asarray(affine, float)[:3, 1:3]  # world mm per row step, per column step
    _, r = np.linalg.qr(axes)
    return r * np.sign(np.diag(r))[:, None]  # a positive diagonal: the same plane, not mirrored


def spacing_metric(row_mm: float, col_mm: float) -> np.ndarray:
    """The metric of pixels ``row_mm`` apart between rows and ``col_mm`` between columns (DICOM PixelSpacing order)."""
    return np.diag([float(row_mm), float(col_mm)])


@dataclass(frozen=True)
class Diameters:
    """The two diameters of one component on one slice, in the metric's units, and their end points (row, col)."""

    longest: float
    perpendicular: float
    longest_ends: np.ndarray  # (2, 2): two (row, col) points
    perpendicular_ends: np.ndarray  # (2, 2)


def outline(mask2d: np.ndarray) -> np.ndarray:
    """(K, 2) float (row, col): the convex outline of a 2-D mask's pixels (as squares, through their edge midpoints), in order."""
    m = np.ascontiguousarray(mask2d, dtype=np.uint8)
    contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    centres = np.concatenate([c.reshape(-1, 2)[:, ::-1] for c in contours]).astype(float)  # OpenCV gives (x, y) = (col, row)
    points = (centres[:, None, :] + _EDGE_MIDPOINTS[None]).reshape(-1, 2)
    hull = cv2.convexHull(points.astype(np.float32))
    return hull.reshape(-1, 2).astype(float)


def _chords_through(a: np.ndarray, b: np.ndarray, at: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each line ``a == at[m]`` crosses a convex polygon with vertex coordinates (a, b): (low, high) b per
    line, (inf, -inf) where it misses. All lines at once: one (M, K) array, not a loop over the vertices."""
    a2, b2 = np.roll(a, -1), np.roll(b, -1)
    at = np.asarray(at, float)[:, None]
    crossing = (np.minimum(a, a2) <= at) & (at <= np.maximum(a, a2))
    da = a2 - a
    flat = np.abs(da) < 1e-12
    t = np.where(flat, 0.0, (at - a) / np.where(flat, 1.0, da))
    hits = b + t * (b2 - b)
    on_flat = crossing & flat  # an edge along the line: both its ends are on the chord
    low = np.minimum(np.where(crossing, hits, np.inf).min(axis=1), np.where(on_flat, b2, np.inf).min(axis=1))
    high = np.maximum(np.where(crossing, hits, -np.inf).max(axis=1), np.where(on_flat, b2, -np.inf).max(axis=1))
    return low, high


def diameters(mask2d: np.ndarray, metric: np.ndarray) -> Diameters:
    """Longest diameter and the longest chord perpendicular to it of a 2-D mask (one lesion's pixels on one slice).

    ``metric``: (2, 2) from ``plane_metric`` / ``spacing_metric`` (the identity: pixels)."""
    metric = np.asarray(metric, float)
    hull = outline(mask2d)
    mm = hull @ metric.T
    d = np.linalg.norm(mm[:, None, :] - mm[None, :, :], axis=-1)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    longest = float(d[i, j])
    inv = np.linalg.inv(metric)
    if longest == 0.0:
        ends = np.stack([hull[0], hull[0]])
        return Diameters(0.0, 0.0, ends, ends)
    u = (mm[j] - mm[i]) / longest
    n = np.array([-u[1], u[0]])
    a, b = mm @ u, mm @ n
    best, best_ends = 0.0, None
    ats = np.unique(a)  # the longest chord of a convex polygon in one direction passes through a vertex
    low, high = _chords_through(a, b, ats)
    spans = np.where(np.isfinite(low), high - low, -np.inf)
    k = int(np.argmax(spans))  # the first of the longest, as a scan in order of ``a`` finds it
    if spans[k] > 0.0:
        best, best_ends = float(spans[k]), (ats[k] * u + low[k] * n, ats[k] * u + high[k] * n)
    perp_ends = (np.stack(best_ends) if best_ends is not None else np.stack([mm[i], mm[i]])) @ inv.T
    return Diameters(longest, float(best), np.stack([hull[i], hull[j]]), perp_ends)


def measurable_min_mm(slice_spacing_mm: float | None) -> float:
    """RANO-BM's smallest measurable longest diameter: 10 mm, or twice the slice spacing for slices thicker than 5 mm."""
    if slice_spacing_mm is not None and slice_spacing_mm > THICK_SLICE_MM:
        return 2.0 * float(slice_spacing_mm)
    return MEASURABLE_MIN_MM


def _r(v: float, digits: int = 2) -> float:
    return round(float(v), digits)


def longest_slice(comp: np.ndarray, metric: np.ndarray) -> tuple[int, Diameters]:
    """(index, diameters) of the slice of a (Z, H, W) component with the longest axial diameter (RANO-BM measures
    each lesion where it is longest)."""
    best: tuple[int, Diameters] | None = None
    for dz in range(comp.shape[0]):
        if comp[dz].any():
            dia = diameters(comp[dz], metric)
            if best is None or dia.longest > best[1].longest:
                best = (dz, dia)
    return best


def measure_components(
    labels: np.ndarray,
    n: int,
    metric: np.ndarray | None,
    prob: np.ndarray | None = None,
    slice_spacing_mm: float | None = None,
    offset: tuple[int, ...] | None = None,
    spread: np.ndarray | None = None,
) -> list[dict]:
    """The measurements of components 1..n of a (H, W) or (Z, H, W) label image, one dict each (in label order).

    ``metric`` (``plane_metric`` / ``spacing_metric``): None when the pixel spacing is unknown; the
    diameters are then in pixels (``*_px`` keys) and ``measurable`` is None. ``prob``: the probability
    map of the same shape (``confidence`` = its mean inside the component). ``offset``: added to every
    position (``labels`` cut out of a larger array). ``spread``: the TTA disagreement map where TTA ran
    (``tta_disagreement`` = its mean inside the component: 0 when the flipped input gives the same answer)."""
    offset = np.zeros(labels.ndim) if offset is None else np.asarray(offset, float)
    volume = labels.ndim == 3
    lab3 = labels if volume else labels[None]
    prob3 = None if prob is None else (prob if volume else prob[None])
    spread3 = None if spread is None else (spread if volume else spread[None])
    known = metric is not None
    m = np.asarray(metric, float) if known else np.eye(2)
    minimum = measurable_min_mm(slice_spacing_mm if volume else None)
    rows = []
    for k, box in enumerate(ndimage.find_objects(lab3), 1):
        if k > n:
            break
        if box is None:
            rows.append({})
            continue
        comp = lab3[box] == k
        dz, dia = longest_slice(comp, m)
        z = box[0].start + dz
        corner = np.array([box[1].start, box[2].start], float)

        def ends(points: np.ndarray, z: int = z, corner: np.ndarray = corner) -> list[list[float]]:
            rc = points + corner + offset[-2:]
            return [[_r(z + offset[0], 1), _r(p[0], 1), _r(p[1], 1)] if volume else [_r(p[0], 1), _r(p[1], 1)] for p in rc]

        unit = "mm" if known else "px"
        row = {
            f"longest_diameter_{unit}": _r(dia.longest),
            f"perpendicular_diameter_{unit}": _r(dia.perpendicular),
            "measurable": bool(dia.longest >= minimum - 1e-9) if known else None,
            "longest_diameter_ends": ends(dia.longest_ends),
            "perpendicular_diameter_ends": ends(dia.perpendicular_ends),
        }
        if not known:
            row = {"longest_diameter_mm": None, "perpendicular_diameter_mm": None, **row}
        if volume:
            row["slice_range"] = [int(box[0].start + offset[0]), int(box[0].stop - 1 + offset[0])]
            row["diameter_slice"] = int(z + offset[0])
        if prob3 is not None:
            row["confidence"] = _r(float(prob3[box][comp].mean()), 3)
        if spread3 is not None:
            row["tta_disagreement"] = _r(float(spread3[box][comp].mean()), 3)
        rows.append(row)
    return rows


def rano_bm(lesions: list[dict], slice_spacing_mm: float | None = None, spacing_known: bool = True) -> dict:
    """RANO-BM's target lesions among ``lesions`` (rows with ``id``, ``longest_diameter_mm`` and ``measurable``): up to
    5 measurable ones, the longest first, and the sum of their longest diameters (mm; None without pixel spacing)."""
    minimum = measurable_min_mm(slice_spacing_mm)
    if not spacing_known:
        return {
            "measurable_min_mm": minimum,
            "measurable_count": None,
            "target_lesion_ids": [],
            "sum_longest_diameters_mm": None,
            "note": "pixel spacing unknown: diameters are in pixels and no lesion can be called measurable (send pixel_spacing_mm)",
        }
    measurable = sorted((r for r in lesions if r.get("measurable")), key=lambda r: (-r["longest_diameter_mm"], r["id"]))
    targets = measurable[:MAX_TARGETS]
    return {
        "measurable_min_mm": minimum,
        "measurable_count": len(measurable),
        "target_lesion_ids": [r["id"] for r in targets],
        "sum_longest_diameters_mm": _r(sum(r["longest_diameter_mm"] for r in targets)),
    }
