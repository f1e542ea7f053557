"""The OpenAPI spec tells the truth: schemathesis generates requests for every operation from the
server's own ``/openapi.json`` and checks each answer against it (no 5xx, every status code
documented, bodies, content types and headers as the schema says), against a real ``uvicorn
app:app`` with the tiny test models. Half the requests for a result use the id of a real one (a
slice and a volume made first), so the 200 answers are checked too, not only 404s. A bounded
number of examples per operation, so it stays within about a minute.
"""

from __future__ import annotations

from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency (requirements-dev.txt)")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

EXAMPLES = 50  # per operation and phase: about 500 requests, 25 s here


SEEN: Counter = Counter()  # (operation, status) of every answer checked
REAL_IDS: list[str] = []  # results made by the fixture


@pytest.fixture(scope="module")
def api_schema(tiny_model_dir, tmp_path_factory):
    import httpx
    import numpy as np
    from conftest import start_api, stop
    from helpers import nifti

    from brainseg.io.synthetic import synthetic_png

    url, proc, _ = start_api(tiny_model_dir, tmp_path_factory.mktemp("schema") / "uvicorn.log")
    try:
        volume = nifti(np.random.default_rng(0).integers(1, 255, (32, 32, 4), dtype=np.uint8))
        for name, data in (("s.png", synthetic_png(size=64)), ("v.nii.gz", volume)):
            r = httpx.post(url + "/v1/segment", files={"files": (name, data)}, timeout=60)
            assert r.status_code == 200, r.text
            REAL_IDS.append(r.json()["id"])
        yield schemathesis.openapi.from_url(url + "/openapi.json")
    finally:
        stop(proc)
        print(f"{sum(SEEN.values())} answers checked: {dict(sorted(SEEN.items()))}")
    assert SEEN[("GET /v1/results/{rid}/slice/{z}.png", 200)] and SEEN[("GET /v1/results/{rid}/mask.nii.gz", 200)], SEEN


schema = schemathesis.pytest.from_fixture("api_schema")


# A schema cannot say "a file the server can read": the files schemathesis makes up for
# POST /v1/segment (and /v1/compare) are rightly refused (415 / 422). Nor can OpenAPI say that one query parameter needs
# another: ``wc`` without ``ww`` (or the other way round) on a slice PNG is rightly a 422 (found when
# schemathesis drew ``?ww=5e-324`` alone). Only there may a schema-valid request be refused.
CONTENT_NOT_IN_SCHEMA = {
    "POST /v1/segment": [positive_data_acceptance],
    "POST /v1/compare": [positive_data_acceptance],  # the same files as /v1/segment's volumes, two studies
    "GET /v1/results/{rid}/slice/{z}.png": [positive_data_acceptance],
}


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_every_answer_matches_the_spec(case):
    if "rid" in (case.path_parameters or {}) and case.method != "DELETE" and sum(SEEN.values()) % 2:
        case.path_parameters["rid"] = REAL_IDS[sum(SEEN.values()) // 2 % len(REAL_IDS)]
    response = case.call_and_validate(timeout=60, excluded_checks=CONTENT_NOT_IN_SCHEMA.get(case.operation.label, []))
    SEEN[(case.operation.label, response.status_code)] += 1
    assert response.status_code < 500, response.text
