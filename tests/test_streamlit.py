"""The Streamlit page, run by ``streamlit.testing.v1.AppTest`` against a real API process."""

from __future__ import annotations

import gzip
import subprocess
import sys
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*ScriptRunContext.*")

from conftest import REPO, free_port  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from brainseg.io.synthetic import SYNTHETIC_LABEL  # noqa: E402

APP = str(REPO / "streamlit_app.py")
LESION_SLICE = "lgg/kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_15.tif"


def run_app(monkeypatch, api_url: str) -> AppTest:
    monkeypatch.setenv("BRAINSEG_API_URL", api_url)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def no_page_crash(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not any("Something went wrong" in t for t in texts(at.error)), texts(at.error)


def test_page_renders_and_says_when_the_api_is_down(monkeypatch):
    at = run_app(monkeypatch, f"http://127.0.0.1:{free_port()}")
    assert "Brain MRI lesion segmentation" in texts(at.title)
    assert any("not for diagnosis" in c for c in texts(at.caption))
    errors = " ".join(texts(at.error))
    assert "Cannot reach the API" in errors and "uvicorn app:app" in errors
    # The synthetic example button does not crash the page either.
    at.button(key="synthetic").click().run()
    no_page_crash(at)
    assert "Cannot reach the API" in " ".join(texts(at.error))


def test_both_pages_use_the_one_client_and_its_messages(monkeypatch):
    """streamlit_app.py and pages/1_Follow-up.py talk to the API only through ``brainseg.serving.client``: one key
    header, one wording of an unreachable API, a refusal, a server fault (with its error id) and a missing key."""
    import ast

    import httpx

    from brainseg.serving import client

    for page in (REPO / "streamlit_app.py", REPO / "pages" / "1_Follow-up.py"):
        tree = ast.parse(page.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        from_client = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module == "brainseg.serving.client" for a in n.names}
        assert "httpx" not in imported and {"ApiError", "api_request"} <= from_client, page.name
    sent = []

    def answer(status, body=None, text=""):
        def request(method, url, timeout, **kwargs):
            sent.append(kwargs.get("headers", {}))
            return httpx.Response(status, json=body) if body is not None else httpx.Response(status, text=text)

        monkeypatch.setattr(httpx, "request", request)

    monkeypatch.setenv("BRAINSEG_API_KEY", " k1 , k2")
    answer(200, {"ok": True})
    assert client.api_request("http://x", "GET", "/health").json() == {"ok": True} and sent[-1] == {"X-API-Key": "k1"}
    cases = [
        (
            401,
            {"detail": "missing API key"},
            "The API refused the request (HTTP 401): missing API key (the page sends the key in its own environment variable BRAINSEG_API_KEY)",
        ),
        (500, {"detail": "internal error", "error_id": "e1"}, "The API failed on the request (HTTP 500): internal error (error id: e1)"),
        (413, None, "The API refused the request (HTTP 413): Request Entity Too Large"),
    ]
    for status, body, message in cases:
        answer(status, body)
        with pytest.raises(client.ApiError) as err:
            client.api_request("http://x", "POST", "/v1/compare")
        assert str(err.value) == message
    monkeypatch.undo()
    monkeypatch.delenv("BRAINSEG_API_KEY", raising=False)
    base = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(client.ApiError, match=r"Cannot reach the API at .*uvicorn app:app.*in the sidebar"):
        client.api_request(base, "GET", "/health", timeout=5)


def test_followup_page_renders_without_the_api(monkeypatch):
    """The Follow-up page (``pages/1_Follow-up.py``) renders on its own; Compare waits for both studies."""
    monkeypatch.setenv("BRAINSEG_API_URL", f"http://127.0.0.1:{free_port()}")
    at = AppTest.from_file(str(REPO / "pages" / "1_Follow-up.py"), default_timeout=120)
    at.run()
    no_page_crash(at)
    assert "Follow-up comparison" in texts(at.title)
    assert at.button[0].disabled and any("Upload a baseline and a follow-up" in t for t in texts(at.info))


def test_wrong_api_url_shows_the_http_error(monkeypatch, api_server):
    at = run_app(monkeypatch, api_server + "/not-the-api")
    errors = " ".join(texts(at.error))
    assert "HTTP 404" in errors
    no_page_crash(at)


def test_synthetic_example_end_to_end(monkeypatch, api_server):
    at = run_app(monkeypatch, api_server)
    assert any("Connected" in s for s in texts(at.sidebar.success))
    assert at.sidebar.selectbox(key="model").value == "attention_unet"
    assert set(at.sidebar.selectbox(key="model").options) >= {"Attention U-Net  (default)", "Ensemble (mean probability)"}
    assert any("Upload a file" in i for i in texts(at.info))

    at.button(key="synthetic").click().run()
    no_page_crash(at)
    assert not at.error, texts(at.error)
    assert any(SYNTHETIC_LABEL in w for w in texts(at.warning))
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Lesions"]) >= 1 and metrics["Image"] == "256 × 256"
    assert len(at.dataframe) == 1 and len(at.dataframe[0].value) == int(metrics["Lesions"])
    labels = {b.label for b in at.get("download_button")}
    assert {"Mask PNG", "Overlay PNG", "Lesions JSON"} <= labels

    # Display and model settings re-render without errors; the model choice reaches the API.
    assert at.radio(key="channel").value == "FLAIR"
    at.slider(key="alpha").set_value(0.8).run()
    at.radio(key="channel").set_value("Post-contrast").run()
    at.radio(key="overlay").set_value("Contour").run()
    at.slider(key="zoom").set_value(2.0).run()
    no_page_crash(at)
    at.sidebar.selectbox(key="model").set_value("ensemble").run()
    at.sidebar.checkbox(key="use_calibrated_ensemble").uncheck().run()
    at.sidebar.slider(key="threshold_ensemble").set_value(0.3).run()
    no_page_crash(at)
    assert not at.error, texts(at.error)
    assert any("Ensemble" in c and "threshold 0.3" in c for c in texts(at.caption))

    # A result the server no longer has (restart, eviction): a clear message and a way to redo it.
    at.session_state["result"] = dict(at.session_state["result"], id="forgotten")
    at.run()
    assert any("HTTP 404" in e and "recent results" in e for e in texts(at.error))
    at.button(key="resegment").click().run()
    no_page_crash(at)
    assert not at.error and at.session_state["result"]["id"] != "forgotten"


def test_upload_real_slice_and_a_volume(monkeypatch, api_server, shared_data):
    at = run_app(monkeypatch, api_server)
    at.file_uploader(key="uploads").upload("slice.tif", (shared_data / LESION_SLICE).read_bytes(), "image/tiff").run()
    no_page_crash(at)
    assert "Result · slice.tif" in texts(at.subheader)
    assert any("**Read as:** pre-contrast T1, FLAIR, post-contrast T1" in m for m in texts(at.markdown))

    import nibabel as nib

    from brainseg.io.synthetic import synthetic_slice

    img, _ = synthetic_slice(size=128)
    vol = np.stack([np.rot90(img[:, :, 1], -1).astype(np.float32) * (k > 0) for k in range(5)], axis=2)  # slice 0 empty
    nii = gzip.compress(nib.Nifti1Image(vol, np.diag([1.2, 1.2, 5.0, 1.0])).to_bytes())
    at.file_uploader(key="uploads").set_value(("small.nii.gz", nii, "application/gzip")).run()
    no_page_crash(at)
    assert not at.error, texts(at.error)
    assert at.slider(key="z").max == 4
    labels = {b.label for b in at.get("download_button")}
    assert "NIfTI mask (.nii.gz)" in labels
    # Jump to the last slice with lesion, then step back to the previous one with the ◀ button.
    jump = at.selectbox(key="jump")
    with_lesion = [int(o.split()[1]) for o in jump.options]
    assert with_lesion and 0 not in with_lesion
    jump.set_value(with_lesion[-1]).run()
    assert at.slider(key="z").value == with_lesion[-1]
    if len(with_lesion) > 1:
        at.button(key="prev_lesion").click().run()
        assert at.slider(key="z").value == with_lesion[-2]


def test_grey_upload_says_how_it_is_read_and_warns_for_other_sequences(monkeypatch, api_server):
    import cv2

    from brainseg.io.synthetic import synthetic_slice

    ok, buf = cv2.imencode(".png", synthetic_slice(size=128)[0][:, :, 1])
    at = run_app(monkeypatch, api_server)
    assert "sequence" not in [sb.key for sb in at.selectbox]  # the choice appears with an upload
    at.file_uploader(key="uploads").upload("grey.png", buf.tobytes(), "image/png").run()
    no_page_crash(at)
    assert at.selectbox(key="sequence").value == "flair"
    assert any("**Read as:** FLAIR only (grey image)" in m for m in texts(at.markdown))
    assert not any("unreliable" in w for w in texts(at.warning))
    at.selectbox(key="sequence").set_value("t2").run()
    no_page_crash(at)
    assert any("**Read as:** T2 only (grey image)" in m for m in texts(at.markdown))
    assert any("T2" in w and "unreliable" in w for w in texts(at.warning)), texts(at.warning)


def test_api_error_on_a_bad_file_is_shown(monkeypatch, api_server):
    at = run_app(monkeypatch, api_server)
    at.file_uploader(key="uploads").upload("broken.png", b"\x89PNG\r\n\x1a\nnot really", "image/png").run()
    no_page_crash(at)
    errors = " ".join(texts(at.error))
    assert "HTTP 422" in errors and "broken.png" in errors


def test_page_process_does_not_import_torch(api_server):
    """The UI process runs the page (and the synthetic example) without torch or onnxruntime."""
    code = (
        "import os, sys, warnings; warnings.simplefilter('ignore')\n"
        f"os.environ['BRAINSEG_API_URL'] = {api_server!r}\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"at = AppTest.from_file({APP!r}, default_timeout=120).run()\n"
        "at.button(key='synthetic').click().run()\n"
        "assert not at.exception and not at.error, [e.value for e in at.error]\n"
        "assert at.metric, 'no result shown'\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxruntime'))\n"
        "print('LOADED' if bad else 'CLEAN', bad[:5])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CLEAN" in out.stdout, out.stdout


def test_zipped_dicom_study_shows_its_series_presets_and_seg(monkeypatch, api_server, tmp_path):
    """Three small DICOM series zipped: the channel table names the series, the header's window preset
    re-renders the image, the probability view and the DICOM SEG download are there."""
    from dicom_series import study_ids, write_series, zip_bytes

    from brainseg.io.synthetic import synthetic_slice

    flair = np.stack([np.rot90(synthetic_slice(size=64, seed=k)[0][:, :, 1], -1).astype(np.int16) for k in range(6)], axis=2)
    ids = study_ids()
    for number, desc in ((1, "AX FLAIR"), (2, "AX T1"), (3, "AX T1 +C")):
        write_series(tmp_path / "study" / desc.replace(" ", "_"), flair, np.diag([2.0, 2.0, 4.0, 1.0]), ids, number=number, description=desc, window=(120, 200))
    at = run_app(monkeypatch, api_server)
    at.file_uploader(key="uploads").upload("study.zip", zip_bytes([tmp_path / "study"]), "application/zip").run()
    no_page_crash(at)
    assert not at.error, texts(at.error)
    assert "Result · study (DICOM: 3 series)" in texts(at.subheader)
    channels = next(d.value for d in at.dataframe if "From" in d.value.columns)
    assert list(channels["From"]) == ["series 2 (AX T1)", "series 1 (AX FLAIR)", "series 3 (AX T1 +C)"]
    labels = {b.label for b in at.get("download_button")}
    assert {"NIfTI mask (.nii.gz)", "DICOM SEG (.dcm)"} <= labels
    captions = [c for img in at.get("image") for c in img.captions]
    assert [c.split(" · ")[0] for c in captions] == ["Axial", "Coronal", "Sagittal"], captions
    at.radio(key="overlay").set_value("Probability").run()
    captions = [c for img in at.get("image") for c in img.captions]
    assert any(c.startswith("Lesion probability, fixed scale 0 → 1") for c in captions), captions
    window = at.selectbox(key="window_choice")
    preset = next(o for o in window.options if "centre 120, width 200" in o)
    window.set_value(preset).run()
    no_page_crash(at)
    window.set_value("Custom").run()
    at.number_input(key="window_width").set_value(50.0).run()
    no_page_crash(at)
    assert not at.error, texts(at.error)


def test_precision_choice_reaches_the_api_with_the_shipped_int8_models(monkeypatch, tmp_path):
    from conftest import start_api, stop

    models = REPO / "models"
    if not (models / "attention_unet.int8.onnx").is_file():
        pytest.skip("the shipped INT8 models are not in models/")
    url, proc, _ = start_api(models, tmp_path / "uvicorn.log")
    try:
        at = run_app(monkeypatch, url)
        # the API says which precision each model is served in by default, for its TTA default (scripts/ship_int8.py's
        # rule, and with TTA scripts/ship_tta.py's); the page keeps the choice per TTA setting
        import httpx

        listed = {m["name"]: m for m in httpx.get(url + "/v1/models", timeout=300).json()["models"]}["attention_unet"]
        key = "precision_attention_unet" + ("_tta" if listed["tta"]["default"] else "")
        radio = at.sidebar.radio(key=key)
        served = listed["default_precision"]
        assert served == (listed["tta"]["precision"] if listed["tta"]["default"] else listed["default_precision_without_tta"])
        other = "fp32" if served == "int8" else "int8"
        label = {"fp32": "fp32", "int8": "INT8"}
        assert radio.options == [
            label["fp32"] + ("  (served default)" if served == "fp32" else ""),
            label["int8"] + ("  (served default)" if served == "int8" else ""),
        ]
        assert radio.value == served
        at.button(key="synthetic").click().run()
        no_page_crash(at)
        assert at.session_state["result"]["model"]["precision"] == served
        assert any(label[served] in c for c in texts(at.caption))
        at.sidebar.radio(key=key).set_value(other).run()
        no_page_crash(at)
        assert at.session_state["result"]["model"]["precision"] == other
    finally:
        stop(proc)


def test_a_large_slice_whose_answer_links_its_images(monkeypatch, api_server):
    """Above 512x512 pixels the API answers with links instead of base64 PNGs: the page still shows the
    slice and offers the mask PNG, fetched from the link (the same bytes the API serves there)."""
    import cv2
    import httpx

    from brainseg.io.synthetic import synthetic_slice

    ok, buf = cv2.imencode(".png", synthetic_slice(size=1024)[0][:, :, 1])
    at = run_app(monkeypatch, api_server)
    at.file_uploader(key="uploads").upload("big.png", buf.tobytes(), "image/png").run()
    no_page_crash(at)
    assert not at.error, texts(at.error)
    res = at.session_state["result"]
    assert res["images_inline"] is False and "mask_png" not in res
    assert {m.label: m.value for m in at.metric}["Image"] == "1024 × 1024"
    (mask,) = [b for b in at.get("download_button") if b.label == "Mask PNG"]
    served = httpx.get(api_server + f"/v1/results/{res['id']}/slice/0.png?view=mask", timeout=60).content
    assert mask.proto.url and cv2.imdecode(np.frombuffer(served, np.uint8), cv2.IMREAD_UNCHANGED).shape == (1024, 1024)


def test_threshold_is_kept_per_model_and_labelled_as_used(monkeypatch, api_server):
    """A custom threshold set for one model does not follow the user to another (each model starts at its calibrated one),
    and the labels say the value the API applies, unrounded."""
    import httpx

    models = {m["name"]: m for m in httpx.get(api_server + "/v1/models", timeout=120).json()["models"]}
    at = run_app(monkeypatch, api_server)
    cal = at.sidebar.checkbox(key="use_calibrated_attention_unet")
    assert cal.label == f"Calibrated threshold ({models['attention_unet']['threshold']:.4g})"
    cal.uncheck().run()
    at.sidebar.slider(key="threshold_attention_unet").set_value(0.225).run()
    at.button(key="synthetic").click().run()
    no_page_crash(at)
    assert at.session_state["result"]["threshold"] == 0.225
    assert any("threshold 0.225 " in c for c in texts(at.caption)), texts(at.caption)
    at.sidebar.selectbox(key="model").set_value("unetpp").run()
    no_page_crash(at)
    assert at.sidebar.checkbox(key="use_calibrated_unetpp").value is True
    assert at.session_state["result"]["threshold"] == round(models["unetpp"]["threshold"], 4)
    # back to the first model: reset to its calibrated threshold too (Streamlit forgets the state of widgets not shown)
    at.sidebar.selectbox(key="model").set_value("attention_unet").run()
    assert at.sidebar.checkbox(key="use_calibrated_attention_unet").value is True
    assert at.session_state["result"]["threshold"] == round(models["attention_unet"]["threshold"], 4)


def test_sequence_picker_only_where_it_is_used(monkeypatch, api_server, shared_data):
    """Hidden for a 3-channel slice (it carries its sequences), shown for a grey one."""
    import cv2

    from brainseg.io.synthetic import synthetic_slice

    at = run_app(monkeypatch, api_server)
    at.file_uploader(key="uploads").upload("slice.tif", (shared_data / LESION_SLICE).read_bytes(), "image/tiff").run()
    no_page_crash(at)
    assert "sequence" not in [sb.key for sb in at.selectbox]
    ok, buf = cv2.imencode(".png", synthetic_slice(size=96)[0][:, :, 1])
    at.file_uploader(key="uploads").set_value(("grey.png", buf.tobytes(), "image/png")).run()
    assert at.selectbox(key="sequence").value == "flair"


def test_two_models_side_by_side(monkeypatch, api_server):
    """Compare: the same input segmented by both models (two answers), both drawn, the Dice between them
    equal to one computed here from the two results' viewer arrays."""
    import httpx

    at = run_app(monkeypatch, api_server)
    at.sidebar.checkbox(key="compare").check().run()
    at.sidebar.selectbox(key="model_b").set_value("unetpp").run()
    at.button(key="synthetic").click().run()
    no_page_crash(at)
    a, b = at.session_state["result"], at.session_state["result_b"]
    assert a["model"]["name"] == "attention_unet" and b["model"]["name"] == "unetpp" and a["id"] != b["id"]
    captions = [c for img in at.get("image") for c in img.captions]
    assert [c.split(" · ")[0] for c in captions] == ["Attention U-Net", "Nested U-Net", "Agreement"], captions

    def mask(res):
        with np.load(__import__("io").BytesIO(httpx.get(api_server + res["urls"]["viewer"], timeout=60).content)) as z:
            return np.unpackbits(z["mask_bits"], axis=-1, count=z["display"].shape[2]).astype(bool)

    ma, mb = mask(a), mask(b)
    dice = 2 * (ma & mb).sum() / (ma.sum() + mb.sum()) if ma.sum() + mb.sum() else 1.0
    assert {m.label: m.value for m in at.metric}["Dice between the two models"] == f"{dice:.3f}"


def test_reference_mask_of_a_slice(monkeypatch, api_server):
    """A reference PNG of the slice's size: Dice and the area difference as computed here from the result's
    mask; one of another size is a one-line error naming the file. Nothing of it goes to the API."""
    import io

    import cv2
    import httpx

    at = run_app(monkeypatch, api_server)
    at.button(key="synthetic").click().run()
    res = at.session_state["result"]
    with np.load(io.BytesIO(httpx.get(api_server + res["urls"]["viewer"], timeout=60).content)) as z:
        pred = np.unpackbits(z["mask_bits"], axis=-1, count=z["display"].shape[2]).astype(bool)[0]
    ref = np.roll(pred, 5, axis=1)
    ref[: ref.shape[0] // 2] = False
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    uploader = at.file_uploader(key=f"reference_{res['id']}")
    uploader.upload("small.png", cv2.imencode(".png", np.zeros((10, 12), np.uint8))[1].tobytes(), "image/png").run()
    assert any("small.png: 10 × 12 pixels, the result has 256 × 256" in e for e in texts(at.error)), texts(at.error)
    at.file_uploader(key=f"reference_{res['id']}").set_value(("ref.png", cv2.imencode(".png", ref.astype(np.uint8) * 255)[1].tobytes(), "image/png")).run()
    no_page_crash(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Dice with the reference"] == f"{dice:.3f}"
    assert metrics["Predicted − reference"] == f"{int(pred.sum()) - int(ref.sum()):+,} px"


def test_one_model_version_in_the_sidebar_the_models_list_and_the_answer(monkeypatch, tmp_path):
    """GET /v1/models, the answer and the page's sidebar name the same version: the file that ran, in the
    precision it ran in (U-Net++ is served in INT8: /v1/models used to give its fp32 file's)."""
    import httpx
    from conftest import start_api, stop

    from brainseg.io.synthetic import synthetic_png

    models = REPO / "models"
    if not (models / "unetpp.int8.onnx").is_file():
        pytest.skip("the shipped INT8 models are not in models/")
    url, proc, _ = start_api(models, tmp_path / "uvicorn.log")
    try:
        listed = {m["name"]: m for m in httpx.get(url + "/v1/models", timeout=300).json()["models"]}
        for name in ("attention_unet", "unetpp"):
            answer = httpx.post(url + "/v1/segment", files=[("files", ("s.png", synthetic_png(), "image/png"))], data={"model": name}, timeout=300).json()
            assert answer["model"]["precision"] == listed[name]["default_precision"]
            assert answer["model"]["version"] == listed[name]["version"] == listed[name]["versions"][answer["model"]["precision"]]
        assert listed["unetpp"]["versions"]["int8"] != listed["unetpp"]["versions"]["fp32"]
        at = run_app(monkeypatch, url)
        at.sidebar.selectbox(key="model").set_value("unetpp").run()
        at.button(key="synthetic").click().run()
        no_page_crash(at)
        version = at.session_state["result"]["model"]["version"]
        assert any(f"version `{version}`" in c for c in texts(at.sidebar.caption)), texts(at.sidebar.caption)
        assert any(f"version `{version}`" in c for c in texts(at.caption) if "threshold" in c)
    finally:
        stop(proc)
