"""Which domain-shift augmentation pays, alone and together: short continuations on the CPU, one after another.

Every arm continues the same weights (``--init``, e.g. the round-2 Attention U-Net, trained on LGG slices
without any domain-shift augmentation) for the same number of epochs at the same learning rate, seed and
batch size, with sequence dropout kept. Arms differ only in the augmentation they add:

- ``control``: nothing added (so more training alone is measured too); ``control_seed43``: the same with
  another seed, to show how far two runs of one recipe differ;
- one arm per domain-shift augmentation (``cli.DOMAIN_SHIFT_PRESET``, at its preset probability);
- ``all``: the preset together (what ``brainseg train --domain-shift`` trains with);
- ``volume_norm`` / ``volume_norm_all``: ``control`` / ``all`` with each volume's z-score instead of each
  slice's (``--normalization zscore_volume``);
- ``size256``: ``control`` at 256 x 256 input instead of 128 x 128 (the same weights: the networks are
  fully convolutional), from the cache ``CACHE_s256`` (``python preprocess.py --size 256 --cache ...``);
  the same epochs, so about four times the compute.

Each arm's last epoch (fixed compute, no selection on the patients it is scored on) is scored by
``brainseg evaluate`` on the validation patients under five input conditions, at native resolution,
threshold 0.5, no size filter. The table gives every arm's per-patient Dice [95% bootstrap CI] and its
difference to ``control`` paired by patient [95% bootstrap CI]. The test patients are not touched.

    python scripts/cpu_ablations.py --init runs/old_models/attention_unet.pt --out runs/r7 --epochs 3

Re-running continues: a finished arm is skipped, an unfinished one resumes from its ``last.pt``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from brainseg.cli import DOMAIN_SHIFT_PRESET
from brainseg.evaluation.metrics import bootstrap_ci
from brainseg.io.files import write_json_atomic, write_text_atomic
from brainseg.serving.allocator import KEEP_FREED_MB, keep_freed

CONDITIONS = ("all", "flair_only", "skull_stripped", "skull_stripped_flair_only", "brats_like")
ARMS = {"control": {}, "control_seed43": {}, **{k: {k: p} for k, p in DOMAIN_SHIFT_PRESET.items()}, "all": dict(DOMAIN_SHIFT_PRESET)}
ARMS |= {"volume_norm": {}, "volume_norm_all": dict(DOMAIN_SHIFT_PRESET), "size256": {}}
# what an arm is compared with when not the control: the same augmentation with per-slice z-score
REFERENCE = {"volume_norm_all": "all"}
# preprocessing that differs from --init's; another input size reads its own cache, CACHE_s<size>
PREPROCESS = {"volume_norm": {"normalization": "zscore_volume"}, "volume_norm_all": {"normalization": "zscore_volume"}, "size256": {"input_size": 256}}
log = logging.getLogger("cpu_ablations")


def arm_config(init: Path, arm: str, epochs: int, lr: float, batch_size: int):
    from brainseg.config import ExperimentConfig
    from brainseg.models.checkpoint import load_checkpoint

    base = ExperimentConfig.from_dict(load_checkpoint(init)["config"])
    augment = replace(base.augment, **({k: 0.0 for k in DOMAIN_SHIFT_PRESET} | ARMS[arm]))
    train = replace(
        base.train,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=43 if arm.endswith("seed43") else 42,
        time_budget_s=0.0,
        max_steps=0,
        samples_per_epoch=0,
        num_threads=2,
        workers=0,
        ema_decay=0.0,
        checkpoint_every_s=300.0,
    )
    preprocess = replace(base.preprocess, **PREPROCESS.get(arm, {}))
    return replace(base, preprocess=preprocess, augment=augment, train=train)


def train_arm(args, arm: str) -> Path:
    """Train one arm in this process (resuming), returning its last checkpoint."""
    from brainseg.models.checkpoint import load_checkpoint
    from brainseg.training.cache import load_cache, sized_cache_dir
    from brainseg.training.trainer import Trainer

    cfg = arm_config(args.init, arm, args.epochs, args.lr, args.batch_size)
    out = args.out / arm
    last = out / "last.pt"
    if last.is_file() and load_checkpoint(last).get("epoch", 0) >= args.epochs:
        return last
    split = json.loads(Path(args.split).read_text())
    split = {"train": split["train"], "val": split["val"], "test": []}  # the test patients stay untouched
    t0 = time.time()
    size = cfg.preprocess.input_size
    Trainer(cfg, load_cache(sized_cache_dir(args.cache, size)), split, out, resume=True, progress=False, init_from=args.init).fit()
    (out / "wall_s.txt").write_text(f"{time.time() - t0:.0f}\n")
    return last


def score_arm(args, arm: str, last: Path) -> dict:
    report = args.out / arm / "val_report.json"
    if not report.is_file():
        cmd = [sys.executable, "-m", "brainseg.cli", "evaluate", "--checkpoint", str(last), "--torch"]
        cmd += ["--data", str(args.data)] if args.data else []  # else brainseg's own default
        cmd += ["--split", str(args.split), "--subset", "val", "--threshold", "0.5", "--min-size", "0", "--conditions", *CONDITIONS, "--out", str(report)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # brainseg sets the allocator itself
    return json.loads(report.read_text())


def per_patient(report: dict, cond: str) -> dict[str, float]:
    return report["conditions"][cond]["per_patient"]


def cell(v) -> str:
    lo, hi = bootstrap_ci(v)
    return f"{np.mean(v):.3f} [{lo:.2f}, {hi:.2f}]"


def diff(v, ref) -> str:
    d = np.asarray(v) - np.asarray(ref)
    lo, hi = bootstrap_ci(d)
    return f"{d.mean():+.3f} [{lo:+.2f}, {hi:+.2f}]"


def table(reports: dict[str, dict], reference: str = "control") -> str:
    """Per arm and condition: mean per-patient Dice [CI], the difference to the arm's reference (``REFERENCE``,
    else ``reference``) paired by patient [CI], and the share of lesion-free slices with a false positive."""
    lines = ["| arm | against | " + " | ".join(CONDITIONS) + " |", "|---" * (len(CONDITIONS) + 2) + "|"]
    for arm, rep in reports.items():
        against = REFERENCE.get(arm, reference) if arm != reference else None
        base = reports.get(against) if against else None
        cells = []
        for c in CONDITIONS:
            fp = f"FP {rep['conditions'][c]['fp_slice_rate']:.3f}"
            if base is None:
                cells.append(f"{cell(list(per_patient(rep, c).values()))}<br>{fp}")
                continue
            pats = sorted(per_patient(base, c))
            v = [per_patient(rep, c)[p] for p in pats]
            cells.append(f"{cell(v)}<br>{diff(v, [per_patient(base, c)[p] for p in pats])}<br>{fp}")
        lines.append(f"| {arm} | {against if base is not None else '-'} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def finished(out: Path) -> dict[str, dict]:
    """The scored arms of a folder, in ``ARMS`` order."""
    return {a: json.loads((out / a / "val_report.json").read_text()) for a in ARMS if (out / a / "val_report.json").is_file()}


def forest_plot(reports: dict[str, dict], path: Path, reference: str = "control") -> None:
    """One panel per condition: each arm's difference to ``reference``, paired by patient, with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [a for a in reports if a != reference]
    fig, axes = plt.subplots(1, len(CONDITIONS), figsize=(3.2 * len(CONDITIONS), 0.45 * len(arms) + 1.4), sharey=True)
    for ax, c in zip(axes, CONDITIONS, strict=True):
        pats = sorted(per_patient(reports[reference], c))
        for y, arm in enumerate(arms):
            other = reports.get(REFERENCE.get(arm, reference), reports[reference])
            d = np.array([per_patient(reports[arm], c)[p] for p in pats]) - np.array([per_patient(other, c)[p] for p in pats])
            lo, hi = bootstrap_ci(d)
            ax.errorbar(d.mean(), y, xerr=[[d.mean() - lo], [hi - d.mean()]], fmt="o", color="C3" if lo > 0 else "C0" if hi < 0 else "0.3", capsize=3)
        ax.axvline(0, color="0.6", lw=1)
        ax.set_title(c.replace("_", " "), fontsize=10)
        ax.set_xlabel(f"Dice minus {reference} (or as named)")
    axes[0].set_yticks(range(len(arms)), [f"{a} - {REFERENCE[a]}" if a in REFERENCE and REFERENCE[a] in reports else a for a in arms])
    axes[0].invert_yaxis()
    fig.suptitle("Each arm against the control, validation patients, paired by patient (95% bootstrap CI)", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write_summary(out: Path) -> None:
    done = finished(out)
    write_json_atomic(out / "summary.json", {a: {c: per_patient(r, c) for c in CONDITIONS} for a, r in done.items()})
    if "control" in done:
        write_text_atomic(out / "table.md", table(done))
        if len(done) > 1:
            forest_plot(done, out / "table.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--init", type=Path, required=True, help="weights every arm continues from")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cache", default="runs/cache81z")
    p.add_argument("--split", default="models/split.json")
    p.add_argument("--data", default=None, help="the LGG dataset (default: $BRAINSEG_DATA or ../shared/data/lgg/kaggle_3m)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--arms", default=",".join(ARMS))
    p.add_argument("--table-only", action="store_true", help="only (re)write OUT/summary.json and OUT/table.md from the scored arms")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.table_only:
        write_summary(args.out)
        return 0
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"cpu_ablations: unknown arm(s) {unknown}; known: {list(ARMS)}")
    keep_freed(KEEP_FREED_MB)  # the server's allocator setting: 10-18% faster training steps on these cores
    reports = {}
    for i, arm in enumerate(arms, 1):
        log.info("arm %d/%d: %s (%s)", i, len(arms), arm, ARMS[arm] or "no domain-shift augmentation")
        reports[arm] = score_arm(args, arm, train_arm(args, arm))
        write_summary(args.out)
        log.info("arm %s: %s", arm, {c: round(reports[arm]["conditions"][c]["per_patient_dice"], 3) for c in CONDITIONS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
