"""Write real DICOM MR series (pydicom) from a NIfTI-style volume, for the DICOM tests.

The geometry is written by hand here, independently of ``brainseg.io.dicom`` (which uses highdicom),
so a test compares two separate derivations. A NIfTI array ``data[i, j, k]`` with the RAS affine
``A`` becomes slices ``P_k = rot90(data[:, :, k])`` (rows from the highest j down, columns = i),
which is how brainseg displays a NIfTI slice; pixel (row r, column c) of slice k lies at
``A @ (c, J - 1 - r, k, 1)``. DICOM positions are LPS: x and y of RAS negated.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from brainseg.io.dicom import TYPE2_PATIENT_STUDY  # the attributes the SEG writer fills when missing

PLANTED_NAME = "Zzyzx^Quentin"  # a patient name no code or message would write by chance
PLANTED_ID = "PID-73519"
PLANTED_BIRTH = "19471103"
LPS = np.diag([-1.0, -1.0, 1.0])


def rotation(degrees_x: float, degrees_z: float) -> np.ndarray:
    """(4, 4) rotation about x, then z: an oblique acquisition."""
    ax, az = np.deg2rad(degrees_x), np.deg2rad(degrees_z)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    out = np.eye(4)
    out[:3, :3] = rz @ rx
    return out


def study_ids() -> dict:
    return {"study": generate_uid(), "frame": generate_uid()}


def _ds(study: dict, series_uid: str, number: int, description: str, modality: str) -> Dataset:
    ds = Dataset()
    ds.PatientName = PLANTED_NAME
    ds.PatientID = PLANTED_ID
    ds.PatientBirthDate = PLANTED_BIRTH
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study["study"]
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20240102", "101500", "1"
    ds.AccessionNumber, ds.ReferringPhysicianName = "ACC1", ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, number, description
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = study["frame"], ""
    ds.Modality, ds.Manufacturer = modality, "test"
    ds.SOPClassUID = MRImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "SE", "NONE", "", "2D"
    ds.EchoTime, ds.RepetitionTime, ds.EchoTrainLength, ds.MagneticFieldStrength = 10, 500, 1, 3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def write_series(
    folder: Path,
    data: np.ndarray,
    affine: np.ndarray,
    study: dict,
    *,
    number: int = 1,
    description: str = "AX FLAIR",
    modality: str = "MR",
    slope: float = 0.5,
    intercept: float = -1000.0,
    window: tuple[float, float] | None = (400.0, 800.0),
    shuffle: bool = True,
) -> list[Path]:
    """One file per slice of ``data`` (X, Y, Z), stored as uint16 with ``value = stored * slope + intercept``.

    ``slope`` and ``intercept`` are exact in binary floating point, so the values read back equal
    ``data``. Files are written in a shuffled order (names say nothing of the position).
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    a = np.asarray(affine, np.float64)
    row_dir = LPS @ a[:3, 0]  # along a row: column index c grows with i
    col_dir = -(LPS @ a[:3, 1])  # down a column: row index r grows as j falls
    spacing = [float(np.linalg.norm(a[:3, 1])), float(np.linalg.norm(a[:3, 0]))]  # (between rows, between columns)
    iop = [float(v) for v in np.concatenate([row_dir / spacing[1], col_dir / spacing[0]])]
    n_j, n_z = data.shape[1], data.shape[2]
    order = np.random.default_rng(number).permutation(n_z) if shuffle else np.arange(n_z)
    paths = []
    for file_no, k in enumerate(order):
        stored = (np.rot90(data[:, :, k]).astype(np.float64) - intercept) / slope
        assert stored.min() >= 0 and stored.max() < 65536 and np.all(stored == np.round(stored)), "values not exact in uint16"
        ds = _ds(study, series_uid, number, description, modality)
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(k) + 1
        ds.ImagePositionPatient = [round(float(v), 6) for v in LPS @ (a @ [0.0, n_j - 1.0, float(k), 1.0])[:3]]
        ds.ImageOrientationPatient = [round(v, 8) for v in iop]
        ds.PixelSpacing = [round(v, 6) for v in spacing]
        ds.SliceThickness = ds.SpacingBetweenSlices = round(float(np.linalg.norm(a[:3, 2])), 6)
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        ds.Rows, ds.Columns = stored.shape
        ds.PixelData = np.ascontiguousarray(stored.astype(np.uint16)).tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = folder / f"IM{file_no:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def zip_bytes(folders: list[Path], names: dict[str, bytes] | None = None) -> bytes:
    """A .zip of every file under ``folders`` (paths kept below each folder's parent), plus ``names``."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for folder in folders:
            for f in sorted(Path(folder).rglob("*")):
                if f.is_file():
                    zf.write(f, f.relative_to(Path(folder).parent).as_posix())
        for name, data in (names or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def small_series(folder: Path, shape: tuple[int, int, int] = (32, 32, 8), ids: dict | None = None, **kw) -> list[Path]:
    """A small synthetic MR series (values 0..999, seed 0; voxels 1 x 1 x 2 mm) in ``folder``; its files."""
    data = np.random.default_rng(0).integers(0, 1000, shape).astype(np.int16)
    return write_series(folder, data, np.diag([1.0, 1.0, 2.0, 1.0]), ids or study_ids(), **kw)


def edited(files: list[Path], edit=None) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of each file, after ``edit(dataset, file_index)`` where given."""
    out = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        if edit is not None:
            edit(ds, i)
        buf = io.BytesIO()
        ds.save_as(buf)
        out.append((path.name, buf.getvalue()))
    return out


def _no_pixel_data(ds: Dataset, i: int) -> None:
    del ds.PixelData


def _one_slice_tilted(ds: Dataset, i: int) -> None:
    if i == 3:
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0.8, 0.6]


def _ct(ds: Dataset, i: int) -> None:
    ds.Modality = "CT"


def _jpeg_lossless(ds: Dataset, i: int) -> None:
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGLossless
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8" + b"\0" * 64])


def _one_slice_truncated(ds: Dataset, i: int) -> None:
    if i == 5:
        ds.PixelData = ds.PixelData[:100]


# Ways a series of at least 6 files can be broken, as ``edited`` edits: the library's and the API's tests
# give each its expected message.
BROKEN_SERIES = {
    "no pixel data": _no_pixel_data,
    "truncated pixel data": _one_slice_truncated,
    "inconsistent geometry": _one_slice_tilted,
    "not MR": _ct,
    "compressed without a decoder": _jpeg_lossless,
}


def _drop(*keywords: str):
    def edit(ds: Dataset, i: int) -> None:
        for k in keywords:
            if k in ds:
                delattr(ds, k)

    return edit


def _set(**values):
    def edit(ds: Dataset, i: int) -> None:
        for k, v in values.items():
            setattr(ds, k, v)

    return edit


# Headers as anonymisers, PACS exports and old scanners leave them, as ``edited`` edits: each must still
# give a DICOM SEG. Values: (edit, {attribute: what the SEG must carry}); attributes not named keep the source's value.
ANONYMISED_HEADERS = {
    "no PatientSex": (_drop("PatientSex"), {"PatientSex": ""}),
    "PatientSex Female": (_set(PatientSex="Female"), {"PatientSex": "F"}),
    "PatientSex male, lower case": (_set(PatientSex="male"), {"PatientSex": "M"}),
    "PatientSex unknown word": (_set(PatientSex="unknown"), {"PatientSex": ""}),
    "no PatientID": (_drop("PatientID"), {"PatientID": ""}),
    "no PatientBirthDate": (_drop("PatientBirthDate"), {"PatientBirthDate": ""}),
    "no StudyID, AccessionNumber, ReferringPhysicianName": (
        _drop("StudyID", "AccessionNumber", "ReferringPhysicianName"),
        {"StudyID": "", "AccessionNumber": ""},
    ),
    "no StudyDate, StudyTime": (_drop("StudyDate", "StudyTime"), {"StudyDate": "", "StudyTime": ""}),
    "dates and times written with separators": (_set(StudyDate="2024-01-02", StudyTime="10:15:00"), {"StudyDate": "20240102", "StudyTime": "101500"}),
    "no SliceThickness": (_drop("SliceThickness"), {}),
    "empty SliceThickness": (_set(SliceThickness=""), {}),
    "every Type 2 patient and study attribute gone": (
        _drop(*TYPE2_PATIENT_STUDY, "SliceThickness"),
        {k: "" for k in TYPE2_PATIENT_STUDY if k != "ReferringPhysicianName"},
    ),
}

# A header a DICOM SEG cannot be written from (its Type 1 FrameOfReferenceUID is gone): the mask must be kept anyway.
NO_FRAME_OF_REFERENCE = _drop("FrameOfReferenceUID")

PAD_ROWS = slice(0, 6)  # the band of every slice that ``padding`` fills


def padding(value: int | None, signed: bool = False):
    """An ``edited`` edit: rows PAD_ROWS of every slice stored as ``value``, declared as PixelPaddingValue
    (None: they hold the stored value of 0 instead, which is what padding must read as, and nothing is declared).
    ``signed``: pixels stored as int16 (PixelRepresentation 1)."""

    def edit(ds: Dataset, i: int) -> None:
        stored = ds.pixel_array.astype(np.int64)
        stored[PAD_ROWS] = round(-float(ds.RescaleIntercept) / float(ds.RescaleSlope)) if value is None else value
        if signed:
            ds.PixelRepresentation = 1
        ds.PixelData = np.ascontiguousarray(stored.astype(np.int16 if signed else np.uint16)).tobytes()
        if value is not None:
            ds.add_new("PixelPaddingValue", "SS" if signed else "US", value)

    return edit


def monochrome1(files: list[Path]):
    """An ``edited`` edit: the series stored inverted (max + min - value over the series) and said to be MONOCHROME1."""
    stored = [pydicom.dcmread(p).pixel_array for p in files]
    hi, lo = int(max(a.max() for a in stored)), int(min(a.min() for a in stored))

    def edit(ds: Dataset, i: int) -> None:
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.PixelData = np.ascontiguousarray((hi + lo - ds.pixel_array.astype(np.int64)).astype(np.uint16)).tobytes()
        if "WindowCenter" in ds:
            ds.WindowCenter = float(ds.RescaleSlope) * (hi + lo) + 2 * float(ds.RescaleIntercept) - float(ds.WindowCenter)

    return edit


def bare(files: list[Path], folder: Path, implicit: bool = True) -> list[Path]:
    """The files re-written as old exports do: no 128-byte preamble, no file meta, no .dcm name (``IM0000``, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, p in enumerate(files):
        ds = pydicom.dcmread(p)
        del ds.file_meta
        ds.preamble = None
        out.append(folder / f"IM{i:04d}")
        pydicom.dcmwrite(out[-1], ds, implicit_vr=implicit, little_endian=True)
    return out


BRATS_SERIES = (("t2f", 1, "AX FLAIR"), ("t1n", 2, "AX T1 PRE"), ("t1c", 3, "AX T1 POST GD"))
BRATS_SLICES = (50, 90)  # slices of the example study kept (lesions are there)


def write_brats_study(root: Path, brats_dir: Path) -> dict:
    """The BraTS example (t2f, t1n, t1c), cut to 40 slices and tilted (12 degrees about x, 8 about z),
    written as NIfTI (``case-<seq>.nii.gz``, the tilted affine) and as three DICOM series under ``study/``.

    Returns {"nifti": {seq: path}, "dicom": folder, "ids": study uids, "affine": the tilted affine}.
    """
    import nibabel as nib

    z0, z1 = BRATS_SLICES
    ids = study_ids()
    out = {"nifti": {}, "dicom": root / "study", "ids": ids}
    for seq, number, desc in BRATS_SERIES:
        img = nib.load(brats_dir / f"BraTS-MET-00110-000-{seq}.nii.gz")
        shift = np.eye(4)
        shift[2, 3] = z0
        affine = rotation(12, 8) @ img.affine @ shift
        data = np.asarray(img.dataobj)[:, :, z0:z1]
        out["nifti"][seq] = root / f"case-{seq}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), out["nifti"][seq])
        out["affine"] = affine
        write_series(out["dicom"] / desc.replace(" ", "_"), data, affine, ids, number=number, description=desc)
    return out
