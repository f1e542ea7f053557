"""Follow-up comparison: two studies of one patient, their lesions matched, and the RANO-BM response.

Decision support, not a diagnosis (``DISCLAIMER``): the category is computed from the models' masks
and RANO-BM's measuring rules; a reader confirms every lesion, its match and the category.

Steps (``compare_studies``):

1. **Registration** of the follow-up to the baseline, rigid (``register_rigid``: SimpleITK
   ``Euler3DTransform``, Mattes mutual information, three resolution levels on a grid of at most
   ``REGISTRATION_GRID_MM``, a centred (geometry) initialiser) on the FLAIR channel (channel 1 of
   ``Volume.slices``: FLAIR in every input brainseg reads). Skipped, with the reason in the result,
   when both studies share a DICOM FrameOfReferenceUID, or the same voxel grid and affine (two
   sets in one atlas space, as BraTS-format data are): then the voxels already correspond.
   World coordinates are those of ``Volume.display_affine`` (the NIfTI affine's RAS+ mm; DICOM input
   is read into the same convention); the transform maps a baseline point to the follow-up point.
2. The follow-up mask resampled onto the baseline's voxel grid (nearest neighbour), and its
   lesions measured there (``predict.lesion_table``: the same axial plane as the baseline's).
3. **Matching** (``match_lesions``): lesions that overlap are one lesion (several overlapping
   each other: merged or split, their diameters summed as RANO-BM sums fragments); lesions left
   over are matched when their centroids lie within ``MATCH_TOLERANCE_MM`` (a small lesion that
   shrank away from its old voxels, or a registration error of a few mm). Follow-up lesions
   without a match are **new**, baseline lesions without one **vanished**.
4. **Response** (``response_category``), RANO-BM (Lin N.U. et al., "Response assessment criteria
   for brain metastases: proposal from the RANO group", Lancet Oncol 2015;16:e270-8), imaging part
   only, on the sum of the longest diameters of the baseline's target lesions (up to 5 measurable,
   ``measure.rano_bm``) and of the follow-up lesions matched to them.

No torch here; SimpleITK is imported where registration runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from ..io.datasets import DataError
from ..io.files import write_json_atomic
from ..io.volumes import Volume
from .measure import plane_metric, rano_bm
from .metrics import connected_components

DISCLAIMER = (
    "Decision support, not a diagnosis: lesions, matches and the response category are computed from a segmentation model's masks "
    "and must be checked by a qualified reader; research software, not a medical device."
)
log = logging.getLogger(__name__)

REGISTRATION_GRID_MM = 2.0  # registration runs on a grid this coarse at its finest level (1 mm gains nothing measurable, 10x the time)
MATCH_TOLERANCE_MM = 10.0  # centroids this close (after registration) are one lesion when the two do not overlap
PR_DECREASE = 0.30  # RANO-BM partial response: sum of diameters down by at least 30% from baseline
PD_INCREASE = 0.20  # RANO-BM progression: up by at least 20% from the nadir (with two time points: the baseline) ...
PD_ABSOLUTE_MM = 5.0  # ... and by at least 5 mm
CATEGORIES = {
    "CR": "complete response",
    "PR": "partial response",
    "SD": "stable disease",
    "PD": "progressive disease",
    "NE": "not evaluable",
}
RANO_BM_RULE = (
    "RANO-BM (Lin et al., Lancet Oncol 2015), imaging part: sum of the longest diameters of up to 5 measurable target lesions (>= 10 mm). "
    "CR: all target lesions gone and no new lesion; PR: sum down >= 30% from baseline; PD: sum up >= 20% and >= 5 mm from the nadir "
    "(here the baseline), or a new measurable lesion; SD: neither. Not checked here: non-target lesions, corticosteroids, clinical status "
    "and the confirmation scan RANO-BM asks for."
)


# ---------------------------------------------------------------- registration


class RegistrationError(ValueError):
    """The registration could not run or found nothing (studies that do not overlap, an empty image): the user's input."""


@dataclass
class Registration:
    """How the follow-up was put onto the baseline. ``matrix``: 4 x 4, a baseline world point (mm) -> the follow-up's."""

    applied: bool
    reason: str
    matrix: np.ndarray = field(default_factory=lambda: np.eye(4))
    centre_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    metric: float | None = None  # Mattes mutual information at the end (negative: lower is better)
    correlation: float | None = None  # FLAIR intensities of the two inside the baseline head, after alignment
    seconds: float = 0.0

    @property
    def rotation_deg(self) -> float:
        """The rotation's angle (degrees), whatever its axis."""
        r = self.matrix[:3, :3]
        return float(np.degrees(np.arccos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))

    @property
    def shift_mm(self) -> np.ndarray:
        """How far the baseline's centre point moves (mm, world axes)."""
        c = np.asarray(self.centre_mm, float)
        return self.matrix[:3, :3] @ c + self.matrix[:3, 3] - c

    def to_dict(self) -> dict:
        return {
            "applied": self.applied,
            "reason": self.reason,
            "method": f"SimpleITK Euler3DTransform, Mattes mutual information, 3 levels (finest {REGISTRATION_GRID_MM:g} mm), centred initialiser, on FLAIR"
            if self.applied
            else None,
            "matrix": [[round(float(v), 6) for v in row] for row in self.matrix],
            "rotation_deg": round(self.rotation_deg, 3),
            "shift_mm": [round(float(v), 3) for v in self.shift_mm],
            "centre_mm": [round(float(v), 2) for v in self.centre_mm],
            "metric_mattes_mi": None if self.metric is None else round(self.metric, 4),
            "correlation": None if self.correlation is None else round(self.correlation, 4),
            "seconds": round(self.seconds, 2),
        }


class RegistrationUnavailable(RuntimeError):
    """SimpleITK is not installed: registration (and resampling between two grids) cannot run here."""


def _sitk():
    try:
        import SimpleITK as sitk
    except ImportError:
        raise RegistrationUnavailable(
            "follow-up registration needs SimpleITK, which is not installed here (pip install SimpleITK); studies on one grid (atlas space) compare without it"
        ) from None
    return sitk


def sitk_image(arr_zhw: np.ndarray, affine: np.ndarray):
    """A SimpleITK image of (slice, row, column) voxels with their (4, 4) affine (``Volume.display_affine``).

    SimpleITK indexes (column, row, slice); its direction holds the unit step of each, its spacing their lengths."""
    sitk = _sitk()
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr_zhw))
    steps = np.asarray(affine, float)[:3, [2, 1, 0]]
    spacing = np.linalg.norm(steps, axis=0)
    img.SetSpacing(tuple(float(s) for s in spacing))
    img.SetDirection(tuple(float(v) for v in (steps / spacing).ravel()))
    img.SetOrigin(tuple(float(v) for v in np.asarray(affine, float)[:3, 3]))
    return img


def _coarse(img, mm: float):
    """``img`` on a grid of at least ``mm`` per voxel (linear), where it is finer: registration's working copy."""
    sitk = _sitk()
    spacing = np.array(img.GetSpacing())
    new = np.maximum(spacing, mm)
    if np.allclose(new, spacing):
        return img
    size = [max(1, int(round(n * s / t))) for n, s, t in zip(img.GetSize(), spacing, new, strict=False)]
    return sitk.Resample(img, size, sitk.Transform(), sitk.sitkLinear, img.GetOrigin(), tuple(new.tolist()), img.GetDirection(), 0.0, sitk.sitkFloat32)


def register_rigid(fixed, moving, seed: int = 7):
    """The rigid transform (SimpleITK ``Euler3DTransform``) mapping points of ``fixed`` to ``moving``, and the final metric.

    Mattes mutual information (32 bins, 10% of the voxels drawn with a fixed seed: the same answer each run), regular-step
    gradient descent with scales from physical shifts, levels at 4x, 2x and 1x the working grid (``REGISTRATION_GRID_MM``)."""
    sitk = _sitk()
    fixed = _coarse(sitk.Cast(fixed, sitk.sitkFloat32), REGISTRATION_GRID_MM)
    moving = _coarse(sitk.Cast(moving, sitk.sitkFloat32), REGISTRATION_GRID_MM)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=2.0, minStep=1e-3, numberOfIterations=200, gradientMagnitudeTolerance=1e-6)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([4.0, 2.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.GEOMETRY)
    reg.SetInitialTransform(start, inPlace=False)
    found = reg.Execute(fixed, moving)
    if found.GetName() == "CompositeTransform":
        found = sitk.CompositeTransform(found).GetNthTransform(0)
    return sitk.Euler3DTransform(found), float(reg.GetMetricValue())


def transform_matrix(transform) -> tuple[np.ndarray, tuple[float, float, float]]:
    """(4 x 4 matrix, centre) of a SimpleITK rigid transform: ``p -> R (p - c) + c + t``."""
    r = np.array(transform.GetMatrix(), float).reshape(3, 3)
    c = np.array(transform.GetCenter(), float)
    m = np.eye(4)
    m[:3, :3] = r
    m[:3, 3] = c + np.array(transform.GetTranslation(), float) - r @ c
    return m, tuple(float(v) for v in c)


def sitk_transform(matrix: np.ndarray):
    """A SimpleITK ``AffineTransform`` of a 4 x 4 matrix (a point of the reference grid -> a point of the moving one)."""
    sitk = _sitk()
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in np.asarray(matrix)[:3, :3].ravel()))
    t.SetTranslation(tuple(float(v) for v in np.asarray(matrix)[:3, 3]))
    return t


def skip_reason(base: Volume, follow: Volume) -> str | None:
    """Why the two need no registration (their voxels already correspond), or None."""
    uids = [_frame_of_reference(v) for v in (base, follow)]
    if uids[0] and uids[0] == uids[1]:
        return "both series share one DICOM FrameOfReferenceUID: their positions are in one frame already"
    if tuple(base.shape) == tuple(follow.shape) and np.allclose(base.affine, follow.affine, atol=1e-3):
        return "both have the same voxel grid and affine (one atlas space, as BraTS-format sets): the voxels already correspond"
    return None


def _frame_of_reference(vol: Volume) -> str | None:
    source = getattr(vol, "dicom", None)
    if source is None or not source.references:
        return None
    return str(source.references[0].get("FrameOfReferenceUID", "")) or None


def register_volumes(base: Volume, follow: Volume, register: bool = True) -> Registration:
    """The follow-up's rigid registration to the baseline (``register_rigid`` on FLAIR), or why it was skipped."""
    reason = skip_reason(base, follow)
    if reason is not None or not register:
        return Registration(False, reason or "registration switched off (--no-register / register=false): the two are compared in world coordinates")
    t0 = time.perf_counter()
    fixed = sitk_image(base.slices[..., 1], base.display_affine)
    moving = sitk_image(follow.slices[..., 1], follow.display_affine)
    try:
        found, metric = register_rigid(fixed, moving)
    except RuntimeError as exc:  # SimpleITK's errors (no overlap, no samples) are RuntimeErrors; their text names its sources: logged only
        log.debug("registration failed: %r", exc)
        raise RegistrationError(
            f"{follow.name}: the follow-up could not be registered to the baseline (the two images do not overlap enough); "
            "are both studies of one patient's head? (or compare without registration)"
        ) from None
    matrix, centre = transform_matrix(found)
    return Registration(True, "rigid registration of the follow-up's FLAIR to the baseline's", matrix, centre, metric, None, time.perf_counter() - t0)


def resample_onto(arr_zhw: np.ndarray, src: Volume, ref: Volume, matrix: np.ndarray, nearest: bool) -> np.ndarray:
    """``arr_zhw`` (on ``src``'s display grid) on ``ref``'s display grid, through ``matrix`` (ref world -> src world)."""
    if src.slices.shape[:3] == ref.slices.shape[:3] and np.allclose(src.display_affine, ref.display_affine, atol=1e-3) and np.allclose(matrix, np.eye(4)):
        return arr_zhw
    sitk = _sitk()
    moving = sitk_image(arr_zhw.astype(np.uint8 if nearest else np.float32), src.display_affine)
    reference = sitk_image(np.zeros(ref.slices.shape[:3], np.uint8), ref.display_affine)
    kind = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
    out = sitk.Resample(moving, reference, sitk_transform(matrix), kind, 0.0, moving.GetPixelID())
    return sitk.GetArrayFromImage(out)


def correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    """Pearson correlation of two aligned volumes inside ``a``'s head (voxels above 5% of its 99th percentile)."""
    inside = a > 0.05 * np.percentile(a, 99)
    if inside.sum() < 100:
        return None
    x, y = a[inside].astype(np.float64), b[inside].astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


# ---------------------------------------------------------------- lesions


def lesions_of(mask: np.ndarray, vol: Volume, prob: np.ndarray | None = None) -> tuple[np.ndarray, list[dict]]:
    """(labels, rows): ``predict.lesion_table`` of a (Z, H, W) mask on ``vol``'s grid, and a label image whose value k is lesion id k."""
    from ..inference.predict import lesion_table

    rows = lesion_table(mask, voxel_volume_mm3=vol.voxel_volume_mm3, metric=plane_metric(vol.display_affine), prob=prob, slice_spacing_mm=vol.spacing[2])
    labels, n = connected_components(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    by_key: dict[tuple, list[dict]] = {}
    for r in rows:
        by_key.setdefault((r["voxels"], tuple(r["bbox"])), []).append(r)
    lut = np.zeros(n + 1, np.int32)
    for k, box in enumerate(ndimage.find_objects(labels), 1):
        same = by_key[(int(sizes[k]), tuple(int(s.start) for s in box) + tuple(int(s.stop) for s in box))]
        if len(same) > 1:  # two components with one size and box (interleaved shapes): the nearer centroid tells them apart
            centre = np.array(ndimage.center_of_mass(labels == k))
            same.sort(key=lambda r: float(np.linalg.norm(np.asarray(r["centroid"]) - centre)))
        lut[k] = same.pop(0)["id"]
    return lut[labels], rows


def _centroid_mm(row: dict, affine: np.ndarray) -> np.ndarray:
    return (np.asarray(affine, float) @ np.append(np.asarray(row["centroid"], float), 1.0))[:3]


def _links(base_labels: np.ndarray, follow_labels: np.ndarray, base_rows, follow_rows, affine, tolerance_mm: float) -> dict:
    """(baseline id, follow-up id) -> (how, overlap voxels or centroid distance mm): overlaps first, then near centroids."""
    both = (base_labels > 0) & (follow_labels > 0)
    nf = len(follow_rows) + 1
    keys, counts = np.unique(base_labels[both].astype(np.int64) * nf + follow_labels[both], return_counts=True)
    links = {(int(k // nf), int(k % nf)): ("overlap", int(c)) for k, c in zip(keys, counts, strict=False)}
    linked_b, linked_f = {b for b, _ in links}, {f for _, f in links}
    candidates = []
    for b in base_rows:
        for f in follow_rows:
            if b["id"] not in linked_b and f["id"] not in linked_f:
                d = float(np.linalg.norm(_centroid_mm(b, affine) - _centroid_mm(f, affine)))
                if d <= tolerance_mm:
                    candidates.append((d, b["id"], f["id"]))
    for d, b, f in sorted(candidates):
        if b not in linked_b and f not in linked_f:
            links[(b, f)] = ("centroid", round(d, 2))
            linked_b.add(b)
            linked_f.add(f)
    return links


def _groups(links: dict) -> list[tuple[list[int], list[int]]]:
    """Connected groups of the bipartite link graph: (baseline ids, follow-up ids)."""
    parent: dict[tuple[str, int], tuple[str, int]] = {}

    def root(x):
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for b, f in links:
        parent[root(("b", b))] = root(("f", f))
    groups: dict = {}
    for node in list(parent):
        groups.setdefault(root(node), []).append(node)
    out = [(sorted(i for s, i in g if s == "b"), sorted(i for s, i in g if s == "f")) for g in groups.values()]
    return sorted(out)


def _pct(new: float | None, old: float | None) -> float | None:
    return None if new is None or not old else round(100.0 * (new - old) / old, 1)


def _total(rows: dict, ids: list[int], key: str) -> float | None:
    values = [rows[i].get(key) for i in ids]
    return None if any(v is None for v in values) else round(float(sum(values)), 3)


def match_lesions(
    base_labels: np.ndarray,
    base_rows: list[dict],
    follow_labels: np.ndarray,
    follow_rows: list[dict],
    affine: np.ndarray,
    tolerance_mm: float = MATCH_TOLERANCE_MM,
) -> dict:
    """Baseline and follow-up lesions on one grid (labels valued by lesion id) -> ``matches``, ``new_ids``, ``vanished_ids``.

    Each match is a group of lesions linked by overlap (or, for the ones left, by centroids within ``tolerance_mm``,
    world mm via ``affine``): one to one (``same``), or ``merged`` / ``split`` ones, whose volumes and longest
    diameters are summed per side (RANO-BM sums the fragments of a split lesion)."""
    links = _links(base_labels, follow_labels, base_rows, follow_rows, affine, tolerance_mm)
    b_by, f_by = {r["id"]: r for r in base_rows}, {r["id"]: r for r in follow_rows}
    matches = []
    for bs, fs in _groups(links):
        kind = "same" if len(bs) == len(fs) == 1 else "merged" if len(fs) == 1 else "split" if len(bs) == 1 else "merged and split"
        vol_b, vol_f = _total(b_by, bs, "volume_ml"), _total(f_by, fs, "volume_ml")
        dia_b, dia_f = _total(b_by, bs, "longest_diameter_mm"), _total(f_by, fs, "longest_diameter_mm")
        matches.append(
            {
                "baseline_ids": bs,
                "followup_ids": fs,
                "kind": kind,
                "matched_by": sorted({links[(b, f)][0] for b in bs for f in fs if (b, f) in links}),
                "baseline_volume_ml": vol_b,
                "followup_volume_ml": vol_f,
                "volume_change_ml": None if vol_b is None or vol_f is None else round(vol_f - vol_b, 3),
                "volume_change_pct": _pct(vol_f, vol_b),
                "baseline_longest_diameter_mm": dia_b,
                "followup_longest_diameter_mm": dia_f,
                "diameter_change_mm": None if dia_b is None or dia_f is None else round(dia_f - dia_b, 2),
                "diameter_change_pct": _pct(dia_f, dia_b),
            }
        )
    matched_b = {b for m in matches for b in m["baseline_ids"]}
    matched_f = {f for m in matches for f in m["followup_ids"]}
    return {
        "matches": matches,
        "new_ids": sorted(set(f_by) - matched_f),
        "vanished_ids": sorted(set(b_by) - matched_b),
        "tolerance_mm": tolerance_mm,
    }


# ---------------------------------------------------------------- response


def response_category(base_sum: float | None, follow_sum: float | None, targets: int, new_measurable: int, new_any: int) -> tuple[str, str]:
    """RANO-BM's response category from the target-lesion sums (``RANO_BM_RULE``), and the reason in words.

    PD first (a new measurable lesion, or the sum up >= 20% and >= 5 mm over the baseline: with two time points the
    baseline is the nadir); then CR (all targets gone, no new lesion), PR (down >= 30%), else SD. No target lesion at
    baseline and nothing new measurable: NE (not evaluable by RANO-BM's target-lesion rules)."""
    if new_measurable:
        return "PD", f"{new_measurable} new measurable lesion(s) (>= 10 mm)"
    if not targets or base_sum is None or follow_sum is None or base_sum <= 0:
        return "NE", "no measurable target lesion at baseline: the sum of diameters cannot be followed"
    change = follow_sum - base_sum
    pct = change / base_sum
    words = f"sum of target diameters {base_sum:.1f} -> {follow_sum:.1f} mm ({100 * pct:+.1f}%, {change:+.1f} mm)"
    if pct >= PD_INCREASE - 1e-9 and change >= PD_ABSOLUTE_MM - 1e-9:
        return "PD", f"{words}: up >= {100 * PD_INCREASE:.0f}% and >= {PD_ABSOLUTE_MM:.0f} mm"
    if follow_sum <= 1e-9 and not new_any:
        return "CR", f"{words}: every target lesion gone, no new lesion"
    if pct <= -PR_DECREASE + 1e-9:
        return "PR", f"{words}: down >= {100 * PR_DECREASE:.0f}%"
    if pct >= PD_INCREASE - 1e-9:
        return "SD", f"{words}: up >= {100 * PD_INCREASE:.0f}% but by less than {PD_ABSOLUTE_MM:.0f} mm"
    return "SD", f"{words}: neither down {100 * PR_DECREASE:.0f}% nor up {100 * PD_INCREASE:.0f}% and {PD_ABSOLUTE_MM:.0f} mm"


def rano_response(base_rows: list[dict], follow_rows: list[dict], matched: dict, slice_spacing_mm: float | None = None) -> dict:
    """The RANO-BM block: baseline targets (``measure.rano_bm``), the follow-up lesions matched to them, both sums, the category."""
    base_rano = rano_bm(base_rows, slice_spacing_mm)
    targets = base_rano["target_lesion_ids"]
    f_by = {r["id"]: r for r in follow_rows}
    followed = sorted({f for m in matched["matches"] if set(m["baseline_ids"]) & set(targets) for f in m["followup_ids"]})
    follow_sum = round(sum(f_by[f]["longest_diameter_mm"] for f in followed), 2) if targets else None
    base_sum = base_rano["sum_longest_diameters_mm"] if targets else None
    new_measurable = [f for f in matched["new_ids"] if f_by[f].get("measurable")]
    category, reason = response_category(base_sum, follow_sum, len(targets), len(new_measurable), len(matched["new_ids"]))
    return {
        "category": category,
        "category_name": CATEGORIES[category],
        "reason": reason,
        "baseline_target_ids": targets,
        "followup_target_ids": followed,
        "baseline_sum_mm": base_sum,
        "followup_sum_mm": follow_sum,
        "change_mm": None if base_sum is None else round(follow_sum - base_sum, 2),
        "change_pct": _pct(follow_sum, base_sum),
        "new_measurable_ids": new_measurable,
        "rule": RANO_BM_RULE,
    }


# ---------------------------------------------------------------- picture

BASE_COLOUR = (255, 210, 0)  # RGB: baseline lesions and the follow-up lesions matched to them
NEW_COLOUR = (255, 40, 40)  # new follow-up lesions
PICTURE_SCALE = 2  # pixels per voxel: room for the numbers


def to_grey(arr: np.ndarray) -> np.ndarray:
    """A volume (or slice) as uint8 through the 1st-99.5th percentile of its non-zero voxels."""
    values = arr[arr != 0]
    if values.size == 0:
        return np.zeros(arr.shape, np.uint8)
    lo, hi = np.percentile(values, [1.0, 99.5])
    return (np.clip((arr.astype(np.float32) - lo) / max(float(hi - lo), 1e-6), 0, 1) * 255).astype(np.uint8)


def _panel(grey: np.ndarray, labels: np.ndarray, texts: dict[int, tuple[str, tuple]], title: str) -> np.ndarray:
    """One slice, upscaled, each labelled region outlined in its colour and numbered; ``title`` in a band above."""
    s = PICTURE_SCALE
    rgb = cv2.cvtColor(cv2.resize(grey, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR), cv2.COLOR_GRAY2RGB)
    big = cv2.resize(labels.astype(np.int32).astype(np.float32), None, fx=s, fy=s, interpolation=cv2.INTER_NEAREST).astype(np.int32)
    for k, (text, colour) in texts.items():
        region = (big == k).astype(np.uint8)
        if not region.any():
            continue
        contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(rgb, contours, -1, colour, 2)
        ys, xs = np.nonzero(region)
        x, y = int(xs.max()) + 4, int(ys.min()) + 12
        cv2.putText(rgb, text, (min(x, rgb.shape[1] - 40), max(y, 14)), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 4, cv2.LINE_AA)
        cv2.putText(rgb, text, (min(x, rgb.shape[1] - 40), max(y, 14)), cv2.FONT_HERSHEY_SIMPLEX, 0.55, colour, 1, cv2.LINE_AA)
    band = np.full((28, rgb.shape[1], 3), 255, np.uint8)
    cv2.putText(band, title, (6, 19), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([band, rgb])


def picture_slice(base_rows: list[dict], follow_rows: list[dict], depth: int) -> int:
    """The slice shown: where the baseline's largest lesion is widest, else the follow-up's, else the middle."""
    for rows in (base_rows, follow_rows):
        if rows:
            return int(rows[0]["diameter_slice"])
    return depth // 2


def side_by_side(base_grey: np.ndarray, follow_grey: np.ndarray, base_labels: np.ndarray, follow_labels: np.ndarray, matched: dict, z: int) -> np.ndarray:
    """(H, W, 3) RGB: baseline | registered follow-up at slice ``z``, lesions outlined and numbered by baseline id
    (a follow-up lesion carries the id(s) of the baseline lesion(s) it matches; a new one ``N<its follow-up id>``, in red)."""
    base_texts = {b: (str(b), BASE_COLOUR) for b in np.unique(base_labels[z]) if b}
    follow_texts = {}
    for m in matched["matches"]:
        for f in m["followup_ids"]:
            follow_texts[f] = ("+".join(map(str, m["baseline_ids"])), BASE_COLOUR)
    for f in matched["new_ids"]:
        follow_texts[f] = (f"N{f}", NEW_COLOUR)
    left = _panel(base_grey[z], base_labels[z], base_texts, f"Baseline, slice {z}")
    right = _panel(follow_grey[z], follow_labels[z], follow_texts, f"Follow-up registered to baseline, slice {z}")
    gap = np.full((left.shape[0], 8, 3), 255, np.uint8)
    body = np.concatenate([left, gap, right], axis=1)
    foot = np.full((24, body.shape[1], 3), 255, np.uint8)
    note = "Yellow: baseline lesions and their follow-up matches (same number); red N: new. Decision support, not a diagnosis."
    cv2.putText(foot, note, (6, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([body, foot])


# ---------------------------------------------------------------- the comparison


@dataclass
class Comparison:
    """What ``compare_studies`` found; ``to_dict`` is ``compare.json`` and the API's answer (less the picture)."""

    registration: Registration
    base_rows: list[dict]
    follow_rows: list[dict]  # measured on the baseline grid, after registration
    matched: dict
    response: dict
    followup_mask: np.ndarray  # (Z, H, W) uint8 on the baseline's display grid
    picture: np.ndarray  # (H, W, 3) RGB
    picture_slice: int
    names: tuple[str, str] = ("baseline", "followup")
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "disclaimer": DISCLAIMER,
            "baseline": {"name": self.names[0], "lesion_count": len(self.base_rows), "lesions": self.base_rows},
            "followup": {
                "name": self.names[1],
                "lesion_count": len(self.follow_rows),
                "lesions": self.follow_rows,
                "measured_on": "the baseline's voxel grid, after registration (the baseline's axial plane)",
            },
            "registration": self.registration.to_dict(),
            "matches": self.matched["matches"],
            "new_lesion_ids": self.matched["new_ids"],
            "vanished_lesion_ids": self.matched["vanished_ids"],
            "match_tolerance_mm": self.matched["tolerance_mm"],
            "response": self.response,
            "picture_slice": self.picture_slice,
            "seconds": round(self.seconds, 2),
        }


def compare_studies(
    base: Volume,
    base_mask: np.ndarray,
    follow: Volume,
    follow_mask: np.ndarray,
    register: bool = True,
    base_prob: np.ndarray | None = None,
    follow_prob: np.ndarray | None = None,
    progress=None,
) -> Comparison:
    """Two segmented studies of one patient (display-oriented (Z, H, W) masks and probabilities) -> the ``Comparison``."""
    say = progress or (lambda line: None)
    t0 = time.perf_counter()
    reg = register_volumes(base, follow, register)
    say(f"registration: {reg.reason}" + (f" (rotation {reg.rotation_deg:.2f} deg, shift {np.linalg.norm(reg.shift_mm):.2f} mm)" if reg.applied else ""))
    mask_f = resample_onto(follow_mask.astype(np.uint8), follow, base, reg.matrix, nearest=True).astype(bool)
    flair_f = resample_onto(follow.slices[..., 1], follow, base, reg.matrix, nearest=False)
    prob_f = None if follow_prob is None else resample_onto(follow_prob, follow, base, reg.matrix, nearest=False)
    reg.correlation = correlation(base.slices[..., 1], flair_f)
    base_labels, base_rows = lesions_of(base_mask.astype(bool), base, base_prob)
    follow_labels, follow_rows = lesions_of(mask_f, base, prob_f)
    matched = match_lesions(base_labels, base_rows, follow_labels, follow_rows, base.display_affine)
    response = rano_response(base_rows, follow_rows, matched, base.spacing[2])
    say(
        f"lesions: {len(base_rows)} baseline, {len(follow_rows)} follow-up, {len(matched['matches'])} matched, {len(matched['new_ids'])} new, {len(matched['vanished_ids'])} vanished"
    )
    z = picture_slice(base_rows, follow_rows, len(base_mask))
    picture = side_by_side(to_grey(base.slices[..., 1]), to_grey(flair_f), base_labels, follow_labels, matched, z)
    return Comparison(reg, base_rows, follow_rows, matched, response, mask_f.astype(np.uint8), picture, z, (base.name, follow.name), time.perf_counter() - t0)


# ---------------------------------------------------------------- files in, files out (brainseg compare)


def load_study(path: str) -> Volume:
    """One volume as ``brainseg predict`` reads it (a NIfTI file, a BraTS set or its folder, a DICOM folder or .zip); ``DataError`` otherwise."""
    from ..inference.predict import _is_dicom_job, expand_inputs
    from ..io.dicom import load_dicom_path
    from ..io.volumes import is_nifti, load_volume

    jobs = expand_inputs([path])
    if len(jobs) != 1:
        raise DataError(path, f"expected one study (a NIfTI volume, a BraTS set, or a DICOM folder / .zip), found {len(jobs)} inputs")
    job = jobs[0]
    if _is_dicom_job(job):
        return load_dicom_path(job[0])
    if is_nifti(job[0]):
        return load_volume(job)
    raise DataError(job[0], "a single slice cannot be followed up: compare takes volumes (NIfTI, a BraTS set, or a DICOM series)")


def compare_paths(baseline: str, followup: str, out: str | Path, segmenter, post, register: bool = True, tta: bool = False, progress=print) -> dict:
    """``brainseg compare``: read and segment both studies, compare them, write ``compare.json``, ``compare_report.html``
    (``report.compare_html``), ``compare.png`` and
    ``followup_mask_on_baseline.nii.gz`` (the registered follow-up mask on the baseline's grid and affine) into ``out``."""
    from ..display.report import compare_html
    from ..display.visualize import save_png
    from ..inference.predict import segment_volume
    from ..io.files import write_text_atomic
    from ..io.volumes import save_mask_nifti

    out = Path(out)
    studies = []
    for role, path in (("baseline", baseline), ("follow-up", followup)):
        progress(f"{role}: reading {path}")
        vol = load_study(path)
        progress(f"{role}: segmenting {vol.name} ({vol.slices.shape[0]} slices, {segmenter.name})")
        res = segment_volume(segmenter, vol, post, tta)
        progress(f"{role}: {len(res.lesions)} lesion(s), {res.mask.sum() * vol.voxel_volume_mm3 / 1000:.2f} mL")
        studies.append((vol, res))
    (base, rb), (follow, rf) = studies
    cmp = compare_studies(base, rb.mask, follow, rf.mask, register, rb.prob, rf.prob, progress)
    body = {**cmp.to_dict(), "model": segmenter.name, "inputs": [str(baseline), str(followup)]}
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "compare.json", body)
    write_text_atomic(out / "compare_report.html", compare_html(body, cmp.picture))
    save_png(out / "compare.png", cmp.picture)
    save_mask_nifti(out / "followup_mask_on_baseline.nii.gz", cmp.followup_mask, base)
    r = cmp.response
    progress(f"response: {r['category']} ({r['category_name']}): {r['reason']}")
    progress(f"wrote compare.json, compare_report.html, compare.png and followup_mask_on_baseline.nii.gz to {out}")
    progress(DISCLAIMER)
    return body
