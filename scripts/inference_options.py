"""Which inference options pay: each shipped model and their ensemble, with and without flip test-time
augmentation (TTA), against the default model (fp32, no TTA), on the validation patients under the shipping rules.

    python scripts/inference_options.py [--model-dir models] [--data ROOT] [--limit N] [--json out.json] [--release-check]

The default model without TTA comes first and is calibrated as it was shipped (``pipeline.calibrate``, the false
positives pooled over every input condition); every other option is calibrated within its rate of lesion-free
slices with a false positive and judged by ``pipeline.champion_challenger``: a gain beyond chance at no more false
positives. The API and the page offer each option (``model``, ``tta``); this says which of them a user gains by.
Prints a markdown table.

``--release-check``: then every option that pays on validation is checked on the test patients against the default,
under every input condition (``pipeline.release_check``, never a choice among options): it passes where, under each
condition, its lesion-free-slice FP rate is at most max(5%, the default's) and the 95% bootstrap interval of its
per-patient Dice difference to the default (paired by patient) does not lie wholly below 0. ``scripts/ship_tta.py``
makes an option of one model that passes its served default.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from brainseg.config import DISPLAY_NAMES, EVERY_CONDITION, default_data_root
from brainseg.inference.predictor import load
from brainseg.inference.registry import ENSEMBLE, RegistryError, read
from brainseg.io.datasets import DataError, discover, read_split
from brainseg.io.files import write_json_atomic
from brainseg.pipeline import Option, calibrate_against, release_check


def options(model_dir: Path) -> list[tuple[str, bool]]:
    """(model, tta) pairs: the default without TTA first, then every model and the ensemble, each without and with TTA."""
    reg = read(model_dir)
    names = [reg.default, *[n for n in reg.models if n != reg.default], ENSEMBLE]
    return [(n, tta) for n in names for tta in (False, True)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=Path("models"))
    ap.add_argument("--data", type=Path, default=None, help="the LGG dataset (default: $BRAINSEG_DATA or ../shared/data/lgg/kaggle_3m)")
    ap.add_argument("--limit", type=int, default=0, help="smoke test: only this many validation patients")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--release-check", action="store_true", help="check each option that pays on the test patients (see above)")
    a = ap.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    try:
        opts = options(a.model_dir)
        split = read_split(a.model_dir / "split.json")
        ds = discover(a.data or default_data_root())
        val = [ds.patient(p) for p in split["val"]][: a.limit or None]
        test = [ds.patient(p) for p in split["test"]][: a.limit or None] if a.release_check else []
    except (RegistryError, DataError, OSError, KeyError, ValueError) as e:
        print(f"inference_options: error: {e}", file=sys.stderr)
        return 2
    rows, shipped, posts = [], None, {}
    for name, tta in opts:
        seg = load(name, model_dir=a.model_dir)
        t0 = time.time()
        cal = calibrate_against(seg, val, shipped, progress=False, tta=tta)
        row = {"model": name, "tta": tta, "post": asdict(cal.post), "val_score": cal.val_score, "fp_slices": cal.fp_slices}
        row["lesion_free_slices"], row["seconds"], row["verdict"] = cal.lesion_free_slices, round(time.time() - t0, 1), cal.verdict
        shipped = shipped or cal
        rows.append(row)
        posts[name, tta] = cal.post
        print(f"{name} tta={tta}: {cal.val_score:.4f} at {cal.post}, FP {cal.fp_summary()}", flush=True)
    table = markdown(rows)
    print(table)
    result = {"patients": [p.id for p in val], "conditions": list(EVERY_CONDITION), "options": rows, "table": table}
    paying = [(r["model"], r["tta"]) for r in rows if r["verdict"] and r["verdict"]["replaces"]]
    if a.release_check and paying:
        default = opts[0]
        segs = {name: load(name, model_dir=a.model_dir) for name in {n for n, _ in [default, *paying]}}
        checks = release_check(test, Option(segs[default[0]], default[1], posts[default]), [Option(segs[n], t, posts[n, t]) for n, t in paying])
        result["release_check"] = {"test_patients": [p.id for p in test], "options": checks}
        print(release_table(checks))
    if a.json:
        write_json_atomic(a.json, result)
    return 0


def release_table(checks: list[dict]) -> str:
    lines = [
        "| model | TTA | condition | test Dice, default -> option | difference [95% CI] | FP, default -> option | passes |",
        "|---|---|---|---|---|---|---|",
    ]
    for ch in checks:
        for c, r in ch["conditions"].items():
            lo, hi = r["difference_ci95"]
            lines.append(
                f"| {DISPLAY_NAMES.get(ch['model'], ch['model'])} | {'yes' if ch['tta'] else 'no'} | {c} | {r['dice_default']:.3f} -> {r['dice']:.3f} "
                f"| {r['difference']:+.3f} [{lo:+.3f}, {hi:+.3f}] | {r['fp_default']:.3f} -> {r['fp']:.3f} | {'yes' if r['passes'] else 'no'} |"
            )
    return "\n".join(lines) + "\n"


def fmt_post(post: dict) -> str:
    return f"p >= {post['threshold']}, min {post['min_size']} px ({'3D' if post['components_3d'] else '2D'})"


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | TTA | calibrated at | validation score | FP slices (all conditions) | gain over the default [95% CI] | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = r["verdict"]
        gain = f"{v['gain']:+.4f} [{v['gain_ci95'][0]:+.4f}, {v['gain_ci95'][1]:+.4f}]" if v else ""
        verdict = ("pays" if v["replaces"] else v["reason"].split(" (")[0]) if v else "the default, no TTA"
        lines.append(
            f"| {DISPLAY_NAMES.get(r['model'], r['model'])} | {'yes' if r['tta'] else 'no'} | {fmt_post(r['post'])} | {r['val_score']:.4f} "
            f"| {r['fp_slices']} of {r['lesion_free_slices']} | {gain} | {verdict} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
