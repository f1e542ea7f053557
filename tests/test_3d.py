"""True 3D networks (issue 15): Conv3d on stacks of slices, in-plane pooling.

The contract checked here: a 3D network inflated from 2D weights is exactly the 2D network slice by
slice; training samples are stacks of one patient's consecutive slices with every slice's mask;
validation and the volume path cover a stack in slabs whose kept parts tile it; each slice reads its
neighbours; a lone slice is read as copies of itself; the ONNX export takes any number of slices; a
NIfTI volume stored in several voxel orders gives the same mask, on each file's own grid.
"""

from __future__ import annotations

import gzip
from dataclasses import replace

import nibabel as nib
import numpy as np
import pytest
import torch
from helpers import BRATS_FORMAT, require
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from brainseg.config import AugmentConfig, ExperimentConfig, ModelConfig, PostprocessConfig, PreprocessConfig, TrainConfig
from brainseg.inference.backends import LONE_DEPTH
from brainseg.inference.export import export_onnx, quantize_int8
from brainseg.inference.predictor import load_segmenter
from brainseg.io.datasets import read_split
from brainseg.models import MODELS, build_model
from brainseg.models.blocks import inflate_2d
from brainseg.models.checkpoint import save_checkpoint
from brainseg.preprocessing import over_slabs, slabs
from brainseg.training.cache import load_cache
from brainseg.training.trainer import SliceDataset, Trainer, validation_scores

OFF = dict(hflip=0, affine=0, elastic=0, brightness_contrast=0, gamma=0, noise=0, missing_pre=0, missing_post=0)


def _cfg(dims: int = 3, depth: int = 3, **augment) -> ExperimentConfig:
    return ExperimentConfig(
        preprocess=PreprocessConfig(input_size=32),
        model=ModelConfig(name="attention_unet", features=(4, 8, 16), spatial_dims=dims),
        train=TrainConfig(batch_size=2, samples_per_epoch=4, num_threads=1, epochs=1, patch_depth=depth, checkpoint_every_s=0),
        augment=AugmentConfig(**augment),
    )


def _random_bn(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_3d_network_inflated_from_2d_weights_is_the_2d_network_slice_by_slice(name):
    torch.manual_seed(0)
    two_d = build_model(ModelConfig(name=name, features=(4, 8, 16))).eval()
    _random_bn(two_d)
    three_d = build_model(ModelConfig(name=name, features=(4, 8, 16), spatial_dims=3)).eval()
    three_d.load_state_dict(inflate_2d(two_d.state_dict(), three_d.state_dict()))
    x = torch.randn(2, 3, 5, 36, 36)  # 36: padded to a multiple of 4 in-plane and cropped back
    with torch.no_grad():
        out = three_d(x)
        ref = torch.stack([two_d(x[:, :, k]) for k in range(5)], dim=2)
    assert out.shape == (2, 1, 5, 36, 36)
    assert torch.allclose(out, ref, atol=1e-5)
    # trained further, the off-centre weights read the neighbours: the slices no longer separate
    three_d.load_state_dict({k: v + 0.05 * torch.randn_like(v) if v.ndim == 5 else v for k, v in three_d.state_dict().items()})
    with torch.no_grad():
        changed = x.clone()
        changed[:, :, 3] = torch.randn(2, 3, 36, 36)
        a, b = three_d(x), three_d(changed)
    assert not torch.allclose(a[:, :, 2], b[:, :, 2], atol=1e-4)


def test_slabs_tile_the_stack_with_margins():
    for n in (1, 5, 31, 32, 33, 100, 155):
        covered = []
        for start, stop, keep0, keep1 in slabs(n, depth=32, margin=8):
            assert 0 <= start < stop <= n and stop - start <= 48 and 0 <= keep0 < keep1 <= stop - start
            covered.extend(range(start + keep0, start + keep1))
            # a kept slice is at least ``margin`` away from a cut (not a volume edge)
            assert start == 0 or keep0 >= 8
            assert stop == n or stop - start - keep1 >= 8
        assert covered == list(range(n))
        # stitched: each slice's row comes from a slab that keeps it, wherever the slab starts
        np.testing.assert_array_equal(over_slabs(n, lambda a, b: np.arange(a, b)), np.arange(n))
    skipped = over_slabs(100, lambda a, b: np.arange(a, b) + 1, wanted={70})
    assert skipped[64:96].all() and not skipped[:64].any() and not skipped[96:].any()


def test_training_samples_are_stacks_of_one_patients_slices_with_every_mask(tiny_cache):
    cache = load_cache(tiny_cache)
    rows = cache.rows(read_split(tiny_cache / "split.json")["train"])
    ds = SliceDataset(cache, rows, _cfg(depth=3), augment=False)
    flat = SliceDataset(cache, rows, _cfg(dims=2), augment=False)
    context = cache.context_rows(1)
    for pos in (0, 2, 5):
        x, y = ds[pos]
        assert x.shape == (3, 3, 32, 32) and y.shape == (1, 3, 32, 32)
        for k, r in enumerate(context[rows[pos]]):
            assert cache.patients[r] == cache.patients[rows[pos]]
            assert torch.equal(x[:, k], flat[list(rows).index(r)][0])
            assert torch.equal(y[0, k], torch.from_numpy(np.asarray(cache.masks[r]).astype(np.float32)))
    # augmented: image and masks move together (a flip of everything)
    aug = SliceDataset(cache, rows, _cfg(depth=3, **{**OFF, "hflip": 1.0}), augment=True)
    xa, ya = aug.sample(2, seed=3)
    x, y = ds[2]
    assert torch.equal(xa, x.flip(-1)) and torch.equal(ya, y.flip(-1))
    with pytest.raises(ValueError, match="odd"):
        SliceDataset(cache, rows, _cfg(depth=4), augment=False)


def test_trainer_inflates_2d_weights_and_validates_as_the_2d_model(tiny_cache, tmp_path):
    cache, split = load_cache(tiny_cache), read_split(tiny_cache / "split.json")
    two_d_cfg = _cfg(dims=2)
    torch.manual_seed(0)
    two_d = build_model(two_d_cfg.model).eval()
    _random_bn(two_d)
    save_checkpoint(tmp_path / "2d.pt", {"config": two_d_cfg.to_dict(), "model": two_d.state_dict(), "epoch": 3})
    trainer = Trainer(_cfg(), cache, split, tmp_path / "run", progress=False, init_from=tmp_path / "2d.pt")
    x = torch.randn(1, 3, 4, 32, 32)
    with torch.no_grad():
        assert torch.allclose(trainer.model.eval()(x), torch.stack([two_d(x[:, :, k]) for k in range(4)], dim=2), atol=1e-5)
    rows, dev = cache.rows(split["val"]), torch.device("cpu")
    conds = ("all", "flair_only", "skull_stripped")
    assert validation_scores(trainer.model, cache, rows, _cfg(), dev, conds) == validation_scores(two_d, cache, rows, two_d_cfg, dev, conds)
    result = trainer.fit()  # two steps of 3D training, then validation and checkpoints
    assert result["steps"] == 2 and (tmp_path / "run" / "best.pt").is_file()


@pytest.fixture(scope="module")
def seg3d(tmp_path_factory):
    """A tiny 3D model with random (not inflated) weights, exported to ONNX."""
    out = tmp_path_factory.mktemp("3d")
    torch.manual_seed(1)
    cfg = _cfg()
    model = build_model(cfg.model).eval()
    _random_bn(model)
    save_checkpoint(out / "m3.pt", {"config": cfg.to_dict(), "model": model.state_dict()})
    export_onnx(out / "m3.pt", out / "m3.onnx")
    return out


def test_onnx_export_takes_any_number_of_slices_and_matches_torch(seg3d):
    onnx_seg = load_segmenter(seg3d / "m3.onnx", name="m3")
    torch_seg = load_segmenter(seg3d / "m3.pt", name="m3")
    rng = np.random.default_rng(0)
    for n in (1, 7, 50):  # 50: two slabs
        vol = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(n)]
        a, b = onnx_seg.probabilities(vol, stacked=True), torch_seg.probabilities(vol, stacked=True)
        assert len(a) == n and all(p.shape == (40, 40) for p in a)
        assert max(float(np.abs(p - q).max()) for p, q in zip(a, b, strict=True)) < 1e-4
    with pytest.raises(ValueError, match="3D model"):
        quantize_int8(seg3d / "m3.onnx", np.zeros((1, 3, 1, 32, 32), np.float32), out=seg3d / "m3.int8.onnx")


def test_volume_slices_read_their_neighbours_and_a_lone_slice_is_copies_of_itself(seg3d):
    seg = load_segmenter(seg3d / "m3.onnx", name="m3")
    rng = np.random.default_rng(0)
    vol = [rng.integers(0, 255, (40, 40, 3), dtype=np.uint8) for _ in range(9)]
    full = seg.probabilities(vol, stacked=True)
    part = seg.probabilities(vol, stacked=True, only=[1, 6])
    assert np.allclose(part[0], full[1], atol=1e-6) and np.allclose(part[1], full[6], atol=1e-6)
    changed = list(vol)
    changed[5] = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    again = seg.probabilities(changed, stacked=True)
    assert not np.allclose(again[4], full[4], atol=1e-4)
    lone = seg.probabilities([vol[2]])[0]
    assert np.allclose(lone, seg.probabilities([vol[2]] * LONE_DEPTH, stacked=True)[LONE_DEPTH // 2], atol=1e-6)
    assert not np.allclose(lone, full[2], atol=1e-4)
    spread: list = []
    tta = seg.probabilities(vol, tta=True, stacked=True, spread=spread)
    assert len(spread) == 9 and all(s.shape == (40, 40) for s in spread) and not np.allclose(tta[3], full[3])


def test_a_nifti_volume_in_several_storage_orders_gives_one_mask_on_each_files_grid(seg3d, shared_data):
    """The real BraTS-format FLAIR (cropped around the tumour to keep it quick) through the 3D model,
    stored three ways: the same mask, returned on each file's own grid."""
    from brainseg.inference.predict import segment_volume
    from brainseg.io.volumes import load_volume

    img = nib.load(require(BRATS_FORMAT / "TCGA-DU-7294" / "TCGA-DU-7294-t2f.nii.gz"))
    img = img.slicer[40:200, 40:220, 60:100]
    seg = load_segmenter(seg3d / "m3.onnx", name="m3")
    first = None
    for codes in [("L", "P", "S"), ("R", "A", "S"), ("A", "S", "R")]:
        stored = img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(codes)))
        vol = load_volume({f"case-{''.join(codes)}-t2f.nii.gz": gzip.compress(stored.to_bytes(), compresslevel=1)})
        if first is None:
            probs = segment_volume(seg, vol, PostprocessConfig(threshold=0.0)).prob
            post = PostprocessConfig(threshold=float(np.median(probs[probs > 0])))  # a threshold that gives a mask
        res = segment_volume(seg, vol, post)
        file_mask = vol.file_mask(res.mask)
        assert file_mask.shape == stored.shape
        back = np.asarray(
            nib.Nifti1Image(file_mask, stored.affine).as_reoriented(ornt_transform(io_orientation(stored.affine), io_orientation(img.affine))).dataobj
        )
        if first is None:
            first = (res.mask, back)
            assert 0 < res.mask.sum() < res.mask.size
            continue
        np.testing.assert_array_equal(res.mask, first[0], err_msg=f"{codes}: another mask")
        np.testing.assert_array_equal(back, first[1], err_msg=f"{codes}: mask not on the file's grid")


def test_cli_refuses_dims_3_with_context(tmp_path):
    from brainseg.cli import main

    with pytest.raises(SystemExit, match="--dims 3"):
        main(["train", "--dims", "3", "--context", "1", "--cache", str(tmp_path / "c"), "--out", str(tmp_path / "r")])
    assert replace(_cfg(), model=replace(_cfg().model, spatial_dims=3)).model.spatial_dims == 3


def test_precise_batchnorm_is_the_average_of_the_training_batches_statistics(tiny_cache, tmp_path):
    """``recompute_batchnorm`` replaces the running statistics by the plain average of the per-batch
    statistics over the training draw it names, and leaves the weights alone; the trainer can run it
    before each validation (``precise_bn_batches``)."""
    from brainseg.training.trainer import EpochSamples, epoch_indices, recompute_batchnorm, sample_seeds

    cache, split = load_cache(tiny_cache), read_split(tiny_cache / "split.json")
    cfg = _cfg()
    rows = cache.rows(split["train"])
    ds = SliceDataset(cache, rows, cfg, augment=True)
    positive = np.asarray([cache.masks[r].any() for r in rows])
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    _random_bn(model)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "num_batches" not in k}
    recompute_batchnorm(model, ds, positive, cfg, batches=3, draw=5)
    # the same draw by hand: the first BatchNorm sees the first convolution's output
    n = 3 * cfg.train.batch_size
    samples = EpochSamples(ds, epoch_indices(positive, n, cfg.train.positive_fraction, cfg.train.seed * 1000 + 5), sample_seeds(cfg.train.seed, 5, n))
    first_conv, first_bn = model.encoder[0][0], model.encoder[0][1]
    with torch.no_grad():
        means = [first_conv(torch.stack([samples[k][0] for k in range(b, b + 2)])).mean(dim=(0, 2, 3, 4)) for b in range(0, n, 2)]
    assert torch.allclose(first_bn.running_mean, torch.stack(means).mean(0), atol=1e-5)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())
    assert not model.training
    run = Trainer(replace(cfg, train=replace(cfg.train, precise_bn_batches=2)), cache, split, tmp_path / "run", progress=False).fit()
    assert run["steps"] == 2
