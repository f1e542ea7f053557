"""``POST /v1/segment`` with DICOM (a zipped series or study), the SEG download, privacy, every bad
DICOM's 4xx, and the review views (probability heat map, window / level).

Models are the tiny ones of ``conftest.tiny_model_dir`` (masks mean nothing; identical inputs
give identical masks, which is what the DICOM / NIfTI comparison needs).
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile

import cv2
import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import (
    ANONYMISED_HEADERS,
    BROKEN_SERIES,
    NO_FRAME_OF_REFERENCE,
    PLANTED_BIRTH,
    PLANTED_ID,
    PLANTED_NAME,
    edited,
    monochrome1,
    padding,
    small_series,
    write_brats_study,
    zip_bytes,
)
from helpers import BRATS, every_log_line, make_client, require, segment

PLANTED = ("Zzyzx", "Quentin", PLANTED_ID, PLANTED_BIRTH, "1947-11-03")
ZIP_NAME = f"{PLANTED_NAME.replace('^', ' ')} MRI.zip"  # a zip named after the patient, as people do


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with make_client(tiny_model_dir) as c:
        yield c


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    require(BRATS)
    out = write_brats_study(tmp_path_factory.mktemp("api_dicom"), BRATS)
    out["zip"] = zip_bytes([out["dicom"]])
    return out


@pytest.fixture(scope="module")
def answers(client, study):
    """The DICOM zip and the NIfTI set of the same data, segmented at threshold 0.2; what was logged meanwhile (DEBUG)."""
    with every_log_line() as said:
        dcm = segment(client, (ZIP_NAME, study["zip"]), threshold=0.2)
        nii = segment(client, [(p.name, p.read_bytes()) for p in study["nifti"].values()], threshold=0.2)
        assert dcm.status_code == 200, dcm.text
        assert nii.status_code == 200, nii.text
        downloads = {what: client.get(dcm.json()["urls"][key]) for what, key in (("seg", "seg_dicom"), ("mask", "mask_nifti"), ("result", "result"))}
    return {"dicom": dcm, "nifti": nii, "log": said.getvalue(), **downloads}


def test_zipped_study_is_segmented_like_its_nifti_files(client, answers):
    body = answers["dicom"].json()
    assert body["kind"] == "volume" and body["input"]["condition"] == "all"
    assert body["input"]["dicom"]["channel_sources"] == ["series 2 (AX T1 PRE)", "series 1 (AX FLAIR)", "series 3 (AX T1 POST GD)"]
    assert [s["used_as"] for s in body["input"]["dicom"]["series"]] == ["FLAIR", "pre-contrast T1", "post-contrast T1"]
    assert body["input"]["dicom"]["window_presets"][1] == [{"center": 400.0, "width": 800.0, "name": "header 1"}]
    other = answers["nifti"].json()
    assert body["lesion_voxels"] == other["lesion_voxels"] > 0 and body["slice_lesion_area_px"] == other["slice_lesion_area_px"]
    a = nib.Nifti1Image.from_bytes(gzip.decompress(answers["mask"].content))
    b = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(other["urls"]["mask_nifti"]).content))
    assert np.array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj)), "identical voxels"
    assert np.allclose(a.affine, b.affine, atol=1e-4)


def test_seg_download_reads_back_and_references_the_source(answers, study):
    r = answers["seg"]
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom"
    assert "dicom_seg.dcm" in r.headers["content-disposition"], "named without the patient's name"
    ds = pydicom.dcmread(io.BytesIO(r.content))
    assert ds.Modality == "SEG" and str(ds.PatientName) == PLANTED_NAME and ds.StudyInstanceUID == study["ids"]["study"]
    assert ds.FrameOfReferenceUID == study["ids"]["frame"] and int(ds.NumberOfFrames) == 40
    assert ds.SegmentSequence[0].SegmentLabel == "lesion"
    algo = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "brainseg attention_unet" and algo.AlgorithmVersion == answers["dicom"].json()["model"]["version"]
    flair = {pydicom.dcmread(p).SOPInstanceUID for p in (study["dicom"] / "AX_FLAIR").iterdir()}
    assert {r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence} >= flair


def test_privacy_the_patient_is_named_only_in_the_seg(answers, client):
    body = answers["dicom"].json()
    assert body["files"] == ["dicom.zip"], "the upload's name held the patient's name"
    assert body["input"]["name"] == "dicom"
    texts = {
        "answer": answers["dicom"].text,
        "result": answers["result"].text,
        "log": answers["log"],
        "nifti mask": gzip.decompress(answers["mask"].content).decode("latin-1"),
        "headers": json.dumps(dict(answers["seg"].headers)) + json.dumps(dict(answers["mask"].headers)),
    }
    assert "/v1/segment" in answers["log"], "the log was captured"
    for where, text in texts.items():
        for planted in PLANTED:
            assert planted.lower() not in text.lower(), f"{planted} in the {where}"
    assert PLANTED_NAME.encode() in answers["seg"].content, "the SEG carries it, to be linkable"


def test_probability_view_and_window_level(client, answers):
    body = answers["dicom"].json()
    rid, z = body["id"], body["preview_slice"]

    def png(**q):
        r = client.get(f"/v1/results/{rid}/slice/{z}.png", params=q)
        assert r.status_code == 200, r.text
        return cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_UNCHANGED)

    heat = png(view="probability")
    assert heat.ndim == 3 and heat.shape[:2] == (240, 240) and heat.std() > 0
    window = body["input"]["display_window"]
    lo, hi = window["low"][1], window["high"][1]
    auto, same = png(view="image"), png(view="image", wc=(lo + hi) / 2, ww=hi - lo)
    assert np.abs(auto.astype(int) - same.astype(int)).max() <= 1, "the auto window given explicitly changes nothing"
    narrow = png(view="image", wc=(lo + hi) / 2, ww=(hi - lo) / 4)
    assert (narrow == 255).sum() > (auto == 255).sum(), "a narrower window saturates more"
    for bad in ({"wc": 100}, {"wc": 100, "ww": 0}, {"view": "heat"}):
        assert client.get(f"/v1/results/{rid}/slice/{z}.png", params={"view": "image", **bad}).status_code == 422


def test_slice_and_nifti_results_have_the_review_views_but_no_seg(client, answers):
    other = answers["nifti"].json()
    assert "seg_dicom" not in other["urls"]
    r = client.get(f"/v1/results/{other['id']}/seg.dcm")
    assert r.status_code == 404 and "DICOM" in r.json()["detail"]
    assert client.get(f"/v1/results/{other['id']}/slice/0.png", params={"view": "probability"}).status_code == 200


# ---------------------------------------------------------------- bad DICOM


def _series_files(tmp_path, edit=None, **kw) -> list[tuple[str, bytes]]:
    return edited(small_series(tmp_path / "s", **kw), edit)


def _zip(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files:
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.mark.parametrize(
    "case, status, words",
    [
        ("no pixel data", 422, "have no pixel data"),
        ("truncated pixel data", 422, "the pixel data cannot be decoded"),
        ("inconsistent geometry", 422, "not one evenly spaced stack"),
        ("compressed without a decoder", 422, "no decoder for it"),
        ("not MR", 422, "CT, not MR"),
    ],
)
def test_bad_dicom_series_gets_its_4xx(client, tmp_path, case, status, words):
    r = segment(client, ("study.zip", _zip(_series_files(tmp_path, BROKEN_SERIES[case]))))
    assert r.status_code == status, (case, r.text)
    detail = r.json()["detail"]
    assert words in detail and detail.startswith("study.zip: ") and "\n" not in detail
    assert "Traceback" not in detail and "pydicom" not in detail.lower() and PLANTED_NAME not in detail
    assert client.get("/health").status_code == 200


def test_bad_zips_and_files_get_their_4xx(client, tmp_path):
    nothing = _zip([("README.txt", b"no images here"), ("photo.jpg", b"\xff\xd8\xff\xe0 not really")])
    r = segment(client, ("study.zip", nothing))
    assert r.status_code == 422 and "nothing usable" in r.json()["detail"]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("IM0001.dcm", b"\0" * (300 << 20))  # inflates to 300 MiB, above the decoded-bytes limit (256 MiB)
    r = segment(client, ("bomb.zip", buf.getvalue()))
    assert r.status_code == 413 and "above the limit" in r.json()["detail"], r.text
    r = segment(client, ("cut.zip", _zip(_series_files(tmp_path))[:5000]))
    assert r.status_code == 422 and "not a readable .zip" in r.json()["detail"]
    r = segment(client, ("img.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64))
    assert r.status_code == 422 and "nothing usable" in r.json()["detail"]
    files = _series_files(tmp_path / "few", shuffle=False)[:3]  # .dcm files sent as they are (a few: the form takes at most 8 files)
    r = segment(client, files)
    assert r.status_code == 200 and r.json()["input"]["shape"] == [32, 32, 3], r.text


# ---------------------------------------------------------------- DICOM as hospitals export it


@pytest.mark.parametrize("case", ["PatientSex Female", "every Type 2 patient and study attribute gone", "no SliceThickness"])
def test_anonymised_exports_get_their_seg(client, tmp_path, case):
    edit, expected = ANONYMISED_HEADERS[case]
    r = segment(client, ("anon.zip", _zip(_series_files(tmp_path, edit))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert not any("DICOM SEG" in w for w in body["input"]["warnings"])
    seg = client.get(body["urls"]["seg_dicom"])
    assert seg.status_code == 200
    ds = pydicom.dcmread(io.BytesIO(seg.content))
    assert ds.Modality == "SEG" and int(ds.NumberOfFrames) == 8
    for key, value in expected.items():
        assert str(ds.get(key, "") or "") == value, key


def test_a_seg_that_cannot_be_written_keeps_the_mask(client, tmp_path):
    """No FrameOfReferenceUID: 200 with the mask and a plain warning; seg.dcm is a 404 that says why."""
    r = segment(client, ("nofor.zip", _zip(_series_files(tmp_path, NO_FRAME_OF_REFERENCE))))
    assert r.status_code == 200, r.text
    body = r.json()
    assert "seg_dicom" not in body["urls"] and body["kind"] == "volume" and body["slices"] == 8
    said = [w for w in body["input"]["warnings"] if w.startswith("the DICOM SEG could not be written")]
    assert len(said) == 1 and "FrameOfReferenceUID" in said[0], body["input"]["warnings"]
    assert "highdicom" not in said[0].lower() and "Error" not in said[0] and "Traceback" not in said[0]
    assert client.get(body["urls"]["mask_nifti"]).status_code == 200
    assert client.get(body["urls"]["result"]).json()["input"]["warnings"] == body["input"]["warnings"]
    r = client.get(f"/v1/results/{body['id']}/seg.dcm")
    assert r.status_code == 404 and "could not be written" in r.json()["detail"]


def test_padding_and_monochrome1_are_read_as_tissue_and_background(client, tmp_path):
    """PixelPaddingValue (uint16 65535 here) is background, not a bright frame in the window; MONOCHROME1 is inverted with a note."""
    files = small_series(tmp_path / "s")
    plain = segment(client, ("plain.zip", _zip(edited(files))))
    padded = segment(client, ("padded.zip", _zip(edited(files, padding(65535)))))
    mono1 = segment(client, ("mono1.zip", _zip(edited(files, monochrome1(files)))))
    assert plain.status_code == padded.status_code == mono1.status_code == 200, (padded.text, mono1.text)
    high = padded.json()["input"]["display_window"]["high"][1]
    assert high <= plain.json()["input"]["display_window"]["high"][1] < 1000, "the padding value is not in the intensity window"
    assert any("padding" in n for n in padded.json()["input"]["notes"])
    assert any("MONOCHROME1" in n for n in mono1.json()["input"]["notes"])
    assert mono1.json()["input"]["display_window"] == plain.json()["input"]["display_window"]
    assert mono1.json()["slice_lesion_area_px"] == plain.json()["slice_lesion_area_px"]
