"""The end-to-end flows behind the CLI: preprocess, train + calibrate + compare, evaluate, export."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from .cache import build_cache, load_cache, reusable_split
from .config import CONDITIONS, DISPLAY_NAMES, SPLIT_SEED, ExperimentConfig, PostprocessConfig
from .data import DataError, discover, labelled, read_split, split_patients, write_json_atomic, write_text_atomic
from .evaluation import evaluate_conditions, markdown_table, predict_patients, sweep_postprocess
from .registry import REGISTRY, ModelEntry, Registry, read, write_registry

log = logging.getLogger(__name__)


def preprocess(
    data_root: str,
    cache_dir: str,
    cfg: ExperimentConfig,
    n_val: int | None = None,
    n_test: int | None = None,
    seed: int = SPLIT_SEED,
    split_file: str | None = None,
    overview: bool = True,
) -> dict:
    """Cache + split (kept if it exists and names only patients of this dataset) + overview PNG.

    ``n_val`` / ``n_test`` None: ``data.default_holdout`` (15 % / 25 % of the patients). The
    split is settled before anything is written, and written into the cache in the same
    atomic step, so a failure leaves no cache without a split behind.
    """
    ds = discover(data_root)
    lab = labelled(ds)
    if ds.images_without_mask:
        log.warning("%d images have no mask and are left out of training/testing", len(ds.images_without_mask))
    ids = [p.id for p in lab.patients]
    split_path = Path(split_file) if split_file else Path(cache_dir) / "split.json"
    if split_file:
        split = read_split(split_path) if split_path.is_file() else None
        unknown = sorted({p for k in ("train", "val", "test") for p in (split or {}).get(k, [])} - set(ids))
        if unknown:
            raise DataError(split_path, f"names {len(unknown)} patients that are not in {data_root} (e.g. {unknown[0]})")
    else:
        split = reusable_split(Path(cache_dir) / "split.json", ids)
    made_split = split is None
    if made_split:
        split = split_patients(ids, n_val=n_val, n_test=n_test, seed=seed)
        split["seed"] = seed
        for part, what in (("val", "nothing to choose the threshold and the best epoch on"), ("test", "no test score")):
            if not split[part]:
                log.warning("%d patients: no %s patients (%s)", len(ids), "validation" if part == "val" else part, what)
    out = build_cache(ds, cfg.preprocess, cache_dir, split=split)
    if made_split and split_path != out / "split.json":
        write_json_atomic(split_path, split)
    if overview:
        from .visualize import preprocessing_overview

        preprocessing_overview(lab, cfg, out / "preprocessing_overview.png", seed=seed)
    return {
        "cache": str(out),
        "split": str(split_path),
        "patients": len(lab.patients),
        "slices": lab.n_slices,
        "images_without_mask": len(ds.images_without_mask),
        "split_sizes": {k: len(split[k]) for k in ("train", "val", "test")},
    }


def finish_run(run: Path, name: str, split: dict, val_patients, test_patients, facts: dict, export_onnx: bool = True, progress: bool = True):
    """A trained run's ``best.pt`` made shippable: post-processing calibrated on the validation patients (written into
    the checkpoint and ``calibration.json``), every input condition evaluated on the test patients
    (``test_report.json``), the ONNX export; returns (test report, registry entry, with ``facts`` of the training)."""
    from .checkpoint import load_checkpoint, save_checkpoint
    from .inference import Segmenter, TorchBackend, gpu_present

    ckpt = load_checkpoint(run / "best.pt")
    seg = Segmenter(TorchBackend(checkpoint=ckpt, device="cpu" if not gpu_present() else None), name)
    post, table, val_score = calibrate(seg, val_patients, progress=progress)
    ckpt["config"]["postprocess"] = asdict(post)
    ckpt["calibration"] = {"patients": split["val"], "conditions": list(CALIBRATION_CONDITIONS), "table": table, "val_score": val_score}
    ckpt["info"]["train_wall_seconds"] = facts.get("train_wall_seconds")
    save_checkpoint(run / "best.pt", ckpt)
    write_json_atomic(run / "calibration.json", {"chosen": asdict(post), "val_score": val_score, "table": table})
    # Same weights: the calibrated ``post`` is passed explicitly below.
    report = report_with_conditions(seg, test_patients, post, progress=progress) if test_patients else {}
    report["val_selection_score"] = val_score
    write_json_atomic(run / "test_report.json", report)
    entry = ModelEntry(
        checkpoint=f"{name}/best.pt",
        val_selection_score=val_score,
        metrics={k: report.get(k) for k in ("per_patient_dice", "lesion_sensitivity", "fp_slice_rate")},
        postprocess=post,
        **facts,
    )
    if export_onnx:
        from .export import export_onnx as _export

        _export(run / "best.pt", run / "best.onnx")
        entry.onnx = f"{name}/best.onnx"
    return report, entry


def train_models(
    names: list[str],
    cache_dir: str,
    out_dir: str,
    base: ExperimentConfig,
    data_root: str | None = None,
    resume: bool = False,
    progress: bool = True,
    export_onnx: bool = True,
    init_from: str | None = None,
) -> dict:
    """Train each model, calibrate post-processing on validation, evaluate on test, write the registry."""
    from .training import Trainer

    cache = load_cache(cache_dir)
    split = read_split(Path(cache_dir) / "split.json")
    if cache.preprocess != base.preprocess:
        raise ValueError(f"{cache_dir}: cache was built with {cache.preprocess}, but training asks for {base.preprocess}; rerun preprocess")
    ds = labelled(discover(data_root or cache.root))
    val_patients = [ds.patient(p) for p in split["val"]]
    test_patients = [ds.patient(p) for p in split["test"]]
    out = Path(out_dir)
    reports, entries = {}, {}
    for name in names:
        cfg = replace(base, model=replace(base.model, name=name, deep_supervision=base.model.deep_supervision and name == "unetpp"))
        run = out / name
        t0 = time.time()
        init = Path(init_from) / f"{name}.pt" if init_from and Path(init_from).is_dir() else init_from
        result = Trainer(cfg, cache, split, run, resume=resume, progress=progress, init_from=init).fit()
        if int(os.environ.get("RANK", "0")) != 0:
            continue
        wall = round(time.time() - t0, 1)
        reports[name], entries[name] = finish_run(run, name, split, val_patients, test_patients, {"train_wall_seconds": wall, **result}, export_onnx, progress)
    if int(os.environ.get("RANK", "0")) != 0 or not reports:
        return {}
    # Models trained earlier into the same folder stay in the comparison and the registry.
    if (out / REGISTRY).is_file():
        for name, entry in read(out).models.items():
            if name not in entries and (out / name / "test_report.json").is_file():
                entries[name] = entry
                reports[name] = json.loads((out / name / "test_report.json").read_text())
    best = max(entries, key=lambda n: entries[n].val_selection_score or -1.0)
    write_registry(out, Registry(default=best, selected_by=SELECTED_BY, models=entries))
    write_text_atomic(out / "comparison.md", markdown_table({DISPLAY_NAMES[n]: r for n, r in reports.items()}))
    write_json_atomic(out / "comparison.json", reports)
    return {"reports": reports, "best": best, "test_patients": len(test_patients)}


# Post-processing is calibrated, and the default model chosen, on the validation patients
# with complete input, with FLAIR alone (the most common input a user has) and skull stripped
# (how other hospitals' data and BraTS-format volumes come).
CALIBRATION_CONDITIONS = ("all", "flair_only", "skull_stripped")
SELECTED_BY = (
    "validation per-patient 3D Dice, mean of complete input, FLAIR only and skull-stripped input, at the calibrated post-processing (never the test patients)"
)


def calibrate(segmenter, val_patients, progress: bool = True) -> tuple[PostprocessConfig, list[dict], float]:
    """Threshold, minimum component size and 2D / 3D components chosen on the validation patients."""
    if not val_patients:
        return PostprocessConfig(), [], float("nan")
    preds = {c: predict_patients(segmenter, val_patients, progress=progress, condition=c) for c in CALIBRATION_CONDITIONS}
    post, table = sweep_postprocess(preds)
    best = max(r["per_patient_dice"] for r in table)
    return post, table, float(best)


def report_with_conditions(segmenter, patients, post: PostprocessConfig, conditions=tuple(CONDITIONS), progress: bool = True) -> dict:
    """The full report with all sequences, plus every input condition's summary under ``conditions``."""
    by_cond, _ = evaluate_conditions(segmenter, patients, post, conditions, progress=progress)
    report = dict(by_cond["all"])
    report["conditions"] = {c: condition_summary(r) for c, r in by_cond.items()}
    return report


def condition_summary(report: dict) -> dict:
    keys = (
        "per_patient_dice",
        "per_patient_dice_ci95",
        "per_patient_dice_median",
        "fp_slice_rate",
        "fp_slice_rate_ci95",
        "lesion_sensitivity",
        "empty_on_large_lesion",
        "per_patient",
    )
    return {k: report.get(k) for k in keys}


def evaluate(
    segmenter,
    data_root: str,
    patient_ids: list[str] | None,
    post: PostprocessConfig | None = None,
    tta: bool = False,
    sweep: bool = False,
    progress: bool = True,
    conditions: tuple[str, ...] = ("all",),
) -> dict:
    """The full report under ``conditions[0]``; with more conditions, a summary of each under ``conditions``."""
    ds = labelled(discover(data_root))
    patients = [ds.patient(p) for p in patient_ids] if patient_ids else ds.patients
    post = post or segmenter.postprocess
    by_cond, preds = evaluate_conditions(segmenter, patients, post, conditions, tta=tta, progress=progress)
    report = dict(by_cond[conditions[0]])
    report["condition"] = conditions[0]
    if len(conditions) > 1:
        report["conditions"] = {c: condition_summary(r) for c, r in by_cond.items()}
    report["model"] = segmenter.name
    report["tta"] = tta
    if sweep:
        _, report["postprocess_sweep"] = sweep_postprocess(preds[conditions[0]])
    return report
