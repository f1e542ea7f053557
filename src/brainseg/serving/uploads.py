"""What a request's files are, and whether they fit the limits, before anything big is decoded.

Pure functions on ``(filename, bytes)`` pairs; they raise ``UploadError`` with the HTTP status
a client should get (400 empty, 413 too large, 415 wrong type, 422 unreadable or wrong shape).
Sizes are read from the file headers (PNG IHDR, JPEG SOF, TIFF tags, NIfTI header) so that a
small file claiming a huge image is refused before it is decompressed.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ..channels import stored_channels
from ..data import IMAGE_SUFFIXES, DataError, decode_image, to_three_channels
from ..volumes import is_nifti

MIN_SIDE = 16  # pixels; CLAHE tiles and the network need a few pixels per side
ACCEPTED = "a slice (.tif, .tiff, .png, .jpg, .jpeg), a NIfTI volume (.nii, .nii.gz), or a BraTS set (*-t1n, *-t2f, *-t1c .nii.gz)"


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
    """``image`` or ``nifti``, from the name's suffix, else from the content; 415 otherwise."""
    name = up.name.lower()
    if is_nifti(name):
        return "nifti"
    if any(name.endswith(s) for s in IMAGE_SUFFIXES):
        return "image"
    sniffed = sniff(up.data)
    if sniffed:
        return sniffed
    suffix = name.rsplit(".", 1)[-1] if "." in name else "(none)"
    hint = " DICOM must be converted to NIfTI first (e.g. dcm2niix)." if name.endswith(".dcm") or up.data[128:132] == b"DICM" else ""
    raise UploadError(415, f"{up.name}: unsupported file type '{suffix}'; send {ACCEPTED}.{hint}")


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
    raise UploadError(422, "images and NIfTI volumes mixed in one request; send one slice, or one volume")


# ---------------------------------------------------------------- slices


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a PNG, JPEG or TIFF header without decoding; None if unknown."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
            w, h = struct.unpack(">II", data[16:24])
            return h, w
        if data[:2] == b"\xff\xd8":
            i = 2
            while i + 9 < len(data):
                if data[i] != 0xFF:
                    i += 1
                    continue
                marker = data[i + 1]
                if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                    i += 1 if marker == 0xFF else 2
                    continue
                (length,) = struct.unpack(">H", data[i + 2 : i + 4])
                if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
                    h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                    return h, w
                i += 2 + length
            return None
        if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages[0]
                return int(page.imagelength), int(page.imagewidth)
    except Exception:  # a broken header is reported by the decoder, with its own message
        return None
    return None


def _check_pixels(name: str, h: int, w: int, max_pixels: int) -> None:
    if h * w > max_pixels:
        raise UploadError(413, f"{name}: image is {w}x{h} = {h * w} pixels, above the limit of {max_pixels} (BRAINSEG_MAX_PIXELS)")


def decode_slice(up: Upload, max_pixels: int) -> np.ndarray:
    """Upload -> (H, W, 3) array (dtype as stored); 413 / 422 with a message on bad input."""
    return decode_slice_channels(up, max_pixels)[0]


def decode_slice_channels(up: Upload, max_pixels: int) -> tuple[np.ndarray, int]:
    """``decode_slice`` and the number of channels the file stored (1 grey, 3 or 4)."""
    size = image_size(up.data)
    if size:
        _check_pixels(up.name, *size, max_pixels)
    try:
        arr = decode_image(up.data, up.name)
        if arr.ndim >= 2:
            hw = arr.shape[1:3] if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] > 4 else arr.shape[:2]
            _check_pixels(up.name, int(hw[0]), int(hw[1]), max_pixels)
        if arr.ndim == 3 and arr.shape[2] not in (1, 3, 4) and not (arr.shape[0] in (3, 4) and arr.shape[2] > 4):
            raise DataError(up.name, f"image has {arr.shape[2]} channels; expected grey (1) or 3 channels (pre-contrast, FLAIR, post-contrast), got shape {arr.shape}")
        img = to_three_channels(arr, up.name)
        stored = stored_channels(arr)
    except DataError as exc:
        raise UploadError(422, str(exc)) from None
    if img.dtype == bool or img.dtype.kind not in "uif":
        raise UploadError(422, f"{up.name}: unsupported pixel type {img.dtype}")
    if min(img.shape[:2]) < MIN_SIDE:
        raise UploadError(422, f"{up.name}: image is {img.shape[1]}x{img.shape[0]}; each side needs at least {MIN_SIDE} pixels")
    if img.dtype.kind == "f" and not np.isfinite(img).all():
        raise UploadError(422, f"{up.name}: image contains {int((~np.isfinite(img)).sum())} NaN or infinite values")
    return img, stored


# ---------------------------------------------------------------- volumes

_NIFTI_DTYPES = {2: 1, 4: 2, 8: 4, 16: 4, 64: 8, 256: 1, 512: 2, 768: 4, 1024: 8, 1280: 8, 32: 8, 128: 3, 2304: 4}


def _nifti_header(raw: bytes, name: str) -> tuple[tuple[int, ...], int, int]:
    """(dims, bytes per voxel, data offset) from the first bytes of an uncompressed NIfTI-1/2 file."""
    if len(raw) < 348:
        raise UploadError(422, f"{name}: file is too short to be NIfTI ({len(raw)} bytes; the header alone is 348)")
    for endian in ("<", ">"):
        (sizeof_hdr,) = struct.unpack(endian + "i", raw[:4])
        if sizeof_hdr == 348:
            dim = struct.unpack(endian + "8h", raw[40:56])
            datatype, bitpix = struct.unpack(endian + "hh", raw[70:74])
            (vox_offset,) = struct.unpack(endian + "f", raw[108:112])
            break
        if sizeof_hdr == 540 and len(raw) >= 540:
            dim = struct.unpack(endian + "8q", raw[16:80])
            datatype, bitpix = struct.unpack(endian + "hh", raw[12:16])
            (vox_offset,) = struct.unpack(endian + "q", raw[168:176])
            break
    else:
        raise UploadError(422, f"{name}: not a NIfTI file (bad header size)")
    ndim = int(dim[0])
    if not 1 <= ndim <= 7 or any(d < 1 for d in dim[1 : ndim + 1]):
        raise UploadError(422, f"{name}: NIfTI header has invalid dimensions {list(dim[: ndim + 1] if 0 <= ndim <= 7 else dim)}")
    itemsize = _NIFTI_DTYPES.get(int(datatype), max(int(bitpix) // 8, 1))
    return tuple(int(d) for d in dim[1 : ndim + 1]), itemsize, int(vox_offset)


def nifti_payload(up: Upload, max_voxels: int) -> bytes:
    """Uncompressed NIfTI bytes of an upload, after checking its header against ``max_voxels``.

    ``.nii.gz`` is inflated with a bound taken from its own header, so a small gzip that
    expands without end (a "zip bomb") is cut off instead of filling the memory.
    """
    data = up.data
    if data[:2] == b"\x1f\x8b":
        try:
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
            head = d.decompress(data, 540)
        except zlib.error as exc:
            raise UploadError(422, f"{up.name}: cannot decompress ({exc}); the file is corrupt or not gzip") from None
        dims, itemsize, offset = _nifti_header(head, up.name)
        _check_voxels(up.name, dims, max_voxels)
        need = offset + int(np.prod(dims, dtype=np.int64)) * itemsize
        try:
            rest = d.decompress(d.unconsumed_tail, max(need - len(head), 0) + 1)
        except zlib.error as exc:
            raise UploadError(422, f"{up.name}: cannot decompress ({exc}); the file is corrupt or truncated") from None
        raw = head + rest
        if len(raw) < need:
            raise UploadError(422, f"{up.name}: truncated NIfTI: header promises {need} bytes, file holds {len(raw)}")
        return raw[:need]
    dims, itemsize, offset = _nifti_header(data, up.name)
    _check_voxels(up.name, dims, max_voxels)
    need = offset + int(np.prod(dims, dtype=np.int64)) * itemsize
    if len(data) < need:
        raise UploadError(422, f"{up.name}: truncated NIfTI: header promises {need} bytes, file holds {len(data)}")
    return data


def _check_voxels(name: str, dims: tuple[int, ...], max_voxels: int) -> None:
    spatial = int(np.prod(dims[:3], dtype=np.int64))
    if spatial > max_voxels:
        raise UploadError(413, f"{name}: volume is {'x'.join(map(str, dims[:3]))} = {spatial} voxels, above the limit of {max_voxels} (BRAINSEG_MAX_VOXELS)")
    if len(dims) > 3 and int(np.prod(dims[3:])) > 4:
        raise UploadError(422, f"{name}: volume has shape {dims}; expected 3-D, or 4-D with 3 channels (pre-contrast, FLAIR, post-contrast)")
