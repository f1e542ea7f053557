"""The registry schema (round trip, versions, old files), the backend rule and the precision choice."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import REPO

from brainseg.config import PostprocessConfig
from brainseg.inference import predictor, registry
from brainseg.inference.registry import EnsembleEntry, ModelEntry, PrecisionUnavailable, Registry, RegistryError

OLD_FILE = {  # registry.json as written before schema_version existed (pipeline.train_models' keys)
    "default": "unetpp",
    "selected_by": "validation",
    "models": {
        "unetpp": {
            "checkpoint": "unetpp/best.pt",
            "val_selection_score": 0.7,
            "metrics": {"per_patient_dice": 0.61, "lesion_sensitivity": None, "fp_slice_rate": 0.1},
            "train_wall_seconds": 12.5,
            "best_val_dice": 0.69,
            "epochs": 3,
            "steps": 30,
            "onnx": "unetpp/best.onnx",
        }
    },
}


def full_registry() -> Registry:
    post = PostprocessConfig(threshold=0.3, min_size=120, components_3d=True, slice_min_size=40)
    return Registry(
        default="attention_unet",
        selected_by="validation",
        brainseg_version="0.1.0",
        split={"train": ["a"], "val": ["b"], "test": ["c"]},
        ensemble=EnsembleEntry(metrics={"per_patient_dice": 0.74}, conditions={"all": {"per_patient_dice": 0.74}}, postprocess=post),
        models={
            "attention_unet": ModelEntry(
                checkpoint="attention_unet.pt",
                onnx="attention_unet.onnx",
                onnx_int8="attention_unet.int8.onnx",
                card="attention_unet.md",
                parameters=2182909,
                val_selection_score=0.75,
                metrics={"per_patient_dice": 0.785, "hd95": None},
                conditions={"flair_only": {"per_patient_dice": 0.739, "per_patient_dice_ci95": [0.66, 0.81]}},
                postprocess=post,
            ),
            "unetpp": ModelEntry(checkpoint="unetpp.pt", onnx="unetpp.onnx", val_selection_score=0.72, postprocess=PostprocessConfig(0.5, 10)),
        },
    )


def test_round_trip_keeps_every_field(tmp_path):
    reg = full_registry()
    path = registry.write_registry(tmp_path, reg)
    raw = json.loads(path.read_text())
    assert list(raw)[0] == "schema_version" and raw["schema_version"] == registry.SCHEMA_VERSION
    back = registry.read(tmp_path)
    assert back.to_json() == reg.to_json() == raw
    att = back.models["attention_unet"]
    assert att.onnx_int8 == "attention_unet.int8.onnx" and att.metrics["hd95"] is None
    assert att.postprocess == PostprocessConfig(threshold=0.3, min_size=120, components_3d=True, slice_min_size=40)
    assert back.ensemble.postprocess.min_size == 120 and back.directory == tmp_path
    assert raw["models"]["unetpp"] == {"checkpoint": "unetpp.pt", "onnx": "unetpp.onnx", "val_selection_score": 0.72, "postprocess": {
        "threshold": 0.5, "min_size": 10, "components_3d": False, "slice_min_size": None}}  # fmt: skip


def test_old_file_without_schema_version_is_read_and_written_back_the_same(tmp_path):
    (tmp_path / "registry.json").write_text(json.dumps(OLD_FILE))
    reg = registry.read(tmp_path)
    assert reg.schema_version == 1 and reg.default == "unetpp" and reg.names == ["unetpp"]
    entry = reg.models["unetpp"]
    assert entry.onnx == "unetpp/best.onnx" and entry.onnx_int8 is None and entry.postprocess is None
    assert entry.model_extra["train_wall_seconds"] == 12.5  # a training run's own facts are kept
    registry.write_registry(tmp_path, reg)
    assert json.loads((tmp_path / "registry.json").read_text()) == {"schema_version": 1, **OLD_FILE}


def test_the_shipped_registry_reads_with_the_schema():
    reg = registry.read(REPO / "models")
    assert set(reg.names) == {"unetpp", "attention_unet"} and reg.default in reg.names
    assert reg.ensemble is not None and reg.ensemble.postprocess is not None
    for name in reg.names:
        assert reg.file(name, "onnx") is not None and reg.file(name, "checkpoint") is not None


@pytest.mark.parametrize("version", [2, 0, "1", None])
def test_unknown_schema_version_is_refused_with_a_clear_message(tmp_path, version):
    (tmp_path / "registry.json").write_text(json.dumps({**OLD_FILE, "schema_version": version}))
    with pytest.raises(RegistryError) as err:
        registry.read(tmp_path)
    msg = str(err.value)
    assert "registry.json" in msg and f"schema_version {version!r}" in msg and "reads 1" in msg


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda r: r.update(default="resnet"), "default 'resnet' is not one of the registered models"),
        (lambda r: r.update(models={}), "registers no models"),
        (lambda r: r["models"]["unetpp"].update(metrics="high"), "models.unetpp.metrics"),
        (lambda r: r.pop("default"), "default: Field required"),
    ],
)
def test_a_file_that_is_not_this_schema_names_the_problem(tmp_path, edit, words):
    data = json.loads(json.dumps(OLD_FILE))
    edit(data)
    (tmp_path / "registry.json").write_text(json.dumps(data))
    with pytest.raises(RegistryError, match="not a valid registry") as err:
        registry.read(tmp_path)
    assert words in str(err.value)


def test_writer_refuses_what_the_loader_would_refuse(tmp_path):
    with pytest.raises(RegistryError):
        registry.write_registry(tmp_path, {"default": "x", "models": {"y": {"checkpoint": "y.pt"}}})
    assert not (tmp_path / "registry.json").exists()


# ---------------------------------------------------------------- the backend rule and precision


@pytest.mark.parametrize(
    "has_onnx, has_ckpt, gpu, asked, env, expected",
    [
        (True, True, False, None, None, "onnx"),  # CPU: ONNX Runtime
        (True, True, True, None, None, "torch"),  # GPU: PyTorch
        (False, True, False, None, None, "torch"),  # no ONNX file
        (True, False, True, None, None, "onnx"),  # no checkpoint
        (True, True, False, None, "torch", "torch"),  # BRAINSEG_BACKEND
        (True, True, True, "onnx", "torch", "onnx"),  # an explicit choice wins over the variable
    ],
)
def test_pick_backend(monkeypatch, has_onnx, has_ckpt, gpu, asked, env, expected):
    import brainseg.inference.backends

    monkeypatch.setattr(brainseg.inference.backends, "gpu_present", lambda: gpu)
    monkeypatch.delenv("BRAINSEG_BACKEND", raising=False)
    if env:
        monkeypatch.setenv("BRAINSEG_BACKEND", env)
    assert predictor.pick_backend(has_onnx, has_ckpt, asked) == expected


def test_bad_backend_variable_is_named(monkeypatch):
    monkeypatch.setenv("BRAINSEG_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="BRAINSEG_BACKEND"):
        predictor.pick_backend(True, True)


def test_cli_loader_and_server_engine_pick_the_same_files(tiny_model_dir, monkeypatch):
    """The same registry, the same rule: with a GPU present both load PyTorch, without one both ONNX."""
    import brainseg.inference.backends
    from brainseg.serving.engine import Engine
    from brainseg.serving.settings import Settings

    monkeypatch.delenv("BRAINSEG_BACKEND", raising=False)
    for gpu, kind in ((False, "onnx"), (True, "torch")):
        monkeypatch.setattr(brainseg.inference.backends, "gpu_present", lambda gpu=gpu: gpu)
        cli = predictor.load("unetpp", model_dir=tiny_model_dir)
        served = Engine(Settings.from_env({}, model_dir=str(tiny_model_dir))).get("unetpp")
        assert cli.backend.kind == served.backend.kind == kind and cli.path == served.path
        ens = predictor.load("ensemble", model_dir=tiny_model_dir)
        assert [m.name for m in ens.members] == ["attention_unet", "unetpp"]


def test_one_version_rule_for_a_loaded_model_a_file_and_a_registry_entry(tiny_model_dir, tmp_path):
    """``predictor.weights_version``: fp32 names the checkpoint (from a loaded model, its file or its registry entry,
    on either backend); INT8 names its own file; a fixed registry version wins in fp32; no file at all is '?'."""
    from brainseg.serving.engine import Engine
    from brainseg.serving.settings import Settings

    for f in tiny_model_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(tmp_path / "attention_unet.onnx", tmp_path / "unetpp.int8.onnx")  # any other ONNX file: another hash
    reg = registry.read(tmp_path)
    reg.models["unetpp"].onnx_int8 = "unetpp.int8.onnx"
    registry.write_registry(tmp_path, reg)
    reg = registry.read(tmp_path)
    weights, int8 = registry.file_version(tmp_path / "unetpp.pt"), registry.file_version(tmp_path / "unetpp.int8.onnx")
    assert weights != int8
    engine = Engine(Settings.from_env({}, model_dir=str(tmp_path)))
    for precision, expected in (("fp32", weights), ("int8", int8)):
        assert predictor.weights_version(precision, reg=reg, name="unetpp") == expected
        assert engine.file_version_of("unetpp", precision) == expected
        assert predictor.version(predictor.load("unetpp", model_dir=tmp_path, precision=precision)) == expected
    assert predictor.version(predictor.load("unetpp", model_dir=tmp_path, prefer_onnx=False)) == weights
    assert predictor.weights_version("fp32", tmp_path / "unetpp.onnx") == weights  # the .pt beside it
    (tmp_path / "lone.onnx").write_bytes((tmp_path / "unetpp.onnx").read_bytes())
    assert predictor.weights_version("fp32", tmp_path / "lone.onnx") == registry.file_version(tmp_path / "unetpp.onnx")
    reg.models["unetpp"].version = "v1-fixed"
    assert predictor.weights_version("fp32", reg=reg, name="unetpp") == "v1-fixed"
    assert predictor.weights_version("int8", reg=reg, name="unetpp") == int8
    assert predictor.weights_version("int8") == "?"


def test_int8_is_refused_by_name_when_a_model_has_no_int8_file(tiny_model_dir):
    reg = registry.read(tiny_model_dir)
    with pytest.raises(PrecisionUnavailable, match="'unetpp' has no INT8 version"):
        predictor.choose_file(reg, "unetpp", precision="int8")
    with pytest.raises(ValueError, match="precision must be one of fp32, int8"):
        predictor.choose_file(reg, "unetpp", precision="fp16")


def test_int8_picks_the_onnx_int8_file(tiny_model_dir, tmp_path):
    for f in tiny_model_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    shutil.copy(tmp_path / "unetpp.onnx", tmp_path / "unetpp.int8.onnx")  # any ONNX file will do for the choice
    reg = registry.read(tmp_path)
    reg.models["unetpp"].onnx_int8 = "unetpp.int8.onnx"
    registry.write_registry(tmp_path, reg)
    reg = registry.read(tmp_path)
    assert predictor.choose_file(reg, "unetpp", "auto", "int8") == (tmp_path / "unetpp.int8.onnx", "onnx")
    assert predictor.choose_file(reg, "unetpp", "auto", "fp32")[0] in (tmp_path / "unetpp.onnx", tmp_path / "unetpp.pt")
    with pytest.raises(PrecisionUnavailable, match="ONNX Runtime only"):
        predictor.choose_file(reg, "unetpp", "torch", "int8")
    assert predictor.load("unetpp", model_dir=tmp_path, precision="int8").path == str(tmp_path / "unetpp.int8.onnx")


def test_read_then_write_gives_back_the_same_file(tmp_path):
    """Scripts read the typed registry, set a field, write it back: nothing else in the file changes."""
    registry.write_registry(tmp_path, full_registry())
    text = (tmp_path / "registry.json").read_text()
    before = json.loads(text)
    reg = registry.read(tmp_path)
    assert reg.directory == tmp_path and reg.entry("unetpp").version is None
    registry.write_registry(tmp_path, reg)
    assert (tmp_path / "registry.json").read_text() == text  # byte for byte
    entry = reg.entry("unetpp")
    entry.onnx_int8, entry.default_precision, entry.int8 = "unetpp.int8.onnx", "fp32", {"drop": {"all": 0.001}}
    registry.write_registry(tmp_path, reg)
    after = json.loads((tmp_path / "registry.json").read_text())
    assert after["models"]["unetpp"] == {
        **before["models"]["unetpp"],
        "onnx_int8": "unetpp.int8.onnx",
        "default_precision": "fp32",
        "int8": {"drop": {"all": 0.001}},
    }
    assert {k: v for k, v in after.items() if k != "models"} == {k: v for k, v in before.items() if k != "models"}
    body = reg.to_json()
    body["models"]["unetpp"]["default_precision"] = "fp16"
    with pytest.raises(RegistryError, match="default_precision"):
        registry.write_registry(tmp_path, body)
