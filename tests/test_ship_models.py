"""One shipping flow (issue 17): ``scripts/ship_models.py`` ships through ``pipeline.finish_run``, the flow of ``brainseg train``.

On the tiny model of ``conftest.tiny_model_dir`` and a synthetic dataset: the script chooses the better of two candidates on
the validation patients, and its calibrated checkpoint, ONNX file and registry entry are what ``finish_run`` writes for a
training run of the same weights. Byte-identical model cards of the real shipped models are not re-checked here (shipping
them evaluates every candidate on the test patients for about an hour)."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from helpers import script, synthetic_dataset

from brainseg.config import CONDITIONS, EVERY_CONDITION, PostprocessConfig
from brainseg.inference import registry
from brainseg.inference.export import ONNX_METADATA_KEY
from brainseg.io.datasets import discover, labelled, split_patients
from brainseg.models.checkpoint import load_checkpoint, save_checkpoint
from brainseg.pipeline import Calibration, RunFiles, champion_challenger, finish_run


def _ship_script():
    return script("ship_models.py")


def _candidate(source: Path, path: Path, split: dict, blind: bool = False) -> Path:
    """The tiny checkpoint with a training split; ``blind``: its output bias so low that it never marks a lesion."""
    ckpt = load_checkpoint(source)
    ckpt["split"] = split
    if blind:
        ckpt["model"] = {k: torch.full_like(v, -30.0) if k.endswith(".bias") and v.shape == (1,) else v for k, v in ckpt["model"].items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, ckpt)
    return path


@pytest.fixture(scope="module")
def shipped(tiny_model_dir, tmp_path_factory):
    """``ship_models.main`` on two candidates (the blind one first) and ``finish_run`` on a training run of the good one."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ship")
    data = synthetic_dataset(root / "data", patients=4, slices=4, size=64)
    ids = [p.id for p in labelled(discover(data)).patients]
    split = split_patients(ids, 1, 1, seed=0)
    good = _candidate(tiny_model_dir / "unetpp.pt", root / "good" / "unetpp.pt", split)
    blind = _candidate(tiny_model_dir / "unetpp.pt", root / "blind" / "unetpp.pt", split, blind=True)
    out = root / "models"
    args = ["--data", str(data), "--out", str(out), "--candidates", f"unetpp={blind},{good}", "--brats-format", str(root / "none"), "--no-guard"]
    assert _ship_script().main(args) == 0

    run = root / "run" / "unetpp"
    _candidate(good, run / "best.pt", split)
    ds = labelled(discover(data))
    val, test = [ds.patient(p) for p in split["val"]], [ds.patient(p) for p in split["test"]]
    report, entry = finish_run(run, "unetpp", split, val, test, {"train_wall_seconds": 1.5}, progress=False)
    return {"out": out, "run": run, "good": good, "blind": blind, "report": report, "entry": entry}


def test_the_script_ships_the_better_candidate(shipped):
    out = shipped["out"]
    shipping = json.loads((out / "shipping.json").read_text())
    assert shipping["chosen"]["unetpp"]["path"] == str(shipped["good"]) and shipping["default"] == "unetpp"
    ckpt = load_checkpoint(out / "unetpp.pt")
    assert ckpt["info"]["shipped_from"] == str(shipped["good"]) and "train_wall_seconds" not in ckpt["info"]
    reg = registry.read(out)
    entry = reg.entry("unetpp")
    assert (entry.checkpoint, entry.onnx, entry.card) == ("unetpp.pt", "unetpp.onnx", "unetpp.md")
    assert set(entry.conditions) == set(EVERY_CONDITION) and entry.parameters == ckpt["info"]["parameters"]
    for f in ("unetpp.pt", "unetpp.onnx", "unetpp.md", "unetpp_test_report.json", "ensemble_test_report.json", "results.md", "test_examples.png"):
        assert (out / f).is_file(), f
    assert not (out / "calibration.json").exists()


def test_the_script_writes_what_finish_run_writes_for_a_training_run(shipped):
    """Same weights, same steps: the same calibration in the checkpoint, the same ONNX file, the same registry facts."""
    out, run = shipped["out"], shipped["run"]
    files = RunFiles.of_run(run)
    script, trained = load_checkpoint(out / "unetpp.pt"), load_checkpoint(files.checkpoint)
    assert trained["info"].pop("train_wall_seconds") == 1.5 and script["info"].pop("shipped_from") == str(shipped["good"])
    assert script.keys() == trained.keys() and script["config"] == trained["config"] and script["calibration"] == trained["calibration"]
    assert script["info"] == trained["info"] and script["split"] == trained["split"]
    assert all(torch.equal(script["model"][k], trained["model"][k]) for k in trained["model"])
    script_onnx, trained_onnx = onnx.load(out / "unetpp.onnx"), onnx.load(files.onnx)
    assert script_onnx.graph.SerializeToString() == trained_onnx.graph.SerializeToString()  # the same network, byte for byte
    meta = [{p.key: json.loads(p.value) for p in m.metadata_props} for m in (script_onnx, trained_onnx)]
    for m, (key, value) in zip(meta, (("shipped_from", str(shipped["good"])), ("train_wall_seconds", 1.5)), strict=True):
        assert m[ONNX_METADATA_KEY]["info"].pop(key) == value  # the metadata: the checkpoint's, which names its origin
    assert meta[0] == meta[1] and meta[0][ONNX_METADATA_KEY]["config"] == json.loads(json.dumps(trained["config"]))
    calibration = json.loads(files.calibration.read_text())
    assert calibration["table"] == trained["calibration"]["table"] and calibration["val_score"] == trained["calibration"]["val_score"]

    shipped_entry, trained_entry = registry.read(out).entry("unetpp"), shipped["entry"]
    assert (trained_entry.checkpoint, trained_entry.onnx) == ("unetpp/best.pt", "unetpp/best.onnx")
    assert shipped_entry.postprocess == trained_entry.postprocess and shipped_entry.val_selection_score == trained_entry.val_selection_score
    assert trained_entry.model_extra == {"train_wall_seconds": 1.5}
    # The test reports: the script's ONNX model and finish_run's PyTorch model on the same test patient
    script_report = json.loads((out / "unetpp_test_report.json").read_text())
    trained_report = json.loads(files.test_report.read_text())
    assert trained_report == json.loads(json.dumps(shipped["report"])) and set(trained_report["conditions"]) == set(CONDITIONS)
    assert script_report["val_selection_score"] == trained_report["val_selection_score"]
    for c in CONDITIONS:
        assert script_report["conditions"][c]["per_patient_dice"] == pytest.approx(trained_report["conditions"][c]["per_patient_dice"], abs=0.02), c


def _cal(scores: list[float], fp: int, budget: float | None = None) -> Calibration:
    per_patient = {f"p{i}": v for i, v in enumerate(scores)}
    return Calibration(PostprocessConfig(), [], sum(scores) / len(scores), per_patient, fp, 1000, EVERY_CONDITION, budget)


def test_a_challenger_replaces_the_shipped_model_only_with_no_more_fp_and_a_gain_beyond_chance():
    shipped = _cal([0.70, 0.80, 0.60, 0.75], fp=20)
    better = champion_challenger(shipped, _cal([0.75, 0.85, 0.65, 0.80], fp=18, budget=0.020))
    assert better["replaces"] and better["gain"] == pytest.approx(0.05) and better["gain_ci95"] == [pytest.approx(0.05)] * 2
    assert (better["fp_slices"], better["fp_budget_slices"]) == (18, 20)
    # The same gain bought with false positives: calibrated under the budget, it could not get within it.
    more_fp = champion_challenger(shipped, _cal([0.75, 0.85, 0.65, 0.80], fp=30, budget=0.020))
    assert not more_fp["replaces"] and more_fp["reason"].startswith("more false positives")
    # A mean gain of 0 (+0.05, -0.05, +0.01, -0.01): noise.
    noise = champion_challenger(shipped, _cal([0.75, 0.75, 0.61, 0.74], fp=10, budget=0.020))
    assert not noise["replaces"] and "not beyond chance" in noise["reason"] and noise["gain_ci95"][0] < 0 < noise["gain_ci95"][1]


def test_the_guarded_script_keeps_the_shipped_model_against_a_worse_challenger(tiny_model_dir, tmp_path):
    """The default rules: the first candidate is the shipped model; a challenger that finds no lesion does not replace it.
    Both were calibrated with the FP pooled over every input condition, the challenger within the shipped model's rate."""
    torch.set_num_threads(1)
    data = synthetic_dataset(tmp_path / "data", patients=4, slices=4, size=64)
    split = split_patients([p.id for p in labelled(discover(data)).patients], 2, 1, seed=0)
    good = _candidate(tiny_model_dir / "unetpp.pt", tmp_path / "good" / "unetpp.pt", split)
    blind = _candidate(tiny_model_dir / "unetpp.pt", tmp_path / "blind" / "unetpp.pt", split, blind=True)
    out = tmp_path / "models"
    args = ["--data", str(data), "--out", str(out), "--candidates", f"unetpp={good},{blind}", "--brats-format", str(tmp_path / "none")]
    assert _ship_script().main(args) == 0
    chosen = json.loads((out / "shipping.json").read_text())["chosen"]["unetpp"]
    assert chosen["path"] == str(good)
    incumbent, challenger = chosen["considered"]
    assert incumbent["verdict"] is None and challenger["path"] == str(blind) and challenger["fp_slices"] == 0
    assert not challenger["verdict"]["replaces"] and challenger["verdict"]["gain"] < 0
    cal = load_checkpoint(out / "unetpp.pt")["calibration"]
    assert cal["fp_conditions"] == list(EVERY_CONDITION) and cal["fp_budget"] is None  # the shipped model: no budget of its own
    row = next(
        r
        for r in cal["table"]
        if (r["threshold"], r["min_size"], r["components_3d"]) == tuple(incumbent["post"][k] for k in ("threshold", "min_size", "components_3d"))
    )
    assert (row["fp_slices"], row["lesion_free_slices"]) == (incumbent["fp_slices"], cal["lesion_free_slices"]) and cal["lesion_free_slices"] > 0
    assert challenger["verdict"]["reason"] in (out / "unetpp.md").read_text()
