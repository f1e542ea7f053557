"""Reading a segment request: its parameters, then its files (checked, then decoded).

Everything here raises ``UploadError`` (4xx with a plain message of our own) for the client's
mistakes only; anything else that goes wrong is a server fault and is left to propagate.
"""

from __future__ import annotations

import logging
import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from fastapi import Request, UploadFile

from ..config import PRECISIONS
from ..evaluation import measure
from ..io.channels import describe_slice, describe_volume, parse_sequence
from ..io.datasets import DataError
from ..io.volumes import Volume, load_volume
from .uploads import Limits, Upload, UploadError, check_value_range, classify, clean_name, decode_slice_channels, kind_of, memory_need, read_volume_payloads

log = logging.getLogger("brainseg.serving")

SEGMENT_FIELDS = ("files", "model", "threshold", "tta", "sequence", "precision", "pixel_spacing_mm", "return")
SEQUENCE_HELP = "sequence must be one of flair (FLAIR), t1 (pre-contrast T1), t1c (T1 post-contrast), t2 (T2); it says what a grey image or a single volume is"


@dataclass(frozen=True)
class SegmentOptions:
    """The parameters of ``POST /v1/segment``, parsed and checked."""

    model: str | None  # None: the registry's default
    threshold: float | None  # None: the model's calibrated one
    tta: bool | None  # flip test-time augmentation; None: the model's shipped default (``Segmenter.with_tta``)
    sequence: str | None  # what a grey slice or a single volume is (None: FLAIR)
    precision: str | None  # "fp32" or "int8"; None: the model's served default (``Engine.default_precision``)
    pixel_spacing_mm: tuple[float, float] | None = None  # a slice's (row, col) pixel spacing; None: unknown (diameters in pixels)


def parse_threshold(raw: str | None) -> float | None:
    """The threshold parameter; messages never repeat what was sent."""
    if raw is None or str(raw).strip() == "":
        return None
    try:
        t = float(raw)
    except (ValueError, OverflowError):
        raise UploadError(422, "threshold must be a number between 0 and 1 (exclusive)") from None
    if not (0.0 < t < 1.0) or math.isnan(t):
        raise UploadError(422, "threshold must be between 0 and 1 (exclusive)")
    return t


def parse_bool(name: str, raw: str | None) -> bool:
    value = parse_optional_bool(name, raw)
    return bool(value)


def parse_optional_bool(name: str, raw: str | None) -> bool | None:
    """True / False, or None when not given (absent or empty): the caller's default applies."""
    v = "" if raw is None else str(raw).strip().lower()
    if v == "":
        return None
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise UploadError(422, f"{name} must be true or false (or left out for its default)")


def parse_precision(raw: str | None) -> str | None:
    """``fp32``, ``int8``, or None when not given."""
    v = "" if raw is None else str(raw).strip().lower()
    if v == "":
        return None
    if v not in PRECISIONS:
        raise UploadError(422, "precision must be fp32 or int8 (the quantised model, where one is shipped); leave it out for the model's default")
    return v


def parse_pixel_spacing(raw: str | None) -> tuple[float, float] | None:
    """``pixel_spacing_mm`` (``measure.parse_pixel_spacing``); None when not given."""
    try:
        return measure.parse_pixel_spacing(raw)
    except ValueError as exc:
        raise UploadError(422, str(exc)) from None


def parse_sequence_field(raw: str | None) -> str | None:
    try:
        return parse_sequence(raw)
    except ValueError:
        raise UploadError(422, SEQUENCE_HELP) from None


async def segment_options(request: Request, fields: dict[str, str | None]) -> SegmentOptions:
    """The form fields (else the same names in the query string), parsed; unknown names are a 422."""
    q = request.query_params
    form = await request.form()  # already parsed (and limited) by FastAPI: no second read
    if any(k not in SEGMENT_FIELDS for k in list(q.keys()) + list(form.keys())):
        raise UploadError(422, f"unknown form field or query parameter; this route takes {', '.join(SEGMENT_FIELDS)}")

    def value(name: str) -> str | None:
        return fields[name] if fields.get(name) is not None else q.get(name)

    return SegmentOptions(
        model=value("model"),
        threshold=parse_threshold(value("threshold")),
        tta=parse_optional_bool("tta", value("tta")),
        sequence=parse_sequence_field(value("sequence")),
        precision=parse_precision(value("precision")),
        pixel_spacing_mm=parse_pixel_spacing(value("pixel_spacing_mm")),
    )


def check_declared_size(files: list[UploadFile], max_bytes: int, max_mb: float) -> None:
    """413 at once when the sizes the form parser saw are over the upload limit."""
    declared = sum(f.size or 0 for f in files)
    if declared > max_bytes:
        raise UploadError(413, f"upload is {declared / 2**20:.1f} MiB, above the limit of {max_mb:.0f} MiB (BRAINSEG_MAX_UPLOAD_MB)")


def is_volume_request(files: list[UploadFile]) -> bool:
    """Whether a request is a volume (or DICOM), from the file names and first bytes only: volumes
    also wait for one of ``BRAINSEG_MAX_CONCURRENT_VOLUMES`` slots. Whatever it really is is checked later."""
    if len(files) != 1:
        return len(files) > 1
    f = files[0]
    f.file.seek(0)
    head = f.file.read(512)
    f.file.seek(0)
    try:
        return kind_of(Upload(clean_name(f.filename), head)) != "image"
    except UploadError:
        return False


def memory_of(files: list[UploadFile], limits: Limits, members: int = 1) -> int | None:
    """What the request will need of ``BRAINSEG_MEMORY_BUDGET_MB`` (``uploads.memory_need``; ``members``:
    models run), from its files' headers where the form parser spooled them: nothing is read whole or decoded."""
    items = []
    for f in files:
        if f.size is None:
            f.file.seek(0, 2)
        size = f.size if f.size is not None else f.file.tell()
        f.file.seek(0)
        items.append((clean_name(f.filename), f.file, size))
    return memory_need(items, limits, members)


def read_uploads(files: list[UploadFile], max_bytes: int) -> tuple[list[Upload], str]:
    """The files' bytes and whether they are a ``slice`` or a ``volume``.

    Called once a worker is free: a queued request keeps its files where the form parser
    spooled them (on disk beyond 1 MiB), so the queue costs no memory.
    """
    uploads = []
    for f in files:
        f.file.seek(0)
        uploads.append(Upload(clean_name(f.filename), f.file.read(max_bytes + 1)))
    return uploads, classify(uploads, max_bytes)


# What reading a corrupt NIfTI can raise once its header has passed ``uploads.check_nifti``
# (nibabel's ImageFileError and HeaderDataError are ValueError / Exception subclasses of these).
_UNREADABLE = (ValueError, EOFError, OSError, zlib.error, struct.error, IndexError)


def decode_slice(upload: Upload, limits: Limits, sequence: str | None) -> tuple[np.ndarray, dict]:
    image, stored = decode_slice_channels(upload, limits)
    return image, describe_slice(image, stored, sequence)


def decode_volume(uploads: list[Upload], limits: Limits, sequence: str | None) -> tuple[Volume, dict]:
    """A NIfTI volume or a BraTS set, checked from its headers, then read; every problem here is the upload's."""
    payloads = read_volume_payloads(uploads, limits)
    try:
        vol = load_volume(payloads)
    except DataError as exc:
        msg = str(exc)
        raise UploadError(422, msg if any(u.name in msg for u in uploads) else f"{', '.join(u.name for u in uploads)}: {msg}") from None
    except _UNREADABLE as exc:
        log.debug("volume unreadable: %r", exc)
        raise UploadError(422, "the volume could not be read: a file is corrupt or not NIfTI") from None
    finally:
        del payloads
    return vol, describe_volume(vol, sequence)


def decode_input(kind: str, uploads: list[Upload], limits: Limits, sequence: str | None):
    """``(image or volume, input block)`` for a ``slice``, ``volume`` or ``dicom`` upload; a MemoryError while decoding is a 413."""
    try:
        if kind == "slice":
            return decode_slice(uploads[0], limits, sequence)
        if kind == "dicom":
            from .uploads import decode_dicom  # a DICOM series or study, read as a volume

            vol, block = decode_dicom(uploads, limits, sequence)
        else:
            vol, block = decode_volume(uploads, limits, sequence)
        check_value_range(vol.slices, uploads[0].name if len(uploads) == 1 else f"{len(uploads)} files", "the volume")
        return vol, block
    except MemoryError:
        raise UploadError(413, "the upload is too large to decode on this server") from None
