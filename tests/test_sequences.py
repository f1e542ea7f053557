"""Missing sequences in training and evaluation; reproducible augmentation; resume equivalence; EMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainseg.config import CONDITIONS, AugmentConfig, ExperimentConfig, ModelConfig, PostprocessConfig, PreprocessConfig, TrainConfig
from brainseg.evaluation.metrics import bootstrap_ci
from brainseg.io.datasets import read_split
from brainseg.models.checkpoint import load_checkpoint
from brainseg.preprocessing import apply_condition, drop_sequences
from brainseg.training.cache import load_cache
from brainseg.training.trainer import SliceDataset, Trainer, update_ema


def _image():
    img = np.zeros((4, 4, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, 20, 30
    return img


def test_conditions_copy_flair_into_missing_channels():
    img = _image()
    assert apply_condition(img, "all") is img
    assert apply_condition(img, "pre_missing")[0, 0].tolist() == [20, 20, 30]
    assert apply_condition(img, "post_missing")[0, 0].tolist() == [10, 20, 20]
    assert apply_condition(img, "flair_only")[0, 0].tolist() == [20, 20, 20]
    # works on stacks (channel last) too
    assert apply_condition(np.stack([img, img]), "flair_only").shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="unknown input condition"):
        apply_condition(img, "t2_only")
    assert set(CONDITIONS) == {"all", "pre_missing", "post_missing", "flair_only"}


def test_sequence_dropout_rates():
    rng = np.random.default_rng(0)
    seen = {"all": 0, "pre_missing": 0, "post_missing": 0, "flair_only": 0}
    for _ in range(4000):
        out = drop_sequences(_image(), rng, 0.3, 0.5)[0, 0].tolist()
        key = {(10, 20, 30): "all", (20, 20, 30): "pre_missing", (10, 20, 20): "post_missing", (20, 20, 20): "flair_only"}[tuple(out)]
        seen[key] += 1
    # independent: P(all) = 0.7 * 0.5, P(pre only) = 0.3 * 0.5, P(post only) = 0.7 * 0.5, P(both) = 0.15
    assert seen["all"] / 4000 == pytest.approx(0.35, abs=0.03)
    assert seen["pre_missing"] / 4000 == pytest.approx(0.15, abs=0.03)
    assert seen["post_missing"] / 4000 == pytest.approx(0.35, abs=0.03)
    assert seen["flair_only"] / 4000 == pytest.approx(0.15, abs=0.03)
    assert drop_sequences(_image(), rng, 0.0, 0.0)[0, 0].tolist() == [10, 20, 30]


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return load_cache(tiny_cache), read_split(tiny_cache / "split.json")


def _cfg(**train):
    return ExperimentConfig(
        preprocess=PreprocessConfig(input_size=32),
        model=ModelConfig(name="attention_unet", features=(4, 8, 16)),
        augment=AugmentConfig(missing_pre=0.5, missing_post=0.5),
        train=TrainConfig(batch_size=4, samples_per_epoch=8, num_threads=1, **train),
    )


def test_augmentation_is_a_function_of_the_sample_seed(tiny):
    cache, split = tiny
    ds = SliceDataset(cache, cache.rows(split["train"]), _cfg(), augment=True)
    a1, m1 = ds.sample(3, 12345)
    a2, m2 = ds.sample(3, 12345)
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    others = [ds.sample(3, s)[0] for s in range(8)]
    assert any(not torch.equal(a1, o) for o in others)
    # the plain view is not augmented
    assert torch.equal(ds[3][0], ds[3][0])


def test_killed_and_resumed_run_ends_where_an_uninterrupted_run_ends(tiny, tmp_path, monkeypatch):
    cache, split = tiny
    full = Trainer(_cfg(epochs=3), cache, split, tmp_path / "full", progress=False)
    full.fit()

    interrupted = Trainer(_cfg(epochs=3), cache, split, tmp_path / "killed", progress=False)
    real_step = Trainer.train_step

    def dying_step(self, x, y):
        if self.step == 5:  # in epoch 3, after epoch 2's checkpoint
            raise KeyboardInterrupt
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    (tmp_path / "killed" / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")  # a kill during a write
    resumed = Trainer(_cfg(epochs=3), cache, split, tmp_path / "killed", resume=True, progress=False)
    assert resumed.epoch == 2 and resumed.step == 4
    assert not list((tmp_path / "killed").glob(".*.tmp")), "orphan temporary files are removed on resume"
    resumed.fit()

    a = load_checkpoint(tmp_path / "full" / "last.pt")["train_model"]
    b = load_checkpoint(tmp_path / "killed" / "last.pt")["train_model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6), k
    assert len(load_checkpoint(tmp_path / "killed" / "last.pt")["history"]) == 3
    # and the weights did move from their initialisation
    torch.manual_seed(42)
    from brainseg.models import build_model

    init = build_model(_cfg().model).state_dict()
    assert any(not torch.allclose(init[k].float(), a[k].float()) for k in a if a[k].is_floating_point())


def test_time_budget_shortens_the_plan(tiny, tmp_path):
    cache, split = tiny
    tr = Trainer(_cfg(epochs=50, time_budget_s=1e-3), cache, split, tmp_path / "b", progress=False)
    res = tr.fit()
    assert res["epochs"] == 3 and tr.planned_epochs == 3  # never fewer than 3


def test_ema_update():
    a, b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        a.weight.fill_(0.0)
        b.weight.fill_(1.0)
    update_ema(a, b, 0.9)
    assert torch.allclose(a.weight, torch.full_like(a.weight, 0.1))
    update_ema(a, b, 0.0)
    assert torch.allclose(a.weight, b.weight)


def test_bootstrap_ci():
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    lo, hi = bootstrap_ci([0.0, 1.0] * 10)
    assert lo < 0.5 < hi and lo > 0.2 and hi < 0.8
    assert all(np.isnan(bootstrap_ci([0.3])))
    assert bootstrap_ci([0.1, 0.9, float("nan"), 0.5], seed=1) == bootstrap_ci([0.1, 0.9, 0.5], seed=1)


def test_a_slice_on_its_own_uses_the_slice_minimum_size():
    from brainseg.inference.backends import binarize, binarize_stack

    prob = np.zeros((3, 10, 10), np.float32)
    prob[:, 2:5, 2:5] = 0.9  # 9 px per slice, 27 voxels in 3D
    post = PostprocessConfig(0.5, min_size=20, components_3d=True, slice_min_size=5)
    assert binarize_stack(prob, post).sum() == 27  # 3D: 27 >= 20 stays
    assert binarize(prob[0], post).sum() == 9  # one slice: 9 >= 5 stays
    assert binarize_stack(prob, PostprocessConfig(0.5, min_size=20)).sum() == 0  # 2D: 9 < 20 goes
    assert binarize(prob[0], PostprocessConfig(0.5, min_size=20)).sum() == 0


def test_a_volume_is_post_processed_in_3d_like_the_evaluation():
    """``predict.segment_volume`` applies the calibrated 3D minimum size, not the single-slice one."""
    from brainseg.inference.predict import segment_volume
    from brainseg.io.volumes import Volume

    prob = np.zeros((3, 10, 10), np.float32)
    prob[:, 2:5, 2:5] = 0.9  # 9 px per slice, 27 voxels in 3D
    prob[1, 7, 7] = 0.9  # a 1-voxel speck

    class Fixed:
        name = "fixed"

        def probabilities(self, images, tta=False, batch_size=16, window=None, stacked=False, only=None, spread=None):
            return [prob[i] for i in (range(len(images)) if only is None else only)]

    vol = Volume(np.zeros((3, 10, 10, 3), np.float32), np.eye(4), (1.0, 1.0, 1.0), (10, 10, 3), "v", ("v.nii.gz",))
    post = PostprocessConfig(0.5, min_size=20, components_3d=True, slice_min_size=1)
    res = segment_volume(Fixed(), vol, post, skip_background=False)  # the volume is blank: every slice would be skipped
    assert res.mask.sum() == 27  # the lesion stays (27 >= 20), the speck goes (1 < 20)
