"""Flip test-time augmentation (TTA) as a shipped model's served default: calibrated on the validation patients,
released only after a check on the test patients.

    python scripts/ship_tta.py --data ../shared/data/lgg/kaggle_3m [--model-dir models] [--models attention_unet] [--json out.json]
    python scripts/ship_tta.py --data ... --model-dir /tmp/models --limit 2   # smoke test

For each registered model (default: every one):

1. its shipped calibration (no TTA) is reproduced on the validation patients (``pipeline.calibrate_against``, the
   false positives pooled over every input condition); a model whose file carries another post-processing stops
   with an error (re-ship it first: the checks below would compare against something that is not served);
2. TTA is calibrated within that FP rate and judged by ``pipeline.champion_challenger`` against it (a validation
   gain beyond chance at no more false positives);
3. where it pays: ``pipeline.release_check`` on the test patients, fp32 with TTA against fp32 without (``RELEASE_RULE``,
   fixed before any run); TTA is on by default only where it passes. Where the model serves INT8 by default,
   ``pipeline.int8_cost`` with TTA (``INT8_RULE``) decides the precision of runs with TTA: INT8 where it holds,
   else fp32 (``ModelEntry.int8_recommended``); runs without TTA keep ``scripts/ship_int8.py``'s choice;
4. the model's files (checkpoint, ONNX, INT8 ONNX) get their ``inference`` section: ``tta_postprocess`` (where the
   calibration kept the FP budget: what a run with TTA uses, asked for or not) and ``tta`` (the default); the
   registry entry a ``tta`` block with the evidence, the model card a "Flip TTA" section.

Files are rewritten atomically, the registry after each model. ``--dry-run`` measures and prints, writes nothing.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

from brainseg.config import DISPLAY_NAMES
from brainseg.inference.export import update_onnx_config
from brainseg.inference.predictor import load
from brainseg.inference.registry import RegistryError, read, write_registry
from brainseg.io.datasets import DataError, discover, labelled, read_split
from brainseg.io.files import replace_section, write_json_atomic
from brainseg.pipeline import INT8_RULE, RELEASE_RULE, Option, calibrate_against, int8_cost, int8_holds, release_check

CARD_START, CARD_END = "<!-- tta -->", "<!-- /tta -->"


def ship_one(name: str, reg, val, test, log=print, strict: bool = True) -> dict:
    """Steps 1-3 for one model; the ``tta`` block (nothing written). ValueError where step 1 does not reproduce
    (``strict=False``, a smoke test on a few patients: a warning)."""
    seg = load(name, model_dir=reg.directory, precision="fp32")
    t0 = time.perf_counter()
    base = calibrate_against(seg, val, None, progress=False)
    if base.post != seg.postprocess:
        msg = f"{name}: the validation patients give {base.post}, the model file carries {seg.postprocess}; re-ship the model first"
        if strict:
            raise ValueError(msg)
        log(f"warning: {msg}")
    cal = calibrate_against(seg, val, base, progress=False, tta=True)
    log(f"{name}: no TTA {base.val_score:.4f} at {base.post}, FP {base.fp_summary()}")
    log(f"{name}: TTA    {cal.val_score:.4f} at {cal.post}, FP {cal.fp_summary()}: {cal.verdict['reason']} ({time.perf_counter() - t0:.0f} s)")
    block = {
        "default": False,
        "postprocess": asdict(cal.post) if cal.fp_budget_met else None,
        "validation": {
            "patients": len(val),
            "score_without": base.val_score,
            "score_with": cal.val_score,
            "fp_slices_without": base.fp_slices,
            "fp_slices_with": cal.fp_slices,
            "lesion_free_slices": cal.lesion_free_slices,
            "verdict": cal.verdict,
        },
        "release_rule": RELEASE_RULE,
    }
    if not cal.verdict["replaces"]:
        return block
    t0 = time.perf_counter()
    check = release_check(test, Option(seg, False, base.post), [Option(seg, True, cal.post)])[0]
    block["release_check"] = {"test_patients": len(test), **check}
    log(f"{name}: release check on {len(test)} test patients: {'passes' if check['passes'] else 'fails'} ({time.perf_counter() - t0:.0f} s)")
    if not check["passes"]:
        return block
    block["default"] = True
    entry = reg.entry(name)
    if entry.default_precision == "int8" and entry.onnx_int8:
        t0 = time.perf_counter()
        int8 = load(name, model_dir=reg.directory, precision="int8")
        cost = int8_cost(seg, int8, test, tta=True, post=cal.post)
        block["int8"] = {"test": cost, "holds": int8_holds(cost), "rule": INT8_RULE}
        log(f"{name}: INT8 with TTA: {'holds' if block['int8']['holds'] else 'fails: runs with TTA are served in fp32'} ({time.perf_counter() - t0:.0f} s)")
    return block


def write_block(reg, name: str, block: dict) -> list[Path]:
    """Step 4: the ``inference`` section into every file of the model, the registry entry, the model card."""
    from brainseg.models.checkpoint import load_checkpoint, save_checkpoint

    inference = {"tta": block["default"], "tta_postprocess": block["postprocess"]}
    written = []
    ckpt_path = reg.file(name, "checkpoint")
    if ckpt_path is not None:
        ckpt = load_checkpoint(ckpt_path)
        ckpt["config"]["inference"] = inference
        save_checkpoint(ckpt_path, ckpt)
        written.append(ckpt_path)
    for key in ("onnx", "onnx_int8"):
        path = reg.file(name, key)
        if path is not None:
            written.append(update_onnx_config(path, {"inference": inference}))
    entry = reg.entry(name)
    entry.tta = block
    card = Path(reg.directory) / (entry.card or f"{name}.md")
    if card.is_file():
        replace_section(card, card_section(name, block), CARD_START, CARD_END)
        written.append(card)
    write_registry(reg.directory, reg)
    return written


def card_section(name: str, block: dict) -> str:
    v = block["validation"]
    verdict = v["verdict"]
    lo, hi = verdict["gain_ci95"]
    post = block["postprocess"]
    lines = [
        CARD_START,
        "## Flip TTA (`scripts/ship_tta.py`)",
        "",
        f"Validation patients ({v['patients']}): score {v['score_without']:.4f} without TTA, {v['score_with']:.4f} with TTA at its own "
        f"calibration ({fmt_post(post) if post else 'none within the FP budget'}); false-positive slices over every input condition "
        f"{v['fp_slices_without']} -> {v['fp_slices_with']} of {v['lesion_free_slices']}; gain {verdict['gain']:+.4f} [{lo:+.4f}, {hi:+.4f}]: "
        f"{'pays' if verdict['replaces'] else verdict['reason']}.",
    ]
    rc = block.get("release_check")
    if rc:
        lines += [
            "",
            f"Release check on the test patients ({rc['test_patients']}), against the same model without TTA: {'passes' if rc['passes'] else 'fails'} "
            f"({block['release_rule']}).",
            "",
            "| condition | per-patient Dice without -> with TTA | difference [95% CI] | FP rate without -> with |",
            "|---|---|---|---|",
        ]
        for c, r in rc["conditions"].items():
            d_lo, d_hi = r["difference_ci95"]
            lines.append(
                f"| {c} | {r['dice_default']:.3f} -> {r['dice']:.3f} | {r['difference']:+.3f} [{d_lo:+.3f}, {d_hi:+.3f}] | {r['fp_default']:.3f} -> {r['fp']:.3f} |"
            )
    if block.get("int8"):
        drops = block["int8"]["test"]
        worst = max(drops, key=lambda c: drops[c]["drop"])
        lines += [
            "",
            f"INT8 with TTA against fp32 with TTA (test patients): largest drop of the per-patient Dice {drops[worst]['drop']:+.4f} ({worst}): "
            + ("holds; runs with TTA are served in INT8." if block["int8"]["holds"] else f"over the limit ({INT8_RULE}); runs with TTA are served in fp32."),
        ]
    on = "**on**: the API, the page, the CLI and batch jobs run it unless asked not to (`tta=false`, `--no-tta`)"
    off = "off (ask for it with `tta=true` / `--tta`; it then runs at the calibration above)"
    lines += ["", f"Served by default: TTA {on if block['default'] else off}. The other tables of this card are one pass without TTA.", CARD_END, ""]
    return "\n".join(lines)


def fmt_post(post: dict) -> str:
    return f"p >= {post['threshold']}, min {post['min_size']} px, {'3D' if post['components_3d'] else '2D'} components"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the LGG dataset root (kaggle_3m layout)")
    ap.add_argument("--model-dir", type=Path, default=Path("models"))
    ap.add_argument("--models", nargs="+", default=None, help="only these registered models (default: all)")
    ap.add_argument("--limit", type=int, default=0, help="smoke test: only this many validation and test patients (step 1 then only warns)")
    ap.add_argument("--json", type=Path, default=None, help="also write every model's block here")
    ap.add_argument("--dry-run", action="store_true", help="measure and print; write no model file")
    a = ap.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    try:
        reg = read(a.model_dir)
        split = reg.split or read_split(a.model_dir / "split.json")
        ds = labelled(discover(a.data))
        val = [ds.patient(p) for p in split["val"]][: a.limit or None]
        test = [ds.patient(p) for p in split["test"]][: a.limit or None]
        names = a.models or reg.names
        for n in names:
            reg.entry(n)
    except (RegistryError, DataError, OSError, KeyError, ValueError) as e:
        print(f"ship_tta: error: {e}", file=sys.stderr)
        return 2
    print(f"flip TTA: {len(val)} validation and {len(test)} test patients; models {', '.join(names)}", flush=True)
    blocks = {}
    for name in names:
        try:
            blocks[name] = block = ship_one(name, reg, val, test, log=lambda m: print(m, flush=True), strict=not a.limit)
        except ValueError as e:
            print(f"ship_tta: error: {e}", file=sys.stderr)
            return 2
        print(f"{DISPLAY_NAMES.get(name, name)}: TTA by default {'on' if block['default'] else 'off'}", flush=True)
        if not a.dry_run:
            for path in write_block(reg, name, block):
                print(f"  wrote {path}", flush=True)
    if a.json:
        write_json_atomic(a.json, blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
