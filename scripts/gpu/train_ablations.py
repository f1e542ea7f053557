"""Ablations and the shipped candidates, trained side by side on one lent GPU in one call.

Every run trains one configuration with ``brainseg.training.trainer.Trainer`` for the same wall-time
budget (``--budget`` seconds; epochs are fitted to it after epoch 2), selects its best epoch
on the validation patients (mean per-patient Dice with all sequences and FLAIR only), then
scores that epoch under the four input conditions. The test patients are not in the packed
cache at all. Runs are independent processes sharing the GPU and the CPU cores.

    python scripts/gpu/train_ablations.py --cache CACHE --out OUT --budget 390 [--runs a,b] [--keep 3]

CPU smoke test: ``--budget 20 --max-steps 2 --runs att_base,upp_sd30``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from brainseg.cli import DOMAIN_SHIFT_PRESET

# name: (model, overrides of augment / preprocess / train / model, budget factor)
RUNS = {
    "att_base": ("attention_unet", {"missing_pre": 0.0, "missing_post": 0.0}, {}, {}, {}, 1.0),
    "att_sd30": ("attention_unet", {}, {}, {}, {}, 1.0),
    "att_sd50": ("attention_unet", {"missing_pre": 0.5, "missing_post": 0.5}, {}, {}, {}, 1.0),
    "att_sd30_z": ("attention_unet", {}, {"normalization": "zscore"}, {}, {}, 1.0),
    "att_sd30_ema": ("attention_unet", {}, {}, {"ema_decay": 0.995}, {}, 1.0),
    "att_sd30_z_ema": ("attention_unet", {}, {"normalization": "zscore"}, {"ema_decay": 0.995}, {}, 1.0),
    "att_sd30_short": ("attention_unet", {}, {}, {}, {}, 0.4),
    "upp_sd30": ("unetpp", {}, {}, {}, {}, 1.0),
    "upp_sd30_ds": ("unetpp", {}, {}, {}, {"deep_supervision": True}, 1.0),
    "upp_sd30_z": ("unetpp", {}, {"normalization": "zscore"}, {}, {}, 1.0),
    # second stage: continue the round-2 best at a low learning rate (fresh cosine schedule)
    "att_sd30_z_ft": ("attention_unet", {}, {"normalization": "zscore"}, {"init_from": "/tmp/abl/att_sd30_z/best.pt", "lr": 3e-4}, {}, 1.0),
    "upp_sd30_z_ft": ("unetpp", {}, {"normalization": "zscore"}, {"init_from": "/tmp/abl/upp_sd30_z/best.pt", "lr": 3e-4}, {}, 1.0),
    "upp_sd30_ds_z_ema": ("unetpp", {}, {"normalization": "zscore"}, {"ema_decay": 0.995}, {"deep_supervision": True}, 1.0),
    # issue 15: each domain-shift augmentation alone, and together (cli.DOMAIN_SHIFT_PRESET), against att_sd30_z
    **{f"att_z_{k}": ("attention_unet", {k: p}, {"normalization": "zscore"}, {}, {}, 1.0) for k, p in DOMAIN_SHIFT_PRESET.items()},
    "att_z_ds": ("attention_unet", dict(DOMAIN_SHIFT_PRESET), {"normalization": "zscore"}, {}, {}, 1.0),
    # issue 15: per-volume vs per-slice z-score, and 256 x 256 input (cache CACHE_s256: python preprocess.py --size 256), against att_sd30_z / att_z_ds
    "att_z_volnorm": ("attention_unet", {}, {"normalization": "zscore_volume"}, {}, {}, 1.0),
    "att_z_ds_volnorm": ("attention_unet", dict(DOMAIN_SHIFT_PRESET), {"normalization": "zscore_volume"}, {}, {}, 1.0),
    "att_z_256": ("attention_unet", {}, {"normalization": "zscore", "input_size": 256}, {}, {}, 1.0),
    # issue 15: 2.5D and 3D at the same budget (3D: 8 patches of 9 slices, BatchNorm recomputed before validation)
    "att_z_ds_ctx1": ("attention_unet", dict(DOMAIN_SHIFT_PRESET, context_dropout=0.2), {"normalization": "zscore"}, {}, {"context": 1, "in_channels": 9}, 1.0),
    "att_z_ds_3d": (
        "attention_unet",
        dict(DOMAIN_SHIFT_PRESET),
        {"normalization": "zscore"},
        {"batch_size": 8, "patch_depth": 9, "precise_bn_batches": 20, "samples_per_epoch": 200},
        {"spatial_dims": 3},
        1.0,
    ),
}


def run_config(name: str, budget: float, max_steps: int, workers: int):
    from brainseg.config import ExperimentConfig

    model, aug, pre, train, mod, factor = RUNS[name]
    train = {k: v for k, v in train.items() if k != "init_from"}
    base = ExperimentConfig()
    return replace(
        base,
        preprocess=replace(base.preprocess, **pre),
        augment=replace(base.augment, **aug),
        model=replace(base.model, name=model, **mod),
        train=replace(
            base.train,
            **{"epochs": 200, "batch_size": 32, "lr": 2e-3, "workers": workers, "time_budget_s": budget * factor, "max_steps": max_steps, "num_threads": 2}
            | train,
        ),
    )


def one(args) -> None:
    import numpy as np
    import torch

    from brainseg.models.checkpoint import load_checkpoint, model_from_checkpoint
    from brainseg.training.cache import load_cache, sized_cache_dir
    from brainseg.training.trainer import Trainer, validation_scores

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.backends.cudnn.benchmark = True
    size = RUNS[args.one][2].get("input_size", 128)
    cache_dir = sized_cache_dir(args.cache, size)
    cache = load_cache(cache_dir)
    split = json.loads((cache_dir / "split.json").read_text())
    if args.max_steps:  # smoke test: a few patients only
        split = {"train": split["train"][:3], "val": split["val"][:1], "test": []}
    cfg = run_config(args.one, args.budget, args.max_steps, args.workers)
    out = Path(args.out) / args.one
    t0 = time.time()
    init = RUNS[args.one][3].get("init_from")
    res = Trainer(cfg, cache, split, out, resume=True, progress=False, init_from=init).fit()
    wall = time.time() - t0
    ckpt = load_checkpoint(out / "best.pt")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scores = validation_scores(model_from_checkpoint(ckpt).to(device), cache, cache.rows(split["val"]), cfg, device)
    summary = {
        "run": args.one,
        "model": cfg.model.name,
        "config": {
            "augment": {k: getattr(cfg.augment, k) for k in ("missing_pre", "missing_post")},
            "normalization": cfg.preprocess.normalization,
            "ema_decay": cfg.train.ema_decay,
            "deep_supervision": cfg.model.deep_supervision,
            "budget_s": cfg.train.time_budget_s,
        },
        "wall_s": round(wall, 1),
        "epochs": res["epochs"],
        "best_epoch": ckpt["epoch"],
        "selection_score": res["best_val_dice"],
        "val_per_patient": scores,
        "val_mean": {c: float(np.mean(list(v.values()))) for c, v in scores.items()},
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: summary[k] for k in ("run", "epochs", "best_epoch", "wall_s", "val_mean")}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=390)
    p.add_argument("--max-steps", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--keep", type=int, default=3, help="best checkpoints kept per architecture")
    p.add_argument("--deadline", type=float, default=None, help="seconds after which unfinished runs are killed (default 1.3 x budget + 40)")
    p.add_argument("--results", default=None, help="folder for the files to bring back")
    p.add_argument("--one", default=None)
    args = p.parse_args()
    if args.one:
        return one(args)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = args.runs.split(",")
    procs = {}
    for name in names:
        cmd = [
            sys.executable,
            "-u",
            __file__,
            "--one",
            name,
            "--cache",
            args.cache,
            "--out",
            args.out,
            "--budget",
            str(args.budget),
            "--max-steps",
            str(args.max_steps),
            "--workers",
            str(args.workers),
        ]
        with open(out / f"{name}.log", "w") as log:  # the child keeps its own copy of the descriptor
            procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + (args.deadline or 1.3 * args.budget + 40)
    while any(pr.poll() is None for pr in procs.values()) and time.time() < deadline:
        time.sleep(5)
    for name, pr in procs.items():
        if pr.poll() is None:
            print(f"{name}: killed at the deadline", flush=True)
            pr.kill()
    rows = []
    for name in names:
        f = out / name / "summary.json"
        if f.is_file():
            rows.append(json.loads(f.read_text()))
        else:
            print(f"{name}: no summary (see {name}.log)", flush=True)
    rows.sort(key=lambda r: -r["selection_score"])
    (out / "summary_all.json").write_text(json.dumps(rows, indent=1))
    print(f"{'run':22s} {'ep':>4s} {'best':>4s} {'wall':>6s}  all    pre-   post-  flair  select")
    for r in rows:
        v = r["val_mean"]
        print(
            f"{r['run']:22s} {r['epochs']:4d} {r['best_epoch']:4d} {r['wall_s']:6.0f}  "
            f"{v['all']:.3f}  {v['pre_missing']:.3f}  {v['post_missing']:.3f}  {v['flair_only']:.3f}  {r['selection_score']:.3f}"
        )
    if args.results:
        res = Path(args.results)
        res.mkdir(parents=True, exist_ok=True)
        for arch in ("attention_unet", "unetpp"):
            for r in [r for r in rows if r["model"] == arch][: args.keep]:
                shutil.copy2(out / r["run"] / "best.pt", res / f"{r['run']}.pt")
        subprocess.run(["tar", "czf", str(res / "results.tar.gz"), "--exclude=*.pt", "-C", str(out.parent), out.name], check=False)


if __name__ == "__main__":
    main()
