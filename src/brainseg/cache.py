"""The preprocessed training cache: memory-mapped arrays that training reads fast.

``CACHE/images.npy``  (N, S, S, 3) uint8, output of ``preprocessing.prepare``
``CACHE/images_stripped.npy``  (N, S, S, 3) uint8, the same slices skull-stripped first
                      (``preprocessing.skull_strip``), for training on other hospitals' data
``CACHE/masks.npy``   (N, S, S) bool, masks resized to S
``CACHE/index.json``  patient id and slice number of every row, the preprocessing config,
                      and the fingerprint of the dataset it was built from
``CACHE/split.json``  the patient split reused by every later command

The cache is built in a temporary folder and renamed into place, so an interrupted run
never leaves a half-written cache behind. A folder without ``index.json`` or ``split.json``
(left by an older, failed run) counts as no cache. ``cache_matches`` says whether a cache
was built from this dataset with these settings (otherwise it is rebuilt).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .config import PreprocessConfig
from .data import DataError, Dataset, discover, labelled, read_pair, read_split, write_json_atomic
from .preprocessing import prepare, resize_mask, skull_strip

log = logging.getLogger(__name__)


@dataclass
class Cache:
    images: np.ndarray  # (N, S, S, 3) uint8
    images_stripped: np.ndarray  # (N, S, S, 3) uint8, skull-stripped before CLAHE
    masks: np.ndarray  # (N, S, S) bool
    patients: list[str]  # length N
    slices: list[int]  # length N
    preprocess: PreprocessConfig
    root: str

    def rows(self, patient_ids) -> np.ndarray:
        """Row indices of the given patients, in cache order (slice order within a patient)."""
        wanted = set(patient_ids)
        return np.asarray([i for i, p in enumerate(self.patients) if p in wanted], dtype=np.int64)


FINGERPRINT_VERSION = 1


def dataset_fingerprint(ds: Dataset) -> str:
    """SHA-256 over the resolved root and, for every labelled slice, the image and mask paths
    (relative to the root) with their sizes and modification times.

    Another folder, an added / removed / replaced slice or mask gives another fingerprint.
    """
    root = Path(ds.root)
    rows = []
    for p in labelled(ds).patients:
        for s in p.slices:
            img, msk = Path(s.image_path), Path(s.mask_path)
            si, sm = img.stat(), msk.stat()
            rows.append((os.path.relpath(img, root), os.path.relpath(msk, root), si.st_size, si.st_mtime_ns, sm.st_size, sm.st_mtime_ns))
    rows.sort()
    payload = json.dumps({"version": FINGERPRINT_VERSION, "root": str(root.resolve()), "slices": rows}, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def cache_complete(cache_dir: os.PathLike | str) -> bool:
    """True if the folder holds a whole cache: arrays, ``index.json`` and ``split.json``."""
    d = Path(cache_dir)
    return all((d / f).is_file() for f in ("index.json", "split.json", "images.npy", "images_stripped.npy", "masks.npy"))


def cache_matches(cache_dir: os.PathLike | str, ds_root: os.PathLike | str, preprocess_cfg: PreprocessConfig) -> bool:
    """Whether ``cache_dir`` is a complete cache built from the dataset at ``ds_root`` (same
    files, sizes and modification times) with ``preprocess_cfg``; False for an incomplete,
    unreadable or older cache (without a fingerprint), or a dataset folder that cannot be read.
    """
    from .config import _build

    if not cache_complete(cache_dir):
        return False
    try:
        index = json.loads((Path(cache_dir) / "index.json").read_text())
        if _build(PreprocessConfig, index["preprocess"]) != preprocess_cfg or not index.get("fingerprint"):
            return False
        return index["fingerprint"] == dataset_fingerprint(discover(ds_root))
    except (OSError, ValueError, KeyError, TypeError):  # DataError is a ValueError
        return False


def reusable_split(split_file: os.PathLike | str, patient_ids) -> dict | None:
    """The split in ``split_file`` if it exists, is readable and every patient it names is in
    ``patient_ids``; else None (a split made for another dataset is not reused)."""
    path = Path(split_file)
    if not path.is_file():
        return None
    try:
        split = read_split(path)
    except DataError as exc:
        log.warning("%s; a new split is made", exc)
        return None
    named = set(split["train"]) | set(split["val"]) | set(split["test"])
    unknown = sorted(named - set(patient_ids))
    if unknown:
        log.warning("%s names %d patients that are not in this dataset (e.g. %s): a new split is made", path, len(unknown), unknown[0])
        return None
    extra = set(patient_ids) - named
    if extra:
        log.warning("%s does not name %d patients of this dataset; they are left out of training, validation and test", path, len(extra))
    return {**json.loads(path.read_text()), **split}  # as written (with its seed), checked


def _created_dirs(path: Path) -> list[Path]:
    """Create ``path`` (and parents); return the folders that did not exist before, deepest first."""
    made, p = [], path
    while not p.exists():
        made.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    return made


def build_cache(ds: Dataset, cfg: PreprocessConfig, out: os.PathLike | str, progress: bool = True, split: dict | None = None) -> Path:
    """Preprocess every labelled slice of ``ds`` into ``out`` (replaced atomically).

    ``split`` is written as ``split.json`` into the same atomic step; without it, the old
    cache's ``split.json`` is kept if every patient it names is in ``ds``. A build that fails
    leaves neither a partial cache nor folders it created.
    """
    out = Path(out)
    lab = labelled(ds)
    records = [s for p in lab.patients for s in p.slices]
    n, size = len(records), cfg.input_size
    made = _created_dirs(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    except BaseException:
        _remove_empty(made)
        raise
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        stripped = np.lib.format.open_memmap(tmp / "images_stripped.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.bool_, shape=(n, size, size))
        for i, rec in enumerate(tqdm(records, desc="preprocess", unit="slice", disable=not progress)):
            image, mask = read_pair(rec.image_path, rec.mask_path)
            images[i] = prepare(image, cfg)
            stripped[i] = prepare(skull_strip(image), cfg)
            masks[i] = resize_mask(mask, size)
        for arr in (images, stripped, masks):
            arr.flush()
        del images, stripped, masks
        index = {
            "root": str(ds.root),
            "preprocess": asdict(cfg),
            "fingerprint": dataset_fingerprint(lab),
            "patients": [r.patient for r in records],
            "slices": [r.index for r in records],
        }
        (tmp / "index.json").write_text(json.dumps(index))
        if split is not None:
            write_json_atomic(tmp / "split.json", split)
        else:
            # Keep an existing split (it belongs to the experiment, not to the arrays), but
            # only if it was made for these patients.
            old_split = reusable_split(out / "split.json", [p.id for p in lab.patients])
            if old_split is not None:
                shutil.copy2(out / "split.json", tmp / "split.json")
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(made)
        raise
    return out


def _remove_empty(dirs: list[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            break


def load_cache(path: os.PathLike | str) -> Cache:
    path = Path(path)
    index_file = path / "index.json"
    if not index_file.is_file():
        raise DataError(path, "no preprocessed cache here (run `python preprocess.py` / `brainseg preprocess` first)")
    index = json.loads(index_file.read_text())
    from .config import _build

    return Cache(
        images=np.load(path / "images.npy", mmap_mode="r"),
        images_stripped=np.load(path / "images_stripped.npy", mmap_mode="r"),
        masks=np.load(path / "masks.npy", mmap_mode="r"),
        patients=index["patients"],
        slices=index["slices"],
        preprocess=_build(PreprocessConfig, index["preprocess"]),
        root=index["root"],
    )
