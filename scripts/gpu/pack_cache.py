"""Pack a training cache (train + val patients only) small enough to travel to a lent GPU machine.

Images (the slices and their skull-stripped copies) are stored as lossless WebP (about half the
bytes of the raw uint8 arrays; checked bit-exact while packing), masks as a compressed bool array.
``unpack`` rebuilds an ordinary cache folder that ``brainseg.training.cache.load_cache`` reads.

    python scripts/gpu/pack_cache.py pack runs/cache81 .gpu/cache.npz
    python scripts/gpu/pack_cache.py unpack .gpu/cache.npz /tmp/cache
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import cv2
import numpy as np

ARRAYS = ("images", "images_stripped")


def _encode(images, rows, name: str) -> tuple[np.ndarray, np.ndarray]:
    blobs = []
    for r in rows:
        ok, buf = cv2.imencode(".webp", np.asarray(images[r]), [cv2.IMWRITE_WEBP_QUALITY, 101])  # >100: lossless
        if not ok or not np.array_equal(cv2.imdecode(buf, cv2.IMREAD_UNCHANGED), images[r]):
            raise SystemExit(f"pack_cache: {name} row {r}: lossless WebP round trip failed")
        blobs.append(buf.tobytes())
    return np.frombuffer(b"".join(blobs), np.uint8), np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)


def pack(cache_dir: str, out: str) -> None:
    cache = Path(cache_dir)
    missing = [f for f in ("index.json", "split.json", "masks.npy", *(f"{a}.npy" for a in ARRAYS)) if not (cache / f).is_file()]
    if missing:
        raise SystemExit(f"pack_cache: {cache} is not a complete cache (missing {', '.join(missing)}); build it with python preprocess.py")
    index = json.loads((cache / "index.json").read_text())
    split = json.loads((cache / "split.json").read_text())
    keep = set(split["train"]) | set(split["val"])
    rows = [i for i, p in enumerate(index["patients"]) if p in keep]
    arrays = {}
    for name in ARRAYS:
        arrays[f"{name}_blob"], arrays[f"{name}_offsets"] = _encode(np.load(cache / f"{name}.npy", mmap_mode="r"), rows, name)
    masks = np.load(cache / "masks.npy", mmap_mode="r")
    meta = {**index, "patients": [index["patients"][r] for r in rows], "slices": [index["slices"][r] for r in rows], "split": split}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, masks=np.asarray(masks[rows]), meta=np.frombuffer(json.dumps(meta).encode(), np.uint8), **arrays)
    print(f"{out}: {len(rows)} slices of {len(keep)} patients, {Path(out).stat().st_size / 2**20:.1f} MiB")


def unpack(packed: str, out_dir: str) -> None:
    z = np.load(packed)
    meta = json.loads(z["meta"].tobytes())
    masks = z["masks"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in ARRAYS:
        blob, offsets = z[f"{name}_blob"], z[f"{name}_offsets"]
        n = len(offsets) - 1
        images = np.lib.format.open_memmap(out / f"{name}.npy", mode="w+", dtype=np.uint8, shape=(n, *masks.shape[1:], 3))
        for i in range(n):
            images[i] = cv2.imdecode(blob[offsets[i] : offsets[i + 1]], cv2.IMREAD_UNCHANGED)
        images.flush()
    np.save(out / "masks.npy", masks)
    split = meta.pop("split")
    (out / "index.json").write_text(json.dumps(meta))
    (out / "split.json").write_text(json.dumps(split))
    print(f"{out}: {len(masks)} slices")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("pack", help="CACHE -> OUT.npz (train + val patients)")
    a.add_argument("cache")
    a.add_argument("out")
    b = sub.add_parser("unpack", help="PACKED.npz -> a cache folder")
    b.add_argument("packed")
    b.add_argument("out")
    args = p.parse_args(argv)
    if args.command == "pack":
        pack(args.cache, args.out)
    else:
        unpack(args.packed, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
