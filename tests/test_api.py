"""The FastAPI service: good inputs of every kind, every bad input a user can send, a real uvicorn.

Models are the tiny ones of ``conftest.tiny_model_dir`` (ONNX), so masks mean nothing; the
plumbing (decode, limits, inference, statistics, PNG / NIfTI out) is the real one.
"""

from __future__ import annotations

import base64
import gzip
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import cv2
import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*httpx2.*")  # starlette's TestClient notice

from fastapi.testclient import TestClient  # noqa: E402
from helpers import make_client, nifti, segment, tiff  # noqa: E402

from brainseg.io.synthetic import synthetic_png, synthetic_slice  # noqa: E402
from brainseg.serving.api import create_app  # noqa: E402
from brainseg.serving.settings import Settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
LESION_SLICE = "lgg/kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_15.tif"  # mask has 1952 lesion pixels
BRATS = "brats-met-example/BraTS-MET-00110-000-{}.nii.gz"


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with make_client(tiny_model_dir) as c:
        yield c


def png(img: np.ndarray, ext: str = ".png") -> bytes:
    arr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR) if img.ndim == 3 else img
    ok, buf = cv2.imencode(ext, arr)
    assert ok
    return buf.tobytes()


def decode_png(b64: str) -> np.ndarray:
    arr = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_UNCHANGED)
    assert arr is not None, "not a PNG"
    return arr


def assert_healthy(client) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


# ---------------------------------------------------------------- service basics


def test_health_docs_and_openapi(client):
    h = client.get("/health").json()
    assert h["models_ready"] and h["default_model"] == "attention_unet"
    assert "attention_unet" in h["loaded_models"], "the default model is preloaded at start-up"
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/segment", "/v1/models", "/health", "/v1/results/{rid}/mask.nii.gz", "/v1/results/{rid}/slice/{z}.png"):
        assert p in paths


def test_models_lists_each_model_and_the_ensemble(client):
    body = client.get("/v1/models").json()
    assert body["default"] == "attention_unet"
    by_name = {m["name"]: m for m in body["models"]}
    assert set(by_name) == {"unetpp", "attention_unet", "ensemble"}
    for name in ("unetpp", "attention_unet"):
        m = by_name[name]
        assert m["parameters"] > 1000 and m["backend"] == "onnx" and len(m["version"]) == 12
        assert m["threshold"] == 0.5 and "per_patient_dice" in m["metrics"] and "test model" in m["card"]
    ens = by_name["ensemble"]
    assert ens["members"] == ["attention_unet", "unetpp"]
    assert ens["parameters"] == by_name["unetpp"]["parameters"] + by_name["attention_unet"]["parameters"]


def test_health_without_models_still_answers(tmp_path):
    with make_client(tmp_path) as c:
        h = c.get("/health")
        assert h.status_code == 200 and h.json()["models_ready"] is False and "registry" in h.json()["problem"]
        r = segment(c, ("x.png", synthetic_png()))
        assert r.status_code == 503 and "registry" in r.json()["detail"]


def test_torch_backend_when_no_onnx_file(tiny_model_dir, tmp_path):
    """Checkpoints only (no .onnx): the engine falls back to PyTorch for that model."""
    import json
    import shutil

    for name in ("unetpp", "attention_unet"):
        shutil.copy(tiny_model_dir / f"{name}.pt", tmp_path / f"{name}.pt")
    reg = json.loads((tiny_model_dir / "registry.json").read_text())
    for entry in reg["models"].values():
        entry.pop("onnx")
    (tmp_path / "registry.json").write_text(json.dumps(reg))
    settings = Settings.from_env({}, model_dir=str(tmp_path), preload=False)
    with TestClient(create_app(settings)) as c:
        r = segment(c, ("s.png", synthetic_png()), model="unetpp")
        assert r.status_code == 200, r.text
        assert r.json()["model"]["backend"] == "torch"
        # The version names the weights (hash of the checkpoint), whichever backend runs them.
        from brainseg.serving.engine import file_version

        assert r.json()["model"]["version"] == file_version(tiny_model_dir / "unetpp.pt")


def test_unreadable_model_file_is_a_503(tiny_model_dir, tmp_path):
    import json

    (tmp_path / "attention_unet.onnx").write_bytes(b"not an onnx model")
    reg = {"default": "attention_unet", "models": {"attention_unet": {"checkpoint": "missing.pt", "onnx": "attention_unet.onnx"}}}
    (tmp_path / "registry.json").write_text(json.dumps(reg))
    with make_client(tmp_path) as c:
        r = segment(c, ("s.png", synthetic_png()))
        assert r.status_code == 503 and "cannot load" in r.json()["detail"]
        assert_healthy(c)


# ---------------------------------------------------------------- good slices


def check_slice_answer(body: dict, h: int, w: int) -> None:
    assert body["kind"] == "slice" and len(body["id"]) == 32
    assert body["model"]["name"] and body["model"]["version"]
    assert set(body["timings_ms"]) == {"decode", "inference", "answer", "store", "total"}  # a slice's network time is its batch's (not split)
    assert body["timings_ms"]["total"] >= body["timings_ms"]["inference"] > 0
    assert decode_png(body["mask_png"]).shape == (h, w)
    assert decode_png(body["overlay_png"]).shape == (h, w, 3)
    assert body["lesion_count"] == len(body["lesions"])
    assert body["lesion_area_px"] == sum(les["area_px"] for les in body["lesions"])
    for les in body["lesions"]:
        r0, c0, r1, c1 = les["bbox"]
        assert 0 <= r0 < r1 <= h and 0 <= c0 < c1 <= w and les["area_mm2"] is None


def test_segment_synthetic_png_finds_the_blob(client):
    r = segment(client, ("synthetic.png", synthetic_png(), "image/png"))
    assert r.status_code == 200, r.text
    body = r.json()
    check_slice_answer(body, 256, 256)
    assert body["model"]["name"] == "attention_unet" and body["threshold"] == 0.5 and body["tta"] is False
    # The tiny model was fitted to such blobs: the one lesion is found near where it was drawn.
    _, truth = synthetic_slice()
    mask = decode_png(body["mask_png"]) > 0
    assert body["lesion_count"] >= 1 and (mask & truth).sum() > 0.5 * truth.sum()
    # The stored result renders again, in any channel / opacity, and as a mask PNG.
    rid = body["id"]
    img = cv2.imdecode(np.frombuffer(client.get(f"/v1/results/{rid}/slice/0.png?channel=0&alpha=0.8").content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (256, 256, 3)
    raw = client.get(f"/v1/results/{rid}/slice/0.png?view=image&channel=-1")
    assert raw.headers["content-type"] == "image/png"
    m = cv2.imdecode(np.frombuffer(client.get(f"/v1/results/{rid}/mask.png").content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert (m > 0).sum() == body["lesion_area_px"]
    assert client.get(f"/v1/results/{rid}").json()["lesion_count"] == body["lesion_count"]


def test_segment_real_lgg_tiff(client, shared_data):
    r = segment(client, (Path(LESION_SLICE).name, (shared_data / LESION_SLICE).read_bytes(), "image/tiff"))
    assert r.status_code == 200, r.text
    body = r.json()
    check_slice_answer(body, 256, 256)
    assert body["input"]["dtype"] == "uint8" and body["files"] == [Path(LESION_SLICE).name]


@pytest.mark.parametrize(
    "name, make, dtype",
    [
        ("rgb.png", lambda img: png(img), "uint8"),
        ("rgb16.png", lambda img: png(img.astype(np.uint16) * 257), "uint16"),
        ("grey.png", lambda img: png(img[:, :, 1]), "uint8"),
        ("grey16.tif", lambda img: tiff(img[:, :, 1].astype(np.uint16) * 100), "uint16"),
        ("rgb.jpg", lambda img: png(img, ".jpg"), "uint8"),
        ("float.tif", lambda img: tiff(img.astype(np.float32) / 255), "float32"),
    ],
)
def test_segment_image_formats(client, name, make, dtype):
    img, _ = synthetic_slice(size=192, seed=3)
    r = segment(client, (name, make(img)))
    assert r.status_code == 200, r.text
    body = r.json()
    check_slice_answer(body, 192, 192)
    assert body["input"]["dtype"] == dtype


def test_file_type_is_sniffed_without_a_suffix(client):
    r = segment(client, ("upload", synthetic_png()))
    assert r.status_code == 200, r.text


def test_ensemble_tta_and_threshold(client):
    data = synthetic_png(seed=5)
    base = segment(client, ("s.png", data), model="ensemble").json()
    assert base["model"]["name"] == "ensemble" and base["model"]["members"] == ["attention_unet", "unetpp"]
    assert "attention_unet:" in base["model"]["version"] and "unetpp:" in base["model"]["version"]
    tta = segment(client, ("s.png", data), model="ensemble", tta="true").json()
    assert tta["tta"] is True and tta["lesion_count"] >= 1
    low = segment(client, ("s.png", data), model="unetpp", threshold=0.05).json()
    high = segment(client, ("s.png", data), model="unetpp", threshold=0.95).json()
    assert low["threshold"] == 0.05 and high["threshold"] == 0.95 and low["model"]["name"] == "unetpp"
    assert low["lesion_area_px"] >= high["lesion_area_px"]


def test_parameters_as_query_string(client):
    r = client.post("/v1/segment?model=unetpp&threshold=0.3&tta=1", files={"files": ("s.png", synthetic_png())})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["name"] == "unetpp" and body["threshold"] == 0.3 and body["tta"] is True


# ---------------------------------------------------------------- volumes


def test_single_nifti_volume_roundtrip(client):
    """A small synthetic 3-D NIfTI: mask comes back on the same grid with the same affine."""
    img, _ = synthetic_slice(size=64, seed=2)
    vol = np.stack([np.rot90(img[:, :, 1], -1).astype(np.float32) * 4] * 6, axis=2)  # (X, Y, Z)
    affine = np.array([[-0.9, 0, 0, 90], [0, 0.9, 0, -120], [0, 0, 3.0, -40], [0, 0, 0, 1]])
    r = segment(client, ("small.nii.gz", nifti(vol, affine)))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "volume" and body["slices"] == 6 and body["input"]["shape"] == [64, 64, 6]
    assert body["input"]["spacing_mm"] == pytest.approx([0.9, 0.9, 3.0])
    assert body["input"]["orientation"] == {"top": "A", "bottom": "P", "left": "R", "right": "L"}  # x flipped: LAS
    assert body["slice_lesion_area_mm2"] == [pytest.approx(a * 0.81, abs=0.01) for a in body["slice_lesion_area_px"]]
    import nibabel as nib

    mask = nib.Nifti1Image.from_bytes(gzip.decompress(client.get(body["mask_url"]).content))
    assert mask.shape == (64, 64, 6) and np.allclose(mask.affine, affine)
    assert int(np.asarray(mask.dataobj).sum()) == body["lesion_voxels"]
    # An uncompressed .nii works too.
    assert segment(client, ("small.nii", nifti(vol, affine, gz=False))).status_code == 200


def test_brats_volume_three_files(client, shared_data):
    import nibabel as nib

    files = [(Path(BRATS.format(s)).name, (shared_data / BRATS.format(s)).read_bytes()) for s in ("t1n", "t2f", "t1c")]
    r = segment(client, files)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["kind"] == "volume" and body["input"]["name"] == "BraTS-MET-00110-000"
    assert body["input"]["shape"] == [240, 240, 155] and body["slices"] == 155
    assert body["input"]["condition"] == "all" and body["input"]["sequences_present"] == ["t1n", "t2f", "t1c"]
    # stored RAS; shown as every volume is: anterior up, the patient's right on the left
    assert body["input"]["orientation"] == {"top": "A", "bottom": "P", "left": "R", "right": "L"}
    assert len(body["slice_lesion_area_px"]) == 155 and body["input"]["spacing_mm"] == [1.0, 1.0, 1.0]
    assert body["slices_with_lesion"] == [z for z, a in enumerate(body["slice_lesion_area_px"]) if a > 0]
    assert body["lesion_voxels"] == sum(body["slice_lesion_area_px"])
    assert body["lesion_volume_mm3"] == pytest.approx(body["lesion_voxels"] * 1.0)
    for les in body["lesions"]:
        assert len(les["bbox"]) == 6 and les["voxels"] > 0 and les["volume_mm3"] == pytest.approx(les["voxels"])
    assert decode_png(body["preview_png"]).shape == (240, 240, 3)
    if body["slices_with_lesion"]:
        assert body["preview_slice"] == int(np.argmax(body["slice_lesion_area_px"]))
    # NIfTI mask: the input's grid and affine.
    ref = nib.load(str(shared_data / BRATS.format("t1n")))
    d = client.get(body["mask_url"])
    assert d.status_code == 200 and "attachment" in d.headers["content-disposition"]
    mask = nib.Nifti1Image.from_bytes(gzip.decompress(d.content))
    assert mask.shape == ref.shape and np.allclose(mask.affine, ref.affine)
    assert int(np.asarray(mask.dataobj).sum()) == body["lesion_voxels"]
    # Any slice renders for the UI slider.
    s = client.get(f"/v1/results/{body['id']}/slice/100.png?channel=2&alpha=0.7")
    assert s.status_code == 200 and cv2.imdecode(np.frombuffer(s.content, np.uint8), 1).shape == (240, 240, 3)
    assert client.get(f"/v1/results/{body['id']}/mask.png?z=154").status_code == 200
    assert client.get(f"/v1/results/{body['id']}/slice/155.png").status_code == 404


# ---------------------------------------------------------------- bad input: 4xx, a message, still serving


def _nan_nifti() -> bytes:
    vol = np.ones((32, 32, 4), np.float32)
    vol[3, 4, 1] = np.nan
    return nifti(vol)


def _nan_tiff() -> bytes:
    img = synthetic_slice(size=64)[0].astype(np.float32)
    img[5, 5, 1] = np.inf
    return tiff(img)


def _truncated_tiff() -> bytes:
    return tiff(synthetic_slice(size=128)[0])[:3000]


def _huge_nifti_header() -> bytes:
    """A valid header claiming 2000^3 voxels, followed by almost nothing."""
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.uint8)
    return gzip.compress(hdr.binaryblock + b"\0" * 4 + b"\0" * 1000)


BAD_INPUTS = [
    # (id, files, params, status, words expected in the message)
    ("text file", [("notes.txt", b"hello, not an image")], {}, 415, ["unsupported file type", "notes.txt"]),
    ("pdf without suffix", [("scan", b"%PDF-1.4 not an image")], {}, 415, ["unsupported file type"]),
    ("dicom without a dataset", [("img.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64)], {}, 422, ["img.dcm", "nothing usable", "DICOM"]),
    ("empty file", [("empty.png", b"")], {}, 400, ["empty.png", "empty"]),
    ("corrupt png", [("bad.png", b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)], {}, 422, ["bad.png", "cannot read the image"]),
    ("truncated tiff", [("cut.tif", _truncated_tiff())], {}, 422, ["cut.tif"]),
    ("truncated nifti", [("cut.nii.gz", nifti(np.random.default_rng(0).random((40, 40, 20), np.float32))[:5000])], {}, 422, ["cut.nii.gz", "truncated"]),
    ("garbage nifti", [("junk.nii", b"x" * 400)], {}, 422, ["junk.nii", "not a NIfTI"]),
    (
        "two channels",
        [("two.tif", tiff(np.zeros((64, 64, 2), np.uint8), photometric="minisblack", planarconfig="contig"))],
        {},
        422,
        ["2 channels", "3 channels"],
    ),
    ("five channels", [("five.tif", tiff(np.zeros((64, 64, 5), np.uint8), photometric="minisblack", planarconfig="contig"))], {}, 422, ["channels"]),
    ("multi-page tiff", [("pages.tif", tiff(np.zeros((64, 64, 2), np.uint8)))], {}, 422, ["64 pages", "one slice"]),
    ("4-D volume with 5 channels", [("v.nii.gz", nifti(np.zeros((16, 16, 4, 5), np.float32)))], {}, 422, ["3 channels"]),
    ("tiny image", [("tiny.png", png(np.zeros((8, 8), np.uint8)))], {}, 422, ["at least 16 pixels"]),
    ("NaN voxels", [("nan.nii.gz", _nan_nifti())], {}, 422, ["NaN"]),
    ("inf pixels", [("inf.tif", _nan_tiff())], {}, 422, ["NaN or infinite"]),
    ("volume too large (header)", [("big.nii.gz", _huge_nifti_header())], {}, 413, ["voxels", "BRAINSEG_MAX_VOXELS"]),
    ("unknown model", [("s.png", synthetic_png())], {"model": "resnet"}, 422, ["unknown model", "unetpp", "ensemble"]),
    ("threshold above 1", [("s.png", synthetic_png())], {"threshold": "1.5"}, 422, ["threshold", "between 0 and 1"]),
    ("threshold 0", [("s.png", synthetic_png())], {"threshold": "0"}, 422, ["threshold"]),
    ("threshold negative", [("s.png", synthetic_png())], {"threshold": "-0.2"}, 422, ["threshold"]),
    ("threshold NaN", [("s.png", synthetic_png())], {"threshold": "nan"}, 422, ["threshold"]),
    ("threshold not a number", [("s.png", synthetic_png())], {"threshold": "high"}, 422, ["threshold", "number"]),
    ("tta not a bool", [("s.png", synthetic_png())], {"tta": "maybe"}, 422, ["tta"]),
    ("two slices", [("a.png", synthetic_png()), ("b.png", synthetic_png())], {}, 422, ["one slice"]),
    ("image and volume", [("a.png", synthetic_png()), ("v.nii.gz", _nan_nifti())], {}, 422, ["mixed"]),
    (
        "BraTS set without FLAIR",
        [("P-t1n.nii.gz", nifti(np.ones((16, 16, 4), np.float32))), ("P-t1c.nii.gz", nifti(np.ones((16, 16, 4), np.float32)))],
        {},
        422,
        ["no FLAIR (t2f)"],
    ),
    ("unknown sequence", [("s.png", synthetic_png())], {"sequence": "dwi"}, 422, ["sequence must be one of", "flair", "t1c"]),
    (
        "two unrelated volumes",
        [("a.nii.gz", nifti(np.ones((16, 16, 4), np.float32))), ("b.nii.gz", nifti(np.ones((16, 16, 4), np.float32)))],
        {},
        422,
        ["BraTS"],
    ),
]


@pytest.mark.parametrize("files, params, status, words", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gets_4xx_with_a_message(client, files, params, status, words):
    r = segment(client, files, **params)
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "Traceback" not in detail
    for w in words:
        assert w.lower() in detail.lower(), f"{w!r} not in {detail!r}"
    assert_healthy(client)


def test_no_file_and_wrong_content_type(client):
    r = client.post("/v1/segment", data={"model": "unetpp"})  # a urlencoded form: the wrong media type
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"] and "files" in r.json()["detail"]
    r = client.post("/v1/segment", files=[("model", (None, "unetpp"))])  # multipart, right media type, no file part
    assert r.status_code == 422 and "files" in r.json()["detail"]
    r = client.post("/v1/segment", json={"image": "base64..."})
    assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
    r = client.post("/v1/segment", files={"files": ("x", b"")}, data={})
    assert r.status_code == 400
    assert_healthy(client)


def test_size_limits(tiny_model_dir):
    with make_client(tiny_model_dir, max_upload_mb=0.05, max_pixels=100 * 100, max_voxels=20 * 20 * 20) as c:
        # Bytes: Content-Length far above the limit is refused before the body is parsed ...
        r = segment(c, ("big.png", b"\x89PNG" + os.urandom(1_300_000)))
        assert r.status_code == 413 and "larger than the limit" in r.json()["detail"] and "BRAINSEG_MAX_UPLOAD_MB" in r.json()["detail"]
        # ... and a file just above it after parsing.
        r = segment(c, ("big.png", b"\x89PNG" + os.urandom(80_000)))
        assert r.status_code == 413 and "MiB" in r.json()["detail"]
        # Pixels: read from the PNG header, before decoding.
        r = segment(c, ("s.png", synthetic_png(size=128)))
        assert r.status_code == 413 and "128x128" in r.json()["detail"] and "BRAINSEG_MAX_PIXELS" in r.json()["detail"]
        # Voxels.
        r = segment(c, ("v.nii.gz", nifti(np.zeros((30, 30, 30), np.float32))))
        assert r.status_code == 413 and "27000 voxels" in r.json()["detail"]
        # Within every limit: served.
        assert segment(c, ("s.png", synthetic_png(size=96))).status_code == 200
        assert_healthy(c)


def test_chunked_upload_over_the_limit_is_cut_off(tiny_model_dir):
    """No Content-Length (chunked body): the middleware counts bytes and answers 413."""
    with make_client(tiny_model_dir, max_upload_mb=0.05) as c:
        boundary = "XyZ"
        body = (
            (f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n').encode()
            + os.urandom(1_300_000)
            + f"\r\n--{boundary}--\r\n".encode()
        )

        def chunks():
            for i in range(0, len(body), 65536):
                yield body[i : i + 65536]

        r = c.post("/v1/segment", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert "content-length" not in {k.lower() for k in r.request.headers}
        assert r.status_code == 413 and "larger than the limit" in r.json()["detail"]
        assert_healthy(c)


def test_result_routes_reject_unknown_ids_and_bad_params(client):
    r = client.get("/v1/results/doesnotexist/mask.nii.gz")
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    rid = segment(client, ("s.png", synthetic_png())).json()["id"]
    r = client.get(f"/v1/results/{rid}/slice/0.png?channel=7")
    assert r.status_code == 422 and "channel" in r.json()["detail"]
    r = client.get(f"/v1/results/{rid}/slice/0.png?alpha=2")
    assert r.status_code == 422 and "alpha" in r.json()["detail"]
    r = client.get(f"/v1/results/{rid}/mask.nii.gz")
    assert r.status_code == 404 and "slice" in r.json()["detail"]
    assert client.get(f"/v1/results/{rid}/slice/1.png").status_code == 404
    assert_healthy(client)


def test_server_fault_is_a_500_with_an_id_logged_once(tiny_model_dir, caplog):
    """A fault in inference (not in the upload) is the server's: 500, an error id and nothing else."""
    with make_client(tiny_model_dir) as c:

        def boom(*a, **k):
            raise RuntimeError("something odd in this file")

        c.app.state.engine.run_slice = boom
        with caplog.at_level("ERROR"):
            r = segment(c, ("odd.png", synthetic_png()))
        assert r.status_code == 500
        body = r.json()
        assert set(body) == {"detail", "error_id"} and len(body["error_id"]) == 12
        assert "odd" not in r.text and "RuntimeError" not in r.text
        logged = [rec for rec in caplog.records if rec.levelname == "ERROR"]
        assert len(logged) == 1 and body["error_id"] in logged[0].getMessage() and logged[0].exc_info
        assert "odd.png" not in logged[0].getMessage()  # no file names (patient ids) in the log line
        assert_healthy(c)


# ---------------------------------------------------------------- pieces


def test_settings_from_env():
    s = Settings.from_env({"BRAINSEG_MAX_UPLOAD_MB": "5", "BRAINSEG_CORS_ORIGINS": "http://a.org, http://b.org", "BRAINSEG_PRELOAD": "0"})
    assert s.max_upload_bytes == 5 * 2**20 and s.cors_origins == ["http://a.org", "http://b.org"] and s.preload is False
    with pytest.raises(ValueError, match="BRAINSEG_MAX_PIXELS: Input should be greater than 0"):
        Settings.from_env({"BRAINSEG_MAX_PIXELS": "-3"})


def test_cors_header(tiny_model_dir):
    with make_client(tiny_model_dir, cors_origins="http://viewer.example") as c:
        r = c.get("/health", headers={"Origin": "http://viewer.example"})
        assert r.headers.get("access-control-allow-origin") == "http://viewer.example"
        r = c.get("/health", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers


# ---------------------------------------------------------------- torch-free serving, real uvicorn


def test_serving_process_does_not_import_torch(tiny_model_dir):
    """With ONNX models, import the app and segment once in a fresh interpreter: no torch."""
    code = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "from fastapi.testclient import TestClient\n"
        "from app import app\n"
        "from brainseg.io.synthetic import synthetic_png\n"
        "with TestClient(app) as c:\n"
        "    r = c.post('/v1/segment', files={'files': ('s.png', synthetic_png())})\n"
        "    assert r.status_code == 200, r.text\n"
        "    assert c.get('/v1/models').status_code == 200\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print('TORCH' if bad else 'NO_TORCH', bad[:5])\n"
    )
    from conftest import server_env

    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=server_env(tiny_model_dir), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "NO_TORCH" in out.stdout, out.stdout


def test_real_uvicorn_process(api_server, shared_data):
    """A few requests against ``uvicorn app:app`` on a loopback port, some at the same time."""
    import httpx

    with httpx.Client(base_url=api_server, timeout=60) as http:
        assert http.get("/health").json()["models_ready"]
        assert http.get("/docs").status_code == 200
        assert {m["name"] for m in http.get("/v1/models").json()["models"]} == {"unetpp", "attention_unet", "ensemble"}
        tif = (shared_data / LESION_SLICE).read_bytes()
        r = http.post("/v1/segment", files={"files": ("slice.tif", tif)}, data={"model": "ensemble"})
        assert r.status_code == 200, r.text
        assert http.get(f"/v1/results/{r.json()['id']}/slice/0.png").headers["content-type"] == "image/png"
        bad = http.post("/v1/segment", files={"files": ("x.txt", b"text")})
        assert bad.status_code == 415 and "unsupported" in bad.json()["detail"]

    results: list[int] = []

    def one(i):
        with httpx.Client(base_url=api_server, timeout=60) as h:
            results.append(h.post("/v1/segment", files={"files": (f"s{i}.png", synthetic_png(seed=i))}).status_code)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 4


class BlockingBackend:
    """Wraps a backend; each call waits until ``release`` is set, after setting ``started``."""

    def __init__(self, inner, started: threading.Event, release: threading.Event):
        self.inner, self.started, self.release = inner, started, release

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, batch):
        self.started.set()
        self.release.wait(60)
        return self.inner(batch)


def test_health_answers_while_inference_runs(tiny_model_dir):
    """/health is answered while a segment request is inside the model (held there until /health has answered)."""
    started, release = threading.Event(), threading.Event()
    safety = threading.Timer(30, release.set)  # a /health that waits for inference fails below instead of hanging
    answer: dict = {}
    with make_client(tiny_model_dir) as c:
        seg = c.app.state.engine.get()
        seg.backend = BlockingBackend(seg.backend, started, release)
        worker = threading.Thread(target=lambda: answer.update(r=segment(c, ("s.png", synthetic_png()))))
        safety.start()
        worker.start()
        try:
            assert started.wait(30), "inference never started"
            health = c.get("/health")
            still_running = worker.is_alive() and not release.is_set()
        finally:
            release.set()
            safety.cancel()
            worker.join(60)
    assert still_running, "inference had finished (or the safety timer fired) before /health answered"
    assert health.status_code == 200 and health.json()["status"] == "ok", health.text
    assert answer["r"].status_code == 200, answer["r"].text


def test_the_library_reads_its_variables_through_pydantic_settings(monkeypatch, tmp_path):
    """``config.Environment`` is the one reader of the library's BRAINSEG_* variables: the process environment, an
    empty variable as unset, a bad value named, the service's settings built on it."""
    from brainseg.config import Environment, default_data_root
    from brainseg.inference.predictor import requested_backend
    from brainseg.inference.registry import default_model_dir

    monkeypatch.setenv("BRAINSEG_MODEL_DIR", str(tmp_path))
    monkeypatch.setenv("BRAINSEG_DATA", str(tmp_path / "lgg"))
    monkeypatch.setenv("BRAINSEG_BACKEND", "")
    assert default_model_dir() == tmp_path and default_data_root() == str(tmp_path / "lgg") and requested_backend() == "auto"
    assert Settings.from_env().model_dir == str(tmp_path)  # the service reads the same variable the same way
    monkeypatch.setenv("BRAINSEG_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="BRAINSEG_BACKEND"):
        requested_backend()
    assert Environment.read({"BRAINSEG_LOG_FORMAT": "json"}).log_format == "json"  # a mapping instead of the environment
    assert Environment.read({}).model_dir is None
