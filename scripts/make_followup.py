"""Make a SYNTHETIC follow-up study from a real BraTS-format case, to test ``brainseg compare``.

NOT A REAL FOLLOW-UP SCAN. The patient's one real study is altered in two known ways:

1. **The lesion grows or shrinks** by ``--scale`` (linear; 1.3 = every diameter 30% longer) about the
   centroid of the reference label (``labels/<case>-fusion.nii.gz``, label > 0): a radial warp
   that magnifies (or shrinks) the ball holding the lesion and blends back to the untouched brain
   over ``BLEND_MM`` beyond it, applied to t1n, t2f, t1c (linear) and to the label (nearest), so
   the tumour keeps its own texture and the brain around it is pushed aside (or drawn in) smoothly.
2. **The head moves** rigidly: a rotation (``--rotate`` degrees about the world x, y, z axes through
   the volume's centre) and a shift (``--shift`` mm). It is written into the files' affine (the
   voxels are not resampled: no interpolation blur), as a scanner would record another position.

Written as a BraTS-format set with the same naming (``OUT/<name>/<name>-t1n.nii.gz``, ``-t2f``, ``-t1c``),
the warped label as ``OUT/<name>/labels/<name>-fusion.nii.gz`` and ``OUT/<name>/synthetic_followup.json``:
the applied transform (``world_transform``: a baseline world point (RAS mm) -> the follow-up's, what
``brainseg compare`` should recover), the scale and the reference lesion before and after.

    python scripts/make_followup.py ../shared/data/brats-format/TCGA-DU-7294 --out runs/followup --scale 1.3
    brainseg compare ../shared/data/brats-format/TCGA-DU-7294 runs/followup/TCGA-DU-7294-fu --out runs/compare

Outputs go under ``runs/`` (ignored by git) or any folder given; nothing generated is committed.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from brainseg.io.files import write_bytes_atomic, write_json_atomic

SEQUENCES = ("t1n", "t2f", "t1c")
BLEND_MM = 15.0  # the warp returns to the identity this far beyond the scaled lesion


def radial_map(shape: tuple[int, int, int], zooms: np.ndarray, centre: np.ndarray, r0: float, scale: float) -> tuple[tuple[slice, ...], np.ndarray]:
    """(box, source coordinates (3, ...) in voxels) of the warp inside the box around ``centre`` (voxels).

    A point at distance d (mm) from the centre takes its value from distance f(d) along the same ray: d / scale
    inside scale * r0 (the lesion, of radius r0, scaled), linear from r0 to r1 on [scale * r0, r1], d beyond
    r1 = max(r0, scale * r0) + ``BLEND_MM``; f is continuous and increasing, so nothing folds."""
    r1 = max(r0, scale * r0) + BLEND_MM
    reach = np.ceil(r1 / zooms).astype(int) + 1
    lo = np.maximum(np.floor(centre).astype(int) - reach, 0)
    hi = np.minimum(np.ceil(centre).astype(int) + reach + 1, shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=False))
    grid = np.stack(np.meshgrid(*[np.arange(a, b, dtype=np.float64) for a, b in zip(lo, hi, strict=False)], indexing="ij"))
    offset = (grid - centre[:, None, None, None]) * zooms[:, None, None, None]  # mm
    d = np.linalg.norm(offset, axis=0)
    inner = scale * r0
    src = np.where(d < inner, d / scale, np.where(d < r1, r0 + (d - inner) * (r1 - r0) / (r1 - inner), d))
    factor = np.where(d > 0, src / np.maximum(d, 1e-9), 1.0)
    return box, centre[:, None, None, None] + (offset * factor) / zooms[:, None, None, None]


def warp(arr: np.ndarray, box: tuple[slice, ...], coords: np.ndarray, order: int) -> np.ndarray:
    out = arr.copy()
    values = ndimage.map_coordinates(arr.astype(np.float32), coords, order=order, mode="nearest")
    out[box] = np.rint(values).astype(arr.dtype) if np.issubdtype(arr.dtype, np.integer) else values.astype(arr.dtype)
    return out


def rigid_world(rotate_deg: tuple[float, float, float], shift_mm: tuple[float, float, float], centre_mm: np.ndarray) -> np.ndarray:
    """4 x 4: rotation about the world x, y, z axes (extrinsic, in that order) through ``centre_mm``, then ``shift_mm``."""
    m = np.eye(4)
    r = Rotation.from_euler("xyz", rotate_deg, degrees=True).as_matrix()
    m[:3, :3] = r
    m[:3, 3] = centre_mm - r @ centre_mm + np.asarray(shift_mm, float)
    return m


def save_nifti(path: Path, data: np.ndarray, like, affine: np.ndarray) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(data, affine, header=like.header.copy())
    img.set_sform(affine, code=int(like.header["sform_code"]) or 1)
    img.set_qform(affine, code=int(like.header["qform_code"]) or 1)
    write_bytes_atomic(path, gzip.compress(img.to_bytes(), compresslevel=6))


def make_followup(case: Path, out: Path, labels: Path, name: str, scale: float, rotate_deg, shift_mm) -> dict:
    """Write the synthetic follow-up (module docstring) and return what ``synthetic_followup.json`` holds."""
    import nibabel as nib

    stem = case.name
    images = {s: nib.load(str(case / f"{stem}-{s}.nii.gz")) for s in SEQUENCES}
    ref = images["t2f"]
    label_img = nib.load(str(labels))
    label = np.asarray(label_img.dataobj)
    zooms = np.array(ref.header.get_zooms()[:3], float)
    lesion = np.argwhere(label > 0)
    if len(lesion) == 0:
        raise SystemExit(f"{labels}: no lesion (label > 0) to grow or shrink")
    centre = lesion.mean(axis=0)
    r0 = float(np.linalg.norm((lesion - centre) * zooms, axis=1).max())
    box, coords = radial_map(ref.shape[:3], zooms, centre, r0, scale)
    centre_mm = (ref.affine @ np.append((np.array(ref.shape[:3]) - 1) / 2.0, 1.0))[:3]
    moved = rigid_world(tuple(rotate_deg), tuple(shift_mm), centre_mm)
    affine = moved @ ref.affine
    folder = out / name
    for s, img in images.items():
        save_nifti(folder / f"{name}-{s}.nii.gz", warp(np.asarray(img.dataobj), box, coords, order=1), img, affine)
    new_label = warp(label, box, coords, order=0)
    save_nifti(folder / "labels" / f"{name}-fusion.nii.gz", new_label, label_img, affine)
    info = {
        "synthetic": True,
        "note": "SYNTHETIC follow-up made by scripts/make_followup.py from one real study: not a real second scan",
        "source": str(case),
        "lesion_scale": scale,
        "lesion_centre_voxel": [round(float(v), 2) for v in centre],
        "lesion_radius_mm": round(r0, 2),
        "reference_lesion_ml": {
            "baseline": round(float((label > 0).sum() * np.prod(zooms) / 1000), 3),
            "followup": round(float((new_label > 0).sum() * np.prod(zooms) / 1000), 3),
        },
        "rotation_deg_xyz": list(rotate_deg),
        "shift_mm": list(shift_mm),
        "centre_mm": [round(float(v), 3) for v in centre_mm],
        "world_transform": [[round(float(v), 8) for v in row] for row in moved],
        "world_transform_means": "a baseline world point (RAS mm, the NIfTI affine's) -> the same anatomy's point in the follow-up",
    }
    write_json_atomic(folder / "synthetic_followup.json", info)
    return info


def triple(text: str) -> tuple[float, float, float]:
    parts = [float(v) for v in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("give three numbers: x,y,z")
    return tuple(parts)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="a SYNTHETIC follow-up of a BraTS-format case (lesion scaled, head moved)")
    p.add_argument("case", type=Path, help="the case folder, e.g. ../shared/data/brats-format/TCGA-DU-7294")
    p.add_argument("--out", type=Path, default=Path("runs/followup"), help="output folder (default runs/followup, ignored by git)")
    p.add_argument("--labels", type=Path, default=None, help="the reference label (default: the case's ../labels/<case>-fusion.nii.gz)")
    p.add_argument("--name", default=None, help="the follow-up's name (default <case>-fu)")
    p.add_argument("--scale", type=float, default=1.3, help="linear lesion scale: > 1 grows, < 1 shrinks (default 1.3)")
    p.add_argument("--rotate", type=triple, default=(0.0, 0.0, 4.0), help="degrees about the world x,y,z axes (default 0,0,4)")
    p.add_argument("--shift", type=triple, default=(3.0, -4.0, 2.0), help="mm along the world x,y,z axes (default 3,-4,2)")
    args = p.parse_args(argv)
    if not 0.2 <= args.scale <= 3.0:
        p.error("--scale must be between 0.2 and 3")
    labels = args.labels or args.case.parent / "labels" / f"{args.case.name}-fusion.nii.gz"
    info = make_followup(args.case, args.out, labels, args.name or f"{args.case.name}-fu", args.scale, args.rotate, args.shift)
    print(json.dumps({k: info[k] for k in ("lesion_scale", "reference_lesion_ml", "rotation_deg_xyz", "shift_mm")}))
    print(f"wrote {args.out / (args.name or args.case.name + '-fu')} (SYNTHETIC follow-up)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
