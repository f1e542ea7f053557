"""Tests for brainseg.evaluation.metrics on small hand-checkable synthetic masks."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from brainseg.evaluation import metrics as M


def _square(shape: tuple[int, int], r0: int, c0: int, size: int) -> np.ndarray:
    """Boolean (H, W) mask with a size x size square whose top-left is (r0, c0)."""
    m = np.zeros(shape, dtype=bool)
    m[r0 : r0 + size, c0 : c0 + size] = True
    return m


# ---------------------------------------------------------------- module hygiene


def test_module_does_not_import_torch() -> None:
    # The server imports metrics and must stay torch-free.
    # Fresh interpreter so torch imported by other tests cannot mask it; the
    # package's parent dir goes on sys.path however pytest found it here.
    import subprocess
    from pathlib import Path

    src = str(Path(M.__file__).resolve().parents[1])
    code = f"import sys; sys.path.insert(0, {src!r}); import brainseg.evaluation.metrics; assert 'torch' not in sys.modules, 'metrics imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------- confusion / dice / iou


def test_confusion_counts() -> None:
    pred = np.array([[1, 1, 1, 0, 0]])
    truth = np.array([[0, 1, 1, 1, 0]])
    assert M.confusion(pred, truth) == (2, 1, 1, 1)
    assert all(type(v) is int for v in M.confusion(pred, truth))


def test_dice_both_empty_default_is_one() -> None:
    z = np.zeros((4, 4), dtype=bool)
    assert M.dice(z, z) == 1.0
    assert M.iou(z, z) == 1.0


def test_dice_both_empty_nan_when_requested() -> None:
    z = np.zeros((4, 4), dtype=bool)
    assert math.isnan(M.dice(z, z, empty_value=float("nan")))
    assert math.isnan(M.iou(z, z, empty_value=float("nan")))


def test_dice_empty_vs_nonempty_is_zero() -> None:
    z = np.zeros((4, 4), dtype=bool)
    m = _square((4, 4), 1, 1, 2)
    assert M.dice(z, m) == 0.0
    assert M.dice(m, z) == 0.0
    assert M.iou(m, z) == 0.0


def test_dice_identical_is_one() -> None:
    m = _square((6, 6), 1, 1, 3)
    assert M.dice(m, m) == 1.0
    assert M.iou(m, m) == 1.0


def test_dice_iou_partial_overlap() -> None:
    # tp=2, fp=1, fn=1 -> dice 4/6, iou 2/4
    pred = np.array([[1, 1, 1, 0]], dtype=np.uint8)
    truth = np.array([[0, 1, 1, 1]], dtype=np.uint8)
    assert M.dice(pred, truth) == pytest.approx(2 / 3)
    assert M.iou(pred, truth) == pytest.approx(0.5)


def test_dice_partial_overlap_squares() -> None:
    # 4x4 squares shifted by one column: overlap 4x3 = 12 -> 24/32
    a = _square((8, 8), 1, 1, 4)
    b = _square((8, 8), 1, 2, 4)
    assert M.dice(a, b) == pytest.approx(0.75)
    assert M.iou(a, b) == pytest.approx(12 / 20)


def test_dice_3d() -> None:
    a = np.zeros((3, 4, 4), dtype=bool)
    b = np.zeros((3, 4, 4), dtype=bool)
    a[0:2, 1, 1] = True  # 2 voxels
    b[1:3, 1, 1] = True  # 2 voxels, 1 shared
    assert M.dice(a, b) == pytest.approx(0.5)


@pytest.mark.parametrize("fn", [M.confusion, M.dice, M.iou, M.hd95, M.match_lesions])
def test_shape_mismatch_raises_with_both_shapes(fn) -> None:
    a = np.zeros((4, 5), dtype=bool)
    b = np.zeros((5, 4), dtype=bool)
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(5, 4\)"):
        fn(a, b)


def test_non_binary_values_raise() -> None:
    probs = np.full((3, 3), 0.7)
    with pytest.raises(ValueError, match="0/1"):
        M.dice(probs, np.zeros((3, 3)))
    with pytest.raises(ValueError, match="0/1"):
        M.connected_components(np.array([[0, 2]]))


# ---------------------------------------------------------------- hd95


def test_hd95_identical_is_zero() -> None:
    m = _square((20, 20), 5, 5, 5)
    assert M.hd95(m, m) == 0.0


def test_hd95_both_empty_is_zero() -> None:
    z = np.zeros((10, 10), dtype=bool)
    assert M.hd95(z, z) == 0.0


def test_hd95_one_empty_is_nan() -> None:
    z = np.zeros((10, 10), dtype=bool)
    m = _square((10, 10), 2, 2, 3)
    assert math.isnan(M.hd95(z, m))
    assert math.isnan(M.hd95(m, z))


def test_hd95_shifted_square() -> None:
    # Top edge of one square is 3 px from the nearest surface of the other and
    # the whole top edge (5 of 16 surface pixels) sits at that distance, so the
    # 95th percentile is exactly 3.
    a = _square((20, 20), 5, 5, 5)
    b = _square((20, 20), 8, 5, 5)
    assert M.hd95(a, b) == pytest.approx(3.0)
    assert M.hd95(b, a) == pytest.approx(3.0)


def test_hd95_spacing_scales_shift_axis() -> None:
    a = _square((20, 20), 5, 5, 5)
    b = _square((20, 20), 8, 5, 5)
    # shift is along axis 0: 2 units per row -> 6
    assert M.hd95(a, b, spacing=(2.0, 1.0)) == pytest.approx(6.0)
    # spacing along the other axis does not change it
    assert M.hd95(a, b, spacing=(1.0, 2.0)) == pytest.approx(3.0)


def test_hd95_is_max_of_directed_percentiles_not_pooled() -> None:
    # truth: one pixel. pred: that pixel + one 10 px away.
    # directed pred->truth: [0, 10] -> p95 = 9.5; truth->pred: [0] -> 0.
    # The pooled set [0, 0, 10] would give 9.0 instead.
    truth = np.zeros((11, 21), dtype=bool)
    truth[5, 5] = True
    pred = truth.copy()
    pred[5, 15] = True
    assert M.hd95(pred, truth) == pytest.approx(9.5)
    assert M.hd95(truth, pred) == pytest.approx(9.5)


def test_hd95_3d_shift_with_spacing() -> None:
    a = np.zeros((12, 8, 8), dtype=bool)
    a[2:6, 2:6, 2:6] = True
    b = np.roll(a, 2, axis=0)
    assert M.hd95(a, b) == pytest.approx(2.0)
    assert M.hd95(a, b, spacing=(3.0, 1.0, 1.0)) == pytest.approx(6.0)


def _blobs(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Irregular lesion-like blobs (smoothed noise above a level), some touching the array's edge."""
    from scipy import ndimage

    return ndimage.gaussian_filter(np.random.default_rng(seed).random(shape), 2) > 0.53


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notices
@pytest.mark.parametrize("case", range(12))
def test_hd95_agrees_with_monai(case: int) -> None:
    """The same number as MONAI's ``compute_hausdorff_distance(percentile=95)`` (its definition, which
    ``hd95`` follows) on irregular 2D and 3D masks, with and without anisotropic spacing. MONAI is not
    a dependency: the test runs where it is installed."""
    pytest.importorskip("monai")
    import torch
    from monai.metrics import compute_hausdorff_distance

    shape = (40, 48) if case % 2 else (8, 32, 36)
    pred, truth = _blobs(shape, 2 * case), _blobs(shape, 2 * case + 1)
    assert pred.any() and truth.any()
    spacing = None if case % 3 else tuple(float(s) for s in np.random.default_rng(case).uniform(0.5, 3.0, len(shape)))

    def one_hot(m: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(m[None, None].astype(np.float32))  # (B=1, C=1, *spatial)

    theirs = float(compute_hausdorff_distance(one_hot(pred), one_hot(truth), include_background=True, percentile=95, spacing=spacing)[0, 0])
    assert M.hd95(pred, truth, spacing=spacing) == pytest.approx(theirs, rel=1e-5, abs=1e-5)


def test_hd95_bad_spacing_raises() -> None:
    m = _square((6, 6), 1, 1, 2)
    with pytest.raises(ValueError, match="spacing"):
        M.hd95(m, m, spacing=(1.0, 1.0, 1.0))


# ---------------------------------------------------------------- components


def test_connected_components_diagonal_joined_by_default() -> None:
    m = np.array(
        [
            [1, 0, 0, 0],
            [0, 1, 0, 0],
            [0, 0, 0, 1],
            [0, 0, 0, 1],
        ],
        dtype=bool,
    )
    labels, n = M.connected_components(m)
    assert n == 2  # the diagonal pair is one component under 8-connectivity
    assert labels.shape == m.shape
    assert labels[0, 0] == labels[1, 1] != 0
    assert labels[2, 3] == labels[3, 3] != labels[0, 0]
    _, n4 = M.connected_components(m, connectivity=1)
    assert n4 == 3


def test_connected_components_3d_corner_touching() -> None:
    m = np.zeros((3, 3, 3), dtype=bool)
    m[0, 0, 0] = True
    m[1, 1, 1] = True  # shares only a corner with (0, 0, 0)
    assert M.connected_components(m)[1] == 1  # 26-connectivity
    assert M.connected_components(m, connectivity=1)[1] == 2
    assert M.connected_components(np.zeros((3, 3, 3)))[1] == 0


def test_connected_components_bad_connectivity() -> None:
    with pytest.raises(ValueError):
        M.connected_components(np.zeros((3, 3), dtype=bool), connectivity=3)


def test_remove_small_components() -> None:
    m = np.zeros((10, 10), dtype=bool)
    m[0, 0] = True  # size 1
    m[3:5, 3:5] = True  # size 4
    m[7:10, 7:10] = True  # size 9
    m[0, 8] = m[1, 9] = True  # diagonal pair, size 2
    out = M.remove_small_components(m, 4)
    expected = np.zeros_like(m)
    expected[3:5, 3:5] = True
    expected[7:10, 7:10] = True
    assert out.dtype == bool
    np.testing.assert_array_equal(out, expected)
    out2 = M.remove_small_components(m, 2)
    assert out2.sum() == 4 + 9 + 2


def test_remove_small_components_nonpositive_returns_copy() -> None:
    m = np.zeros((4, 4), dtype=bool)
    m[1, 1] = True
    out = M.remove_small_components(m, 0)
    np.testing.assert_array_equal(out, m)
    assert out is not m
    out[0, 0] = True
    assert not m[0, 0]
    assert not M.remove_small_components(np.zeros((3, 3)), 5).any()


# ---------------------------------------------------------------- lesion-wise


def test_match_lesions_detected_missed_and_fp() -> None:
    truth = np.zeros((20, 20), dtype=bool)
    truth[2:6, 2:6] = True  # lesion A, 16 px
    truth[12:14, 12:14] = True  # lesion B, 4 px, missed
    pred = np.zeros_like(truth)
    pred[2:6, 3:7] = True  # overlaps A by 12 px -> dice 24/32 = 0.75
    pred[15:17, 2:4] = True  # false positive blob
    r = M.match_lesions(pred, truth)
    assert r.lesion_sizes == (16, 4)
    assert r.lesion_detected == (True, False)
    assert r.lesion_dice == pytest.approx((0.75, 0.0))
    assert r.n_lesions == 2
    assert r.n_detected == 1
    assert r.sensitivity == pytest.approx(0.5)
    assert r.false_positives == 1
    assert r.n_pred_components == 2
    # BraTS: FP counts as a 0-dice lesion -> 0.75 / (2 + 1)
    assert r.lesionwise_dice == pytest.approx(0.25)


def test_match_lesions_split_prediction_uses_union() -> None:
    truth = np.zeros((3, 8), dtype=bool)
    truth[1, 1:7] = True  # 6 px
    pred = np.zeros_like(truth)
    pred[1, 1:3] = True
    pred[1, 5:7] = True  # two pieces, 4 px total, all inside the lesion
    r = M.match_lesions(pred, truth)
    assert r.n_pred_components == 2
    assert r.false_positives == 0
    assert r.lesion_dice == pytest.approx((8 / 10,))
    assert r.lesionwise_dice == pytest.approx(0.8)


def test_match_lesions_3d_corner_join_and_fp() -> None:
    truth = np.zeros((8, 8, 8), dtype=bool)
    truth[1:4, 1:4, 1:4] = True  # 27 voxels
    pred = truth.copy()
    pred[4, 4, 4] = True  # corner-touches the cube -> same component (26-conn)
    pred[6, 6, 6] = True  # isolated -> false positive
    r = M.match_lesions(pred, truth)
    assert r.lesion_sizes == (27,)
    assert r.n_pred_components == 2
    assert r.false_positives == 1
    assert r.lesion_dice == pytest.approx((54 / 55,))
    assert r.sensitivity == 1.0
    assert r.lesionwise_dice == pytest.approx((54 / 55) / 2)


def test_match_lesions_empty_cases() -> None:
    z = np.zeros((5, 5), dtype=bool)
    r = M.match_lesions(z, z)
    assert r.n_lesions == 0 and r.false_positives == 0
    assert math.isnan(r.sensitivity)
    assert r.lesionwise_dice == 1.0

    pred = z.copy()
    pred[2, 2] = True
    r2 = M.match_lesions(pred, z)
    assert r2.false_positives == 1
    assert r2.lesionwise_dice == 0.0
    assert math.isnan(r2.sensitivity)


# ---------------------------------------------------------------- size_bin


@pytest.mark.parametrize(
    ("n", "label"),
    [(0, "<100"), (99, "<100"), (100, "100-999"), (999, "100-999"), (1000, ">=1000"), (10**6, ">=1000")],
)
def test_size_bin_default(n: int, label: str) -> None:
    assert M.size_bin(n) == label


def test_size_bin_custom_edges() -> None:
    edges = (10, 50, 200)
    assert M.size_bin(5, edges) == "<10"
    assert M.size_bin(10, edges) == "10-49"
    assert M.size_bin(50, edges) == "50-199"
    assert M.size_bin(200, edges) == ">=200"
    assert M.size_bin(3, (5,)) == "<5"
    assert M.size_bin(5, (5,)) == ">=5"


def test_size_bin_bad_edges() -> None:
    with pytest.raises(ValueError):
        M.size_bin(5, ())
    with pytest.raises(ValueError):
        M.size_bin(5, (100, 100))
