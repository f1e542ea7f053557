"""The end-to-end flows behind the CLI: preprocess, train + calibrate + compare, evaluate, export; ``finish_run`` (a trained
model made shippable) is also the flow of ``scripts/ship_models.py``."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .config import CONDITIONS, DISPLAY_NAMES, SPLIT_SEED, ExperimentConfig, PostprocessConfig
from .evaluation.protocol import evaluate_conditions, markdown_table, predict_patients, sweep_postprocess
from .inference.registry import REGISTRY, ModelEntry, Registry, read, write_registry
from .io.datasets import DataError, discover, labelled, read_split, split_patients
from .io.files import write_json_atomic, write_text_atomic
from .training.cache import build_cache, load_cache, reusable_split, same_arrays

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
        from .display.visualize import preprocessing_overview

        preprocessing_overview(lab, cfg, out / "preprocessing_overview.png", seed=seed)
    return {
        "cache": str(out),
        "split": str(split_path),
        "patients": len(lab.patients),
        "slices": lab.n_slices,
        "images_without_mask": len(ds.images_without_mask),
        "split_sizes": {k: len(split[k]) for k in ("train", "val", "test")},
    }


TRAIN_METRICS = ("per_patient_dice", "lesion_sensitivity", "fp_slice_rate")  # what a trained run's registry entry keeps


@dataclass(frozen=True)
class RunFiles:
    """Where ``finish_run`` writes a shippable model; the registry's paths are relative to ``registry_dir``."""

    registry_dir: Path
    checkpoint: Path  # the calibrated checkpoint
    onnx: Path
    test_report: Path
    calibration: Path | None = None  # calibration.json (None: the table is kept in the checkpoint only)

    @classmethod
    def of_run(cls, run: Path) -> RunFiles:
        """``brainseg train``'s run folder: ``best.pt``, ``best.onnx``, ``test_report.json``, ``calibration.json``;
        the registry in the folder above."""
        return cls(run.parent, run / "best.pt", run / "best.onnx", run / "test_report.json", run / "calibration.json")

    @classmethod
    def shipped(cls, out: Path, name: str) -> RunFiles:
        """The shipped ``models/`` folder (``scripts/ship_models.py``): ``NAME.pt``, ``NAME.onnx``, ``NAME_test_report.json``."""
        return cls(out, out / f"{name}.pt", out / f"{name}.onnx", out / f"{name}_test_report.json")

    def relative(self, path: Path) -> str:
        return path.relative_to(self.registry_dir).as_posix()


def finish_run(
    run: Path,
    name: str,
    split: dict,
    val_patients,
    test_patients,
    facts: dict,
    export_onnx: bool = True,
    progress: bool = True,
    *,
    candidates: list | None = None,
    files: RunFiles | None = None,
    evaluate=None,
    metrics: tuple[str, ...] = TRAIN_METRICS,
    device: str | None = None,
):
    """A trained model made shippable, the one flow of ``brainseg train`` and ``scripts/ship_models.py``: post-processing
    calibrated on the validation patients (written into the checkpoint, and ``calibration.json`` where ``files`` has
    one), the ONNX export, the test patients evaluated (the test report); returns (test report, registry entry, with
    ``facts``).

    ``candidates``: checkpoints to choose among (default: the run's ``best.pt``), each calibrated, the first of the
    highest validation score shipped; each must hold ``split``'s validation and test patients, and the chosen one is
    recorded as ``info.shipped_from`` (a run's own ``best.pt`` records ``info.train_wall_seconds`` of ``facts``).
    ``files``: where it writes (default ``RunFiles.of_run(run)``). ``evaluate(segmenter, files, post, val_score)``: the
    test report (default: ``evaluate_on_test``, the PyTorch model under every input condition). ``metrics``: the report's
    keys the entry keeps. ``device``: PyTorch's for calibration (default: the CPU unless a CUDA GPU is present).
    """
    files = files or RunFiles.of_run(run)
    source, ckpt, seg, (post, table, val_score) = _best_candidate(
        candidates or [run / "best.pt"], name, split if candidates else None, val_patients, device, progress
    )
    info = {"shipped_from": source} if candidates else {"train_wall_seconds": facts.get("train_wall_seconds")}
    _save_calibrated(ckpt, files, split, (post, table, val_score), info)
    if export_onnx:
        from .inference.export import export_onnx as _export

        _export(files.checkpoint, files.onnx)
    # Same weights: the calibrated ``post`` is passed explicitly.
    report = evaluate(seg, files, post, val_score) if evaluate else evaluate_on_test(seg, test_patients, post, val_score, progress)
    write_json_atomic(files.test_report, report)
    entry = ModelEntry(
        checkpoint=files.relative(files.checkpoint), val_selection_score=val_score, metrics={k: report.get(k) for k in metrics}, postprocess=post, **facts
    )
    if export_onnx:
        entry.onnx = files.relative(files.onnx)
    return report, entry


def _best_candidate(candidates: list, name: str, split: dict | None, val_patients, device: str | None, progress: bool):
    """(path, checkpoint, PyTorch segmenter, (post, table, val_score)) of the candidate with the best validation score."""
    from .inference.backends import Segmenter, TorchBackend, gpu_present
    from .models.checkpoint import load_checkpoint

    best = None
    for path in candidates:
        ckpt = load_checkpoint(path)
        if split is not None and (ckpt["split"]["val"] != split["val"] or ckpt["split"]["test"] != split["test"]):
            raise ValueError(f"{path}: trained on another split (validation / test patients) than the one given")
        seg = Segmenter(TorchBackend(checkpoint=ckpt, device=device or ("cpu" if not gpu_present() else None)), name)
        calibrated = calibrate(seg, val_patients, progress=progress)
        if split is not None:
            log.info("%s candidate %s: validation score %.4f at %s", name, path, calibrated[2], calibrated[0])
        if best is None or calibrated[2] > best[3][2]:
            best = (path, ckpt, seg, calibrated)
    return best


def _save_calibrated(ckpt: dict, files: RunFiles, split: dict, calibrated: tuple, info: dict) -> None:
    """The checkpoint with its calibrated post-processing (and the table it was chosen from), without optimiser state."""
    from .models.checkpoint import save_checkpoint

    post, table, val_score = calibrated
    ckpt.pop("optimizer", None)
    ckpt.pop("train_model", None)
    ckpt["config"]["postprocess"] = asdict(post)
    ckpt["calibration"] = {"patients": split["val"], "conditions": list(CALIBRATION_CONDITIONS), "table": table, "val_score": val_score}
    ckpt["info"].update(info)
    save_checkpoint(files.checkpoint, ckpt)
    if files.calibration is not None:
        write_json_atomic(files.calibration, {"chosen": asdict(post), "val_score": val_score, "table": table})


def evaluate_on_test(segmenter, test_patients, post: PostprocessConfig, val_score: float, progress: bool = True) -> dict:
    """A trained run's test report: ``report_with_conditions`` on the test patients, and the validation score."""
    report = report_with_conditions(segmenter, test_patients, post, progress=progress) if test_patients else {}
    report["val_selection_score"] = val_score
    return report


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
    from .training.trainer import Trainer

    cache = load_cache(cache_dir)
    split = read_split(Path(cache_dir) / "split.json")
    if not same_arrays(cache.preprocess, base.preprocess):
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
