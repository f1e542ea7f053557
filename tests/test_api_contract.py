"""The API's typed contract (issue 17, item 3): every kind of 200 answer validates against its pydantic model in
``serving.schemas`` (which forbids keys it does not list), and the OpenAPI spec documents those models for the 200s
of /v1/segment, /v1/results/{id}, /v1/models and /health (so the schemathesis run of tests/test_api_schema.py checks
the answers it provokes against them)."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_series import small_series, zip_bytes
from helpers import make_client, nifti, segment, tiff
from pydantic import ValidationError

from brainseg.io.synthetic import synthetic_slice
from brainseg.serving.schemas import HealthAnswer, ModelsAnswer, SliceAnswer, VolumeAnswer, parse_answer


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with make_client(tiny_model_dir) as c:
        yield c


def _ok(r) -> dict:
    assert r.status_code == 200, r.text
    return r.json()


def test_slice_answers(client):
    img, _ = synthetic_slice(seed=3)
    full = parse_answer(_ok(segment(client, ("a.tif", tiff(img)))))
    assert isinstance(full, SliceAnswer) and full.mask_png and full.overlay_png and full.images_inline
    bare = parse_answer(_ok(segment(client, ("a.tif", tiff(img)), **{"return": "none"})))
    assert bare.mask_png is None and bare.overlay_png is None
    spaced = parse_answer(_ok(segment(client, ("a.tif", tiff(img)), pixel_spacing_mm="0.5,0.5")))
    assert spaced.lesion_count == 0 or spaced.lesions[0].longest_diameter_mm is not None
    tta = parse_answer(_ok(segment(client, ("a.tif", tiff(img)), tta="true")))
    assert all(les.tta_disagreement is not None for les in tta.lesions)


def test_volume_answers(client, tmp_path):
    vol = np.random.default_rng(0).random((48, 48, 12)).astype(np.float32) * 500
    vol[15:30, 15:30, 4:8] += 2000
    nii = parse_answer(_ok(segment(client, ("v.nii.gz", nifti(vol)))))
    assert isinstance(nii, VolumeAnswer) and nii.slices == 12 and nii.preview_png
    dcm = parse_answer(_ok(segment(client, ("study.zip", zip_bytes([tmp_path / "s"])), threshold=0.3))) if small_series(tmp_path / "s") else None
    assert isinstance(dcm, VolumeAnswer) and "seg_dicom" in dcm.urls
    stored = _ok(client.get(f"/v1/results/{dcm.id}"))
    assert parse_answer(stored).id == dcm.id  # an earlier answer, from the store, has the same shape


def test_an_ensemble_answer(client):
    img, _ = synthetic_slice(seed=3)
    ens = parse_answer(_ok(segment(client, ("a.tif", tiff(img)), model="ensemble")))
    assert ens.model.name == "ensemble" and set(ens.model.members) == {"unetpp", "attention_unet"}


def test_models_and_health(client):
    models = ModelsAnswer.model_validate(_ok(client.get("/v1/models")))
    assert models.default in {m.name for m in models.models}
    health = HealthAnswer.model_validate(_ok(client.get("/health")))
    assert health.models_ready and health.default_model == models.default


def test_an_answer_with_a_key_its_model_does_not_know_is_refused(client):
    img, _ = synthetic_slice(seed=3)
    body = _ok(segment(client, ("a.tif", tiff(img))))
    with pytest.raises(ValidationError, match="surprise"):
        parse_answer({**body, "surprise": 1})
    with pytest.raises(ValidationError):
        parse_answer({**body, "kind": "video"})


def test_the_spec_documents_the_200_bodies(client):
    spec = _ok(client.get("/openapi.json"))
    paths = spec["paths"]

    def ref(path: str, method: str = "get") -> str:
        return str(paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"])

    assert "SliceAnswer" in ref("/v1/segment", "post") and "VolumeAnswer" in ref("/v1/segment", "post")
    assert "SliceAnswer" in ref("/v1/results/{rid}")
    assert "ModelsAnswer" in ref("/v1/models") and "HealthAnswer" in ref("/health")
    assert {"SliceAnswer", "VolumeAnswer", "ModelsAnswer", "HealthAnswer", "Lesion"} <= set(spec["components"]["schemas"])
