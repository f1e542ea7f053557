"""Per-lesion RANO-BM measurements (``brainseg.evaluation.measure``) against shapes whose diameters are known by hand.

Shapes are drawn by testing each pixel centre in mm, so a drawn length L is between L - 1 and L pixels of
centres; the outline (pixel squares through their edge midpoints) then measures within one pixel of L.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_client, nifti, segment, tiff

from brainseg.evaluation.measure import MEASURABLE_MIN_MM, diameters, measurable_min_mm, parse_pixel_spacing, plane_metric, rano_bm, spacing_metric
from brainseg.inference.predict import lesion_table


def centres_mm(shape: tuple[int, int], row_mm: float, col_mm: float, centre=None) -> tuple[np.ndarray, np.ndarray]:
    """(y, x) in mm of each pixel centre, relative to ``centre`` (row, col; default: the middle)."""
    r0, c0 = centre if centre is not None else ((shape[0] - 1) / 2 + 0.23, (shape[1] - 1) / 2 + 0.37)  # off the pixel grid
    r, c = np.mgrid[: shape[0], : shape[1]]
    return (r - r0) * row_mm, (c - c0) * col_mm


def rotated(y: np.ndarray, x: np.ndarray, degrees: float) -> tuple[np.ndarray, np.ndarray]:
    """(u, v): coordinates along an axis at ``degrees`` from the columns (towards the rows) and across it."""
    t = np.deg2rad(degrees)
    return x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)


def ellipse(shape, row_mm, col_mm, long_mm, short_mm, degrees=0.0, centre=None) -> np.ndarray:
    u, v = rotated(*centres_mm(shape, row_mm, col_mm, centre), degrees)
    return (u / (long_mm / 2)) ** 2 + (v / (short_mm / 2)) ** 2 <= 1.0


def rectangle(shape, row_mm, col_mm, long_mm, short_mm, degrees=0.0) -> np.ndarray:
    u, v = rotated(*centres_mm(shape, row_mm, col_mm), degrees)
    return (np.abs(u) <= long_mm / 2) & (np.abs(v) <= short_mm / 2)


def direction_deg(ends, row_mm: float, col_mm: float) -> float:
    """The angle (degrees, 0..180) of a segment given by two (row, col) points, in mm, from the column axis."""
    (r0, c0), (r1, c1) = np.asarray(ends)[:, -2:]
    return float(np.degrees(np.arctan2((r1 - r0) * row_mm, (c1 - c0) * col_mm)) % 180.0)


def angle_between(a: float, b: float) -> float:
    d = abs(a - b) % 180.0
    return min(d, 180.0 - d)


# ---------------------------------------------------------------- one slice, hand-computed shapes

ROW_MM, COL_MM = 0.5, 1.0  # anisotropic pixels: rows 0.5 mm apart, columns 1.0 mm


@pytest.mark.parametrize("degrees", [0.0, 35.0, 90.0, 128.0])
def test_ellipse_in_anisotropic_pixels_measures_its_axes(degrees):
    mask = ellipse((120, 64), ROW_MM, COL_MM, 30.0, 12.0, degrees)
    (row,) = lesion_table(mask, ROW_MM * COL_MM, metric=spacing_metric(ROW_MM, COL_MM))
    voxel = max(ROW_MM, COL_MM)
    assert row["longest_diameter_mm"] == pytest.approx(30.0, abs=voxel)
    assert row["perpendicular_diameter_mm"] == pytest.approx(12.0, abs=voxel)
    assert row["area_mm2"] == pytest.approx(np.pi * 15 * 6, rel=0.03)
    assert row["measurable"] is True
    # the long axis lies along the ellipse's axis (give or take the staircase at its tips: a pixel at the
    # edge of a flat tip may reach 2 mm off the axis); the perpendicular diameter across it
    long_dir = direction_deg(row["longest_diameter_ends"], ROW_MM, COL_MM)
    perp_dir = direction_deg(row["perpendicular_diameter_ends"], ROW_MM, COL_MM)
    assert angle_between(long_dir, degrees) < 8.0
    assert angle_between(perp_dir, long_dir + 90.0) < 1.0, "exactly 90 degrees (the end points are rounded to 0.1 pixel)"
    assert "longest_diameter_px" not in row


def test_ellipse_measured_in_pixels_would_be_wrong():
    """The same ellipse measured as if pixels were square (1 mm) is far off: the spacing is used, not assumed."""
    mask = ellipse((120, 64), ROW_MM, COL_MM, 30.0, 12.0, 90.0)  # long axis along the rows: 60 rows of 0.5 mm
    square = diameters(mask, spacing_metric(1.0, 1.0))
    assert square.longest == pytest.approx(60.0, abs=1.0)
    right = diameters(mask, spacing_metric(ROW_MM, COL_MM))
    assert right.longest == pytest.approx(30.0, abs=ROW_MM)


@pytest.mark.parametrize("degrees", [0.0, 30.0, 72.0])
def test_rotated_rectangle(degrees):
    """A 30 x 12 mm rectangle: its longest diameter is the diagonal, sqrt(30^2 + 12^2) = 32.31 mm; the longest chord
    perpendicular to a diagonal crosses the two long sides: 12 / cos(atan(12 / 30)) = 12 * 32.31 / 30 = 12.92 mm.
    The drawn width is 12 mm within a voxel, and the chord crosses it at 22 degrees (x 1.08), with the diagonal's
    direction itself off by up to a degree in pixels: the perpendicular is held to 1.5 voxels, the diagonal to one."""
    mask = rectangle((120, 80), ROW_MM, COL_MM, 30.0, 12.0, degrees)
    d = diameters(mask, spacing_metric(ROW_MM, COL_MM))
    diagonal = np.hypot(30.0, 12.0)
    assert d.longest == pytest.approx(diagonal, abs=COL_MM)
    assert d.perpendicular == pytest.approx(12.0 * diagonal / 30.0, abs=1.5 * COL_MM)
    diagonal_dirs = (degrees + np.degrees(np.arctan2(12, 30)), degrees - np.degrees(np.arctan2(12, 30)))
    got = direction_deg(d.longest_ends, ROW_MM, COL_MM)
    assert min(angle_between(got, a) for a in diagonal_dirs) < 3.0


def test_single_pixel_and_line():
    one = np.zeros((5, 5), bool)
    one[2, 2] = True
    d = diameters(one, spacing_metric(0.7, 0.7))
    assert d.longest == pytest.approx(0.7) and d.perpendicular == pytest.approx(0.7)
    line = np.zeros((5, 20), bool)
    line[2, 3:13] = True  # 10 pixels in a row
    d = diameters(line, spacing_metric(2.0, 1.5))
    assert d.longest == pytest.approx(15.0) and d.perpendicular == pytest.approx(2.0)


def test_plane_metric_follows_a_rotated_sheared_affine():
    """Row and column axes of any direction and length: the metric gives world distances."""
    rng = np.random.default_rng(3)
    affine = np.eye(4)
    affine[:3, :3] = rng.normal(size=(3, 3))
    m = plane_metric(affine)
    for _ in range(5):
        a, b = rng.normal(size=2), rng.normal(size=2)
        world = affine[:3, 1:3] @ (a - b)
        assert np.linalg.norm(m @ (a - b)) == pytest.approx(np.linalg.norm(world))


# ---------------------------------------------------------------- volumes: 3-D components, several lesions


def ellipsoid_volume(affine_zrc: np.ndarray, shape, centre_mm, axes_mm, degrees=0.0) -> np.ndarray:
    """An ellipsoid in world mm (axes along the in-plane rotated u, v and the slice normal) drawn in (Z, H, W) voxels."""
    z, r, c = np.mgrid[: shape[0], : shape[1], : shape[2]]
    world = np.tensordot(affine_zrc[:3, :3], np.stack([z, r, c]).astype(float), axes=1) + affine_zrc[:3, 3, None, None, None]
    x, y, s = (world[i] - centre_mm[i] for i in range(3))
    u, v = rotated(y, x, degrees)
    return (u / (axes_mm[0] / 2)) ** 2 + (v / (axes_mm[1] / 2)) ** 2 + (s / (axes_mm[2] / 2)) ** 2 <= 1.0


def zrc_affine(row_mm: float, col_mm: float, slice_mm: float) -> np.ndarray:
    """(slice, row, column) -> world: columns along x, rows along y, slices along z."""
    a = np.zeros((4, 4))
    a[0, 2], a[1, 1], a[2, 0], a[3, 3] = col_mm, row_mm, slice_mm, 1.0
    return a


def test_ellipsoid_in_a_volume_slice_range_volume_and_confidence():
    aff = zrc_affine(0.5, 1.0, 2.0)
    shape = (15, 100, 60)
    centre = (30.2, 25.1, 14.0)  # x, y, z mm: slice 7 is the middle
    mask = ellipsoid_volume(aff, shape, centre, (30.0, 12.0, 10.0), degrees=20.0)
    prob = np.where(mask, 0.8, 0.1).astype(np.float32)
    prob[7][mask[7]] = 1.0
    (row,) = lesion_table(mask, voxel_volume_mm3=1.0, metric=plane_metric(aff), prob=prob, slice_spacing_mm=2.0)
    assert row["longest_diameter_mm"] == pytest.approx(30.0, abs=1.0)
    assert row["perpendicular_diameter_mm"] == pytest.approx(12.0, abs=1.0)
    assert row["diameter_slice"] == 7
    assert row["slice_range"] == [5, 9]  # |z - 14 mm| <= 5 mm: slices at 10 ... 18 mm
    assert row["longest_diameter_ends"][0][0] == 7 and row["perpendicular_diameter_ends"][1][0] == 7
    assert row["volume_ml"] == pytest.approx(row["voxels"] * 1.0 / 1000, abs=1e-3)
    assert row["confidence"] == pytest.approx(float(prob[mask].mean()), abs=1e-3)
    assert row["measurable"] is True


def disc(shape, z, centre_rc, diameter_mm, row_mm=1.0, col_mm=1.0):
    m = np.zeros(shape, bool)
    m[z] = ellipse(shape[1:], row_mm, col_mm, diameter_mm, diameter_mm, centre=centre_rc)
    return m


def test_tta_disagreement_is_the_mean_difference_of_plain_and_flipped_inside_each_lesion():
    """A stand-in network whose answer ignores its input: logit 2 on the left half, -1 on the right.
    The flipped pass, flipped back, is high on the right: plain and flipped differ by
    sigmoid(2) - sigmoid(-1) everywhere, and the TTA mean is their average."""
    from brainseg.config import ExperimentConfig, PostprocessConfig, PreprocessConfig
    from brainseg.inference.backends import Segmenter
    from brainseg.inference.predict import segment_slice

    class HalfAndHalf:
        config = ExperimentConfig(preprocess=PreprocessConfig(input_size=32))

        def __call__(self, x):
            out = np.full((len(x), 1, 32, 32), -1.0, np.float32)
            out[..., :16] = 2.0
            return out

    seg = Segmenter(HalfAndHalf(), "half")
    image = np.zeros((32, 32, 3), np.uint8)
    sig = 1 / (1 + np.exp(-np.array([2.0, -1.0])))
    res = segment_slice(seg, image, PostprocessConfig(threshold=0.5, min_size=0), tta=True)
    assert np.allclose(res.prob, sig.mean(), atol=1e-5)  # 0.5 * (0.881 + 0.269) = 0.575: one lesion, the whole slice
    assert len(res.lesions) == 1 and res.lesions[0]["tta_disagreement"] == pytest.approx(sig[0] - sig[1], abs=1e-3)
    plain = segment_slice(seg, image, PostprocessConfig(threshold=0.5, min_size=0), tta=False)
    assert all("tta_disagreement" not in r for r in plain.lesions)  # no TTA, no disagreement


def test_two_lesions_ids_measurable_flags_and_sum_of_diameters():
    shape, aff = (6, 90, 90), zrc_affine(1.0, 1.0, 1.0)
    big = disc(shape, 2, (30.3, 30.4), 20.0) | disc(shape, 3, (30.3, 30.4), 16.0)
    small = disc(shape, 4, (70.2, 70.1), 8.0)
    rows = lesion_table(big | small, voxel_volume_mm3=1.0, metric=plane_metric(aff), slice_spacing_mm=1.0)
    assert [r["id"] for r in rows] == [1, 2]
    assert rows[0]["slice_range"] == [2, 3] and rows[1]["slice_range"] == [4, 4]
    assert rows[0]["longest_diameter_mm"] == pytest.approx(20.0, abs=1.0) and rows[0]["diameter_slice"] == 2
    assert rows[1]["longest_diameter_mm"] == pytest.approx(8.0, abs=1.0)
    assert [r["measurable"] for r in rows] == [True, False]
    rano = rano_bm(rows, slice_spacing_mm=1.0)
    assert rano["target_lesion_ids"] == [1] and rano["measurable_count"] == 1
    assert rano["sum_longest_diameters_mm"] == rows[0]["longest_diameter_mm"]


def test_at_most_five_targets_the_longest_first():
    shape = (1, 60, 400)
    sizes = [11.0, 25.0, 14.0, 30.0, 12.0, 18.0, 9.0]  # 6 measurable, one not
    mask = np.zeros(shape, bool)
    for i, d in enumerate(sizes):
        mask |= disc(shape, 0, (30.2, 25.3 + 55 * i), d)
    rows = lesion_table(mask, voxel_volume_mm3=1.0, metric=np.eye(2), slice_spacing_mm=1.0)
    rano = rano_bm(rows, slice_spacing_mm=1.0)
    by_id = {r["id"]: r for r in rows}
    assert rano["measurable_count"] == 6
    targets = [by_id[i]["longest_diameter_mm"] for i in rano["target_lesion_ids"]]
    assert targets == sorted(targets, reverse=True) and len(targets) == 5
    assert targets[-1] == pytest.approx(12.0, abs=1.0), "the 11 mm lesion is measurable but not among the 5 longest"
    assert rano["sum_longest_diameters_mm"] == pytest.approx(sum(targets), abs=0.01)
    assert rano["sum_longest_diameters_mm"] == pytest.approx(30 + 25 + 18 + 14 + 12, abs=5.0)


def test_thick_slices_need_twice_their_spacing():
    assert measurable_min_mm(1.0) == MEASURABLE_MIN_MM == measurable_min_mm(5.0)
    assert measurable_min_mm(6.0) == 12.0
    mask = disc((1, 40, 40), 0, (20.2, 20.1), 11.0)
    (thin,) = lesion_table(mask, voxel_volume_mm3=1.0, metric=np.eye(2), slice_spacing_mm=3.0)
    (thick,) = lesion_table(mask, voxel_volume_mm3=6.0, metric=np.eye(2), slice_spacing_mm=6.0)
    assert thin["measurable"] is True and thick["measurable"] is False


def test_without_spacing_diameters_are_in_pixels_and_nothing_is_measurable():
    mask = ellipse((60, 60), 1.0, 1.0, 30.0, 12.0)
    (row,) = lesion_table(mask)
    assert row["longest_diameter_px"] == pytest.approx(30.0, abs=1.0)
    assert row["perpendicular_diameter_px"] == pytest.approx(12.0, abs=1.0)
    assert row["longest_diameter_mm"] is None and row["measurable"] is None
    rano = rano_bm([row], spacing_known=False)
    assert rano["sum_longest_diameters_mm"] is None and rano["target_lesion_ids"] == [] and "pixel_spacing_mm" in rano["note"]


def test_parse_pixel_spacing():
    assert parse_pixel_spacing("0.5") == (0.5, 0.5)
    assert parse_pixel_spacing(" 0.5 , 0.8 ") == (0.5, 0.8)
    assert parse_pixel_spacing("0.5\\0.8") == (0.5, 0.8)
    assert parse_pixel_spacing("") is None and parse_pixel_spacing(None) is None
    for bad in ("0", "-1", "nan", "inf", "1,2,3", "a", "1e9", "0.5,"):
        with pytest.raises(ValueError):
            parse_pixel_spacing(bad)


# ---------------------------------------------------------------- through the API


@pytest.fixture
def mask_is_the_bright_region(monkeypatch):
    """The network replaced by 'bright is lesion' (probability 0.8 there), so the API's mask is the drawn shape."""
    from brainseg.inference.backends import Segmenter

    def probabilities(self, images, tta=False, batch_size=16, window=None, stacked=False, only=None, spread=None):
        picked = images if only is None else [images[i] for i in only]
        return [np.where(np.asarray(img).max(axis=-1) > 127, 0.8, 0.0).astype(np.float32) for img in picked]

    monkeypatch.setattr(Segmenter, "probabilities", probabilities)


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with make_client(tiny_model_dir) as c:
        yield c


def test_api_volume_with_anisotropic_affine(client, mask_is_the_bright_region):
    """A NIfTI file whose voxels are 0.5 x 1.0 x 2.0 mm (x, y, z), two lesions: an ellipsoid with in-plane axes of
    30 and 12 mm rotated by 25 degrees, and a 6 mm sphere-ish one."""
    affine = np.diag([0.5, 1.0, 2.0, 1.0])
    shape = (120, 64, 12)  # x, y, z
    i, j, k = np.mgrid[: shape[0], : shape[1], : shape[2]]
    x, y, z = i * 0.5, j * 1.0, k * 2.0
    u, v = rotated(y - 30.3, x - 30.2, 25.0)
    big = (u / 15) ** 2 + (v / 6) ** 2 + ((z - 10.0) / 5) ** 2 <= 1
    small = ((x - 50.1) / 3) ** 2 + ((y - 52.2) / 3) ** 2 + ((z - 12.0) / 3) ** 2 <= 1
    data = np.where(big | small, 1000.0, 0.0).astype(np.float32)
    data[10:110, 5:60, :] += 100.0  # a "brain" around them, dimmer than the lesions, so no slice is background
    r = segment(client, ("aniso.nii.gz", nifti(data, affine)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(body["input"]["spacing_mm"]) == [0.5, 1.0, 2.0]
    assert body["lesion_count"] == 2
    first, second = body["lesions"]
    assert first["id"] == 1 and second["id"] == 2
    assert first["longest_diameter_mm"] == pytest.approx(30.0, abs=1.0)
    assert first["perpendicular_diameter_mm"] == pytest.approx(12.0, abs=1.0)
    assert first["measurable"] is True and second["measurable"] is False
    assert second["longest_diameter_mm"] == pytest.approx(6.0, abs=1.0)
    assert first["slice_range"][1] - first["slice_range"][0] + 1 == int(((np.abs(np.arange(12) * 2.0 - 10.0)) <= 5).sum())
    assert first["volume_ml"] == pytest.approx(4 / 3 * np.pi * 15 * 6 * 5 / 1000, rel=0.1)
    assert first["confidence"] == pytest.approx(0.8, abs=1e-3)
    assert body["rano_bm"]["target_lesion_ids"] == [1]
    assert body["rano_bm"]["sum_longest_diameters_mm"] == first["longest_diameter_mm"]
    stored = client.get(f"/v1/results/{body['id']}").json()
    assert stored["lesions"][0]["longest_diameter_mm"] == first["longest_diameter_mm"]
    assert segment(client, ("aniso.nii.gz", nifti(data, affine)), pixel_spacing_mm="0.5").status_code == 422


def test_api_slice_with_and_without_pixel_spacing(client, mask_is_the_bright_region):
    img = np.zeros((120, 64), np.uint8)
    img[ellipse(img.shape, ROW_MM, COL_MM, 30.0, 12.0, 90.0)] = 255
    r = segment(client, ("e.tif", tiff(img)), pixel_spacing_mm=f"{ROW_MM},{COL_MM}")
    assert r.status_code == 200, r.text
    body = r.json()
    (les,) = body["lesions"]
    assert les["longest_diameter_mm"] == pytest.approx(30.0, abs=1.0) and les["perpendicular_diameter_mm"] == pytest.approx(12.0, abs=1.0)
    assert les["measurable"] is True and body["rano_bm"]["sum_longest_diameters_mm"] == les["longest_diameter_mm"]
    assert body["input"]["spacing_mm"] == [COL_MM, ROW_MM]
    assert body["lesion_area_mm2"] == pytest.approx(body["lesion_area_px"] * ROW_MM * COL_MM)
    body = segment(client, ("e.tif", tiff(img))).json()
    (les,) = body["lesions"]
    assert les["longest_diameter_px"] == pytest.approx(60.0, abs=1.0), "30 mm along rows of 0.5 mm: 60 pixels"
    assert les["longest_diameter_mm"] is None and les["measurable"] is None and body["rano_bm"]["sum_longest_diameters_mm"] is None
    for bad in ("0", "a,b", "1,2,3"):
        r = segment(client, ("e.tif", tiff(img)), pixel_spacing_mm=bad)
        assert r.status_code == 422 and "pixel_spacing_mm" in r.json()["detail"]


# ---------------------------------------------------------------- through brainseg predict (X_lesions.json)


def test_cli_predict_writes_measurements(tmp_path, tiny_model_dir, mask_is_the_bright_region, capsys):
    import json

    import nibabel as nib

    from brainseg.cli import main

    img = np.zeros((120, 64), np.uint8)
    img[ellipse(img.shape, ROW_MM, COL_MM, 30.0, 12.0, 90.0)] = 255
    (tmp_path / "e.tif").write_bytes(tiff(img))
    vol = np.zeros((64, 120, 6), np.float32)  # x, y, z with voxels 1.0 x 0.5 x 3.0 mm: the same ellipse along y
    vol[..., 2:4] = ellipse((64, 120), 1.0, 0.5, 12.0, 30.0)[..., None] * 1000.0
    vol[4:60, 4:116] += 50.0
    nib.save(nib.Nifti1Image(vol, np.diag([1.0, 0.5, 3.0, 1.0])), tmp_path / "v.nii.gz")
    common = ["--model-dir", str(tiny_model_dir)]
    assert main(["predict", str(tmp_path / "e.tif"), str(tmp_path / "v.nii.gz"), "--out", str(tmp_path / "mm"), "--pixel-spacing", "0.5,1", *common]) == 0
    assert main(["predict", str(tmp_path / "e.tif"), "--out", str(tmp_path / "px"), *common]) == 0
    mm = json.loads((tmp_path / "mm" / "e_lesions.json").read_text())
    (les,) = mm["lesions"]
    assert les["longest_diameter_mm"] == pytest.approx(30.0, abs=1.0) and les["measurable"] is True
    assert mm["rano_bm"]["target_lesion_ids"] == [1] and mm["lesion_area_mm2"] == pytest.approx(mm["lesion_area_px"] * 0.5)
    v = json.loads((tmp_path / "mm" / "v_lesions.json").read_text())
    (les,) = v["lesions"]
    assert les["longest_diameter_mm"] == pytest.approx(30.0, abs=1.0) and les["perpendicular_diameter_mm"] == pytest.approx(12.0, abs=1.0)
    assert les["slice_range"][1] - les["slice_range"][0] == 1 and les["volume_ml"] == pytest.approx(les["voxels"] * 1.5 / 1000, abs=1e-3)
    px = json.loads((tmp_path / "px" / "e_lesions.json").read_text())
    (les,) = px["lesions"]
    assert les["longest_diameter_px"] == pytest.approx(60.0, abs=1.0) and les["longest_diameter_mm"] is None
    with pytest.raises(SystemExit):
        main(["predict", str(tmp_path / "e.tif"), "--out", str(tmp_path / "x"), "--pixel-spacing", "-1", *common])
    assert "--pixel-spacing must be" in capsys.readouterr().err


# ---------------------------------------------------------------- on the page


def test_page_lesion_table_shows_diameters_in_pixels_then_mm(monkeypatch, api_server):
    """A slice upload: diameters in px and RANO-BM 'not assessed'; with a pixel spacing of 0.5 mm, the same diameters
    in mm (half the pixels: square pixels), measurable flags and the sum of the target lesions' longest diameters."""
    from test_streamlit import no_page_crash, run_app, texts

    from brainseg.io.synthetic import synthetic_png

    def lesion_table():
        (table,) = [d.value for d in at.dataframe if "Lesion" in d.value.columns]
        return table

    at = run_app(monkeypatch, api_server)
    at.file_uploader(key="uploads").upload("drawn.png", synthetic_png(), "image/png").run()
    no_page_crash(at)
    px = lesion_table()
    assert "Longest diameter (px)" in px.columns and "Longest diameter (mm)" not in px.columns
    assert set(px["Measurable (≥ 10 mm)"]) == {"n/a"}
    assert any("RANO-BM:** not assessed" in m for m in texts(at.markdown))
    at.text_input(key="pixel_spacing").set_value("0.5").run()
    no_page_crash(at)
    mm = lesion_table()
    assert list(mm["Longest diameter (mm)"]) == pytest.approx([v * 0.5 for v in px["Longest diameter (px)"]], abs=0.011)
    assert set(mm["Measurable (≥ 10 mm)"]) <= {"yes", "no"}
    assert any("sum of longest diameters" in m for m in texts(at.markdown))
    assert any(m.label == "Lesion area" and "mm²" in m.value for m in at.metric)
