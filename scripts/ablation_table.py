"""The ablation table (docs/ablations.md) from the runs' summaries, with bootstrap intervals.

    python scripts/ablation_table.py docs/ablations/gpu_round1.json --reference att_sd30 > docs/ablations_table.md

Each summary holds every validation patient's 3D Dice (network resolution, threshold 0.5)
under the four input conditions, for the epoch that run selected on validation. Differences
to the reference run are paired by patient; the interval is a 95% percentile bootstrap
over the validation patients.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from brainseg.evaluation.metrics import bootstrap_ci


def cell(values: list[float]) -> str:
    lo, hi = bootstrap_ci(values)
    return f"{np.mean(values):.3f} [{lo:.2f}, {hi:.2f}]"


def diff_cell(values: list[float], ref: list[float]) -> str:
    d = np.asarray(values) - np.asarray(ref)
    lo, hi = bootstrap_ci(d)
    return f"{d.mean():+.3f} [{lo:+.2f}, {hi:+.2f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("summaries", nargs="+")
    ap.add_argument("--reference", default="att_sd30")
    a = ap.parse_args()
    rows = [r for f in a.summaries for r in json.loads(Path(f).read_text())]
    ref = next(r for r in rows if r["run"] == a.reference)
    patients = sorted(ref["val_per_patient"]["all"])

    def vals(r, c):
        return [r["val_per_patient"][c][p] for p in patients]

    print(
        "| run | model | change | epochs | minutes | all three | FLAIR only | pre missing | post missing "
        "| selection (mean of all, FLAIR only) | vs reference: all | vs reference: FLAIR only |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in sorted(rows, key=lambda r: (r["model"], -r["selection_score"])):
        c = r["config"]
        change = r.get("change") or ", ".join(
            x
            for x in (
                f"sequence dropout {c['augment']['missing_pre']:.1f}/{c['augment']['missing_post']:.1f}",
                c["normalization"],
                f"EMA {c['ema_decay']}" if c["ema_decay"] else "",
                "deep supervision" if c["deep_supervision"] else "",
                f"budget {c['budget_s']:.0f} s",
            )
            if x
        )
        sel = [(a + b) / 2 for a, b in zip(vals(r, "all"), vals(r, "flair_only"), strict=False)]
        same = r["run"] == a.reference
        print(
            f"| {r['run']} | {r['model']} | {change} | {r['epochs']} | {r['wall_s'] / 60:.1f} | "
            + " | ".join(cell(vals(r, k)) for k in ("all", "flair_only", "pre_missing", "post_missing"))
            + f" | {cell(sel)} | "
            + ("reference" if same else diff_cell(vals(r, "all"), vals(ref, "all")))
            + " | "
            + ("reference" if same else diff_cell(vals(r, "flair_only"), vals(ref, "flair_only")))
            + " |"
        )


if __name__ == "__main__":
    main()
