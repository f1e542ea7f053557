"""What a request's files are, and whether they fit the limits, before anything big is decoded.

Pure functions on ``(filename, bytes)`` pairs; they raise ``UploadError`` with the HTTP status
a client should get (400 empty, 413 too large, 415 wrong type, 422 unreadable or wrong shape)
and a plain message of our own: never a library's exception text.

Budgets come first, from the headers, through the libraries: tifffile for every page of a
TIFF, Pillow for PNG / JPEG, nibabel for NIfTI-1 and NIfTI-2. Only then is anything decoded:
``.nii.gz`` is inflated with a byte cap taken from its own header (a small file that expands
without end is cut off) and its CRC is checked; multi-member gzip is read member by member.
DICOM (a ``.zip`` of a series or study, or ``.dcm`` files) is bounded the same way: the zip's
directory (sizes, member count, compression ratio) before inflating, the DICOM headers (voxels,
decoded bytes) before any pixel data is decoded (see ``brainseg.io.dicom``).
"""

from __future__ import annotations

import io
import logging
import unicodedata
import warnings
import zlib
from dataclasses import dataclass

import numpy as np

from ..io import dicom
from ..io.channels import describe_volume, stored_channels
from ..io.datasets import IMAGE_SUFFIXES, DataError, decode_slice, to_three_channels
from ..io.volumes import is_nifti

log = logging.getLogger("brainseg.serving")

MIN_SIDE = 16  # pixels; CLAHE tiles and the network need a few pixels per side (slices, and volumes in-plane)
MAX_NAME = 100  # characters of a file name kept for messages and downloads
MAX_TIFF_PAGES = 64  # more pages are refused without looking at each
GZIP_SLACK = 1 << 16
MAX_DATA_OFFSET = 1 << 24  # header extensions beyond 16 MiB are not accepted  # bytes a .nii.gz may inflate to beyond what its header declares
ACCEPTED = (
    "a slice (.tif, .tiff, .png, .jpg, .jpeg), a NIfTI volume (.nii, .nii.gz), a BraTS set (*-t1n, *-t2f, *-t1c .nii.gz), "
    "or a DICOM MR series or study (a .zip of the files, or .dcm files)"
)


class UploadError(Exception):
    """A problem with the user's upload; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass
class Upload:
    name: str
    data: bytes


@dataclass(frozen=True)
class Limits:
    """What one request may cost (``Settings`` gives them; see settings.py)."""

    max_pixels: int = 2048 * 2048
    max_voxels: int = 256 * 256 * 256
    max_decoded_bytes: int = 256 << 20


def clean_name(raw: str | None) -> str:
    """A file name safe to show and to put in a header: base name only, no control or
    format characters, at most ``MAX_NAME`` characters (the suffix kept); ``upload`` if none is left."""
    name = str(raw or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if unicodedata.category(ch)[0] not in "CZ" or ch == " ").strip(" .")
    if len(name) > MAX_NAME:
        low = name.lower()
        suffix = ".nii.gz" if low.endswith(".nii.gz") else ("." + name.rsplit(".", 1)[-1]) if "." in name[-8:] else ""
        name = name[: MAX_NAME - len(suffix) - 3] + "..." + suffix
    return name or "upload"


def sniff(data: bytes) -> str | None:
    """``image``, ``nifti`` or None from the first bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff" or data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "image"
    if data[:2] == b"\x1f\x8b":
        return "nifti"  # gzip: the only compressed input we accept is .nii.gz
    if len(data) >= 348 and (data[344:348] in (b"n+1\x00", b"ni1\x00") or data[4:8] in (b"n+2\x00", b"ni2\x00")):
        return "nifti"
    return None


def kind_of(up: Upload) -> str:
    """``image``, ``nifti`` or ``dicom`` (a .zip, or a DICOM file), from the name's suffix, else from the content; 415 otherwise."""
    name = up.name.lower()
    if is_nifti(name):
        return "nifti"
    if any(name.endswith(s) for s in IMAGE_SUFFIXES):
        return "image"
    if dicom.is_zip(up.data[:4], name) or dicom.looks_like_dicom(up.data[:132], name):
        return "dicom"
    sniffed = sniff(up.data)
    if sniffed:
        return sniffed
    suffix = name.rsplit(".", 1)[-1][:12] if "." in name else "(none)"
    raise UploadError(415, f"{up.name}: unsupported file type '{suffix}'; send {ACCEPTED}")


def classify(uploads: list[Upload], max_bytes: int) -> str:
    """``slice`` or ``volume`` for a whole request; checks emptiness, total size and combinations."""
    if not uploads:
        raise UploadError(422, f"no file uploaded: send {ACCEPTED} in the form field 'files'")
    total = sum(len(u.data) for u in uploads)
    if total > max_bytes:
        raise UploadError(413, f"upload is {total / 2**20:.1f} MiB, above the limit of {max_bytes / 2**20:.0f} MiB (BRAINSEG_MAX_UPLOAD_MB)")
    for u in uploads:
        if not u.data:
            raise UploadError(400, f"{u.name}: file is empty")
    kinds = [kind_of(u) for u in uploads]
    if all(k == "image" for k in kinds):
        if len(uploads) > 1:
            raise UploadError(422, f"{len(uploads)} images uploaded; send one slice per request (or a NIfTI volume)")
        return "slice"
    if all(k == "nifti" for k in kinds):
        if len(uploads) > 4:
            raise UploadError(422, f"{len(uploads)} NIfTI files uploaded; send one volume or one BraTS set (t1n, t2f, t1c)")
        return "volume"
    if all(k == "dicom" for k in kinds):
        return "dicom"
    raise UploadError(422, "images, NIfTI volumes and DICOM mixed in one request; send one slice, one volume, or one DICOM series or study")


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _pixel_type_ok(dtype: np.dtype) -> bool:
    """uint8/16/32, int8/16/32, float16/32; not bool, float64, int64, complex or structured (RGB) types."""
    return dtype.kind in "ui" and dtype.itemsize <= 4 or dtype.kind == "f" and dtype.itemsize <= 4


PIXEL_TYPES = "8, 16 or 32-bit integers or 32-bit float"


# ---------------------------------------------------------------- slices


@dataclass
class ImageInfo:
    format: str  # "TIFF", "PNG" or "JPEG"
    height: int
    width: int
    channels: int
    itemsize: int  # bytes per sample
    pages: int = 1
    decoded_bytes: int = 0  # all pages, all channels, as stored
    dtype: np.dtype | None = None


def _stream(data):
    """A binary stream of ``data``: bytes, or an open seekable file (read from where it stands; left open)."""
    return data if hasattr(data, "read") else io.BytesIO(data)


def _head(data, n: int) -> bytes:
    """The first ``n`` bytes of bytes or of a seekable file (whose position is put back)."""
    if not hasattr(data, "read"):
        return data[:n]
    pos = data.tell()
    head = data.read(n)
    data.seek(pos)
    return head


def _tiff_info(data, name: str) -> ImageInfo:
    import tifffile

    try:
        with tifffile.TiffFile(_stream(data), name="upload.tif") as tif:  # a name: a spooled upload has none tifffile can use
            n_pages = len(tif.pages)
            if n_pages == 0:
                raise ValueError("no pages")
            if n_pages > MAX_TIFF_PAGES:
                raise UploadError(422, f"{name}: TIFF has {n_pages} pages; send one slice per file (a volume as NIfTI)")
            total, first = 0, None
            for page in tif.pages:
                shape, dtype = tuple(int(s) for s in page.shape), page.dtype
                if dtype is None:
                    raise UploadError(422, f"{name}: unsupported TIFF pixel type; send {PIXEL_TYPES}")
                total += int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                if first is None:
                    first = ImageInfo("TIFF", int(page.imagelength), int(page.imagewidth), int(page.samplesperpixel), dtype.itemsize, dtype=np.dtype(dtype))
                    depth = int(getattr(page, "imagedepth", 1) or 1)
                    if depth > 1:
                        raise UploadError(422, f"{name}: TIFF holds a volume ({depth} planes); send one slice, or the volume as NIfTI")
    except UploadError:
        raise
    except Exception as exc:
        log.debug("TIFF header of %s unreadable: %r", name, exc)
        raise UploadError(422, f"{name}: cannot read the TIFF header; the file is corrupt, truncated or not a TIFF image") from None
    first.pages, first.decoded_bytes = n_pages, total
    return first


def _pillow_info(data, name: str) -> ImageInfo:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(_stream(data)) as im:
                fmt, (w, h), mode = im.format, im.size, im.mode
                raw = str(im.tile[0][3] if im.tile and len(im.tile[0]) > 3 else "")
                bands = len(im.getbands())
    except Image.DecompressionBombError:
        raise UploadError(413, f"{name}: image dimensions are far above the pixel limit (BRAINSEG_MAX_PIXELS)") from None
    except Exception as exc:
        log.debug("image header of %s unreadable: %r", name, exc)
        raise UploadError(422, f"{name}: cannot read the image header; the file is corrupt, truncated or not a TIFF, PNG or JPEG image") from None
    if fmt not in ("PNG", "JPEG", "MPO"):
        raise UploadError(415, f"{name}: {fmt or 'unknown'} images are not accepted; send {ACCEPTED}")
    sixteen = mode in ("I", "I;16", "I;16B", "I;16L", "F") or ";16" in raw
    if mode == "P":
        bands = 4  # OpenCV expands a palette to colour (with alpha where the PNG has transparency)
    elif mode == "LA":
        bands = 4
    return ImageInfo("JPEG" if fmt == "MPO" else fmt, int(h), int(w), bands, 2 if sixteen else 1, decoded_bytes=int(w) * int(h) * bands * (2 if sixteen else 1))


def image_info(data, name: str = "image") -> ImageInfo:
    """Size, channels, sample size and pages from the header (tifffile / Pillow), nothing decoded;
    ``data`` is the file's bytes or the open file (only its headers are read)."""
    head = _head(data, 8)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff_info(data, name)
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff":
        return _pillow_info(data, name)
    raise UploadError(422, f"{name}: not a TIFF, PNG or JPEG image (the first bytes match none of them)")


def check_image(info: ImageInfo, name: str, limits: Limits) -> None:
    """Every limit a slice must meet, from its header alone."""
    h, w = info.height, info.width
    if h * w > limits.max_pixels:
        raise UploadError(413, f"{name}: image is {w}x{h} = {h * w} pixels, above the limit of {limits.max_pixels} (BRAINSEG_MAX_PIXELS)")
    if info.decoded_bytes > limits.max_decoded_bytes:
        raise UploadError(
            413, f"{name}: image decodes to {_mib(info.decoded_bytes)}, above the limit of {_mib(limits.max_decoded_bytes)} (BRAINSEG_MAX_DECODED_MB)"
        )
    if info.pages > 1:
        raise UploadError(422, f"{name}: TIFF has {info.pages} pages; send one slice per file (a volume as NIfTI)")
    if min(h, w) < MIN_SIDE:
        raise UploadError(422, f"{name}: image is {w}x{h}; each side needs at least {MIN_SIDE} pixels")
    if info.dtype is not None and not _pixel_type_ok(info.dtype):
        raise UploadError(422, f"{name}: pixel type {info.dtype.name} is not accepted; send {PIXEL_TYPES}")
    if info.channels not in (1, 3, 4):
        raise UploadError(422, f"{name}: image has {info.channels} channels; expected grey (1) or 3 channels (pre-contrast, FLAIR, post-contrast)")


def decode_slice_channels(up: Upload, limits: Limits) -> tuple[np.ndarray, int]:
    """Upload -> (H, W, 3) array (dtype as stored) and the number of channels the file stored (1 grey, 3 or 4);
    413 / 422 with a message on bad input."""
    info = image_info(up.data, up.name)
    check_image(info, up.name, limits)
    try:
        arr = decode_slice(up.data, up.name)  # the CLI's decoder too
    except DataError as exc:
        log.debug("decoding %s failed: %s", up.name, exc)
        raise UploadError(422, f"{up.name}: cannot decode the image; the file is corrupt or truncated") from None
    except MemoryError:
        raise UploadError(413, f"{up.name}: too large to decode on this server") from None
    except Exception as exc:
        log.debug("decoding %s failed: %r", up.name, exc)
        raise UploadError(422, f"{up.name}: cannot decode the image; the file is corrupt or truncated") from None
    arr = np.asarray(arr)
    planar = arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] > 4
    hw = tuple(arr.shape[1:3]) if planar else tuple(arr.shape[:2])
    if arr.ndim not in (2, 3) or hw != (info.height, info.width):
        raise UploadError(422, f"{up.name}: decoded image does not match its header ({info.width}x{info.height}); the file is corrupt")
    if not _pixel_type_ok(arr.dtype):
        raise UploadError(422, f"{up.name}: pixel type {arr.dtype.name} is not accepted; send {PIXEL_TYPES}")
    if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4) and not planar:
        raise UploadError(422, f"{up.name}: image has {arr.shape[2]} channels; expected grey (1) or 3 channels (pre-contrast, FLAIR, post-contrast)")
    try:
        img = to_three_channels(arr, up.name)
    except DataError:
        raise UploadError(422, f"{up.name}: expected a grey or 3-channel slice, got an array of shape {arr.shape}") from None
    stored = stored_channels(arr)
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise UploadError(422, f"{up.name}: image contains {int((~np.isfinite(img)).sum())} NaN or infinite values")
    check_value_range(img, up.name)
    return img, stored


MAX_ABS_VALUE = 1e30  # beyond this, windowing to 8 bits overflows float32 (about 3.4e38) and the mask means nothing


def check_value_range(arr: np.ndarray, label: str, what: str = "image") -> None:
    """422 for float values of magnitude above ``MAX_ABS_VALUE`` (refused, not clipped: no scanner
    writes them, and clipping would segment an image that is not the one sent). Min / max only: no copy."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    if max(abs(float(arr.min())), abs(float(arr.max()))) > MAX_ABS_VALUE:
        raise UploadError(422, f"{label}: {what} holds values of magnitude above 1e30, which cannot be windowed; rescale it to the scanner's units")


# ---------------------------------------------------------------- volumes


def spatial_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A NIfTI shape without trailing length-1 axes beyond the third: (X, Y, Z, 1) -> (X, Y, Z)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


@dataclass
class NiftiInfo:
    name: str
    version: int  # 1 or 2
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int
    header: object  # nibabel Nifti1Header / Nifti2Header

    @property
    def voxels(self) -> int:
        return int(np.prod(self.shape[:3], dtype=np.int64))

    @property
    def data_bytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def end(self) -> int:
        return self.offset + self.data_bytes


def nifti_header(raw: bytes, name: str) -> NiftiInfo:
    """Shape, dtype and data offset of a NIfTI-1 / NIfTI-2 file from its first bytes (nibabel)."""
    import nibabel as nib

    hdr, version = None, 0
    try:
        for klass, v in ((nib.Nifti1Header, 1), (nib.Nifti2Header, 2)):
            if len(raw) >= klass.sizeof_hdr and klass.may_contain_header(raw[: klass.sizeof_hdr]):
                hdr, version = klass(raw[: klass.sizeof_hdr], check=False), v
                break
    except Exception as exc:
        log.debug("NIfTI header of %s unreadable: %r", name, exc)
        hdr = None
    if hdr is None:
        if len(raw) < 348:
            raise UploadError(422, f"{name}: file is too short to be NIfTI ({len(raw)} bytes; the header alone is 348)")
        raise UploadError(422, f"{name}: not a NIfTI file (no NIfTI-1 or NIfTI-2 header)")
    if bytes(hdr["magic"]).rstrip(b"\0") in (b"ni1", b"ni2"):
        raise UploadError(422, f"{name}: header says its data is in a separate .img file; send a single-file .nii or .nii.gz")
    try:
        shape = tuple(int(s) for s in hdr.get_data_shape())
    except Exception:
        dim = [int(d) for d in hdr["dim"]]
        raise UploadError(422, f"{name}: NIfTI header has invalid dimensions {dim[:8]}") from None
    try:
        dtype = np.dtype(hdr.get_data_dtype())
    except Exception:
        raise UploadError(422, f"{name}: NIfTI header names an unknown data type (code {int(hdr['datatype'])})") from None
    try:
        offset = int(hdr.get_data_offset())
    except Exception:
        offset = -1
    return NiftiInfo(name, version, shape, dtype, offset, hdr)


def check_nifti(info: NiftiInfo, limits: Limits) -> None:
    """Every limit and sanity check a volume must pass, from its header alone."""
    name, shape = info.name, info.shape
    if len(shape) < 3 or any(s < 1 for s in shape):
        raise UploadError(422, f"{name}: expected a 3-D volume, got shape {list(shape)}")
    core = spatial_shape(shape)
    if len(core) > 4 or (len(core) == 4 and core[3] != 3):
        raise UploadError(
            422,
            f"{name}: volume has shape {list(shape)}; expected 3-D, or 4-D with 3 channels last (pre-contrast, FLAIR, post-contrast); a time series is not accepted",
        )
    x, y, _ = shape[:3]
    if info.voxels > limits.max_voxels:
        raise UploadError(
            413, f"{name}: volume is {'x'.join(map(str, shape[:3]))} = {info.voxels} voxels, above the limit of {limits.max_voxels} (BRAINSEG_MAX_VOXELS)"
        )
    if info.data_bytes > limits.max_decoded_bytes:
        raise UploadError(413, f"{name}: volume data is {_mib(info.data_bytes)}, above the limit of {_mib(limits.max_decoded_bytes)} (BRAINSEG_MAX_DECODED_MB)")
    if min(x, y) < MIN_SIDE:
        raise UploadError(422, f"{name}: volume is {x}x{y} in-plane; each side needs at least {MIN_SIDE} voxels")
    if not info.header.sizeof_hdr + 4 <= info.offset <= MAX_DATA_OFFSET:
        raise UploadError(422, f"{name}: NIfTI header has an invalid data offset (vox_offset)")
    dt = info.dtype
    if dt.fields is not None or dt.kind not in "uif" or dt.itemsize > 4:
        what = "complex" if dt.kind == "c" else "RGB" if dt.fields is not None else dt.name
        raise UploadError(422, f"{name}: voxel type {what} is not accepted; send {PIXEL_TYPES} (e.g. save as float32 or int16)")
    hdr = info.header
    zooms = np.asarray(hdr["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise UploadError(422, f"{name}: NIfTI header has an invalid voxel size (pixdim 1-3 must be positive numbers)")
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    if np.isinf(slope) or (slope != 0 and np.isfinite(slope) and not np.isfinite(inter)):
        raise UploadError(422, f"{name}: NIfTI header has an invalid intensity scaling (scl_slope / scl_inter)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            affine = np.asarray(hdr.get_best_affine(), dtype=np.float64)
    except Exception:
        affine = np.full((4, 4), np.nan)
    if not degenerate_ok(affine):
        raise UploadError(422, f"{name}: NIfTI header has a degenerate voxel-to-world affine (zero, NaN or singular); fix the sform / qform")


def degenerate_ok(affine: np.ndarray) -> bool:
    """True for a finite affine whose 3x3 part is well away from singular."""
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        return False
    m = affine[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if np.any(norms <= 0):
        return False
    return abs(float(np.linalg.det(m))) / float(np.prod(norms)) > 1e-6


def gunzip_capped(data: bytes, cap: int, name: str) -> bytes:
    """Inflate a gzip stream (one or more members) to at most ``cap`` bytes, checking each CRC.

    413 if it inflates to more, 422 if it is corrupt, truncated or followed by other data.
    """
    out = bytearray()
    buf = data
    step = 1 << 20
    while True:
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            while not d.eof:
                room = cap + 1 - len(out)
                chunk = d.decompress(buf, min(step, room))
                out += chunk
                if len(out) > cap:
                    raise UploadError(413, f"{name}: inflates to more than its NIfTI header declares ({_mib(cap)}); not accepted")
                buf = d.unconsumed_tail
                if not chunk and not buf and not d.eof:
                    raise UploadError(422, f"{name}: the gzip stream is truncated (the file was cut short)")
        except zlib.error as exc:
            log.debug("gunzip of %s failed: %s", name, exc)
            raise UploadError(422, f"{name}: the gzip data is corrupt (a checksum or the stream does not match); re-export or re-copy the file") from None
        rest = d.unused_data
        if not rest or not rest.strip(b"\0"):
            return bytes(out)
        if rest[:2] != b"\x1f\x8b":
            raise UploadError(422, f"{name}: unexpected data after the end of the gzip stream; the file is corrupt")
        buf = rest


def nifti_info(up: Upload) -> NiftiInfo:
    """The header of an upload, inflating only its first bytes when gzipped."""
    data = up.data
    if data[:2] == b"\x1f\x8b":
        d = zlib.decompressobj(16 + zlib.MAX_WBITS)
        try:
            head = d.decompress(data, 540)
            while len(head) < 540 and d.unconsumed_tail and not d.eof:
                head += d.decompress(d.unconsumed_tail, 540 - len(head))
        except zlib.error:
            raise UploadError(422, f"{up.name}: cannot decompress: the file is corrupt or not gzip") from None
        return nifti_header(head, up.name)
    return nifti_header(data[:540], up.name)


def nifti_payload(up: Upload, limits: Limits, info: NiftiInfo | None = None) -> bytes:
    """Uncompressed NIfTI bytes of an upload (header and data, nothing after), after checking
    its header against the limits. ``.nii.gz`` is inflated with a cap from its own header."""
    info = info or nifti_info(up)
    check_nifti(info, limits)
    need = info.end
    raw = gunzip_capped(up.data, need + GZIP_SLACK, up.name) if up.data[:2] == b"\x1f\x8b" else up.data
    if len(raw) < need:
        raise UploadError(422, f"{up.name}: truncated NIfTI: header promises {need} bytes, file holds {len(raw)}")
    return raw if len(raw) == need else raw[:need]


def read_volume_payloads(uploads: list[Upload], limits: Limits) -> dict[str, bytes]:
    """Every file's header checked (alone and summed) before any of them is inflated."""
    infos = [nifti_info(u) for u in uploads]
    for info in infos:
        check_nifti(info, limits)
    total = sum(i.data_bytes for i in infos)
    if total > limits.max_decoded_bytes:
        raise UploadError(413, f"the volumes decode to {_mib(total)} together, above the limit of {_mib(limits.max_decoded_bytes)} (BRAINSEG_MAX_DECODED_MB)")
    return {u.name: nifti_payload(u, limits, info) for u, info in zip(uploads, infos, strict=False)}


# ---------------------------------------------------------------- DICOM


def dicom_items(uploads: list[Upload], limits: Limits) -> list[tuple[str, bytes]]:
    """(name, bytes) of every file: .dcm uploads as they are, zips unpacked within the decoded-bytes budget."""
    items, budget = [], limits.max_decoded_bytes
    for u in uploads:
        if dicom.is_zip(u.data[:4], u.name):
            members = dicom.unzip(u.data, u.name, max_bytes=budget)
            budget -= sum(len(m) for _, m in members)
            items += members
        else:
            items.append((u.name, u.data))
    return items


def decode_dicom(uploads: list[Upload], limits: Limits, sequence: str | None = None):
    """(``dicom.DicomVolume``, input block) of a DICOM upload; 413 / 422 with a plain message.

    The uploads' names are redacted in place when they hold the patient's name, id or birth
    date (they are echoed in answers); the input block gains a ``dicom`` part (series, the
    series each channel was read from, window presets) with nothing identifying.
    """
    label = uploads[0].name if len(uploads) == 1 else f"{len(uploads)} DICOM files"
    stem = uploads[0].name[:-4] if len(uploads) == 1 and uploads[0].name.lower().endswith(".zip") else "dicom"
    try:
        vol = dicom.load_dicom(dicom_items(uploads, limits), label, name=stem, max_voxels=limits.max_voxels, max_decoded_bytes=limits.max_decoded_bytes)
    except dicom.DicomError as exc:
        raise UploadError(exc.status, str(exc)) from None
    except MemoryError:
        raise UploadError(413, "the DICOM series is too large to decode on this server") from None
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError, EOFError) as exc:  # an unusual file pydicom trips on
        log.debug("DICOM unreadable: %s", type(exc).__name__)  # the type only: a message may quote header values
        raise UploadError(422, "the DICOM files could not be read (corrupt, or an encoding brainseg does not handle)") from None
    for u in uploads:
        u.name = vol.dicom.redactor.file_name(u.name)
    block = describe_volume(vol, sequence)
    block["dicom"] = vol.dicom.block()
    return vol, block


# ---------------------------------------------------------------- memory

# Peak memory one segmentation takes beyond the upload's bytes and its decoded data, per pixel of a
# slice or per voxel (of one channel) of a volume: the peak RSS increase of a real server for one
# request alone (scripts/bench_memory.py --clients 1, shipped models; measured 72 / 20 bytes a pixel
# for 2048x2048 float32 / uint8 slices, 43 / 60 a voxel for the BraTS example as NIfTI / DICOM, each
# ensemble member beyond the first 7 a pixel and 26 a voxel more), rounded up by about 15 %. uint8
# slices skip the float32 windowing copies the other pixel types go through.
SLICE_BYTES_PER_PIXEL_UINT8 = 24
SLICE_BYTES_PER_PIXEL = 84
VOLUME_BYTES_PER_VOXEL = 50
DICOM_BYTES_PER_VOXEL = 70
MEMBER_BYTES_PER_PIXEL = 10  # each ensemble member beyond the first
MEMBER_BYTES_PER_VOXEL = 30
NIFTI_HEAD_BYTES = 1 << 16  # read of a (gzipped) NIfTI file to find its header
DICOM_HEAD_BYTES = 1 << 13  # read of each DICOM file to find rows, columns, frames and series


def memory_need(files: list[tuple[str, object, int]], limits: Limits, members: int = 1) -> int | None:
    """Bytes of memory a request's decoding, segmentation and answer take at most, from its files'
    headers alone (``files``: name, open seekable file, size; only headers are read): the uploads'
    bytes, their decoded data and the working copies (the ``*_BYTES_PER_*`` constants; ``members``:
    the models run, more than one for the ensemble).

    A request the decoding will refuse from these same headers (wrong type, mixed kinds, over a
    limit) needs only its bytes. None when the headers cannot be read here but the full decoding
    might still succeed (an odd gzip or DICOM header): the caller charges the whole budget.
    """
    try:
        return _memory_need(files, limits, members)
    except Exception as exc:  # a header reader tripped on something unforeseen: charge the whole budget, never a 500
        log.warning("memory need not estimated (%s); the request is charged the whole memory budget", type(exc).__name__)
        return None
    finally:
        for _, f, _ in files:
            f.seek(0)


def _memory_need(files: list[tuple[str, object, int]], limits: Limits, members: int) -> int | None:
    raw = sum(size for _, _, size in files)
    for _, f, _ in files:
        f.seek(0)
    try:
        kinds = {kind_of(Upload(name, _head(f, 1024))) for name, f, _ in files}
    except UploadError:
        return raw
    if kinds == {"image"} and len(files) == 1:
        name, f, _ = files[0]
        try:
            info = image_info(f, name)
            check_image(info, name, limits)
        except UploadError:  # the same header check refuses it before decoding
            return raw
        uint8 = info.itemsize == 1 and (info.dtype is None or info.dtype == np.uint8)  # PNG / JPEG headers give no dtype
        per_pixel = (SLICE_BYTES_PER_PIXEL_UINT8 if uint8 else SLICE_BYTES_PER_PIXEL) + (members - 1) * MEMBER_BYTES_PER_PIXEL
        return raw + info.decoded_bytes + info.height * info.width * per_pixel
    if kinds == {"nifti"} and len(files) <= 4:
        try:
            infos = [nifti_info(Upload(name, _head(f, NIFTI_HEAD_BYTES))) for name, f, _ in files]
        except UploadError:  # refused for good, unless the header lies beyond the bytes read here (an odd gzip header)
            return raw if all(size <= NIFTI_HEAD_BYTES for *_, size in files) else None
        try:
            for info in infos:
                check_nifti(info, limits)
        except UploadError:
            return raw
        per_voxel = VOLUME_BYTES_PER_VOXEL + (members - 1) * MEMBER_BYTES_PER_VOXEL
        return raw + sum(i.data_bytes for i in infos) + max(i.voxels for i in infos) * per_voxel
    if kinds == {"dicom"}:
        return _dicom_need(files, limits, raw, DICOM_BYTES_PER_VOXEL + (members - 1) * MEMBER_BYTES_PER_VOXEL)
    return raw  # several slices, or kinds mixed: refused before decoding


def _dicom_need(files: list[tuple[str, object, int]], limits: Limits, raw: int, per_voxel: int) -> int | None:
    """Uploads, inflated members (twice: as files and as parsed data sets) and the largest series'
    voxels (the volume is built on one series' grid) times ``per_voxel``."""
    import zipfile

    heads, inflated = [], 0
    try:
        for name, f, size in files:
            if not dicom.is_zip(_head(f, 4), name):
                heads.append((_head(f, DICOM_HEAD_BYTES), size))
                inflated += size
                continue
            f.seek(0)
            zf = zipfile.ZipFile(f)
            infos = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith("__MACOSX/") and not i.filename.lower().endswith(".zip")]
            total = sum(i.file_size for i in infos)
            if total > limits.max_decoded_bytes or len(infos) > dicom.MAX_MEMBERS:
                return raw  # refused from the zip's directory, before inflating
            inflated += total
            for info in infos:
                with zf.open(info) as member:
                    heads.append((member.read(DICOM_HEAD_BYTES), info.file_size))
    except Exception:  # not a readable zip: refused the same way before anything is inflated
        return raw
    return raw + 2 * inflated + min(_largest_series_voxels(heads), limits.max_voxels) * per_voxel


def _largest_series_voxels(heads: list[tuple[bytes, int]]) -> int:
    """Voxels of the largest series among DICOM files given by their first bytes and sizes; a file whose
    header is not in its first bytes counts as 16-bit pixels filling the file, in a series of its own kind."""
    import pydicom

    series: dict[str, int] = {}
    for head, size in heads:
        try:
            ds = pydicom.dcmread(
                io.BytesIO(head), stop_before_pixels=True, force=True, specific_tags=["SeriesInstanceUID", "Rows", "Columns", "NumberOfFrames"]
            )
            voxels = int(ds.Rows) * int(ds.Columns) * max(1, int(ds.get("NumberOfFrames") or 1))
            key = str(ds.get("SeriesInstanceUID", ""))
        except Exception:
            voxels, key = size // 2, "?"
        series[key] = series.get(key, 0) + voxels
    return max(series.values(), default=0)
