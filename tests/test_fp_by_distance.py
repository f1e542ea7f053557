"""scripts/fp_by_distance.py: false-positive slices by their distance to the lesion."""

from __future__ import annotations

import json

import numpy as np
from helpers import LGG, REPO, require, script

fpd = script("fp_by_distance.py")


def _stack(z, slices):
    a = np.zeros((z, 8, 8), bool)
    for s, px in slices.items():
        a[s].flat[:px] = True
    return a


def test_false_positive_slices_are_binned_by_distance_to_the_lesion():
    truth = _stack(12, {4: 5, 5: 5})
    # predicted: the lesion slices (true positives), one slice over the edge, one three away, one seven away
    mask = _stack(12, {4: 6, 5: 6, 6: 3, 2: 4, 11: 9})
    rows = fpd.fp_slices(mask, truth)
    assert [(r["slice"], r["distance"], r["pixels"]) for r in rows] == [(2, 2, 4), (6, 1, 3), (11, 6, 9)]
    s = fpd.summarize({"p": rows}, lesion_free=10)
    assert s["by_distance"] == {"adjacent": 1, "2-3 slices": 1, "further": 1}
    assert s["fp_slices"] == 3 and s["fp_slice_rate"] == 0.3 and s["median_pixels"] == 4


def test_a_patient_without_a_lesion_counts_as_further():
    rows = fpd.fp_slices(_stack(3, {1: 2}), _stack(3, {}))
    assert rows == [{"slice": 1, "distance": None, "pixels": 2}]
    assert fpd.summarize({"p": rows, "q": []}, lesion_free=6)["by_distance"]["further"] == 1


def test_a_missing_model_folder_is_a_one_line_error(tmp_path, capsys):
    assert fpd.main(["--model-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fp_by_distance: error:") and "nowhere" in err and "\n" not in err


def test_the_shipped_default_on_the_real_validation_patients(tmp_path, capsys):
    out = tmp_path / "fp.json"
    assert fpd.main(["--model-dir", str(REPO / "models"), "--data", str(require(LGG)), "--patients", "val", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    split = json.loads((REPO / "models" / "split.json").read_text())
    assert sorted(r["per_patient"]) == sorted(split["val"])
    assert r["lesion_free_slices"] > 0 and r["fp_slices"] == sum(len(v) for v in r["per_patient"].values()) == sum(r["by_distance"].values())
    assert r["fp_slice_rate"] <= 0.05  # the shipped default's guarantee, on the patients it was calibrated on
    assert "lesion-free slices" in capsys.readouterr().out
