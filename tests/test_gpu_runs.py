"""The ablation runners build valid configurations: the GPU runner (scripts/gpu/train_ablations.py) and the
CPU one (scripts/cpu_ablations.py). Each domain-shift augmentation alone differs from the reference in that
augmentation only, and the 2.5D / 3D entries build the networks they name."""

from __future__ import annotations

import torch
from helpers import script

from brainseg.cli import DOMAIN_SHIFT_PRESET
from brainseg.models import build_model


def _runner():
    return script("gpu/train_ablations.py")


def test_every_entry_builds_and_each_augmentation_alone_changes_only_itself():
    mod = _runner()
    ref = mod.run_config("att_sd30_z", 100, 0, 1)
    for name in mod.RUNS:
        cfg = mod.run_config(name, 100, 0, 1)
        assert cfg.train.time_budget_s > 0
    for key, p in DOMAIN_SHIFT_PRESET.items():
        cfg = mod.run_config(f"att_z_{key}", 100, 0, 1)
        assert getattr(cfg.augment, key) == p and getattr(ref.augment, key) == 0
        assert [k for k in vars(cfg.augment) if getattr(cfg.augment, k) != getattr(ref.augment, k)] == [key]
        assert cfg.preprocess == ref.preprocess and cfg.model == ref.model and cfg.train == ref.train


def test_the_3d_and_25d_entries_build_their_networks():
    mod = _runner()
    three = mod.run_config("att_z_ds_3d", 100, 0, 1)
    assert three.model.spatial_dims == 3 and three.train.patch_depth % 2 == 1 and three.train.precise_bn_batches > 0
    with torch.no_grad():
        assert build_model(three.model).eval()(torch.zeros(1, 3, 3, 32, 32)).shape == (1, 1, 3, 32, 32)
    ctx = mod.run_config("att_z_ds_ctx1", 100, 0, 1)
    with torch.no_grad():
        assert build_model(ctx.model).eval()(torch.zeros(1, 9, 32, 32)).shape == (1, 1, 32, 32)


def test_the_normalisation_and_size_entries_change_only_that():
    mod = _runner()
    ref, ds = mod.run_config("att_sd30_z", 100, 0, 1), mod.run_config("att_z_ds", 100, 0, 1)
    for name, base, field, value in (
        ("att_z_volnorm", ref, "normalization", "zscore_volume"),
        ("att_z_ds_volnorm", ds, "normalization", "zscore_volume"),
        ("att_z_256", ref, "input_size", 256),
    ):
        cfg = mod.run_config(name, 100, 0, 1)
        assert getattr(cfg.preprocess, field) == value
        assert [k for k in vars(cfg.preprocess) if getattr(cfg.preprocess, k) != getattr(base.preprocess, k)] == [field]
        assert cfg.augment == base.augment and cfg.model == base.model and cfg.train == base.train


def test_the_cpu_arms_differ_from_the_control_in_their_own_change_only(tiny_model_dir):
    """scripts/cpu_ablations.py: every arm continues the same weights with the same schedule."""
    mod = script("cpu_ablations.py")
    init = tiny_model_dir / "attention_unet.pt"
    control = mod.arm_config(init, "control", 3, 3e-4, 16)
    assert all(getattr(control.augment, k) == 0 for k in DOMAIN_SHIFT_PRESET) and control.train.epochs == 3
    for arm in mod.ARMS:
        cfg = mod.arm_config(init, arm, 3, 3e-4, 16)
        changed = {k for k in vars(cfg.augment) if getattr(cfg.augment, k) != getattr(control.augment, k)}
        changed |= {k for k in vars(cfg.preprocess) if getattr(cfg.preprocess, k) != getattr(control.preprocess, k)}
        changed |= {k for k in vars(cfg.train) if getattr(cfg.train, k) != getattr(control.train, k)}
        want = set(mod.ARMS[arm]) | set(mod.PREPROCESS.get(arm, {})) | ({"seed"} if arm == "control_seed43" else set())
        assert changed == want, arm
        assert cfg.model == control.model


def test_the_cpu_table_pairs_each_arm_with_its_reference(tmp_path):
    """cpu_ablations --table-only: per-patient differences to the control (or the arm's named reference), and a plot."""
    import json

    mod = script("cpu_ablations.py")
    pats = [f"p{i}" for i in range(6)]

    def report(offset):
        return {"conditions": {c: {"per_patient": {p: 0.5 + 0.05 * i + offset for i, p in enumerate(pats)}, "fp_slice_rate": 0.01} for c in mod.CONDITIONS}}

    for arm, offset in (("control", 0.0), ("all", 0.2), ("volume_norm_all", 0.1), ("blur", -0.1)):
        (tmp_path / arm).mkdir()
        (tmp_path / arm / "val_report.json").write_text(json.dumps(report(offset)))
    assert mod.main(["--init", "unused", "--out", str(tmp_path), "--table-only"]) == 0
    rows = {line.split(" | ")[0][2:]: line for line in (tmp_path / "table.md").read_text().splitlines()[2:]}
    assert "| all | control | 0.825 [" in rows["all"] + " " and "+0.200 [+0.20, +0.20]" in rows["all"]
    assert "| volume_norm_all | all |" in rows["volume_norm_all"] and "-0.100 [-0.10, -0.10]" in rows["volume_norm_all"]
    assert "-0.100 [-0.10, -0.10]" in rows["blur"] and "| control | - |" in rows["control"]
    assert (tmp_path / "table.png").stat().st_size > 10_000
    assert set(json.loads((tmp_path / "summary.json").read_text())) == {"control", "blur", "all", "volume_norm_all"}
