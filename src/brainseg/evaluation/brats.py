"""Whole-tumour evaluation on BraTS-format volumes: the data most users bring, scored as BraTS scores it.

A BraTS-format root holds one folder per case with NIfTI volumes named by sequence, the way the BraTS
challenges ship them, and a label volume:

    ROOT/BraTS2021_00000/BraTS2021_00000_{t1,t1ce,t2,flair,seg}.nii.gz        (BraTS 2021)
    ROOT/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t1n,t1c,t2w,t2f,seg}.nii.gz  (BraTS 2023; also -METS, -MEN, ...)
    ROOT/<case>/<case>-{t1n,t2f,t1c}.nii.gz + ROOT/labels/<case>-fusion.nii.gz  (``../shared/data/brats-format``)

Each case is read as ``brainseg predict`` reads a BraTS set (``io.volumes.load_volume``: orientation from the
affine; t1n / t2f / t1c; a missing t1n / t1c is FLAIR), segmented at the model's post-processing for the run's
TTA setting, put back on the file's grid and compared with label > 0 (whole tumour). ``flair_only`` reads the t2f
file alone. Per case: Dice, precision, recall, volumes, HD95 (mm); over cases: mean Dice with a 95% bootstrap
interval, median, and the cases with a large tumour (> 10 mL) and an empty prediction.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np

from ..inference.predict import model_version, segment_volume
from ..io.datasets import DataError
from ..io.volumes import BRATS_CHANNELS, brats_sequence, is_nifti, load_volume, nifti_stem
from . import metrics as M

BRATS_CONDITIONS = ("all", "flair_only")
LABEL_TAGS = ("seg", "fusion", "label", "labels", "mask")  # how the label volume's name ends (``-seg``, ``_seg``, ...)
LARGE_TUMOUR_ML = 10.0  # a case whose reference is larger than this and whose prediction is empty is a miss


@dataclass
class BratsCase:
    name: str
    images: dict[str, Path]  # sequence tag (t1n, t2f, t1c, t2w) -> file
    label: Path | None
    problems: list[str] = field(default_factory=list)

    def files(self, condition: str) -> list[Path]:
        """The files a condition reads: t1n / t2f / t1c for ``all`` (what the case has of them), t2f for ``flair_only``."""
        wanted = ("t2f",) if condition == "flair_only" else BRATS_CHANNELS
        return [self.images[s] for s in wanted if s in self.images]


def _label_of(name: str) -> bool:
    stem = nifti_stem(name).lower()
    return any(stem.endswith(("-" + t, "_" + t)) for t in LABEL_TAGS)


def _names_case(stem: str, case: str) -> bool:
    """``labels/<case>.nii.gz``, ``<case>-fusion``, ``<case>_seg``, ...: not another case whose name starts the same."""
    return stem == case or stem.startswith((case + "-", case + "_"))


def _case(folder: Path, labels_dir: Path | None) -> BratsCase | None:
    """One case folder, or None where it holds no NIfTI volume named by sequence."""
    niftis = sorted(f for f in folder.iterdir() if f.is_file() and is_nifti(f))
    images: dict[str, Path] = {}
    problems: list[str] = []
    for f in niftis:
        tag = None if _label_of(f.name) else brats_sequence(f)
        if tag is None:
            continue
        if tag[1] in images:
            problems.append(f"two {tag[1]} files ({images[tag[1]].name} and {f.name})")
        images.setdefault(tag[1], f)
    if not images:
        return None
    labels = [f for f in niftis if _label_of(f.name)]
    if not labels and labels_dir is not None:
        labels = sorted(f for f in labels_dir.iterdir() if f.is_file() and is_nifti(f) and _names_case(nifti_stem(f.name), folder.name))
    if len(labels) > 1:
        problems.append(f"several label volumes ({', '.join(f.name for f in labels)})")
    if "t2f" not in images:
        problems.append(f"no FLAIR (t2f / flair) volume (got {', '.join(sorted(images))}); the models need FLAIR")
    return BratsCase(folder.name, images, labels[0] if len(labels) == 1 else None, problems)


def discover_brats(root: os.PathLike | str) -> list[BratsCase]:
    """Every case folder under ``root`` (one level), in name order; ``labels/`` is where a case's label may be
    instead. DataError where ``root`` is not a folder or holds no case."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "dataset folder not found")
    labels_dir = root / "labels" if (root / "labels").is_dir() else None
    cases = [c for d in sorted(root.iterdir()) if d.is_dir() and d != labels_dir and (c := _case(d, labels_dir))]
    if not cases:
        raise DataError(root, "no BraTS-format case folders (NIfTI volumes named *-t2f / *_flair, ...) found")
    return cases


def is_brats_root(root: os.PathLike | str) -> bool:
    """Whether ``root`` holds BraTS-format case folders (``discover_brats`` finds any)."""
    try:
        return bool(discover_brats(root))
    except (DataError, OSError):
        return False


def score_case(segmenter, case: BratsCase, post, tta: bool, conditions) -> dict[str, dict]:
    """One case under each condition: the model's mask on the label's grid against label > 0. The label is read
    once; each condition's volume is checked against its grid before the network runs."""
    label_img = nib.load(case.label)
    ref = np.asarray(label_img.dataobj) > 0
    spacing = tuple(float(z) for z in label_img.header.get_zooms()[:3])
    out = {}
    for condition in conditions:
        vol = load_volume(case.files(condition))
        if tuple(vol.shape) != ref.shape or not np.allclose(label_img.affine, vol.affine, atol=1e-3):
            raise DataError(case.label, f"label grid {ref.shape} differs from the images' {tuple(vol.shape)} (or another affine); resample it onto them")
        pred = vol.file_mask(segment_volume(segmenter, vol, post, tta=tta).mask) > 0
        tp = int(np.count_nonzero(pred & ref))
        voxel_ml = vol.voxel_volume_mm3 / 1000
        out[condition] = {
            "dice": float(M.dice(pred, ref)),
            "precision": tp / max(int(pred.sum()), 1),
            "recall": tp / max(int(ref.sum()), 1),
            "hd95_mm": float(M.hd95(pred, ref, spacing)) if pred.any() and ref.any() else None,
            "pred_ml": float(pred.sum()) * voxel_ml,
            "ref_ml": float(ref.sum()) * voxel_ml,
            "read_as": vol.condition,
        }
    return out


def summarize(per_case: dict[str, dict]) -> dict:
    """Mean / median Dice with a 95% bootstrap interval over cases, mean precision / recall, and large misses."""
    dices = [r["dice"] for r in per_case.values()]
    lo, hi = M.bootstrap_ci(dices) if len(dices) > 1 else (float("nan"), float("nan"))
    return {
        "cases": len(dices),
        "dice_mean": float(np.mean(dices)),
        "dice_ci95": [lo, hi],
        "dice_median": float(np.median(dices)),
        "precision_mean": float(np.mean([r["precision"] for r in per_case.values()])),
        "recall_mean": float(np.mean([r["recall"] for r in per_case.values()])),
        "empty_on_large_tumour": sorted(c for c, r in per_case.items() if r["ref_ml"] > LARGE_TUMOUR_ML and r["pred_ml"] == 0),
    }


def _settings_key(segmenter, tta: bool, post, conditions) -> str:
    """What makes a case's scores reusable: the weights (``predict.model_version``), TTA, post-processing, conditions."""
    settings = {"model": model_version(segmenter), "tta": bool(tta), "post": asdict(post), "conditions": list(conditions)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _read_progress(path: Path | None, key: str) -> dict[str, dict]:
    """case -> its record, from a progress file written under the same settings (a torn last line is ignored)."""
    done: dict[str, dict] = {}
    if path is None or not path.is_file():
        return done
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("key") == key and "case" in rec:
            done[rec["case"]] = rec
    return done


def _outcomes(segmenter, cases: list[BratsCase], post, tta: bool, conditions, progress: bool, progress_file):
    """(case, {"scores": {condition: scores}} or {"skipped": reason}, reused) per case, in order: reused from
    ``progress_file`` where an earlier run under the same settings did it, else scored now and appended there."""
    from tqdm import tqdm

    key = _settings_key(segmenter, tta, post, conditions)
    progress_file = Path(progress_file) if progress_file else None
    done = _read_progress(progress_file, key)
    if progress_file is not None and progress_file.is_file() and not progress_file.read_bytes().endswith(b"\n"):
        with progress_file.open("a") as f:  # a line torn by the stop: the next record starts on a line of its own
            f.write("\n")
    for case in tqdm(cases, desc="BraTS cases", unit="case", disable=not progress):
        if case.name in done:
            yield case.name, done[case.name], True
            continue
        try:
            rec = {"scores": score_case(segmenter, case, post, tta, conditions)}
        except Exception as exc:  # one unreadable case (a truncated file, a label on another grid) is skipped, not the run
            rec = {"skipped": str(exc) if isinstance(exc, DataError) else f"{type(exc).__name__}: {exc}"}
        if progress_file is not None:
            with progress_file.open("a") as f:  # one line per case, flushed: what a stopped run keeps
                f.write(json.dumps({"key": key, "case": case.name, **rec}) + "\n")
        yield case.name, rec, False


def evaluate_brats(segmenter, root, tta: bool, post=None, conditions=BRATS_CONDITIONS, progress: bool = True, progress_file=None) -> dict:
    """The report of ``brainseg evaluate`` on a BraTS-format root. Cases without a label, with a problem (no FLAIR,
    two files of one sequence, several labels) or that cannot be read (a truncated file, a label on another grid)
    are listed under ``skipped`` with the reason and not scored; DataError where none is left. ``post`` None: the
    model's post-processing for ``tta``.

    ``progress_file``: each case's outcome is appended there as one JSON line as soon as it is known, so a run that
    is stopped (Ctrl-C, a crash) and started again reuses the cases already done under the same settings
    (``_settings_key``) instead of running them again; ``resumed`` in the report counts them."""
    bad = [c for c in conditions if c not in BRATS_CONDITIONS]
    if bad:
        raise ValueError(f"BraTS-format data is evaluated under {' and '.join(BRATS_CONDITIONS)} only, not {', '.join(bad)}")
    cases = discover_brats(root)
    skipped = {
        c.name: "; ".join(c.problems) if c.problems else "no label volume (*-seg, *_seg or labels/<case>*)" for c in cases if c.problems or c.label is None
    }
    scored = [c for c in cases if c.name not in skipped]
    if not scored:
        raise DataError(root, f"no BraTS-format case has both a FLAIR volume and a label volume ({len(cases)} case folders found)")
    post = post or segmenter.postprocess_for(tta)
    per_case: dict[str, dict[str, dict]] = {c: {} for c in conditions}
    resumed = 0
    for name, rec, reused in _outcomes(segmenter, scored, post, tta, conditions, progress, progress_file):
        resumed += reused
        if "skipped" in rec:
            skipped[name] = rec["skipped"]
            continue
        for c, r in rec["scores"].items():
            per_case[c][name] = r
    n = len(per_case[conditions[0]])
    if not n:
        raise DataError(root, f"no case could be scored ({'; '.join(f'{k}: {v}' for k, v in skipped.items())})")
    summary = {c: summarize(per_case[c]) for c in conditions}
    first = conditions[0]
    return {
        "format": "brats",
        "model": segmenter.name,
        "tta": tta,
        "postprocess": {"threshold": post.threshold, "min_size": post.min_size, "components_3d": post.components_3d},
        "cases": n,
        "resumed": resumed,
        "skipped": skipped,
        "condition": first,
        "per_patient_dice": summary[first]["dice_mean"],
        "per_patient_dice_ci95": summary[first]["dice_ci95"],
        "conditions": summary,
        "per_case": per_case,
    }


def markdown(report: dict, label: str) -> str:
    """The report as two Markdown tables: per condition, then per case."""
    conds = list(report["conditions"])
    lines = [
        f"Whole-tumour Dice on {report['cases']} BraTS-format cases ({label}, TTA {'on' if report['tta'] else 'off'}); [95% bootstrap CI over cases]",
        "",
        "| condition | mean Dice | median | precision | recall | large tumour, empty prediction |",
        "|---|---|---|---|---|---|",
    ]
    for c in conds:
        s = report["conditions"][c]
        lo, hi = s["dice_ci95"]
        lines.append(
            f"| {c} | {s['dice_mean']:.3f} [{lo:.3f}, {hi:.3f}] | {s['dice_median']:.3f} | {s['precision_mean']:.2f} | {s['recall_mean']:.2f} | "
            f"{len(s['empty_on_large_tumour'])} |"
        )
    lines += ["", "| case | " + " | ".join(f"{c} Dice (P / R)" for c in conds) + " | predicted / reference mL |", "|---|" + "---|" * (len(conds) + 1)]
    for name in report["per_case"][conds[0]]:
        cells = [
            f"{report['per_case'][c][name]['dice']:.3f} ({report['per_case'][c][name]['precision']:.2f} / {report['per_case'][c][name]['recall']:.2f})"
            for c in conds
        ]
        r = report["per_case"][conds[0]][name]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['pred_ml']:.1f} / {r['ref_ml']:.1f} |")
    if report["skipped"]:
        lines += ["", "Skipped: " + "; ".join(f"{k}: {v}" for k, v in report["skipped"].items())]
    return "\n".join(lines) + "\n"
