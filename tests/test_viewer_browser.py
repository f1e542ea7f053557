"""The page's viewer: ``GET /v1/results/{id}/viewer.npz`` (what the page draws from), and in a real browser
(uvicorn API + ``streamlit run`` + Debian Chromium through Playwright) the three views of a BraTS volume,
contour and zoom, a reference mask's Dice, two models side by side, and no API request from a display control.

Screenshots go to docs/ (app_viewer.png, app_reference.png, app_two_models.png).
"""

from __future__ import annotations

import gzip
import io
import re
import zipfile

import httpx
import numpy as np
import pytest
from conftest import REPO

CHROMIUM = "/usr/bin/chromium"
BRATS = "brats-met-example/BraTS-MET-00110-000-{}.nii.gz"
DOCS = REPO / "docs"


def small_volume() -> bytes:
    """A 5-slice NIfTI with a flipped, anisotropic affine (so the display affine is not the file's)."""
    import nibabel as nib

    from brainseg.synthetic import synthetic_slice

    img, _ = synthetic_slice(size=96)
    vol = np.stack([np.rot90(img[:, :, 1], -1).astype(np.float32) * (k > 0) for k in range(5)], axis=2)
    affine = np.array([[-1.2, 0, 0, 90], [0, 0.9, 0, -100], [0, 0, 5.0, 20], [0, 0, 0, 1]])
    return gzip.compress(nib.Nifti1Image(vol, affine).to_bytes())


def load_npz(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_viewer_npz_holds_what_the_slice_routes_render(api_server, tmp_path):
    import cv2
    import nibabel as nib

    from brainseg.review import heatmap
    from brainseg.volumes import load_volume

    nii = tmp_path / "small.nii.gz"
    nii.write_bytes(small_volume())
    with httpx.Client(base_url=api_server, timeout=120) as http:
        body = http.post("/v1/segment", files=[("files", ("small.nii.gz", nii.read_bytes(), "application/gzip"))]).json()
        r = http.get(body["urls"]["viewer"])
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        v = load_npz(r.content)
        mask = np.unpackbits(v["mask_bits"], axis=-1, count=v["display"].shape[2]).astype(bool)
        assert v["display"].dtype == np.uint8 and v["display"].shape == (*mask.shape, 3) and v["prob"].shape == mask.shape
        for z in range(mask.shape[0]):  # the same arrays the server renders its PNGs from
            png = cv2.imdecode(np.frombuffer(http.get(f"/v1/results/{body['id']}/mask.png?z={z}").content, np.uint8), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(png > 0, mask[z])
            heat = cv2.imdecode(np.frombuffer(http.get(f"/v1/results/{body['id']}/slice/{z}.png?view=probability").content, np.uint8), cv2.IMREAD_COLOR)
            np.testing.assert_array_equal(heat[..., ::-1], heatmap(v["prob"][z]))
        assert int(mask.sum()) == body["lesion_voxels"] and mask.any()
        np.testing.assert_allclose(v["spacing_mm"], body["input"]["spacing_mm"])
        np.testing.assert_allclose(v["affine"], load_volume([nii]).display_affine, atol=1e-9)
        ref = nib.load(nii)  # the display affine maps voxel (0, 0, 0) to a corner of the file's grid
        corners = {tuple(np.round(ref.affine @ [x, y, zz, 1], 6)[:3]) for x in (0, 95) for y in (0, 95) for zz in (0, 4)}
        assert tuple(np.round(v["affine"] @ [0, 0, 0, 1], 6)[:3]) in corners
        meta = zipfile.ZipFile(io.BytesIO(r.content)).read("meta.json")
        assert body["id"].encode() in meta
        assert http.get(f"/v1/results/{'0' * 32}/viewer.npz").status_code == 404
