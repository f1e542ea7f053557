"""The volume path: NIfTI decoded once, windowed once, background slices skipped, the rest batched.

The masks must not change: on the real BraTS example, with the shipped default model, the fast
path gives the same probabilities and mask as the slice-by-slice path it replaced, on every
slice it sends to the network.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from helpers import BRATS, nifti, require
from scipy import ndimage

from brainseg.config import PostprocessConfig
from brainseg.evaluation.metrics import connected_components, remove_small_components
from brainseg.inference.backends import binarize_stack, window_for_volume
from brainseg.inference.predict import BACKGROUND_MAX_FRACTION, background_slices, lesion_table, segment_volume
from brainseg.io.volumes import load_volume, mask_to_volume
from brainseg.preprocessing import to_uint8


def _slice_by_slice(seg, vol, post):
    """The volume path before it was made fast: every slice windowed and segmented on its own,
    components over the whole volume."""
    window = window_for_volume(vol.slices)
    probs = np.stack(seg.probabilities(list(vol.slices), window=window))
    mask = probs >= post.threshold
    mask = remove_small_components(mask, post.min_size) if post.components_3d else np.stack([remove_small_components(m, post.min_size) for m in mask])
    return probs, mask


def test_brats_mask_unchanged_on_every_segmented_slice(shared_data):
    from brainseg.inference.predictor import load

    files = [require(BRATS / f"BraTS-MET-00110-000-{s}.nii.gz") for s in ("t1n", "t2f", "t1c")]
    seg = load()  # the shipped default model
    vol = load_volume(files)
    res = segment_volume(seg, vol, seg.postprocess)
    before_prob, before_mask = _slice_by_slice(seg, vol, seg.postprocess)

    skipped = np.zeros(len(vol.slices), bool)
    skipped[res.skipped] = True
    # Background = the empty slices above and below the skull-stripped brain, nothing in between.
    assert 5 <= skipped.sum() <= 30
    assert res.skipped == sorted(res.skipped) and not skipped[40:120].any()
    brain = np.count_nonzero((vol.slices != 0).any(axis=3).reshape(len(vol.slices), -1), axis=1)
    assert (brain[skipped] < BACKGROUND_MAX_FRACTION * 240 * 240).all() and (brain[~skipped] >= BACKGROUND_MAX_FRACTION * 240 * 240).all()

    np.testing.assert_array_equal(res.prob[~skipped], before_prob[~skipped])
    np.testing.assert_array_equal(res.mask[~skipped], before_mask[~skipped])
    assert res.mask.sum() > 1000  # the comparison covers a real lesion
    assert not res.mask[skipped].any() and not res.prob[skipped].any()
    assert not before_mask[skipped].any()  # the slice-by-slice path found nothing there either
    assert res.summary()["background_slices_skipped"] == res.skipped
    # The display volume is the volume-wide window the network saw, as the server shows it.
    window = window_for_volume(vol.slices)
    for z in (0, 60, 154):
        np.testing.assert_array_equal(res.display[z], to_uint8(vol.slices[z], *window))


def test_background_slices():
    vol = np.zeros((4, 100, 100, 3), np.uint8)
    vol[1, :5, :9, 1] = 7  # 45 pixels: below 0.5% of 10,000
    vol[2, :5, :10, 0] = 1  # 50 pixels: exactly 0.5% is kept
    vol[3] = 200
    assert background_slices(vol).tolist() == [True, True, False, False]


def _expected_slices(arr: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> (Z, Y, X) display slices, the definition: rot90 of each axial slice."""
    return np.stack([np.rot90(arr[:, :, k]) for k in range(arr.shape[2])]).astype(np.float32)


@pytest.mark.parametrize(
    "dtype,slope,version",
    [("<i2", None, 1), (">i2", None, 1), ("<f4", None, 1), ("<f8", None, 2), ("<u1", None, 1), ("<i2", (2.0, -5.0), 1), ("<f4", (0.5, 0.0), 2)],
)
def test_nifti_read_once_matches_nibabel(dtype, slope, version):
    """Voxels read in place from the inflated bytes (or slab by slab when scaled) equal nibabel's, in every
    type, byte order and NIfTI version; gzipped or not; with a trailing length-1 axis."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    arr = (rng.random((7, 6, 5)) * 120).astype(np.dtype(dtype).newbyteorder("="))

    def edit(hdr):
        hdr.set_data_dtype(np.dtype(dtype))
        if slope:
            hdr["scl_slope"], hdr["scl_inter"] = slope

    for data in (nifti(arr, version=version, edit=None if dtype[0] != ">" and not slope else edit), nifti(arr[..., None], gz=False, version=version)):
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
        want = np.asarray(klass.from_bytes(raw).dataobj, dtype=np.float32).reshape(7, 6, 5)
        vol = load_volume({"v.nii.gz": data})
        np.testing.assert_array_equal(vol.to_stored(vol.slices[..., 1]), _expected_slices(want))
        assert vol.slices.dtype == np.float32 and vol.shape == (7, 6, 5)


def test_a_brats_set_whose_flair_has_a_trailing_length_1_axis_reads_as_the_plain_set():
    """A t2f stored as (X, Y, Z, 1) beside 3-D t1n / t1c files is the same grid, not a shape mismatch."""
    rng = np.random.default_rng(3)
    arrs = {s: (rng.random((7, 6, 5)) * 100).astype(np.float32) for s in ("t1n", "t2f", "t1c")}
    plain = load_volume({f"c-{s}.nii.gz": nifti(a) for s, a in arrs.items()})
    padded = load_volume({f"c-{s}.nii.gz": nifti(a[..., None] if s == "t2f" else a) for s, a in arrs.items()})
    np.testing.assert_array_equal(padded.slices, plain.slices)
    assert padded.shape == plain.shape == (7, 6, 5) and padded.condition == "all"


def test_mask_to_volume_inverts_the_display_orientation():
    mask = np.random.default_rng(1).random((5, 6, 7)) > 0.5  # (Z, Y, X)
    vol = mask_to_volume(mask)
    assert vol.shape == (7, 6, 5)
    np.testing.assert_array_equal(_expected_slices(vol.astype(np.uint8)).astype(bool), mask)


@pytest.mark.parametrize("components_3d", [True, False])
def test_components_cleaned_in_the_lesion_box_as_on_the_whole_volume(components_3d):
    rng = np.random.default_rng(2)
    probs = np.zeros((30, 80, 80), np.float32)
    probs[5:25, 10:70, 20:60] = rng.random((20, 60, 40)) ** 3
    post = PostprocessConfig(threshold=0.4, min_size=4, components_3d=components_3d)
    want = probs >= post.threshold
    want = remove_small_components(want, post.min_size) if components_3d else np.stack([remove_small_components(m, post.min_size) for m in want])
    got = binarize_stack(probs, post)
    assert want.sum() > 100
    np.testing.assert_array_equal(got, want)
    assert not binarize_stack(np.zeros((3, 8, 8), np.float32), post).any()


@pytest.mark.parametrize("shape", [(40, 50), (12, 40, 50)])
def test_lesion_table_sizes_boxes_and_centroids(shape):
    """Against scipy on the whole array: the table is computed in the lesion box only."""
    mask = np.zeros(shape, bool)
    inner = tuple(slice(3, s - 4) for s in shape)
    mask[inner] = np.random.default_rng(3).random(mask[inner].shape) > 0.8
    labels, n = connected_components(mask)
    sizes = np.bincount(labels.ravel())[1:]
    boxes = ndimage.find_objects(labels)
    centroids = ndimage.center_of_mass(mask, labels, range(1, n + 1))
    want = sorted(
        (
            {"size": int(sizes[i]), "bbox": [b.start for b in boxes[i]] + [b.stop for b in boxes[i]], "centroid": [round(c, 1) for c in centroids[i]]}
            for i in range(n)
        ),
        key=lambda r: -r["size"],
    )
    rows = lesion_table(mask, voxel_volume_mm3=2.0) if len(shape) == 3 else lesion_table(mask, pixel_area_mm2=2.0)
    key = "voxels" if len(shape) == 3 else "area_px"
    assert n > 10 and len(rows) == n
    assert [r[key] for r in rows] == [w["size"] for w in want]
    assert sorted(map(tuple, (r["bbox"] for r in rows))) == sorted(map(tuple, (w["bbox"] for w in want)))
    assert sorted(map(tuple, (r["centroid"] for r in rows))) == sorted(map(tuple, (w["centroid"] for w in want)))
    assert lesion_table(np.zeros(shape, bool)) == []


def test_api_volume_answer_lists_skipped_background_slices(tiny_model_dir):
    """The answer says which slices were not sent to the network, and their mask is empty."""
    from helpers import make_client, segment

    from brainseg.io.synthetic import synthetic_slice

    img, _ = synthetic_slice(size=64)
    vol = np.stack([np.rot90(img[:, :, 1], -1).astype(np.float32)] * 10, axis=2)  # (X, Y, Z), display = rot90
    vol[:, :, [0, 1, 9]] = 0
    with make_client(tiny_model_dir) as client:
        r = segment(client, ("vol.nii.gz", nifti(vol)))
        assert r.status_code == 200, r.text
        body = r.json()
    assert body["background_slices_skipped"] == [0, 1, 9]
    assert body["slices"] == 10 and all(body["slice_lesion_area_px"][z] == 0 for z in (0, 1, 9))
    assert sum(body["slice_lesion_area_px"]) > 0  # the other slices were segmented
