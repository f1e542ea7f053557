"""The shipped default model on real slices of its own test patients (never trained on)."""

import base64
import json
import subprocess
import sys

import cv2
import httpx
import numpy as np
import pytest
from helpers import LGG, REPO, require

from brainseg.config import EVERY_CONDITION
from brainseg.evaluation.metrics import dice
from brainseg.inference import predictor, registry
from brainseg.inference.backends import Segmenter, TorchBackend, binarize
from brainseg.io.datasets import discover, labelled, load_patient

MODELS = REPO / "models"


@pytest.fixture(scope="module")
def reg():
    assert (MODELS / "registry.json").is_file(), "the shipped models are part of the repository: models/registry.json is missing"
    return registry.read(MODELS)


@pytest.fixture(scope="module")
def test_patient(reg):
    ds = labelled(discover(require(LGG)))
    pid = sorted(reg.split["test"])[0]
    images, truth = load_patient(ds.patient(pid))
    return pid, images, truth


def _lesion_free_slice(truth: np.ndarray) -> int:
    """The lesion-free slice nearest the middle of the stack, at least 5 slices from any lesion."""
    positive = np.flatnonzero(truth.reshape(len(truth), -1).any(1))
    mid = len(truth) // 2
    candidates = [z for z in range(len(truth)) if np.abs(positive - z).min() >= 5]
    return min(candidates, key=lambda z: abs(z - mid))


def test_registry_names_both_models_and_a_default(reg):
    assert set(reg.models) == {"unetpp", "attention_unet"}
    assert reg.default in reg.models
    for entry in reg.models.values():
        for key in ("checkpoint", "onnx", "card"):
            f = MODELS / getattr(entry, key)
            assert f.is_file() and f.stat().st_size < 25 * 2**20, f
    # the default is chosen on the validation patients, never on the test patients
    best = max(reg.models, key=lambda n: reg.models[n].val_selection_score)
    assert reg.default == best and "validation" in reg.selected_by
    for entry in reg.models.values():
        assert set(entry.conditions) == set(EVERY_CONDITION)


def test_default_finds_the_lesion_and_nothing_on_a_lesion_free_slice(reg, test_patient):
    pid, images, truth = test_patient
    seg = predictor.load(model_dir=MODELS)
    assert seg.name == reg.default and seg.backend.kind == "onnx"
    z_pos = int(np.argmax(truth.reshape(len(truth), -1).sum(1)))
    pred = binarize(seg.probabilities([images[z_pos]])[0], seg.postprocess)
    assert dice(pred, truth[z_pos]) > 0.5, f"{pid} slice {z_pos + 1}"
    z_neg = _lesion_free_slice(truth)
    assert not truth[z_neg].any()
    assert not binarize(seg.probabilities([images[z_neg]])[0], seg.postprocess).any(), f"{pid} slice {z_neg + 1}"


@pytest.mark.parametrize("name", ["unetpp", "attention_unet"])
def test_onnx_and_pytorch_give_the_same_masks(reg, test_patient, name):
    _, images, truth = test_patient
    onnx_seg = predictor.load(name, model_dir=MODELS)
    torch_seg = Segmenter(TorchBackend(MODELS / reg.entry(name).checkpoint, device="cpu"), name)
    zs = np.flatnonzero(truth.reshape(len(truth), -1).any(1))[:8]
    batch = [images[z] for z in zs]
    a = np.stack([binarize(p, onnx_seg.postprocess) for p in onnx_seg.probabilities(batch)])
    b = np.stack([binarize(p, torch_seg.postprocess) for p in torch_seg.probabilities(batch)])
    assert dice(a, b) >= 0.99


@pytest.fixture(scope="module")
def grey_flair_png(test_patient, tmp_path_factory):
    """The FLAIR channel of the test patient's largest-lesion slice, saved as a one-channel PNG."""
    pid, images, truth = test_patient
    z = int(np.argmax(truth.reshape(len(truth), -1).sum(1)))
    path = tmp_path_factory.mktemp("grey") / f"{pid}_{z + 1}_flair.png"
    cv2.imwrite(str(path), np.ascontiguousarray(images[z][:, :, 1]))
    assert cv2.imread(str(path), cv2.IMREAD_UNCHANGED).ndim == 2
    return path, truth[z]


def test_default_finds_the_lesion_on_a_grey_flair_image_through_predict(grey_flair_png, tmp_path):
    path, truth = grey_flair_png
    out = tmp_path / "out"
    subprocess.run(
        [sys.executable, "-m", "brainseg.cli", "predict", str(path), "--out", str(out), "--model-dir", str(MODELS)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    mask = cv2.imread(str(out / f"{path.stem}_mask.png"), cv2.IMREAD_UNCHANGED) > 0
    assert dice(mask, truth) > 0.5
    info = json.loads((out / f"{path.stem}_lesions.json").read_text())
    assert "flair" in json.dumps(info).lower()


def test_default_finds_the_lesion_on_a_grey_flair_image_through_the_api(grey_flair_png, tmp_path):
    from conftest import start_api, stop

    path, truth = grey_flair_png
    url, proc, log = start_api(MODELS, tmp_path / "uvicorn.log")
    try:
        r = httpx.post(url + "/v1/segment", files={"files": (path.name, path.read_bytes(), "image/png")}, timeout=120)
    finally:
        stop(proc)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["input"]["condition"] == "flair_only"
    seg = predictor.load(model_dir=MODELS)
    assert body["tta"] == seg.with_tta(None)  # the shipped default (flip TTA for the Attention U-Net), at its own calibration
    post = seg.postprocess_for(body["tta"])
    assert body["min_size"] == (post.slice_min_size if post.slice_min_size is not None else post.min_size) and body["components"] == "2D"
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED) > 0
    assert dice(mask, truth) > 0.5
