"""Where a model's false-positive slices are: each lesion-free slice with a predicted lesion, by its
distance (in slices) to the nearest slice with a lesion.

    python scripts/fp_by_distance.py --model-dir models [--model attention_unet] [--patients val|test]
        [--condition all] [--data ROOT] [--json out.json]

A false positive one slice beyond the tumour is the mask spilling over its edge; one five slices away
is a separate detection. The model runs with its calibrated post-processing (the registry's), the
patients are the registry split's. docs/ablations.md (round 8) used it to see that the round-8 model's
extra test false positives were new detections, and that the validation split has too few lesion-free
slices (278) to show a change of a few percent in the FP slice rate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from brainseg.config import EVERY_CONDITION, default_data_root
from brainseg.evaluation.protocol import lesion_slices, predict_patients
from brainseg.inference.backends import binarize_stack
from brainseg.inference.predictor import load
from brainseg.inference.registry import RegistryError
from brainseg.io.datasets import DataError, discover, read_split
from brainseg.io.files import write_json_atomic

BINS = (("adjacent", 1, 1), ("2-3 slices", 2, 3), ("further", 4, None))


def fp_slices(mask: np.ndarray, truth: np.ndarray) -> list[dict]:
    """Every lesion-free slice of ``truth`` (Z, H, W) on which ``mask`` predicts a lesion: its index, its
    distance to the nearest slice with a lesion (None when the patient has no lesion) and the pixels predicted."""
    positive = lesion_slices(truth)
    predicted = lesion_slices(mask)
    lesion_at = np.flatnonzero(positive)
    out = []
    for z in np.flatnonzero(predicted & ~positive):
        dist = int(np.abs(lesion_at - z).min()) if len(lesion_at) else None
        out.append({"slice": int(z), "distance": dist, "pixels": int(mask[z].sum())})
    return out


def summarize(per_patient: dict[str, list[dict]], lesion_free: int) -> dict:
    """FP slice count and rate, split by distance to the lesion (``BINS``; a patient without a lesion counts as further)."""
    rows = [r for rs in per_patient.values() for r in rs]
    dists = [r["distance"] if r["distance"] is not None else 10**9 for r in rows]
    by_bin = {name: sum(1 for d in dists if d >= lo and (hi is None or d <= hi)) for name, lo, hi in BINS}
    return {
        "fp_slices": len(rows),
        "lesion_free_slices": lesion_free,
        "fp_slice_rate": len(rows) / lesion_free if lesion_free else float("nan"),
        "by_distance": by_bin,
        "median_pixels": float(np.median([r["pixels"] for r in rows])) if rows else 0.0,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("models"))
    ap.add_argument("--model", default=None, help="registered model name (default: the registry's default)")
    ap.add_argument("--patients", choices=("val", "test"), default="val", help="which patients of the registry's split")
    ap.add_argument("--condition", choices=EVERY_CONDITION, default="all")
    ap.add_argument("--data", type=Path, default=None, help="the LGG dataset (default: $BRAINSEG_DATA or ../shared/data/lgg/kaggle_3m)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    try:
        seg = load(a.model, model_dir=a.model_dir)
        split = read_split(a.model_dir / "split.json")
        ds = discover(a.data or default_data_root())
        patients = [ds.patient(p) for p in split[a.patients]]
    except (RegistryError, DataError, OSError, KeyError, ValueError) as e:
        print(f"fp_by_distance: error: {e}", file=sys.stderr)
        return 2
    post = seg.postprocess
    per_patient, lesion_free = {}, 0
    for p in predict_patients(seg, patients, condition=a.condition):
        per_patient[p.patient] = fp_slices(binarize_stack(p.prob, post), p.truth)
        lesion_free += int((~lesion_slices(p.truth)).sum())
    summary = summarize(per_patient, lesion_free)
    print(
        f"{seg.name} ({a.patients}, {a.condition}, {post}): {summary['fp_slices']} of {lesion_free} lesion-free slices "
        f"(rate {summary['fp_slice_rate']:.3f}); by distance to the lesion "
        + ", ".join(f"{k} {v}" for k, v in summary["by_distance"].items())
        + f"; median {summary['median_pixels']:.0f} pixels"
    )
    if a.json:
        write_json_atomic(a.json, {"model": seg.name, "patients": a.patients, "condition": a.condition, **summary, "per_patient": per_patient})
    return 0


if __name__ == "__main__":
    sys.exit(main())
