"""Turn trained checkpoints into the shipped models: weights, ONNX, registry, model cards, figures.

    python scripts/ship_models.py --data ../shared/data/lgg/kaggle_3m --out models \
        --candidates attention_unet=runs/gpu/att_sd30.pt,runs/ship/attention_unet/best.pt \
                     unetpp=runs/gpu/upp_sd30.pt,runs/ship/unetpp/best.pt

For each architecture, every candidate checkpoint (e.g. the GPU run and its CPU continuation)
is calibrated on the validation patients (threshold, minimum component size, 2D / 3D
components; complete input, FLAIR only, skull stripped). The first candidate is the shipped
model (the incumbent); another replaces it only under ``pipeline.champion_challenger``'s rules,
on the validation patients: calibrated to no more false-positive slices than the incumbent
(pooled over every input condition), it must still gain beyond chance (95% bootstrap interval of
the paired per-patient gain above 0); among those, the highest validation score ships
(``--no-guard``: the highest validation score, whatever its FP). ``pipeline.finish_run``, the flow of ``brainseg train``, with this script's files
(``RunFiles.shipped``) and test report (``shipped_evaluation``). Then: ONNX export, evaluation of the ONNX model on the test patients under the four
input conditions with 95% bootstrap intervals, the PyTorch model on the same patients (the
two must agree), the ensemble, the default chosen on validation, ``registry.json``, one model
card per model, ``results.md`` and a figure of test slices.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from brainseg import __version__
from brainseg.config import DISPLAY_NAMES, EVERY_CONDITION, SPLIT_SEED, ExperimentConfig
from brainseg.display.visualize import save_figure
from brainseg.evaluation.protocol import CONDITION_NAMES, PROTOCOLS, conditions_table, evaluate_predictions, markdown_table, mean_predictions, predict_patients
from brainseg.inference.backends import Ensemble, Segmenter, TorchBackend
from brainseg.inference.predictor import load_segmenter
from brainseg.inference.registry import EnsembleEntry, Registry, write_registry
from brainseg.io.datasets import discover, labelled
from brainseg.io.files import write_json_atomic, write_text_atomic
from brainseg.models.checkpoint import load_checkpoint
from brainseg.pipeline import SELECTED_BY, RunFiles, condition_summary, finish_run

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_brats_format import brats_format_scores

CONDS = EVERY_CONDITION  # the four channel conditions and the three of other hospitals' data (skull stripped, BraTS-like)
BRATS_FORMAT = Path("../shared/data/brats-format")
REGISTRY_METRICS = ("per_patient_dice", "positive_slice_dice", "fp_slice_rate", "lesion_sensitivity", "hd95")

PAPERS = {
    "unetpp": "Zhou Z., Siddiquee M.M.R., Tajbakhsh N., Liang J. "
    "*UNet++: A Nested U-Net Architecture for Medical Image Segmentation.* DLMIA 2018 (arXiv:1807.10165).",
    "attention_unet": "Oktay O., Schlemper J., Le Folgoc L., et al. *Attention U-Net: Learning Where to Look for the Pancreas.* MIDL 2018 (arXiv:1804.03999).",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", type=Path, default=Path("models"))
    ap.add_argument("--candidates", nargs="+", required=True, help="NAME=CKPT[,CKPT...] per architecture")
    ap.add_argument("--training-note", default="", help="how the candidates were trained, for the model cards")
    ap.add_argument("--limit", type=int, default=0, help="smoke test: only this many validation and test patients")
    ap.add_argument("--no-guard", action="store_true", help="ship the highest validation score, without the FP and chance rules for the first candidate")
    ap.add_argument("--brats-format", type=Path, default=BRATS_FORMAT, help="LGG patients in BraTS format with reference masks (skipped if absent)")
    a = ap.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("brainseg.pipeline").setLevel(logging.INFO)  # each candidate's validation score

    out: Path = a.out
    out.mkdir(parents=True, exist_ok=True)
    ds = labelled(discover(a.data))
    candidates = {k: v.split(",") for k, v in (c.split("=", 1) for c in a.candidates)}
    names = list(candidates)
    split = load_checkpoint(candidates[names[0]][0])["split"]
    val = [ds.patient(p) for p in split["val"]][: a.limit or None]
    test = [ds.patient(p) for p in split["test"]][: a.limit or None]

    reports, entries, members, chosen, test_preds = {}, {}, [], {}, {}
    for name in names:
        measured = {}
        reports[name], entries[name] = finish_run(
            out,
            name,
            split,
            val,
            test,
            {},
            candidates=candidates[name],
            files=RunFiles.shipped(out, name),
            evaluate=shipped_evaluation(name, test, a.brats_format, measured),
            metrics=REGISTRY_METRICS,
            device="cpu",
            guard=not a.no_guard,
        )
        shipped_ckpt = load_checkpoint(out / f"{name}.pt")
        info, guard = shipped_ckpt["info"], shipped_ckpt["calibration"].get("candidates")
        chosen[name] = {"path": info["shipped_from"], "val_score": entries[name].val_selection_score, "candidates": list(candidates[name]), "considered": guard}
        curves = Path(info["shipped_from"]).parent / "training_curves.png"
        if curves.is_file():
            shutil.copy2(curves, out / f"{name}_training_curves.png")
        onnx_seg, test_preds[name], by_cond = measured["onnx"], measured["preds"], measured["by_cond"]
        members.append(onnx_seg)
        entries[name].card, entries[name].parameters, entries[name].conditions = f"{name}.md", info["parameters"], registry_conditions(by_cond)

    ens = Ensemble(members)
    ens_by_cond = {c: evaluate_predictions(mean_predictions([test_preds[n][c] for n in names]), ens.postprocess) for c in CONDS}
    reports["ensemble"] = dict(ens_by_cond["all"])
    reports["ensemble"]["conditions"] = {c: condition_summary(r) for c, r in ens_by_cond.items()}
    write_json_atomic(out / "ensemble_test_report.json", reports["ensemble"])

    default = max(names, key=lambda n: chosen[n]["val_score"])
    write_registry(
        out,
        Registry(
            default=default,
            selected_by=SELECTED_BY,
            brainseg_version=__version__,
            split={k: split[k] for k in ("train", "val", "test")},
            ensemble=EnsembleEntry(
                metrics={k: reports["ensemble"][k] for k in REGISTRY_METRICS},
                conditions=registry_conditions(ens_by_cond),
                postprocess=ens.postprocess,
            ),
            models=entries,
        ),
    )
    write_json_atomic(out / "split.json", {**{k: split[k] for k in ("train", "val", "test")}, "seed": split.get("seed", SPLIT_SEED)})
    labels = {DISPLAY_NAMES[n]: reports[n] for n in [*names, "ensemble"]}
    table = markdown_table(labels)
    cond_table = conditions_table({k: v["conditions"] for k, v in labels.items()})
    split_note = (
        f"Split (seed {split.get('seed', SPLIT_SEED)}, by patient, stratified by institution): "
        f"{len(split['train'])} train, {len(split['val'])} validation, {len(split['test'])} test patients."
    )
    write_text_atomic(
        out / "results.md",
        f"# Test-set results of the shipped models\n\n{split_note}\n\nDefault model: **{DISPLAY_NAMES[default]}** (`{default}`), {SELECTED_BY}.\n\n"
        f"## Under every input condition\n\nPer-patient 3D Dice [95% bootstrap interval]; FP = share of lesion-free slices with any predicted lesion; "
        "empty = patients with a lesion over 10,000 voxels and an empty prediction. "
        "A missing sequence is given as a copy of FLAIR, as the dataset stores it. Skull stripped = `preprocessing.brain_mask` "
        "(threshold, erosion, largest component, fill) applied to the raw slice; BraTS-like = skull stripped and the brain shrunk to 0.78 "
        f"of its size in the canvas (a 240 mm field of view at 1 mm), the prediction mapped back before scoring.\n\n{cond_table}\n"
        f"{brats_format_section({DISPLAY_NAMES[n]: reports[n] for n in names})}"
        f"## Every metric, all three sequences\n\n{table}\n",
    )
    make_figure(test, members, out / "test_examples.png")
    for name in names:
        card = model_card(name, load_checkpoint(out / f"{name}.pt"), reports[name], split, a.training_note, default == name, chosen[name])
        write_text_atomic(out / f"{name}.md", card)
    write_json_atomic(out / "shipping.json", {"chosen": chosen, "default": default})
    print(cond_table)
    print(table)
    print(
        f"default: {default}; ONNX vs PyTorch per-patient Dice difference: "
        + ", ".join(f"{n} {reports[n]['onnx_vs_torch_dice_difference']:.4f}" for n in names)
    )
    return 0


def shipped_evaluation(name: str, test, brats_format: Path, measured: dict):
    """``finish_run``'s test report for a shipped model: the ONNX model on the test patients under every input condition
    (timed), the PyTorch model with all sequences (the two must agree), the BraTS-format pair when it is there.
    ``measured`` receives the ONNX model, its predictions and the per-condition reports (for the ensemble and the registry)."""

    def evaluate(_calibrated_seg, files: RunFiles, post, score: float) -> dict:
        onnx_seg = load_segmenter(files.onnx, name)
        torch_seg = Segmenter(TorchBackend(checkpoint=load_checkpoint(files.checkpoint), device="cpu"), name)
        t0 = time.time()
        preds = {c: predict_patients(onnx_seg, test, condition=c) for c in CONDS}
        onnx_seconds = time.time() - t0
        by_cond = {c: evaluate_predictions(p, post) for c, p in preds.items()}
        torch_report = evaluate_predictions(predict_patients(torch_seg, test), post)
        report = dict(by_cond["all"])
        report["conditions"] = {c: condition_summary(r) for c, r in by_cond.items()}
        report["val_selection_score"] = score
        report["onnx_per_patient_dice"] = by_cond["all"]["per_patient_dice"]
        report["torch_per_patient_dice"] = torch_report["per_patient_dice"]
        report["onnx_vs_torch_dice_difference"] = abs(by_cond["all"]["per_patient_dice"] - torch_report["per_patient_dice"])
        report[f"onnx_predict_seconds_test_set_{len(CONDS)}_conditions"] = round(onnx_seconds, 1)
        if brats_format.is_dir():
            report["brats_format"] = brats_format_scores(onnx_seg, brats_format)
        measured.update(onnx=onnx_seg, preds=preds, by_cond=by_cond)
        return report

    return evaluate


def brats_format_section(reports: dict[str, dict]) -> str:
    """The same LGG patients in BraTS format (skull-stripped, 1 mm, atlas space) against their kaggle_3m slices."""
    rows = []
    for label, r in reports.items():
        for case, res in (r.get("brats_format") or {}).items():
            rows.append(
                f"| {label} | {case} | {res['all']['dice']:.3f} (precision {res['all']['precision']:.2f}, recall {res['all']['recall']:.2f}) "
                f"| {res['flair_only']['dice']:.3f} | {res['all']['pred_ml']:.1f} / {res['all']['ref_ml']:.1f} |"
            )
    if not rows:
        return ""
    return (
        "## The same patients in BraTS format\n\n`../shared/data/brats-format`: two of the LGG patients (they may be in the training split: this measures "
        "what a change of format costs, not generalisation) registered to the SRI-24 atlas, 1 mm, skull-stripped; reference = fusion of five BraTS "
        "algorithms, whole tumour. Volume read as `brainseg predict` reads a BraTS set, mask compared on the file's grid "
        "(`python scripts/eval_brats_format.py`).\n\n| Model | case | Dice, t1n + t2f + t1c | Dice, t2f only | predicted / reference mL |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n"
    )


def registry_conditions(by_cond: dict[str, dict]) -> dict[str, dict]:
    """What the registry keeps of each input condition's report."""
    return {c: {k: by_cond[c][k] for k in ("per_patient_dice", "per_patient_dice_ci95", "fp_slice_rate")} for c in CONDS}


def make_figure(test_patients, members, path: Path, n: int = 4) -> None:
    """Input (FLAIR), ground truth, each model with all sequences, and the default model on FLAIR alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from brainseg.display.visualize import display_channel, overlay
    from brainseg.evaluation.metrics import dice
    from brainseg.inference.backends import binarize
    from brainseg.io.datasets import load_patient
    from brainseg.preprocessing import apply_condition

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
    cols = 2 + 2 * len(members)
    fig, axes = plt.subplots(len(picks), cols, figsize=(2.4 * cols, 2.6 * len(picks)), dpi=90)
    axes = np.atleast_2d(axes)
    for r, (pid, img, truth) in enumerate(picks):
        panels = [("input (FLAIR)", display_channel(img)), ("ground truth", overlay(display_channel(img), truth, color=(40, 220, 40)))]
        for cond, label in (("all", "all 3"), ("flair_only", "FLAIR only")):
            for m in members:
                prob = m.probabilities([apply_condition(img, cond)])[0]
                pred = binarize(prob, m.postprocess)
                panels.append((f"{DISPLAY_NAMES[m.name]}, {label}\nDice {dice(pred, truth):.2f}", overlay(display_channel(img), pred)))
        for c, (title, im) in enumerate(panels):
            axes[r, c].imshow(im)
            axes[r, c].set_title(title, fontsize=7)
            axes[r, c].axis("off")
        axes[r, 0].text(2, 12, pid, color="yellow", fontsize=6)
    fig.suptitle(
        "Test patients (never trained or tuned on): largest-lesion slice of each; 'FLAIR only' = the grey FLAIR image in all three channels", fontsize=8
    )
    fig.tight_layout()
    save_figure(fig, path)


def _guard_lines(chosen: dict) -> str:
    """The model card's lines on the shipping rules (``pipeline.champion_challenger``): each challenger's verdict."""
    considered = chosen.get("considered")
    if not considered:
        return ""
    lines = [f"; the first is the model shipped before (validation FP {considered[0]['fp_slices']} slices over every input condition)"]
    lines += [f"\n  - `{c['path']}`: {c['verdict']['reason']}" for c in considered[1:]]
    return "".join(lines)


def _fmt(v) -> str:
    return "n/a" if v is None or (isinstance(v, float) and np.isnan(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))


def _ci(r: dict, key: str) -> str:
    ci = r.get(f"{key}_ci95")
    return f"{_fmt(r.get(key))} [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and not np.isnan(ci[0]) else _fmt(r.get(key))


def model_card(name: str, ckpt: dict, report: dict, split: dict, training_note: str, is_default: bool, chosen: dict) -> str:
    cfg = ExperimentConfig.from_dict(ckpt["config"])
    hist = ckpt.get("history", [])
    cal = ckpt.get("calibration", {})
    top = sorted(cal.get("table", []), key=lambda r: -r["per_patient_dice"])[:8]
    cal_conds = cal.get("conditions", ["all", "flair_only"])
    cal_head = "| threshold | min size | components | " + " | ".join(f"val Dice, {CONDITION_NAMES[c]}" for c in cal_conds) + " | val FP-slice rate, all |"
    cal_rows = "\n".join(
        f"| {r['threshold']} | {r['min_size']} | {'3D' if r['components_3d'] else '2D'} | "
        + " | ".join(f"{r[f'dice_{c}']:.3f}" for c in cal_conds)
        + f" | {_fmt(r['fp_slice_rate_all'])} |"
        for r in top
    )
    metric_rows = "\n".join(f"| {k} | {_ci(report, k)} | {PROTOCOLS[k]} |" for k in PROTOCOLS)
    size_rows = "\n".join(
        f"| {label} | {b['lesions']} | {_fmt(b['sensitivity'])} | {_fmt(b['lesion_dice'])} |" for label, b in report["by_lesion_size_voxels"].items()
    )
    conds = report["conditions"]
    cond_rows = "\n".join(
        f"| {CONDITION_NAMES[c]} | {_ci(conds[c], 'per_patient_dice')} | {_fmt(conds[c]['per_patient_dice_median'])} | {_ci(conds[c], 'fp_slice_rate')} "
        f"| {_fmt(conds[c]['lesion_sensitivity'])} | {conds[c]['empty_on_large_lesion']} |"
        for c in CONDS
    )
    per_patient = "\n".join(f"| {pid} | " + " | ".join(f"{conds[c]['per_patient'][pid]:.3f}" for c in CONDS) + " |" for pid in conds["all"]["per_patient"])
    per_patient_head = "| patient | " + " | ".join(CONDITION_NAMES[c] for c in CONDS) + " |\n|---|" + "---|" * len(CONDS)
    shift = [
        f"skull-stripped slices (`preprocessing.skull_strip`, cached) with probability {cfg.augment.skull_strip}" if cfg.augment.skull_strip else "",
        f"a smaller brain in the canvas (zoom {cfg.augment.zoom_min}-1) with probability {cfg.augment.zoom_out}" if cfg.augment.zoom_out else "",
        f"a smooth bias field with probability {cfg.augment.bias_field}" if cfg.augment.bias_field else "",
        f"lower resolution with probability {cfg.augment.low_resolution}" if cfg.augment.low_resolution else "",
        f"blur with probability {cfg.augment.blur}" if cfg.augment.blur else "",
    ]
    shift_note = "; ".join(x for x in shift if x)
    shift_line = f"\n- **domain shift** (other hospitals' data): {shift_note}." if shift_note else ""
    shift_summary = (
        "\nIt was also trained for other hospitals' data (skull-stripped slices, another field of view, bias field, lower resolution)."
        if shift_note
        else "\nIt was not trained on skull-stripped slices (see the skull-stripped rows below)."
    )
    post = cfg.postprocess
    pre, train, aug = cfg.preprocess, cfg.train, cfg.augment
    clahe = f"CLAHE per channel (clip {pre.clahe_clip_limit}, grid {pre.clahe_tile_grid}x{pre.clahe_tile_grid}, on={pre.clahe})"
    optimiser = (
        f"AdamW (lr {train.lr}, weight decay {train.weight_decay}), linear warm-up {train.warmup_epochs} epoch then cosine decay; "
        f"EMA {train.ema_decay or 'off'}"
    )
    best_epoch = (
        "mean per-patient Dice with all sequences and with FLAIR only"
        + (", and skull stripped" if aug.skull_strip else "")
        + " (network resolution, threshold 0.5)"
    )
    affine = f"affine (rotation +-{aug.rotate} deg, scale +-{aug.scale}, shift)"
    shipped_epoch = ckpt.get("epoch", len(hist))
    measured_in = "3D (over the stacked slices of a volume)" if post.components_3d else "2D (per slice)"
    slice_min = post.slice_min_size if post.slice_min_size is not None else post.min_size
    return f"""# Model card: {DISPLAY_NAMES[name]} (`{name}`){" (default model)" if is_default else ""}

## Summary
2D {DISPLAY_NAMES[name]} that segments the FLAIR abnormality of lower-grade glioma in axial brain MRI
slices. Input: 3 channels (pre-contrast T1, FLAIR, post-contrast T1); a missing pre- or
post-contrast sequence is given as a copy of FLAIR, and one grey FLAIR image as FLAIR in all
three channels: the model was trained for all four conditions.{shift_summary} **Research software, not a medical device.**

Per-patient 3D Dice on {report["patients"]} test patients (never trained, tuned or thresholded on), 95% bootstrap interval over patients:

| input | per-patient Dice | median | FP rate, lesion-free slices | lesion sensitivity | empty on lesion >10,000 voxels |
|---|---|---|---|---|---|
{cond_rows}

## Architecture
{PAPERS[name]}

- widths per level {list(cfg.model.features)}, {len(cfg.model.features)} levels, BatchNorm + ReLU, bilinear upsampling;
  deep supervision: {cfg.model.deep_supervision}; returns logits.
- parameters: {ckpt["info"]["parameters"]:,}
- files: `{name}.pt` (PyTorch weights + resolved configuration), `{name}.onnx` (ONNX Runtime,
  configuration embedded as metadata). Per-patient Dice on the test patients: ONNX
  {report["onnx_per_patient_dice"]:.4f}, PyTorch {report["torch_per_patient_dice"]:.4f} (difference {report["onnx_vs_torch_dice_difference"]:.4f}).

## Data
LGG MRI Segmentation (kaggle_3m): 81 TCGA-LGG patients available to the project (axial slices
256x256, expert masks of the FLAIR abnormality); five of them lack the pre- and/or
post-contrast sequence, stored as FLAIR copies.
Buda M., Saha A., Mazurowski M.A. *Association of genomic subtypes of lower-grade gliomas with
shape features automatically extracted by a deep learning algorithm.* Computers in Biology and
Medicine, 2019. Mazurowski M.A. et al. *Radiogenomics of lower-grade glioma.* Journal of
Neuro-Oncology, 2017. Images from TCIA (TCGA-LGG).

### Split (by patient, seeded {split.get("seed", SPLIT_SEED)}, stratified by institution)
- train ({len(split["train"])}): {", ".join(split["train"])}
- validation ({len(split["val"])}, model selection, threshold calibration, choice of the default): {", ".join(split["val"])}
- test ({len(split["test"])}, never trained, tuned or thresholded on): {", ".join(split["test"])}

## Preprocessing (saved in the model; `brainseg.preprocessing.preprocess_slice`)
whole slice -> {clahe}
-> resize to {cfg.preprocess.input_size}x{cfg.preprocess.input_size} (area) -> {cfg.preprocess.normalization} normalisation over the whole slice.
Probabilities are resized back (bilinear) to the input's size before thresholding.

## Training
{training_note}

- shipped checkpoint: `{chosen["path"]}`, chosen among {", ".join(f"`{c}`" for c in chosen["candidates"])} by validation score {chosen["val_score"]:.4f}{_guard_lines(chosen)}
- seed {cfg.train.seed}; batch {cfg.train.batch_size}, {int(cfg.train.positive_fraction * 100)}% lesion-positive slices per epoch (foreground-aware sampling);
  loss BCE + soft Dice; {optimiser}.
- augmentation (albumentations, seeded per sample): flips, {affine}, elastic, brightness/contrast, gamma, Gaussian noise;
  **sequence dropout**: pre-contrast replaced by FLAIR with probability {cfg.augment.missing_pre}, post-contrast with {cfg.augment.missing_post}, independently.{shift_line}
- best epoch chosen on validation: {best_epoch}; shipped weights from epoch {shipped_epoch} of this stage.
- code: brainseg {ckpt["info"].get("brainseg_version")}, torch {ckpt["info"].get("torch")}, trained on {ckpt["info"].get("device", "cpu")}

![training curves]({name}_training_curves.png)

## Post-processing calibration (validation patients only)
Chosen: probability >= **{post.threshold}**, components smaller than **{post.min_size}** px removed, measured in **{measured_in}**;
a slice uploaded on its own (no neighbours) drops components smaller than **{slice_min}** px (the best 2D setting at this threshold).
Score = mean of the per-patient Dice under {", ".join(CONDITION_NAMES[c] for c in cal_conds)}. Best settings:

{cal_head}
|---|---|---|{"---|" * len(cal_conds)}---|
{cal_rows}

## Test results, all three sequences ({report["patients"]} patients, {report["slices"]} slices, ONNX model)
| metric | value [95% CI] | protocol |
|---|---|---|
{metric_rows}

Lesion-wise by lesion size (3D components, voxels at native resolution):

| size | lesions | sensitivity | lesion Dice |
|---|---|---|---|
{size_rows}

Per patient (3D Dice):

{per_patient_head}
{per_patient}

{brats_format_section({DISPLAY_NAMES[name]: report})}

## Known limits
- Other hospitals' data is reproduced here only by simple skull stripping and a larger field of view on the same patients; other
  scanners, field strengths and high-grade gliomas are measured independently, not here.
- Trained on lower-grade glioma FLAIR abnormality from 5 TCGA institutions, {len(split["train"])} training patients. Brain
  metastases look different (ring enhancement, oedema) and are often much smaller; on metastasis
  data (e.g. BraTS-METS) the output is only a starting point and has not been validated.
- A single T1, T1 post-contrast or T2 image is outside what it was trained for (the API, the page and the CLI warn).
- 2D, slice by slice, at {cfg.preprocess.input_size}x{cfg.preprocess.input_size}: lesions of a few pixels at 256x256 are at the limit of what it can see.
- {report["patients"]} test patients: see the intervals above. The held-out patients of the dataset will measure it independently.
- Not a medical device; not for diagnosis.
"""


if __name__ == "__main__":
    sys.exit(main())
