"""The ``precision`` form field of POST /v1/segment: fp32, the model's INT8 file, or (left out) the registry's default.

The tiny test models are quantised here (static INT8, calibrated on synthetic slices) for the
Attention U-Net only, so the Nested U-Net shows what a model without an INT8 file answers.
"""

from __future__ import annotations

import base64
import shutil

import cv2
import numpy as np
import pytest
from helpers import make_client, segment

from brainseg.evaluation.metrics import dice
from brainseg.inference import predictor, registry
from brainseg.io.synthetic import synthetic_png, synthetic_slice

INT8_FILE = "attention_unet.int8.onnx"


def quantise(src, dst) -> None:
    """INT8 copy of a tiny ONNX model, calibrated on its own preprocessing of synthetic slices."""
    from brainseg.inference.backends import OnnxBackend
    from brainseg.inference.export import quantize_int8
    from brainseg.preprocessing import preprocess_slice

    cfg = OnnxBackend(src, threads=1).config.preprocess
    inputs = np.stack([preprocess_slice(synthetic_slice(seed=s)[0], cfg) for s in range(8)])
    quantize_int8(src, inputs, dst)


@pytest.fixture(scope="module")
def int8_model_dir(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8_models")
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    quantise(out / "attention_unet.onnx", out / INT8_FILE)
    reg = registry.read(out)
    reg.models["attention_unet"].onnx_int8 = INT8_FILE
    registry.write_registry(out, reg)
    return out


@pytest.fixture(scope="module")
def client(int8_model_dir):
    with make_client(int8_model_dir) as c:
        yield c


def mask_of(body: dict) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED) > 0


def test_int8_runs_the_int8_file_and_says_so(client, int8_model_dir):
    data = synthetic_png()
    fp32 = segment(client, ("s.png", data), model="attention_unet")
    int8 = segment(client, ("s.png", data), model="attention_unet", precision="int8")
    assert fp32.status_code == 200 and int8.status_code == 200, int8.text
    a, b = fp32.json()["model"], int8.json()["model"]
    assert a["precision"] == "fp32" and b["precision"] == "int8" and b["backend"] == "onnx"
    assert b["version"] == registry.file_version(int8_model_dir / INT8_FILE) != a["version"]
    assert mask_of(fp32.json()).any() and dice(mask_of(int8.json()), mask_of(fp32.json())) > 0.8
    stored = client.get(f"/v1/results/{int8.json()['id']}").json()
    assert stored["model"]["precision"] == "int8"


def test_default_precision_is_fp32_and_the_query_string_works(client):
    assert segment(client, ("s.png", synthetic_png())).json()["model"]["precision"] == "fp32"
    r = client.post("/v1/segment?precision=int8", files=[("files", ("s.png", synthetic_png()))])
    assert r.status_code == 200 and r.json()["model"]["precision"] == "int8"


@pytest.mark.parametrize("value", ["fp16", "INT4", "<script>", "1"])
def test_unknown_precision_is_a_422_without_echo(client, value):
    r = segment(client, ("s.png", synthetic_png()), precision=value)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert detail.startswith("precision must be fp32 or int8") and value not in detail


@pytest.mark.parametrize("model", ["unetpp", "ensemble"])
def test_a_model_without_an_int8_file_is_a_422_that_says_so(client, model):
    r = segment(client, ("s.png", synthetic_png()), model=model, precision="int8")
    assert r.status_code == 422
    assert r.json()["detail"] == "model 'unetpp' has no INT8 version (no onnx_int8 in its registry); use precision fp32"


def test_models_lists_the_precisions_of_each_model(client):
    by_name = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert by_name["attention_unet"]["precisions"] == ["fp32", "int8"]
    assert by_name["unetpp"]["precisions"] == ["fp32"] and by_name["ensemble"]["precisions"] == ["fp32"]
    assert {m["default_precision"] for m in by_name.values()} == {"fp32"}  # the registry recommends no INT8 here


@pytest.fixture(scope="module")
def int8_default_dir(int8_model_dir, tmp_path_factory):
    """The same models, the registry recommending INT8 for the Attention U-Net (as scripts/ship_int8.py does)."""
    out = tmp_path_factory.mktemp("int8_default")
    for f in int8_model_dir.iterdir():
        shutil.copy(f, out / f.name)
    reg = registry.read(out)
    reg.models["attention_unet"].default_precision = "int8"
    reg.models["unetpp"].default_precision = "int8"  # recommended, but it has no INT8 file: fp32
    registry.write_registry(out, reg)
    return out


def test_a_request_without_precision_gets_the_registry_default(int8_default_dir):
    with make_client(int8_default_dir) as c:
        served = {m: segment(c, ("s.png", synthetic_png()), model=m).json()["model"]["precision"] for m in ("attention_unet", "unetpp", "ensemble")}
        assert served == {"attention_unet": "int8", "unetpp": "fp32", "ensemble": "fp32"}
        assert segment(c, ("s.png", synthetic_png())).json()["model"]["precision"] == "int8"  # the default model
        assert segment(c, ("s.png", synthetic_png()), precision="fp32").json()["model"]["precision"] == "fp32"
        by_name = {m["name"]: m for m in c.get("/v1/models").json()["models"]}
        assert by_name["attention_unet"]["default_precision"] == "int8" and by_name["unetpp"]["default_precision"] == "fp32"


def test_int8_is_not_the_default_where_the_fp32_model_runs_on_pytorch(int8_default_dir):
    reg = registry.read(int8_default_dir)
    assert predictor.served_precision(reg, "attention_unet", "onnx") == "int8"
    assert predictor.served_precision(reg, "attention_unet", "torch") == "fp32"  # e.g. a GPU machine


def test_fp32_and_int8_of_one_model_are_loaded_side_by_side(client):
    engine = client.app.state.engine
    fp32, int8 = engine.get("attention_unet"), engine.get("attention_unet", "int8")
    assert fp32 is not int8 and fp32.precision == "fp32" and int8.precision == "int8"
    assert int8.path.endswith(INT8_FILE) and engine.get("attention_unet", "int8") is int8
