"""NIfTI volumes: one 3-channel file, one grey file, or a BraTS-style t1n / t2f / t1c set.

A BraTS set needs its FLAIR (t2f) file; a missing t1n and / or t1c is filled with the FLAIR
volume (the "pre_missing" / "post_missing" / "flair_only" conditions of ``channels``), as the
LGG dataset stores a missing sequence. A single grey file is repeated into the 3 channels.

Geometry comes from the file, not from the order in which it stores its voxels: every volume
is put into one anatomical orientation from its affine before anything else (``canonicalize``),
the orientation of the LGG slices the models learnt from and of DICOM viewers: axial slices from
inferior to superior, each with anterior at the top and the patient's right on the left of the
image (radiological convention). Storing the same volume as RAS, LPS, sagittal, ... gives the
same slices and the same mask; masks go back onto the file's own voxel grid and affine
(``Volume.file_mask``). No torch here.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .channels import SEQUENCE_ALIASES, channel_condition
from .datasets import DataError
from .files import write_bytes_atomic

log = logging.getLogger(__name__)

# LGG channel order (pre-contrast, FLAIR, post-contrast) <- BraTS sequences.
BRATS_CHANNELS = ("t1n", "t2f", "t1c")
_BRATS = re.compile(r"^(?P<stem>.+?)[-_](?P<seq>t1n|t1c|t2f|t2w|flair|t1|t1ce|t2)\.nii(\.gz)?$", re.IGNORECASE)
_ALIASES = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w"}
SEQ_ORDER = ("t1n", "t2f", "t1c", "t2w")  # every tag brats_sequence returns, in channel order


def is_nifti(path: os.PathLike | str) -> bool:
    name = str(path).lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def nifti_stem(path: os.PathLike | str) -> str:
    name = Path(path).name
    return name[:-7] if name.lower().endswith(".nii.gz") else name[:-4] if name.lower().endswith(".nii") else Path(name).stem


def brats_sequence(path: os.PathLike | str) -> tuple[str, str] | None:
    """``X-t2f.nii.gz`` -> (``X``, ``t2f``); None if the name has no sequence tag."""
    m = _BRATS.match(Path(path).name)
    if not m:
        return None
    seq = m.group("seq").lower()
    return m.group("stem"), _ALIASES.get(seq, seq)


# The (slice, row, column) axes of ``Volume.slices`` point to these patient directions (nibabel
# axis codes: the index grows towards S, P, L): axial slices from the feet up, anterior at the
# top of each image, the patient's right on its left, as the LGG slices and DICOM viewers show them.
DISPLAY_AXCODES = ("S", "P", "L")


@dataclass
class Volume:
    slices: np.ndarray  # (Z, H, W, 3) float32, axial slices in the display orientation (DISPLAY_AXCODES)
    affine: np.ndarray  # (4, 4) voxel -> world (mm) of the file's own grid
    spacing: tuple[float, float, float]  # voxel size (mm) along the displayed columns, rows and slices
    shape: tuple[int, int, int]  # the file's (X, Y, Z)
    name: str
    sources: tuple[str, ...]
    # How the channels were filled (see ``channels``): "all", "pre_missing", "post_missing", "flair_only".
    condition: str = "all"
    channels_given: int = 3  # 1: one grey volume (or a BraTS set with FLAIR only), 2 or 3: sequences given
    name_sequence: str | None = None  # sequence named by the file name (``X-t2f.nii.gz`` -> "flair")
    present: tuple[str, ...] = ()  # BraTS sequences in the set (t1n, t2f, t1c), empty for one file
    notes: tuple[str, ...] = field(default_factory=tuple)
    # nibabel orientation (3 x 2) of the slices as read from the file (``stored_slices``), before
    # ``canonicalize``; None: they were stored in the display orientation already.
    stored_orientation: np.ndarray | None = None

    def to_stored(self, arr: np.ndarray) -> np.ndarray:
        """(Z, H, W, ...) in the display orientation -> the same layout as the file stores it (before ``canonicalize``)."""
        return from_display(arr, self.stored_orientation)

    def file_mask(self, mask_zhw: np.ndarray) -> np.ndarray:
        """(Z, H, W) display-oriented mask -> (X, Y, Z) uint8 on the file's voxel grid (write it with ``affine``)."""
        return mask_to_volume(self.to_stored(mask_zhw)).astype(np.uint8, copy=False)

    @property
    def display_affine(self) -> np.ndarray:
        """(4, 4) voxel -> world (mm) of ``slices`` indexed (slice, row, column)."""
        return display_affine(self.affine, self.shape, self.stored_orientation)

    @property
    def pixel_area_mm2(self) -> float:
        return float(self.spacing[0] * self.spacing[1])

    @property
    def voxel_volume_mm3(self) -> float:
        return float(np.prod(self.spacing))


def _nifti_from_bytes(raw: bytes):
    """A nibabel image (NIfTI-1 or NIfTI-2, by its header) over uncompressed bytes."""
    import nibabel as nib

    if len(raw) >= nib.Nifti2Header.sizeof_hdr and nib.Nifti2Header.may_contain_header(raw[: nib.Nifti2Header.sizeof_hdr]):
        return nib.Nifti2Image.from_bytes(raw)
    return nib.Nifti1Image.from_bytes(raw)


def _squeeze_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def _read_slabs(img) -> np.ndarray:
    """The (scaled) data as float32, read one z slab at a time: never a second full copy
    in the stored type or in float64. Trailing length-1 axes beyond the third are dropped."""
    shape = tuple(int(s) for s in img.shape)
    core = _squeeze_shape(shape)
    out = np.empty(core, np.float32)
    tail = tuple(0 for _ in range(len(core), len(shape)))
    proxy = img.dataobj
    for k in range(core[2] if len(core) >= 3 else 0):
        out[:, :, k] = np.asarray(proxy[(slice(None), slice(None), k) + (slice(None),) * (len(core) - 3) + tail])
    return out


def _unscaled_view(img, raw: bytes) -> np.ndarray | None:
    """The voxels as a view of ``raw`` (no copy, stored type) when no intensity scaling applies
    (slope 1, intercept 0) and the data lies whole in ``raw``; None otherwise. Reads where
    nibabel's own array proxy reads (its dtype, offset, shape and order). Trailing length-1 axes
    beyond the third are dropped."""
    proxy = img.dataobj
    dtype = np.dtype(proxy.dtype)
    if float(proxy.slope) != 1.0 or float(proxy.inter) != 0.0 or dtype.kind not in "iuf":
        return None
    shape = tuple(int(s) for s in proxy.shape)
    count, offset = int(np.prod(shape)), int(proxy.offset)
    if offset + count * dtype.itemsize > len(raw):
        return None  # truncated: the slab reader says so in its own words
    data = np.frombuffer(raw, dtype, count=count, offset=offset).reshape(shape, order=proxy.order)
    return data.reshape(_squeeze_shape(shape), order="F")


def _load_nifti(data: bytes | None, path: os.PathLike | str):
    """(nibabel image, voxel array) of one NIfTI file (a path) or its bytes (gzipped or not).

    The file is inflated once and its voxels are used where they lie: without intensity scaling
    the array is a view of the bytes in the stored type (``_to_slices`` converts it to float32
    while orienting it); with scaling, float32 read one slab at a time (``_read_slabs``).
    Errors are plain DataErrors; what the library said goes to the debug log only.
    """
    try:
        if data is None:
            data = Path(path).read_bytes()
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        img = _nifti_from_bytes(raw)
        if len(img.shape) < 3:
            raise DataError(path, f"expected a 3-D volume, got shape {tuple(img.shape)}")
        arr = _unscaled_view(img, raw)
        if arr is None:
            arr = _read_slabs(img)
    except DataError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        log.debug("reading NIfTI %s failed: %r", path, exc)
        raise DataError(path, "cannot read NIfTI: the file is corrupt, truncated or not NIfTI-1 / NIfTI-2") from None
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise DataError(path, f"volume contains {int((~np.isfinite(arr)).sum())} NaN or infinite voxels")
    return img, arr


def _to_slices(channels: list[np.ndarray], img) -> tuple[np.ndarray, np.ndarray]:
    """Three (X, Y, Z) arrays (any real type) of a file with ``img``'s affine -> ((Z', H, W, 3) float32 slices in the
    display orientation, the orientation the file stores them in).

    Slice k of channel c as stored is ``rot90(arr[:, :, k])``, i.e. ``stored[k, i, j, c] = arr[j, Y - 1 - i, k]``
    (``stored_slices_affine``); the orientation transform from the affine (``canonicalize``) is applied to that
    view, so each channel is copied (and converted to float32) once, straight into the display orientation.
    """
    from nibabel.orientations import apply_orientation

    ornt = orientation_of(img.affine, channels[0].shape)
    views = [apply_orientation(np.transpose(arr[:, ::-1, :], (2, 1, 0)), _transform(ornt)) for arr in channels]
    out = np.empty(views[0].shape + (3,), np.float32)
    for c, view in enumerate(views):
        out[..., c] = view
    return out, ornt


def load_volume(files: list[os.PathLike | str] | dict[str, bytes], name: str | None = None) -> Volume:
    """Read one NIfTI (3-D grey, or 4-D with 3 channels last) or a t1n/t2f/t1c set.

    ``files`` is a list of paths, or a mapping of file name -> bytes (uploads). A set needs
    t2f (FLAIR); a missing t1n / t1c is filled with FLAIR; a t2w file is left out.
    """
    items = list(files.items()) if isinstance(files, dict) else [(str(p), None) for p in files]
    if not items:
        raise DataError(name or "volume", "no NIfTI file given")
    read = _one_nifti(*items[0]) if len(items) == 1 else _brats_set(items)
    stem = name or (brats_sequence(read.sources[0])[0] if read.present else nifti_stem(read.sources[0]))
    vol = Volume(
        read.slices,
        np.asarray(read.img.affine, dtype=np.float64),
        tuple(float(v) for v in read.img.header.get_zooms()[:3]),
        read.shape,
        stem,
        read.sources,
        condition=read.condition,
        channels_given=read.given,
        name_sequence=read.name_sequence,
        present=read.present,
        notes=tuple(read.notes),
        stored_orientation=read.orientation,
    )
    vol.spacing = _display_spacing(vol)  # the slices are in the display orientation already (``_to_slices``)
    return vol


@dataclass
class _Read:
    """What ``load_volume`` read, before it becomes a ``Volume``: the slices, the image whose grid they are on, how
    many sequences were given and what the model gets (``condition``), the files, a BraTS set's sequences."""

    slices: np.ndarray  # display orientation (``_to_slices``)
    orientation: np.ndarray  # how the file stores them
    shape: tuple[int, int, int]  # the file's (X, Y, Z)
    img: object  # nibabel image: affine and zooms
    given: int
    condition: str
    name_sequence: str | None
    sources: tuple[str, ...]
    present: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)


def _one_nifti(fname: str, data: bytes | None) -> _Read:
    """One file: a grey volume (the sequence its name says, else FLAIR), or three channels last."""
    img, arr = _load_nifti(data, fname)
    if arr.ndim > 3:
        arr = arr.reshape(_squeeze_shape(arr.shape))
    if arr.ndim == 3:
        tag = brats_sequence(fname)
        slices, ornt = _to_slices([arr, arr, arr], img)
        return _Read(slices, ornt, arr.shape, img, 1, "flair_only", SEQUENCE_ALIASES.get(tag[1], tag[1]) if tag else None, (fname,))
    if arr.ndim == 4 and arr.shape[3] == 3:
        slices, ornt = _to_slices([arr[..., c] for c in range(3)], img)
        return _Read(slices, ornt, arr.shape[:3], img, 3, channel_condition(slices), None, (fname,))
    raise DataError(fname, f"expected a 3-D volume or a 4-D volume with 3 channels (pre-contrast, FLAIR, post-contrast), got shape {arr.shape}")


def _set_members(items: list[tuple[str, bytes | None]]) -> dict[str, tuple[str, bytes | None]]:
    """sequence -> (file name, bytes) of a BraTS-style set; DataError for a file outside the naming, a sequence given
    twice, or no FLAIR."""
    by_seq: dict[str, tuple[str, bytes | None]] = {}
    for fname, data in items:
        tag = brats_sequence(fname)
        if tag is None:
            raise DataError(fname, "several NIfTI files must be a BraTS-style set named *-t1n, *-t2f and *-t1c")
        if tag[1] in by_seq:
            raise DataError(fname, f"BraTS-style set has two {tag[1]} files ({Path(by_seq[tag[1]][0]).name} and {Path(fname).name})")
        by_seq[tag[1]] = (fname, data)
    if "t2f" not in by_seq:
        raise DataError(
            items[0][0],
            f"BraTS-style set has no FLAIR (t2f) file (got {', '.join(sorted(by_seq, key=SEQ_ORDER.index))}); the models need FLAIR: "
            "send the *-t2f file (t1n and t1c may be left out: they are then filled with FLAIR)",
        )
    return by_seq


def _brats_set(items: list[tuple[str, bytes | None]]) -> _Read:
    """A t1n / t2f / t1c set on one grid; a missing t1n or t1c is FLAIR (``condition`` says which)."""
    by_seq = _set_members(items)
    present = tuple(s for s in BRATS_CHANNELS if s in by_seq)
    notes = [f"{s} not used (the models take pre-contrast T1, FLAIR and post-contrast T1)" for s in sorted(by_seq) if s not in BRATS_CHANNELS]
    with ThreadPoolExecutor(max_workers=len(present)) as pool:  # gunzip releases the GIL: the files inflate side by side
        reads = [pool.submit(_load_nifti, by_seq[seq][1], by_seq[seq][0]) for seq in present]
        loaded = {seq: read.result() for seq, read in zip(present, reads, strict=True)}  # the first bad file in channel order raises
    ref_name, ref_shape = by_seq["t2f"][0], _squeeze_shape(loaded["t2f"][1].shape)
    for seq in present:
        fname, arr = by_seq[seq][0], loaded[seq][1]
        if arr.ndim > 3:
            arr = arr.reshape(_squeeze_shape(arr.shape))
            loaded[seq] = (loaded[seq][0], arr)
        if arr.ndim != 3:
            raise DataError(fname, f"expected a 3-D volume, got shape {arr.shape}")
        if arr.shape != ref_shape:
            raise DataError(fname, f"shape {arr.shape} differs from {ref_name} {ref_shape}")
    img = loaded[present[0]][0]  # the first file of the set gives the grid (t1n when present, as before)
    slices, ornt = _to_slices([loaded.get(seq, loaded["t2f"])[1] for seq in BRATS_CHANNELS], img)
    has_pre, has_post = "t1n" in present, "t1c" in present
    condition = "all" if has_pre and has_post else "pre_missing" if has_post else "post_missing" if has_pre else "flair_only"
    sources = tuple(by_seq[s][0] for s in present)
    return _Read(slices, ornt, ref_shape, img, len(present), condition, "flair" if condition == "flair_only" else None, sources, present, notes)


# ---------------------------------------------------------------- orientation from the file


def stored_slices_affine(affine: np.ndarray, shape_xyz: tuple[int, int, int]) -> np.ndarray:
    """Affine of the slices as the file stores them, before the display orientation: (k, i, j) = (z, Y - 1 - y, x)."""
    y = shape_xyz[1]
    to_file = np.array([[0, 0, 1, 0], [0, -1, 0, y - 1], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)
    return np.asarray(affine, np.float64) @ to_file


def orientation_of(affine: np.ndarray, shape_xyz: tuple[int, int, int]) -> np.ndarray:
    """The nibabel orientation (3 x 2) of the slices as the file stores them (``stored_slices_affine``): what
    ``to_display`` turns into the display orientation. An oblique affine gives its closest orientation."""
    from nibabel.orientations import io_orientation

    return io_orientation(stored_slices_affine(affine, shape_xyz))


def _transform(stored_orientation: np.ndarray):
    from nibabel.orientations import axcodes2ornt, ornt_transform

    return ornt_transform(stored_orientation, axcodes2ornt(DISPLAY_AXCODES))


def _reoriented(arr: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``arr``'s first three axes moved by the orientation transform ``t`` (a contiguous copy unless nothing moves)."""
    from nibabel.orientations import apply_orientation

    if np.array_equal(t, [[0, 1], [1, 1], [2, 1]]):
        return arr
    return np.ascontiguousarray(apply_orientation(arr, t))


def to_display(arr: np.ndarray, stored_orientation: np.ndarray | None) -> np.ndarray:
    """(Z, H, W, ...) as stored -> the display orientation."""
    return arr if stored_orientation is None else _reoriented(arr, _transform(stored_orientation))


def from_display(arr: np.ndarray, stored_orientation: np.ndarray | None) -> np.ndarray:
    """The inverse of ``to_display``: display orientation -> the file's own layout."""
    if stored_orientation is None:
        return arr
    from nibabel.orientations import axcodes2ornt, ornt_transform

    return _reoriented(arr, ornt_transform(axcodes2ornt(DISPLAY_AXCODES), stored_orientation))


def display_affine(affine: np.ndarray, shape_xyz: tuple[int, int, int], stored_orientation: np.ndarray | None) -> np.ndarray:
    """Affine of the display-oriented slices (slice, row, column) of a file with ``affine`` and ``shape_xyz``."""
    from nibabel.orientations import inv_ornt_aff

    stored = stored_slices_affine(affine, shape_xyz)
    if stored_orientation is None:
        return stored
    x, y, z = shape_xyz
    return stored @ inv_ornt_aff(_transform(stored_orientation), (z, y, x))


def canonicalize(vol: Volume) -> Volume:
    """Put ``vol.slices`` (as read from the file, ``stored_slices_affine``) into the display
    orientation (``DISPLAY_AXCODES``) from its affine, whatever the storage order, and set
    ``spacing`` to the voxel size along the displayed columns, rows and slices (mm).

    An oblique volume goes to its closest orientation (no resampling). Idempotent.
    """
    if vol.stored_orientation is not None:
        return vol
    ornt = orientation_of(vol.affine, vol.shape)
    vol.slices = to_display(vol.slices, ornt)
    vol.stored_orientation = ornt
    vol.spacing = _display_spacing(vol)
    return vol


def _display_spacing(vol: Volume) -> tuple[float, float, float]:
    """The voxel size (mm) along the displayed columns, rows and slices."""
    zooms = np.sqrt((vol.display_affine[:3, :3] ** 2).sum(axis=0))  # along (slice, row, column)
    return float(zooms[2]), float(zooms[1]), float(zooms[0])


def mask_to_volume(mask: np.ndarray) -> np.ndarray:
    """(Z, H, W) slices in the file's stored layout (``Volume.to_stored``) -> (X, Y, Z) array on the file's grid:
    the inverse of ``_to_slices`` before its orientation transform."""
    return np.ascontiguousarray(np.transpose(mask, (2, 1, 0))[:, ::-1, :])


def nifti_bytes(mask: np.ndarray, affine: np.ndarray) -> bytes:
    """(X, Y, Z) uint8 mask -> gzipped NIfTI-1 bytes with ``affine``."""
    import nibabel as nib

    img = nib.Nifti1Image(mask.astype(np.uint8), affine)
    img.header.set_data_dtype(np.uint8)
    return gzip.compress(img.to_bytes(), compresslevel=6)


def save_mask_nifti(path: os.PathLike | str, mask_zhw: np.ndarray, vol: Volume) -> Path:
    write_bytes_atomic(path, nifti_bytes(vol.file_mask(mask_zhw), vol.affine))
    return Path(path)


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def display_orientation(affine: np.ndarray) -> dict | None:
    """Patient directions at the edges of a displayed slice, from the affine of the displayed
    (slice, row, column) array (``Volume.display_affine``): rows grow towards the bottom edge,
    columns towards the right edge."""
    import nibabel as nib

    try:
        _, row, col = nib.aff2axcodes(affine)
    except Exception:
        return None
    if row is None or col is None:
        return None
    return {"top": _OPPOSITE[row], "bottom": row, "left": _OPPOSITE[col], "right": col}
