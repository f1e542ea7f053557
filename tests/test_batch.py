"""``brainseg batch``: predict's files per study, a broken study recorded while the others finish, resume
(a rerun does no work; a run stopped half way does only what is left), CSV manifests; and the same on a
local Ray instance (2 CPUs, a 200 MB object store; skipped where Ray is not installed).

Models are the tiny ones of ``conftest.tiny_model_dir`` (masks mean nothing here).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import small_series

from brainseg.cli import main
from brainseg.inference import batch as batch_mod
from brainseg.inference.batch import STATE_DIR, ModelSpec, run_batch
from brainseg.io.synthetic import synthetic_png


@pytest.fixture
def studies(tmp_path):
    """Two slices, a DICOM series, a BraTS-style NIfTI set, and a broken TIFF, in ``in/``."""
    inp = tmp_path / "in"
    inp.mkdir()
    for i in range(2):
        (inp / f"slice{i}.png").write_bytes(synthetic_png(size=64))
    small_series(tmp_path / "dicom" / "study1")
    rng = np.random.default_rng(1)
    for seq in ("t2f", "t1n"):
        nib.save(nib.Nifti1Image(rng.integers(0, 500, (32, 32, 6)).astype(np.int16), np.diag([1.0, 1.0, 2.0, 1.0])), inp / f"case1-{seq}.nii.gz")
    (inp / "broken.tif").write_bytes(b"II*\x00garbage")
    return {"in": inp, "dicom": tmp_path / "dicom" / "study1", "root": tmp_path}


def rows(path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["id"]: r for r in csv.DictReader(fh)}


def same_outputs(a, b) -> None:
    """Every file of ``a`` is in ``b`` with the same content (NIfTI: voxels and affine; SEG: frames and references)."""
    names = sorted(p.name for p in a.iterdir() if p.is_file() and p.name != "summary.csv")
    assert names, a
    for name in names:
        fa, fb = a / name, b / name
        assert fb.is_file(), name
        if name.endswith(".nii.gz"):
            ia, ib = nib.load(fa), nib.load(fb)
            assert np.array_equal(ia.get_fdata(), ib.get_fdata()) and np.allclose(ia.affine, ib.affine), name
        elif name.endswith(".dcm"):
            da, db = pydicom.dcmread(fa), pydicom.dcmread(fb)
            assert np.array_equal(da.pixel_array, db.pixel_array), name
            assert da.ReferencedSeriesSequence[0].SeriesInstanceUID == db.ReferencedSeriesSequence[0].SeriesInstanceUID
        elif name.endswith(".json"):
            assert json.loads(fa.read_text()) == json.loads(fb.read_text()), name
        else:
            assert fa.read_bytes() == fb.read_bytes(), name


def test_batch_writes_what_predict_writes_and_goes_on_past_a_broken_study(studies, tiny_model_dir, tmp_path, capsys):
    inputs = [str(studies["in"]), str(studies["dicom"])]
    common = ["--model-dir", str(tiny_model_dir), "--pixel-spacing", "0.5,0.75"]
    assert main(["predict", *inputs, "--out", str(tmp_path / "predicted"), *common]) == 2
    capsys.readouterr()
    out = tmp_path / "batch"
    assert main(["batch", *inputs, "--out", str(out), *common, "--quiet"]) == 2
    captured = capsys.readouterr()
    same_outputs(tmp_path / "predicted", out)
    table = rows(out / "summary.csv")
    assert sorted(table) == ["broken", "case1", "slice0", "slice1", "study1"]
    broken = table.pop("broken")
    assert broken["status"] == "failed" and broken["error"].startswith(f"{studies['in'] / 'broken.tif'}: "), broken
    assert f"brainseg: error: {broken['error']}" in captured.err.splitlines()
    for sid, row in table.items():
        assert row["status"] == "ok" and row["error"] == "" and float(row["seconds"]) >= 0, row  # a tiny slice can take under 5 ms: 0.00
        lesions = json.loads((out / f"{sid}_lesions.json").read_text())
        assert int(row["lesion_count"]) == lesions["lesion_count"]
        if "lesion_volume_mm3" in lesions:  # volumes: mL; slices: no volume
            assert float(row["lesion_volume_ml"]) == pytest.approx(lesions["lesion_volume_mm3"] / 1000, abs=1e-3)
        else:
            assert row["lesion_volume_ml"] == ""
    assert "batch: 5 studies: 4 ok, 1 failed; 5 done now" in captured.out


def test_a_rerun_does_no_work_and_a_lost_file_is_made_again(studies, tiny_model_dir, tmp_path, monkeypatch):
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    out = tmp_path / "out"
    first = run_batch([str(studies["in"])], out, spec, progress=False)
    assert (first.done_now, first.skipped, len(first.failed)) == (4, 0, 1)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name != "summary.csv"}
    table = rows(out / "summary.csv")

    def no_work(*args, **kwargs):
        raise AssertionError("a finished study was run again")

    with monkeypatch.context() as m:
        m.setattr(batch_mod, "predict_job", no_work)
        m.setattr(ModelSpec, "load", no_work)  # not even a model load
        second = run_batch([str(studies["in"])], out, spec, progress=False)
    assert (second.done_now, second.skipped) == (0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file() and p.name != "summary.csv"} == before
    assert rows(out / "summary.csv") == table and table["broken"]["status"] == "failed"  # the same table, the failure's reason kept

    (out / "slice1_mask.png").unlink()  # a study whose files are gone is done again, and only that one
    third = run_batch([str(studies["in"])], out, spec, progress=False)
    assert (third.done_now, third.skipped) == (1, 3) and (out / "slice1_mask.png").is_file()
    retried = run_batch([str(studies["in"])], out, spec, progress=False, retry_failed=True)
    assert (retried.done_now, retried.skipped) == (1, 3)  # only the broken one
    other = run_batch([str(studies["in"])], out, ModelSpec(model_dir=str(tiny_model_dir), threshold=0.9), progress=False)
    assert other.done_now == 4  # other settings: other studies


def test_a_run_stopped_half_way_resumes_with_what_is_left(studies, tiny_model_dir, tmp_path):
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    out = tmp_path / "out"
    done = []

    def crash_after_two(rec):
        done.append(rec.id)
        if len(done) == 2:
            raise KeyboardInterrupt  # as Ctrl-C or a killed process: the run stops after two records

    with pytest.raises(KeyboardInterrupt):
        run_batch([str(studies["in"]), str(studies["dicom"])], out, spec, progress=False, on_record=crash_after_two)
    assert len(list((out / STATE_DIR).glob("*.json"))) == 2
    assert len(rows(out / "summary.csv")) == 2  # the summary is written on the way out too
    resumed = []
    run = run_batch([str(studies["in"]), str(studies["dicom"])], out, spec, progress=False, on_record=lambda r: resumed.append(r.id))
    assert (run.done_now, run.skipped) == (3, 2)
    assert sorted(done + resumed) == ["broken", "case1", "slice0", "slice1", "study1"]
    assert len(rows(out / "summary.csv")) == 5


def test_a_csv_manifest_lists_studies(studies, tiny_model_dir, tmp_path, capsys):
    root = studies["root"]
    manifest = root / "studies.csv"
    manifest.write_text("site,path\nA,in/slice0.png\nB,dicom/study1\n\nC,in/missing.png\n")
    out = tmp_path / "out"
    assert main(["batch", str(manifest), "--out", str(out), "--model-dir", str(tiny_model_dir), "--quiet"]) == 2
    table = rows(out / "summary.csv")
    assert sorted(table) == ["missing.png", "slice0", "study1"]
    assert table["missing.png"]["error"] == f"{root / 'in' / 'missing.png'}: input not found"
    assert (out / "study1_seg.dcm").is_file() and (out / "slice0_mask.png").is_file()
    (root / "bad.csv").write_text("file\nin/slice0.png\n")
    assert main(["batch", str(root / "bad.csv"), "--out", str(out), "--model-dir", str(tiny_model_dir), "--quiet"]) == 2
    assert "a manifest needs a header row with a 'path' column" in capsys.readouterr().err


# ---------------------------------------------------------------- on Ray


def test_on_ray_each_study_is_done_once_by_workers_that_load_the_model_once(local_ray, studies, tiny_model_dir, tmp_path):
    spec = ModelSpec(model_dir=str(tiny_model_dir))
    here, there = tmp_path / "here", tmp_path / "ray"
    run_batch([str(studies["in"]), str(studies["dicom"])], here, spec, progress=False)
    run = run_batch([str(studies["in"]), str(studies["dicom"])], there, spec, ray="local", workers=2, progress=False)
    assert local_ray.is_initialized()  # the module's instance was used, not shut down
    assert (run.done_now, len(run.failed)) == (5, 1)
    same_outputs(here, there)
    table = rows(there / "summary.csv")
    assert {k: {c: v for c, v in r.items() if c != "seconds"} for k, r in table.items()} == {
        k: {c: v for c, v in r.items() if c != "seconds"} for k, r in rows(here / "summary.csv").items()
    }
    assert table["broken"]["error"].startswith(f"{studies['in'] / 'broken.tif'}: ")
    assert sum(run.nodes().values()) == 5  # every study was done by a Ray worker (one node here)
    again = run_batch([str(studies["in"]), str(studies["dicom"])], there, spec, ray="local", progress=False)
    assert (again.done_now, again.skipped) == (0, 5)


def test_on_ray_a_model_that_cannot_load_is_one_message(local_ray, studies, tmp_path):
    with pytest.raises(ValueError, match="the Ray workers could not load the model"):
        run_batch([str(studies["in"])], tmp_path / "out", ModelSpec(model_dir=str(tmp_path / "no-models")), ray="local", progress=False)


def test_two_names_of_one_file_are_two_studies(tiny_model_dir, tmp_path):
    """Links to one file under two names (a manifest of studies sharing a template, a folder of links) are two
    studies with their own outputs; the same path given twice is one."""
    src = tmp_path / "one.png"
    src.write_bytes(synthetic_png(size=64))
    (tmp_path / "in").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "in" / name).symlink_to(src)
    run = run_batch([str(tmp_path / "in"), str(tmp_path / "in" / "a.png")], tmp_path / "out", ModelSpec(model_dir=str(tiny_model_dir)), progress=False)
    assert sorted(r.id for r in run.records) == ["a", "b"] and run.done_now == 2
    assert (tmp_path / "out" / "a_mask.png").is_file() and (tmp_path / "out" / "b_mask.png").is_file()


def test_on_ray_the_studies_of_a_killed_worker_go_to_the_other(local_ray, tiny_model_dir, tmp_path):
    """One of the two worker processes is killed (SIGKILL, as the OOM killer or a lost node would) after the first
    study: its studies in flight go to the other worker and every study is done."""
    import os
    import signal

    (tmp_path / "in").mkdir()
    for i in range(8):
        (tmp_path / "in" / f"s{i}.png").write_bytes(synthetic_png(size=64))
    killed = []

    def parent(pid: str) -> str:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1]

    def kill_one_worker(rec):
        if killed:
            return
        for pid in os.listdir("/proc"):  # Ray names its actor processes ray::Worker...; ours: children of our raylet
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                ours = pid.isdigit() and parent(parent(pid)) == str(os.getpid())
            except OSError:
                continue
            if ours and cmdline.startswith(b"ray::Worker"):
                os.kill(int(pid), signal.SIGKILL)
                killed.append(pid)
                return

    run = run_batch(
        [str(tmp_path / "in")], tmp_path / "out", ModelSpec(model_dir=str(tiny_model_dir)), ray="local", workers=2, progress=False, on_record=kill_one_worker
    )
    assert killed, "no Ray worker process found"
    assert (run.done_now, len(run.failed)) == (8, 0), [r.error for r in run.failed]
    assert sorted(rows(tmp_path / "out" / "summary.csv")) == [f"s{i}" for i in range(8)]
