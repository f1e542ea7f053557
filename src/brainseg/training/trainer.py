"""A small trainer, read top to bottom: train_step, validation_step, on_epoch_end.

Whole slices at ``input_size`` (normalised over the whole slice) with foreground-aware
sampling: a ``positive_fraction`` of each epoch's samples are lesion-positive slices,
since ~65% of slices have no lesion. Dice + BCE, AdamW, linear warm-up then cosine decay.
Works on CPU, one GPU (mixed precision), or several GPUs / processes under ``torchrun``
(DistributedDataParallel; gloo on CPU).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from .. import __version__
from ..config import CONDITIONS, SHIFT_CONDITIONS, ExperimentConfig
from ..display.visualize import save_figure
from ..evaluation.metrics import dice
from ..io.files import write_json_atomic, write_text_atomic
from ..models import build_model, count_parameters
from ..models.blocks import inflate_2d
from ..models.checkpoint import load_checkpoint, save_checkpoint
from ..preprocessing import apply_condition, build_augmentation, context_stack, drop_sequences, normalize, over_slabs, per_slice
from .cache import Cache

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- data


class SliceDataset(torch.utils.data.Dataset):
    """Rows of the cache -> (3, S, S) float32 image, (1, S, S) float32 mask; for a 3D model, the
    ``patch_depth`` consecutive slices centred on the row: (3, D, S, S) and (1, D, S, S) (clamped
    at the patient's first and last slice, as a 2.5D input is).

    ``sample(pos, seed)`` is the training view: augmentation and sequence dropout drawn
    from ``seed`` alone, so a sample is the same whichever worker or run (resumed or not)
    draws it. ``dataset[pos]`` is the plain view.
    """

    def __init__(self, cache: Cache, rows: np.ndarray, cfg: ExperimentConfig, augment: bool):
        self.cache, self.rows, self.cfg = cache, rows, cfg
        self.depth = patch_depth(cfg) if cfg.model.spatial_dims == 3 else 0
        channels = 3 * self.depth if self.depth else cfg.model.in_channels
        self.augment = build_augmentation(cfg.augment, channels) if augment else None
        k = self.depth // 2 if self.depth else cfg.model.context
        self.context = cache.context_rows(k) if k or self.depth else None
        # zscore_volume: each patient's statistics, of its slices as cached and as skull-stripped
        self.stats = {s: cache.patient_stats(s) for s in (False, True)} if cfg.preprocess.normalization == "zscore_volume" else None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, pos: int):
        return self.sample(pos, None)

    def sample(self, pos: int, seed: int | None):
        r = self.rows[pos]
        a = self.cfg.augment
        stripped = self.augment is not None and seed is not None and a.skull_strip > 0 and np.random.default_rng([seed, 2]).random() < a.skull_strip
        images = self.cache.images_stripped if stripped else self.cache.images
        image = np.asarray(images[r]) if self.context is None else self.with_context(images, r, seed)
        if self.depth:  # every slice's mask, as channels, so the augmentation moves them together
            mask = np.stack([np.asarray(self.cache.masks[j]) for j in self.context[r]], axis=-1).astype(np.uint8)
        else:
            mask = np.asarray(self.cache.masks[r]).astype(np.uint8)
        if self.augment is not None and seed is not None:
            seed_augmentation(self.augment, seed)
            out = self.augment(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
            a = self.cfg.augment
            image = drop_sequences(image, np.random.default_rng([seed, 1]), a.missing_pre, a.missing_post)
        x = torch.from_numpy(normalize(image, self.cfg.preprocess, self.volume_stats(r, stripped, image)))
        if self.depth:  # (3D, S, S) slice-major channels -> (3, D, S, S); (S, S, D) masks -> (1, D, S, S)
            x = x.reshape(self.depth, 3, *x.shape[1:]).transpose(0, 1).contiguous()
            return x, torch.from_numpy(np.moveaxis(mask, -1, 0)[None].astype(np.float32))
        return x, torch.from_numpy(mask[None].astype(np.float32))

    def volume_stats(self, r: int, stripped: bool, image: np.ndarray) -> np.ndarray | None:
        """``zscore_volume``: the patient's statistics; a sequence that dropout replaced by FLAIR takes
        FLAIR's, as the whole volume's would be at inference (None: the slice is normalised alone)."""
        if self.stats is None:
            return None
        stats = self.stats[stripped][self.cache.patients[r]].copy()
        for c in (0, 2):
            if np.array_equal(image[..., c], image[..., 1]):
                stats[c] = stats[1]
        return stats

    def with_context(self, images: np.ndarray, r: int, seed: int | None) -> np.ndarray:
        """The 2.5D input of row ``r``; in training, with probability ``context_dropout`` the
        lone-slice fallback (the slice repeated) instead."""
        rows = self.context[r]
        p = 0.0 if self.depth else self.cfg.augment.context_dropout
        if self.augment is not None and seed is not None and p > 0 and np.random.default_rng([seed, 3]).random() < p:
            rows = np.full_like(rows, r)
        return context_stack([np.asarray(images[j]) for j in rows])


def patch_depth(cfg: ExperimentConfig) -> int:
    d = cfg.train.patch_depth
    if d < 1 or d % 2 == 0:
        raise ValueError(f"patch_depth must be odd and positive (slices centred on one), not {d}")
    return d


class EpochSamples(torch.utils.data.Dataset):
    """One epoch's draw: item ``k`` is ``base[positions[k]]`` augmented with its own seed."""

    def __init__(self, base: SliceDataset, positions: np.ndarray, seeds: np.ndarray):
        self.base, self.positions, self.seeds = base, positions, seeds

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, k: int):
        return self.base.sample(int(self.positions[k]), int(self.seeds[k]))


def seed_augmentation(compose, seed: int) -> None:
    """Give each transform of an albumentations Compose its own generator derived from ``seed``."""
    compose.set_random_seed(seed)
    for k, t in enumerate(compose.transforms):
        t.set_random_seed(int(np.random.SeedSequence([seed, k]).generate_state(1)[0]))


def sample_seeds(seed: int, epoch: int, n: int) -> np.ndarray:
    """One augmentation seed per sample of an epoch, fixed by (run seed, epoch)."""
    return np.random.SeedSequence([seed, epoch]).generate_state(n, dtype=np.uint32).astype(np.int64)


def _worker_init(_):
    import cv2

    cv2.setNumThreads(1)
    torch.set_num_threads(1)


def epoch_indices(positive: np.ndarray, n: int, fraction: float, seed: int) -> np.ndarray:
    """``n`` dataset positions for one epoch, ``fraction`` of them lesion-positive.

    Deterministic in ``seed`` so every DDP rank draws the same list and takes its share.
    """
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(positive), np.flatnonzero(~positive)
    n_pos = int(round(n * fraction)) if len(pos) and len(neg) else (n if len(pos) else 0)
    idx = np.concatenate(
        [rng.choice(pos, n_pos, replace=True) if n_pos else np.zeros(0, int), rng.choice(neg, n - n_pos, replace=True) if n - n_pos else np.zeros(0, int)]
    )
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
    # Conditions validated every epoch; the best epoch is chosen on their mean, so the
    # shipped weights work both with all sequences and with FLAIR alone.
    SELECT_ON = ("all", "flair_only")

    def __init__(
        self,
        cfg: ExperimentConfig,
        cache: Cache,
        split: dict,
        out_dir: os.PathLike | str,
        resume: bool = False,
        progress: bool = True,
        init_from: os.PathLike | str | None = None,
    ):
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
        self.ema = build_model(cfg.model).to(self.device) if tc.ema_decay > 0 else None
        if self.ema is not None:
            self.ema.load_state_dict(self.model.state_dict())
            self.ema.requires_grad_(False)
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
        self.planned_epochs = tc.epochs
        self.total_steps = tc.max_steps or self.steps_per_epoch * tc.epochs
        self.warmup = max(1, self.steps_per_epoch * tc.warmup_epochs)

        self.epoch, self.step, self.best, self.history = 0, 0, -1.0, []
        self.resume_batches, self.resume_losses, self.epoch_start_step = 0, [], 0
        self.out.mkdir(parents=True, exist_ok=True)
        remove_orphan_temporaries(self.out)
        self.init_from = str(init_from) if init_from else None
        if resume and (self.out / "last.pt").is_file():
            self._load(self.out / "last.pt")
        elif init_from:
            self._init_weights(Path(init_from))

    # -- state

    @property
    def eval_model(self) -> torch.nn.Module:
        """The weights that are validated and shipped: the EMA if enabled."""
        return self.ema if self.ema is not None else self.model

    def _ckpt(self, with_optimizer: bool) -> dict:
        ckpt = {
            "config": self.cfg.to_dict(),
            "model": self.eval_model.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best": self.best,
            "history": self.history,
            "split": self.split,
            "info": {
                "brainseg_version": __version__,
                "parameters": count_parameters(self.model),
                "torch": torch.__version__,
                "device": str(self.device),
                "init_from": self.init_from,
            },
        }
        if with_optimizer:
            ckpt["train_model"] = self.model.state_dict()
            ckpt["optimizer"] = self.opt.state_dict()
            ckpt["scaler"] = self.scaler.state_dict()
            ckpt["planned_epochs"] = self.planned_epochs
            ckpt["total_steps"] = self.total_steps
        return ckpt

    def _load(self, path: Path) -> None:
        ckpt = load_checkpoint(path)
        self.model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
        if self.ema is not None:
            self.ema.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt.get("scaler", {}))
        self.epoch, self.step, self.best, self.history = ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["history"]
        within = ckpt.get("within_epoch") or {}
        self.resume_batches, self.resume_losses = int(within.get("batches", 0)), list(within.get("losses", []))
        if ckpt["config"]["train"]["epochs"] == self.cfg.train.epochs:  # same run: keep a budget-shortened plan
            self.planned_epochs = ckpt.get("planned_epochs", self.planned_epochs)
            self.total_steps = ckpt.get("total_steps", self.total_steps)
        log.info("resumed from %s at epoch %d (best %.4f)", path, self.epoch, self.best)

    def _init_weights(self, path: Path) -> None:
        """Start from another run's weights (same architecture), with this run's own schedule."""
        ckpt = load_checkpoint(path)
        theirs = ckpt["config"]["model"]
        if theirs["name"] != self.cfg.model.name or tuple(theirs["features"]) != tuple(self.cfg.model.features):
            raise ValueError(
                f"{path}: weights of {theirs['name']} {tuple(theirs['features'])}, but this run trains {self.cfg.model.name} {self.cfg.model.features}"
            )
        if ExperimentConfig.from_dict(ckpt["config"]).preprocess != self.cfg.preprocess:
            log.warning("%s was trained with preprocessing %s; this run uses %s", path, ckpt["config"]["preprocess"], self.cfg.preprocess)
        state = expand_input_channels(ckpt["model"], self.model.state_dict(), self.cfg.model.context)
        if self.cfg.model.spatial_dims == 3 and theirs.get("spatial_dims", 2) == 2:
            state = inflate_2d(state, self.model.state_dict())
        self.model.load_state_dict(state)
        if self.ema is not None:
            self.ema.load_state_dict(state)
        log.info("initialised from %s (epoch %s of that run)", path, ckpt.get("epoch"))

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
        if self.ema is not None:
            update_ema(self.ema, self.model, self.cfg.train.ema_decay)
        return float(loss.detach())

    @torch.inference_mode()
    def validation_step(self, conditions=None) -> dict:
        """Per-patient 3D Dice at network resolution (threshold 0.5) on the validation patients, per input condition.

        ``val_dice`` (what picks ``best.pt``) is the mean over ``SELECT_ON``, plus the skull-stripped
        slices when the run trains on them (``augment.skull_strip`` > 0)."""
        if conditions is None:
            conditions = self.SELECT_ON + (("skull_stripped",) if self.cfg.augment.skull_strip > 0 else ())
        scores = validation_scores(self.eval_model, self.cache, self.val_rows, self.cfg, self.device, conditions)
        row = {f"val_dice_{c}": float(np.mean(list(v.values()))) if v else float("nan") for c, v in scores.items()}
        row["val_dice"] = float(np.mean([row[f"val_dice_{c}"] for c in conditions]))
        return row

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
        log.info(
            "epoch %d/%d  loss %.4f  val per-patient Dice %.4f%s",
            row["epoch"],
            self.planned_epochs,
            row["loss"],
            row["val_dice"],
            "  (best)" if improved else "",
        )

    def fit_budget(self, started: float, epoch1_end: float) -> None:
        """With ``time_budget_s``: after epoch 2, fewer epochs if the planned ones would not fit.

        Epoch 2's duration is the estimate (epoch 1 pays start-up costs).
        """
        tc = self.cfg.train
        if tc.time_budget_s <= 0 or tc.max_steps or self.epoch != 2:
            return
        per_epoch = time.time() - epoch1_end
        fit = max(3, 2 + int((tc.time_budget_s - (time.time() - started)) / per_epoch))
        if fit < self.planned_epochs:
            log.info("time budget %.0f s at %.1f s/epoch: %d epochs instead of %d", tc.time_budget_s, per_epoch, fit, self.planned_epochs)
            self.planned_epochs = fit
            self.total_steps = self.steps_per_epoch * fit

    # -- loop

    def save_within_epoch(self, losses: list[float]) -> None:
        """``last.pt`` in the middle of an epoch (``checkpoint_every_s``): a kill loses at most that much.

        The epoch's draw is fixed by (seed, epoch), so ``--resume`` skips the batches already
        trained on and the run ends where an uninterrupted one ends."""
        if self.rank != 0:
            return
        done = self.step - self.epoch_start_step
        ckpt = self._ckpt(with_optimizer=True)
        ckpt["epoch"] = self.epoch - 1  # the epoch is not finished: resume re-enters it
        ckpt["within_epoch"] = {"batches": done, "losses": [float(v) for v in losses]}
        save_checkpoint(self.out / "last.pt", ckpt)
        log.info("checkpoint within epoch %d after %d batches", self.epoch, done)

    def epoch_loader(self) -> torch.utils.data.DataLoader:
        """This epoch's samples: foreground-aware draw, each with its own augmentation seed
        (without the first ``resume_batches`` when resuming within the epoch)."""
        tc = self.cfg.train
        n = self.steps_per_epoch * tc.batch_size * self.world
        idx = epoch_indices(self.positive, n, tc.positive_fraction, tc.seed * 1000 + self.epoch)
        seeds = sample_seeds(tc.seed, self.epoch, n)
        skip = self.resume_batches * tc.batch_size * self.world
        idx, seeds = idx[skip:], seeds[skip:]
        self.epoch_start_step = self.step - self.resume_batches
        self.resume_batches = 0
        mine = slice(self.rank, None, self.world)  # this rank's share
        return torch.utils.data.DataLoader(
            EpochSamples(self.train_set, idx[mine], seeds[mine]),
            batch_size=tc.batch_size,
            shuffle=False,
            num_workers=tc.workers,
            worker_init_fn=_worker_init if tc.workers else None,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
        )

    def fit(self) -> dict:
        if self.rank == 0:
            write_json_atomic(self.out / "config.json", self.cfg.to_dict())
        self.model.train()
        started = time.time()
        epoch0 = self.epoch
        while self.step < self.total_steps:
            self.epoch += 1
            t0, losses = time.time(), []
            bar = tqdm(
                self.epoch_loader(), desc=f"{self.cfg.model.name} epoch {self.epoch}", unit="batch", disable=not self.progress or self.rank != 0, leave=False
            )
            losses, last_save = list(self.resume_losses), time.time()
            for x, y in bar:
                losses.append(self.train_step(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)))
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", lr=f"{self.opt.param_groups[0]['lr']:.2e}")
                if self.step >= self.total_steps:
                    break
                if self.cfg.train.checkpoint_every_s > 0 and time.time() - last_save >= self.cfg.train.checkpoint_every_s:
                    self.save_within_epoch(losses)
                    last_save = time.time()
            self.resume_losses = []
            row = {
                "epoch": self.epoch,
                "step": self.step,
                "loss": float(np.mean(losses)) if losses else float("nan"),
                "lr": self.opt.param_groups[0]["lr"],
                "seconds": round(time.time() - t0, 1),
            }
            if self.epoch % self.cfg.train.val_every == 0 or self.step >= self.total_steps:
                if self.cfg.train.precise_bn_batches:
                    recompute_batchnorm(self.eval_model, self.train_set, self.positive, self.cfg, self.cfg.train.precise_bn_batches, 10_000 + self.epoch)
                row.update(self.validation_step())
            else:
                row["val_dice"] = float("nan")
            if self.epoch - epoch0 == 1:
                epoch1_end = time.time()
            if self.epoch - epoch0 == 2 and epoch0 == 0:
                self.fit_budget(started, epoch1_end)
            self.on_epoch_end(row)
            if self.cfg.train.time_budget_s and self.epoch >= 3 and time.time() - started > 1.25 * self.cfg.train.time_budget_s:
                log.warning("stopping at epoch %d: 25%% over the time budget", self.epoch)
                break
        if self.rank == 0 and not (self.out / "best.pt").is_file():
            save_checkpoint(self.out / "best.pt", self._ckpt(with_optimizer=False))
        return {"best_val_dice": self.best, "epochs": self.epoch, "steps": self.step}


def recompute_batchnorm(model: torch.nn.Module, dataset: SliceDataset, positive: np.ndarray, cfg: ExperimentConfig, batches: int, draw: int) -> None:
    """Precise BatchNorm (Wu and Johnson, "Rethinking 'Batch' in BatchNorm", 2021; SWA's ``update_bn``): the running
    statistics recomputed as the plain average over ``batches`` training batches (the training draw and augmentation,
    fixed by the run's seed and ``draw``) with the weights as they are. With a batch of two 3D patches the running
    statistics (momentum 0.1) follow the last few steps, and the validation Dice swings with them."""
    tc = cfg.train
    n = batches * tc.batch_size
    loader = torch.utils.data.DataLoader(
        EpochSamples(dataset, epoch_indices(positive, n, tc.positive_fraction, tc.seed * 1000 + draw), sample_seeds(tc.seed, draw, n)),
        batch_size=tc.batch_size,
    )
    device = next(model.parameters()).device
    torch.optim.swa_utils.update_bn(loader, model, device)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema = decay * ema + (1 - decay) * model, for parameters and float buffers (BatchNorm statistics)."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=False):
        if e.dtype.is_floating_point:
            e.lerp_(m, 1.0 - decay)
        else:
            e.copy_(m)


@torch.inference_mode()
def validation_scores(
    model: torch.nn.Module, cache: Cache, rows: np.ndarray, cfg: ExperimentConfig, device: torch.device, conditions=tuple(CONDITIONS), batch_size: int = 64
) -> dict[str, dict[str, float]]:
    """{condition: {patient: 3D Dice}} at network resolution, threshold 0.5."""
    was_training = model.training
    model.eval()
    truth: dict[str, list] = {}
    for r in rows:
        truth.setdefault(cache.patients[r], []).append(np.asarray(cache.masks[r]))
    predict = _predict_volumes if cfg.model.spatial_dims == 3 else _predict_slices
    out: dict[str, dict[str, float]] = {}
    for cond in conditions:
        images, channels, stripped = cache.images, cond, False
        if cond in SHIFT_CONDITIONS:  # skull-stripped: the cached stripped slices, then the channel condition
            channels, _, zoom = SHIFT_CONDITIONS[cond]
            if zoom != 1.0:
                raise ValueError(f"validation cannot score {cond!r}: its prediction needs mapping back (use brainseg evaluate)")
            images, stripped = cache.images_stripped, True

        stats = _condition_stats(cache, rows, stripped, channels) if cfg.preprocess.normalization == "zscore_volume" else {}

        def inputs(rs, images=images, channels=channels, stats=stats) -> np.ndarray:
            return np.stack(
                [
                    normalize(per_slice(np.asarray(images[r]), lambda img: apply_condition(img, channels)), cfg.preprocess, stats.get(cache.patients[r]))
                    for r in rs
                ]
            )

        preds = predict(model, cache, rows, cfg, device, inputs, batch_size)
        out[cond] = {pid: dice(np.stack(p), np.stack(truth[pid])) for pid, p in preds.items()}
    model.train(was_training)
    return out


def _condition_stats(cache: Cache, rows, stripped: bool, channels: str) -> dict[str, np.ndarray]:
    """``zscore_volume`` in validation: each patient's statistics over its slices under the channel
    condition, which only reorders the sequences (``config.CONDITIONS``), so it reorders their statistics."""
    order = list(CONDITIONS[channels])
    return {p: s[order] for p, s in cache.patient_stats(stripped, rows).items()}


def _logits(model: torch.nn.Module, x: np.ndarray, device: torch.device) -> np.ndarray:
    with torch.autocast(device.type, enabled=device.type == "cuda"):
        return model(torch.from_numpy(x).to(device)).float()[:, 0].cpu().numpy()


def _predict_slices(model, cache: Cache, rows, cfg: ExperimentConfig, device, inputs, batch_size: int) -> dict[str, list]:
    """{patient: [mask of each slice]}: the 2D / 2.5D network on batches of slices."""
    context = cache.context_rows(cfg.model.context) if cfg.model.context else None
    preds: dict[str, list] = {}
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        # 2.5D: each slice with its neighbours, (B, 3 (2k + 1), S, S)
        x = inputs(chunk) if context is None else np.stack([np.concatenate(list(inputs(context[r])), axis=0) for r in chunk])
        for r, logit in zip(chunk, _logits(model, x, device), strict=True):
            preds.setdefault(cache.patients[r], []).append(logit >= 0)
    return preds


def _predict_volumes(model, cache: Cache, rows, cfg: ExperimentConfig, device, inputs, batch_size: int) -> dict[str, list]:
    """{patient: [mask of each slice]}: the 3D network on each patient's stack, in slabs (``over_slabs``)."""
    by_patient: dict[str, list[int]] = {}
    for r in rows:
        by_patient.setdefault(cache.patients[r], []).append(int(r))
    preds: dict[str, list] = {}
    for pid, rs in by_patient.items():
        x = np.moveaxis(inputs(rs), 0, 1)  # (3, D, S, S)
        logits = over_slabs(len(rs), lambda start, stop, x=x: _logits(model, x[None, :, start:stop], device)[0])
        preds[pid] = list(logits >= 0)
    return preds


def expand_input_channels(theirs: dict, ours: dict, context: int) -> dict:
    """2D weights -> a 2.5D model's starting weights: every tensor that reads the 3 input channels
    gets the 2D weights on the centre slice's channels and zeros on the neighbours', so the
    2.5D model starts as exactly the 2D model and learns what the neighbours add."""
    if not context:
        return theirs
    out = dict(theirs)
    for key, w in theirs.items():
        if key in ours and w.ndim == 4 and w.shape[1] == 3 and ours[key].shape[1] == 3 * (2 * context + 1):
            grown = torch.zeros_like(ours[key])
            grown[:, 3 * context : 3 * context + 3] = w
            out[key] = grown
    return out


def remove_orphan_temporaries(folder: Path) -> None:
    """Temporary files of checkpoint / history / curve writes (``data.write_bytes_atomic``) that a kill left behind."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


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
    text = io.StringIO(newline="")
    w = csv.DictWriter(text, fieldnames=keys)
    w.writeheader()
    w.writerows(history)
    write_text_atomic(out / "history.csv", text.getvalue())
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
    save_figure(fig, path)
