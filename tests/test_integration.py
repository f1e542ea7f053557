"""preprocess -> train (a few steps) -> evaluate -> predict on 3 real patients, through the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
from helpers import BRATS, LGG, REPO, require

from brainseg.cli import main
from brainseg.config import EVERY_CONDITION
from brainseg.io.datasets import discover

SMALL = ["--size", "64", "--features", "4", "8", "16", "32"]


@pytest.fixture(scope="module")
def three_patients(tmp_path_factory):
    lgg = require(LGG)
    ds = discover(lgg)
    smallest = sorted(ds.patients, key=lambda p: len(p.slices))[:3]
    root = tmp_path_factory.mktemp("lgg3") / "kaggle_3m"
    root.mkdir()
    for p in smallest:
        (root / p.id).symlink_to(Path(p.slices[0].image_path).parent)
    return root


@pytest.mark.slow
def test_full_pipeline_on_real_patients(three_patients, tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["preprocess", "--data", str(three_patients), "--cache", str(cache), "--size", "64", "--val", "1", "--test", "1"]) == 0
    for f in ["images.npy", "masks.npy", "index.json", "split.json", "preprocessing_overview.png"]:
        assert (cache / f).is_file(), f
    split = json.loads((cache / "split.json").read_text())
    assert len(split["train"]) == 1 and len(split["val"]) == 1 and len(split["test"]) == 1

    assert (
        main(
            [
                "train",
                "--data",
                str(three_patients),
                "--cache",
                str(cache),
                "--out",
                str(run),
                "--epochs",
                "1",
                "--max-steps",
                "2",
                "--batch-size",
                "4",
                "--quiet",
                *SMALL,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Nested U-Net DICE Score: " in out and "Attention U-Net DICE Score: " in out and "per-patient 3D Dice" in out
    registry = json.loads((run / "registry.json").read_text())
    assert registry["default"] in ("unetpp", "attention_unet")
    for name in ("unetpp", "attention_unet"):
        for f in ["best.pt", "last.pt", "best.onnx", "history.csv", "training_curves.png", "calibration.json", "test_report.json"]:
            assert (run / name / f).is_file(), f"{name}/{f}"
    rep_att = json.loads((run / "attention_unet" / "test_report.json").read_text())
    assert set(rep_att["conditions"]) == {"all", "pre_missing", "post_missing", "flair_only"}
    assert rep_att["conditions"]["all"]["per_patient_dice"] == rep_att["per_patient_dice"]
    assert "validation" in registry["selected_by"]
    table = (run / "comparison.md").read_text()
    assert table.count("| Per-patient 3D Dice |") == 1 and "Nested U-Net" in table and "Attention U-Net" in table

    report = tmp_path / "report.json"
    assert (
        main(
            [
                "evaluate",
                "--data",
                str(three_patients),
                "--model-dir",
                str(run),
                "--model",
                "ensemble",
                "--split",
                str(cache / "split.json"),
                "--conditions",
                "every",
                "--out",
                str(report),
            ]
        )
        == 0
    )
    rep = json.loads(report.read_text())
    assert set(rep["conditions"]) == set(EVERY_CONDITION) and rep["condition"] == "all"
    assert "skull stripped" in report.with_suffix(".md").read_text()
    assert "FLAIR only" in report.with_suffix(".md").read_text()
    assert rep["patients"] == 1 and list(rep["per_patient"]) == split["test"]
    for key in [
        "per_patient_dice",
        "per_patient_iou",
        "hd95",
        "positive_slice_dice",
        "per_slice_dice",
        "fp_slice_rate",
        "lesion_sensitivity",
        "fp_lesions_per_patient",
        "lesionwise_dice",
        "by_lesion_size_voxels",
    ]:
        assert key in rep, key
    assert report.with_suffix(".md").is_file()

    # predict: one slice, one patient folder, the BraTS-MET NIfTI set
    patient_dir = three_patients / split["test"][0]
    one = sorted(patient_dir.glob("*_1.tif"))[0]
    pred = tmp_path / "pred"
    inputs = [str(one), str(patient_dir)]
    if BRATS.is_dir():
        inputs.append(str(BRATS))
    assert main(["predict", *inputs, "--out", str(pred), "--model-dir", str(run)]) == 0
    m = cv2.imread(str(pred / f"{one.stem}_mask.png"), cv2.IMREAD_UNCHANGED)
    assert m.shape == (256, 256) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 255}
    assert (pred / f"{one.stem}_overlay.png").is_file()
    stats = json.loads((pred / f"{one.stem}_lesions.json").read_text())
    assert {"lesion_count", "lesions", "model"} <= set(stats)
    n_images = len([p for p in patient_dir.iterdir() if not p.stem.endswith("_mask")])
    assert len(list(pred.glob("*_mask.png"))) == n_images  # the folder's slices (the single one is among them)
    if BRATS.is_dir():
        mask = nib.load(pred / "BraTS-MET-00110-000_mask.nii.gz")
        ref = nib.load(BRATS / "BraTS-MET-00110-000-t1n.nii.gz")
        assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
        vstats = json.loads((pred / "BraTS-MET-00110-000_lesions.json").read_text())
        assert vstats["spacing_mm"] == [1.0, 1.0, 1.0] and len(vstats["slice_lesion_area_px"]) == 155


def test_root_wrappers_work_verbatim_and_fail_with_one_line(tmp_path):
    for script in ["preprocess.py", "train.py"]:
        r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "--data" in r.stdout
    missing = tmp_path / "nope"
    r = subprocess.run(
        [sys.executable, "preprocess.py", "--data", str(missing), "--cache", str(tmp_path / "c")], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and str(missing) in r.stderr and "not found" in r.stderr
    assert not (tmp_path / "c").exists()


def test_cli_bad_slice_names_the_file(tmp_path, tiny_model_dir):
    """A working model, so the error comes from reading the slice, not from loading the model."""
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    cli = [sys.executable, "-m", "brainseg.cli"]
    r = subprocess.run([*cli, "data", "stats", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0  # stats only lists; no masks -> zero labelled slices
    r = subprocess.run(
        [*cli, "predict", str(bad), "--out", str(tmp_path / "o"), "--model-dir", str(tiny_model_dir)], env=env, capture_output=True, text=True, timeout=120
    )
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert last.startswith("brainseg: error: ") and "broken.tif" in last and "model" not in last, last
    assert not (tmp_path / "o" / "broken_mask.png").exists()
