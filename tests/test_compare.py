"""Follow-up comparison (``brainseg.evaluation.compare``, ``brainseg compare``, ``POST /v1/compare``, the Follow-up page).

- registration recovers a known rigid transform (5 degrees about one axis and a (3, -4, 2) mm shift,
  applied with SimpleITK to a real BraTS-format FLAIR at 2 mm) within 1 mm (mean displacement over the
  brain's voxels) and 1 degree; it is skipped for two volumes on one grid;
- RANO-BM categories from hand-made sums and lesion lists (CR, PR, SD, PD by the sum, PD by a new
  lesion, the 5 mm absolute rule, NE);
- lesion matching on drawn masks: overlap, centroid fallback, split, new, vanished;
- ``brainseg compare`` on a SYNTHETIC follow-up of a real case (``scripts/make_followup.py``: lesion
  grown 1.5x, head turned and shifted): PD, the transform recovered, files written;
- ``POST /v1/compare`` over HTTP (tiny test models: the contract, errors);
- the Follow-up page in Chromium with the shipped models (``browser``).
"""

from __future__ import annotations

import base64
import html
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, SHARED_DATA
from scipy import ndimage
from test_browser import browser, e2e_api, streamlit_url  # noqa: F401  (fixtures of the page test)

from brainseg.evaluation import compare as cmp

needs_sitk = pytest.mark.skipif(importlib.util.find_spec("SimpleITK") is None, reason="registration needs SimpleITK (pip install SimpleITK)")

CASE = SHARED_DATA / "brats-format" / "TCGA-DU-7294"


def brats_case() -> Path:
    if not (CASE / "TCGA-DU-7294-t2f.nii.gz").is_file():
        pytest.skip(f"real BraTS-format case not found at {CASE.resolve()} (the project keeps it in ../shared/data)")
    return CASE


def euler(angle_deg: float, shift_mm, centre):
    import SimpleITK as sitk

    t = sitk.Euler3DTransform()
    t.SetCenter(tuple(float(c) for c in centre))
    t.SetRotation(0.0, 0.0, float(np.radians(angle_deg)))
    t.SetTranslation(tuple(float(v) for v in shift_mm))
    return t


def mean_displacement_mm(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """Mean distance between where two 4 x 4 transforms take ``points`` (N, 3)."""
    h = np.c_[points, np.ones(len(points))]
    return float(np.linalg.norm((h @ a.T - h @ b.T)[:, :3], axis=1).mean())


def angle_between_deg(a: np.ndarray, b: np.ndarray) -> float:
    """The angle of the rotation taking one transform's rotation to the other's (from its rotation vector: exact near 0)."""
    from scipy.spatial.transform import Rotation

    return float(np.degrees(Rotation.from_matrix(a[:3, :3].T @ b[:3, :3]).magnitude()))


# ---------------------------------------------------------------- registration


@needs_sitk
def test_registration_recovers_a_known_rigid_transform():
    import nibabel as nib
    import SimpleITK as sitk

    img = nib.load(str(brats_case() / "TCGA-DU-7294-t2f.nii.gz"))
    flair = np.asarray(img.dataobj, np.float32)[::2, ::2, ::2]  # 2 mm: the grid registration works on anyway
    affine = img.affine @ np.diag([2.0, 2.0, 2.0, 1.0])
    fixed = cmp.sitk_image(np.transpose(flair, (2, 1, 0)), affine[:, [2, 1, 0, 3]])
    centre = fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in fixed.GetSize()])
    truth = euler(5.0, (3.0, -4.0, 2.0), centre)
    moving = sitk.Resample(fixed, fixed, truth.GetInverse(), sitk.sitkLinear, 0.0)  # the anatomy at p moves to truth(p)
    found, metric = cmp.register_rigid(fixed, moving)
    got, _ = cmp.transform_matrix(found)
    want, _ = cmp.transform_matrix(truth)
    brain = np.argwhere(sitk.GetArrayFromImage(fixed) > 0)[:, ::-1]
    points = np.array([fixed.TransformIndexToPhysicalPoint([int(i) for i in idx]) for idx in brain[::7]])
    assert mean_displacement_mm(got, want, points) < 1.0
    assert angle_between_deg(got, want) < 1.0
    assert abs(cmp.Registration(True, "", got).rotation_deg - 5.0) < 1.0
    assert metric < -0.3  # Mattes MI of a well-aligned pair (negative)


def _volume(tmp_path: Path, name: str, arr: np.ndarray, affine: np.ndarray):
    from helpers import nifti

    from brainseg.io.volumes import load_volume

    path = tmp_path / f"{name}.nii.gz"
    path.write_bytes(nifti(arr, affine))
    return load_volume([path])


def test_registration_skipped_for_the_same_grid(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(1, 200, (24, 20, 8)).astype(np.int16)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    a, b = _volume(tmp_path, "a", arr, affine), _volume(tmp_path, "b", arr[::-1].copy(), affine)
    reg = cmp.register_volumes(a, b)
    assert not reg.applied and "same voxel grid and affine" in reg.reason
    assert np.array_equal(reg.matrix, np.eye(4))
    shifted = affine.copy()
    shifted[0, 3] = 5.0
    assert cmp.skip_reason(a, _volume(tmp_path, "c", arr, shifted)) is None
    assert not cmp.register_volumes(a, _volume(tmp_path, "c", arr, shifted), register=False).applied


# ---------------------------------------------------------------- the RANO-BM category


@pytest.mark.parametrize(
    ("base", "follow", "targets", "new_measurable", "new_any", "want"),
    [
        (40.0, 0.0, 2, 0, 0, "CR"),  # every target gone
        (40.0, 0.0, 2, 0, 1, "PR"),  # gone, but a new (small) lesion: not CR; down 100%
        (40.0, 28.0, 2, 0, 0, "PR"),  # -30.0% exactly
        (40.0, 28.4, 2, 0, 0, "SD"),  # -29%
        (40.0, 48.0, 2, 0, 0, "PD"),  # +20% and +8 mm
        (40.0, 47.6, 2, 0, 0, "SD"),  # +19%
        (20.0, 24.5, 1, 0, 0, "SD"),  # +22.5% but only +4.5 mm: the 5 mm rule
        (20.0, 25.0, 1, 0, 0, "PD"),  # +25% and +5 mm
        (40.0, 20.0, 2, 1, 1, "PD"),  # smaller, but a new measurable lesion
        (None, None, 0, 0, 0, "NE"),  # nothing measurable at baseline
        (None, None, 0, 1, 1, "PD"),  # ... but a new measurable lesion
    ],
)
def test_response_category_rules(base, follow, targets, new_measurable, new_any, want):
    got, reason = cmp.response_category(base, follow, targets, new_measurable, new_any)
    assert got == want, reason


def _row(i: int, diameter: float, volume_ml: float = 1.0) -> dict:
    return {"id": i, "longest_diameter_mm": diameter, "measurable": diameter >= 10.0, "volume_ml": volume_ml}


def test_rano_response_follows_the_baseline_targets():
    base = [_row(1, 30.0), _row(2, 20.0), _row(3, 6.0)]  # 3 is not measurable: no target
    follow = [_row(1, 38.0), _row(2, 20.0), _row(3, 30.0), _row(4, 8.0)]
    matched = {
        "matches": [
            {"baseline_ids": [1], "followup_ids": [1]},
            {"baseline_ids": [2], "followup_ids": [2]},
            {"baseline_ids": [3], "followup_ids": [3]},  # a non-target that grew: not in the sum
        ],
        "new_ids": [4],  # new but 8 mm: not measurable
        "vanished_ids": [],
    }
    r = cmp.rano_response(base, follow, matched)
    assert r["baseline_target_ids"] == [1, 2] and r["followup_target_ids"] == [1, 2]
    assert (r["baseline_sum_mm"], r["followup_sum_mm"], r["change_mm"]) == (50.0, 58.0, 8.0)
    assert r["category"] == "SD" and r["new_measurable_ids"] == []  # +16%
    follow[3] = _row(4, 12.0)
    assert cmp.rano_response(base, follow, matched)["category"] == "PD"
    split = {"matches": [{"baseline_ids": [1], "followup_ids": [5, 6]}, {"baseline_ids": [2], "followup_ids": []}], "new_ids": [], "vanished_ids": [2]}
    r = cmp.rano_response(base, [_row(5, 9.0), _row(6, 4.0)], split)
    assert r["followup_sum_mm"] == 13.0 and r["category"] == "PR"  # fragments summed: 50 -> 13 mm


# ---------------------------------------------------------------- matching on drawn masks


def test_matching_overlap_centroid_split_new_and_vanished(tmp_path):
    vol = _volume(tmp_path, "grid", np.ones((80, 80, 12), np.int16), np.eye(4))  # 1 mm voxels
    z, h, w = vol.slices.shape[:3]
    base, follow = np.zeros((z, h, w), bool), np.zeros((z, h, w), bool)
    base[2:8, 10:30, 10:30] = True  # A (largest): grows
    follow[2:9, 8:32, 8:32] = True
    base[2:6, 50:56, 10:16] = True  # B: moved 8 mm without overlap -> matched by centroid
    follow[2:6, 50:56, 18:24] = True
    base[2:6, 60:75, 50:75] = True  # C: split in two
    follow[2:6, 60:75, 50:58] = follow[2:6, 60:75, 66:75] = True
    base[8:10, 40:44, 60:64] = True  # D: vanished
    follow[6:10, 30:45, 40:55] = True  # E: new, 15 mm across (measurable)
    bl, brows = cmp.lesions_of(base, vol)
    fl, frows = cmp.lesions_of(follow, vol)
    assert [r["id"] for r in brows] == sorted(np.unique(bl[bl > 0]).tolist())
    for r in brows:  # the label image carries each row's id on that row's voxels
        assert (bl == r["id"]).sum() == r["voxels"]
    m = cmp.match_lesions(bl, brows, fl, frows, vol.display_affine)
    id_at = {name: int(lab[tuple(p)]) for name, lab, p in (("A", bl, (3, 20, 20)), ("B", bl, (3, 52, 12)), ("C", bl, (3, 65, 60)), ("D", bl, (8, 41, 61)))}
    fid_at = {name: int(fl[tuple(p)]) for name, p in (("A", (3, 20, 20)), ("B", (3, 52, 20)), ("C1", (3, 65, 52)), ("C2", (3, 65, 70)), ("E", (7, 35, 45)))}
    by_base = {tuple(x["baseline_ids"]): x for x in m["matches"]}
    assert by_base[(id_at["A"],)]["followup_ids"] == [fid_at["A"]] and by_base[(id_at["A"],)]["matched_by"] == ["overlap"]
    assert by_base[(id_at["A"],)]["volume_change_ml"] == pytest.approx((7 * 24 * 24 - 6 * 20 * 20) / 1000, abs=1e-6)
    assert by_base[(id_at["B"],)]["followup_ids"] == [fid_at["B"]] and by_base[(id_at["B"],)]["matched_by"] == ["centroid"]
    assert by_base[(id_at["C"],)]["kind"] == "split" and by_base[(id_at["C"],)]["followup_ids"] == sorted([fid_at["C1"], fid_at["C2"]])
    assert m["vanished_ids"] == [id_at["D"]] and m["new_ids"] == [fid_at["E"]]
    far = cmp.match_lesions(bl, brows, fl, frows, vol.display_affine, tolerance_mm=5.0)  # B's 8 mm shift is beyond 5 mm
    assert id_at["B"] in far["vanished_ids"] and fid_at["B"] in far["new_ids"]


# ---------------------------------------------------------------- brainseg compare on a synthetic follow-up of a real case


@pytest.fixture(scope="module")
def followup_case(tmp_path_factory) -> tuple[Path, dict]:
    """A SYNTHETIC follow-up of TCGA-DU-7294: lesion grown 1.5x (linear), head turned 4 degrees about z and shifted (3, -4, 2) mm."""
    case = brats_case()
    out = tmp_path_factory.mktemp("followup")
    cmd = [sys.executable, str(REPO / "scripts" / "make_followup.py"), str(case), "--out", str(out), "--scale", "1.5", "--rotate", "0,0,4", "--shift", "3,-4,2"]
    subprocess.run(cmd, check=True, cwd=REPO, capture_output=True)
    folder = out / "TCGA-DU-7294-fu"
    return folder, json.loads((folder / "synthetic_followup.json").read_text())


def test_make_followup_is_what_its_json_says(followup_case):
    import nibabel as nib

    folder, info = followup_case
    assert info["synthetic"] and sorted(p.name for p in folder.glob("*.nii.gz")) == [f"TCGA-DU-7294-fu-{s}.nii.gz" for s in ("t1c", "t1n", "t2f")]
    base, fu = nib.load(str(CASE / "TCGA-DU-7294-t2f.nii.gz")), nib.load(str(folder / "TCGA-DU-7294-fu-t2f.nii.gz"))
    assert np.allclose(fu.affine, np.array(info["world_transform"]) @ base.affine, atol=1e-4)
    ratio = info["reference_lesion_ml"]["followup"] / info["reference_lesion_ml"]["baseline"]
    assert ratio == pytest.approx(1.5**3, rel=0.05)  # the label scaled 1.5x in each direction


@needs_sitk
def test_cli_compare_on_a_synthetic_followup(followup_case, tmp_path, capsys):
    from brainseg.cli import main

    folder, info = followup_case
    out = tmp_path / "cmp"
    assert main(["compare", str(CASE), str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for words in ("baseline: segmenting", "follow-up: segmenting", "registration:", "response: PD", "not a diagnosis"):
        assert words in printed
    body = json.loads((out / "compare.json").read_text())
    reg = body["registration"]
    assert reg["applied"]
    truth, got = np.array(info["world_transform"]), np.array(reg["matrix"])
    import nibabel as nib

    ref = nib.load(str(CASE / "TCGA-DU-7294-t2f.nii.gz"))
    brain = np.argwhere(np.asarray(ref.dataobj)[::4, ::4, ::4] > 0) * 4
    points = (np.c_[brain, np.ones(len(brain))] @ ref.affine.T)[:, :3]
    assert mean_displacement_mm(got, truth, points) < 1.0 and angle_between_deg(got, truth) < 1.0
    r = body["response"]
    assert r["category"] == "PD" and r["baseline_target_ids"]
    assert r["followup_sum_mm"] > 1.2 * r["baseline_sum_mm"]  # grown 1.5x; the model's mask need not follow exactly
    assert not body["new_lesion_ids"] and not body["vanished_lesion_ids"]
    big = body["matches"][0]
    assert big["volume_change_pct"] > 100  # 1.5^3 = 3.4x the reference lesion
    assert body["disclaimer"] == cmp.DISCLAIMER
    mask = nib.load(str(out / "followup_mask_on_baseline.nii.gz"))
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
    lesion_ml = float(np.asarray(mask.dataobj).astype(bool).sum()) / 1000  # 1 mm voxels
    assert lesion_ml == pytest.approx(sum(x["volume_ml"] for x in body["followup"]["lesions"]), rel=1e-3)
    import cv2

    png = cv2.imread(str(out / "compare.png"))
    assert png is not None and png.shape[1] > 2 * 240
    page = (out / "compare_report.html").read_text()
    for words in ("RANO-BM: PD (progressive disease)", f"baseline {r['baseline_sum_mm']:.1f} mm", html.escape(cmp.DISCLAIMER), "data:image/png;base64,"):
        assert words in page, words
    assert f"{big['baseline_ids'][0]} &rarr; {big['followup_ids'][0]}" in page and "<script" not in page


def test_cli_compare_refuses_a_slice(tmp_path, capsys):
    from brainseg.cli import main
    from brainseg.io.synthetic import synthetic_png

    (tmp_path / "s.png").write_bytes(synthetic_png(size=64))
    assert main(["compare", str(tmp_path / "s.png"), str(tmp_path / "s.png"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "s.png" in err[0] and "cannot be followed up" in err[0]


# ---------------------------------------------------------------- POST /v1/compare


def phantom(shape=(48, 48, 24)) -> np.ndarray:
    """A head-like volume with asymmetric inner structures, a smooth texture and one bright blob (what the tiny test models mark)."""
    z, y, x = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape[::-1]], indexing="ij")
    cx, cy, cz = (shape[0] - 1) / 2, (shape[1] - 1) / 2, (shape[2] - 1) / 2
    head = ((x - cx) / 20) ** 2 + ((y - cy) / 17) ** 2 + ((z - cz) / 10) ** 2 < 1
    vol = np.where(head, 80.0, 0.0)
    vol += 40.0 * ((((x - 14) / 5) ** 2 + ((y - 30) / 8) ** 2 + ((z - 10) / 4) ** 2) < 1)
    vol -= 30.0 * ((((x - 32) / 4) ** 2 + ((y - 16) / 3) ** 2 + ((z - 14) / 5) ** 2) < 1)
    vol += 150.0 * ((((x - 30) / 4) ** 2 + ((y - 30) / 4) ** 2 + ((z - 12) / 3) ** 2) < 1)
    texture = ndimage.gaussian_filter(np.random.default_rng(3).normal(size=vol.shape).astype(np.float32), 1.5)  # what MI locks on to
    vol = np.where(head, vol + 60.0 * texture / texture.std(), 0.0).clip(0, None)
    return np.transpose(vol, (2, 1, 0)).astype(np.int16)  # (X, Y, Z)


def test_api_compare_contract(api_server):
    import httpx
    from helpers import nifti

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    vol = nifti(phantom(), affine)
    files = [("baseline", ("base.nii.gz", vol)), ("followup", ("fu.nii.gz", vol))]
    r = httpx.post(api_server + "/v1/compare", files=files, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["disclaimer"] == cmp.DISCLAIMER and "not a diagnosis" in body["disclaimer"]
    assert not body["registration"]["applied"] and "same voxel grid" in body["registration"]["reason"]
    assert body["baseline"]["files"] == ["base.nii.gz"] and body["followup"]["files"] == ["fu.nii.gz"]
    assert body["baseline"]["lesions"] == body["followup"]["lesions"] or body["baseline"]["lesion_count"] == body["followup"]["lesion_count"]
    assert not body["new_lesion_ids"] and not body["vanished_lesion_ids"]  # one study twice
    assert all(m["kind"] == "same" and m["diameter_change_mm"] == 0 for m in body["matches"])
    assert body["response"]["category"] == ("SD" if body["response"]["baseline_target_ids"] else "NE")
    png = base64.b64decode(body["picture_png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert body["model"]["name"] == "attention_unet"
    page = body["report_html"]
    assert f"RANO-BM: {body['response']['category']} ({body['response']['category_name']})" in page and html.escape(cmp.DISCLAIMER) in page
    assert body["model"]["version"] in page
    assert f"{body['baseline']['name']} &rarr; {body['followup']['name']}" in page, (body["baseline"]["name"], body["followup"]["name"])


@needs_sitk
def test_api_compare_registers_a_moved_study(api_server):
    import httpx
    from helpers import nifti

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    centre = affine @ np.array([23.5, 23.5, 11.5, 1.0])
    moved = np.eye(4)
    c, s = np.cos(np.radians(6.0)), np.sin(np.radians(6.0))
    moved[:2, :2] = [[c, -s], [s, c]]
    moved[:3, 3] = centre[:3] - moved[:3, :3] @ centre[:3] + [4.0, -2.0, 2.0]
    files = [("baseline", ("b.nii.gz", nifti(phantom(), affine))), ("followup", ("f.nii.gz", nifti(phantom(), moved @ affine)))]
    r = httpx.post(api_server + "/v1/compare", files=files, data={"threshold": "0.5"}, timeout=120)
    assert r.status_code == 200, r.text
    reg = r.json()["registration"]
    assert reg["applied"] and angle_between_deg(np.array(reg["matrix"]), moved) < 1.0
    head = np.argwhere(phantom() > 0)[::5]
    points = (np.c_[head, np.ones(len(head))] @ affine.T)[:, :3]
    assert mean_displacement_mm(np.array(reg["matrix"]), moved, points) < 1.0


def test_api_compare_errors(api_server):
    import httpx
    from helpers import nifti

    from brainseg.io.synthetic import synthetic_png

    vol = nifti(phantom(), np.diag([2.0, 2.0, 2.0, 1.0]))
    url = api_server + "/v1/compare"
    cases = [
        ([("baseline", ("s.png", synthetic_png(size=64))), ("followup", ("f.nii.gz", vol))], {}, 422, "baseline: a single slice"),
        ([("baseline", ("b.nii.gz", vol)), ("followup", ("f.nii.gz", b"not a nifti"))], {}, None, "followup:"),
        ([("baseline", ("b.nii.gz", vol))], {}, 422, "followup"),
        ([("baseline", ("b.nii.gz", vol)), ("followup", ("f.nii.gz", vol))], {"register": "maybe"}, 422, "register must be true or false"),
        ([("baseline", ("b.nii.gz", vol)), ("followup", ("f.nii.gz", vol))], {"colour": "red"}, 422, "unknown form field"),
        ([("baseline", ("b.nii.gz", vol)), ("followup", ("f.nii.gz", vol))], {"model": "nope"}, 422, "unknown model"),
    ]
    for files, data, status, words in cases:
        r = httpx.post(url, files=files, data=data, timeout=60)
        assert 400 <= r.status_code < 500 and (status is None or r.status_code == status), (words, r.status_code, r.text)
        assert words in r.json()["detail"], r.text


# ---------------------------------------------------------------- the Follow-up page in a browser


@pytest.mark.browser
@needs_sitk
def test_followup_page_in_chromium(followup_case, streamlit_url, browser):  # noqa: F811  (the fixtures imported above)
    """The page (``pages/1_Follow-up.py``) with the shipped models: both studies uploaded, Compare, the category, the
    sums, the lesion table, the picture and the disclaimer; screenshot ``artifacts/screenshots/app_compare.png``."""
    from test_browser import SHOTS, TIMEOUT_MS, wait_for_images

    folder, _ = followup_case
    page = browser.new_page(viewport={"width": 1500, "height": 2000})  # Streamlit scrolls inside its own container: all of it in view
    page.set_default_timeout(TIMEOUT_MS)
    try:
        page.goto(streamlit_url + "/Follow-up", wait_until="domcontentloaded")
        page.get_by_text("Follow-up comparison").first.wait_for()
        inputs = page.locator("input[type=file]")
        inputs.nth(0).set_input_files([str(CASE / f"TCGA-DU-7294-{s}.nii.gz") for s in ("t1n", "t2f", "t1c")])
        inputs.nth(1).set_input_files([str(folder / f"TCGA-DU-7294-fu-{s}.nii.gz") for s in ("t1n", "t2f", "t1c")])
        page.get_by_role("button", name="Compare").click()
        page.get_by_text("RANO-BM response:").first.wait_for(timeout=600_000)
        wait_for_images(page, 1)
        page.locator('[data-testid="stDataFrame"]').first.wait_for(state="visible")
        page.wait_for_timeout(800)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "app_compare.png"), full_page=True)
        text = page.inner_text("body")
        for words in (
            "PD — progressive disease",
            "Baseline sum of target diameters",
            "Follow-up sum",
            "registered rigidly",
            "Decision support, not a diagnosis",
            "Lesions",
        ):
            assert words in text, f"{words!r} missing from the page"
        assert "Traceback" not in text and "refused" not in text
    finally:
        page.close()


def test_api_compare_has_the_segment_routes_key_and_rate_limit(tiny_model_dir, tmp_path):
    """The API key and BRAINSEG_RATE_PER_MIN apply to /v1/compare as to /v1/segment (one window for both)."""
    import httpx
    from conftest import start_api, stop

    url, proc, _ = start_api(tiny_model_dir, tmp_path / "uvicorn.log", BRAINSEG_API_KEY="k3y", BRAINSEG_RATE_PER_MIN="2")
    try:
        files = [("baseline", ("b.nii.gz", b"x")), ("followup", ("f.nii.gz", b"x"))]
        assert httpx.post(url + "/v1/compare", files=files, timeout=30).status_code == 401
        key = {"X-API-Key": "k3y"}
        first = httpx.post(url + "/v1/compare", files=files, headers=key, timeout=30)
        assert 400 <= first.status_code < 500 and first.status_code not in (401, 429), first.text  # counted all the same
        assert httpx.post(url + "/v1/segment", files={"files": ("s.png", b"x")}, headers=key, timeout=30).status_code != 429
        third = httpx.post(url + "/v1/compare", files=files, headers=key, timeout=30)
        assert third.status_code == 429 and "Retry-After" in third.headers, third.text
    finally:
        stop(proc)


def test_cli_without_simpleitk(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Without SimpleITK: two studies on one grid still compare (nothing to resample); a moved one is one line, exit 2."""
    from helpers import nifti

    from brainseg.cli import main

    def missing():
        raise cmp.RegistrationUnavailable("follow-up registration needs SimpleITK, which is not installed here")

    monkeypatch.setattr(cmp, "_sitk", missing)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    moved = affine.copy()
    moved[:3, 3] = [3.0, -4.0, 2.0]
    for name, a in (("b", affine), ("f", affine), ("m", moved)):
        (tmp_path / f"{name}.nii.gz").write_bytes(nifti(phantom(), a))
    args = ["--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "out")]
    assert main(["compare", str(tmp_path / "b.nii.gz"), str(tmp_path / "f.nii.gz"), *args]) == 0
    body = json.loads((tmp_path / "out" / "compare.json").read_text())
    assert not body["registration"]["applied"] and not body["new_lesion_ids"] and not body["vanished_lesion_ids"]
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "b.nii.gz"), str(tmp_path / "m.nii.gz"), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "SimpleITK" in err[0]


def test_lesion_ids_of_look_alike_components(tmp_path):
    """Two components of one size and one bounding box (interleaved in 3-D, never touching) each get their own row's id."""
    vol = _volume(tmp_path, "grid", np.ones((5, 5, 3), np.int16), np.eye(4))
    mask = np.zeros(vol.slices.shape[:3], bool)  # (3, 5, 5)
    mask[0, 0, :] = mask[1, 0, 0] = True  # A: a row on slice 0, up one column, a column on slice 2
    mask[2, :, 0] = True
    mask[0, 4, :] = mask[1, 4, 4] = True  # B: the same shape turned, 2 slices / 4 voxels away from A everywhere
    mask[2, :, 4] = True
    labels, rows = cmp.lesions_of(mask, vol)
    assert len(rows) == 2 and rows[0]["voxels"] == rows[1]["voxels"] == 11 and rows[0]["bbox"] == rows[1]["bbox"]
    assert sorted(np.unique(labels[labels > 0]).tolist()) == [1, 2]
    for r in rows:  # each id sits on the component its row's centroid describes
        centre = np.argwhere(labels == r["id"]).mean(axis=0)
        assert np.allclose(centre, r["centroid"], atol=0.05)


def test_registration_skipped_for_one_dicom_frame_of_reference(tmp_path):
    """Two DICOM studies in one FrameOfReferenceUID (here: one study read twice, through brainseg compare's reader)."""
    from dicom_series import write_brats_study

    example = SHARED_DATA / "brats-met-example"
    if not (example / "BraTS-MET-00110-000-t2f.nii.gz").is_file():
        pytest.skip(f"BraTS example not found at {example.resolve()}")
    study = write_brats_study(tmp_path, example)
    a, b = cmp.load_study(str(study["dicom"])), cmp.load_study(str(study["dicom"]))
    assert cmp._frame_of_reference(a) and cmp._frame_of_reference(a) == cmp._frame_of_reference(b)
    reg = cmp.register_volumes(a, b)
    assert not reg.applied and "FrameOfReferenceUID" in reg.reason
    assert cmp.skip_reason(a, cmp.load_study(str(study["nifti"]["t2f"]))) != reg.reason  # a NIfTI has no frame of reference
