"""Recompute a checkpoint's BatchNorm statistics over training batches (precise BatchNorm).

    python scripts/precise_bn.py CHECKPOINT OUT --cache runs/cache81z --split models/split.json [--batches 60]

The running statistics are replaced by their plain average over ``--batches`` batches of the split's
training patients, drawn and augmented as in training (``trainer.recompute_batchnorm``); the weights are
unchanged. Only training data is read, so the result can be selected on validation like any checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from brainseg.config import ExperimentConfig
from brainseg.io.datasets import read_split
from brainseg.models.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from brainseg.training.cache import load_cache
from brainseg.training.trainer import SliceDataset, recompute_batchnorm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--split", type=Path, required=True)
    p.add_argument("--batches", type=int, default=60)
    a = p.parse_args(argv)
    ckpt = load_checkpoint(a.checkpoint)
    cfg = ExperimentConfig.from_dict(ckpt["config"])
    cache = load_cache(a.cache)
    rows = cache.rows(read_split(a.split)["train"])
    if len(rows) == 0:
        print(f"{a.split}: its training patients are not in {a.cache}", file=sys.stderr)
        return 2
    model = model_from_checkpoint(ckpt)
    positive = np.asarray([cache.masks[r].any() for r in rows])
    recompute_batchnorm(model, SliceDataset(cache, rows, cfg, augment=True), positive, cfg, a.batches, draw=20_000)
    info = {**ckpt.get("info", {}), "precise_bn": {"batches": a.batches, "batch_size": cfg.train.batch_size, "from": str(a.checkpoint)}}
    save_checkpoint(a.out, {**ckpt, "model": model.state_dict(), "info": info})
    print(f"{a.out}: BatchNorm statistics over {a.batches} training batches of {cfg.train.batch_size}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
