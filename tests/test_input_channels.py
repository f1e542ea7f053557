"""How a grey or single-sequence input is read: the ``sequence`` choice, identical channels,
a missing pre- / post-contrast sequence (a copy of FLAIR), BraTS sets with FLAIR but without
t1n / t1c; through the API (real HTTP requests via TestClient), ``brainseg predict`` and the
pieces in ``brainseg.io.channels``.

Models are the tiny ones of ``conftest.tiny_model_dir``: what is asserted is how the input is
read and reported, never the quality of a mask.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_api import BRATS, LESION_SLICE, make_client, nifti, png, segment, tiff

from brainseg.cli import SEQUENCE_CHOICES, main
from brainseg.io.channels import IDENTICAL, POST_MISSING, PRE_MISSING, SEQUENCES, channel_condition, parse_sequence
from brainseg.io.datasets import read_image
from brainseg.io.synthetic import synthetic_slice

UNRELIABLE = "outside what it was trained for and the mask is unreliable"


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with make_client(tiny_model_dir) as c:
        yield c


def grey_image(size: int = 128, seed: int = 0) -> np.ndarray:
    return synthetic_slice(size=size, seed=seed)[0][:, :, 1]


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


# ---------------------------------------------------------------- pieces


def test_parse_sequence():
    assert parse_sequence(None) is None and parse_sequence("") is None and parse_sequence("  ") is None
    assert [parse_sequence(s) for s in ("flair", "FLAIR", "t1", "T1c", "t2")] == ["flair", "flair", "t1", "t1c", "t2"]
    assert [parse_sequence(s) for s in ("t2f", "t1n", "t1ce", "t2w")] == ["flair", "t1", "t1c", "t2"]  # BraTS tags
    with pytest.raises(ValueError, match="sequence must be one of flair .*t1 .*t1c .*t2 .*got 'dwi'"):
        parse_sequence("dwi")
    assert tuple(SEQUENCES) == SEQUENCE_CHOICES


def test_channel_condition_exact_for_integers_tolerant_for_floats():
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, 255, (32, 32), dtype=np.uint8) for _ in range(3))
    assert channel_condition(np.dstack([a, b, c])) == "all"
    assert channel_condition(np.dstack([b, b, c])) == "pre_missing"
    assert channel_condition(np.dstack([a, b, b])) == "post_missing"
    assert channel_condition(np.dstack([b, b, b])) == "flair_only"
    near = b.astype(np.uint16) * 100
    assert channel_condition(np.dstack([near + 1, near, near])) == "post_missing"  # pre off by one in uint16: a real difference
    f = b.astype(np.float32) * 3.7
    tiny = f + np.float32(1e-6) * rng.standard_normal(f.shape).astype(np.float32)
    assert channel_condition(np.dstack([tiny, f, f])) == "flair_only"  # float rounding is not a difference
    assert channel_condition(np.dstack([f * 1.01, f, f])) == "post_missing"
    vol = np.stack([np.dstack([b, b, c])] * 4)  # (Z, H, W, 3) volumes too
    assert channel_condition(vol) == "pre_missing"


# ---------------------------------------------------------------- API: grey slices and the sequence field


def test_grey_slice_is_read_as_flair_only_by_default(client):
    body = ok(segment(client, ("grey.png", png(grey_image()))))
    inp = body["input"]
    assert inp["condition"] == "flair_only" and inp["channels_read_as"] == ["FLAIR", "FLAIR", "FLAIR"]
    assert inp["sequence"] == "flair" and inp["channels_given"] == 1
    assert inp["read_as"] == "FLAIR only (grey image)" and inp["warnings"] == []
    assert inp["height"] == 128 and inp["dtype"] == "uint8"  # the block joins the existing input fields


@pytest.mark.parametrize("sequence, name", [("t1", "pre-contrast T1"), ("t1c", "T1 post-contrast"), ("t2", "T2"), ("T2", "T2")])
def test_grey_slice_of_another_sequence_gets_a_warning(client, sequence, name):
    data = png(grey_image(seed=1))
    flair = ok(segment(client, ("grey.png", data), sequence="flair"))
    other = ok(segment(client, ("grey.png", data), sequence=sequence))
    inp = other["input"]
    assert inp["sequence"] == sequence.lower() and inp["condition"] == "flair_only"
    assert inp["channels_read_as"] == ["FLAIR", "FLAIR", "FLAIR"]
    assert len(inp["warnings"]) == 1 and name in inp["warnings"][0] and UNRELIABLE in inp["warnings"][0]
    assert "trained on FLAIR" in inp["warnings"][0]
    assert flair["input"]["warnings"] == []
    # Numerically the same input (the image repeated into the 3 channels): the same mask.
    assert other["mask_png"] == flair["mask_png"]


def test_16bit_grey_tiff_with_sequence_as_query_parameter(client):
    r = client.post("/v1/segment?sequence=t1c", files={"files": ("g16.tif", tiff(grey_image().astype(np.uint16) * 100))})
    inp = ok(r)["input"]
    assert inp["sequence"] == "t1c" and inp["channels_given"] == 1 and "T1 post-contrast" in inp["warnings"][0]


@pytest.mark.parametrize("value", ["dwi", "flair2", "1"])
def test_unknown_sequence_is_a_422_with_a_plain_message(client, value):
    r = segment(client, ("grey.png", png(grey_image())), sequence=value)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("sequence must be one of flair") and repr(value) not in detail  # no echo of the request
    for choice in SEQUENCE_CHOICES:
        assert choice in detail
    r = client.post(f"/v1/segment?sequence={value}", files={"files": ("grey.png", png(grey_image()))})
    assert r.status_code == 422 and "sequence must be one of" in r.json()["detail"]


def test_three_identical_channels_are_one_grey_image(client):
    g = grey_image(seed=2)
    body = ok(segment(client, ("rgb.png", png(np.dstack([g, g, g]))), sequence="t2"))
    inp = body["input"]
    assert inp["condition"] == "flair_only" and inp["channels_given"] == 3
    assert IDENTICAL in inp["notes"] and "three identical channels" in inp["read_as"]
    assert inp["sequence"] == "t2" and UNRELIABLE in inp["warnings"][0]  # identical channels are a grey image: the sequence applies
    # Float, with float rounding between channels: still identical.
    f = g.astype(np.float32) / 255
    body = ok(segment(client, ("f.tif", tiff(np.dstack([f, f + np.float32(1e-7), f])))))
    assert body["input"]["condition"] == "flair_only" and body["input"]["sequence"] == "flair"


# ---------------------------------------------------------------- API: real LGG slices, a sequence copied


def _lgg(shared_data) -> np.ndarray:
    return read_image(shared_data / LESION_SLICE)


def test_real_slice_reads_all_three_and_ignores_the_sequence(client, shared_data):
    img = _lgg(shared_data)
    body = ok(segment(client, ("slice.tif", tiff(img))))
    inp = body["input"]
    assert inp["condition"] == "all" and inp["channels_read_as"] == ["pre-contrast T1", "FLAIR", "post-contrast T1"]
    assert inp["sequence"] is None and inp["warnings"] == [] and inp["notes"] == []
    said = ok(segment(client, ("slice.tif", tiff(img)), sequence="t2"))["input"]
    assert said["warnings"] == [] and said["sequence"] is None
    assert any("sequence 't2' does not apply" in n and "own channels" in n for n in said["notes"])


@pytest.mark.parametrize(
    "copy_into, condition, note, read_as",
    [
        (0, "pre_missing", PRE_MISSING, ["FLAIR", "FLAIR", "post-contrast T1"]),
        (2, "post_missing", POST_MISSING, ["pre-contrast T1", "FLAIR", "FLAIR"]),
    ],
)
def test_real_slice_with_a_sequence_replaced_by_flair(client, shared_data, copy_into, condition, note, read_as):
    img = _lgg(shared_data).copy()
    img[:, :, copy_into] = img[:, :, 1]
    inp = ok(segment(client, ("copied.tif", tiff(img))))["input"]
    assert inp["condition"] == condition and inp["channels_read_as"] == read_as
    assert inp["notes"][0] == note and inp["warnings"] == [] and inp["sequence"] is None
    # The same through PNG (lossless) and with both copied: FLAIR only.
    assert ok(segment(client, ("copied.png", png(img))))["input"]["condition"] == condition
    img[:, :, 2 - copy_into] = img[:, :, 1]
    assert ok(segment(client, ("both.tif", tiff(img))))["input"]["condition"] == "flair_only"


# ---------------------------------------------------------------- API: volumes


def _brats_files(shared_data, *seqs) -> list[tuple[str, bytes]]:
    return [(Path(BRATS.format(s)).name, (shared_data / BRATS.format(s)).read_bytes()) for s in seqs]


def test_brats_set_without_pre_contrast_is_filled_with_flair(client, shared_data):
    import nibabel as nib

    body = ok(segment(client, _brats_files(shared_data, "t2f", "t1c")))
    inp = body["input"]
    assert body["kind"] == "volume" and inp["name"] == "BraTS-MET-00110-000" and inp["shape"] == [240, 240, 155]
    assert inp["condition"] == "pre_missing" and inp["notes"][0] == PRE_MISSING
    assert inp["sequences_present"] == ["t2f", "t1c"] and inp["channels_given"] == 2 and inp["warnings"] == []
    ref = nib.load(str(shared_data / BRATS.format("t2f")))
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(body["mask_url"]).content))
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)


def test_brats_flair_alone_and_unknown_sequence_request(client, shared_data):
    body = ok(segment(client, _brats_files(shared_data, "t2f"), sequence="t1"))
    inp = body["input"]
    assert inp["condition"] == "flair_only" and inp["sequence"] == "flair" and inp["warnings"] == []
    assert any("ignored" in n and "file name says FLAIR" in n for n in inp["notes"])


def _small(value: float = 1.0, shape=(32, 32, 3)) -> bytes:
    rng = np.random.default_rng(int(value * 10))
    return nifti((rng.random(shape) * 100 * value).astype(np.float32))


@pytest.mark.parametrize(
    "seqs, condition, present",
    [
        (("t1n", "t2f"), "post_missing", ["t1n", "t2f"]),
        (("t2f", "t1c"), "pre_missing", ["t2f", "t1c"]),
        (("t2f", "t2w"), "flair_only", ["t2f"]),
        (("t1n", "t2f", "t1c", "t2w"), "all", ["t1n", "t2f", "t1c"]),
    ],
)
def test_small_brats_sets(client, seqs, condition, present):
    files = [(f"P-{s}.nii.gz", _small(i + 1)) for i, s in enumerate(seqs)]
    inp = ok(segment(client, files))["input"]
    assert inp["condition"] == condition and inp["sequences_present"] == present and inp["name"] == "P"
    if "t2w" in seqs:
        assert any(n.startswith("t2w not used") for n in inp["notes"])


def test_brats_set_without_flair_is_refused_plainly(client):
    r = segment(client, [("P-t1n.nii.gz", _small(1)), ("P-t1c.nii.gz", _small(2))])
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert "no FLAIR (t2f) file" in detail and "t1n, t1c" in detail and "filled with FLAIR" in detail


def test_single_volume_sequence_from_request_or_file_name(client):
    plain = ok(segment(client, ("scan.nii.gz", _small(1)), sequence="t2"))["input"]
    assert plain["condition"] == "flair_only" and plain["sequence"] == "t2" and UNRELIABLE in plain["warnings"][0]
    assert plain["read_as"].startswith("T2 only (one sequence)")
    named = ok(segment(client, ("P-t1c.nii.gz", _small(1))))["input"]
    assert named["sequence"] == "t1c" and "T1 post-contrast" in named["warnings"][0]
    default = ok(segment(client, ("scan.nii.gz", _small(1))))["input"]
    assert default["sequence"] == "flair" and default["warnings"] == []


def test_four_d_volume_channels_are_checked(client):
    g = np.random.default_rng(3).random((20, 20, 3)).astype(np.float32)
    same = ok(segment(client, ("v.nii.gz", nifti(np.stack([g, g, g], axis=3)))))["input"]
    assert same["condition"] == "flair_only" and IDENTICAL in same["notes"] and same["channels_given"] == 3
    pre = ok(segment(client, ("v.nii.gz", nifti(np.stack([g, g, g * 2], axis=3)))))["input"]
    assert pre["condition"] == "pre_missing" and pre["sequence"] is None


# ---------------------------------------------------------------- brainseg predict


def test_predict_sequence_option_prints_and_writes_how_inputs_were_read(tiny_model_dir, tmp_path, capsys):
    ins = tmp_path / "in"
    ins.mkdir()
    cv2.imwrite(str(ins / "grey.png"), grey_image())
    g = grey_image(seed=4)
    cv2.imwrite(str(ins / "same.png"), np.dstack([g, g, g]))
    (ins / "scan.nii.gz").write_bytes(_small(1))
    sets = tmp_path / "sets"
    sets.mkdir()
    (sets / "Q-t2f.nii.gz").write_bytes(_small(1))
    (sets / "Q-t1c.nii.gz").write_bytes(_small(2))
    out = tmp_path / "out"
    assert main(["predict", str(ins), str(sets), "--out", str(out), "--model-dir", str(tiny_model_dir), "--sequence", "t2"]) == 0
    printed = capsys.readouterr().out
    grey = json.loads((out / "grey_lesions.json").read_text())
    assert grey["input"].endswith("grey.png") and grey["read_as"]["sequence"] == "t2"
    assert grey["read_as"]["condition"] == "flair_only" and UNRELIABLE in grey["read_as"]["warnings"][0]
    same = json.loads((out / "same_lesions.json").read_text())["read_as"]
    assert same["condition"] == "flair_only" and IDENTICAL in same["notes"]
    scan = json.loads((out / "scan_lesions.json").read_text())["read_as"]
    assert scan["sequence"] == "t2" and scan["warnings"]
    q = json.loads((out / "Q_lesions.json").read_text())
    assert q["read_as"]["condition"] == "pre_missing" and q["read_as"]["sequence"] is None
    assert [Path(f).name for f in q["input"]] == ["Q-t2f.nii.gz", "Q-t1c.nii.gz"]
    assert (out / "Q_mask.nii.gz").is_file()
    assert "grey.png: read as T2 only (grey image)" in printed and "grey.png: warning: " in printed and UNRELIABLE in printed
    assert f"same.png: {IDENTICAL}" in printed
    assert f"Q: {PRE_MISSING}" in printed and "Q: sequence 't2' does not apply" in printed

    # Default: FLAIR, no warning; an unknown value stops argparse with exit status 2.
    assert main(["predict", str(ins / "grey.png"), "--out", str(tmp_path / "o2"), "--model-dir", str(tiny_model_dir)]) == 0
    assert "grey.png: read as FLAIR only (grey image)" in capsys.readouterr().out
    assert json.loads((tmp_path / "o2" / "grey_lesions.json").read_text())["read_as"]["warnings"] == []
    with pytest.raises(SystemExit) as e:
        main(["predict", str(ins / "grey.png"), "--out", str(tmp_path / "o3"), "--sequence", "dwi"])
    assert e.value.code == 2 and "invalid choice: 'dwi'" in capsys.readouterr().err


def test_predict_real_slice_with_pre_contrast_copied(tiny_model_dir, tmp_path, capsys, shared_data):
    img = read_image(shared_data / LESION_SLICE).copy()
    img[:, :, 0] = img[:, :, 1]
    f = tmp_path / "copied.png"
    cv2.imwrite(str(f), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    assert main(["predict", str(f), "--out", str(tmp_path / "o"), "--model-dir", str(tiny_model_dir), "--sequence", "t1"]) == 0
    read_as = json.loads((tmp_path / "o" / "copied_lesions.json").read_text())["read_as"]
    assert read_as["condition"] == "pre_missing" and read_as["notes"][0] == PRE_MISSING and read_as["warnings"] == []
    assert f"copied.png: {PRE_MISSING}" in capsys.readouterr().out


def test_predict_set_without_flair_stops_with_one_line(tiny_model_dir, tmp_path, capsys):
    (tmp_path / "R-t1n.nii.gz").write_bytes(_small(1))
    (tmp_path / "R-t1c.nii.gz").write_bytes(_small(2))
    assert main(["predict", str(tmp_path), "--out", str(tmp_path / "o"), "--model-dir", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    assert "no FLAIR (t2f) file" in err and err.strip().count("\n") == 0
