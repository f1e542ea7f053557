"""``brainseg predict`` on a batch: an input that fails is one line naming it and the others go on; a DICOM SEG
that cannot be written is a warning beside the mask; DICOM files without preamble or ``.dcm`` name are found.

Models are the tiny ones of ``conftest.tiny_model_dir`` (masks mean nothing here).
"""

from __future__ import annotations

import json

import pytest
from dicom_series import NO_FRAME_OF_REFERENCE, bare, edited, small_series

from brainseg.cli import main
from brainseg.io.synthetic import synthetic_png


@pytest.fixture
def batch(tmp_path):
    """Four inputs: a folder of old-style DICOM files (no preamble, named IM0000...), a DICOM series whose
    SEG cannot be written (no FrameOfReferenceUID), a corrupt TIFF and a path that does not exist."""
    ok = tmp_path / "in" / "old_export"
    bare(small_series(tmp_path / "series"), ok)
    nofor = tmp_path / "in" / "nofor"
    nofor.mkdir(parents=True)
    for name, data in edited(small_series(tmp_path / "series2"), NO_FRAME_OF_REFERENCE):
        (nofor / name).write_bytes(data)
    broken = tmp_path / "in" / "broken.tif"
    broken.write_bytes(b"II*\x00garbage")
    return {"ok": ok, "nofor": nofor, "broken": broken, "missing": tmp_path / "in" / "missing.png", "out": tmp_path / "out"}


def test_batch_goes_on_past_failed_inputs(batch, tiny_model_dir, capsys):
    inputs = [str(batch[k]) for k in ("broken", "ok", "missing", "nofor")]
    assert main(["predict", *inputs, "--out", str(batch["out"]), "--model-dir", str(tiny_model_dir)]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert f"brainseg: error: {batch['missing']}: input not found" in err
    assert any(line.startswith(f"brainseg: error: {batch['broken']}: ") for line in err), err
    assert err[-1] == "brainseg: 2 of 4 inputs failed"
    assert "Traceback" not in captured.err
    out = batch["out"]
    for name in ("old_export_mask.nii.gz", "old_export_seg.dcm", "old_export_lesions.json", "nofor_mask.nii.gz", "nofor_overlay.png", "nofor_lesions.json"):
        assert (out / name).is_file(), name
    assert not (out / "nofor_seg.dcm").exists()
    warned = [line for line in captured.out.splitlines() if line.startswith("nofor: warning: the DICOM SEG could not be written")]
    assert len(warned) == 1 and "FrameOfReferenceUID" in warned[0], captured.out
    assert json.loads((out / "nofor_lesions.json").read_text())["read_as"]["warnings"] == [warned[0].split(": warning: ", 1)[1]]


def test_a_folder_of_old_dicom_files_is_one_input(batch, tiny_model_dir, capsys):
    assert main(["predict", str(batch["ok"]), "--out", str(batch["out"]), "--model-dir", str(tiny_model_dir)]) == 0
    assert (batch["out"] / "old_export_seg.dcm").is_file()
    assert "old_export: read as FLAIR only" in capsys.readouterr().out


def test_an_unexpected_failure_is_one_line_with_its_type(tmp_path, tiny_model_dir, capsys, monkeypatch):
    """Anything but bad data (here a RuntimeError from reading one slice): one line with the exception's type; the traceback with -v only."""
    import brainseg.inference.predict as predict

    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(synthetic_png(size=64))
    real = predict.read_slice

    def read_slice(path):
        if path.name == "a.png":
            raise RuntimeError("disk on fire")
        return real(path)

    monkeypatch.setattr(predict, "read_slice", read_slice)
    args = ["predict", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--out", str(tmp_path / "o"), "--model-dir", str(tiny_model_dir)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"brainseg: error: {tmp_path / 'a.png'}: unexpected RuntimeError: disk on fire" in err.splitlines()
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "brainseg: 1 of 2 inputs failed"
    assert (tmp_path / "o" / "b_mask.png").is_file() and not (tmp_path / "o" / "a_mask.png").exists()
    assert main(["-v", *args]) == 2
    assert "Traceback" in capsys.readouterr().err
