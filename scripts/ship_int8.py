"""INT8 versions of the shipped models: quantise, measure the Dice cost on the test patients, register.

    python scripts/ship_int8.py --data ../shared/data/lgg/kaggle_3m --model-dir models
    python scripts/ship_int8.py --data ../shared/data/lgg/kaggle_3m --model-dir /tmp/models --limit 2   # smoke test

For each model of ``registry.json``: ``X.onnx`` -> ``X.int8.onnx`` (``brainseg.inference.export.export_int8``,
calibrated on seeded slices of the split's *training* patients, some with FLAIR copied into the
pre- / post-contrast channels); the fp32 and the INT8 model are evaluated on the *test* patients
under every input condition (``config.EVERY_CONDITION``: the four channel conditions, skull stripped, ...), with the model's calibrated post-processing (and, for a model served with flip TTA by default, with TTA at its own
calibration too: the registry's ``tta.int8``, which decides the precision of runs with TTA). The registry entry
gets ``onnx_int8``, an ``int8`` block (calibration, both per-patient Dice under every condition,
the drop) and ``default_precision``: ``int8`` only where the per-patient Dice drops by at most
``MAX_DROP`` under every condition (all sequences, missing sequences, skull stripped, BraTS-like),
else ``fp32``; the registry is written after each model. The model card gets an "INT8" section.
Prints the Dice difference per condition. Memory: about 0.7 GB (calibration runs batch by batch).

The split is the registry's ``split`` (else ``--split``, else ``split.json`` in the model folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from brainseg.config import DISPLAY_NAMES
from brainseg.inference.backends import int8_path
from brainseg.inference.export import CALIBRATION_METHODS, CALIBRATION_SLICES, export_int8
from brainseg.inference.predictor import load_segmenter
from brainseg.inference.registry import Registry, read, write_registry
from brainseg.io.datasets import discover, labelled, read_split
from brainseg.io.files import replace_section
from brainseg.pipeline import INT8_MAX_DROP, INT8_RULE, int8_cost, int8_holds

MAX_DROP, RULE = INT8_MAX_DROP, INT8_RULE
CARD_START, CARD_END = "<!-- int8 -->", "<!-- /int8 -->"


def split_of(reg: Registry, model_dir: Path, split_file: str | None) -> dict:
    if reg.split:
        return reg.split
    return read_split(split_file or model_dir / "split.json")


def card_section(block: dict) -> str:
    rows = "\n".join(
        f"| {c}{tag} | {r['fp32']:.3f} | {r['int8']:.3f} | {r['drop']:+.3f} | {r['largest_patient_drop']:+.3f} "
        f"| {r['fp_slice_rate']['fp32']:.3f} / {r['fp_slice_rate']['int8']:.3f} |"
        for key, tag in (("test", ""), ("test_tta", " (flip TTA)"))
        for c, r in block.get(key, {}).items()
    )
    cal = block["calibration"]
    served = "INT8" if block["default_precision"] == "int8" else "fp32 (INT8 available with precision int8)"
    if "test_tta" in block:
        served += f" without TTA; with flip TTA (its default) {'INT8' if int8_holds(block['test_tta']) and block['default_precision'] == 'int8' else 'fp32'}"
    return (
        f"{CARD_START}\n## INT8 (`{block['file']}`)\n\n"
        f"Static quantisation with ONNX Runtime (QDQ, int8 weights per channel, uint8 activations), calibrated on "
        f"{cal['slices']} seeded slices of {cal['patients']} training patients ({cal['method']}; conditions {cal['conditions']}). "
        f"Test patients ({block['test_patients']}), same post-processing as fp32; drop = fp32 - INT8.\n\n"
        "| condition | per-patient Dice fp32 | INT8 | drop | largest drop of one patient | FP rate fp32 / INT8 |\n|---|---|---|---|---|---|\n"
        f"{rows}\n\nServed by default: **{served}**. {RULE}.\n{CARD_END}\n"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="the LGG dataset root (kaggle_3m layout)")
    ap.add_argument("--model-dir", type=Path, default=Path("models"))
    ap.add_argument("--split", default=None, help="split JSON when the registry has none (default: MODEL_DIR/split.json)")
    ap.add_argument("--models", nargs="+", default=None, help="only these registered models (default: all)")
    ap.add_argument("--calibration-slices", type=int, default=CALIBRATION_SLICES)
    ap.add_argument("--method", choices=CALIBRATION_METHODS, default=CALIBRATION_METHODS[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="smoke test: only this many training (calibration) and test patients")
    a = ap.parse_args(argv)

    reg = read(a.model_dir)
    split = split_of(reg, a.model_dir, a.split)
    ds = labelled(discover(a.data))
    train_ids = split["train"][: a.limit or None]
    test = [ds.patient(pid) for pid in split["test"][: a.limit or None]]
    names = a.models or reg.names
    print(f"INT8: calibrating on {len(train_ids)} training patients, testing on {len(test)} test patients; rule: {RULE}", flush=True)
    for name in names:
        entry = reg.entry(name)
        fp32_path = a.model_dir / entry.onnx
        t0 = time.perf_counter()
        out = export_int8(fp32_path, a.data, train_ids, a.calibration_slices, a.seed, int8_path(fp32_path), a.method)
        quantise_s = time.perf_counter() - t0
        fp32, int8 = load_segmenter(fp32_path, name), load_segmenter(out, name)
        result = int8_cost(fp32, int8, test)
        holds = int8_holds(result)
        result_tta = int8_cost(fp32, int8, test, tta=True) if entry.tta_default else None  # served with flip TTA by default
        block = {
            "file": out.name,
            "calibration": int8.backend.calibration,
            "test_patients": len(test),
            "test": result,
            **({"test_tta": result_tta} if result_tta else {}),
            "default_precision": "int8" if holds else "fp32",
            "rule": RULE,
        }
        entry.onnx_int8 = out.name
        entry.default_precision = block["default_precision"]
        entry.int8 = block
        if result_tta:  # the INT8 check of runs with TTA (scripts/ship_tta.py), for the new file
            entry.tta["int8"] = {"test": result_tta, "holds": int8_holds(result_tta), "rule": RULE}
        card = a.model_dir / (entry.card or f"{name}.md")
        if card.is_file():
            replace_section(card, card_section(block), CARD_START, CARD_END)
        print(f"\n{DISPLAY_NAMES.get(name, name)}: {out} (quantised in {quantise_s:.0f} s)")
        print(f"  {'condition':14s} {'fp32':>7s} {'int8':>7s} {'drop':>7s} {'worst patient':>14s}")
        for cond, r in result.items():
            print(f"  {cond:14s} {r['fp32']:7.4f} {r['int8']:7.4f} {r['drop']:+7.4f} {r['largest_patient_drop']:+14.4f}")
        print(f"  -> default precision {block['default_precision']} ({'every drop <= ' if holds else 'a drop > '}{MAX_DROP})", flush=True)
        write_registry(a.model_dir, reg)  # after each model: what is measured is kept if a later one fails
    print(f"\nregistry: {a.model_dir / 'registry.json'}")
    print(json.dumps({n: reg.entry(n).default_precision for n in names}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
