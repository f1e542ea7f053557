"""Per-volume z-score (``zscore_volume``, issue 15): the statistics of the whole volume in training,
validation and inference; a lone slice falls back to its own statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from brainseg.config import AugmentConfig, ExperimentConfig, ModelConfig, PreprocessConfig, TrainConfig
from brainseg.io.datasets import read_split
from brainseg.preprocessing import normalize, prepare, volume_stats
from brainseg.training.cache import load_cache
from brainseg.training.trainer import SliceDataset, Trainer, validation_scores

VOLUME = PreprocessConfig(input_size=32, normalization="zscore_volume")


def _volume(seed: int = 0, n: int = 7, size: int = 40) -> list[np.ndarray]:
    """Slices whose brightness differs from slice to slice, so per-slice and per-volume z-scores differ."""
    rng = np.random.default_rng(seed)
    return [np.clip(rng.normal(40 + 20 * z, 15 + 4 * z, (size, size, 3)), 0, 255).astype(np.uint8) for z in range(n)]


def test_volume_stats_are_the_statistics_of_every_pixel():
    vol = _volume()
    flat = np.stack(vol).reshape(-1, 3).astype(np.float64)
    assert np.allclose(volume_stats(vol), np.stack([flat.mean(0), flat.std(0)], axis=1), atol=1e-9)
    with pytest.raises(ValueError, match="no slices"):
        volume_stats([])


def test_a_volume_is_normalised_as_a_whole_and_a_lone_slice_alone():
    vol = _volume()
    stats = volume_stats(vol)
    x = np.stack([normalize(s, VOLUME, stats) for s in vol], axis=1).reshape(3, -1)
    assert np.allclose(x.mean(1), 0, atol=1e-5) and np.allclose(x.std(1), 1, atol=1e-5)
    lone = normalize(vol[0], VOLUME)
    assert np.array_equal(lone, normalize(vol[0], PreprocessConfig(input_size=32, normalization="zscore")))
    assert not np.allclose(lone, normalize(vol[0], VOLUME, stats), atol=0.1)  # the volume's statistics change the input
    # a 2.5D input (three slices as nine channels) takes each sequence's statistics in every slice
    nine = normalize(np.concatenate(vol[:3], axis=-1), VOLUME, stats)
    assert np.allclose(nine[3:6], normalize(vol[1], VOLUME, stats))


@pytest.fixture(scope="module")
def tiny(tiny_cache):
    return load_cache(tiny_cache), read_split(tiny_cache / "split.json")


def _cfg(**augment) -> ExperimentConfig:
    return ExperimentConfig(
        preprocess=VOLUME,
        model=ModelConfig(name="attention_unet", features=(4, 8, 16)),
        augment=AugmentConfig(**augment),
        train=TrainConfig(batch_size=4, samples_per_epoch=8, num_threads=1, epochs=1),
    )


def test_training_normalises_each_slice_with_its_patients_statistics(tiny):
    cache, split = tiny
    rows = cache.rows(split["train"])
    plain = SliceDataset(cache, rows, _cfg(), augment=False)
    r = rows[2]
    stats = cache.patient_stats()[cache.patients[r]]
    assert np.allclose(plain[2][0].numpy(), normalize(np.asarray(cache.images[r]), VOLUME, stats))
    # sequence dropout: a sequence replaced by FLAIR is normalised with FLAIR's statistics
    dropped = SliceDataset(cache, rows, _cfg(missing_pre=1.0, missing_post=1.0, hflip=0.0, affine=0.0, elastic=0.0), augment=True)
    x = dropped.sample(2, 7)[0].numpy()
    assert np.allclose(x[0], x[1]) and np.allclose(x[2], x[1])
    image = np.asarray(cache.images[r]).copy()
    image[..., 0] = image[..., 1]
    assert np.array_equal(plain.volume_stats(r, False, image)[0], stats[1])
    assert np.array_equal(plain.volume_stats(r, True, image)[0], cache.patient_stats(stripped=True)[cache.patients[r]][1])


def test_a_trained_model_reads_volumes_whole_and_lone_slices_alone(tiny, tmp_path):
    """Train a few steps with zscore_volume, then check the predictor's volume path and its lone-slice fallback
    against the network run on inputs normalised by hand."""
    from brainseg.inference.backends import Segmenter, TorchBackend, _sigmoid

    cache, split = tiny
    cfg = _cfg()
    res = Trainer(cfg, cache, split, tmp_path / "run", progress=False).fit()
    assert np.isfinite(res["best_val_dice"])
    scores = validation_scores(
        Trainer(cfg, cache, split, tmp_path / "run", resume=True, progress=False).model,
        cache,
        cache.rows(split["val"]),
        cfg,
        torch.device("cpu"),
        ("all", "flair_only", "skull_stripped"),
    )
    assert set(scores) == {"all", "flair_only", "skull_stripped"}
    seg = Segmenter(TorchBackend(tmp_path / "run" / "last.pt", device="cpu"), "attention_unet")
    assert seg.config.preprocess.normalization == "zscore_volume"
    vol = _volume(size=48)
    prepared = [prepare(s, seg.config.preprocess) for s in vol]
    stats = volume_stats(prepared)
    whole = seg.probabilities(vol, stacked=True)
    lone = seg.probabilities(vol, stacked=False)
    for i, s in enumerate(vol):
        by_volume = _sigmoid(seg.backend(normalize(prepared[i], seg.config.preprocess, stats)[None]))[0]
        by_slice = _sigmoid(seg.backend(normalize(prepare(s, seg.config.preprocess), seg.config.preprocess)[None]))[0]
        assert np.allclose(whole[i], _resized(by_volume, s), atol=1e-5)
        assert np.allclose(lone[i], _resized(by_slice, s), atol=1e-5)
    assert max(float(np.abs(a - b).max()) for a, b in zip(whole, lone, strict=True)) > 1e-3  # the two paths differ here
    # a subset of a volume (``only``) is still normalised with the whole volume's statistics
    part = seg.probabilities(vol, stacked=True, only=[1, 4])
    assert np.allclose(part[0], whole[1], atol=1e-6) and np.allclose(part[1], whole[4], atol=1e-6)


def _resized(prob: np.ndarray, image: np.ndarray) -> np.ndarray:
    from brainseg.preprocessing import restore_size

    return restore_size(prob, image.shape[0], image.shape[1])


def test_int8_calibration_inputs_of_a_volume_model_use_the_patients_volume(tmp_path):
    """A zscore_volume model is quantised on inputs normalised as the server normalises a volume's slices."""
    from helpers import synthetic_dataset

    from brainseg.inference.export import calibration_inputs, calibration_plan, calibration_volumes
    from brainseg.io.datasets import read_image
    from brainseg.preprocessing import apply_condition

    root = synthetic_dataset(tmp_path / "data", patients=2, slices=5, size=48)
    volumes = calibration_volumes(root)
    plan = calibration_plan(list(volumes), n=6, seed=1)
    per_volume = calibration_inputs(plan, VOLUME, volumes)
    for x, (path, cond) in zip(per_volume, plan, strict=True):
        stats = volume_stats([prepare(apply_condition(read_image(q), cond), VOLUME) for q in volumes[path]])
        assert np.allclose(x, normalize(prepare(apply_condition(read_image(path), cond), VOLUME), VOLUME, stats))
    alone = calibration_inputs(plan, VOLUME)  # without the volumes: each slice alone, as before
    assert not np.allclose(alone, per_volume, atol=1e-3)
    zscore = PreprocessConfig(input_size=32, normalization="zscore")
    assert np.array_equal(calibration_inputs(plan, zscore, volumes), calibration_inputs(plan, zscore))
