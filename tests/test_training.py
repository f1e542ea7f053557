import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from brainseg.config import ExperimentConfig, ModelConfig, PreprocessConfig, TrainConfig
from brainseg.io.datasets import read_split
from brainseg.models.checkpoint import load_checkpoint
from brainseg.training.cache import load_cache
from brainseg.training.trainer import Trainer, dice_bce_loss, epoch_indices, lr_factor


def _cfg(**train):
    return ExperimentConfig(
        preprocess=PreprocessConfig(input_size=32),
        model=ModelConfig(name="attention_unet", features=(4, 8, 16)),
        train=TrainConfig(batch_size=4, samples_per_epoch=8, num_threads=1, **train),
    )


def test_cache_layout(tiny_cache):
    c = load_cache(tiny_cache)
    assert c.images.shape == (24, 32, 32, 3) and c.images.dtype == np.uint8
    assert c.masks.shape == (24, 32, 32) and c.masks.dtype == bool
    assert c.masks.reshape(24, -1).any(1).sum() == 12
    assert c.slices[:6] == [1, 2, 3, 4, 5, 6]


def test_loss_and_schedule():
    logits = torch.full((1, 1, 4, 4), 10.0)
    perfect = dice_bce_loss(logits, torch.ones(1, 1, 4, 4))
    wrong = dice_bce_loss(logits, torch.zeros(1, 1, 4, 4))
    assert perfect < 0.01 and wrong > 5
    assert lr_factor(0, 10, 100) == pytest.approx(0.1)
    assert lr_factor(10, 10, 100) == pytest.approx(1.0)
    assert lr_factor(100, 10, 100) == pytest.approx(0.0, abs=1e-9)


def test_epoch_indices_foreground_fraction():
    positive = np.array([True] * 10 + [False] * 90)
    idx = epoch_indices(positive, 1000, 0.5, seed=3)
    assert len(idx) == 1000 and positive[idx].mean() == pytest.approx(0.5, abs=0.01)
    assert np.array_equal(idx, epoch_indices(positive, 1000, 0.5, seed=3))


def test_train_writes_checkpoints_log_and_resumes(tiny_cache, tmp_path):
    split = read_split(tiny_cache / "split.json")
    cache = load_cache(tiny_cache)
    out = tmp_path / "run"
    res = Trainer(_cfg(epochs=2), cache, split, out, progress=False).fit()
    assert res["epochs"] == 2 and res["steps"] == 4
    for f in ["best.pt", "last.pt", "history.csv", "training_curves.png", "config.json"]:
        assert (out / f).is_file(), f
    rows = list(csv.DictReader((out / "history.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    ckpt = load_checkpoint(out / "best.pt")
    assert ckpt["config"]["preprocess"]["input_size"] == 32  # the checkpoint alone rebuilds the preprocessing
    assert "optimizer" in load_checkpoint(out / "last.pt")
    # --resume continues from last.pt to the new total
    res2 = Trainer(_cfg(epochs=3), cache, split, out, resume=True, progress=False).fit()
    assert res2["epochs"] == 3 and res2["steps"] == 6
    assert len(list(csv.DictReader((out / "history.csv").open()))) == 3
    assert not list(out.glob(".*tmp"))


@pytest.mark.parametrize("model", ["unetpp"])
def test_ddp_two_gloo_processes_agree(tiny_cache, tmp_path, model):
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(Path(__file__).with_name("ddp_worker.py")),
        str(tiny_cache),
        str(out),
        model,
    ]
    subprocess.run(cmd, check=True, env=env, timeout=240, capture_output=True)
    a, b = torch.load(out / "rank0.pt"), torch.load(out / "rank1.pt")
    start = ExperimentConfig(model=ModelConfig(name=model, features=(4, 8, 16), deep_supervision=True))
    assert a.keys() == b.keys()
    # Weights must agree (gradients are all-reduced). BatchNorm running statistics are
    # broadcast from rank 0 at each forward, so rank 1's differ by its own last batch;
    # only rank 0 writes checkpoints.
    from brainseg.models import build_model

    params = {n for n, _ in build_model(start.model).named_parameters()}
    for k in params:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # and training actually changed the weights
    torch.manual_seed(0)
    fresh = build_model(start.model).state_dict()
    assert any(not torch.allclose(fresh[k].float(), a[k].float()) for k in a if a[k].is_floating_point())
