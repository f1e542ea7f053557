"""Flip TTA as a model's shipped default, at its own calibrated post-processing (``scripts/ship_tta.py``).

A model folder like the shipped one whose Attention U-Net carries ``inference: {tta: true, tta_postprocess: ...}`` and
whose U-Net++ carries nothing: every entry point (the API through HTTP, the page, the CLI, batch jobs) runs TTA where the
caller does not say, at the TTA calibration, and the plain calibration where it says ``tta=false``; a model without a TTA
calibration keeps the old behaviour. The script itself runs end to end on the tiny models and a synthetic dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import onnx
import pytest
from conftest import start_api, stop
from helpers import script, synthetic_dataset

from brainseg.config import ExperimentConfig, InferenceConfig, PostprocessConfig
from brainseg.inference import registry
from brainseg.inference.export import ONNX_METADATA_KEY
from brainseg.io.synthetic import synthetic_png

TTA_POST = {"threshold": 0.3, "min_size": 5, "components_3d": False, "slice_min_size": 5}
PLAIN_THRESHOLD = 0.5  # the tiny models' calibrated threshold (conftest.tiny_model_dir)


def _block(default: bool = True) -> dict:
    """A ``tta`` block as ``ship_tta.ship_one`` makes it (numbers made up for the fixture; the script's own run is below)."""
    verdict = {"replaces": default, "reason": "validation gain", "gain": 0.02, "gain_ci95": [0.01, 0.03], "fp_slices": 1, "fp_budget_slices": 2}
    validation = {"patients": 3, "score_without": 0.6, "score_with": 0.62, "fp_slices_without": 2, "fp_slices_with": 1, "lesion_free_slices": 40}
    return {"default": default, "postprocess": dict(TTA_POST), "validation": {**validation, "verdict": verdict}, "release_rule": "test rule"}


@pytest.fixture(scope="module")
def tta_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tta_models") / "models"
    shutil.copytree(tiny_model_dir, out)
    ship = script("ship_tta.py")
    ship.write_block(registry.read(out), "attention_unet", _block())
    return out


def _onnx_config(path: Path) -> dict:
    proto = onnx.load(str(path))
    return json.loads({p.key: p.value for p in proto.metadata_props}[ONNX_METADATA_KEY])["config"]


def test_the_config_round_trips_and_picks_the_post_processing():
    cfg = ExperimentConfig(postprocess=PostprocessConfig(0.5, 10), inference=InferenceConfig(True, PostprocessConfig(**TTA_POST)))
    again = ExperimentConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.postprocess_for(True) == PostprocessConfig(**TTA_POST) and again.postprocess_for(False) == PostprocessConfig(0.5, 10)
    old = ExperimentConfig.from_dict({"postprocess": {"threshold": 0.4}})  # a model file from before: TTA off, at its one calibration
    assert old.inference == InferenceConfig() and old.postprocess_for(True) == old.postprocess_for(False) == PostprocessConfig(0.4)


def test_every_file_of_the_model_carries_it_and_the_weights_are_untouched(tta_model_dir, tiny_model_dir):
    from brainseg.models.checkpoint import load_checkpoint

    want = {"tta": True, "tta_postprocess": TTA_POST}
    assert load_checkpoint(tta_model_dir / "attention_unet.pt")["config"]["inference"] == want
    assert _onnx_config(tta_model_dir / "attention_unet.onnx")["inference"] == want
    before, after = onnx.load(str(tiny_model_dir / "attention_unet.onnx")), onnx.load(str(tta_model_dir / "attention_unet.onnx"))
    assert [t.SerializeToString() for t in before.graph.initializer] == [t.SerializeToString() for t in after.graph.initializer]
    entry = registry.read(tta_model_dir).entry("attention_unet")
    assert entry.tta["default"] is True and entry.tta["postprocess"] == TTA_POST
    card = (tta_model_dir / "attention_unet.md").read_text()
    assert card.count("<!-- tta -->") == 1 and "Served by default: TTA **on**" in card
    ship = script("ship_tta.py")
    ship.write_block(registry.read(tta_model_dir), "attention_unet", _block())  # written again: the section is replaced, not added
    assert (tta_model_dir / "attention_unet.md").read_text().count("<!-- tta -->") == 1


def test_the_api_runs_the_shipped_default_at_its_own_calibration(tta_model_dir, tmp_path):
    url, proc, _ = start_api(tta_model_dir, tmp_path / "uvicorn.log")
    try:
        listed = {m["name"]: m for m in httpx.get(url + "/v1/models", timeout=120).json()["models"]}
        assert listed["attention_unet"]["tta"] == {"default": True, "threshold": 0.3, "min_size": 5, "precision": "fp32"}
        assert listed["unetpp"]["tta"] == {"default": False, "threshold": PLAIN_THRESHOLD, "min_size": 10, "precision": "fp32"}

        def segment(**form) -> dict:
            r = httpx.post(url + "/v1/segment", files=[("files", ("s.png", synthetic_png(), "image/png"))], data=form, timeout=300)
            assert r.status_code == 200, r.text
            return r.json()

        cases = [
            ({"model": "attention_unet"}, True, 0.3),  # not said: the shipped default, at the TTA calibration
            ({"model": "attention_unet", "tta": ""}, True, 0.3),
            ({"model": "attention_unet", "tta": "false"}, False, PLAIN_THRESHOLD),
            ({"model": "attention_unet", "tta": "true"}, True, 0.3),
            ({"model": "unetpp"}, False, PLAIN_THRESHOLD),  # no TTA calibration shipped: as before
            ({"model": "unetpp", "tta": "true"}, True, PLAIN_THRESHOLD),
            ({"model": "ensemble"}, False, PLAIN_THRESHOLD),
        ]
        for form, tta, threshold in cases:
            body = segment(**form)
            assert (body["tta"], body["threshold"]) == (tta, threshold), form
        assert segment(model="attention_unet", threshold="0.7")["threshold"] == 0.7  # the caller's threshold still wins
        r = httpx.post(url + "/v1/segment", files=[("files", ("s.png", synthetic_png(), "image/png"))], data={"tta": "perhaps"}, timeout=60)
        assert r.status_code == 422 and "tta must be true or false" in r.json()["detail"]
    finally:
        stop(proc)


def test_the_cli_and_batch_jobs_follow_the_same_rule(tta_model_dir):
    from brainseg.cli import _load_model, _post, build_parser
    from brainseg.inference.batch import ModelSpec
    from brainseg.inference.predictor import load

    for flags, tta, threshold in (([], True, 0.3), (["--no-tta"], False, PLAIN_THRESHOLD), (["--tta"], True, 0.3)):
        args = build_parser().parse_args(["predict", "x.png", "--out", "o", "--model-dir", str(tta_model_dir), *flags])
        seg = _load_model(args)
        assert (args.tta, _post(args, seg).threshold) == (tta, threshold), flags
    args = build_parser().parse_args(["predict", "x.png", "--out", "o", "--model-dir", str(tta_model_dir), "--model", "unetpp"])
    _load_model(args)
    assert args.tta is False
    seg = load("attention_unet", model_dir=tta_model_dir)
    assert ModelSpec(model_dir=str(tta_model_dir)).with_tta(seg) is True
    assert ModelSpec(model_dir=str(tta_model_dir)).post(seg).threshold == 0.3
    assert ModelSpec(model_dir=str(tta_model_dir), tta=False).post(seg).threshold == PLAIN_THRESHOLD


def test_the_page_presets_each_models_default(monkeypatch, tta_model_dir, tmp_path):
    from test_streamlit import no_page_crash, run_app, texts

    url, proc, _ = start_api(tta_model_dir, tmp_path / "uvicorn.log")
    try:
        at = run_app(monkeypatch, url)
        box = at.sidebar.checkbox(key="tta_attention_unet")
        assert box.value is True and "(default)" in box.label
        assert any("0.3" in c.label for c in at.sidebar.checkbox if c.key == "use_calibrated_attention_unet")
        at.button(key="synthetic").click().run()
        no_page_crash(at)
        assert (at.session_state["result"]["tta"], at.session_state["result"]["threshold"]) == (True, 0.3)
        assert any("TTA on" in c for c in texts(at.caption))
        at.sidebar.checkbox(key="tta_attention_unet").uncheck().run()
        no_page_crash(at)
        assert (at.session_state["result"]["tta"], at.session_state["result"]["threshold"]) == (False, PLAIN_THRESHOLD)
        at.sidebar.selectbox(key="model").set_value("unetpp").run()
        assert at.sidebar.checkbox(key="tta_unetpp").value is False
    finally:
        stop(proc)


def test_the_script_end_to_end_on_tiny_models(tiny_model_dir, tmp_path):
    """Calibrate with and without TTA on the validation patients, judge, check, write: the files carry what the
    block says, and a TTA that does not pay stays off by default."""
    import torch

    from brainseg.io.datasets import discover, labelled, split_patients
    from brainseg.models.checkpoint import load_checkpoint

    torch.set_num_threads(1)
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir, models)
    data = synthetic_dataset(tmp_path / "data", patients=5, slices=4, size=64)
    ids = [p.id for p in labelled(discover(data)).patients]
    (models / "split.json").write_text(json.dumps(split_patients(ids, n_val=2, n_test=2, seed=0)))
    ship = script("ship_tta.py")
    out = tmp_path / "tta.json"
    assert ship.main(["--data", str(data), "--model-dir", str(models), "--models", "attention_unet", "--limit", "2", "--json", str(out)]) == 0
    block = json.loads(out.read_text())["attention_unet"]
    assert set(block) >= {"default", "postprocess", "validation", "release_rule"}
    verdict = block["validation"]["verdict"]
    assert block["default"] <= verdict["replaces"]  # on by default only where it pays on validation ...
    if block["default"]:
        assert block["release_check"]["passes"]  # ... and passes the test check
    inference = load_checkpoint(models / "attention_unet.pt")["config"]["inference"]
    assert inference == {"tta": block["default"], "tta_postprocess": block["postprocess"]}
    assert _onnx_config(models / "attention_unet.onnx")["inference"] == inference
    assert registry.read(models).entry("attention_unet").tta == block


def test_the_script_says_what_is_wrong_in_one_line(tiny_model_dir, tmp_path, capsys):
    ship = script("ship_tta.py")
    assert ship.main(["--data", str(tmp_path / "nowhere"), "--model-dir", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ship_tta: error:") and "\n" not in err


def test_runs_with_tta_are_served_in_int8_only_where_int8_holds_with_tta(tta_model_dir):
    """INT8 can hold without TTA and not with it (the shipped Attention U-Net): a request that names no precision then
    runs fp32 with TTA (its default) and INT8 without."""
    from brainseg.inference.predictor import served_precision

    reg = registry.read(tta_model_dir)
    entry = reg.entry("attention_unet")
    entry.default_precision, entry.onnx_int8 = "int8", "attention_unet.int8.onnx"
    entry.tta = dict(entry.tta, int8={"holds": False})
    assert served_precision(reg, "attention_unet") == served_precision(reg, "attention_unet", tta=True) == "fp32"
    assert served_precision(reg, "attention_unet", tta=False) == "int8"
    entry.tta["int8"]["holds"] = True
    assert served_precision(reg, "attention_unet") == "int8"
    entry.tta = dict(entry.tta, default=False, int8={"holds": False})
    assert served_precision(reg, "attention_unet") == "int8"  # TTA off by default: the one-pass rule
    assert served_precision(reg, "unetpp", tta=True) == "fp32"  # no INT8 recommended at all


def test_a_registry_that_disagrees_with_its_model_file_is_refused_loudly(tta_model_dir, tmp_path, capsys):
    """The TTA default has two copies: the file's (``inference.tta``, which decides the run) and the registry's (which
    chooses the precision before the file is read). Where a hand edit makes them disagree, loading the model says so:
    the loader raises, the CLI prints one line, the API answers 503 with a message and names no server path (the other model still serves; the model listing fails
    closed)."""
    from brainseg.cli import main
    from brainseg.inference.predictor import load

    edited = tmp_path / "models"
    shutil.copytree(tta_model_dir, edited)
    raw = json.loads((edited / registry.REGISTRY).read_text())
    raw["models"]["attention_unet"]["tta"]["default"] = False  # the file still says on
    (edited / registry.REGISTRY).write_text(json.dumps(raw))
    with pytest.raises(registry.RegistryError, match=r"registry.json says flip TTA is off by default but attention_unet\.(onnx|pt) says on"):
        load("attention_unet", model_dir=edited)
    load("unetpp", model_dir=edited)  # the other model agrees with its file and still loads

    png = tmp_path / "s.png"
    png.write_bytes(synthetic_png())
    assert main(["predict", str(png), "--out", str(tmp_path / "out"), "--model-dir", str(edited)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("brainseg: error: model 'attention_unet'") and "ship_tta.py" in err and "\n" not in err

    url, proc, _ = start_api(edited, tmp_path / "uvicorn.log")
    try:
        r = httpx.post(url + "/v1/segment", files=[("files", ("s.png", synthetic_png(), "image/png"))], timeout=60)
        assert r.status_code == 503, r.text
        assert "disagree" in r.json()["detail"] and str(tmp_path) not in r.text
        ok = httpx.post(url + "/v1/segment", files=[("files", ("s.png", synthetic_png(), "image/png"))], data={"model": "unetpp"}, timeout=60)
        assert ok.status_code == 200, ok.text
        listed = httpx.get(url + "/v1/models", timeout=60)  # the release is inconsistent: the listing fails closed, and says why
        assert listed.status_code == 503 and "disagree" in listed.json()["detail"]
    finally:
        stop(proc)
