"""INT8 models: static quantisation of the tiny test models, and the precision option of the CLI.

The tiny models (``tiny_model_dir``) are calibrated on real LGG training slices (as the shipped
models are) and compared with their fp32 originals on slices of other patients and on the
synthetic blobs they were fitted to (where their masks are non-empty). A quantisation
calibrated on blank inputs is the control: the same tolerance must reject it.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from helpers import LGG, require, script

from brainseg.cli import main
from brainseg.config import EVERY_CONDITION
from brainseg.inference.backends import binarize
from brainseg.inference.predictor import load_segmenter
from brainseg.io.datasets import discover, labelled, load_patient
from brainseg.io.synthetic import synthetic_slice

pytest.importorskip("onnxruntime.quantization")

CALIBRATION_PATIENTS = 3  # the first patients of the folder; the comparison uses others
COMPARE_PATIENTS = slice(10, 12)
# fp32 vs INT8 probabilities of the same slices: the mean absolute difference over all pixels
# and the Dice overlap of the two masks. Measured on the tiny models: mean difference < 0.001,
# mask overlap > 0.998; calibrated on blank slices: mean difference 0.024, mask overlap 0.
MEAN_ABS_TOL = 0.005
MASK_DICE_MIN = 0.95


def _int8_dir(tiny_model_dir, tmp_path):
    """A copy of the tiny models' folder (the session fixture stays untouched)."""
    out = tmp_path / "models"
    shutil.copytree(tiny_model_dir, out)
    return out


def _compare_images():
    """Real slices of patients not used for calibration, and synthetic blob slices."""
    ds = labelled(discover(require(LGG)))
    real = [img for p in ds.patients[COMPARE_PATIENTS] for img in load_patient(p)[0][::4]]
    synthetic = [synthetic_slice(seed=s)[0] for s in range(20, 26)]
    return real, synthetic


def _conv_count(path) -> int:
    import onnx

    return sum(n.op_type == "Conv" for n in onnx.load(str(path)).graph.node)


def _int8_weights(path) -> int:
    """Weight tensors stored as int8 (QDQ: one per quantised Conv, each with per-channel scales)."""
    import onnx

    graph = onnx.load(str(path)).graph
    return sum(t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4 for t in graph.initializer)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def _agreement(fp32, int8, images) -> tuple[float, float]:
    pf, pq = np.stack(fp32.probabilities(images)), np.stack(int8.probabilities(images))
    masks_f = np.stack([binarize(p, fp32.postprocess) for p in pf])
    masks_q = np.stack([binarize(p, fp32.postprocess) for p in pq])
    return float(np.abs(pf - pq).mean()), _dice(masks_f, masks_q)


@pytest.fixture(scope="module")
def int8_models(tiny_model_dir, tmp_path_factory):
    """The tiny models' folder with X.int8.onnx beside each X.onnx (written by `brainseg export --int8`)."""
    from brainseg.inference.export import calibration_slice_paths

    require(LGG)
    out = _int8_dir(tiny_model_dir, tmp_path_factory.mktemp("int8"))
    ds = labelled(discover(LGG))
    split = out / "split.json"
    split.write_text(json.dumps({"train": [p.id for p in ds.patients[:CALIBRATION_PATIENTS]], "val": [], "test": []}))
    assert len(calibration_slice_paths(LGG, [p.id for p in ds.patients[:CALIBRATION_PATIENTS]])) >= 60
    for name in ("unetpp", "attention_unet"):
        rc = main(["export", "--checkpoint", str(out / f"{name}.onnx"), "--int8", "--data", str(LGG), "--split", str(split), "--calibration-slices", "60"])
        assert rc == 0
    return out


@pytest.mark.parametrize("name", ["unetpp", "attention_unet"])
def test_int8_probabilities_close_to_fp32(int8_models, name):
    fp32 = load_segmenter(int8_models / f"{name}.onnx")
    int8 = load_segmenter(int8_models / f"{name}.int8.onnx")
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    cal = int8.backend.calibration
    assert cal["slices"] == 60 and cal["patients"] == CALIBRATION_PATIENTS and sum(cal["conditions"].values()) == 60
    assert cal["conditions"]["flair_only"] > 0  # FLAIR copied into pre / post, as users send it
    assert _int8_weights(int8_models / f"{name}.int8.onnx") == _conv_count(int8_models / f"{name}.onnx")
    real, synthetic = _compare_images()
    mean_real, _ = _agreement(fp32, int8, real)
    mean_syn, dice_syn = _agreement(fp32, int8, synthetic)
    print(f"{name}: mean |p_fp32 - p_int8| real {mean_real:.5f}, synthetic {mean_syn:.5f}; mask Dice fp32 vs int8 {dice_syn:.4f}")
    assert mean_real < MEAN_ABS_TOL and mean_syn < MEAN_ABS_TOL
    masks = [binarize(p, fp32.postprocess) for p in fp32.probabilities(synthetic)]
    assert sum(m.sum() for m in masks) > 500  # the comparison has lesion pixels to agree on
    assert dice_syn > MASK_DICE_MIN


def test_tolerance_rejects_a_broken_quantisation(int8_models, tmp_path):
    """Calibrated on blank slices, activation ranges are wrong: the same check must fail."""
    from brainseg.inference.export import quantize_int8

    name = "attention_unet"
    fp32 = load_segmenter(int8_models / f"{name}.onnx")
    size = fp32.config.preprocess.input_size
    broken = quantize_int8(int8_models / f"{name}.onnx", np.zeros((20, 3, size, size), np.float32), out=tmp_path / "broken.int8.onnx", method="minmax")
    _, synthetic = _compare_images()
    mean_syn, dice_syn = _agreement(fp32, load_segmenter(broken), synthetic)
    print(f"blank calibration: mean |p_fp32 - p_int8| {mean_syn:.5f}, mask Dice {dice_syn:.4f}")
    assert mean_syn >= MEAN_ABS_TOL or dice_syn <= MASK_DICE_MIN


def test_precision_option_reaches_the_int8_file(int8_models, tmp_path):
    """`--precision int8` runs X.int8.onnx (registry entry or --checkpoint), and says so in the output."""
    from brainseg.inference.registry import read, write_registry

    reg = read(int8_models)
    for name, entry in reg.models.items():
        entry.onnx_int8 = f"{name}.int8.onnx"
    write_registry(int8_models, reg)
    img = synthetic_slice(seed=21)[0]
    src = tmp_path / "slice.png"
    import cv2

    cv2.imwrite(str(src), img[:, :, ::-1])
    runs = {
        "registry int8": ["--model-dir", str(int8_models), "--precision", "int8"],
        "registry fp32": ["--model-dir", str(int8_models)],
        "checkpoint int8": ["--checkpoint", str(int8_models / "unetpp.onnx"), "--precision", "int8"],
        "checkpoint .pt int8": ["--checkpoint", str(int8_models / "unetpp.pt"), "--precision", "int8"],
    }
    for label, args in runs.items():
        out = tmp_path / label.replace(" ", "_")
        assert main(["predict", str(src), "--out", str(out), *args]) == 0, label
        written = json.loads((out / "slice_lesions.json").read_text())
        assert written["precision"] == ("int8" if "int8" in label else "fp32"), label


def test_precision_int8_without_int8_file_is_a_clear_error(tiny_model_dir, tmp_path, capsys):
    src = tmp_path / "slice.png"
    import cv2

    cv2.imwrite(str(src), synthetic_slice(seed=1)[0])
    rc = main(["predict", str(src), "--out", str(tmp_path / "o"), "--checkpoint", str(tiny_model_dir / "unetpp.onnx"), "--precision", "int8"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert err.startswith("brainseg: error: ") and "unetpp.int8.onnx" in err and "--int8" in err and "\n" not in err
    rc = main(["evaluate", "--data", str(tmp_path), "--model-dir", str(tiny_model_dir), "--precision", "int8", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "INT8" in err and "\n" not in err


def test_ship_int8_registers_int8_with_its_dice_cost(tiny_model_dir, tmp_path, capsys):
    """scripts/ship_int8.py on the tiny models, 2 calibration and 2 test patients: files, registry, card, printout."""

    from brainseg.inference.registry import read

    require(LGG)
    ship = script("ship_int8.py")
    models = _int8_dir(tiny_model_dir, tmp_path)
    ids = [p.id for p in labelled(discover(LGG)).patients]
    (models / "split.json").write_text(json.dumps({"train": ids[:3], "val": ids[3:4], "test": ids[10:13]}))
    assert ship.main(["--data", str(LGG), "--model-dir", str(models), "--limit", "2", "--calibration-slices", "40"]) == 0
    out = capsys.readouterr().out
    reg = read(models)
    for name in ("unetpp", "attention_unet"):
        entry = reg.entry(name)
        assert entry.onnx_int8 == f"{name}.int8.onnx" and (models / entry.onnx_int8).is_file()
        block = entry.int8
        assert block["calibration"]["patients"] == 2 and block["calibration"]["slices"] == 40 and block["test_patients"] == 2
        assert set(block["test"]) == set(EVERY_CONDITION)
        for r in block["test"].values():
            assert r["drop"] == pytest.approx(r["fp32"] - r["int8"], abs=2e-4)
        holds = all(r["drop"] <= ship.MAX_DROP for r in block["test"].values())
        assert entry.default_precision == ("int8" if holds else "fp32")
        card = (models / f"{name}.md").read_text()
        assert card.count("<!-- int8 -->") == 1 and "| flair_only |" in card
    assert "flair_only" in out and "default precision" in out
    # Run again: the card keeps one INT8 section.
    assert ship.main(["--data", str(LGG), "--model-dir", str(models), "--limit", "2", "--calibration-slices", "40", "--models", "unetpp"]) == 0
    assert (models / "unetpp.md").read_text().count("<!-- int8 -->") == 1
