"""DICOM MR series in, DICOM SEG out (pydicom + highdicom).

**In**: a folder or ``.zip`` of one MR series, or of several series of one study. Files are
recognised by content (``looks_like_dicom``: the Part 10 preamble, or a data set from byte 0 as
old exports write ``IM0000`` without preamble or suffix), parsed with pydicom and grouped by series;
each series is checked (MR, pixel data, a decoder for its transfer syntax, one orientation and
size) and stacked with highdicom: ``get_series_volume_positions`` orders the slices along the
normal of ImageOrientationPatient and refuses gaps, duplicates and tilted stacks; ``VolumeGeometry``
gives the LPS affine; pydicom's ``apply_modality_lut`` applies RescaleSlope / RescaleIntercept (or a
modality LUT).

**Values** (``to_monochrome2_background``), after the modality LUT and before any windowing: a
MONOCHROME1 series is inverted (``max + min - value`` over its real pixels, noted in the answer);
pixels stored as PixelPaddingValue (or in the range to PixelPaddingRangeLimit) are background and
read as exactly 0; when a padded series has real values below 0, they are raised so that the lowest
is 0, so background is always the lowest value and the intensity window (percentiles of the non-zero
voxels) sees tissue only. The header's window presets follow the values. The stack then runs towards the
patient direction it is closest to (R, A or S), as NIfTI files usually do, and each slice stays
as the scanner stored it (row 0 at the top), which is how brainseg displays a slice. The
NIfTI-style affine (RAS, the convention of nibabel and ``volumes``) describes those voxels as
x = column, y = row counted from the bottom, z = slice: ``rot90(data[:, :, z])`` is the stored
image, so a NIfTI of the same study and this series give the same ``volumes.Volume``.

Several series are mapped to the models' channels (pre-contrast T1, FLAIR, post-contrast T1)
from SeriesDescription / ProtocolName / SequenceName, else from TR / TE / TI. Two candidates
for one channel, or no FLAIR among several series, is refused with a message naming the
series; a missing T1 is filled with FLAIR (as for a BraTS set, see ``channels``). Series of the
same frame of reference on another grid are resampled onto the FLAIR grid (linear).

**Out**: ``seg_bytes`` writes a binary DICOM SEG (highdicom): segment "lesion" (SCT 52988006,
a morphologically abnormal structure, in the brain), the algorithm (brainseg, model name and
version), referencing the source series image by image. It works on copies of the source headers
made fit for it (``seg_headers``): Type 2 patient / study attributes that are missing become empty,
PatientSex is mapped to M / F / O or empty, dates and times written with separators are rewritten
(else emptied), a missing SliceThickness is the spacing between the slices; identifiers that exist
are kept. What it still cannot write (no FrameOfReferenceUID, ...) is ``SegError`` with a plain
sentence; ``write_seg`` turns any failure into a warning, so a mask is never lost with its SEG.

**Privacy**: patient name, id and birth date reach nothing but the SEG. Every text this module
hands back (names, series descriptions, messages) goes through ``Redactor``, and pydicom's
warnings (which may quote values) are silenced while reading.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import __version__
from .datasets import DataError
from .volumes import Volume, canonicalize

log = logging.getLogger(__name__)
logging.getLogger("highdicom").setLevel(logging.WARNING)  # it logs every module it copies into a SEG at INFO

MAX_MEMBERS = 4096  # files in one zip or folder
MAX_RATIO = 200  # a zip that inflates more than this (and past 16 MiB) is refused as a possible bomb
MIN_SIDE = 16  # pixels per side, as for every other upload
ORIENTATION_TOL = 1e-4  # scanners write ImageOrientationPatient with rounding that differs per slice
SPACING_RTOL = 0.02  # slice positions may differ from a regular stack by this share of the spacing
GRID_TOL_MM = 0.01  # two series are on the same grid when their affines agree this closely
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
DICOMDIR = "1.2.840.10008.1.3.10"
SEQUENCE_TAGS = {"t1": "t1n", "flair": "t2f", "t1c": "t1c", "t2": "t2w"}  # -> volumes.BRATS_CHANNELS vocabulary
READ_AS = {"flair": "FLAIR", "t1": "pre-contrast T1", "t1c": "post-contrast T1", "t2": "T2 (not used by the models)"}


class DicomError(DataError):
    """A DICOM input the models cannot use; ``status`` is the HTTP status an upload gets."""

    status = 422


class DicomTooLarge(DicomError):
    status = 413


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------- identifiers


def _number(value, default: float = 0.0) -> float:
    """A numeric DICOM value (IS / DS / US, maybe multi-valued: the first), else ``default``."""
    try:
        v = float(_values(value)[0])
    except (IndexError, TypeError, ValueError, OverflowError):
        return default
    return v if np.isfinite(v) else default


def _values(value) -> list[str]:
    """A DICOM value (one, or multi-valued) as a list of strings; [] for none."""
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        return [str(value)]
    return [str(v) for v in value]


class Redactor:
    """Removes the patient's name (and its parts), ids and birth date from texts we hand back."""

    def __init__(self, datasets=()):
        found: set[str] = set()
        for ds in datasets:
            pn = ds.get("PatientName")
            if pn:
                found.add(str(pn))
                found.update(str(p) for p in (pn.family_name, pn.given_name, pn.middle_name) if p and len(str(p)) >= 2)
                found.update(p for p in re.split(r"[\^=, ]+", str(pn)) if len(p) >= 2)
            for key in ("PatientID", "OtherPatientIDs"):
                found.update(v for v in _values(ds.get(key)) if len(v) >= 3)
            birth = str(ds.get("PatientBirthDate") or "")
            if len(birth) == 8 and birth.isdigit():
                found.update({birth, f"{birth[:4]}-{birth[4:6]}-{birth[6:]}", f"{birth[6:]}.{birth[4:6]}.{birth[:4]}"})
        self.values = sorted(found, key=len, reverse=True)
        self._pattern = re.compile("|".join(re.escape(v) for v in self.values), re.IGNORECASE) if self.values else None

    def found_in(self, text: str) -> bool:
        return bool(self._pattern and self._pattern.search(str(text)))

    def clean(self, text: str, replacement: str = "[removed]") -> str:
        return self._pattern.sub(replacement, str(text)) if self._pattern else str(text)

    def file_name(self, name: str, fallback: str = "dicom") -> str:
        """``name``, or ``fallback`` with its suffix when the name holds an identifier."""
        if not self.found_in(name):
            return name
        suffix = Path(name).suffix.lower() if Path(name).suffix.lower() in (".zip", ".dcm") else ""
        return fallback + suffix


# ---------------------------------------------------------------- files


HEAD_BYTES = 256  # what ``looks_like_dicom`` reads of a file (132 suffice for the preamble)
_VRS = frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split())
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())  # explicit VRs with a 4-byte length


def looks_like_dicom(head: bytes, name: str = "") -> bool:
    """A DICOM file from its first bytes (``HEAD_BYTES``; 132 will do): the Part 10 preamble ("DICM" at
    byte 128), a data set that starts at byte 0 as old exports write it (``bare_dataset_start``), or a
    .dcm / .dicom / .ima name."""
    return head[128:132] == b"DICM" or bare_dataset_start(head) or name.lower().endswith((".dcm", ".dicom", ".ima"))


def bare_dataset_start(head: bytes) -> bool:
    """A DICOM data set without preamble or file meta (``IM0000`` from an old scanner or PACS export):
    little-endian elements, implicit or explicit VR, from byte 0, the first of group 0002 or 0008.

    The elements that fit in ``head`` are walked: tags must increase, an explicit VR must be a DICOM
    VR, lengths must fit a header (below 16 MiB); at least two elements are checked (the second's
    value may run past ``head``). A sequence of undefined length after the first ends the walk.
    """
    import struct

    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    explicit = head[4:6] in _VRS
    pos, last, seen = 0, -1, 0
    while pos + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, pos)
        tag = group << 16 | element
        if tag <= last or group < 2 or group > 0x7FE0 or group in (3, 5, 7):
            return False
        if explicit:
            vr = head[pos + 4 : pos + 6]
            if vr not in _VRS:
                return False
            if vr in _LONG_VRS:
                if pos + 12 > len(head):
                    break
                length, pos = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
            else:
                length, pos = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        else:
            length, pos = struct.unpack_from("<I", head, pos + 4)[0], pos + 8
        if length == 0xFFFFFFFF:  # a sequence of undefined length: its items are not walked
            return seen >= 1
        if length >= 1 << 24:
            return False
        last, seen, pos = tag, seen + 1, pos + length
        if pos > len(head):
            return seen >= 2  # a value longer than what was read, after one that fitted
    return seen >= 2


def is_zip(head: bytes, name: str = "") -> bool:
    return head[:4] == b"PK\x03\x04" or name.lower().endswith(".zip")


def unzip(data: bytes, label: str, max_bytes: int, max_members: int = MAX_MEMBERS) -> list[tuple[str, bytes]]:
    """Members of a zip as (name, bytes), bounded before anything is inflated.

    The sizes in the zip's directory are checked against ``max_bytes`` (413) and the
    compression ratio against ``MAX_RATIO`` (413, a zip bomb); a member that inflates beyond
    its declared size fails its CRC (zipfile stops at the declared size). Folders, macOS
    resource forks and nested zips are skipped.
    """
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/") and not i.filename.lower().endswith(".zip")]
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError):
        raise DicomError(label, "not a readable .zip archive (corrupt or truncated)") from None
    if len(infos) > max_members:
        raise DicomTooLarge(label, f"the zip holds {len(infos)} files, above the limit of {max_members}")
    total, packed = sum(i.file_size for i in infos), sum(i.compress_size for i in infos)
    if total > max_bytes:
        raise DicomTooLarge(label, f"the zip inflates to {_mib(total)}, above the limit of {_mib(max_bytes)} (BRAINSEG_MAX_DECODED_MB)")
    if total > 16 << 20 and total > MAX_RATIO * max(packed, 1):
        raise DicomTooLarge(label, f"the zip inflates {total / max(packed, 1):.0f} times (above {MAX_RATIO}:1); refused as a possible zip bomb")
    out = []
    try:
        for info in infos:
            if info.flag_bits & 0x1:
                raise DicomError(label, "the zip is encrypted; send it without a password")
            with zf.open(info) as member:
                raw = member.read(info.file_size + 1)
            if len(raw) > info.file_size:
                raise DicomTooLarge(label, "a zip member inflates beyond its declared size; refused as a possible zip bomb")
            out.append((info.filename, raw))
    except DicomError:
        raise
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError, RuntimeError) as exc:
        log.debug("zip member unreadable: %s", type(exc).__name__)
        raise DicomError(label, "the zip is corrupt (a member fails its checksum or uses an unsupported compression)") from None
    return out


def files_in(path: Path, max_members: int = MAX_MEMBERS) -> list[tuple[str, bytes]]:
    """Every file below a folder (any depth), or a zip's members, as (name, bytes); for the CLI."""
    path = Path(path)
    if path.is_file():
        return unzip(path.read_bytes(), str(path), max_bytes=1 << 40, max_members=max_members)
    files = sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))
    if len(files) > max_members:
        raise DicomTooLarge(path, f"the folder holds {len(files)} files, above the limit of {max_members}")
    return [(str(f.relative_to(path)), f.read_bytes()) for f in files]


def is_dicom_input(path: Path, probe: int = 16) -> bool:
    """A .zip, or a folder with DICOM files in it or below (its first ``probe`` files looked at, by
    content or name: ``looks_like_dicom``, so ``IM0000`` without preamble counts)."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".zip"
    if not path.is_dir():
        return False
    seen = 0
    for f in sorted(path.rglob("*")):
        if not f.is_file() or f.name.startswith("."):
            continue
        with open(f, "rb") as fh:
            if looks_like_dicom(fh.read(HEAD_BYTES), f.name):
                return True
        seen += 1
        if seen >= probe:
            return False
    return False


# ---------------------------------------------------------------- parsing and grouping


def _parse(raw: bytes):
    """A pydicom Dataset, or None for anything that is not DICOM (a README, a thumbnail)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        return pydicom.dcmread(io.BytesIO(raw))
    except InvalidDicomError:
        if not bare_dataset_start(raw[:HEAD_BYTES]):  # no preamble: old files start with group 0008
            return None
        try:
            return pydicom.dcmread(io.BytesIO(raw), force=True)
        except Exception:
            return None
    except Exception as exc:  # truncated or corrupt: counted, never echoed
        log.debug("a DICOM file is unreadable: %s", type(exc).__name__)
        return None


@dataclass
class Series:
    datasets: list  # pydicom Datasets, unsorted
    number: int | None
    description: str  # redacted
    modality: str
    sequence: str | None = None  # flair / t1 / t1c / t2 / "other" / None (not said)
    why: str = ""

    @property
    def label(self) -> str:
        num = f"series {self.number}" if self.number is not None else "a series"
        return f"{num} ({self.description})" if self.description else num


def read_series(items: list[tuple[str, bytes]], label: str) -> tuple[list[Series], Redactor, dict]:
    """Parse and group the image files by SeriesInstanceUID; (series, redactor, counts of what was skipped)."""
    datasets, skipped = [], {"not DICOM": 0, "not an image": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _, raw in items:
            ds = _parse(raw)
            if ds is None:
                skipped["not DICOM"] += 1
            elif "DirectoryRecordSequence" in ds or str(ds.get("SOPClassUID", "")) == DICOMDIR or ("Rows" not in ds and "PixelData" not in ds):
                skipped["not an image"] += 1
            else:
                datasets.append(ds)
    if not datasets:
        found = f"{len(items)} file(s), none a DICOM image" if items else "no files"
        raise DicomError(label, f"nothing usable: {found}; send a folder or .zip of DICOM MR image files")
    redactor = Redactor(datasets)
    groups: dict[str, list] = {}
    for ds in datasets:
        groups.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(ds)
    series = []
    for group in groups.values():
        first = group[0]
        number = _number(first.get("SeriesNumber"), -1.0)
        desc = redactor.clean(str(first.get("SeriesDescription") or first.get("ProtocolName") or "").strip())[:64]
        series.append(Series(group, int(number) if 0 <= number < 2**31 else None, desc, str(first.get("Modality", "") or "?").upper()))
    series.sort(key=lambda s: (s.number is None, s.number or 0))
    return series, redactor, skipped


# ---------------------------------------------------------------- which sequence a series is

_WORDS = {
    "other": r"\bdwi|diff|\badc\b|trace|\bdti\b|\bswi\b|swan|perf|\bdsc\b|\bdce\b|\basl\b|\btof\b|\bmra\b|spectro|"
    r"\bloc\b|locali[sz]er|scout|survey|3[-_ ]?plane|calibration",
    "flair": r"flair|\bt2f\b|dark[-_ ]?fluid|tirm|fluid[-_ ]?att",
    "t1": r"\bt1|mprage|spgr|bravo|\btfl|fl3d|vibe",
    "post": r"\bt1c|t1ce|t1gd|\bpost|\+\s*c\b|\bc\s*\+|\bgd\b|gado|\bgad\b|contrast|\bce\b|kontrast|\bkm\b|\+gd",
    "t2": r"\bt2",
}


def sequence_of(ds) -> tuple[str | None, str]:
    """(sequence, why) of one series from its first dataset: flair / t1 / t1c / t2 / "other" / None.

    Words first (SeriesDescription, ProtocolName, SequenceName); a T1-weighted FLAIR ("T1 FLAIR")
    is a T1. Without words: a contrast agent in the header makes a T1 post-contrast; TI >= 1500 ms
    with TE >= 60 ms is FLAIR; TE <= 30 ms with TR <= 1000 ms is T1; TE >= 60 ms with TR >= 2000 ms is T2.
    """
    text = " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName")).lower()
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    has = {k: bool(re.search(p, text)) for k, p in _WORDS.items()}
    agent = bool(str(ds.get("ContrastBolusAgent", "") or "").strip())
    if "LOCALIZER" in image_type or has["other"]:
        return "other", "a localizer, diffusion, perfusion or other non-structural series"
    if has["t1"] or (has["post"] and not has["flair"] and not has["t2"]):
        post = has["post"] or agent
        return ("t1c" if post else "t1"), "description" + (" and contrast agent" if agent and not has["post"] else "")
    if has["flair"]:
        return "flair", "description"
    if has["t2"]:
        return "t2", "description"
    te, tr, ti = (_number(ds.get(k)) for k in ("EchoTime", "RepetitionTime", "InversionTime"))
    if agent:
        return "t1c", "contrast agent in the header"
    if ti >= 1500 and te >= 60:
        return "flair", f"TI {ti:.0f} ms, TE {te:.0f} ms"
    if 0 < te <= 30 and 0 < tr <= 1000:
        return "t1", f"TR {tr:.0f} ms, TE {te:.0f} ms"
    if te >= 60 and tr >= 2000:
        return "t2", f"TR {tr:.0f} ms, TE {te:.0f} ms"
    return None, "neither the description nor TR / TE / TI says which sequence it is"


def choose_series(series: list[Series], label: str) -> tuple[dict[str, Series], list[str]]:
    """{"flair": ..., "t1": ..., "t1c": ...} (FLAIR always there) and notes on what is not used.

    One series: it is the FLAIR channel whatever it is (a T1 or T2 is reported by ``describe_volume``).
    """
    notes = []
    for s in series:
        s.sequence, s.why = sequence_of(s.datasets[0])
    if len(series) == 1:
        only = series[0]
        if only.sequence == "other":
            raise DicomError(label, f"{only.label} is {only.why}, not a sequence the models read (FLAIR, T1, T1 post-contrast)")
        return {"flair": only}, notes
    by_seq: dict[str, list[Series]] = {}
    for s in series:
        by_seq.setdefault(s.sequence or "unknown", []).append(s)
    for s in by_seq.pop("other", []) + by_seq.pop("t2", []) + by_seq.pop("unknown", []):
        what = {"other": "not a structural sequence", "t2": "T2 is not used by the models", None: "its sequence is not recognised"}[s.sequence]
        notes.append(f"{s.label} not used: {what}")
    chosen = {}
    for seq, group in by_seq.items():
        original = [s for s in group if "DERIVED" not in [str(v).upper() for v in (s.datasets[0].get("ImageType") or [])]]
        if len(group) > 1 and len(original) == 1:
            notes += [f"{s.label} not used: a derived copy beside {original[0].label}" for s in group if s is not original[0]]
            group = original
        if len(group) > 1:
            names = ", ".join(s.label for s in group)
            raise DicomError(label, f"ambiguous: {names} all look like {READ_AS[seq]}; send only one of them")
        chosen[seq] = group[0]
    if "flair" not in chosen:
        got = ", ".join(f"{s.label}: {READ_AS.get(s.sequence, 'not recognised')}" for s in series)
        raise DicomError(
            label, f"no FLAIR series among {len(series)} series ({got}); the models need FLAIR (name it FLAIR in SeriesDescription, or send it alone)"
        )
    return chosen, notes


# ---------------------------------------------------------------- checks and stacking


def check_series(s: Series, label: str, max_voxels: int | None = None) -> None:
    """Every problem of one series that can be seen before its pixels are decoded."""
    _check_kind(s, label)
    _check_size(s, label, max_voxels)
    for ds in s.datasets:
        _check_decodable(ds, s, label)


def _check_kind(s: Series, label: str) -> None:
    """MR, single-frame, grey, with pixel data and the geometry attributes on every slice."""
    if s.modality != "MR":
        raise DicomError(label, f"{s.label} is {s.modality}, not MR: brainseg segments brain MRI only")
    first = s.datasets[0]
    if _number(first.get("NumberOfFrames"), 1) > 1:
        raise DicomError(label, f"{s.label} is an enhanced (multi-frame) image, which is not read yet; export it as classic single-frame MR images")
    missing = sum("PixelData" not in ds for ds in s.datasets)
    if missing:
        raise DicomError(label, f"{s.label}: {missing} of {len(s.datasets)} files have no pixel data (a header-only export?)")
    for ds in s.datasets:
        for key in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows", "Columns"):
            if not ds.get(key):
                raise DicomError(label, f"{s.label}: a slice has no {key}, so its place in the patient is unknown")
    if _number(first.get("SamplesPerPixel"), 1) != 1:
        raise DicomError(label, f"{s.label} holds colour images (a screenshot or secondary capture), not MR data")


def _check_size(s: Series, label: str, max_voxels: int | None) -> None:
    """One image size for every slice, not too small, the whole series within ``max_voxels``."""
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in s.datasets}
    if len(sizes) > 1:
        raise DicomError(label, f"{s.label}: slices differ in size ({', '.join(f'{c}x{r}' for r, c in sorted(sizes))}); inconsistent geometry")
    rows, cols = sizes.pop()
    if min(rows, cols) < MIN_SIDE:
        raise DicomError(label, f"{s.label}: images are {cols}x{rows}; each side needs at least {MIN_SIDE} pixels")
    if max_voxels is not None and rows * cols * len(s.datasets) > max_voxels:
        raise DicomTooLarge(label, f"{s.label} is {cols}x{rows}x{len(s.datasets)} voxels, above the limit of {max_voxels} (BRAINSEG_MAX_VOXELS)")


def _check_decodable(ds, s: Series, label: str) -> None:
    """The slice's transfer syntax (from its file meta, or as pydicom read a file without one) has a decoder here."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.pixels import get_decoder
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts is None:  # no file meta (an old file without preamble): what pydicom found while reading
        implicit, little = ds.original_encoding
        ts = UID(ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        if meta is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    if ts.is_compressed:
        try:
            available = get_decoder(ts).is_available
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            raise DicomError(label, f"{s.label} is compressed as {ts.name}, and this server has no decoder for it; export it uncompressed")


def decoded_bytes(s: Series) -> int:
    first = s.datasets[0]
    return int(first.Rows) * int(first.Columns) * len(s.datasets) * max(int(_number(first.get("BitsAllocated"), 16)) // 8, 1)


@dataclass
class Stack:
    """One series as a volume: ``array`` (Z, rows, columns) float32, slices as stored, in ``datasets`` order."""

    array: np.ndarray
    geometry: object  # highdicom VolumeGeometry of (slice, row, column), LPS
    datasets: list
    presets: list[dict]  # window presets (center, width, name) from the header, in the values' units
    notes: list[str] = field(default_factory=list)  # what was done to the values (MONOCHROME1 inverted, padding, shift)

    @property
    def nifti_affine(self) -> np.ndarray:
        """RAS affine of the voxels (x = column, y = row from the bottom, z = slice)."""
        return self.geometry.flip_spatial(1).permute_spatial_axes([2, 1, 0]).get_affine("RAS")

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size (mm) along x (columns), y (rows), z (slices)."""
        dz, dy, dx = self.geometry.spacing
        return float(dx), float(dy), float(dz)


def window_presets(ds) -> list[dict]:
    """WindowCenter / WindowWidth pairs of a header (multi-valued allowed), with their explanations."""
    names = _values(ds.get("WindowCenterWidthExplanation"))
    out = []
    try:
        for i, (c, w) in enumerate(zip(map(float, _values(ds.get("WindowCenter"))), map(float, _values(ds.get("WindowWidth"))), strict=False)):
            if w > 0 and np.isfinite(c) and np.isfinite(w):
                out.append({"center": round(c, 3), "width": round(w, 3), "name": names[i][:32] if i < len(names) else f"header {i + 1}"})
    except (TypeError, ValueError):
        return []
    return out


def stack_series(s: Series, label: str) -> Stack:
    """Sort and check one checked series (highdicom: slice order, spacing, geometry), then decode it
    with the modality LUT / RescaleSlope and RescaleIntercept applied (pydicom), slice by slice."""
    import highdicom as hd
    from highdicom.spatial import get_series_volume_positions
    from pydicom.pixels import apply_modality_lut

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            spacing, positions = get_series_volume_positions(s.datasets, rtol=SPACING_RTOL, orientation_tol=ORIENTATION_TOL)
        except (ValueError, TypeError, AttributeError) as exc:
            log.debug("slice positions unusable: %s", type(exc).__name__)
            spacing, positions = None, None
        if spacing is None:
            raise DicomError(
                label,
                f"{s.label}: the {len(s.datasets)} slices are not one evenly spaced stack (mixed orientations, a missing or repeated slice, "
                "several echoes or a tilted stack); inconsistent geometry",
            )
        ordered = [s.datasets[positions.index(i)] for i in range(len(s.datasets))]
        first = ordered[0]
        photometric = _consistent_slices(ordered, s, label)
        geometry = hd.VolumeGeometry.from_attributes(
            image_position=first.ImagePositionPatient,
            image_orientation=first.ImageOrientationPatient,
            rows=int(first.Rows),
            columns=int(first.Columns),
            pixel_spacing=first.PixelSpacing,
            spacing_between_slices=spacing,
            number_of_frames=len(ordered),
            coordinate_system="PATIENT",
            frame_of_reference_uid=first.get("FrameOfReferenceUID"),
        )
        array = np.empty(geometry.spatial_shape, np.float32)
        padded = None  # (Z, rows, columns) bool, once a slice declares PixelPaddingValue
        try:
            for k, ds in enumerate(ordered):
                stored = ds.pixel_array
                pad = padding_mask(stored, ds)
                if pad is not None:
                    padded = np.zeros(array.shape, bool) if padded is None else padded
                    padded[k] = pad
                array[k] = apply_modality_lut(stored, ds)
                del ds.PixelData  # the SEG needs the headers only
        except MemoryError:
            raise
        except Exception as exc:
            log.debug("pixel data not decodable: %s", type(exc).__name__)
            raise DicomError(label, f"{s.label}: the pixel data cannot be decoded (truncated or corrupt)") from None
    if not np.isfinite(array).all():
        raise DicomError(label, f"{s.label}: the pixel data holds NaN or infinite values")
    presets = window_presets(ordered[len(ordered) // 2])
    notes = to_monochrome2_background(array, padded, presets, photometric == "MONOCHROME1", s, label)
    along = geometry.get_affine("RAS")[:3, 0]
    if along[int(np.argmax(np.abs(along)))] < 0:  # run towards R, A or S, as NIfTI stacks usually do
        geometry, ordered, array = geometry.flip_spatial(0), ordered[::-1], np.ascontiguousarray(array[::-1])
    return Stack(array, geometry, ordered, presets, notes)


def _consistent_slices(ordered: list, s: Series, label: str) -> str:
    """One pixel spacing, frame of reference and grey PhotometricInterpretation for all slices; that interpretation."""
    first = ordered[0]
    if any(not np.allclose(ds.PixelSpacing, first.PixelSpacing, rtol=1e-4) for ds in ordered):
        raise DicomError(label, f"{s.label}: slices differ in pixel spacing; inconsistent geometry")
    if len({str(ds.get("FrameOfReferenceUID", "")) for ds in ordered}) > 1:
        raise DicomError(label, f"{s.label}: slices differ in frame of reference; inconsistent geometry")
    photometric = {str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper() for ds in ordered}
    if len(photometric) > 1:
        raise DicomError(label, f"{s.label}: slices differ in PhotometricInterpretation ({', '.join(sorted(photometric))})")
    photometric = photometric.pop()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(label, f"{s.label}: PhotometricInterpretation {photometric[:16]} is not read (MR is MONOCHROME2, or MONOCHROME1)")
    return photometric


def _padding_number(ds, keyword: str) -> int | None:
    """PixelPaddingValue / PixelPaddingRangeLimit as a stored pixel value (signed or not as the pixels are), else None."""
    import struct

    value = ds.get(keyword)
    signed = int(_number(ds.get("PixelRepresentation"), 0)) == 1
    bits = int(_number(ds.get("BitsAllocated"), 16))
    if isinstance(value, bytes):  # an ambiguous VR (US or SS) pydicom left undecoded
        value = struct.unpack("<h" if signed else "<H", value[:2])[0] if len(value) >= 2 else None
    try:
        value = int(_values(value)[0])
    except (IndexError, TypeError, ValueError, OverflowError):
        return None
    if bits in (8, 16, 32):  # written with the other signedness than the pixels: the same bits
        if signed and value >= 1 << (bits - 1):
            value -= 1 << bits
        elif not signed and value < 0:
            value += 1 << bits
    return value


def padding_mask(stored: np.ndarray, ds) -> np.ndarray | None:
    """Pixels of one slice (stored values, before the modality LUT) that are padding: PixelPaddingValue,
    or the range from it to PixelPaddingRangeLimit (inclusive, either order); None when none is declared."""
    value = _padding_number(ds, "PixelPaddingValue")
    if value is None:
        return None
    limit = _padding_number(ds, "PixelPaddingRangeLimit")
    if limit is None:
        return stored == value
    lo, hi = sorted((value, limit))
    return (stored >= lo) & (stored <= hi)


def to_monochrome2_background(array: np.ndarray, padded: np.ndarray | None, presets: list[dict], monochrome1: bool, s: Series, label: str) -> list[str]:
    """Make the values of one series (after the modality LUT) read as MONOCHROME2 with background 0, in place.

    The rule, in this order: a MONOCHROME1 series (low values shown white) is inverted, ``max + min - value``
    over its real (non-padding) values; padding pixels become background, exactly 0, and when real values go
    below 0 they are all shifted up so the lowest is 0, so background is the lowest value and the volume's
    intensity window (percentiles of the non-zero voxels, ``preprocessing.intensity_window``) sees tissue only.
    The header's window presets follow the values. Returns the notes saying what was done.
    """
    notes = []
    real = None if padded is None or not padded.any() else ~padded
    if real is not None and not real.any():
        raise DicomError(label, f"{s.label}: every pixel is padding (PixelPaddingValue); the series holds no image")
    if monochrome1:
        values = array if real is None else array[real]
        total = np.float32(values.max()) + np.float32(values.min())
        np.subtract(total, array, out=array)
        for p in presets:
            p["center"] = round(float(total) - p["center"], 3)
        notes.append(f"{s.label} is MONOCHROME1 (inverted greyscale): its values were inverted (max + min - value) to read as MONOCHROME2")
    if real is not None:
        low = float(array[real].min())
        shift = ""
        if low < 0:
            array[real] -= np.float32(low)
            for p in presets:
                p["center"] = round(p["center"] - low, 3)
            shift = f"; its values were raised by {-low:g} so that background is the lowest value"
        array[padded] = 0.0
        notes.append(f"{s.label}: {int(padded.sum())} padding pixels (PixelPaddingValue) read as background (0){shift}")
    return notes


def onto_grid(stack: Stack, grid: Stack, s: Series, label: str) -> tuple[np.ndarray, str | None]:
    """``stack``'s values on ``grid``'s voxels: as they are when the grids agree, else resampled (linear)."""
    from highdicom import VolumeToVolumeTransformer
    from scipy import ndimage

    same_frame = str(stack.datasets[0].get("FrameOfReferenceUID", "")) == str(grid.datasets[0].get("FrameOfReferenceUID", ""))
    if not same_frame:
        raise DicomError(
            label, f"{s.label} has another frame of reference than the FLAIR series (not co-registered); send co-registered series, or FLAIR alone"
        )
    if stack.array.shape == grid.array.shape and np.allclose(stack.geometry.affine, grid.geometry.affine, atol=GRID_TOL_MM):
        return stack.array, None
    to_src = VolumeToVolumeTransformer(grid.geometry, stack.geometry).affine  # grid (k, r, c) -> stack (k, r, c)
    out = ndimage.affine_transform(stack.array, to_src[:3, :3], offset=to_src[:3, 3], output_shape=grid.array.shape, order=1, mode="constant", cval=0.0)
    return out.astype(np.float32, copy=False), f"{s.label} resampled onto the FLAIR grid (linear interpolation)"


# ---------------------------------------------------------------- the volume


@dataclass
class DicomSource:
    """What the SEG needs and what an answer may say about the DICOM input (nothing identifying)."""

    references: list  # headers of the grid (FLAIR) series, in the volume's slice order, pixel data dropped
    further: list  # headers of the other series used
    series: list[dict]  # per series: number, description, slices, read as
    channel_sources: list[str]  # per channel
    window_presets: list[list[dict]]  # per channel
    redactor: Redactor = field(default_factory=Redactor)
    slice_spacing: float = 0.0  # mm between the references' slices (a SEG's SliceThickness when the headers have none)

    def block(self) -> dict:
        return {"series": self.series, "channel_sources": self.channel_sources, "window_presets": self.window_presets}


@dataclass
class DicomVolume(Volume):
    """A ``volumes.Volume`` read from DICOM, with what its SEG needs."""

    dicom: DicomSource | None = None


def load_dicom(items: list[tuple[str, bytes]], label: str, name: str | None = None, max_voxels: int | None = None, max_decoded_bytes: int | None = None):
    """The ``DicomVolume`` (a ``volumes.Volume`` with its ``DicomSource``) of a DICOM study given as (file name, bytes) pairs.

    ``label`` names the input in messages (an upload or a path; give it already redacted if it
    may hold identifiers). Raises DicomError (422) / DicomTooLarge (413) with a plain message.
    """
    series, redactor, skipped = read_series(items, label)
    label = redactor.file_name(label)
    mr = [s for s in series if s.modality == "MR"]
    if not mr:
        kinds = ", ".join(sorted({s.modality for s in series}))
        raise DicomError(label, f"the images are {kinds}, not MR: brainseg segments brain MRI only")
    notes = [f"{s.label} not used: {s.modality}, not MR" for s in series if s.modality != "MR"]
    if len({str(s.datasets[0].get("StudyInstanceUID", "")) for s in mr}) > 1:
        raise DicomError(label, "the files belong to more than one study; send the series of one study")
    chosen, more = choose_series(mr, label)
    notes += more
    for s in chosen.values():
        check_series(s, label, max_voxels)
    total = sum(decoded_bytes(s) for s in chosen.values())
    if max_decoded_bytes is not None and total > max_decoded_bytes:
        raise DicomTooLarge(label, f"the series decode to {_mib(total)}, above the limit of {_mib(max_decoded_bytes)} (BRAINSEG_MAX_DECODED_MB)")
    stacks = {seq: stack_series(s, label) for seq, s in chosen.items()}
    notes += [n for st in stacks.values() for n in st.notes]
    grid = stacks["flair"]
    channels = []
    for seq in ("t1", "flair", "t1c"):
        if seq == "flair" or seq not in stacks:
            channels.append(grid.array)
            continue
        values, note = onto_grid(stacks[seq], grid, chosen[seq], label)
        channels.append(values)
        if note:
            notes.append(note)
    slices = np.stack(channels, axis=-1)
    del channels
    if sum(skipped.values()):
        notes.append(", ".join(f"{n} file(s) skipped: {why}" for why, n in skipped.items() if n))
    has_pre, has_post = "t1" in chosen, "t1c" in chosen
    condition = "all" if has_pre and has_post else "pre_missing" if has_post else "post_missing" if has_pre else "flair_only"
    # One series is read like one NIfTI volume: what it says it is (None: not said, so FLAIR or the caller's choice).
    alone = (mr[0].sequence if len(mr) == 1 else "flair") if len(chosen) == 1 else None
    z, rows, cols = grid.array.shape
    vol = DicomVolume(
        slices,
        grid.nifti_affine,
        grid.spacing,
        (cols, rows, z),
        redactor.file_name(name) if name else "dicom",
        (label,),
        condition=condition,
        channels_given=len(chosen),
        name_sequence=alone,
        present=tuple(SEQUENCE_TAGS[q] for q in ("t1", "flair", "t1c") if q in chosen) if len(chosen) > 1 else (),
        notes=tuple(notes),
    )
    further = [ds for q, st in stacks.items() if q != "flair" for ds in st.datasets]
    vol.dicom = DicomSource(grid.datasets, further, series_table(series, chosen), *_channels(chosen, stacks), redactor, float(grid.geometry.spacing[0]))
    return canonicalize(vol)


def series_table(series: list[Series], chosen: dict[str, Series]) -> list[dict]:
    """What the answer says of each series: number, description, slices, sequence, and which channel it fed."""
    used = {id(s): seq for seq, s in chosen.items()}
    return [
        {
            "series_number": s.number,
            "description": s.description,
            "modality": s.modality,
            "slices": len(s.datasets),
            "sequence": READ_AS.get(s.sequence or "", "not recognised"),
            "why": s.why,
            "used_as": READ_AS[used[id(s)]] if id(s) in used else None,
        }
        for s in series
    ]


def _channels(chosen: dict[str, Series], stacks: dict[str, Stack]) -> tuple[list[str], list[list[dict]]]:
    """Per channel (pre-contrast, FLAIR, post-contrast): the series it was read from, and its window presets."""
    flair = chosen["flair"].label
    sources = [chosen[q].label if q in chosen else f"{flair}, a copy of FLAIR" for q in ("t1", "flair", "t1c")]
    presets = [stacks.get(q, stacks["flair"]).presets for q in ("t1", "flair", "t1c")]
    return sources, presets


def load_dicom_path(path: Path, max_voxels: int | None = None) -> DicomVolume:
    """``load_dicom`` of a folder (any depth) or a .zip on disk, named after it (unless that names the patient)."""
    path = Path(path)
    name = path.name[:-4] if path.name.lower().endswith(".zip") else path.name
    return load_dicom(files_in(path), str(path), name=name, max_voxels=max_voxels)


# ---------------------------------------------------------------- SEG out

TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDate",
    "StudyTime",
)
SEX_VALUES = {"M": "M", "MALE": "M", "MAN": "M", "F": "F", "FEMALE": "F", "WOMAN": "F", "W": "F", "O": "O", "OTHER": "O"}
SEG_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")  # Type 1: nothing to fill them with


class SegError(Exception):
    """A DICOM SEG cannot be written from these headers; ``str()`` is a plain sentence (no values, no library text)."""


def dicom_date(value) -> str:
    """A DA value (YYYYMMDD) from what exports write (also YYYY-MM-DD, YYYY.MM.DD, DD.MM.YYYY); "" when it is not a date."""
    text = str(value or "").strip()
    if m := re.fullmatch(r"(\d{4})[-./]?(\d{2})[-./]?(\d{2})", text):
        y, mo, d = m.groups()
    elif m := re.fullmatch(r"(\d{2})[./](\d{2})[./](\d{4})", text):
        d, mo, y = m.groups()
    else:
        return ""
    import datetime

    try:
        datetime.date(int(y), int(mo), int(d))
    except ValueError:
        return ""
    return y + mo + d


def dicom_time(value) -> str:
    """A TM value (HH[MM[SS[.FFFFFF]]]) from what exports write (also HH:MM[:SS]); "" when it is not a time."""
    text = str(value or "").strip()
    m = re.fullmatch(r"(\d{2})(?::?(\d{2})(?::?(\d{2})(\.\d{1,6})?)?)?", text)
    if not m:
        return ""
    h, mi, sec, frac = m.groups()
    if int(h) > 23 or (mi and int(mi) > 59) or (sec and int(sec) > 60):
        return ""
    return h + (mi or "") + (sec or "") + (frac or "")


def seg_headers(datasets: list, slice_spacing: float = 0.0) -> list:
    """Copies of source headers fit for a DICOM SEG (the caller's are not changed).

    Type 2 patient / study attributes that are missing become empty (what the standard allows);
    PatientSex becomes M / F / O, or empty for anything else ("Female" -> F); StudyDate / StudyTime /
    PatientBirthDate written with separators are rewritten, else emptied; a missing or empty
    SliceThickness becomes ``slice_spacing``; a SpacingBetweenSlices that is not positive is dropped;
    a missing SOPClassUID is MR Image Storage (only MR is read). Values that exist are kept.
    """
    import copy

    out = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        for key in TYPE2_PATIENT_STUDY:
            if key not in ds or ds[key].value is None:
                setattr(ds, key, "")
        sex = str(ds.PatientSex or "")
        if sex not in ("M", "F", "O", ""):
            ds.PatientSex = SEX_VALUES.get(sex.strip().upper(), "")
        for key, fix in (("StudyDate", dicom_date), ("PatientBirthDate", dicom_date), ("StudyTime", dicom_time)):
            text = str(ds[key].value or "").strip()
            if text and fix(text) != text:
                setattr(ds, key, fix(text))
        if not _number(ds.get("SliceThickness"), 0.0) > 0 and slice_spacing > 0:
            ds.SliceThickness = round(float(slice_spacing), 6)
        if "SpacingBetweenSlices" in ds and not _number(ds.get("SpacingBetweenSlices"), 0.0) > 0:
            del ds.SpacingBetweenSlices
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = MR_IMAGE
        out.append(ds)
    return out


def _lesion_segment(model_name: str, model_version: str, threshold: float | None):
    """The SEG's one segment: brain lesion, found automatically by this model and version (with its threshold)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    params = {"brainseg": __version__} | ({"threshold": f"{threshold:.4g}"} if threshold is not None else {})
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"brainseg {model_name}"[:64], family=codes.cid7162.ArtificialIntelligence, version=str(model_version)[:64], source="brainseg", parameters=params
    )
    return hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="lesion",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        anatomic_regions=[codes.SCT.Brain],
    )


def seg_bytes(source: DicomSource, mask: np.ndarray, model_name: str, model_version: str, threshold: float | None = None) -> bytes:
    """A binary DICOM SEG of ``mask`` (Z, rows, columns), frame z on ``source.references[z]``.

    It carries the study's identifiers (copied by highdicom from the source headers, made fit by
    ``seg_headers``), so a viewer or PACS files it with its study; nothing else brainseg writes does.
    Raises ``SegError`` (a plain sentence) when the headers cannot give a SEG.
    """
    import highdicom as hd

    refs = source.references
    if mask.shape != (len(refs), int(refs[0].Rows), int(refs[0].Columns)):
        raise ValueError(f"mask shape {mask.shape} does not match the source series ({len(refs)} slices of {refs[0].Rows}x{refs[0].Columns})")
    for key in SEG_UIDS:
        if any(not str(ds.get(key, "") or "").strip() for ds in refs):
            raise SegError(f"the source series has no {key}, which a DICOM SEG must carry")
    refs = seg_headers(refs, source.slice_spacing)
    further = [ds for ds in source.further if all(str(ds.get(k, "") or "").strip() for k in SEG_UIDS[:3])]  # references only: one without ids is left out
    further = seg_headers(further, 0.0) or None
    lesion = _lesion_segment(model_name, model_version, threshold)
    number = int(_number(refs[0].get("SeriesNumber")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            seg = hd.seg.Segmentation(
                source_images=refs,
                pixel_array=mask.astype(np.uint8),
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=[lesion],
                series_instance_uid=hd.UID(),
                series_number=number + 1000 if 0 <= number < 2**31 - 1000 else 1000,
                sop_instance_uid=hd.UID(),
                instance_number=1,
                manufacturer="brainseg",
                manufacturer_model_name=f"brainseg {model_name}"[:64],
                software_versions=__version__,
                device_serial_number="none",
                content_label="LESION",
                content_description="brainseg lesion mask; research software, not for diagnosis",
                series_description=f"brainseg lesion SEG ({model_name})"[:64],
                further_source_images=further,
                omit_empty_frames=False,
            )
            buf = io.BytesIO()
            seg.save_as(buf)
        except MemoryError:
            raise
        except Exception as exc:  # highdicom's and pydicom's messages may quote header values: never passed on
            log.debug("DICOM SEG not written: %s", type(exc).__name__)
            raise SegError("the source headers hold values a DICOM SEG cannot carry") from None
    return buf.getvalue()


SEG_FAILED = "the DICOM SEG could not be written"


def write_seg(source: DicomSource, mask: np.ndarray, model_name: str, model_version: str, threshold: float | None = None) -> tuple[bytes | None, str | None]:
    """(SEG bytes, None), or (None, a plain warning) when it cannot be written: the caller keeps the mask either way."""
    try:
        return seg_bytes(source, mask, model_name, model_version, threshold), None
    except MemoryError:
        raise
    except SegError as exc:
        why = str(exc)
    except Exception as exc:
        log.warning("DICOM SEG not written: unexpected %s", type(exc).__name__)
        why = "an unexpected failure while writing it"
    return None, f"{SEG_FAILED} ({why}); the mask is kept: NIfTI mask, PNGs and lesion table as usual"
