"""The end-to-end flows behind the CLI: preprocess, train + calibrate + compare, evaluate, export; ``finish_run`` (a trained
model made shippable) is also the flow of ``scripts/ship_models.py``."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .config import CONDITIONS, DISPLAY_NAMES, EVERY_CONDITION, SPLIT_SEED, ExperimentConfig, PostprocessConfig
from .evaluation import metrics as M
from .evaluation.protocol import (
    evaluate_conditions,
    markdown_table,
    predict_patients,
    sweep_postprocess,
    table_row,
    within_fp_budget,
)
from .inference.backends import binarize_stack
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
    guard: bool = False,
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
    ``guard``: the first candidate is the shipped model (the incumbent) and the others replace it only under
    ``champion_challenger``'s rules (no more validation false positives, a validation gain beyond chance).
    """
    files = files or RunFiles.of_run(run)
    source, ckpt, seg, cal = _best_candidate(candidates or [run / "best.pt"], name, split if candidates else None, val_patients, device, progress, guard)
    post, val_score = cal.post, cal.val_score
    info = {"shipped_from": source} if candidates else {"train_wall_seconds": facts.get("train_wall_seconds")}
    _save_calibrated(ckpt, files, split, cal, info)
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


def _best_candidate(candidates: list, name: str, split: dict | None, val_patients, device: str | None, progress: bool, guard: bool = False):
    """(path, checkpoint, PyTorch segmenter, Calibration) of the candidate with the best validation score; with
    ``guard``, of the one ``champion_challenger`` keeps (the first candidate being the shipped model)."""
    from .inference.backends import Segmenter, TorchBackend, gpu_present
    from .models.checkpoint import load_checkpoint

    best, incumbent, considered = None, None, []
    for i, path in enumerate(candidates):
        ckpt = load_checkpoint(path)
        if split is not None and (ckpt["split"]["val"] != split["val"] or ckpt["split"]["test"] != split["test"]):
            raise ValueError(f"{path}: trained on another split (validation / test patients) than the one given")
        seg = Segmenter(TorchBackend(checkpoint=ckpt, device=device or ("cpu" if not gpu_present() else None)), name)
        cal = calibrate_against(seg, val_patients, incumbent[3] if incumbent else None, progress) if guard else calibrate(seg, val_patients, progress=progress)
        if split is not None:
            log.info("%s candidate %s: validation score %.4f at %s, FP %s", name, path, cal.val_score, cal.post, cal.fp_summary())
        if guard and i == 0:
            incumbent = best = (path, ckpt, seg, cal)
        elif guard:
            log.info("%s candidate %s against the shipped %s: %s", name, path, incumbent[0], cal.verdict["reason"])
            if cal.verdict["replaces"] and cal.val_score > best[3].val_score:
                best = (path, ckpt, seg, cal)
        elif best is None or cal.val_score > best[3].val_score:
            best = (path, ckpt, seg, cal)
        considered.append({"path": str(path), "val_score": cal.val_score, "post": asdict(cal.post), "fp_slices": cal.fp_slices, "verdict": cal.verdict})
    if guard:
        best[3].candidates = considered
    return best


def calibrate_against(segmenter, val_patients, incumbent: Calibration | None, progress: bool = True, tta: bool = False) -> Calibration:
    """``calibrate`` under the shipping rules: the false positives pooled over every input condition, components of
    volumes measured in 3D (``sweep_postprocess``'s ``volumes_3d``); with an ``incumbent`` (the shipped model's
    calibration), within its FP rate and with ``champion_challenger``'s verdict."""
    budget = incumbent.fp_rate if incumbent else None
    cal = calibrate(segmenter, val_patients, progress=progress, fp_conditions=EVERY_CONDITION, fp_budget=budget, tta=tta, volumes_3d=True)
    if incumbent:
        cal.verdict = champion_challenger(incumbent, cal)
    return cal


def champion_challenger(incumbent: Calibration, challenger: Calibration) -> dict:
    """Whether a challenger replaces the shipped model, on the validation patients only.

    1. No more false positives: the challenger was calibrated under the incumbent's FP slice rate pooled over
       every input condition (``calibrate``'s ``fp_budget``); a challenger that cannot get there does not ship.
       The lesion-free validation slices are too few for a 5 % check to see a rise of a few percent (round 8 of
       docs/ablations.md: 2 -> 3 of 278 on complete input, 22 -> 38 of 1,946 over the seven conditions, while the
       test patients' rate rose 0.038 -> 0.063); the pooled count is the most sensitive check the split allows.
    2. A gain beyond chance: the 95 % bootstrap interval of the per-patient difference in validation score
       (paired by patient) lies above 0. Twelve validation patients make a gain of 0.003 noise, and a re-ship
       that changes nothing measurable is churn.
    """
    diffs = [challenger.per_patient[p] - incumbent.per_patient[p] for p in incumbent.per_patient]
    lo, hi = M.bootstrap_ci(diffs)
    gain = float(sum(diffs) / len(diffs)) if diffs else float("nan")
    verdict = {"gain": gain, "gain_ci95": [lo, hi], "fp_slices": challenger.fp_slices, "fp_budget_slices": incumbent.fp_slices}
    if not challenger.fp_budget_met:
        reason = f"more false positives than the shipped model at every setting ({challenger.fp_summary()} vs {incumbent.fp_summary()})"
    elif not lo > 0:
        reason = f"validation gain {gain:+.4f} [{lo:+.4f}, {hi:+.4f}] is not beyond chance"
    else:
        reason = f"validation gain {gain:+.4f} [{lo:+.4f}, {hi:+.4f}] at FP {challenger.fp_summary()} (shipped {incumbent.fp_summary()})"
    return {"replaces": bool(challenger.fp_budget_met and lo > 0), "reason": reason, **verdict}


def _save_calibrated(ckpt: dict, files: RunFiles, split: dict, calibrated: Calibration, info: dict) -> None:
    """The checkpoint with its calibrated post-processing (and the table it was chosen from), without optimiser state."""
    from .models.checkpoint import save_checkpoint

    ckpt.pop("optimizer", None)
    ckpt.pop("train_model", None)
    ckpt["config"]["postprocess"] = asdict(calibrated.post)
    ckpt["calibration"] = {"patients": split["val"], "conditions": list(CALIBRATION_CONDITIONS), "table": calibrated.table, "val_score": calibrated.val_score}
    if calibrated.fp_conditions:  # the FP guard's facts (scripts/ship_models.py)
        ckpt["calibration"].update(
            fp_conditions=list(calibrated.fp_conditions), fp_slices=calibrated.fp_slices, lesion_free_slices=calibrated.lesion_free_slices
        )
        ckpt["calibration"].update(fp_budget=calibrated.fp_budget, verdict=calibrated.verdict, candidates=calibrated.candidates)
    ckpt["info"].update(info)
    save_checkpoint(files.checkpoint, ckpt)
    if files.calibration is not None:
        write_json_atomic(files.calibration, {"chosen": asdict(calibrated.post), "val_score": calibrated.val_score, "table": calibrated.table})


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


@dataclass
class Calibration:
    """Post-processing chosen on the validation patients, and what it was chosen from."""

    post: PostprocessConfig
    table: list[dict]
    val_score: float  # mean over CALIBRATION_CONDITIONS of the per-patient Dice at ``post``
    per_patient: dict[str, float]  # each validation patient's score at ``post``
    fp_slices: int = 0  # at ``post``, pooled over the conditions the FP was measured on
    lesion_free_slices: int = 0
    fp_conditions: tuple[str, ...] = ()  # where the FP was pooled over more conditions than the score (the FP guard)
    fp_budget: float | None = None  # the pooled FP rate ``post`` had to stay within (None: no limit)
    verdict: dict | None = None  # champion_challenger's, for a challenger
    candidates: list[dict] | None = None  # with the FP guard: every candidate considered, incumbent first

    @property
    def fp_rate(self) -> float:
        return self.fp_slices / self.lesion_free_slices if self.lesion_free_slices else 0.0

    @property
    def fp_budget_met(self) -> bool:
        return within_fp_budget(self.fp_rate, self.fp_budget)

    def fp_summary(self) -> str:
        return f"{self.fp_slices} of {self.lesion_free_slices} lesion-free slices"


def calibrate(
    segmenter,
    val_patients,
    progress: bool = True,
    fp_conditions: tuple[str, ...] | None = None,
    fp_budget: float | None = None,
    tta: bool = False,
    volumes_3d: bool = False,
) -> Calibration:
    """Threshold, minimum component size and 2D / 3D components chosen on the validation patients: the best mean
    per-patient Dice over ``CALIBRATION_CONDITIONS``. ``fp_conditions``: pool the false-positive slices over these
    conditions too (predicted in addition); ``fp_budget``: the pooled FP slice rate the chosen setting must keep to;
    ``tta``: with flip test-time augmentation; ``volumes_3d``: 3D components only for volumes (``sweep_postprocess``)."""
    if not val_patients:
        return Calibration(PostprocessConfig(), [], float("nan"), {})
    conds = tuple(dict.fromkeys([*CALIBRATION_CONDITIONS, *(fp_conditions or ())]))
    preds = {c: predict_patients(segmenter, val_patients, tta=tta, progress=progress, condition=c) for c in conds}
    post, table = sweep_postprocess(preds, score_conditions=CALIBRATION_CONDITIONS, max_fp_rate=fp_budget, volumes_3d=volumes_3d)
    row = table_row(table, post)
    per_patient = {
        p.patient: sum(M.dice(binarize_stack(p.prob, post), p.truth) for p in (preds[c][i] for c in CALIBRATION_CONDITIONS)) / len(CALIBRATION_CONDITIONS)
        for i, p in enumerate(preds[CALIBRATION_CONDITIONS[0]])
    }
    return Calibration(
        post,
        table,
        float(row["per_patient_dice"]),
        per_patient,
        row["fp_slices"],
        row["lesion_free_slices"],
        tuple(fp_conditions or ()),
        fp_budget,
    )


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
    post = post or segmenter.postprocess_for(tta)
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


# ---------------------------------------------------------------- release checks (test patients, never a choice)

INT8_MAX_DROP = 0.005  # per-patient Dice, test patients, under each input condition
INT8_RULE = f"INT8 is served by default only where the per-patient Dice of the test patients drops by at most {INT8_MAX_DROP} under every input condition"


def int8_cost(fp32, int8, patients, tta: bool = False, post: PostprocessConfig | None = None) -> dict:
    """Per-patient Dice (and FP rate) of an fp32 and an INT8 model under every input condition, both at ``post`` (default:
    each at its calibrated post-processing for ``tta``, ``postprocess_for``), and the drop (fp32 - INT8)."""
    by_model = {
        k: evaluate_conditions(m, patients, post or m.postprocess_for(tta), EVERY_CONDITION, tta=tta, progress=False)[0]
        for k, m in (("fp32", fp32), ("int8", int8))
    }
    out = {}
    for cond in EVERY_CONDITION:
        reports = {k: by_model[k][cond] for k in by_model}
        per_patient_drop = [reports["fp32"]["per_patient"][pid] - reports["int8"]["per_patient"][pid] for pid in reports["fp32"]["per_patient"]]
        out[cond] = {
            "fp32": round(reports["fp32"]["per_patient_dice"], 4),
            "int8": round(reports["int8"]["per_patient_dice"], 4),
            "drop": round(reports["fp32"]["per_patient_dice"] - reports["int8"]["per_patient_dice"], 4),
            "largest_patient_drop": round(max(per_patient_drop), 4),
            "int8_ci95": [round(v, 4) for v in reports["int8"]["per_patient_dice_ci95"]],
            "fp_slice_rate": {"fp32": round(reports["fp32"]["fp_slice_rate"], 4), "int8": round(reports["int8"]["fp_slice_rate"], 4)},
        }
    return out


def int8_holds(cost: dict) -> bool:
    """``INT8_RULE`` on one ``int8_cost`` table."""
    return all(r["drop"] <= INT8_MAX_DROP for r in cost.values())


RELEASE_RULE = (
    "under every input condition, on the test patients: a lesion-free-slice FP rate of at most max(5%, the default's), "
    "and a 95% bootstrap interval of the per-patient Dice difference to the default (paired by patient) not wholly below 0"
)


@dataclass(frozen=True)
class Option:
    """One way to run a model: the segmenter, flip TTA or not, and the post-processing calibrated for it."""

    segmenter: object
    tta: bool
    post: PostprocessConfig


def release_check(test_patients, default: Option, options: list[Option]) -> list[dict]:
    """Each option against the default on the test patients, per input condition (``RELEASE_RULE``). A check that an
    option chosen on the validation patients keeps every guarantee before it is served; never a choice among options."""

    def reports(o: Option):
        return evaluate_conditions(o.segmenter, test_patients, o.post, EVERY_CONDITION, tta=o.tta, progress=False)[0]

    base = reports(default)
    out = []
    for option in options:
        mine, conds, passed = reports(option), {}, True
        for c in EVERY_CONDITION:
            b, m = base[c], mine[c]
            diffs = [m["per_patient"][p] - b["per_patient"][p] for p in b["per_patient"]]
            lo, hi = M.bootstrap_ci(diffs)
            fp_ok = within_fp_budget(m["fp_slice_rate"], max(0.05, b["fp_slice_rate"]))
            conds[c] = {
                "dice_default": b["per_patient_dice"],
                "dice": m["per_patient_dice"],
                "difference": float(sum(diffs) / len(diffs)) if diffs else float("nan"),
                "difference_ci95": [lo, hi],
                "fp_default": b["fp_slice_rate"],
                "fp": m["fp_slice_rate"],
                "passes": bool(fp_ok and not hi < 0),
            }
            passed &= conds[c]["passes"]
        out.append({"model": option.segmenter.name, "tta": option.tta, "post": asdict(option.post), "passes": passed, "conditions": conds})
    return out
