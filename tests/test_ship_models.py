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

from brainseg.config import CONDITIONS, EVERY_CONDITION
from brainseg.inference import registry
from brainseg.inference.export import ONNX_METADATA_KEY
from brainseg.io.datasets import discover, labelled, split_patients
from brainseg.models.checkpoint import load_checkpoint, save_checkpoint
from brainseg.pipeline import RunFiles, finish_run


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
    args = ["--data", str(data), "--out", str(out), "--candidates", f"unetpp={blind},{good}", "--brats-format", str(root / "none")]
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
