"""The preprocessed training cache: memory-mapped arrays that training reads fast.

``CACHE/images.npy``  (N, S, S, 3) uint8, output of ``preprocessing.prepare``
``CACHE/masks.npy``   (N, S, S) bool, masks resized to S
``CACHE/index.json``  patient id and slice number of every row, the preprocessing config
``CACHE/split.json``  the patient split reused by every later command

The cache is built in a temporary folder and renamed into place, so an interrupted run
never leaves a half-written cache behind.
"""

from __future__ import annotations

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
from .data import DataError, Dataset, labelled, read_pair
from .preprocessing import prepare, resize_mask

log = logging.getLogger(__name__)


@dataclass
class Cache:
    images: np.ndarray  # (N, S, S, 3) uint8
    masks: np.ndarray  # (N, S, S) bool
    patients: list[str]  # length N
    slices: list[int]  # length N
    preprocess: PreprocessConfig
    root: str

    def rows(self, patient_ids) -> np.ndarray:
        """Row indices of the given patients, in cache order (slice order within a patient)."""
        wanted = set(patient_ids)
        return np.asarray([i for i, p in enumerate(self.patients) if p in wanted], dtype=np.int64)


def build_cache(ds: Dataset, cfg: PreprocessConfig, out: os.PathLike | str, progress: bool = True) -> Path:
    """Preprocess every labelled slice of ``ds`` into ``out`` (replaced atomically)."""
    out = Path(out)
    lab = labelled(ds)
    records = [s for p in lab.patients for s in p.slices]
    n, size = len(records), cfg.input_size
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        masks = np.lib.format.open_memmap(tmp / "masks.npy", mode="w+", dtype=np.bool_, shape=(n, size, size))
        for i, rec in enumerate(tqdm(records, desc="preprocess", unit="slice", disable=not progress)):
            image, mask = read_pair(rec.image_path, rec.mask_path)
            images[i] = prepare(image, cfg)
            masks[i] = resize_mask(mask, size)
        images.flush()
        masks.flush()
        del images, masks
        index = {
            "root": str(ds.root),
            "preprocess": asdict(cfg),
            "patients": [r.patient for r in records],
            "slices": [r.index for r in records],
        }
        (tmp / "index.json").write_text(json.dumps(index))
        # Keep an existing split (it belongs to the experiment, not to the arrays).
        if (out / "split.json").is_file():
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
        raise
    return out


def load_cache(path: os.PathLike | str) -> Cache:
    path = Path(path)
    index_file = path / "index.json"
    if not index_file.is_file():
        raise DataError(path, "no preprocessed cache here (run `python preprocess.py` / `brainseg preprocess` first)")
    index = json.loads(index_file.read_text())
    from .config import _build

    return Cache(
        images=np.load(path / "images.npy", mmap_mode="r"),
        masks=np.load(path / "masks.npy", mmap_mode="r"),
        patients=index["patients"],
        slices=index["slices"],
        preprocess=_build(PreprocessConfig, index["preprocess"]),
        root=index["root"],
    )
