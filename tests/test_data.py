from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from brainseg.io.datasets import DataError, discover, institution_of, labelled, load_patient, read_image, read_pair, read_split, slice_index, split_patients
from brainseg.io.files import write_json_atomic


def _write_patient(root: Path, pid: str, n: int, ext=".tif", compress=False, with_mask=True):
    d = root / pid
    d.mkdir(parents=True)
    for i in range(1, n + 1):
        img = np.full((32, 32, 3), i, np.uint8)
        m = np.zeros((32, 32), np.uint8)
        if i % 2:
            m[10:20, 10:20] = 255
        if ext == ".tif":
            tifffile.imwrite(d / f"{pid}_{i}.tif", img, compression="zlib" if compress else None)
            if with_mask:
                tifffile.imwrite(d / f"{pid}_{i}_mask.tif", m)
        else:
            cv2.imwrite(str(d / f"{pid}_{i}{ext}"), img)
            if with_mask:
                cv2.imwrite(str(d / f"{pid}_{i}_mask.png"), m)
    return d


def test_slices_sort_numerically_and_stack(tmp_path):
    _write_patient(tmp_path, "TCGA_CS_0001_20000101", 12, compress=True)
    ds = discover(tmp_path)
    p = ds.patients[0]
    assert [s.index for s in p.slices] == list(range(1, 13))  # 10 after 9, not after 1
    images, masks = load_patient(p)
    assert len(images) == 12 and masks.shape == (12, 32, 32) and masks.dtype == bool
    assert images[9][0, 0, 0] == 10


def test_png_and_jpeg_pairs(tmp_path):
    _write_patient(tmp_path, "TCGA_DU_0002_20000101", 3, ext=".png")
    _write_patient(tmp_path, "TCGA_HT_0003_20000101", 2, ext=".jpg")
    ds = labelled(discover(tmp_path))
    assert [len(p.slices) for p in ds.patients] == [3, 2]
    img, m = read_pair(ds.patients[0].slices[0].image_path, ds.patients[0].slices[0].mask_path)
    assert img.shape == (32, 32, 3) and m.sum() == 100


def test_images_without_mask_are_counted_and_excluded(tmp_path):
    d = _write_patient(tmp_path, "TCGA_CS_0001_20000101", 3)
    (d / "TCGA_CS_0001_20000101_2_mask.tif").unlink()
    ds = discover(tmp_path)
    assert len(ds.images_without_mask) == 1
    assert len(labelled(ds).patients[0].slices) == 2


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing_root", "not found"),
        ("empty_root", "no images"),
        ("truncated", "cannot read"),
        ("empty_file", "empty"),
        ("size_mismatch", "mask is"),
    ],
)
def test_bad_dataset_names_the_file(tmp_path, damage, message):
    root = tmp_path / "data"
    if damage == "missing_root":
        with pytest.raises(DataError, match=message) as e:
            discover(root)
        assert str(root) in str(e.value)
        return
    root.mkdir()
    if damage == "empty_root":
        with pytest.raises(DataError, match=message):
            discover(root)
        return
    d = _write_patient(root, "TCGA_CS_0001_20000101", 2)
    bad = d / "TCGA_CS_0001_20000101_2.tif"
    if damage == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    elif damage == "empty_file":
        bad.write_bytes(b"")
    elif damage == "size_mismatch":
        bad = d / "TCGA_CS_0001_20000101_2_mask.tif"
        tifffile.imwrite(bad, np.zeros((16, 16), np.uint8))
    with pytest.raises(DataError, match=message) as e:
        load_patient(discover(root).patients[0])
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


def test_split_is_by_patient_seeded_and_stratified():
    ids = [f"TCGA_{site}_{i:04d}_20000101" for site, n in [("DU", 20), ("HT", 14), ("CS", 8), ("FG", 6), ("EZ", 1)] for i in range(n)]
    a = split_patients(ids, n_val=6, n_test=10, seed=1)
    b = split_patients(list(reversed(ids)), n_val=6, n_test=10, seed=1)
    assert a == b  # deterministic in the seed, not in the input order
    assert sorted(a["train"] + a["val"] + a["test"]) == sorted(ids)
    assert not set(a["train"]) & set(a["test"]) and not set(a["val"]) & set(a["test"])
    assert len(a["test"]) == 10 and len(a["val"]) == 6
    sites = [institution_of(p) for p in a["test"]]
    assert sites.count("DU") in (4, 5) and sites.count("HT") in (2, 3, 4)  # roughly proportional
    assert split_patients(ids, 6, 10, seed=2) != a
    with pytest.raises(ValueError):
        split_patients(ids[:5], 3, 2)


def test_split_file_roundtrip_and_errors(tmp_path):
    f = tmp_path / "split.json"
    write_json_atomic(f, {"train": ["a"], "val": ["b"], "test": ["c"]})
    assert read_split(f)["test"] == ["c"]
    assert not list(tmp_path.glob(".*tmp"))
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(DataError, match="bad.json"):
        read_split(tmp_path / "bad.json")


def test_helpers():
    assert slice_index("TCGA_CS_4941_19960909_12") == 12
    assert institution_of("TCGA_CS_4941_19960909") == "CS"
    assert institution_of("patient7") == "other"


def test_read_image_16bit_and_grey_png(tmp_path):
    g16 = (np.arange(64 * 64).reshape(64, 64) * 10).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), g16)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint16 and out.shape == (64, 64)
