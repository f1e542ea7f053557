"""DICOM in and DICOM SEG out (``brainseg.io.dicom``), on real data written as DICOM by ``dicom_series``.

The BraTS example study (t1n, t2f, t1c) is cut to 40 slices, tilted (12 degrees about x, 8
about z: an oblique acquisition) and written twice: as NIfTI files with the tilted affine and
as three DICOM MR series (shuffled files, values stored with RescaleSlope 0.5 and
RescaleIntercept -1000). Both must give the same volume, the same mask and a SEG whose
frames sit on the right slices.
"""

from __future__ import annotations

import contextlib
import io
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from dicom_series import (
    ANONYMISED_HEADERS,
    BRATS_SLICES,
    BROKEN_SERIES,
    NO_FRAME_OF_REFERENCE,
    PAD_ROWS,
    PLANTED_BIRTH,
    PLANTED_ID,
    PLANTED_NAME,
    bare,
    edited,
    monochrome1,
    padding,
    small_series,
    study_ids,
    write_brats_study,
    write_series,
    zip_bytes,
)
from helpers import BRATS, every_log_line, require

from brainseg.cli import main as cli_main
from brainseg.io import dicom
from brainseg.io.channels import describe_volume
from brainseg.io.volumes import load_volume

Z0, Z1 = BRATS_SLICES
LPS = np.diag([-1.0, -1.0, 1.0])


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    require(BRATS)
    return write_brats_study(tmp_path_factory.mktemp("dicom_study"), BRATS)


def items(folder) -> list[tuple[str, bytes]]:
    return [(str(p), p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]


# ---------------------------------------------------------------- reading


def test_dicom_series_reads_as_the_nifti_of_the_same_data(study):
    vol = dicom.load_dicom(items(study["dicom"]), "study.zip", name="study")
    ref = load_volume([study["nifti"][s] for s in ("t1n", "t2f", "t1c")])
    # Identical values: slices sorted by position (the files are shuffled), rescale slope / intercept applied.
    assert vol.slices.shape == ref.slices.shape == (Z1 - Z0, 240, 240, 3)
    assert np.array_equal(vol.slices, ref.slices)
    assert np.allclose(vol.affine, ref.affine, atol=1e-4), "the affine built from the DICOM geometry is the NIfTI one"
    assert np.allclose(vol.spacing, ref.spacing, atol=1e-5) and vol.shape == ref.shape
    assert (vol.condition, vol.present, vol.name) == ("all", ("t1n", "t2f", "t1c"), "study")
    block = vol.dicom.block()
    assert [s["used_as"] for s in block["series"]] == ["FLAIR", "pre-contrast T1", "post-contrast T1"]
    assert block["channel_sources"] == ["series 2 (AX T1 PRE)", "series 1 (AX FLAIR)", "series 3 (AX T1 POST GD)"]
    assert block["window_presets"][1] == [{"center": 400.0, "width": 800.0, "name": "header 1"}]


def test_display_slices_are_the_stored_dicom_images(study):
    """Slice z of the volume as stored is the file whose position is z-th along the stack, as the scanner stored it;
    what is shown is that put into the display orientation (anterior up, the patient's right on the left)."""
    import nibabel as nib

    from brainseg.io.volumes import DISPLAY_AXCODES

    vol = dicom.load_dicom(items(study["dicom"] / "AX_FLAIR"), "flair")
    assert nib.aff2axcodes(vol.display_affine) == DISPLAY_AXCODES
    refs = vol.dicom.references
    stored = vol.to_stored(vol.slices)
    for z in (0, 17, len(refs) - 1):
        ds = pydicom.dcmread(next(p for p in (study["dicom"] / "AX_FLAIR").iterdir() if pydicom.dcmread(p).SOPInstanceUID == refs[z].SOPInstanceUID))
        assert np.array_equal(stored[z, :, :, 1], ds.pixel_array * 0.5 - 1000)
    positions = np.array([r.ImagePositionPatient for r in refs], float)
    normal = np.cross(*np.reshape(refs[0].ImageOrientationPatient, (2, 3)))
    along = positions @ normal
    assert np.all(np.diff(along) != 0) and (np.all(np.diff(along) > 0) or np.all(np.diff(along) < 0)), "sorted along the normal"
    assert (LPS @ np.diff(positions, axis=0).mean(0))[2] > 0, "the stack runs towards superior, as the NIfTI does"


def test_one_series_is_read_like_one_volume(study):
    vol = dicom.load_dicom(items(study["dicom"] / "AX_T1_PRE"), "t1")
    block = describe_volume(vol)
    assert vol.condition == "flair_only" and vol.name_sequence == "t1"
    assert block["warnings"] and "pre-contrast T1" in block["warnings"][0], "a lone T1 is outside the training: said so"


# ---------------------------------------------------------------- series to sequences


@pytest.mark.parametrize(
    "desc, extra, expected",
    [
        ("AX FLAIR", {}, "flair"),
        ("t2_tirm_tra_dark-fluid", {}, "flair"),
        ("AX T1 FLAIR", {}, "t1"),  # a T1-weighted FLAIR is a T1
        ("T1 MPRAGE POST GD", {}, "t1c"),
        ("sag t1 mprage", {"ContrastBolusAgent": "Gadovist"}, "t1c"),
        ("AX T1 SE", {}, "t1"),
        ("AX T2 TSE", {}, "t2"),
        ("ep2d_diff_3scan_trace", {}, "other"),
        ("ADC", {}, "other"),
        ("3-plane loc", {}, "other"),
        ("", {"InversionTime": 2500, "EchoTime": 120, "RepetitionTime": 9000}, "flair"),
        ("", {"EchoTime": 12, "RepetitionTime": 600}, "t1"),
        ("series 7", {}, None),
    ],
)
def test_sequence_of_a_series(desc, extra, expected):
    ds = pydicom.Dataset()
    ds.SeriesDescription = desc
    for k, v in extra.items():
        setattr(ds, k, v)
    assert dicom.sequence_of(ds)[0] == expected


def test_ambiguous_and_missing_sequences_are_refused_by_name(tmp_path):
    ids = study_ids()
    small_series(tmp_path / "a", ids=ids, number=4, description="AX FLAIR")
    small_series(tmp_path / "b", ids=ids, number=5, description="COR FLAIR")
    with pytest.raises(dicom.DicomError, match=r"ambiguous: series 4 \(AX FLAIR\), series 5 \(COR FLAIR\) all look like FLAIR"):
        dicom.load_dicom(items(tmp_path), "study.zip")
    other = tmp_path / "other"
    small_series(other / "a", ids=ids, number=2, description="AX T1")
    small_series(other / "b", ids=ids, number=3, description="AX T1 +C")
    with pytest.raises(dicom.DicomError, match="no FLAIR series among 2 series"):
        dicom.load_dicom(items(other), "study.zip")


def test_post_contrast_missing_is_filled_with_flair_and_t2_is_noted(tmp_path):
    ids = study_ids()
    small_series(tmp_path / "f", ids=ids, number=1, description="AX FLAIR")
    small_series(tmp_path / "t", ids=ids, number=2, description="AX T1")
    small_series(tmp_path / "w", ids=ids, number=3, description="AX T2")
    vol = dicom.load_dicom(items(tmp_path), "study.zip")
    assert vol.condition == "post_missing" and np.array_equal(vol.slices[..., 2], vol.slices[..., 1])
    assert "series 3 (AX T2) not used: T2 is not used by the models" in vol.notes
    assert vol.dicom.channel_sources[2] == "series 1 (AX FLAIR), a copy of FLAIR"


def test_a_series_on_another_grid_is_resampled_onto_flair(tmp_path):
    """Same frame of reference, half the in-plane resolution: resampled (linear) onto the FLAIR grid."""
    ids = study_ids()
    ramp = np.broadcast_to(np.arange(32, dtype=np.int16)[:, None, None] * 10, (32, 32, 8))
    write_series(tmp_path / "f", ramp, np.diag([1.0, 1.0, 2.0, 1.0]), ids, number=1, description="AX FLAIR")
    write_series(tmp_path / "t", np.ascontiguousarray(ramp[::2, ::2]), np.diag([2.0, 2.0, 2.0, 1.0]), ids, number=2, description="AX T1")
    vol = dicom.load_dicom(items(tmp_path), "study.zip")
    assert vol.condition == "post_missing" and vol.slices.shape == (8, 32, 32, 3)
    assert any("resampled onto the FLAIR grid" in n for n in vol.notes)
    # x = column: the ramp runs along the stored columns; the T1's voxel centres fall on even FLAIR columns.
    stored = vol.to_stored(vol.slices)
    assert np.allclose(stored[3, 5, 0:30:2, 0], stored[3, 5, 0:30:2, 1])


# ---------------------------------------------------------------- bad DICOM


def test_bad_dicom_gets_one_plain_line(tmp_path):
    files = small_series(tmp_path / "ok")
    good = items(tmp_path / "ok")
    expected = {
        "no pixel data": "have no pixel data",
        "truncated pixel data": "the pixel data cannot be decoded",
        "inconsistent geometry": "not one evenly spaced stack",
        "not MR": "CT, not MR",
        "compressed without a decoder": r"compressed as JPEG Lossless, Non-Hierarchical \(Process 14\), and this server has no decoder",
    }
    assert set(expected) == set(BROKEN_SERIES)
    for what, words in expected.items():
        with pytest.raises(dicom.DicomError, match=words) as info:
            dicom.load_dicom(edited(files, BROKEN_SERIES[what]), "upload.zip")
        assert info.value.status == 422 and "\n" not in str(info.value), what
    missing = [it for i, it in enumerate(good) if i != 4]  # a slice missing from the stack
    with pytest.raises(dicom.DicomError, match="not one evenly spaced stack"):
        dicom.load_dicom(missing, "upload.zip")
    with pytest.raises(dicom.DicomError, match="nothing usable: 2 file"):
        dicom.load_dicom([("README.txt", b"hello"), ("x.jpg", b"\xff\xd8\xff")], "upload.zip")


def test_zip_bomb_and_broken_zips_are_refused_before_inflating():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("IM0001.dcm", b"\0" * (64 << 20))  # 64 MiB of zeros: ~64 KiB packed
    bomb = buf.getvalue()
    assert len(bomb) < 1 << 20
    with pytest.raises(dicom.DicomTooLarge, match="possible zip bomb") as info:
        dicom.unzip(bomb, "bomb.zip", max_bytes=256 << 20)
    assert info.value.status == 413
    with pytest.raises(dicom.DicomTooLarge, match="above the limit"):
        dicom.unzip(bomb, "bomb.zip", max_bytes=32 << 20)
    with pytest.raises(dicom.DicomError, match="not a readable .zip"):
        dicom.unzip(bomb[: len(bomb) // 2], "cut.zip", max_bytes=256 << 20)


# ---------------------------------------------------------------- CLI, SEG, privacy


@pytest.fixture(scope="module")
def cli_outputs(study, tiny_model_dir, tmp_path_factory):
    """``brainseg predict`` on the DICOM study (a zip named after the patient) and on its NIfTI files;
    what it printed and logged (every logger, DEBUG) is kept in ``said.txt`` beside the outputs."""
    out = tmp_path_factory.mktemp("predict")
    zipped = tmp_path_factory.mktemp("upload") / f"{PLANTED_NAME.replace('^', '_')}.zip"
    zipped.write_bytes(zip_bytes([study["dicom"]]))
    args = ["--out", str(out), "--model-dir", str(tiny_model_dir), "--threshold", "0.2"]
    with every_log_line() as said, contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        assert cli_main(["predict", str(zipped), *args]) == 0
        assert cli_main(["predict", *(str(study["nifti"][s]) for s in ("t1n", "t2f", "t1c")), *args]) == 0
    (out / "said.txt").write_text(said.getvalue())
    return out


def test_cli_dicom_gives_the_mask_of_the_nifti_path(cli_outputs):
    from_dicom = nib.load(cli_outputs / "dicom_mask.nii.gz")  # the zip's name holds the patient's name: not used
    from_nifti = nib.load(cli_outputs / "case_mask.nii.gz")
    a, b = np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj)
    assert a.sum() > 0, "a non-empty mask, so the comparison says something"
    assert np.array_equal(a, b), "identical voxels"
    assert np.allclose(from_dicom.affine, from_nifti.affine, atol=1e-4)


def test_seg_reads_back_references_the_source_and_maps_frames_to_slices(cli_outputs, study):
    import highdicom as hd

    seg_path = cli_outputs / "dicom_seg.dcm"
    ds = pydicom.dcmread(seg_path)
    assert ds.Modality == "SEG" and ds.SOPClassUID == pydicom.uid.SegmentationStorage and ds.SegmentationType == "BINARY"
    assert str(ds.PatientName) == PLANTED_NAME and ds.PatientID == PLANTED_ID, "the SEG carries the study's identifiers"
    assert ds.StudyInstanceUID == study["ids"]["study"] and ds.FrameOfReferenceUID == study["ids"]["frame"]
    segment = ds.SegmentSequence[0]
    assert segment.SegmentLabel == "lesion" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"  # SCT Lesion
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"  # morphologically abnormal structure
    algo = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "brainseg attention_unet" and len(algo.AlgorithmVersion) == 12 and "brainseg=" in algo.AlgorithmParameters

    sources = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in (study["dicom"] / "AX_FLAIR").iterdir()}
    referenced = {r.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in r.ReferencedInstanceSequence} for r in ds.ReferencedSeriesSequence}
    flair_series = next(iter(sources.values())).SeriesInstanceUID
    assert referenced[flair_series] == set(sources) and len(referenced) == 3, "every FLAIR image, and the T1 series used"

    # Independently of brainseg's slice order: each source image's position, through the NIfTI
    # mask's affine, names the NIfTI slice whose display (rot90) must equal the SEG frame on it.
    nifti = nib.load(cli_outputs / "case_mask.nii.gz")
    mask, inv = np.asarray(nifti.dataobj).astype(bool), np.linalg.inv(nifti.affine)
    seg = hd.seg.segread(seg_path)
    assert seg.number_of_frames == len(sources) == mask.shape[2]
    for uid, src in sources.items():
        k = (inv @ np.append(LPS @ np.asarray(src.ImagePositionPatient, float), 1.0))[2]
        assert abs(k - round(k)) < 1e-3
        frame = seg.get_pixels_by_source_instance(source_sop_instance_uids=[uid], segment_numbers=[1])[0, :, :, 0]
        assert np.array_equal(frame.astype(bool), np.rot90(mask[:, :, int(round(k))])), f"frame on slice {k:.0f}"
    assert mask.any()


def test_privacy_nothing_but_the_seg_names_the_patient(cli_outputs):
    """Name (and its parts), id and birth date: in the SEG (to be linkable), nowhere else: file names,
    the lesion JSON, the NIfTI mask, the overlay, what the CLI printed and logged."""
    assert "channels read from" in (cli_outputs / "said.txt").read_text(), "the CLI's report was captured"
    for path in cli_outputs.iterdir():
        data = path.read_bytes()
        if path.name == "dicom_seg.dcm":
            assert all(p.encode() in data for p in (PLANTED_NAME, PLANTED_ID, PLANTED_BIRTH))
            continue
        for planted in ("Zzyzx", "Quentin", PLANTED_ID, PLANTED_BIRTH, "1947-11-03"):
            assert planted.encode().lower() not in data.lower() and planted.lower() not in path.name.lower(), f"{planted} in {path.name}"


def test_real_world_quirks_are_read(tmp_path):
    """Files without the 128-byte preamble and file meta (old exports), ImageOrientationPatient that
    differs in the 7th decimal between slices, a RescaleSlope that changes per slice (as Philips
    writes), and a series with no description (TR / TE say it is a T1)."""
    data = np.random.default_rng(1).integers(0, 1000, (32, 32, 8)).astype(np.int16)
    files = write_series(tmp_path / "s", data, np.diag([1.0, 1.0, 2.0, 1.0]), study_ids(), description="AX FLAIR", slope=1.0, intercept=0.0)
    raw = []
    for i, p in enumerate(files):
        ds = pydicom.dcmread(p)
        ds.ImageOrientationPatient = [v + (1e-7 if i % 2 else 0.0) for v in ds.ImageOrientationPatient]
        if i % 3 == 0:  # same values, stored at twice the numbers with half the slope
            ds.PixelData = (ds.pixel_array.astype(np.uint16) * 2).tobytes()
            ds.RescaleSlope = 0.5
        buf = io.BytesIO()
        if i % 2:
            del ds.file_meta
            ds.preamble = None
            pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)  # no preamble, no file meta
        else:
            ds.save_as(buf)
        raw.append((p.name, buf.getvalue()))
    assert raw[1][1][128:132] != b"DICM" and raw[1][1][:2] == b"\x08\x00"
    vol = dicom.load_dicom(raw, "old.zip")
    ref = dicom.load_dicom(items(tmp_path / "s"), "new.zip")
    assert np.array_equal(vol.slices, ref.slices)
    assert np.array_equal(vol.to_stored(vol.slices)[:, :, :, 1], np.stack([np.rot90(data[:, :, k]) for k in range(8)]).astype(np.float32))
    ds = pydicom.Dataset()
    ds.EchoTime, ds.RepetitionTime = 9, 450
    assert dicom.sequence_of(ds) == ("t1", "TR 450 ms, TE 9 ms")


def test_several_echoes_in_one_series_are_refused(tmp_path):
    files = small_series(tmp_path / "a")
    twice = items(tmp_path / "a")
    for p in files[:3]:  # a second echo at the same positions, in the same series
        ds = pydicom.dcmread(p)
        ds.SOPInstanceUID, ds.EchoNumbers = pydicom.uid.generate_uid(), 2
        buf = io.BytesIO()
        ds.save_as(buf)
        twice.append((p.name + "e2", buf.getvalue()))
    with pytest.raises(dicom.DicomError, match="several echoes"):
        dicom.load_dicom(twice, "upload.zip")


def test_a_compressed_series_with_a_decoder_reads_the_same(tmp_path):
    """RLE Lossless (decoded by pydicom itself; JPEG-LS and JPEG 2000 have decoders here too) gives the same volume."""
    small_series(tmp_path / "s")
    plain = items(tmp_path / "s")
    packed = []
    for name, raw in plain:
        ds = pydicom.dcmread(io.BytesIO(raw))
        ds.compress(pydicom.uid.RLELossless)
        buf = io.BytesIO()
        ds.save_as(buf)
        packed.append((name, buf.getvalue()))
    assert pydicom.dcmread(io.BytesIO(packed[0][1])).file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert np.array_equal(dicom.load_dicom(packed, "rle.zip").slices, dicom.load_dicom(plain, "plain.zip").slices)


# ---------------------------------------------------------------- DICOM as hospitals export it


@pytest.fixture(scope="module")
def plain_series(tmp_path_factory) -> list:
    """The files of a small series (32 x 32 x 8, values 0..999 stored with slope 0.5, intercept -1000)."""
    return small_series(tmp_path_factory.mktemp("plain") / "s")


@pytest.mark.parametrize("case", list(ANONYMISED_HEADERS))
def test_seg_is_written_from_anonymised_headers(plain_series, case):
    """Type 2 attributes missing, empty or non-standard: the SEG carries the values the standard allows
    (empty, or PatientSex mapped to M / F / O), keeps the identifiers that exist, and the caller's headers are not changed."""
    import highdicom as hd

    edit, expected = ANONYMISED_HEADERS[case]
    source = pydicom.dcmread(plain_series[0])
    vol = dicom.load_dicom(edited(plain_series, edit), "anon.zip")
    refs = vol.dicom.references
    before = [ds.to_json_dict() for ds in refs]
    mask = np.zeros((len(refs), 32, 32), bool)
    mask[3, 10:20, 12:18] = True
    raw = dicom.seg_bytes(vol.dicom, mask, "unetpp", "abc123")
    seg = pydicom.dcmread(io.BytesIO(raw))
    assert [ds.to_json_dict() for ds in refs] == before, "the caller's headers are untouched"
    for key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "StudyDate", "StudyTime", "StudyInstanceUID"):
        want = expected.get(key, str(source.get(key, "")))
        assert str(seg.get(key, "") or "") == want, key
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert float(measures.SliceThickness) == 2.0, "the source's thickness, else the spacing between its slices"
    back = hd.seg.segread(io.BytesIO(raw))
    assert back.number_of_frames == len(refs)
    assert np.array_equal(back.get_pixels_by_source_instance([refs[3].SOPInstanceUID], segment_numbers=[1])[0, :, :, 0].astype(bool), mask[3])


def test_a_seg_that_cannot_be_written_is_a_plain_warning(plain_series):
    """No FrameOfReferenceUID (Type 1, which the SEG must share): the volume is read, the SEG is refused with a plain sentence."""
    vol = dicom.load_dicom(edited(plain_series, NO_FRAME_OF_REFERENCE), "nofor.zip")
    mask = np.zeros(vol.slices.shape[:3], bool)
    with pytest.raises(dicom.SegError, match="FrameOfReferenceUID") as info:
        dicom.seg_bytes(vol.dicom, mask, "unetpp", "abc")
    assert "\n" not in str(info.value)
    data, warning = dicom.write_seg(vol.dicom, mask, "unetpp", "abc")
    assert data is None and warning.startswith("the DICOM SEG could not be written") and "FrameOfReferenceUID" in warning
    data, warning = dicom.write_seg(vol.dicom, mask[:2], "unetpp", "abc")  # any other failure: the same kind of sentence, no library text
    assert data is None and warning.startswith("the DICOM SEG could not be written") and "Error" not in warning


@pytest.mark.parametrize("value, signed", [(65535, False), (-32768, True)], ids=["uint16 65535", "int16 -32768"])
def test_pixel_padding_is_background(plain_series, value, signed):
    """Padding pixels read as 0 (background), exactly as if the scanner had stored 0 there, and the volume window ignores them."""
    from brainseg.inference.backends import window_for_volume

    padded = dicom.load_dicom(edited(plain_series, padding(value, signed)), "padded.zip")
    zero = dicom.load_dicom(edited(plain_series, padding(None, signed)), "zero.zip")
    assert np.array_equal(padded.slices, zero.slices)
    assert (padded.to_stored(padded.slices)[:, PAD_ROWS] == 0).all()
    lo, hi = window_for_volume(padded.slices)
    assert np.all(np.asarray(hi) < 1000), "the padding value did not reach the intensity window"


def test_pixel_padding_range_and_negative_values(tmp_path):
    """PixelPaddingRangeLimit pads a range; real values below 0 are shifted up (and the header's window with them) so
    that background, 0, is the lowest value."""
    data = np.random.default_rng(2).integers(0, 1000, (32, 32, 8)).astype(np.int16) - 500
    files = write_series(tmp_path / "s", data, np.diag([1.0, 1.0, 2.0, 1.0]), study_ids())  # slope 0.5, intercept -1000, window 400 / 800

    def ranged(ds, i):
        stored = ds.pixel_array.astype(np.int64)
        stored[PAD_ROWS] = 60000 + (np.arange(32) % 5000)
        ds.PixelData = stored.astype(np.uint16).tobytes()
        ds.add_new("PixelPaddingValue", "US", 65000)  # the limit may lie on either side
        ds.add_new("PixelPaddingRangeLimit", "US", 60000)

    vol = dicom.load_dicom(edited(files, ranged), "ranged.zip")
    stored = vol.to_stored(vol.slices)[..., 1]
    real = np.stack([np.rot90(data[:, :, k]) for k in range(8)]).astype(np.float32)
    keep = np.ones(real.shape, bool)
    keep[:, PAD_ROWS] = False
    shift = -real[keep].min()
    assert shift > 0 and (stored[:, PAD_ROWS] == 0).all()
    assert np.array_equal(stored[keep], real[keep] + shift) and stored.min() == 0
    assert vol.dicom.window_presets[1][0]["center"] == 400.0 + shift


def test_monochrome1_is_inverted_with_a_note(plain_series):
    vol = dicom.load_dicom(edited(plain_series, monochrome1(plain_series)), "mono1.zip")
    ref = dicom.load_dicom(edited(plain_series), "mono2.zip")
    assert np.array_equal(vol.slices, ref.slices), "max + min - value gives back the MONOCHROME2 values"
    assert any("MONOCHROME1" in n and "inverted" in n for n in vol.notes)
    assert vol.dicom.window_presets == ref.dicom.window_presets


def test_files_without_preamble_or_dcm_name_are_recognised_by_content(plain_series, tmp_path):
    from brainseg.inference.predict import expand_inputs

    implicit = bare(plain_series, tmp_path / "implicit")
    explicit = bare(plain_series, tmp_path / "explicit", implicit=False)
    for f in (implicit[0], explicit[0]):
        head = f.read_bytes()[:256]
        assert head[128:132] != b"DICM" and dicom.looks_like_dicom(head, f.name), f
    for junk in (b"\x89PNG\r\n\x1a\n" + b"\0" * 200, b"just text " * 30, b"\0" * 256, b"\x08\x00" + b"\xff" * 254, b"II*\x00" + b"\0" * 252):
        assert not dicom.looks_like_dicom(junk, "IM0001")
    assert dicom.is_dicom_input(tmp_path / "implicit") and dicom.is_dicom_input(tmp_path / "explicit")
    assert expand_inputs([str(tmp_path / "implicit")]) == [[tmp_path / "implicit"]]
    vol = dicom.load_dicom_path(tmp_path / "implicit")
    assert np.array_equal(vol.slices, dicom.load_dicom(edited(plain_series), "x").slices)
