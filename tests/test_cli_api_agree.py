"""The CLI and the API read a slice with one decoder and name the weights by one rule (issue 17): the same files give
the same arrays through both, and the same slice gives the same mask and the same model version through
``brainseg predict`` and ``POST /v1/segment`` (a real uvicorn process)."""

from __future__ import annotations

import base64
import io
import json

import cv2
import numpy as np
import pytest
import tifffile
from helpers import require

from brainseg.io.channels import stored_channels
from brainseg.io.datasets import DataError, read_slice, to_three_channels
from brainseg.serving.uploads import Limits, Upload, UploadError, decode_slice_channels


def _png(arr: np.ndarray) -> bytes:
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR)
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = cv2.cvtColor(arr, cv2.COLOR_RGBA2BGRA)
    return cv2.imencode(".png", arr)[1].tobytes()


def _tiff(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    grey8 = rng.integers(0, 255, (40, 48), dtype=np.uint8)
    rgb8 = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
    return {
        "grey.png": _png(grey8),
        "rgb.png": _png(rgb8),
        "rgba.png": _png(rng.integers(0, 255, (40, 48, 4), dtype=np.uint8)),
        "grey16.tif": _tiff(rng.integers(0, 4000, (40, 48), dtype=np.uint16)),
        "rgb.tif": _tiff(rgb8, compression="zlib"),
        "planar.tif": _tiff(rng.integers(0, 4000, (3, 40, 48), dtype=np.uint16), planarconfig="separate"),
        "float.tif": _tiff(rng.normal(300, 50, (40, 48)).astype(np.float32)),
        "rgb.jpg": cv2.imencode(".jpg", rgb8)[1].tobytes(),
    }


@pytest.mark.parametrize("name", sorted(_files()))
def test_the_cli_and_the_api_decode_a_slice_to_the_same_array(name, tmp_path):
    data = _files()[name]
    path = tmp_path / name
    path.write_bytes(data)
    raw = read_slice(path)  # the CLI (predict._predict_slice)
    cli_img, cli_stored = to_three_channels(raw, path), stored_channels(raw)
    api_img, api_stored = decode_slice_channels(Upload(name, data), Limits())  # the API
    assert cli_img.dtype == api_img.dtype and cli_img.shape == api_img.shape == (40, 48, 3)
    assert np.array_equal(cli_img, api_img) and cli_stored == api_stored


def test_a_tiff_of_several_pages_is_refused_by_both(tmp_path):
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:  # three pages (a small volume), not a planar slice
        for k in range(3):
            tif.write(np.full((40, 48), k, np.uint8))
    data = buf.getvalue()
    path = tmp_path / "pages.tif"
    path.write_bytes(data)
    with pytest.raises(DataError, match="3 pages; send one slice per file"):
        read_slice(path)
    with pytest.raises(UploadError, match="3 pages; send one slice per file"):
        decode_slice_channels(Upload("pages.tif", data), Limits())


def test_cli_and_api_give_the_same_mask_and_version(api_server, tiny_model_dir, shared_data, tmp_path, capsys):
    import httpx

    from brainseg.cli import main

    slice_path = require(shared_data / "lgg/kaggle_3m/TCGA_HT_7473_19970826/TCGA_HT_7473_19970826_14.tif")
    assert main(["predict", str(slice_path), "--model-dir", str(tiny_model_dir), "--out", str(tmp_path)]) == 0
    stem = slice_path.stem
    cli_mask = cv2.imread(str(tmp_path / f"{stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    cli = json.loads((tmp_path / f"{stem}_lesions.json").read_text())
    r = httpx.post(api_server + "/v1/segment", files=[("files", (slice_path.name, slice_path.read_bytes()))], timeout=60)
    assert r.status_code == 200, r.text
    body = r.json()
    png = base64.b64decode(body["mask_png"])
    api_mask = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_GRAYSCALE) > 0
    assert cli["model"] == body["model"]["name"] and cli["precision"] == body["model"]["precision"]
    assert cli["version"] == body["model"]["version"] != "unknown"
    assert cli_mask.shape == api_mask.shape and np.array_equal(cli_mask, api_mask)
    assert cli_mask.any()  # the tiny model marks something on this lesion slice, so equality says something
