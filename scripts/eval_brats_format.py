"""Whole-tumour Dice on ``../shared/data/brats-format`` (the same LGG patients in BraTS format).

    python scripts/eval_brats_format.py [--root ../shared/data/brats-format] [--model NAME | --checkpoint PATH]
        [--precision fp32|int8] [--tta | --no-tta] [--json out.json]

The measurement itself is ``brainseg.evaluation.brats`` (what ``brainseg evaluate --data ROOT`` runs on any
BraTS-format root). Each case is read as ``brainseg predict`` reads a BraTS set (t1n / t2f / t1c; and FLAIR alone),
segmented with the model's calibrated post-processing (with flip TTA where the model is served with it,
at the post-processing calibrated for it; ``--tta`` / ``--no-tta`` say otherwise), written back onto the file's grid and
compared with the reference (fusion label > 0, whole tumour). The same patients' kaggle_3m
Dice comes from ``brainseg evaluate``; the two formats side by side say what a change of
format costs. These patients may sit in the training split: this measures format, not
generalisation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from brainseg.evaluation.brats import evaluate_brats
from brainseg.inference.predictor import load
from brainseg.io.files import write_json_atomic

KEYS = ("dice", "precision", "recall", "pred_ml", "ref_ml")


def brats_format_scores(segmenter, root: Path, progress: bool = True, tta: bool = False) -> dict:
    """{case: {"all" | "flair_only": {dice, precision, recall, pred_ml, ref_ml}}} for every labelled case under ``root``,
    at the post-processing calibrated for ``tta`` (``evaluation.brats.evaluate_brats``)."""
    report = evaluate_brats(segmenter, root, tta=tta, progress=False)
    by_case = report["per_case"]
    out = {case: {c: {k: round(by_case[c][case][k], 4 if k in KEYS[:3] else 2) for k in KEYS} for c in by_case} for case in by_case["all"]}
    if progress:
        for case, r in out.items():
            print(f"{case}: all {r['all']['dice']:.3f} (P {r['all']['precision']:.2f} R {r['all']['recall']:.2f}); FLAIR only {r['flair_only']['dice']:.3f}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path("../shared/data/brats-format"))
    ap.add_argument("--model", default=None, help="registered model name (default: the registry's default)")
    ap.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint or ONNX file instead of a registered model")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help="flip TTA (default: the model's shipped default)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    if not a.root.is_dir():
        print(f"eval_brats_format: error: {a.root}: no such folder", file=sys.stderr)
        return 2
    segmenter = load(a.model, checkpoint=a.checkpoint, precision=a.precision)
    tta = segmenter.with_tta(a.tta)
    results = brats_format_scores(segmenter, a.root, tta=tta)
    for cond in ("all", "flair_only"):
        print(f"mean {cond}: {np.mean([r[cond]['dice'] for r in results.values()]):.3f}")
    if a.json:
        write_json_atomic(a.json, {"model": segmenter.name, "tta": tta, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
