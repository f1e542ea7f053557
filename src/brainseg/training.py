"""A small trainer, read top to bottom: train_step, validation_step, on_epoch_end.

Whole slices at ``input_size`` (normalised over the whole slice) with foreground-aware
sampling: a ``positive_fraction`` of each epoch's samples are lesion-positive slices,
since ~65% of slices have no lesion. Dice + BCE, AdamW, linear warm-up then cosine decay.
Works on CPU, one GPU (mixed precision), or several GPUs / processes under ``torchrun``
(DistributedDataParallel; gloo on CPU).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from . import __version__
from .cache import Cache
from .checkpoint import load_checkpoint, save_checkpoint
from .config import ExperimentConfig
from .data import write_json_atomic
from .metrics import dice
from .models import build_model, count_parameters
from .preprocessing import build_augmentation, normalize

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data


class SliceDataset(torch.utils.data.Dataset):
    """Rows of the cache -> (3, S, S) float32 image, (1, S, S) float32 mask."""

    def __init__(self, cache: Cache, rows: np.ndarray, cfg: ExperimentConfig, augment: bool):
        self.cache, self.rows, self.cfg = cache, rows, cfg
        self.augment = build_augmentation(cfg.augment) if augment else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        r = self.rows[i]
        image = np.asarray(self.cache.images[r])
        mask = np.asarray(self.cache.masks[r]).astype(np.uint8)
        if self.augment is not None:
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        x = torch.from_numpy(normalize(image, self.cfg.preprocess))
        y = torch.from_numpy(mask[None].astype(np.float32))
        return x, y


def epoch_indices(positive: np.ndarray, n: int, fraction: float, seed: int) -> np.ndarray:
    """``n`` dataset positions for one epoch, ``fraction`` of them lesion-positive.

    Deterministic in ``seed`` so every DDP rank draws the same list and takes its share.
    """
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    n_pos = int(round(n * fraction)) if len(pos) and len(neg) else (n if len(pos) else 0)
    idx = np.concatenate([rng.choice(pos, n_pos, replace=True) if n_pos else np.zeros(0, int), rng.choice(neg, n - n_pos, replace=True) if n - n_pos else np.zeros(0, int)])
    rng.shuffle(idx)
    return idx


# ---------------------------------------------------------------- loss and schedule


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """BCE + (1 - soft Dice), Dice computed over the whole batch (stable on empty slices)."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    soft_dice = (2 * inter + smooth) / (prob.sum() + target.sum() + smooth)
    return bce + (1 - soft_dice)


def lr_factor(step: int, warmup: int, total: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------- distributed


def dist_setup() -> tuple[int, int, torch.device]:
    """(rank, world_size, device) from torchrun's environment; single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    rank = dist.get_rank() if world > 1 else 0
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return rank, world, device


# ---------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: ExperimentConfig, cache: Cache, split: dict, out_dir: os.PathLike | str, resume: bool = False, progress: bool = True):
        self.cfg, self.cache, self.split = cfg, cache, split
        self.out = Path(out_dir)
        self.progress = progress
        self.rank, self.world, self.device = dist_setup()
        tc = cfg.train
        torch.manual_seed(tc.seed)
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)

        self.train_rows = cache.rows(split["train"])
        self.val_rows = cache.rows(split["val"])
        if len(self.train_rows) == 0:
            raise ValueError("no training slices: the split's train patients are not in the cache")
        self.train_set = SliceDataset(cache, self.train_rows, cfg, augment=True)
        self.positive = np.asarray([cache.masks[r].any() for r in self.train_rows])

        self.model = build_model(cfg.model).to(self.device)
        # Training calls every supervision head; DDP only hooks ``forward``, so wrap that call.
        self.heads = Heads(self.model)
        if self.world > 1:
            self.heads = torch.nn.parallel.DistributedDataParallel(self.heads, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
        self.amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)

        n = tc.samples_per_epoch or len(self.train_rows)
        self.samples_per_epoch = n
        self.steps_per_epoch = max(1, n // (tc.batch_size * self.world))
        self.total_steps = tc.max_steps or self.steps_per_epoch * tc.epochs
        self.warmup = max(1, self.steps_per_epoch * tc.warmup_epochs)

        self.epoch, self.step, self.best, self.history = 0, 0, -1.0, []
        if resume and (self.out / "last.pt").is_file():
            self._load(self.out / "last.pt")

    # -- state

    def _ckpt(self, with_optimizer: bool) -> dict:
        ckpt = {
            "config": self.cfg.to_dict(),
            "model": self.model.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "history": self.history,
            "split": self.split,
            "info": {"brainseg_version": __version__, "parameters": count_parameters(self.model), "torch": torch.__version__},
        }
        if with_optimizer:
            ckpt["optimizer"] = self.opt.state_dict()
            ckpt["scaler"] = self.scaler.state_dict()
        return ckpt

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt.get("scaler", {}))
        self.epoch, self.step, self.best, self.history = ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["history"]
        log.info("resumed from %s at epoch %d (best %.4f)", path, self.epoch, self.best)

    # -- steps

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        for g in self.opt.param_groups:
            g["lr"] = self.cfg.train.lr * lr_factor(self.step, self.warmup, self.total_steps)
        with torch.autocast(self.device.type, enabled=self.amp):
            heads = self.heads(x)
            loss = sum(dice_bce_loss(h.float(), y) for h in heads) / len(heads)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step += 1
        return float(loss.detach())

    @torch.inference_mode()
    def validation_step(self) -> dict:
        """Per-patient 3D Dice at network resolution on the validation patients (threshold 0.5)."""
        self.model.eval()
        by_patient: dict[str, tuple[list, list]] = {}
        rows = self.val_rows
        bs = 32
        for s in range(0, len(rows), bs):
            chunk = rows[s : s + bs]
            x = torch.from_numpy(np.stack([normalize(np.asarray(self.cache.images[r]), self.cfg.preprocess) for r in chunk])).to(self.device)
            with torch.autocast(self.device.type, enabled=self.amp):
                prob = torch.sigmoid(self.model(x).float())[:, 0].cpu().numpy()
            for r, p in zip(chunk, prob):
                preds, truths = by_patient.setdefault(self.cache.patients[r], ([], []))
                preds.append(p >= 0.5)
                truths.append(np.asarray(self.cache.masks[r]))
        self.model.train()
        scores = {pid: dice(np.stack(p), np.stack(t)) for pid, (p, t) in by_patient.items()}
        return {"val_dice": float(np.mean(list(scores.values()))) if scores else float("nan")}

    def on_epoch_end(self, row: dict) -> None:
        self.history.append(row)
        if self.rank != 0:
            return
        improved = row["val_dice"] > self.best
        if improved:
            self.best = row["val_dice"]
            save_checkpoint(self.out / "best.pt", self._ckpt(with_optimizer=False))
        save_checkpoint(self.out / "last.pt", self._ckpt(with_optimizer=True))
        write_history(self.out, self.history)
        log.info("epoch %d  loss %.4f  val per-patient Dice %.4f%s", row["epoch"], row["loss"], row["val_dice"], "  (best)" if improved else "")

    # -- loop

    def fit(self) -> dict:
        tc = self.cfg.train
        self.out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            write_json_atomic(self.out / "config.json", self.cfg.to_dict())
        self.model.train()
        while self.step < self.total_steps:
            self.epoch += 1
            idx = epoch_indices(self.positive, self.steps_per_epoch * tc.batch_size * self.world, tc.positive_fraction, tc.seed * 1000 + self.epoch)
            idx = idx[self.rank :: self.world]  # this rank's share
            loader = torch.utils.data.DataLoader(
                torch.utils.data.Subset(self.train_set, idx.tolist()),
                batch_size=tc.batch_size,
                shuffle=False,
                num_workers=0,
                drop_last=True,
                generator=torch.Generator().manual_seed(tc.seed + self.epoch),
            )
            # Augmentation draws from numpy/random: seed them per epoch and rank for reproducibility.
            np.random.seed(tc.seed + 7919 * self.epoch + self.rank)
            random.seed(tc.seed + 7919 * self.epoch + self.rank)
            t0, losses = time.time(), []
            bar = tqdm(loader, desc=f"{self.cfg.model.name} epoch {self.epoch}", unit="batch", disable=not self.progress or self.rank != 0, leave=False)
            for x, y in bar:
                losses.append(self.train_step(x.to(self.device), y.to(self.device)))
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{self.opt.param_groups[0]['lr']:.2e}")
                if self.step >= self.total_steps:
                    break
            row = {"epoch": self.epoch, "step": self.step, "loss": float(np.mean(losses)) if losses else float("nan"), "lr": self.opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 1)}
            if self.epoch % tc.val_every == 0 or self.step >= self.total_steps:
                row.update(self.validation_step())
            else:
                row["val_dice"] = float("nan")
            self.on_epoch_end(row)
        if self.rank == 0 and not (self.out / "best.pt").is_file():
            save_checkpoint(self.out / "best.pt", self._ckpt(with_optimizer=False))
        return {"best_val_dice": self.best, "epochs": self.epoch, "steps": self.step}


class Heads(torch.nn.Module):
    """``forward`` = the model's ``forward_heads`` (list of logits), for DDP and deep supervision."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_heads(x)


def write_history(out: Path, history: list[dict]) -> None:
    """history.csv and training_curves.png."""
    keys = list(dict.fromkeys(k for row in history for k in row))
    tmp = out / ".history.csv.tmp"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)
    os.replace(tmp, out / "history.csv")
    plot_curves(history, out / "training_curves.png")


def plot_curves(history: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in history]
    fig, ax1 = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax1.plot(ep, [r["loss"] for r in history], color="tab:blue", label="train loss (Dice + BCE)")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("train loss", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(ep, [r.get("val_dice", float("nan")) for r in history], color="tab:red", marker="o", ms=3, label="val per-patient Dice")
    ax2.set_ylabel("val per-patient Dice", color="tab:red")
    ax2.set_ylim(0, 1)
    ax1.set_title(title or "training curves")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
