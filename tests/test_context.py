"""2.5D models (issue 15): neighbouring slices as channels, a lone slice by a defined fallback.

The contract checked here: a 2.5D model started from 2D weights is exactly the 2D model; in a
volume each slice reads its own neighbours (clamped at the edges), a lone slice repeats itself;
training rows carry the same patient's neighbours; the ONNX export and the CLI's volume path
take nine channels.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from brainseg.config import AugmentConfig, ExperimentConfig, ModelConfig, PreprocessConfig, TrainConfig
from brainseg.inference.export import export_onnx
from brainseg.inference.predictor import load_segmenter
from brainseg.io.datasets import read_split
from brainseg.models import build_model
from brainseg.models.checkpoint import save_checkpoint
from brainseg.preprocessing import context_indices, drop_sequences, per_slice
from brainseg.training.cache import load_cache
from brainseg.training.trainer import SliceDataset, Trainer, expand_input_channels


def _cfg(context: int = 1, **augment) -> ExperimentConfig:
    return ExperimentConfig(
        preprocess=PreprocessConfig(input_size=32),
        model=ModelConfig(name="attention_unet", features=(4, 8, 16), context=context, in_channels=3 * (2 * context + 1)),
        train=TrainConfig(batch_size=4, samples_per_epoch=8, num_threads=1, epochs=1),
        augment=AugmentConfig(**augment),
    )


def test_context_indices_clamp_at_the_edges_and_repeat_a_lone_slice():
    assert context_indices(0, 5, 1) == [0, 0, 1]
    assert context_indices(2, 5, 1) == [1, 2, 3]
    assert context_indices(4, 5, 2) == [2, 3, 4, 4, 4]
    assert context_indices(3, 5, 1, stacked=False) == [3, 3, 3]
    assert context_indices(0, 1, 1) == [0, 0, 0]


def test_sequence_dropout_and_conditions_act_on_every_slice_of_the_input():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (8, 8, 9), dtype=np.uint8)
    flair = drop_sequences(img, np.random.default_rng(0), 1.0, 1.0)  # both missing: FLAIR everywhere
    for c in range(0, 9, 3):
        assert all(np.array_equal(flair[..., c + k], img[..., c + 1]) for k in range(3))
    assert np.array_equal(per_slice(img, lambda x: x[..., ::-1]), np.concatenate([img[..., c : c + 3][..., ::-1] for c in (0, 3, 6)], axis=-1))


def test_cache_context_rows_are_the_same_patients_neighbours(tiny_cache):
    cache = load_cache(tiny_cache)
    rows = cache.context_rows(1)
    for r in range(len(cache.patients)):
        lo, mid, hi = rows[r]
        assert mid == r and {cache.patients[lo], cache.patients[hi]} == {cache.patients[r]}
        same = sorted((cache.slices[q], q) for q in range(len(cache.patients)) if cache.patients[q] == cache.patients[r])
        k = [q for _, q in same].index(r)
        assert lo == same[max(k - 1, 0)][1] and hi == same[min(k + 1, len(same) - 1)][1]


def test_training_rows_hold_nine_channels_and_the_dropout_gives_the_fallback(tiny_cache):
    cache = load_cache(tiny_cache)
    split = read_split(tiny_cache / "split.json")
    rows = cache.rows(split["train"])
    plain = SliceDataset(cache, rows, _cfg(), augment=False)
    x, y = plain[1]
    assert x.shape == (9, 32, 32) and y.shape == (1, 32, 32)
    # every augmentation off except the neighbour dropout at 1: the centre slice three times
    off = dict(hflip=0, affine=0, elastic=0, brightness_contrast=0, gamma=0, noise=0, missing_pre=0, missing_post=0, context_dropout=1.0)
    ds = SliceDataset(cache, rows, _cfg(**off), augment=True)
    lone = ds.with_context(cache.images, int(rows[1]), seed=7)
    centre = np.asarray(cache.images[int(rows[1])])
    assert np.array_equal(lone, np.concatenate([centre] * 3, axis=-1))
    stacked = SliceDataset(cache, rows, _cfg(**{**off, "context_dropout": 0.0}), augment=True).with_context(cache.images, int(rows[1]), seed=7)
    assert np.array_equal(stacked[..., 3:6], centre) and not np.array_equal(stacked, lone)


def test_a_25d_model_started_from_2d_weights_is_the_2d_model():
    torch.manual_seed(0)
    two_d = build_model(ModelConfig(name="attention_unet", features=(4, 8, 16))).eval()
    cfg = _cfg().model
    model = build_model(cfg).eval()
    model.load_state_dict(expand_input_channels(two_d.state_dict(), model.state_dict(), 1))
    x = torch.randn(2, 3, 32, 32)
    neighbours = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(torch.cat([neighbours[0], x, neighbours[1]], dim=1))
        ref = two_d(x)
    assert torch.allclose(out, ref, atol=1e-5)


def test_trainer_init_from_2d_checkpoint(tiny_cache, tmp_path):
    cache, split = load_cache(tiny_cache), read_split(tiny_cache / "split.json")
    two_d_cfg = replace(_cfg(context=0), model=ModelConfig(name="attention_unet", features=(4, 8, 16)))
    torch.manual_seed(0)
    two_d = build_model(two_d_cfg.model)
    save_checkpoint(tmp_path / "2d.pt", {"config": two_d_cfg.to_dict(), "model": two_d.state_dict(), "epoch": 3})
    trainer = Trainer(_cfg(), cache, split, tmp_path / "run", progress=False, init_from=tmp_path / "2d.pt")
    first = next(k for k, v in trainer.model.state_dict().items() if v.ndim == 4)
    w = trainer.model.state_dict()[first]
    assert w.shape[1] == 9 and torch.equal(w[:, 3:6], two_d.state_dict()[first]) and not w[:, :3].any() and not w[:, 6:].any()


@pytest.fixture(scope="module")
def context_segmenter(tmp_path_factory):
    """A tiny 2.5D model whose neighbour weights are not zero, exported to ONNX."""
    out = tmp_path_factory.mktemp("ctx")
    torch.manual_seed(1)
    cfg = _cfg()
    model = build_model(cfg.model).eval()
    save_checkpoint(out / "ctx.pt", {"config": cfg.to_dict(), "model": model.state_dict()})
    export_onnx(out / "ctx.pt", out / "ctx.onnx")
    return load_segmenter(out / "ctx.onnx", name="ctx")


def test_volume_slices_read_their_neighbours_and_a_lone_slice_repeats_itself(context_segmenter):
    seg = context_segmenter
    assert seg.context == 1
    rng = np.random.default_rng(0)
    vol = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(5)]
    full = seg.probabilities(vol, stacked=True)
    assert [p.shape for p in full] == [(40, 40)] * 5
    # only= returns the same numbers for a subset
    part = seg.probabilities(vol, stacked=True, only=[1, 3], batch_size=1)
    assert np.allclose(part[0], full[1], atol=1e-6) and np.allclose(part[1], full[3], atol=1e-6)
    # changing slice 3 changes slice 2's answer (its neighbour) but not slice 0's
    changed = list(vol)
    changed[3] = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    again = seg.probabilities(changed, stacked=True)
    assert not np.allclose(again[2], full[2]) and np.allclose(again[0], full[0], atol=1e-6)
    # a lone slice: the slice repeated, the same as a one-slice volume
    lone = seg.probabilities([vol[2]])[0]
    assert np.allclose(lone, seg.probabilities([vol[2]], stacked=True)[0], atol=1e-6)
    assert not np.allclose(lone, full[2])


def test_the_volume_path_feeds_neighbours(context_segmenter, monkeypatch):
    """``predict.segment_volume`` hands the whole volume to the model (``stacked``), skipping only
    background slices as targets, not as neighbours."""
    from brainseg.config import PostprocessConfig
    from brainseg.inference.predict import segment_volume
    from brainseg.io.volumes import Volume

    seen = {}
    real = context_segmenter.probabilities

    def spy(images, *a, **kw):
        seen.update(n=len(images), **{k: kw.get(k) for k in ("stacked", "only")})
        return real(images, *a, **kw)

    monkeypatch.setattr(context_segmenter, "probabilities", spy)
    rng = np.random.default_rng(0)
    slices = rng.integers(1, 255, (6, 40, 40, 3)).astype(np.float32)
    slices[0] = 0  # background: not a target
    vol = Volume(slices=slices, affine=np.eye(4), spacing=(1.0, 1.0, 1.0), shape=(40, 40, 6), name="v", sources=("v.nii.gz",))
    res = segment_volume(context_segmenter, vol, PostprocessConfig())
    assert seen["stacked"] is True and seen["n"] == 6 and list(seen["only"]) == [1, 2, 3, 4, 5]
    assert res.prob.shape == (6, 40, 40) and not res.prob[0].any()
