"""Reading datasets in the LGG kaggle_3m layout, and the patient-level split.

Layout (Buda et al. 2019)::

    ROOT/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_1.tif        (H, W, 3) uint8
    ROOT/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_1_mask.tif   (H, W) {0, 255}

PNG and JPEG pairs with the same ``_mask`` naming work too; a folder of images with no
patient sub-folders is read as one patient. This module needs no torch.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import tifffile

from ..config import SPLIT_SEED, TEST_FRACTION, VAL_FRACTION

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg")
MASK_TAG = "_mask"
_INDEX = re.compile(r"_(\d+)$")


class DataError(ValueError):
    """A bad input file or folder; ``str()`` is one line naming the file."""

    def __init__(self, path: os.PathLike | str, message: str):
        self.path = str(path)
        super().__init__(f"{path}: {message}")


# ---------------------------------------------------------------- reading one file


def decode_slice(data: bytes, name: str, source: os.PathLike | str | None = None) -> np.ndarray:
    """One slice's bytes -> its pixels as stored ((H, W), (H, W, C), or planar (C, H, W)): the one slice decoder of
    the CLI (``read_slice``) and the API (``serving.uploads``), so both give the model the same array. A TIFF is
    read page by page, and one with several pages is refused (a volume belongs in NIfTI); other formats go
    through ``decode_image``."""
    source = source if source is not None else name
    if not data:
        raise DataError(source, "file is empty")
    if Path(name).suffix.lower() not in (".tif", ".tiff") and data[:4] not in (b"II*\x00", b"MM\x00*"):
        return decode_image(data, name, source)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if len(tif.pages) > 1:
                raise DataError(source, f"TIFF has {len(tif.pages)} pages; send one slice per file (a volume as NIfTI)")
            arr = np.asarray(tif.pages[0].asarray())
    except (DataError, MemoryError):
        raise
    except Exception as exc:  # tifffile raises many types on corrupt input
        raise DataError(source, f"cannot read image ({type(exc).__name__}: {exc})") from None
    if arr.size == 0:
        raise DataError(source, "image has no pixels")
    return arr


def read_slice(path: os.PathLike | str) -> np.ndarray:
    """A slice file -> ``decode_slice``'s array; DataError on a missing, empty or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    return decode_slice(path.read_bytes(), path.name, source=path)


def read_image(path: os.PathLike | str) -> np.ndarray:
    """Read a slice as (H, W, C) or (H, W); dtype as stored (uint8, uint16, float).

    TIFF (compressed or not) goes through tifffile, PNG / JPEG through OpenCV (BGR turned
    into RGB). Raises DataError on a missing, empty, truncated or unreadable file.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty")
    return decode_image(path.read_bytes(), path.name, source=path)


def decode_image(data: bytes, name: str, source: os.PathLike | str | None = None) -> np.ndarray:
    """Decode image bytes; ``name``'s suffix picks the decoder (TIFF, else OpenCV)."""
    source = source if source is not None else name
    if not data:
        raise DataError(source, "file is empty")
    suffix = Path(name).suffix.lower()
    try:
        if suffix in (".tif", ".tiff") or data[:4] in (b"II*\x00", b"MM\x00*"):
            arr = tifffile.imread(io.BytesIO(data))
        else:
            buf = np.frombuffer(data, dtype=np.uint8)
            arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise ValueError("not a readable PNG/JPEG/TIFF image")
            if arr.ndim == 3 and arr.shape[2] == 3:
                arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
            elif arr.ndim == 3 and arr.shape[2] == 4:
                arr = cv2.cvtColor(arr, cv2.COLOR_BGRA2RGBA)
    except DataError:
        raise
    except Exception as exc:  # tifffile / OpenCV raise many types on corrupt input
        raise DataError(source, f"cannot read image ({type(exc).__name__}: {exc})") from None
    arr = np.asarray(arr)
    if arr.size == 0:
        raise DataError(source, "image has no pixels")
    return arr


def to_three_channels(image: np.ndarray, source: os.PathLike | str = "image") -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) or (H, W, 4) -> (H, W, 3); grey is repeated, alpha dropped."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[:, :, :3])
    if image.ndim == 3 and image.shape[0] in (3, 4) and image.shape[2] > 4:
        # planar TIFF (C, H, W)
        return np.ascontiguousarray(np.moveaxis(image[:3], 0, -1))
    raise DataError(source, f"expected a grey or 3-channel slice, got array of shape {image.shape}")


def read_mask(path: os.PathLike | str) -> np.ndarray:
    """Read a mask as (H, W) bool (any value > 0 is lesion)."""
    arr = read_image(path)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise DataError(path, f"mask must be 2-D, got shape {arr.shape}")
    return arr > 0


def read_pair(image_path: os.PathLike | str, mask_path: os.PathLike | str) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) image and (H, W) bool mask; DataError if their sizes differ."""
    image = to_three_channels(read_image(image_path), image_path)
    mask = read_mask(mask_path)
    if mask.shape != image.shape[:2]:
        raise DataError(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but its image is {image.shape[1]}x{image.shape[0]}")
    return image, mask


# ---------------------------------------------------------------- dataset discovery


@dataclass(frozen=True)
class SliceRecord:
    patient: str
    index: int
    image_path: str
    mask_path: str | None


@dataclass
class Patient:
    id: str
    institution: str
    slices: list[SliceRecord] = field(default_factory=list)


@dataclass
class Dataset:
    root: str
    patients: list[Patient]
    images_without_mask: list[str]

    @property
    def n_slices(self) -> int:
        return sum(len(p.slices) for p in self.patients)

    def patient(self, pid: str) -> Patient:
        for p in self.patients:
            if p.id == pid:
                return p
        raise KeyError(pid)


def institution_of(patient_id: str) -> str:
    """``TCGA_CS_4941_19960909`` -> ``CS``; anything else -> ``other``."""
    parts = patient_id.split("_")
    return parts[1] if len(parts) > 2 and parts[0] == "TCGA" else "other"


def slice_index(stem: str) -> int:
    """Trailing number of a slice name (``X_12`` -> 12) so 10 sorts after 9; -1 if none."""
    m = _INDEX.search(stem)
    return int(m.group(1)) if m else -1


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.stem.endswith(MASK_TAG)


def _find_mask(img: Path) -> Path | None:
    for suffix in (img.suffix, *IMAGE_SUFFIXES):
        cand = img.with_name(img.stem + MASK_TAG + suffix)
        if cand.is_file():
            return cand
    return None


def list_slices(folder: Path, patient_id: str) -> tuple[list[SliceRecord], list[str]]:
    images = sorted((p for p in folder.iterdir() if _is_image(p)), key=lambda p: (slice_index(p.stem), p.name))
    records, missing = [], []
    for img in images:
        mask = _find_mask(img)
        if mask is None:
            missing.append(str(img))
        records.append(SliceRecord(patient_id, slice_index(img.stem), str(img), str(mask) if mask else None))
    return records, missing


def discover(root: os.PathLike | str) -> Dataset:
    """Find patients and slice/mask pairs under ``root``.

    Images without a mask stay listed (prediction can use them) but are counted in
    ``images_without_mask``; training and evaluation use ``labelled()``.
    Raises DataError on a missing or empty folder.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(root, "dataset folder not found")
    if not root.is_dir():
        raise DataError(root, "dataset path is not a folder")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders and any(_is_image(p) for p in root.iterdir()):
        folders = [root]
    patients, missing = [], []
    for folder in folders:
        records, miss = list_slices(folder, folder.name)
        missing += miss
        if records:
            patients.append(Patient(folder.name, institution_of(folder.name), records))
    if not patients:
        raise DataError(root, f"no images ({', '.join(IMAGE_SUFFIXES)}) found in the folder or its patient sub-folders")
    return Dataset(str(root), patients, missing)


def labelled(ds: Dataset) -> Dataset:
    """Only slices that have a mask; patients left with none are dropped."""
    patients = []
    for p in ds.patients:
        slices = [s for s in p.slices if s.mask_path]
        if slices:
            patients.append(Patient(p.id, p.institution, slices))
    if not patients:
        raise DataError(ds.root, f"no image has a '{MASK_TAG}' file beside it, so nothing can be trained or evaluated")
    return Dataset(ds.root, patients, ds.images_without_mask)


def load_patient(patient: Patient) -> tuple[list[np.ndarray], np.ndarray]:
    """All labelled slices of a patient: list of (H, W, 3) images and a (Z, H, W) bool mask volume."""
    images, masks = [], []
    for s in patient.slices:
        img, m = read_pair(s.image_path, s.mask_path)
        if images and img.shape != images[0].shape:
            raise DataError(s.image_path, f"slice is {img.shape[:2]} but earlier slices of {patient.id} are {images[0].shape[:2]}")
        images.append(img)
        masks.append(m)
    return images, np.stack(masks)


# ---------------------------------------------------------------- split


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def default_holdout(n_patients: int) -> tuple[int, int]:
    """(n_val, n_test) that scale with the dataset: 15 % and 25 % of the patients, at least 1 each.

    Rounded half up (81 patients -> 12 and 20; 10 -> 2 and 3; 3 -> 1 and 1). Where that would
    leave no patient to train on, validation gives way first, then test, never below 0:
    2 patients -> (0, 1) (one to train on, one to test on, nothing to calibrate on);
    1 patient -> (0, 0).
    """
    if n_patients < 1:
        raise ValueError("no patients to split")
    n_test = max(1, _round_half_up(TEST_FRACTION * n_patients))
    n_val = max(1, _round_half_up(VAL_FRACTION * n_patients))
    while n_val + n_test > n_patients - 1 and n_val > 0:
        n_val -= 1
    while n_val + n_test > n_patients - 1 and n_test > 0:
        n_test -= 1
    return n_val, n_test


def split_patients(patient_ids: list[str], n_val: int | None = None, n_test: int | None = None, seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """Seeded split by patient (never by slice), stratified by institution.

    ``n_val`` / ``n_test`` None: ``default_holdout`` (15 % / 25 % of the patients). Each
    institution's patients are shuffled and dealt round-robin in a global order, so every site
    contributes to test / val in proportion to its size (largest remainders).
    """
    if n_val is None or n_test is None:
        default_val, default_test = default_holdout(len(patient_ids))
        n_val = default_val if n_val is None else n_val
        n_test = default_test if n_test is None else n_test
    if n_val < 0 or n_test < 0:
        raise ValueError(f"validation and test patient counts must be 0 or more, got {n_val} and {n_test}")
    if n_val + n_test >= len(patient_ids):
        v, t = default_holdout(len(patient_ids)) if patient_ids else (0, 0)
        raise ValueError(
            f"cannot hold out {n_val} + {n_test} of {len(patient_ids)} patients (at least one must be left to train on); "
            f"leave --val / --test out to scale them with the dataset ({v} + {t} here)"
        )
    rng = random.Random(seed)
    by_site: dict[str, list[str]] = {}
    for pid in sorted(patient_ids):
        by_site.setdefault(institution_of(pid), []).append(pid)
    for ids in by_site.values():
        rng.shuffle(ids)
    # Interleave sites proportionally: patient k of a site with n patients gets key (k + 0.5) / n.
    order = sorted(((k + 0.5) / len(ids), rng.random(), pid) for ids in by_site.values() for k, pid in enumerate(ids))
    ranked = [pid for _, _, pid in order]
    test, val, train = ranked[:n_test], ranked[n_test : n_test + n_val], ranked[n_test + n_val :]
    return {"train": sorted(train), "val": sorted(val), "test": sorted(test)}


def read_split(path: os.PathLike | str) -> dict[str, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "split file not found (run `brainseg preprocess` or `brainseg split` first)")
    try:
        split = json.loads(path.read_text())
        return {k: list(split[k]) for k in ("train", "val", "test")}
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(path, f"not a split file ({exc})") from None


def dataset_stats(ds: Dataset) -> dict:
    """Counts and lesion sizes (pixels per positive slice) over the labelled slices."""
    lab = labelled(ds) if any(s.mask_path for p in ds.patients for s in p.slices) else None
    sizes, n_slices, n_pos = [], 0, 0
    per_site: dict[str, int] = {}
    if lab:
        for p in lab.patients:
            per_site[p.institution] = per_site.get(p.institution, 0) + 1
            for s in p.slices:
                m = read_mask(s.mask_path)
                n_slices += 1
                if m.any():
                    n_pos += 1
                    sizes.append(int(m.sum()))
    sizes_arr = np.asarray(sizes) if sizes else np.zeros(0)
    return {
        "root": ds.root,
        "patients": len(ds.patients),
        "slices": ds.n_slices,
        "labelled_slices": n_slices,
        "images_without_mask": len(ds.images_without_mask),
        "lesion_positive_slices": n_pos,
        "patients_per_institution": dict(sorted(per_site.items())),
        "lesion_area_px": {
            "median": float(np.median(sizes_arr)) if sizes else 0.0,
            "p10": float(np.percentile(sizes_arr, 10)) if sizes else 0.0,
            "p90": float(np.percentile(sizes_arr, 90)) if sizes else 0.0,
            "max": int(sizes_arr.max()) if sizes else 0,
        },
    }
