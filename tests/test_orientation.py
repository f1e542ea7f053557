"""Geometry comes from the file: the same volume stored in any voxel order gives the same slices
and the same mask, and masks go back onto each file's own grid.

Stored orderings: as the file has it (LPS for the BraTS-format LGG patient), RAS, rows reversed,
sagittal and coronal storage (axes permuted), each with the affine that keeps it the same image in
scanner space (``nibabel``'s ``as_reoriented``).
"""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest
from helpers import BRATS_FORMAT, require
from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

from brainseg.inference.predict import segment_volume
from brainseg.io.volumes import DISPLAY_AXCODES, load_volume

STORAGES = [("L", "P", "S"), ("R", "A", "S"), ("L", "A", "S"), ("A", "S", "R"), ("S", "R", "P"), ("P", "I", "L")]


def _restored(img: nib.Nifti1Image, axcodes) -> nib.Nifti1Image:
    """The same image with its voxels stored in ``axcodes`` order (affine adjusted: same scanner space)."""
    return img.as_reoriented(ornt_transform(io_orientation(img.affine), axcodes2ornt(axcodes)))


def _bytes(img: nib.Nifti1Image) -> bytes:
    return gzip.compress(img.to_bytes(), compresslevel=1)


def _back_to(img_from: nib.Nifti1Image, data: np.ndarray, img_to: nib.Nifti1Image) -> np.ndarray:
    """Voxels of ``data`` (on ``img_from``'s grid) on ``img_to``'s grid (both are reorientations of one image)."""
    return np.asarray(
        nib.Nifti1Image(data, img_from.affine).as_reoriented(ornt_transform(io_orientation(img_from.affine), io_orientation(img_to.affine))).dataobj
    )


def test_synthetic_volume_is_shown_anterior_up_patient_right_on_the_left():
    """A marker in the anterior right of the head is in the top left of every displayed slice, whatever the storage."""
    data = np.full((40, 48, 10), 10, np.int16)  # stored RAS: x grows towards the patient's right, y towards anterior
    data[2:8, 40:46, :] = 500  # anterior left
    data[32:38, 40:46, :] = 900  # anterior right: the brightest
    base = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    for codes in STORAGES:
        vol = load_volume({"v.nii.gz": _bytes(_restored(base, codes))})
        s = vol.slices[5, ..., 1]
        assert s.shape == (48, 40)
        r, c = np.unravel_index(np.argmax(s), s.shape)
        assert r < 10 and c < 10, f"{codes}: the right anterior marker is at row {r}, column {c}"
        assert nib.aff2axcodes(vol.display_affine) == DISPLAY_AXCODES
        assert vol.spacing == (1.0, 1.0, 2.0)


def test_same_volume_in_six_storage_orders_same_slices_and_same_mask(shared_data):
    """The real BraTS-format FLAIR of an LGG patient, stored six ways, through the shipped default model."""
    from brainseg.inference.predictor import load

    path = require(BRATS_FORMAT / "TCGA-DU-7294" / "TCGA-DU-7294-t2f.nii.gz")
    ref_img = nib.load(path)
    seg = load()
    post = seg.postprocess
    first = None
    for codes in STORAGES:
        img = _restored(ref_img, codes)
        vol = load_volume({f"case-{''.join(codes)}-t2f.nii.gz": _bytes(img)})
        res = segment_volume(seg, vol, post)
        file_mask = vol.file_mask(res.mask)
        assert file_mask.shape == img.shape
        if first is None:
            first = (vol, res, img, file_mask)
            assert res.mask.sum() > 10_000  # the tumour is found, not an empty answer compared with itself
            continue
        np.testing.assert_array_equal(vol.slices, first[0].slices, err_msg=f"{codes}: other slices")
        np.testing.assert_array_equal(res.mask, first[1].mask, err_msg=f"{codes}: other mask")
        np.testing.assert_array_equal(_back_to(img, file_mask, first[2]), first[3], err_msg=f"{codes}: mask not on the file's grid")


def test_file_mask_round_trip_inverts_the_display_orientation():
    rng = np.random.default_rng(4)
    data = rng.integers(0, 100, (9, 8, 7)).astype(np.int16)
    for codes in STORAGES:
        img = _restored(nib.Nifti1Image(data, np.eye(4)), codes)
        vol = load_volume({"v.nii.gz": _bytes(img)})
        stored = np.asarray(img.dataobj)
        # the grey volume's own voxels come back onto its grid
        np.testing.assert_array_equal(vol.file_mask(vol.slices[..., 1] > 50), (stored > 50).astype(np.uint8))


@pytest.mark.parametrize("case", ["TCGA-DU-7294", "TCGA-FG-6692"])
def test_brats_format_anterior_up_like_the_lgg_slices(case, shared_data):
    """The BraTS-format files are stored LPS (posterior-up when shown as stored); they are shown anterior-up:
    the frontal lobes (more brain above the middle row than the occipital pole has below) at the top."""
    vol = load_volume([require(BRATS_FORMAT / case / f"{case}-t2f.nii.gz")])
    assert nib.aff2axcodes(nib.load(BRATS_FORMAT / case / f"{case}-t2f.nii.gz").affine) == ("L", "P", "S")
    assert nib.aff2axcodes(vol.display_affine) == DISPLAY_AXCODES
    assert vol.display_affine[1, 1] < 0  # rows run towards posterior (y decreases)
