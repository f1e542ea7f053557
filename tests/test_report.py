"""Reports (``brainseg.display.report``): the DICOM SR (TID 1500) read back with highdicom, the secondary-capture series, the
HTML page; ``brainseg predict --report``; the API's /report.html, /sr.dcm and /sc.zip downloads.

The SR is checked against a known mask on a synthetic DICOM series (``dicom_series``): an ellipse of 25 x 11 pixels
(0.8 mm pixels, 3 mm slices) on three slices and a 3 x 3 blob, so the expected diameters and volumes are known
without brainseg's measuring code. The CLI and API tests use the tiny models of ``conftest`` (their masks mean
nothing; what is checked is that the reports say what the lesion table says).
"""

from __future__ import annotations

import base64
import io
import json
import re
import zipfile

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from dicom_series import ANONYMISED_HEADERS, NO_FRAME_OF_REFERENCE, PLANTED_BIRTH, PLANTED_ID, PLANTED_NAME, edited, study_ids, write_series, zip_bytes
from helpers import make_client, nifti
from pydicom.uid import SecondaryCaptureImageStorage

from brainseg.display import report
from brainseg.evaluation.measure import plane_metric, rano_bm
from brainseg.inference.predict import lesion_table
from brainseg.io.dicom import load_dicom_path, seg_bytes
from brainseg.io.synthetic import synthetic_png, synthetic_slice
from brainseg.serving.render import display_volume

PIXEL_MM, SLICE_MM = 0.8, 3.0
ELLIPSE_SLICES = (3, 4, 5)
BLOB_SLICE = 8
MODEL, VERSION = "attention_unet", "v1-test"


def ellipse_mask(shape: tuple[int, int, int]) -> np.ndarray:
    """(Z, H, W): an ellipse 25 pixels wide and 11 high (semi-axes 12 and 5 around the centre pixel) on ELLIPSE_SLICES,
    a 3 x 3 blob on BLOB_SLICE."""
    mask = np.zeros(shape, bool)
    for z in ELLIPSE_SLICES:
        m = np.zeros(shape[1:], np.uint8)
        cv2.ellipse(m, (20, 15), (12, 5), 0, 0, 360, 1, -1)
        mask[z] = m > 0
    mask[BLOB_SLICE, 30:33, 5:8] = True
    return mask


def make_study(folder, edit=None) -> dict:
    """A synthetic MR series in ``folder`` (``edit``: an ``edited`` edit of its headers), read back, the ellipse mask, its
    lesion table and RANO-BM, and the DICOM SEG of it."""
    data = np.random.default_rng(0).integers(100, 300, (48, 40, 10)).astype(np.int16)
    files = write_series(folder / "raw", data, np.diag([PIXEL_MM, PIXEL_MM, SLICE_MM, 1.0]), study_ids())
    series = folder / "series"
    series.mkdir()
    for name, raw in edited(files, edit):
        (series / name).write_bytes(raw)
    vol = load_dicom_path(series)
    mask = ellipse_mask(vol.slices.shape[:3])
    lesions = lesion_table(mask, voxel_volume_mm3=vol.voxel_volume_mm3, metric=plane_metric(vol.display_affine), slice_spacing_mm=vol.spacing[2])
    rano = rano_bm(lesions, slice_spacing_mm=vol.spacing[2])
    seg = seg_bytes(vol.dicom, vol.to_stored(mask), MODEL, VERSION)
    source = pydicom.dcmread(files[0])
    return {"vol": vol, "mask": mask, "lesions": lesions, "rano": rano, "seg": seg, "source": source}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("report"))


def read_sr(data: bytes) -> hd.sr.Comprehensive3DSR:
    sr = hd.sr.srread(io.BytesIO(data))
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return sr


def lesion_groups(sr) -> dict[str, dict]:
    """Tracking identifier -> {values: concept meaning -> (value, unit), evaluations: meaning -> answer, ref: the
    ReferencedSegment content items} of each TID 1411 group."""
    out = {}
    for g in sr.content.get_volumetric_roi_measurement_groups():
        ref = g.referenced_segment
        out[g.tracking_identifier] = {
            "values": {m.name.meaning: (m.value, m.unit.value) for m in g.get_measurements()},
            "evaluations": {q.name.meaning: q.value.meaning for q in g.get_qualitative_evaluations()},
            "ref": ref,
        }
    return out


def source_series_of(ref) -> str:
    return next(str(item.UID) for item in ref if item.ValueType == "UIDREF")


# ---------------------------------------------------------------- the SR


def test_the_sr_reads_back_and_references_the_seg_and_the_source_series(study):
    sr = read_sr(report.sr_bytes(study["seg"], study["lesions"], study["rano"], MODEL, VERSION))
    seg, source = pydicom.dcmread(io.BytesIO(study["seg"])), study["source"]
    assert sr.StudyInstanceUID == source.StudyInstanceUID and str(sr.PatientName) == PLANTED_NAME and sr.PatientID == source.PatientID
    assert sr.SeriesInstanceUID not in (seg.SeriesInstanceUID, source.SeriesInstanceUID)
    evidence = {
        i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence
    }
    assert evidence == {seg.SOPInstanceUID}
    groups = lesion_groups(sr)
    assert sorted(groups) == ["lesion 1", "lesion 2"]
    for g in groups.values():
        ref = g["ref"]
        assert ref[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert ref[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == 1
        assert source_series_of(ref) == source.SeriesInstanceUID
    (observer,) = sr.content.get_observer_contexts()
    assert observer.observer_identifying_attributes.model_name == "brainseg attention_unet v1-test", "the device observer names the model and version"


def test_sr_values_are_the_lesion_table_and_the_known_shape(study):
    lesions, rano = study["lesions"], study["rano"]
    sr = read_sr(report.sr_bytes(study["seg"], lesions, rano, MODEL, VERSION))
    groups = lesion_groups(sr)
    for row in lesions:
        g = groups[f"lesion {row['id']}"]
        assert g["values"]["Volume"] == (pytest.approx(row["volume_mm3"]), "mm3")
        assert g["values"]["Long axis"] == (pytest.approx(row["longest_diameter_mm"]), "mm")
        assert g["values"]["Perpendicular Axis"] == (pytest.approx(row["perpendicular_diameter_mm"]), "mm")
        assert g["evaluations"]["Measurable lesion (RANO-BM)"] == ("Yes" if row["measurable"] else "No")
    big, small = groups["lesion 1"]["values"], groups["lesion 2"]["values"]
    ellipse_voxels = int(ellipse_mask(study["mask"].shape)[list(ELLIPSE_SLICES)].sum())
    assert big["Volume"][0] == pytest.approx(ellipse_voxels * PIXEL_MM * PIXEL_MM * SLICE_MM, abs=0.01)
    assert abs(big["Long axis"][0] - 25 * PIXEL_MM) <= PIXEL_MM and abs(big["Perpendicular Axis"][0] - 11 * PIXEL_MM) <= PIXEL_MM
    assert small["Volume"][0] == pytest.approx(9 * PIXEL_MM**2 * SLICE_MM)
    # The 3 x 3 blob's outline runs through its pixels' edge midpoints (``measure``): across, 3 by 2 pixels from corner to corner.
    assert small["Long axis"][0] == pytest.approx(np.sqrt(13) * PIXEL_MM, abs=0.01)
    assert groups["lesion 1"]["evaluations"]["Target lesion (RANO-BM)"] == "Yes" and groups["lesion 2"]["evaluations"]["Target lesion (RANO-BM)"] == "No"
    (summary,) = sr.content.get_image_measurement_groups()
    count, total = summary.get_measurements()
    assert count.name.value == "246206008" and count.value == 2, "SCT Number of lesions"
    assert total.value == pytest.approx(rano["sum_longest_diameters_mm"]) == pytest.approx(big["Long axis"][0])
    assert [q.value.meaning for q in summary.get_qualitative_evaluations()] == ["Decision support, not a diagnosis"]


def test_dcmtk_reads_the_sr_without_a_warning(study, tmp_path):
    """An independent reader: dcmtk's dsrdump checks the SR's structure and references (it warns, for one, about a
    reference naming both frames and a segment, which DICOM does not allow); each lesion names segment 1 only."""
    import shutil
    import subprocess

    if shutil.which("dsrdump") is None:
        pytest.skip("dcmtk's dsrdump is not installed")
    path = tmp_path / "sr.dcm"
    path.write_bytes(report.sr_bytes(study["seg"], study["lesions"], study["rano"], MODEL, VERSION))
    run = subprocess.run(["dsrdump", "-v", str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "Comprehensive 3D SR Document" in run.stdout
    said = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("W:", "E:", "F:"))]
    assert said == [], said
    assert run.stdout.count('IMAGE:(,,"Referenced Segment")') == 2
    for row in study["lesions"]:  # the values as dcmtk reads them
        assert f'NUM:(,,"Long axis")="{row["longest_diameter_mm"]}"' in run.stdout and f'NUM:(,,"Volume")="{row["volume_mm3"]}"' in run.stdout
    for g in lesion_groups(read_sr(path.read_bytes())).values():
        assert "ReferencedFrameNumber" not in g["ref"][0].ReferencedSOPSequence[0]


def test_sr_of_an_anonymised_series_without_type2_attributes(tmp_path):
    edit, expected = ANONYMISED_HEADERS["every Type 2 patient and study attribute gone"]
    anon = make_study(tmp_path, edit)
    sr = read_sr(report.sr_bytes(anon["seg"], anon["lesions"], anon["rano"], MODEL, VERSION))
    for key, value in expected.items():
        assert str(sr.get(key)) == value, key
    assert sr.StudyInstanceUID == anon["source"].StudyInstanceUID and len(lesion_groups(sr)) == 2


def test_the_sr_itemises_the_largest_lesions_and_counts_them_all(study, monkeypatch):
    monkeypatch.setattr(report, "MAX_SR_LESIONS", 1)
    sr = read_sr(report.sr_bytes(study["seg"], study["lesions"], study["rano"], MODEL, VERSION, lesion_count=7))
    assert list(lesion_groups(sr)) == ["lesion 1"]
    (summary,) = sr.content.get_image_measurement_groups()
    assert summary.get_measurements()[0].value == 7


def test_no_lesion_still_gives_an_sr_with_the_summary_group(study):
    sr = read_sr(report.sr_bytes(study["seg"], [], rano_bm([], 3.0), MODEL, VERSION))
    assert lesion_groups(sr) == {} and len(sr.content.get_image_measurement_groups()) == 1


def test_an_sr_and_a_secondary_capture_need_a_seg():
    with pytest.raises(report.ReportError, match="SEG"):
        report.sr_bytes(pydicom.Dataset(), [], None, MODEL, VERSION)
    with pytest.raises(report.ReportError, match="secondary capture could not be written from this result's DICOM SEG"):
        report.secondary_capture_series(pydicom.Dataset(), np.zeros((1, 8, 8, 3), np.uint8), np.zeros((1, 8, 8), bool), MODEL, VERSION)


# ---------------------------------------------------------------- the secondary capture


def test_secondary_capture_images_have_the_overlay_where_the_mask_is(study):
    vol, mask = study["vol"], study["mask"]
    display = display_volume(vol.slices)
    files = report.secondary_capture_series(study["seg"], display, mask, MODEL, VERSION, {"right": "L", "bottom": "P"})
    lesion_slices = [z for z in range(len(mask)) if mask[z].any()]
    assert len(files) == len(lesion_slices) == 4
    seg = pydicom.dcmread(io.BytesIO(study["seg"]))
    series = set()
    for z, raw in zip(lesion_slices, files, strict=False):
        ds = pydicom.dcmread(io.BytesIO(raw))
        assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.PhotometricInterpretation == "RGB"
        assert ds.StudyInstanceUID == seg.StudyInstanceUID and str(ds.PatientName) == PLANTED_NAME and list(ds.PatientOrientation) == ["L", "P"]
        series.add(ds.SeriesInstanceUID)
        rgb = ds.pixel_array.astype(int)
        assert rgb.shape == (*mask.shape[1:], 3)
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
        inside, outside = mask[z], ~mask[z]
        outside[-14:] = False  # the burned-in disclaimer along the bottom edge
        assert (r[inside] > g[inside] + 30).all(), "the lesion is tinted (or outlined) red"
        assert (r[outside] == g[outside]).all() and (g[outside] == b[outside]).all(), "grey elsewhere"
        grey = display[z][..., 1].astype(int)
        assert np.array_equal(r[outside], grey[outside]), "the FLAIR slice as displayed"
        assert ((r[-14:] > 200) & (g[-14:] > 200) & (b[-14:] < 100)).any(), "the yellow disclaimer"
    assert len(series) == 1 and series.isdisjoint({seg.SeriesInstanceUID, study["source"].SeriesInstanceUID})
    with zipfile.ZipFile(io.BytesIO(report.zip_files(files))) as zf:
        assert zf.namelist() == [f"SC{i:04d}.dcm" for i in range(1, 5)]


# ---------------------------------------------------------------- the HTML page


def test_html_report_has_the_values_the_version_the_disclaimer_and_an_image(study):
    summary = {
        "kind": "volume",
        "model": {"name": MODEL, "display_name": "Attention U-Net", "version": VERSION, "precision": "fp32"},
        "input": {"name": "<script>alert(1)</script>", "warnings": ["a warning & more"], "read_as": "FLAIR only", "condition": "flair_only"},
        "lesions": study["lesions"],
        "rano_bm": study["rano"],
        "lesion_count": 2,
    }
    info = report.report_info(summary)
    page = report.html_report(info, report.key_images(display_volume(study["vol"].slices), study["mask"], info.lesions))
    big = study["lesions"][0]
    for text in (f"{big['volume_ml']:.3f}", f"{big['longest_diameter_mm']:.1f}", f"{big['perpendicular_diameter_mm']:.1f}", VERSION, "fp32", report.DISCLAIMER):
        assert text in page, text
    assert f"<b>{study['rano']['sum_longest_diameters_mm']:.1f} mm</b>" in page
    assert "<script>" not in page and "&lt;script&gt;" in page and "a warning &amp; more" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2, "the ellipse's slice and the blob's"
    img = cv2.imdecode(np.frombuffer(base64.b64decode(images[0]), np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (*study["mask"].shape[1:], 3)


def test_html_report_prints_on_one_a4_page(study, tmp_path):
    """A full page (40 lesions, long warnings, a DICOM study's input lines) printed by Chromium to PDF: one page."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium to print the page with")
    lesions = [dict(study["lesions"][i % 2], id=i + 1) for i in range(40)]
    warning = "the DICOM SEG could not be written (the source headers hold values a DICOM SEG cannot carry); the mask is kept as usual"
    summary = {
        "kind": "volume",
        "model": {"name": "ensemble", "display_name": "Ensemble", "version": "unetpp:1ab0959faacc+attention_unet:fd231c8049eb", "precision": "int8"},
        "input": {
            "name": "a-long-study-name-from-a-pacs-export",
            "warnings": [warning] * 3,
            "read_as": "pre-contrast T1, FLAIR, post-contrast T1",
            "condition": "all",
            "dicom": {"channel_sources": ["series 2 (AX T1 PRE)", "series 1 (AX FLAIR)", "series 3 (AX T1 POST GD)"]},
            "notes": ["series 4 (DWI) not used: not recognised", "series 3 resampled onto the FLAIR grid (linear interpolation)"],
        },
        "lesions": lesions,
        "rano_bm": study["rano"],
        "lesion_count": 40,
        "shape": [240, 240, 155],
        "spacing_mm": [1, 1, 1],
    }
    display, mask = np.zeros((10, 240, 240, 3), np.uint8), np.zeros((10, 240, 240), bool)
    mask[3, 50:120, 40:100] = mask[8, 150:160, 150:160] = True
    page = tmp_path / "report.html"
    page.write_text(report.html_report(report.report_info(summary), report.key_images(display, mask, lesions)))
    pdf = tmp_path / "report.pdf"
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer", f"--print-to-pdf={pdf}", page.as_uri()]
    subprocess.run(cmd, capture_output=True, timeout=120, check=False)
    assert pdf.is_file(), "Chromium printed nothing"
    assert re.findall(rb"/Count (\d+)", pdf.read_bytes())[0] == b"1"


# ---------------------------------------------------------------- CLI and API


def blob_series(folder, slices: int = 6, size: int = 64) -> None:
    """A DICOM series of the synthetic slice (its FLAIR channel) repeated: the tiny models mark its bright blob."""
    img, _ = synthetic_slice(size=size, seed=1)
    data = np.stack([np.rot90(img[:, :, 1], -1)] * slices, axis=-1).astype(np.int16)
    write_series(folder, data, np.diag([1.0, 1.0, 2.0, 1.0]), study_ids())


def test_cli_report_writes_the_page_the_sr_and_the_secondary_capture(tmp_path, tiny_model_dir, capsys):
    from brainseg.cli import main

    blob_series(tmp_path / "blob")
    nofor = tmp_path / "nofor"
    nofor.mkdir()
    blob_series(tmp_path / "raw")
    for name, raw in edited(sorted((tmp_path / "raw").iterdir()), NO_FRAME_OF_REFERENCE):
        (nofor / name).write_bytes(raw)
    (tmp_path / "slice.png").write_bytes(synthetic_png(size=64))
    (tmp_path / "vol.nii.gz").write_bytes(nifti(np.random.default_rng(0).integers(1, 255, (32, 32, 4), dtype=np.uint8)))
    out = tmp_path / "out"
    inputs = [str(tmp_path / name) for name in ("blob", "nofor", "slice.png", "vol.nii.gz")]
    assert main(["predict", *inputs, "--out", str(out), "--model-dir", str(tiny_model_dir), "--report", "--threshold", "0.3"]) == 0
    said = capsys.readouterr().out
    stats = json.loads((out / "blob_lesions.json").read_text())
    assert stats["lesion_count"] >= 1, "the tiny model marks the blob"
    sr = read_sr((out / "blob_sr.dcm").read_bytes())
    seg = pydicom.dcmread(out / "blob_seg.dcm")
    groups = lesion_groups(sr)
    assert len(groups) == stats["lesion_count"]
    for row in stats["lesions"]:
        g = groups[f"lesion {row['id']}"]
        assert g["ref"][0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert g["values"]["Volume"][0] == pytest.approx(row["volume_mm3"]) and g["values"]["Long axis"][0] == pytest.approx(row["longest_diameter_mm"])
    with zipfile.ZipFile(out / "blob_sc.zip") as zf:
        assert len(zf.namelist()) == len(stats["slices_with_lesion"])
    page = (out / "blob_report.html").read_text()
    assert report.DISCLAIMER in page and "data:image/png;base64," in page
    for stem in ("slice", "vol", "nofor"):  # a slice and a NIfTI volume have no DICOM source; nofor's SEG could not be written
        assert (out / f"{stem}_report.html").is_file() and not (out / f"{stem}_sr.dcm").exists() and not (out / f"{stem}_sc.zip").exists(), stem
    assert "nofor: warning: no DICOM SR or secondary capture: they reference the DICOM SEG, which could not be written" in said


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    with make_client(tiny_model_dir, api_key="key-one, key-two") as c:
        folder = tmp_path_factory.mktemp("api_report") / "blob"
        blob_series(folder)
        r = c.post("/v1/segment", files={"files": ("study.zip", zip_bytes([folder]))}, data={"threshold": "0.3"}, headers={"X-API-Key": "key-one"})
        assert r.status_code == 200, r.text
        yield c, r.json()


def test_api_downloads_the_reports_of_a_dicom_result(keyed):
    c, body = keyed
    one = {"X-API-Key": "key-one"}
    assert body["lesion_count"] >= 1
    urls = body["urls"]
    assert urls["report_html"].endswith("/report.html") and urls["sr_dicom"].endswith("/sr.dcm") and urls["sc_zip"].endswith("/sc.zip")
    page = c.get(urls["report_html"], headers=one)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and report.DISCLAIMER in page.text
    assert body["model"]["version"] in page.text
    for planted in ("Zzyzx", "Quentin", PLANTED_ID, PLANTED_BIRTH):
        assert planted not in page.text, "the page names no patient (the SR and SC do, as the SEG: they file with the study)"
    r = c.get(urls["sr_dicom"], headers=one)
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom" and "study_sr.dcm" in r.headers["content-disposition"]
    seg = pydicom.dcmread(io.BytesIO(c.get(urls["seg_dicom"], headers=one).content))
    sr = read_sr(r.content)
    assert str(sr.PatientName) == PLANTED_NAME and sr.StudyInstanceUID == seg.StudyInstanceUID
    groups = lesion_groups(sr)
    assert len(groups) == body["lesion_count"]
    for row in body["lesions"]:
        g = groups[f"lesion {row['id']}"]
        assert g["ref"][0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
        assert g["values"]["Volume"][0] == pytest.approx(row["volume_mm3"]) and g["values"]["Perpendicular Axis"][0] == pytest.approx(
            row["perpendicular_diameter_mm"]
        )
    sc = c.get(urls["sc_zip"], headers=one)
    assert sc.status_code == 200 and sc.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(sc.content)) as zf:
        assert len(zf.namelist()) == len(body["slices_with_lesion"])
        assert pydicom.dcmread(io.BytesIO(zf.read(zf.namelist()[0]))).StudyInstanceUID == seg.StudyInstanceUID


def test_api_reports_stay_with_their_key(keyed):
    c, body = keyed
    for key in ("report_html", "sr_dicom", "sc_zip"):
        r = c.get(body["urls"][key], headers={"X-API-Key": "key-two"})
        assert r.status_code == 404 and "not found" in r.json()["detail"], key
        assert c.get(body["urls"][key]).status_code == 401


def test_api_a_slice_result_has_a_page_but_no_sr(keyed):
    c, _ = keyed
    one = {"X-API-Key": "key-one"}
    body = c.post("/v1/segment", files={"files": ("s.png", synthetic_png(size=64))}, headers=one).json()
    assert "sr_dicom" not in body["urls"]
    page = c.get(body["urls"]["report_html"], headers=one)
    assert page.status_code == 200 and "data:image/png;base64," in page.text
    for what in ("sr.dcm", "sc.zip"):
        r = c.get(f"/v1/results/{body['id']}/{what}", headers=one)
        assert r.status_code == 404 and "not made from DICOM" in r.json()["detail"]
