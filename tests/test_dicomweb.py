"""``brainseg dicomweb`` against a real Orthanc with its DICOMweb plugin (Debian's ``orthanc`` and
``orthanc-dicomweb``; skipped with a message where they are not installed): series uploaded through
Orthanc's REST API, the SEG found afterwards in the same study referencing them, a study without FLAIR
skipped with its reason and not tried again, failures of the archive tried a bounded number of times,
and no identifier in any log line.

Models are the tiny ones of ``conftest.tiny_model_dir`` (masks mean nothing here).
"""

from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import pydicom
import pytest
from dicom_series import PLANTED_BIRTH, PLANTED_ID, PLANTED_NAME, small_series, study_ids
from helpers import orthanc as run_orthanc
from helpers import orthanc_missing

from brainseg.cli import main

USER, PASSWORD = "brainseg", "test-password-1"

pytest.importorskip("dicomweb_client", reason="dicomweb-client is not installed (pip install -r requirements-dev.txt); the DICOMweb tests are skipped")
pytestmark = pytest.mark.skipif(
    orthanc_missing() is not None,
    reason=f"{orthanc_missing()} (as root: apt-get install orthanc orthanc-dicomweb; scripts/test.sh does it); the DICOMweb round trip is skipped",
)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    """Orthanc on free loopback ports, with authentication, its storage in a temporary folder; yields its URL."""
    with run_orthanc(tmp_path_factory.mktemp("orthanc"), USER, PASSWORD) as url:
        yield url


def upload(url: str, files: list[Path]) -> None:
    """Each file through Orthanc's REST API (POST /instances)."""
    import httpx

    for f in files:
        r = httpx.post(url + "/instances", content=f.read_bytes(), auth=(USER, PASSWORD), timeout=30)
        assert r.status_code == 200, r.text


def rest(url: str, path: str):
    import httpx

    r = httpx.get(url + path, auth=(USER, PASSWORD), timeout=30)
    r.raise_for_status()
    return r.json() if "json" in r.headers.get("content-type", "") else r.content


def study_series(url: str, study_uid: str) -> list[dict]:
    """The series of one study, from Orthanc's REST API (not DICOMweb): MainDicomTags and Instances."""
    import httpx

    r = httpx.post(url + "/tools/lookup", content=study_uid, auth=(USER, PASSWORD), timeout=30)
    r.raise_for_status()
    (study,) = [x for x in r.json() if x["Type"] == "Study"]
    return rest(url, f"/studies/{study['ID']}/series")


@pytest.fixture
def archive(orthanc, tmp_path):
    """Three studies in Orthanc: FLAIR + T1 (to be segmented), T1 + T1 post-contrast (no FLAIR: skipped), a CT series (not MR)."""
    ok, no_flair, ct = study_ids(), study_ids(), study_ids()
    flair = small_series(tmp_path / "flair", ids=ok, number=1, description="AX FLAIR")
    t1 = small_series(tmp_path / "t1", ids=ok, number=2, description="AX T1 PRE")
    upload(orthanc, flair + t1)
    upload(orthanc, small_series(tmp_path / "a", ids=no_flair, number=1, description="AX T1 PRE"))
    upload(orthanc, small_series(tmp_path / "b", ids=no_flair, number=2, description="AX T1 POST GD"))
    upload(orthanc, small_series(tmp_path / "ct", ids=ct, number=1, description="HEAD", modality="CT"))
    uids = {
        "ok": ok["study"],
        "no_flair": no_flair["study"],
        "ct": ct["study"],
        "flair_series": pydicom.dcmread(flair[0]).SeriesInstanceUID,
        "flair_images": sorted(pydicom.dcmread(f).SOPInstanceUID for f in flair),
        "t1_series": pydicom.dcmread(t1[0]).SeriesInstanceUID,
    }
    yield uids
    import httpx

    for key in ("ok", "no_flair", "ct"):  # each test its own archive content
        r = httpx.post(orthanc + "/tools/lookup", content=uids[key], auth=(USER, PASSWORD), timeout=30)
        for x in r.json():
            if x["Type"] == "Study":
                httpx.delete(orthanc + x["Path"], auth=(USER, PASSWORD), timeout=30)


def identifiers_in(text: str, uids: dict) -> list[str]:
    values = [v for v in uids.values() if isinstance(v, str)] + uids["flair_images"]
    return [v for v in (PLANTED_NAME, PLANTED_ID, PLANTED_BIRTH, "Zzyzx", "Quentin", *values) if v in text]


def test_round_trip_seg_filed_in_the_study_once(orthanc, archive, tiny_model_dir, tmp_path, caplog, capsys):
    from brainseg.io.dicomweb import study_tag

    state = tmp_path / "state.json"
    args = ["dicomweb", "--url", orthanc + "/dicom-web", "--once", "--auth", f"{USER}:{PASSWORD}", "--state", str(state), "--model-dir", str(tiny_model_dir)]
    caplog.set_level(logging.DEBUG)
    t0 = time.perf_counter()
    assert main(["-v", *args]) == 0
    seconds = time.perf_counter() - t0
    out = capsys.readouterr().out
    assert "dicomweb pass: 2 MR studies: 1 segmented, 1 skipped, 0 failed, 0 had a brainseg SEG, 0 skipped before" in out, out

    series = study_series(orthanc, archive["ok"])
    segs = [s for s in series if s["MainDicomTags"].get("Modality") == "SEG"]
    assert len(series) == 3 and len(segs) == 1
    (instance,) = segs[0]["Instances"]
    seg = pydicom.dcmread(io.BytesIO(rest(orthanc, f"/instances/{instance}/file")))
    assert seg.StudyInstanceUID == archive["ok"] and seg.SeriesDescription.startswith("brainseg")
    referenced = {s.SeriesInstanceUID: sorted(i.ReferencedSOPInstanceUID for i in s.ReferencedInstanceSequence) for s in seg.ReferencedSeriesSequence}
    assert referenced[archive["flair_series"]] == archive["flair_images"]  # every FLAIR image, frame by frame
    assert seg.NumberOfFrames == 8 and seg.pixel_array.shape[-2:] == (32, 32)
    for key in ("no_flair", "ct"):
        assert all(s["MainDicomTags"].get("Modality") != "SEG" for s in study_series(orthanc, archive[key]))

    audits = sorted(r.getMessage() for r in caplog.records if r.name == "brainseg.audit")  # in the archive's order: sorted by tag
    by_tag = {line.split()[2].rstrip(":"): line for line in audits}
    assert len(audits) == 2 and set(by_tag) == {study_tag(archive["ok"]), study_tag(archive["no_flair"])}, audits
    assert by_tag[study_tag(archive["ok"])].startswith(f"audit: study {study_tag(archive['ok'])}: segmented, SEG stored (series 1; ")
    skipped = by_tag[study_tag(archive["no_flair"])]
    assert skipped.startswith(f"audit: study {study_tag(archive['no_flair'])}: skipped, not tried again: ") and "FLAIR" in skipped, audits
    every_line = "\n".join(r.getMessage() for r in caplog.records) + out
    assert identifiers_in(every_line, archive) == []
    assert identifiers_in(state.read_text(), archive) == []
    print(f"Orthanc round trip, one pass over 2 MR studies (one segmented and stored): {seconds:.2f} s")

    caplog.clear()
    assert main(args) == 0  # the next pass: the SEG is found, the skipped study is not fetched again
    out = capsys.readouterr().out
    assert "2 MR studies: 0 segmented, 0 skipped, 0 failed, 1 had a brainseg SEG, 1 skipped before" in out, out
    assert [r for r in caplog.records if r.name == "brainseg.audit"] == []
    assert len([s for s in study_series(orthanc, archive["ok"]) if s["MainDicomTags"].get("Modality") == "SEG"]) == 1


def test_failures_of_the_archive_are_tried_a_bounded_number_of_times(orthanc, archive, tiny_model_dir, tmp_path, caplog):
    """STOW-RS to a path Orthanc does not serve (a 404 each time): the study fails, is tried on the next passes,
    and is given up after MAX_ATTEMPTS; its state holds no UID."""
    from dicomweb_client.api import DICOMwebClient

    from brainseg.inference.predictor import load
    from brainseg.io.dicomweb import MAX_ATTEMPTS, Node, make_session, study_tag

    seg = load(model_dir=tiny_model_dir)
    client = DICOMwebClient(orthanc + "/dicom-web", session=make_session(f"{USER}:{PASSWORD}"), stow_url_prefix="no-such-service")
    node = Node(client, seg, seg.postprocess, tmp_path / "state.json")
    tag = study_tag(archive["ok"])
    caplog.set_level(logging.INFO)
    for attempt in range(1, MAX_ATTEMPTS + 1):
        outcome = {o.tag: o for o in node.run_once()}[tag]
        assert (outcome.status, outcome.reason) == ("failed", "HTTP 404 from the archive")
        assert json.loads((tmp_path / "state.json").read_text())[tag]["attempts"] == attempt
    assert {o.tag: o for o in node.run_once()}[tag].status == "known"  # given up
    lines = [r.getMessage() for r in caplog.records if r.name == "brainseg.audit" and tag in r.getMessage()]
    assert len(lines) == MAX_ATTEMPTS and "given up" in lines[-1]
    assert identifiers_in("\n".join(r.getMessage() for r in caplog.records), archive) == []


def test_a_wrong_password_is_one_line(orthanc, tiny_model_dir, tmp_path, capsys):
    args = ["dicomweb", "--url", orthanc + "/dicom-web", "--auth", f"{USER}:wrong", "--state", str(tmp_path / "s.json"), "--model-dir", str(tiny_model_dir)]
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == "brainseg: error: the archive's study search failed: HTTP 401 from the archive"
