"""``brainseg evaluate`` on BraTS-format data (``evaluation.brats``): the case layouts BraTS ships (2021, 2023, and
the ``brats-format`` pair's ``labels/`` folder), what is skipped and why, one-line errors, and on the real pair the
same Dice as ``brainseg predict``'s mask scored by hand against the reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from helpers import BRATS_FORMAT, require

from brainseg.cli import main
from brainseg.evaluation.brats import discover_brats, evaluate_brats, is_brats_root
from brainseg.io.datasets import DataError

SHAPE = (48, 48, 6)  # (X, Y, Z): small volumes for the tiny models


def _volumes(seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Three sequences with a bright blob in FLAIR, and the blob as the label."""
    rng = np.random.default_rng(seed)
    x, y = np.mgrid[: SHAPE[0], : SHAPE[1]]
    blob = ((x - 24) ** 2 + (y - 20) ** 2 < 64)[..., None] & (np.arange(SHAPE[2]) >= 1)[None, None, :] & (np.arange(SHAPE[2]) <= 4)[None, None, :]
    brain = ((x - 24) ** 2 + (y - 24) ** 2 < 400)[..., None].repeat(SHAPE[2], axis=2)
    base = brain * (300 + 40 * rng.random(SHAPE))
    seqs = {"t1n": base, "t2f": base + 500 * blob, "t1c": base * 1.1}
    return {s: a.astype(np.float32) for s, a in seqs.items()}, blob.astype(np.uint8)


def _save(arr: np.ndarray, path: Path, affine=None) -> None:
    nib.save(nib.Nifti1Image(arr, np.diag([1.0, 1.0, 1.0, 1.0]) if affine is None else affine), str(path))


def _brats_root(root: Path) -> Path:
    """Four cases in the three layouts, one of them without a label and one without FLAIR."""
    # BraTS 2021: underscores, flair / t1 / t1ce / t2, _seg
    seqs, label = _volumes(0)
    case = root / "BraTS2021_00000"
    case.mkdir(parents=True)
    for tag, s in (("t1", "t1n"), ("flair", "t2f"), ("t1ce", "t1c")):
        _save(seqs[s], case / f"BraTS2021_00000_{tag}.nii.gz")
    _save(seqs["t1n"], case / "BraTS2021_00000_t2.nii.gz")
    _save(label, case / "BraTS2021_00000_seg.nii.gz")
    # BraTS 2023: hyphens, t1n / t2f / t1c / t2w, -seg
    seqs, label = _volumes(1)
    case = root / "BraTS-GLI-00001-000"
    case.mkdir()
    for s in ("t1n", "t2f", "t1c", "t2w"):
        _save(seqs.get(s, seqs["t1n"]), case / f"BraTS-GLI-00001-000-{s}.nii.gz")
    _save(label * 2, case / "BraTS-GLI-00001-000-seg.nii.gz")  # label 2 (oedema) is whole tumour too
    # the brats-format pair's layout: labels/<case>-fusion.nii.gz
    seqs, label = _volumes(2)
    case = root / "CASE-3"
    case.mkdir()
    for s in ("t1n", "t2f", "t1c"):
        _save(seqs[s], case / f"CASE-3-{s}.nii.gz")
    (root / "labels").mkdir()
    _save(label, root / "labels" / "CASE-3-fusion.nii.gz")
    _save(label, root / "labels" / "CASE-30-fusion.nii.gz")  # another case's label, whose name starts the same
    # no label; and no FLAIR
    (root / "NOLABEL").mkdir()
    _save(seqs["t2f"], root / "NOLABEL" / "NOLABEL-t2f.nii.gz")
    (root / "NOFLAIR").mkdir()
    _save(seqs["t1n"], root / "NOFLAIR" / "NOFLAIR-t1n.nii.gz")
    _save(label, root / "NOFLAIR" / "NOFLAIR-seg.nii.gz")
    return root


def test_every_layout_is_found_with_its_label(tmp_path):
    root = _brats_root(tmp_path / "brats")
    cases = {c.name: c for c in discover_brats(root)}
    assert set(cases) == {"BraTS2021_00000", "BraTS-GLI-00001-000", "CASE-3", "NOLABEL", "NOFLAIR"}
    assert sorted(cases["BraTS2021_00000"].images) == ["t1c", "t1n", "t2f", "t2w"]
    assert cases["BraTS2021_00000"].label.name == "BraTS2021_00000_seg.nii.gz"
    assert [f.name for f in cases["BraTS-GLI-00001-000"].files("all")] == [f"BraTS-GLI-00001-000-{s}.nii.gz" for s in ("t1n", "t2f", "t1c")]
    assert [f.name for f in cases["BraTS-GLI-00001-000"].files("flair_only")] == ["BraTS-GLI-00001-000-t2f.nii.gz"]
    assert cases["CASE-3"].label == root / "labels" / "CASE-3-fusion.nii.gz"
    assert cases["NOLABEL"].label is None and "no FLAIR" in cases["NOFLAIR"].problems[0]
    assert is_brats_root(root) and not is_brats_root(tmp_path / "nowhere") and not is_brats_root(require_lgg_like(tmp_path))


def require_lgg_like(tmp_path: Path) -> Path:
    """A folder of TIFF slices (the LGG layout) is not a BraTS root."""
    from helpers import synthetic_dataset

    return synthetic_dataset(tmp_path / "lgg", patients=1, slices=2, size=32)


def test_evaluate_scores_each_labelled_case_and_says_what_it_skipped(tiny_model_dir, tmp_path):
    from brainseg.inference.predictor import load

    root = _brats_root(tmp_path / "brats")
    seg = load("attention_unet", model_dir=tiny_model_dir)
    report = evaluate_brats(seg, root, tta=False, progress=False)
    assert report["cases"] == 3 and set(report["skipped"]) == {"NOLABEL", "NOFLAIR"}
    assert "no label volume" in report["skipped"]["NOLABEL"] and "no FLAIR" in report["skipped"]["NOFLAIR"]
    for cond, read_as in (("all", "all"), ("flair_only", "flair_only")):
        per_case = report["per_case"][cond]
        assert set(per_case) == {"BraTS2021_00000", "BraTS-GLI-00001-000", "CASE-3"}
        assert all(r["read_as"] == read_as and 0 <= r["dice"] <= 1 for r in per_case.values())
        assert all(r["ref_ml"] == pytest.approx(np.count_nonzero(_volumes(0)[1]) / 1000) for r in per_case.values())  # 1 mm voxels
        s = report["conditions"][cond]
        assert s["dice_mean"] == pytest.approx(np.mean([r["dice"] for r in per_case.values()]))
        assert s["dice_ci95"][0] <= s["dice_mean"] <= s["dice_ci95"][1]
    assert report["per_patient_dice"] == report["conditions"]["all"]["dice_mean"]
    with pytest.raises(ValueError, match="all and flair_only only, not skull_stripped"):
        evaluate_brats(seg, root, tta=False, conditions=("skull_stripped",), progress=False)


def test_an_unreadable_case_is_skipped_with_its_reason_and_the_others_are_scored(tiny_model_dir, tmp_path):
    """A label on another grid and a truncated volume: each case is skipped with a reason naming its file; the run
    goes on; where no case is left, one DataError names every reason."""
    from brainseg.inference.predictor import load

    seg = load("attention_unet", model_dir=tiny_model_dir)
    root = tmp_path / "brats"
    seqs, label = _volumes(0)
    for name in ("GOOD", "GRID", "TRUNC"):
        (root / name).mkdir(parents=True)
        for s in ("t1n", "t2f", "t1c"):
            _save(seqs[s], root / name / f"{name}-{s}.nii.gz")
        _save(label[:, :, :4] if name == "GRID" else label, root / name / f"{name}-seg.nii.gz")
    flair = root / "TRUNC" / "TRUNC-t2f.nii.gz"
    flair.write_bytes(flair.read_bytes()[:200])
    report = evaluate_brats(seg, root, tta=False, progress=False)
    assert report["cases"] == 1 and list(report["per_case"]["all"]) == ["GOOD"]
    assert "GRID-seg.nii.gz: label grid" in report["skipped"]["GRID"]
    assert "TRUNC-t2f.nii.gz" in report["skipped"]["TRUNC"]
    shutil.rmtree(root / "GOOD")
    with pytest.raises(DataError, match=r"no case could be scored \(GRID: .*GRID-seg\.nii\.gz: label grid.*; TRUNC: .*TRUNC-t2f"):
        evaluate_brats(seg, root, tta=False, progress=False)


def test_the_cli_reports_and_fails_in_one_line(tiny_model_dir, tmp_path, capsys):
    root = _brats_root(tmp_path / "brats")
    out = tmp_path / "report.json"
    assert main(["evaluate", "--data", str(root), "--model-dir", str(tiny_model_dir), "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "DICE Score" in said and "mean of 3 BraTS-format cases" in said and "skipped NOLABEL: no label volume" in said
    report = json.loads(out.read_text())
    assert report["format"] == "brats" and set(report["conditions"]) == {"all", "flair_only"}
    assert "| flair_only |" in out.with_suffix(".md").read_text()
    for extra, words in (
        (["--conditions", "skull_stripped"], "all and flair_only only"),
        (["--split", str(tmp_path / "split.json")], "BraTS-format data has no split"),
    ):
        assert main(["evaluate", "--data", str(root), "--model-dir", str(tiny_model_dir), "--out", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("brainseg: error:") and words in err and "\n" not in err
    only_unlabelled = tmp_path / "unlabelled"
    (only_unlabelled / "NOLABEL").mkdir(parents=True)
    _save(_volumes(0)[0]["t2f"], only_unlabelled / "NOLABEL" / "NOLABEL-t2f.nii.gz")
    assert main(["evaluate", "--data", str(only_unlabelled), "--model-dir", str(tiny_model_dir), "--out", str(out)]) == 2
    assert "no BraTS-format case has both a FLAIR volume and a label volume" in capsys.readouterr().err


def test_on_the_real_pair_it_agrees_with_predicts_mask_scored_by_hand(tmp_path, capsys):
    """The shipped default on ``../shared/data/brats-format``: ``brainseg evaluate`` per case equals the Dice of the
    NIfTI mask ``brainseg predict`` writes for the same set, against the fusion label, computed here with numpy."""
    root = require(BRATS_FORMAT)
    case = "TCGA-FG-6692"
    out = tmp_path / "report.json"
    assert main(["evaluate", "--data", str(root), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["cases"] == 2 and report["tta"] is True and not report["skipped"]
    files = [str(root / case / f"{case}-{s}.nii.gz") for s in ("t1n", "t2f", "t1c")]
    assert main(["predict", *files, "--out", str(tmp_path / "pred")]) == 0
    mask = np.asarray(nib.load(next((tmp_path / "pred").glob("*_mask.nii.gz"))).dataobj) > 0
    ref = np.asarray(nib.load(root / "labels" / f"{case}-fusion.nii.gz").dataobj) > 0
    by_hand = 2 * np.count_nonzero(mask & ref) / (mask.sum() + ref.sum())
    assert report["per_case"]["all"][case]["dice"] == pytest.approx(by_hand, abs=1e-6)
    assert report["per_case"]["all"][case]["recall"] == pytest.approx(np.count_nonzero(mask & ref) / ref.sum(), abs=1e-6)
    capsys.readouterr()


def test_a_stopped_run_resumes_from_its_progress_file(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Each case is appended to OUT.partial.jsonl as it is done. The same command after a stop reuses the cases
    done under the same settings (the model is not run for them: it would raise here), recomputes under other
    settings, ignores a torn last line, and removes the file once the report is written."""
    from brainseg.inference import backends
    from brainseg.inference.predictor import load

    root = _brats_root(tmp_path / "brats")
    seg = load("attention_unet", model_dir=tiny_model_dir)
    partial = tmp_path / "report.partial.jsonl"
    first = evaluate_brats(seg, root, tta=False, progress=False, progress_file=partial)
    lines = partial.read_text().splitlines()
    assert len(lines) == 3 and first["resumed"] == 0  # the three labelled cases; the two skipped at discovery are not run
    partial.write_text("\n".join(lines[:2]) + '\n{"key": "torn')  # stopped while writing the third case

    calls = []
    real = backends.Segmenter.probabilities

    def counting(self, *a, **kw):
        calls.append(1)
        return real(self, *a, **kw)

    monkeypatch.setattr(backends.Segmenter, "probabilities", counting)
    again = evaluate_brats(seg, root, tta=False, progress=False, progress_file=partial)
    assert again["resumed"] == 2 and again["per_case"] == first["per_case"] and len(calls) == 2  # one case, two conditions
    calls.clear()
    other = evaluate_brats(seg, root, tta=True, progress=False, progress_file=partial)
    assert other["resumed"] == 0 and len(calls) == 6  # other settings: every case again

    out = tmp_path / "report.json"
    assert main(["evaluate", "--data", str(root), "--model-dir", str(tiny_model_dir), "--no-tta", "--out", str(out)]) == 0
    assert "resumed: 3 cases" in capsys.readouterr().out and not partial.exists()
    assert json.loads(out.read_text())["per_case"] == first["per_case"]
