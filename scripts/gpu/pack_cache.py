"""Pack a training cache (train + val patients only) small enough to travel to a lent GPU machine.

Images are stored as lossless WebP (about half the bytes of the raw uint8 arrays; checked
bit-exact on unpacking), masks as a compressed bool array. ``unpack`` rebuilds an ordinary
cache folder that ``brainseg.training.cache.load_cache`` reads.

    python scripts/gpu/pack_cache.py pack runs/cache81 .gpu/cache.npz
    python scripts/gpu/pack_cache.py unpack .gpu/cache.npz /tmp/cache
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import numpy as np


def pack(cache_dir: str, out: str) -> None:
    cache = Path(cache_dir)
    index = json.loads((cache / "index.json").read_text())
    split = json.loads((cache / "split.json").read_text())
    keep = set(split["train"]) | set(split["val"])
    rows = [i for i, p in enumerate(index["patients"]) if p in keep]
    images = np.load(cache / "images.npy", mmap_mode="r")
    masks = np.load(cache / "masks.npy", mmap_mode="r")
    blobs = []
    for r in rows:
        ok, buf = cv2.imencode(".webp", np.asarray(images[r]), [cv2.IMWRITE_WEBP_QUALITY, 101])  # >100: lossless
        if not ok or not np.array_equal(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), images[r]):
            raise SystemExit(f"row {r}: lossless WebP round trip failed")
        blobs.append(buf.tobytes())
    offsets = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
    meta = {**index, "patients": [index["patients"][r] for r in rows], "slices": [index["slices"][r] for r in rows], "split": split}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out,
        blob=np.frombuffer(b"".join(blobs), np.uint8),
        offsets=offsets,
        masks=np.asarray(masks[rows]),
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
    )
    print(f"{out}: {len(rows)} slices of {len(keep)} patients, {Path(out).stat().st_size / 2**20:.1f} MiB")


def unpack(packed: str, out_dir: str) -> None:
    z = np.load(packed)
    meta = json.loads(z["meta"].tobytes())
    blob, offsets, masks = z["blob"], z["offsets"], z["masks"]
    n = len(offsets) - 1
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8, shape=(n, *masks.shape[1:], 3))
    for i in range(n):
        images[i] = cv2.imdecode(blob[offsets[i] : offsets[i + 1]], cv2.IMREAD_UNCHANGED)
    images.flush()
    np.save(out / "masks.npy", masks)
    split = meta.pop("split")
    (out / "index.json").write_text(json.dumps(meta))
    (out / "split.json").write_text(json.dumps(split))
    print(f"{out}: {n} slices")


if __name__ == "__main__":
    {"pack": pack, "unpack": unpack}[sys.argv[1]](*sys.argv[2:])
