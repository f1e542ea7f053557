"""Shared test helpers: where the real data is, and small synthetic datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
LGG = SHARED_DATA / "lgg" / "kaggle_3m"
BRATS = SHARED_DATA / "brats-met-example"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the project keeps it in ../shared/data)")
    return path


def synthetic_dataset(root: Path, patients: int = 4, slices: int = 6, size: int = 64, seed: int = 0, first: int = 0) -> Path:
    """kaggle_3m-style folders with bright blobs as lesions on every other slice.

    Patients are numbered from ``first`` (``TCGA_CS_0000_20000101``, ...), so two calls with
    different ``first`` give datasets with different patients.
    """
    rng = np.random.default_rng(seed)
    sites = ["CS", "DU", "HT", "FG"]
    for p in range(first, first + patients):
        pid = f"TCGA_{sites[p % len(sites)]}_{p:04d}_20000101"
        d = root / pid
        d.mkdir(parents=True)
        for i in range(1, slices + 1):
            img = rng.integers(20, 60, (size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            if i % 2:
                r, c = rng.integers(10, size - 20, 2)
                mask[r : r + 10, c : c + 10] = 255
                img[mask > 0] = 200
            tifffile.imwrite(d / f"{pid}_{i}.tif", img)
            tifffile.imwrite(d / f"{pid}_{i}_mask.tif", mask)
    return root
