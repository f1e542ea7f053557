"""The evaluation protocol (``brainseg.evaluation.protocol``) on tiny patients whose numbers are worked out by hand.

Every expected value below is derived in the comments from the masks drawn in the test, not
from the code under test. Torch-free, like the module.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from brainseg.config import PostprocessConfig
from brainseg.evaluation.protocol import PatientPrediction, aggregate, evaluate_predictions, score_patient, sweep_postprocess

# Three patients of two 8 x 8 slices each.
#
# a: truth is a 2 x 2 square (4 voxels) on slice 0; slice 1 is lesion-free.
#    The prediction is a 2 x 3 block over it (6 voxels, 4 of them right) and one stray voxel on slice 1.
#    3D: tp 4, fp 3, fn 0 -> Dice 8/11, IoU 4/7.
#    Slice Dice: slice 0 = 2*4/(6+4) = 0.8; slice 1 (truth empty, prediction not) = 0.
#    Lesions: one of 4 voxels, hit by the block only -> lesion Dice 0.8; the stray voxel is a
#    false-positive component -> lesion-wise Dice 0.8 / (1 + 1) = 0.4.
#    HD95 (3D, pixels): two slices, so erosion empties every mask and each surface is the whole mask.
#    Prediction -> truth: 0, 0, 0, 0 (the 4 shared voxels), 1, 1 (the block's third column) and
#    sqrt(1 + 4^2 + 4^2) = sqrt(33) (the stray voxel at (1, 6, 6) to (0, 2, 2)); the 95th percentile
#    of these 7 sorted values sits at position 0.95 * 6 = 5.7: 1 + 0.7 * (sqrt(33) - 1).
#    Truth -> prediction: all 0. HD95 = the larger one.
# b: two lesions (4 voxels on slice 0, 1 voxel on slice 1, not touching), nothing predicted.
#    Dice 0, IoU 0, HD95 undefined (NaN); both slices lesion-positive with Dice 0; both lesions missed.
# c: no lesion, nothing predicted: Dice 1 and IoU 1 (both empty), HD95 0, two lesion-free slices
#    without a false positive, lesion-wise Dice 1 (nothing to find, nothing wrongly found).
HD95_A = 1 + 0.7 * (math.sqrt(33) - 1)


def _patients() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{id: (prediction, truth)}``, (2, 8, 8) bool each."""
    z = np.zeros((2, 8, 8), bool)
    ta, pa = z.copy(), z.copy()
    ta[0, 1:3, 1:3] = True
    pa[0, 1:3, 1:4] = True
    pa[1, 6, 6] = True
    tb = z.copy()
    tb[0, 4:6, 4:6] = True
    tb[1, 0, 0] = True
    return {"a": (pa, ta), "b": (z.copy(), tb), "c": (z.copy(), z.copy())}


def test_score_patient_by_hand():
    (pa, ta), (pb, tb) = _patients()["a"], _patients()["b"]
    a = score_patient(pa, ta)
    assert a["dice"] == pytest.approx(8 / 11) and a["iou"] == pytest.approx(4 / 7)
    assert a["hd95"] == pytest.approx(HD95_A)
    assert a["slice_dice"] == pytest.approx([0.8, 0.0]) and a["positive_slice_dice"] == pytest.approx([0.8])
    assert (a["negative_slices"], a["fp_slices"]) == (1, 1)
    assert a["lesions"] == [(4, True, pytest.approx(0.8))] and a["fp_lesions"] == 1
    assert a["lesionwise_dice"] == pytest.approx(0.4) and a["empty_on_large_lesion"] is False

    b = score_patient(pb, tb)
    assert (b["dice"], b["iou"]) == (0.0, 0.0) and math.isnan(b["hd95"])
    assert b["positive_slice_dice"] == [0.0, 0.0] and (b["negative_slices"], b["fp_slices"]) == (0, 0)
    assert b["lesions"] == [(4, False, 0.0), (1, False, 0.0)] and b["fp_lesions"] == 0 and b["lesionwise_dice"] == 0.0


def test_aggregate_by_hand():
    rep = aggregate({pid: score_patient(p, t) for pid, (p, t) in _patients().items()})
    dices = [8 / 11, 0.0, 1.0]
    assert (rep["patients"], rep["slices"]) == (3, 6)
    assert rep["per_patient_dice"] == pytest.approx(sum(dices) / 3)
    assert rep["per_patient_dice_median"] == pytest.approx(8 / 11)
    assert rep["per_patient_dice_std"] == pytest.approx(statistics.pstdev(dices))
    assert rep["per_patient_iou"] == pytest.approx((4 / 7 + 0 + 1) / 3)
    # HD95: the mean over the patients where it is defined (a and c); b is counted as undefined.
    assert rep["hd95"] == pytest.approx((HD95_A + 0.0) / 2) and rep["hd95_undefined_patients"] == 1
    # Lesion-positive slices: a's slice 0 (0.8), b's two slices (0, 0). All slices add a's 0 and c's 1, 1.
    assert rep["positive_slice_dice"] == pytest.approx(0.8 / 3)
    assert rep["per_slice_dice"] == pytest.approx((0.8 + 0 + 0 + 0 + 1 + 1) / 6)
    # Lesion-free slices: a's slice 1 (a false positive) and c's two (none): pooled 1 / 3.
    assert rep["fp_slice_rate"] == pytest.approx(1 / 3) and rep["lesion_free_slices"] == 3
    # Three lesions pooled over patients, one found; one false-positive component in three patients.
    assert rep["lesions"] == 3 and rep["lesion_sensitivity"] == pytest.approx(1 / 3)
    assert rep["fp_lesions_per_patient"] == pytest.approx(1 / 3)
    assert rep["lesionwise_dice"] == pytest.approx((0.4 + 0.0 + 1.0) / 3)
    assert rep["empty_on_large_lesion"] == 0
    assert rep["by_lesion_size_voxels"]["<100"] == {"lesions": 3, "sensitivity": pytest.approx(1 / 3), "lesion_dice": pytest.approx(0.8 / 3)}
    for label in ("100-999", "1000-9999", ">=10000"):
        empty = rep["by_lesion_size_voxels"][label]
        assert empty["lesions"] == 0 and math.isnan(empty["sensitivity"]) and math.isnan(empty["lesion_dice"])
    # Bootstrap over 3 patients: 1 resample in 27 is all b (Dice 0) and 1 in 27 all c (Dice 1), both
    # above the 2.5 % tails, so the interval is [0, 1]. The FP rate resamples a (1 of 1) and c (0 of 2):
    # all-a gives 1 and all-c gives 0, each a quarter of the resamples.
    assert rep["per_patient_dice_ci95"] == [0.0, 1.0]
    assert rep["fp_slice_rate_ci95"] == [0.0, 1.0]


def test_an_empty_prediction_on_a_large_lesion_is_counted():
    truth = np.zeros((2, 100, 100), bool)
    truth[:, :60, :] = True  # 12,000 voxels (> 10,000)
    small = np.zeros_like(truth)
    small[0, :50, :50] = True  # 2,500 voxels
    rep = aggregate(
        {"big": score_patient(np.zeros_like(truth), truth), "small": score_patient(np.zeros_like(small), small), "hit": score_patient(truth, truth)}
    )
    assert rep["empty_on_large_lesion"] == 1
    assert rep["by_lesion_size_voxels"][">=10000"]["lesions"] == 2 and rep["by_lesion_size_voxels"][">=10000"]["sensitivity"] == 0.5
    assert rep["by_lesion_size_voxels"]["1000-9999"]["lesions"] == 1 and rep["by_lesion_size_voxels"]["1000-9999"]["sensitivity"] == 0.0


def test_evaluate_predictions_binarises_probabilities_first():
    """Probabilities 0.9 where the masks of ``_patients`` are True and 0.4 elsewhere, threshold 0.5: the same report."""
    preds = [PatientPrediction(pid, np.where(p, 0.9, 0.4).astype(np.float32), t) for pid, (p, t) in _patients().items()]
    rep = evaluate_predictions(preds, PostprocessConfig(threshold=0.5, min_size=0))
    assert rep["per_patient"] == {"a": round(8 / 11, 4), "b": 0.0, "c": 1.0}
    assert rep["fp_slice_rate"] == pytest.approx(1 / 3) and rep["lesionwise_dice"] == pytest.approx(1.4 / 3)
    assert rep["postprocess"] == {"threshold": 0.5, "min_size": 0, "components_3d": False, "slice_min_size": None}
    # min_size 2 removes a's stray voxel: a becomes 2*4/(6+4) = 0.8 with no false-positive slice.
    rep2 = evaluate_predictions(preds, PostprocessConfig(threshold=0.5, min_size=2))
    assert rep2["per_patient"]["a"] == 0.8 and rep2["fp_slice_rate"] == 0.0


# ---------------------------------------------------------------- post-processing sweep


def _pred(pid, prob, truth) -> PatientPrediction:
    return PatientPrediction(pid, np.asarray(prob, np.float32), np.asarray(truth, bool))


def test_sweep_by_hand_over_two_conditions():
    """One patient: a 3 x 3 lesion on slice 0, slice 1 lesion-free; a 2-px speck on slice 1.

    Complete input: lesion p = 0.9, speck p = 0.35. FLAIR only: lesion p = 0.45, speck p = 0.9.
    Per condition (Dice, lesion-free-slice FP rate):
      t 0.3, min 0:  both see lesion + speck: Dice 2*9/(9+11) = 0.9, FP 1    -> mean 0.9, FP 1
      t 0.3, min 3:  the speck (2 px, also 2 voxels in 3D) goes: Dice 1, FP 0 -> mean 1.0, FP 0 (2D and 3D)
      t 0.5, min 0:  complete: lesion only (1, 0); FLAIR only: speck only (0, 1) -> mean 0.5, FP 0.5
      t 0.5, min 3:  complete (1, 0); FLAIR only: nothing left (0, 0)            -> mean 0.5, FP 0 (2D and 3D)
    Best: t 0.3, min 3, 2D and 3D tied at 1.0; the tie goes to 2D; the single-slice minimum is then 3.
    """
    truth = np.zeros((2, 10, 10), bool)
    truth[0, 1:4, 1:4] = True
    complete, flair = np.zeros((2, 10, 10)), np.zeros((2, 10, 10))
    complete[truth], complete[1, 7, 7:9] = 0.9, 0.35
    flair[truth], flair[1, 7, 7:9] = 0.45, 0.9
    preds = {"all": [_pred("p", complete, truth)], "flair_only": [_pred("p", flair, truth)]}
    post, table = sweep_postprocess(preds, thresholds=(0.3, 0.5), min_sizes=(0, 3), components_3d=(False, True))
    got = {(r["threshold"], r["min_size"], r["components_3d"]): r for r in table}
    assert set(got) == {(0.3, 0, False), (0.3, 3, False), (0.3, 3, True), (0.5, 0, False), (0.5, 3, False), (0.5, 3, True)}  # no 3D row at min 0
    expected = {  # (Dice all, Dice FLAIR only, FP all, FP FLAIR only)
        (0.3, 0, False): (0.9, 0.9, 1.0, 1.0),
        (0.3, 3, False): (1.0, 1.0, 0.0, 0.0),
        (0.3, 3, True): (1.0, 1.0, 0.0, 0.0),
        (0.5, 0, False): (1.0, 0.0, 0.0, 1.0),
        (0.5, 3, False): (1.0, 0.0, 0.0, 0.0),
        (0.5, 3, True): (1.0, 0.0, 0.0, 0.0),
    }
    for key, (d_all, d_flair, fp_all, fp_flair) in expected.items():
        row = got[key]
        assert (row["dice_all"], row["dice_flair_only"]) == (pytest.approx(d_all), pytest.approx(d_flair)), key
        assert (row["fp_slice_rate_all"], row["fp_slice_rate_flair_only"]) == (fp_all, fp_flair), key
        assert row["per_patient_dice"] == pytest.approx((d_all + d_flair) / 2) and row["fp_slice_rate"] == (fp_all + fp_flair) / 2, key
    assert post == PostprocessConfig(0.3, 3, False, 3)


def _faint_edge_and_a_blob():
    """Slice 0: a 3 x 3 lesion at p 0.9; slice 2: more of it (3 x 3) at p 0.35; slice 1, lesion-free: a 3 x 3 blob at p 0.35.

    Threshold 0.3: the whole lesion and the blob, Dice 2 * 18 / (18 + 27) = 0.8; FP 1 of 1 lesion-free slices.
    Threshold 0.5: Dice 2 * 9 / (9 + 18) = 0.667, FP 0. Minimum sizes up to 9 keep everything.
    """
    truth = np.zeros((3, 10, 10), bool)
    truth[0, 1:4, 1:4] = truth[2, 1:4, 1:4] = True
    prob = np.zeros((3, 10, 10))
    prob[0, 1:4, 1:4], prob[2, 1:4, 1:4], prob[1, 6:9, 6:9] = 0.9, 0.35, 0.35
    return [_pred("p", prob, truth)]


def test_sweep_under_an_fp_budget():
    preds = _faint_edge_and_a_blob()
    sweep = dict(thresholds=(0.3, 0.5), min_sizes=(0,), components_3d=(False,))
    post, table = sweep_postprocess(preds, **sweep)
    assert post.threshold == 0.3 and [(r["fp_slices"], r["lesion_free_slices"]) for r in table] == [(1, 1), (0, 1)]
    assert [r["fp_slice_rate_pooled"] for r in table] == [1.0, 0.0] and table[1]["per_patient_dice"] == pytest.approx(2 / 3)
    assert sweep_postprocess(preds, **sweep, max_fp_rate=0.0)[0].threshold == 0.5  # the budget rules out the better Dice
    assert sweep_postprocess(preds, **sweep, max_fp_rate=1.0)[0].threshold == 0.3  # a budget it keeps changes nothing
    assert sweep_postprocess(preds, **sweep, max_fp_rate=-1.0)[0].threshold == 0.5  # none keeps it: the fewest FP


def test_sweep_pools_fp_over_every_condition_but_scores_only_some():
    """Two conditions: "all" as above; "flair_only" with the blob at p 0.9 (FP at both thresholds) and no lesion found.
    Scored on "all" only, the Dice is that of "all"; the FP slices are pooled over both (2 lesion-free slices)."""
    (complete,) = _faint_edge_and_a_blob()
    flair = np.zeros_like(complete.prob)
    flair[1, 6:9, 6:9] = 0.9
    preds = {"all": [complete], "flair_only": [_pred("p", flair, complete.truth)]}
    sweep = dict(thresholds=(0.3, 0.5), min_sizes=(0,), components_3d=(False,))
    post, table = sweep_postprocess(preds, **sweep, score_conditions=("all",))
    assert post.threshold == 0.3 and [r["per_patient_dice"] for r in table] == [pytest.approx(0.8), pytest.approx(2 / 3)]
    assert [(r["fp_slices"], r["lesion_free_slices"]) for r in table] == [(2, 2), (1, 2)]
    assert sweep_postprocess(preds, **sweep, score_conditions=("all",), max_fp_rate=0.5)[0].threshold == 0.5
    both = sweep_postprocess(preds, **sweep)[1]
    assert both[0]["per_patient_dice"] == pytest.approx(0.4)  # scored on both: (0.8 + 0.0) / 2


def test_sweep_chooses_3d_components_and_a_separate_single_slice_minimum():
    """A thin lesion (2 px on each of 3 slices = 6 voxels) and a 3-px speck on slice 1, elsewhere.

    min 4 in 2D removes the lesion's pieces (2 < 4) as well as the speck: Dice 0.
    min 4 in 3D keeps the lesion (6 >= 4) and removes the speck (3 < 4): Dice 1.
    min 0 keeps both: 2*6/(6+9) = 0.8. So the volume setting is 3D min 4, and a single slice
    (which has no neighbours) gets the best 2D minimum at that threshold: 0.
    """
    truth = np.zeros((3, 10, 10), bool)
    truth[:, 2, 2:4] = True
    prob = truth * 0.9
    prob[1, 7, 6:9] = 0.9
    post, table = sweep_postprocess([_pred("p", prob, truth)], thresholds=(0.5,), min_sizes=(0, 4), components_3d=(False, True))
    by_key = {(r["min_size"], r["components_3d"]): r["per_patient_dice"] for r in table}
    assert by_key == {(0, False): pytest.approx(0.8), (4, False): 0.0, (4, True): 1.0}
    assert post == PostprocessConfig(0.5, 4, True, 0)


def test_sweep_prefers_2d_when_specks_span_slices():
    """The lesion is 3 x 3 on 3 slices (27 voxels); a 2-px speck sits at the same place on each slice.

    2D min 5 removes each 2-px speck and keeps the 9-px lesion slices: Dice 1. In 3D the specks are
    one 6-voxel component, which min 5 keeps: Dice 2*27/(27+33). Without removal the same.
    """
    truth = np.zeros((3, 10, 10), bool)
    truth[:, 1:4, 1:4] = True
    prob = truth.astype(np.float32) * 0.9
    prob[:, 7, 7:9] = 0.9
    post, table = sweep_postprocess([_pred("p", prob, truth)], thresholds=(0.5,), min_sizes=(0, 5), components_3d=(False, True))
    by_key = {(r["min_size"], r["components_3d"]): r["per_patient_dice"] for r in table}
    assert by_key == {(5, False): 1.0, (0, False): pytest.approx(2 * 27 / (27 + 33)), (5, True): pytest.approx(2 * 27 / (27 + 33))}
    assert post == PostprocessConfig(0.5, 5, False, 5)


def test_sweep_for_volumes_in_3d_only_keeps_the_lone_slice_choice_in_2d():
    """The case above under the shipping rule (``volumes_3d``): the volume setting is the best 3D one (min 5 in 3D,
    although 2D min 5 scores higher), the lone-slice minimum still the best 2D one (5)."""
    truth = np.zeros((3, 10, 10), bool)
    truth[:, 1:4, 1:4] = True
    prob = truth.astype(np.float32) * 0.9
    prob[:, 7, 7:9] = 0.9
    post, _ = sweep_postprocess([_pred("p", prob, truth)], thresholds=(0.5,), min_sizes=(0, 5), components_3d=(False, True), volumes_3d=True)
    assert post == PostprocessConfig(0.5, 5, True, 5)


def test_sweep_ties_prefer_the_larger_minimum_size():
    """A perfect prediction: every minimum size below the lesion's 9 voxels scores 1; the largest wins."""
    truth = np.zeros((1, 6, 6), bool)
    truth[0, 1:4, 1:4] = True
    post, _ = sweep_postprocess([_pred("p", truth * 0.9, truth)], thresholds=(0.5,), min_sizes=(0, 4, 9, 10), components_3d=(False,))
    assert post == PostprocessConfig(0.5, 9, False, 9)
