"""Other hospitals' data reproduced on the LGG slices (skull stripping, a larger field of view),
the training that prepares for it, and checkpoints within an epoch."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
from helpers import LGG, require
from scipy import ndimage

from brainseg.config import EVERY_CONDITION, SHIFT_CONDITIONS, AugmentConfig, ExperimentConfig, ModelConfig, PreprocessConfig, TrainConfig
from brainseg.evaluation.protocol import predict_patients
from brainseg.io.datasets import read_split
from brainseg.models.checkpoint import load_checkpoint
from brainseg.preprocessing import apply_condition, brain_mask, normalize, shift_condition, skull_strip, unzoom, zoom_about_centre
from brainseg.training.cache import load_cache
from brainseg.training.trainer import SliceDataset, Trainer

LESION_SLICES = (12, 15, 18)


def _lgg_slice(n: int):
    base = require(LGG / "TCGA_CS_4941_19960909") / f"TCGA_CS_4941_19960909_{n}"
    return tifffile.imread(f"{base}.tif"), tifffile.imread(f"{base}_mask.tif") > 0


@pytest.mark.parametrize("n", LESION_SLICES)
def test_brain_mask_keeps_the_lesion_and_drops_the_scalp(n, shared_data):
    image, lesion = _lgg_slice(n)
    brain = brain_mask(image)
    head = ndimage.binary_fill_holes(image.max(-1) > 20)
    rim = head & ~ndimage.binary_erosion(head, iterations=4)  # the outer 4 pixels of the head: scalp
    assert (brain & lesion).sum() == lesion.sum(), "the lesion is inside the brain"
    assert (brain & rim).sum() < 0.02 * rim.sum(), "the scalp is removed"
    assert 0.4 < brain.sum() / head.sum() < 0.95
    stripped = skull_strip(image)
    assert stripped.dtype == image.dtype and not stripped[~brain].any() and np.array_equal(stripped[brain], image[brain])


def test_brain_mask_of_any_dtype_and_of_nothing():
    img = np.zeros((64, 64, 3), np.uint8)
    assert not brain_mask(img).any()
    yy, xx = np.mgrid[:64, :64]
    head = ((yy - 32) ** 2 + (xx - 32) ** 2 < 28**2).astype(np.uint8) * 60
    head[((yy - 32) ** 2 + (xx - 32) ** 2 < 22**2)] = 150  # brain inside a darker ring
    img = np.stack([head] * 3, -1)
    as_u16 = img.astype(np.uint16) * 200
    assert np.array_equal(brain_mask(img), brain_mask(as_u16))
    assert brain_mask(img)[32, 32] and not brain_mask(img)[32, 3]


def test_every_condition_is_named_and_the_shift_conditions_compose():
    assert EVERY_CONDITION == ("all", "pre_missing", "post_missing", "flair_only", "skull_stripped", "skull_stripped_flair_only", "brats_like")
    rng = np.random.default_rng(0)
    img = np.zeros((64, 64, 3), np.uint8)
    img[8:56, 8:56] = rng.integers(80, 200, (48, 48, 3), dtype=np.uint8)
    stripped, m = shift_condition(img, "skull_stripped")
    assert m is None and np.array_equal(stripped, skull_strip(img)) and np.array_equal(apply_condition(img, "skull_stripped"), stripped)
    flair, _ = shift_condition(img, "skull_stripped_flair_only")
    assert np.array_equal(flair[..., 0], flair[..., 1]) and np.array_equal(flair[..., 2], flair[..., 1])
    smaller, m = shift_condition(img, "brats_like")
    assert m is not None and SHIFT_CONDITIONS["brats_like"][2] < 1
    assert (smaller.max(-1) > 0).sum() < 0.7 * (stripped.max(-1) > 0).sum()


def test_zoom_and_unzoom_put_a_prediction_back_on_its_pixels():
    prob = np.zeros((128, 128), np.float32)
    prob[30:70, 50:90] = 1.0
    small, m = zoom_about_centre(prob, 0.78)
    back = unzoom(small, m)
    assert back.shape == prob.shape
    assert np.abs(back - prob)[35:65, 55:85].max() < 1e-5  # inside: exact
    assert np.mean(np.abs(back - prob)) < 0.02  # edges blurred by two interpolations only


class _BrainIsLesion:
    """A stand-in network: 'lesion' wherever FLAIR is bright; records the images it was given."""

    name, precision = "fake", "fp32"

    def __init__(self):
        self.seen = []

    def probabilities(self, images, tta=False, batch_size=16, window=None, stacked=False, only=None, spread=None):
        self.seen += images
        return [(img[..., 1] > 40).astype(np.float32) for img in images]


def test_brats_like_evaluation_scores_on_the_slice_own_pixels(shared_data):
    from brainseg.io.datasets import discover

    patient = discover(require(LGG / "TCGA_CS_4941_19960909").parent).patient("TCGA_CS_4941_19960909")
    patient.slices = [s for s in patient.slices if s.index in LESION_SLICES]
    fake = _BrainIsLesion()
    [pred] = predict_patients(fake, [patient], progress=False, condition="brats_like")
    assert pred.prob.shape == pred.truth.shape == (3, 256, 256)
    for k, n in enumerate(LESION_SLICES):
        image, _ = _lgg_slice(n)
        brain = brain_mask(image)
        on_pixels = pred.prob[k] > 0.5
        overlap = (on_pixels & brain).sum() / max(on_pixels.sum(), 1)
        assert overlap > 0.9, "the mapped-back prediction lies on the slice's brain, not on the shrunken canvas"
        assert (fake.seen[k].max(-1) > 0).sum() < 0.75 * brain.sum()  # the network saw the smaller brain


def _cfg(augment: AugmentConfig | None = None, **train) -> ExperimentConfig:
    return ExperimentConfig(
        preprocess=PreprocessConfig(input_size=32),
        model=ModelConfig(name="attention_unet", features=(4, 8, 16)),
        train=TrainConfig(batch_size=4, samples_per_epoch=16, num_threads=1, **train),
        augment=augment or AugmentConfig(),
    )


def test_training_draws_the_skull_stripped_rows_with_their_probability(tiny_cache):
    cache = load_cache(tiny_cache)
    assert cache.images_stripped.shape == cache.images.shape
    assert not np.array_equal(cache.images_stripped, cache.images)
    off = dict(hflip=0, affine=0, elastic=0, brightness_contrast=0, gamma=0, noise=0, missing_pre=0, missing_post=0)
    rows = np.arange(6)
    always = SliceDataset(cache, rows, _cfg(AugmentConfig(**off, skull_strip=1.0)), augment=True)
    never = SliceDataset(cache, rows, _cfg(AugmentConfig(**off)), augment=True)
    for pos in range(6):
        x1, _ = always.sample(pos, seed=pos)
        x0, _ = never.sample(pos, seed=pos)
        assert np.allclose(x1.numpy(), normalize(np.asarray(cache.images_stripped[pos]), always.cfg.preprocess))
        assert np.allclose(x0.numpy(), normalize(np.asarray(cache.images[pos]), never.cfg.preprocess))
    half = SliceDataset(cache, rows, _cfg(AugmentConfig(**off, skull_strip=0.5)), augment=True)
    picked = [np.allclose(half.sample(0, seed=s)[0].numpy(), x1_ := normalize(np.asarray(cache.images_stripped[0]), half.cfg.preprocess)) for s in range(40)]
    assert 8 < sum(picked) < 32 and x1_.shape == (3, 32, 32)


def test_domain_shift_augmentations_keep_image_and_mask_together(tiny_cache):
    cache = load_cache(tiny_cache)
    aug = AugmentConfig(skull_strip=0.5, zoom_out=1.0, bias_field=1.0, low_resolution=1.0, blur=1.0)
    ds = SliceDataset(cache, np.arange(24), _cfg(aug), augment=True)
    x, y = ds.sample(3, seed=11)
    x2, y2 = ds.sample(3, seed=11)
    assert torch.equal(x, x2) and torch.equal(y, y2), "the same seed draws the same sample"
    positive = [r for r in range(24) if cache.masks[r].any()]
    shrunk = [ds.sample(r, seed=r)[1].sum().item() for r in positive]
    plain = [float(cache.masks[r].sum()) for r in positive]
    assert np.mean(shrunk) < np.mean(plain), "zoom-out shrinks the lesion with the brain"


def test_validation_scores_the_skull_stripped_slices_when_training_for_them(tiny_cache, tmp_path):
    cache, split = load_cache(tiny_cache), read_split(tiny_cache / "split.json")
    t = Trainer(_cfg(AugmentConfig(skull_strip=0.5), epochs=1), cache, split, tmp_path / "a", progress=False)
    row = t.validation_step()
    assert {"val_dice_all", "val_dice_flair_only", "val_dice_skull_stripped"} <= set(row)
    assert row["val_dice"] == pytest.approx(np.mean([row["val_dice_all"], row["val_dice_flair_only"], row["val_dice_skull_stripped"]]))
    plain = Trainer(_cfg(epochs=1), cache, split, tmp_path / "b", progress=False).validation_step()
    assert "val_dice_skull_stripped" not in plain


def test_a_kill_within_an_epoch_loses_at_most_the_checkpoint_interval_and_resume_ends_the_same(tiny_cache, tmp_path, monkeypatch):
    """Checkpoints after every batch (interval 0+): killed in the middle of epoch 2, resumed, the run ends
    with the weights of an uninterrupted run."""
    cache, split = load_cache(tiny_cache), read_split(tiny_cache / "split.json")
    cfg = _cfg(epochs=3, checkpoint_every_s=1e-9)
    Trainer(cfg, cache, split, tmp_path / "whole", progress=False).fit()
    whole = load_checkpoint(tmp_path / "whole" / "last.pt")

    real_step = Trainer.train_step

    def killed_at_step_6(self, x, y):
        if self.step == 6:  # epoch 2 has 4 batches: 2 done
            raise KeyboardInterrupt
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", killed_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, cache, split, tmp_path / "cut", progress=False).fit()
    saved = load_checkpoint(tmp_path / "cut" / "last.pt")
    assert saved["step"] == 6 and saved["within_epoch"]["batches"] == 2 and saved["epoch"] == 1
    monkeypatch.setattr(Trainer, "train_step", real_step)
    res = Trainer(cfg, cache, split, tmp_path / "cut", resume=True, progress=False).fit()
    assert res["steps"] == whole["step"] == 12
    resumed = load_checkpoint(tmp_path / "cut" / "last.pt")
    for k, v in whole["train_model"].items():
        assert torch.allclose(v.float(), resumed["train_model"][k].float(), atol=1e-6), k
    assert [r["epoch"] for r in resumed["history"]] == [1, 2, 3]
