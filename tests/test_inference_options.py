"""scripts/inference_options.py: the shipped models' inference options (model, ensemble, flip TTA) against the
default (fp32, no TTA), on validation patients under the shipping rules. On the tiny test models and synthetic patients;
the real run on the shipped models is docs/ablations.md's (round 9)."""

from __future__ import annotations

import json
import shutil

import torch
from helpers import script, synthetic_dataset

from brainseg.config import EVERY_CONDITION
from brainseg.io.datasets import discover, labelled, split_patients

opts = script("inference_options.py")


def test_every_option_is_calibrated_and_judged_against_the_default(tiny_model_dir, tmp_path):
    torch.set_num_threads(1)
    models = shutil.copytree(tiny_model_dir, tmp_path / "models")
    data = synthetic_dataset(tmp_path / "data", patients=4, slices=4, size=64)
    split = split_patients([p.id for p in labelled(discover(data)).patients], 2, 1, seed=0)
    (models / "split.json").write_text(json.dumps(split))
    out = tmp_path / "options.json"
    assert opts.main(["--model-dir", str(models), "--data", str(data), "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    assert got["patients"] == split["val"] and got["conditions"] == list(EVERY_CONDITION)
    rows = got["options"]
    assert [(r["model"], r["tta"]) for r in rows] == [(m, t) for m in ("attention_unet", "unetpp", "ensemble") for t in (False, True)]
    default, others = rows[0], rows[1:]
    assert default["verdict"] is None and default["lesion_free_slices"] > 0
    for r in others:
        v = r["verdict"]
        assert v["fp_budget_slices"] == default["fp_slices"] and len(v["gain_ci95"]) == 2
        # within the default's false positives (the same lesion-free slices), or rejected for them
        assert r["fp_slices"] <= default["fp_slices"] or (not v["replaces"] and v["reason"].startswith("more false positives"))
    assert got["table"].count("\n") == 2 + len(rows) and "the default, no TTA" in got["table"]


def test_a_model_folder_without_a_split_is_a_one_line_error(tiny_model_dir, capsys):
    assert opts.main(["--model-dir", str(tiny_model_dir)]) == 2  # the fixture folder has no split.json
    err = capsys.readouterr().err.strip()
    assert err.startswith("inference_options: error:") and "split" in err and "\n" not in err


def test_the_release_check_on_test_patients(tiny_model_dir, tmp_path):
    """The default against itself passes with a zero difference everywhere; another option's verdict follows the rule
    (FP at most max(5%, the default's) and a Dice-difference interval not wholly below 0) under each condition."""
    from brainseg.config import PostprocessConfig
    from brainseg.inference.predictor import load
    from brainseg.pipeline import Option, release_check

    torch.set_num_threads(1)
    data = synthetic_dataset(tmp_path / "data", patients=3, slices=4, size=64)
    test = labelled(discover(data)).patients
    post = PostprocessConfig(threshold=0.5, min_size=10)
    att, upp = load("attention_unet", model_dir=tiny_model_dir), load("unetpp", model_dir=tiny_model_dir)
    checks = release_check(test, Option(att, False, post), [Option(att, False, post), Option(upp, True, post)])
    same, other = checks
    assert same["passes"] and set(same["conditions"]) == set(EVERY_CONDITION)
    assert all(r["difference"] == 0 and r["difference_ci95"] == [0, 0] and r["fp"] == r["fp_default"] for r in same["conditions"].values())
    for r in other["conditions"].values():
        assert r["passes"] == (r["fp"] <= max(0.05, r["fp_default"]) and not r["difference_ci95"][1] < 0)
    assert other["passes"] == all(r["passes"] for r in other["conditions"].values())
    assert opts.release_table(checks).count("\n") == 2 + 2 * len(EVERY_CONDITION)
