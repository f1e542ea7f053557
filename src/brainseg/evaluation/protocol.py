"""Evaluation protocol: per patient (3D), per slice, and lesion-wise, at native resolution.

Every number in a report carries its protocol in ``PROTOCOLS``. Probabilities are
predicted once per patient and reused for every metric and every post-processing
setting of a sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from ..config import CONDITIONS, EVERY_CONDITION, SHIFT_CONDITIONS, PostprocessConfig
from ..inference.backends import binarize_stack
from ..io.datasets import Patient, load_patient
from ..preprocessing import apply_condition, shift_condition, unzoom
from . import metrics as M

SIZE_EDGES = (100, 1000, 10000)  # lesion size bins, voxels at native resolution

PROTOCOLS = {
    "per_patient_dice": "3D Dice of each patient's stacked slices at native resolution, averaged over patients (Buda et al. 2019's protocol)",
    "per_patient_iou": "3D IoU of each patient's stacked slices, averaged over patients",
    "hd95": "95th-percentile Hausdorff distance per patient in 3D (pixels in-plane; slice index as the third axis, spacing unknown), "
    "mean over patients where both masks are non-empty",
    "positive_slice_dice": "mean 2D Dice over lesion-positive slices only",
    "per_slice_dice": "mean 2D Dice over all slices, a slice where truth and prediction are both empty scores 1",
    "fp_slice_rate": "share of lesion-free slices on which the model predicts any lesion pixel",
    "lesion_sensitivity": "share of ground-truth lesions (3D connected components, 26-connectivity) overlapped by any predicted component, "
    "pooled over patients",
    "fp_lesions_per_patient": "predicted components touching no ground-truth lesion, mean per patient",
    "lesionwise_dice": "per patient, sum of Dice of each GT lesion with the predicted components it touches / (GT lesions + FP components); mean over patients",
    "empty_on_large_lesion": "patients whose lesion has over 10,000 voxels but whose prediction is empty",
}

LARGE_LESION_VOXELS = 10000

CONDITION_NAMES = {
    "all": "all three sequences",
    "pre_missing": "pre-contrast missing (FLAIR copy)",
    "post_missing": "post-contrast missing (FLAIR copy)",
    "flair_only": "FLAIR only (one grey image)",
    "skull_stripped": "skull stripped",
    "skull_stripped_flair_only": "skull stripped, FLAIR only",
    "brats_like": "BraTS-like (skull stripped, 240 mm field of view)",
}


@dataclass
class PatientPrediction:
    patient: str
    prob: np.ndarray  # (Z, H, W) float32 in [0, 1]
    truth: np.ndarray  # (Z, H, W) bool


def predict_patients(segmenter, patients: list[Patient], tta: bool = False, progress: bool = True, condition: str = "all") -> list[PatientPrediction]:
    """Probabilities of every slice of each patient, with the input as under ``condition``."""
    out = []
    for p in tqdm(patients, desc=f"predict {segmenter.name} ({condition})", unit="patient", disable=not progress):
        images, truth = load_patient(p)
        if condition in SHIFT_CONDITIONS:  # skull stripped / BraTS-like: the prediction goes back onto the slice's own pixels
            shifted = [shift_condition(img, condition) for img in images]
            probs = segmenter.probabilities([img for img, _ in shifted], tta=tta, stacked=True)
            probs = [prob if m is None else unzoom(prob, m) for prob, (_, m) in zip(probs, shifted, strict=False)]
        else:
            probs = segmenter.probabilities([apply_condition(img, condition) for img in images], tta=tta, stacked=True)
        out.append(PatientPrediction(p.id, np.stack(probs), truth))
    return out


def mean_predictions(per_model: list[list[PatientPrediction]]) -> list[PatientPrediction]:
    """The ensemble's predictions (mean probability) from its members' predictions of the same patients."""
    return [PatientPrediction(ps[0].patient, np.mean([p.prob for p in ps], axis=0).astype(np.float32), ps[0].truth) for ps in zip(*per_model, strict=False)]


def score_patient(pred: np.ndarray, truth: np.ndarray) -> dict:
    """All metrics of one patient; ``pred`` and ``truth`` are (Z, H, W) bool."""
    slice_dice = [M.dice(p, t) for p, t in zip(pred, truth, strict=False)]
    positive = lesion_slices(truth)
    predicted = lesion_slices(pred)
    match = M.match_lesions(pred, truth)
    return {
        "dice": M.dice(pred, truth),
        "iou": M.iou(pred, truth),
        "hd95": M.hd95(pred, truth),
        "slice_dice": slice_dice,
        "positive_slice_dice": [d for d, pos in zip(slice_dice, positive, strict=False) if pos],
        "negative_slices": int((~positive).sum()),
        "fp_slices": int((predicted & ~positive).sum()),
        "lesions": list(zip(match.lesion_sizes, match.lesion_detected, match.lesion_dice, strict=False)),
        "fp_lesions": match.false_positives,
        "empty_on_large_lesion": bool(truth.sum() > LARGE_LESION_VOXELS and not pred.any()),
        "lesionwise_dice": match.lesionwise_dice,
    }


def aggregate(per_patient: dict[str, dict]) -> dict:
    """Report numbers from per-patient scores."""
    pats = list(per_patient.values())
    lesions = [les for s in pats for les in s["lesions"]]
    neg = sum(s["negative_slices"] for s in pats)
    hd = [s["hd95"] for s in pats]
    by_size = {}
    for label in [M.size_bin(0, SIZE_EDGES), *[M.size_bin(e, SIZE_EDGES) for e in SIZE_EDGES]]:
        sel = [les for les in lesions if M.size_bin(les[0], SIZE_EDGES) == label]
        by_size[label] = {
            "lesions": len(sel),
            "sensitivity": _mean([float(d) for _, d, _ in sel]),
            "lesion_dice": _mean([ld for _, _, ld in sel]),
        }
    fp_counts = [(s["fp_slices"], s["negative_slices"]) for s in pats if s["negative_slices"]]
    return {
        "patients": len(pats),
        "slices": sum(len(s["slice_dice"]) for s in pats),
        "per_patient_dice": _mean([s["dice"] for s in pats]),
        "per_patient_dice_ci95": list(M.bootstrap_ci([s["dice"] for s in pats])),
        "per_patient_dice_std": float(np.std([s["dice"] for s in pats])) if pats else math.nan,
        "per_patient_dice_median": float(np.median([s["dice"] for s in pats])) if pats else math.nan,
        "per_patient_iou": _mean([s["iou"] for s in pats]),
        "hd95": _mean([h for h in hd if not math.isnan(h)]),
        "hd95_undefined_patients": int(sum(math.isnan(h) for h in hd)),
        "positive_slice_dice": _mean([d for s in pats for d in s["positive_slice_dice"]]),
        "per_slice_dice": _mean([d for s in pats for d in s["slice_dice"]]),
        "fp_slice_rate": (sum(s["fp_slices"] for s in pats) / neg) if neg else math.nan,
        "fp_slice_rate_ci95": list(M.bootstrap_ci(fp_counts, statistic=lambda a: a[:, 0].sum() / a[:, 1].sum())),
        "empty_on_large_lesion": int(sum(s["empty_on_large_lesion"] for s in pats)),
        "lesion_free_slices": neg,
        "lesions": len(lesions),
        "lesion_sensitivity": _mean([float(d) for _, d, _ in lesions]),
        "fp_lesions_per_patient": _mean([s["fp_lesions"] for s in pats]),
        "lesionwise_dice": _mean([s["lesionwise_dice"] for s in pats]),
        "by_lesion_size_voxels": by_size,
    }


def _mean(values) -> float:
    values = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(values)) if values else math.nan


def evaluate_predictions(preds: list[PatientPrediction], post: PostprocessConfig) -> dict:
    per_patient = {p.patient: score_patient(binarize_stack(p.prob, post), p.truth) for p in preds}
    report = aggregate(per_patient)
    report["postprocess"] = {"threshold": post.threshold, "min_size": post.min_size, "components_3d": post.components_3d, "slice_min_size": post.slice_min_size}
    report["per_patient"] = {pid: round(s["dice"], 4) for pid, s in per_patient.items()}
    return report


def evaluate_conditions(
    segmenter, patients: list[Patient], post: PostprocessConfig, conditions=tuple(CONDITIONS), tta: bool = False, progress: bool = True
) -> tuple[dict[str, dict], dict[str, list[PatientPrediction]]]:
    """A full report per input condition (see ``config.CONDITIONS``), and the predictions behind them."""
    preds = {c: predict_patients(segmenter, patients, tta=tta, progress=progress, condition=c) for c in conditions}
    return {c: evaluate_predictions(p, post) for c, p in preds.items()}, preds


def sweep_postprocess(
    preds: list[PatientPrediction] | dict[str, list[PatientPrediction]],
    thresholds=(0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6),
    min_sizes=(0, 30, 100, 200, 400),
    components_3d=(False, True),
    score_conditions: tuple[str, ...] | None = None,
    max_fp_rate: float | None = None,
    volumes_3d: bool = False,
) -> tuple[PostprocessConfig, list[dict]]:
    """Per-patient Dice for each (threshold, min_size, 2D / 3D components); returns the best and the table.

    ``preds`` may hold one list per input condition: the score is then the mean over
    ``score_conditions`` (default: every condition given), so the chosen setting serves FLAIR-only
    input as well as complete input. Each row also pools the false-positive slices over every
    condition given (``fp_slices`` of ``lesion_free_slices``, ``fp_slice_rate_pooled``).
    ``max_fp_rate``: only settings whose pooled rate is at most this are chosen (the FP guard of
    ``pipeline.calibrate``); where none is, the one with the fewest false positives.
    ``volumes_3d``: the setting for stacks of slices is chosen among 3D components only (the shipping rule of
    ``pipeline.calibrate_against``): a size limit per slice erases every lesion whose largest cross-section is
    under it (400 px: about 22 mm across at 1 mm pixels, most brain metastases), which the validation patients,
    large gliomas, cannot show. The lone-slice size is still chosen among 2D components.
    Run on validation patients only: choosing on the test patients would inflate the score.
    Ties prefer the larger min_size (fewer false-positive specks).
    """
    by_cond = preds if isinstance(preds, dict) else {"all": preds}
    scored = tuple(score_conditions or by_cond)
    table = []
    for t in thresholds:
        for ms in min_sizes:
            for c3 in components_3d if min_sizes else (False,):
                if c3 and ms == 0:
                    continue  # nothing is removed: same as 2D
                post = PostprocessConfig(threshold=float(t), min_size=int(ms), components_3d=bool(c3))
                row = {"threshold": t, "min_size": ms, "components_3d": c3}
                fp_total = neg_total = 0
                for cond, ps in by_cond.items():
                    masks = [binarize_stack(p.prob, post) for p in ps]
                    negatives = [~lesion_slices(p.truth) for p in ps]
                    n_neg = sum(int(n.sum()) for n in negatives)
                    fp = sum(int((lesion_slices(m) & neg).sum()) for m, neg in zip(masks, negatives, strict=False))
                    row[f"dice_{cond}"] = float(np.mean([M.dice(m, p.truth) for m, p in zip(masks, ps, strict=False)]))
                    row[f"fp_slice_rate_{cond}"] = fp / n_neg if n_neg else math.nan
                    fp_total, neg_total = fp_total + fp, neg_total + n_neg
                row["per_patient_dice"] = float(np.mean([row[f"dice_{c}"] for c in scored]))
                row["fp_slice_rate"] = float(np.mean([row[f"fp_slice_rate_{c}"] for c in scored]))
                row["fp_slices"], row["lesion_free_slices"] = fp_total, neg_total
                row["fp_slice_rate_pooled"] = fp_total / neg_total if neg_total else 0.0
                table.append(row)

    def rank(r):
        return (round(r["per_patient_dice"], 4), r["min_size"], not r["components_3d"])

    eligible = fp_eligible([r for r in table if r["components_3d"]] if volumes_3d else table, max_fp_rate)
    best = max(eligible, key=rank)
    # One slice on its own has no neighbours: its minimum size is the best 2D one at this threshold.
    slice_rows = [r for r in fp_eligible(table, max_fp_rate) if not r["components_3d"] and r["threshold"] == best["threshold"]]
    slice_min = max(slice_rows, key=rank)["min_size"] if slice_rows else best["min_size"]
    return PostprocessConfig(best["threshold"], best["min_size"], best["components_3d"], slice_min), table


def within_fp_budget(rate: float, max_fp_rate: float | None) -> bool:
    """Whether a pooled FP slice rate keeps to ``max_fp_rate`` (None: no limit)."""
    return max_fp_rate is None or rate <= max_fp_rate + 1e-12


def fp_eligible(table: list[dict], max_fp_rate: float | None) -> list[dict]:
    """The sweep rows ``sweep_postprocess`` chooses among: those within ``max_fp_rate``; where none is, those with the
    fewest false-positive slices."""
    eligible = [r for r in table if within_fp_budget(r["fp_slice_rate_pooled"], max_fp_rate)]
    if not eligible and table:
        fewest = min(r["fp_slices"] for r in table)
        eligible = [r for r in table if r["fp_slices"] == fewest]
    return eligible


def lesion_slices(stack: np.ndarray) -> np.ndarray:
    """Which slices of a (Z, H, W) mask hold any lesion pixel: a (Z,) bool array."""
    return stack.reshape(len(stack), -1).any(1)


def table_row(table: list[dict], post: PostprocessConfig) -> dict:
    """The sweep table's row of the setting ``post`` (as ``sweep_postprocess`` chose it)."""
    return next(r for r in table if (r["threshold"], r["min_size"], r["components_3d"]) == (post.threshold, post.min_size, post.components_3d))


METRIC_ROWS = [
    ("per_patient_dice", "Per-patient 3D Dice"),
    ("per_patient_iou", "Per-patient 3D IoU"),
    ("hd95", "HD95 (pixels)"),
    ("positive_slice_dice", "Dice, lesion-positive slices"),
    ("per_slice_dice", "Dice, all slices (empty/empty = 1)"),
    ("fp_slice_rate", "FP rate, lesion-free slices"),
    ("lesion_sensitivity", "Lesion-wise sensitivity"),
    ("fp_lesions_per_patient", "FP lesions per patient"),
    ("lesionwise_dice", "Lesion-wise Dice (BraTS-METS)"),
    ("empty_on_large_lesion", "Empty prediction, lesion >10,000 voxels (patients)"),
]


def markdown_table(reports: dict[str, dict]) -> str:
    """Models side by side; one row per metric."""
    names = list(reports)
    lines = ["| Metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for key, label in METRIC_ROWS:
        lines.append(f"| {label} | " + " | ".join(_fmt_ci(reports[n], key) for n in names) + " |")
    first = reports[names[0]]
    for label in first.get("by_lesion_size_voxels", {}):
        cells = []
        for n in names:
            b = reports[n]["by_lesion_size_voxels"][label]
            cells.append(f"{_fmt(b['sensitivity'])} sens. / {_fmt(b['lesion_dice'])} Dice (n={b['lesions']})")
        lines.append(f"| Lesions {label} voxels | " + " | ".join(cells) + " |")
    lines.append("| Post-processing | " + " | ".join(_fmt_post(reports[n]["postprocess"]) for n in names) + " |")
    lines.append("| Patients / slices | " + " | ".join(f"{reports[n]['patients']} / {reports[n]['slices']}" for n in names) + " |")
    lines.append("")
    lines.append("Protocols:")
    lines += [f"- {label}: {PROTOCOLS[key]}." for key, label in METRIC_ROWS]
    lines.append("- [a, b]: 95% percentile bootstrap interval over patients (2,000 resamples).")
    return "\n".join(lines) + "\n"


def conditions_table(reports: dict[str, dict[str, dict]]) -> str:
    """Per-patient Dice [95% CI] and lesion-free-slice FP rate of each model (rows) under each input condition (columns)."""
    conds = [c for c in EVERY_CONDITION if all(c in r for r in reports.values())]
    lines = ["| Model | " + " | ".join(CONDITION_NAMES[c] for c in conds) + " |", "|---|" + "---|" * len(conds)]
    for name, by_cond in reports.items():
        cells = [
            f"{_fmt_ci(by_cond[c], 'per_patient_dice')}; FP {_fmt(by_cond[c]['fp_slice_rate'])}; empty {by_cond[c].get('empty_on_large_lesion', 'n/a')}"
            for c in conds
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt_ci(report: dict, key: str) -> str:
    ci = report.get(f"{key}_ci95")
    if ci and not any(isinstance(v, float) and math.isnan(v) for v in ci):
        return f"{_fmt(report.get(key))} [{ci[0]:.3f}, {ci[1]:.3f}]"
    return _fmt(report.get(key))


def _fmt_post(post: dict) -> str:
    where = "3D" if post.get("components_3d") else "2D"
    return f"p >= {post['threshold']}, min {post['min_size']} px ({where})" if post["min_size"] else f"p >= {post['threshold']}"


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)
