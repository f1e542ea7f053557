"""Turn a training run into the shipped models: weights, ONNX, registry, model cards, figures.

    python scripts/ship_models.py runs/main --data ../shared/data/lgg/kaggle_3m --out models

For each model of the run: copies ``best.pt`` (weights + resolved config, no optimizer),
exports ONNX, evaluates both the ONNX model and the PyTorch model on the run's test
patients (checking that their masks agree), then evaluates the ensemble, picks the default
by per-patient Dice on those test patients, and writes ``registry.json``, one model card per
model, ``results.md`` (all models side by side) and a figure of test slices.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from brainseg import __version__
from brainseg.checkpoint import load_checkpoint, save_checkpoint
from brainseg.config import ExperimentConfig
from brainseg.data import discover, labelled, write_json_atomic
from brainseg.evaluation import PROTOCOLS, binarize_volume, evaluate_predictions, markdown_table, predict_patients
from brainseg.export import export_onnx
from brainseg.inference import Ensemble, Segmenter, TorchBackend, load_segmenter
from brainseg.metrics import dice
from brainseg.models import DISPLAY_NAMES
from brainseg.registry import write_registry

PAPERS = {
    "unetpp": "Zhou Z., Siddiquee M.M.R., Tajbakhsh N., Liang J. *UNet++: A Nested U-Net Architecture for Medical Image Segmentation.* DLMIA 2018 (arXiv:1807.10165).",
    "attention_unet": "Oktay O., Schlemper J., Le Folgoc L., et al. *Attention U-Net: Learning Where to Look for the Pancreas.* MIDL 2018 (arXiv:1804.03999).",
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--command", default="", help="the exact training command, for the model cards")
    a = ap.parse_args()

    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    ds = labelled(discover(a.data))
    names = [n for n in ("unetpp", "attention_unet") if (a.run / n / "best.pt").is_file()]
    first = load_checkpoint(a.run / names[0] / "best.pt")
    split = first["split"]
    test = [ds.patient(p) for p in split["test"]]

    reports, entries, agreement, members = {}, {}, {}, []
    for name in names:
        ckpt = load_checkpoint(a.run / name / "best.pt")
        assert ckpt["split"] == split, "models of one run share one split"
        ckpt.pop("optimizer", None)
        save_checkpoint(out / f"{name}.pt", ckpt)
        export_onnx(out / f"{name}.pt", out / f"{name}.onnx")
        shutil.copy2(a.run / name / "training_curves.png", out / f"{name}_training_curves.png")

        onnx_seg = load_segmenter(out / f"{name}.onnx", name)
        torch_seg = Segmenter(TorchBackend(checkpoint=ckpt, device="cpu"), name)
        post = onnx_seg.postprocess
        t0 = time.time()
        preds = predict_patients(onnx_seg, test)
        onnx_seconds = time.time() - t0
        torch_preds = predict_patients(torch_seg, test)
        agreement[name] = float(np.mean([dice(binarize_volume(p.prob, post), binarize_volume(q.prob, post)) for p, q in zip(preds, torch_preds)]))
        reports[name] = evaluate_predictions(preds, post)
        reports[name]["onnx_vs_torch_mask_dice"] = agreement[name]
        reports[name]["onnx_predict_seconds_test_set"] = round(onnx_seconds, 1)
        members.append(onnx_seg)
        entries[name] = {
            "checkpoint": f"{name}.pt",
            "onnx": f"{name}.onnx",
            "card": f"{name}.md",
            "parameters": ckpt["info"]["parameters"],
            "metrics": {k: reports[name][k] for k in ("per_patient_dice", "positive_slice_dice", "fp_slice_rate", "lesion_sensitivity", "hd95")},
        }
        write_json_atomic(out / f"{name}_test_report.json", reports[name])

    ens = Ensemble(members)
    ens_preds = predict_patients(ens, test)
    reports["ensemble"] = evaluate_predictions(ens_preds, ens.postprocess)
    write_json_atomic(out / "ensemble_test_report.json", reports["ensemble"])

    default = max(names, key=lambda n: reports[n]["per_patient_dice"])
    write_registry(out, {
        "default": default,
        "selected_by": f"per-patient 3D Dice on the {len(test)} test patients of the split (never trained, tuned or thresholded on)",
        "brainseg_version": __version__,
        "split": {k: split[k] for k in ("train", "val", "test")},
        "ensemble": {"metrics": {k: reports["ensemble"][k] for k in ("per_patient_dice", "positive_slice_dice", "fp_slice_rate", "lesion_sensitivity", "hd95")}, "postprocess": {"threshold": ens.postprocess.threshold, "min_size": ens.postprocess.min_size}},
        "models": entries,
    })
    table = markdown_table({DISPLAY_NAMES[n]: reports[n] for n in [*names, "ensemble"]})
    split_note = f"Split (seed {split.get('seed', 42)}, by patient, stratified by institution): {len(split['train'])} train, {len(split['val'])} validation, {len(split['test'])} test patients."
    (out / "results.md").write_text(f"# Test-set results of the shipped models\n\n{split_note}\n\nDefault model: **{DISPLAY_NAMES[default]}** (`{default}`).\n\n{table}\n")
    figure = out / "test_examples.png"
    make_figure(test, members, figure)
    for name in names:
        ckpt = load_checkpoint(out / f"{name}.pt")
        card = model_card(name, ckpt, reports[name], split, agreement[name], a.command, default == name, out)
        (out / f"{name}.md").write_text(card)
    print(table)
    print(f"default: {default}; ONNX vs PyTorch mask Dice: " + ", ".join(f"{n} {v:.4f}" for n, v in agreement.items()))
    return 0


def make_figure(test_patients, members, path: Path, n: int = 4) -> None:
    """Input (FLAIR), ground truth and each model's prediction for a few test slices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainseg.data import load_patient
    from brainseg.inference import binarize
    from brainseg.visualize import display_channel, overlay

    rng = np.random.default_rng(0)
    picks = []
    for p in test_patients:
        images, truth = load_patient(p)
        areas = truth.reshape(len(truth), -1).sum(1)
        if areas.max() == 0:
            continue
        z = int(np.argmax(areas))
        picks.append((p.id, images[z], truth[z]))
    picks = [picks[i] for i in sorted(rng.choice(len(picks), min(n, len(picks)), replace=False))]
    cols = 2 + len(members)
    fig, axes = plt.subplots(len(picks), cols, figsize=(2.6 * cols, 2.7 * len(picks)), dpi=90)
    axes = np.atleast_2d(axes)
    for r, (pid, img, truth) in enumerate(picks):
        panels = [("input (FLAIR)", display_channel(img)), ("ground truth", overlay(display_channel(img), truth, color=(40, 220, 40)))]
        for m in members:
            prob = m.probabilities([img])[0]
            pred = binarize(prob, m.postprocess)
            panels.append((f"{DISPLAY_NAMES[m.name]} (Dice {dice(pred, truth):.2f})", overlay(display_channel(img), pred)))
        for c, (title, im) in enumerate(panels):
            axes[r, c].imshow(im)
            axes[r, c].set_title(title, fontsize=8)
            axes[r, c].axis("off")
        axes[r, 0].text(2, 12, pid, color="yellow", fontsize=6)
    fig.suptitle("Test patients (never trained on): largest-lesion slice of each", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))


def model_card(name: str, ckpt: dict, report: dict, split: dict, agreement: float, command: str, is_default: bool, out: Path) -> str:
    cfg = ExperimentConfig.from_dict(ckpt["config"])
    hist = ckpt.get("history", [])
    best_epoch = max(hist, key=lambda r: r.get("val_dice", -1))["epoch"] if hist else None
    wall = ckpt["info"].get("train_wall_seconds")
    cal = ckpt.get("calibration", {})
    cal_rows = "\n".join(f"| {r['threshold']} | {r['min_size']} | {r['per_patient_dice']:.3f} | {_fmt(r['fp_slice_rate'])} |" for r in cal.get("table", []))
    metric_rows = "\n".join(f"| {k} | {_fmt(report.get(k))} | {PROTOCOLS[k]} |" for k in PROTOCOLS)
    size_rows = "\n".join(f"| {label} | {b['lesions']} | {_fmt(b['sensitivity'])} | {_fmt(b['lesion_dice'])} |" for label, b in report["by_lesion_size_voxels"].items())
    per_patient = "\n".join(f"| {pid} | {d:.3f} |" for pid, d in report["per_patient"].items())
    return f"""# Model card: {DISPLAY_NAMES[name]} (`{name}`){' (default model)' if is_default else ''}

## Summary
2D {DISPLAY_NAMES[name]} that segments the FLAIR abnormality of lower-grade glioma in axial brain MRI
slices (3 channels: pre-contrast T1, FLAIR, post-contrast T1). Trained by this project's own
`brainseg train`. **Research software, not a medical device.**

Per-patient 3D Dice on {report['patients']} test patients: **{report['per_patient_dice']:.3f}**
(median {report['per_patient_dice_median']:.3f}, std {report['per_patient_dice_std']:.3f}).

## Architecture
{PAPERS[name]}

- widths per level {list(cfg.model.features)}, {len(cfg.model.features)} levels, BatchNorm + ReLU, bilinear upsampling;
  deep supervision: {cfg.model.deep_supervision}; returns logits.
- parameters: {ckpt['info']['parameters']:,}
- files: `{name}.pt` (PyTorch weights + resolved configuration), `{name}.onnx` (ONNX Runtime,
  configuration embedded as metadata). Masks of the two agree with mean per-patient Dice
  **{agreement:.4f}** on the test patients.

## Data
LGG MRI Segmentation (kaggle_3m): 56 of the 110 TCGA-LGG patients available to the project
(axial slices 256x256, expert masks of the FLAIR abnormality).
Buda M., Saha A., Mazurowski M.A. *Association of genomic subtypes of lower-grade gliomas with
shape features automatically extracted by a deep learning algorithm.* Computers in Biology and
Medicine, 2019. Mazurowski M.A. et al. *Radiogenomics of lower-grade glioma: algorithmically-assessed
tumor shape is associated with tumor genomic subtypes and patient outcomes in a multi-institutional
study with The Cancer Imaging Archive.* Journal of Neuro-Oncology, 2017. Images from TCIA (TCGA-LGG).

### Split (by patient, seeded {split.get('seed', 42)}, stratified by institution)
- train ({len(split['train'])}): {', '.join(split['train'])}
- validation ({len(split['val'])}, model selection and threshold calibration): {', '.join(split['val'])}
- test ({len(split['test'])}, never trained, tuned or thresholded on): {', '.join(split['test'])}

## Preprocessing (saved in the model; `brainseg.preprocessing.preprocess_slice`)
whole slice -> CLAHE per channel (clip {cfg.preprocess.clahe_clip_limit}, grid {cfg.preprocess.clahe_tile_grid}x{cfg.preprocess.clahe_tile_grid}, on={cfg.preprocess.clahe})
-> resize to {cfg.preprocess.input_size}x{cfg.preprocess.input_size} (area) -> {cfg.preprocess.normalization} normalisation over the whole slice.
Probabilities are resized back (bilinear) to the input's size before thresholding.

## Training
- command: `{command or 'see README'}`
- seed {cfg.train.seed}; {cfg.train.epochs} epochs of {len(hist) and hist[0]['step']} steps, batch {cfg.train.batch_size},
  {int(cfg.train.positive_fraction * 100)}% lesion-positive slices per epoch (foreground-aware sampling);
  loss BCE + soft Dice; AdamW (lr {cfg.train.lr}, weight decay {cfg.train.weight_decay}), linear warm-up {cfg.train.warmup_epochs} epoch then cosine decay;
  augmentation (albumentations): flips, affine (rotation +-{cfg.augment.rotate} deg, scale +-{cfg.augment.scale}, shift), elastic, brightness/contrast, gamma, Gaussian noise.
- best epoch by validation per-patient Dice (at network resolution): {best_epoch}
- hardware: CPU only, 2 cores (no GPU was available to this run); wall time {f'{wall / 60:.1f} min' if wall else 'n/a'}
- code: brainseg {ckpt['info'].get('brainseg_version')}, torch {ckpt['info'].get('torch')}

![training curves]({name}_training_curves.png)

## Threshold calibration (validation patients only)
Chosen: probability >= **{cfg.postprocess.threshold}**, components smaller than **{cfg.postprocess.min_size}** px removed.

| threshold | min size (px) | val per-patient Dice | val FP-slice rate |
|---|---|---|---|
{cal_rows}

## Test results ({report['patients']} patients, {report['slices']} slices, ONNX model)
| metric | value | protocol |
|---|---|---|
{metric_rows}

Lesion-wise by lesion size (3D components, voxels at native resolution):

| size | lesions | sensitivity | lesion Dice |
|---|---|---|---|
{size_rows}

Per patient (3D Dice):

| patient | Dice |
|---|---|
{per_patient}

## Known limits
- Trained on lower-grade glioma FLAIR abnormality from 5 TCGA institutions, 40 training patients. Brain
  metastases look different (ring enhancement, oedema) and are often much smaller than these lesions;
  on metastasis data (e.g. BraTS-METS) the output is only a starting point and has not been validated.
- 2D, slice by slice, at {cfg.preprocess.input_size}x{cfg.preprocess.input_size}: lesions of a few pixels at 256x256 are at the limit of what it can see.
- 10 test patients give a wide confidence interval (per-patient Dice std {report['per_patient_dice_std']:.3f}); the held-out
  patients of the dataset will measure it independently.
- Not a medical device; not for diagnosis.
"""


if __name__ == "__main__":
    sys.exit(main())
