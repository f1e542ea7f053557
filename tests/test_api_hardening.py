"""The service exposed to strangers: no 5xx for any upload, safe download headers, plain errors,
budgets checked from headers before decoding, bounded memory, a hostile corpus.

Tiny ONNX models from ``conftest.tiny_model_dir``; TestClient for speed, a real uvicorn
(``conftest.start_api``) for the memory test and a few corpus cases.
"""

from __future__ import annotations

import gzip
import re
import urllib.parse
import warnings

import numpy as np
import pytest

warnings.filterwarnings("ignore", message=".*httpx2.*")

from fastapi.testclient import TestClient  # noqa: E402

from brainseg.serving.api import content_disposition, create_app  # noqa: E402
from brainseg.serving.settings import Settings  # noqa: E402
from brainseg.synthetic import synthetic_png, synthetic_slice  # noqa: E402


def make_client(model_dir, **overrides) -> TestClient:
    settings = Settings.from_env({}, model_dir=str(model_dir), backend="onnx", onnx_threads=1, **overrides)
    return TestClient(create_app(settings))


@pytest.fixture(scope="module")
def client(tiny_model_dir):
    with make_client(tiny_model_dir) as c:
        yield c


def nifti(arr: np.ndarray, affine=None, gz: bool = True, version: int = 1, edit=None) -> bytes:
    """NIfTI bytes; ``edit(header)`` may change fields of the header as written."""
    import nibabel as nib

    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    raw = klass(arr, np.eye(4) if affine is None else affine).to_bytes()
    if edit is not None:
        hklass = nib.Nifti1Header if version == 1 else nib.Nifti2Header
        hdr = hklass(raw[: hklass.sizeof_hdr], check=False)
        edit(hdr)
        raw = hdr.binaryblock + raw[hklass.sizeof_hdr :]
    return gzip.compress(raw) if gz else raw


def small_volume(seed: int = 2, z: int = 4) -> np.ndarray:
    img, _ = synthetic_slice(size=32, seed=seed)
    return np.stack([np.rot90(img[:, :, 1], -1).astype(np.float32)] * z, axis=2)


def segment(client, files, **params):
    if isinstance(files, tuple):
        files = [files]
    return client.post("/v1/segment", files=[("files", f) for f in files], data={k: str(v) for k, v in params.items()})


def kept(client) -> int:
    r = client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    return r.json()["results_kept"]


# ---------------------------------------------------------------- step 1: the three 500s


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 0.0])
def test_non_finite_pixdim_is_a_422_before_inference_and_nothing_is_stored(client, bad):
    def edit(h):
        h["pixdim"][2] = bad

    before = kept(client)
    r = segment(client, ("spacing.nii.gz", nifti(small_volume(), edit=edit)))
    assert r.status_code == 422, r.text
    assert "voxel size" in r.json()["detail"] and "spacing.nii.gz" in r.json()["detail"]
    assert kept(client) == before


def _params(header_value: str) -> list[tuple[str, str]]:
    """``attachment; a="x"; b=y`` -> [("attachment", ""), ("a", "x"), ("b", "y")], quotes respected."""
    first, _, rest = header_value.partition(";")
    params = [(first.strip(), "")]
    for m in re.finditer(r'\s*([^=;\s]+)=("(?:[^"\\]|\\.)*"|[^;]*)\s*(;|$)', rest):
        params.append((m.group(1), m.group(2).strip('"')))
    return params


@pytest.mark.parametrize(
    "name",
    [
        "Patient_Müller_2024.nii.gz",
        "病人_张三.nii.gz",
        'a"; filename="evil.sh.nii.gz',
        "a\r\nX-Injected: 1.nii.gz",
        "semi;colon%20percent\\back.nii.gz",
    ],
)
def test_content_disposition_is_ascii_with_an_rfc5987_name_and_no_injection(name):
    value = content_disposition(name)
    value.encode("latin-1")  # a header must be Latin-1: this is what raised UnicodeEncodeError
    assert "\r" not in value and "\n" not in value
    params = _params(value)
    assert [k for k, _ in params] == ["attachment", "filename", "filename*"]
    fallback = dict(params)["filename"]
    assert all(32 <= ord(c) < 127 for c in fallback) and not set(fallback) & set('"\\;%')
    star = value.split("filename*=", 1)[1]
    assert star.startswith("UTF-8''") and urllib.parse.unquote(star[len("UTF-8''") :]) == name


def test_non_latin1_and_quoted_file_names_download(client):
    """Upload volumes under hostile names, then download their masks: 200 and a safe header."""
    for name in ["Пациент_脑_scan.nii.gz", 'x"; filename=evil.sh;.nii.gz']:
        r = segment(client, (name, nifti(small_volume())))
        assert r.status_code == 200, r.text
        stem = r.json()["files"][0][: -len(".nii.gz")]  # httpx sends '"' as %22; the server keeps what it got
        d = client.get(r.json()["mask_url"])
        assert d.status_code == 200 and d.content[:2] == b"\x1f\x8b"
        cd = d.headers["content-disposition"]
        params = _params(cd)
        assert [k for k, _ in params] == ["attachment", "filename", "filename*"], cd
        assert urllib.parse.unquote(cd.split("filename*=UTF-8''", 1)[1]) == f"{stem}_mask.nii.gz"


def test_control_characters_in_a_file_name_are_dropped(client):
    """CR / LF in a multipart file name (sent raw) never reach a header or a message."""
    boundary = "b0undary"
    head = 'Content-Disposition: form-data; name="files"; filename="evil\r\nX-Injected: yes.nii.gz"\r\n'
    # python-multipart would end the part header at CR LF: send the name with bare control characters.
    head = head.replace("evil\r\nX-Injected", "evil\x0bX\x07Injected")
    body = (f"--{boundary}\r\n{head}Content-Type: application/gzip\r\n\r\n").encode() + nifti(small_volume()) + f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/v1/segment", content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 200, r.text
    assert r.json()["files"] == ["evilXInjected: yes.nii.gz"]
    cd = client.get(r.json()["mask_url"]).headers["content-disposition"]
    assert "\x0b" not in cd and "\x07" not in cd and [k for k, _ in _params(cd)] == ["attachment", "filename", "filename*"]


# ---------------------------------------------------------------- step 2: plain errors, no echo, no paths

MARK = "ZQXMARK"  # a value no message may repeat


def assert_plain(r, status: int | tuple = None) -> str:
    """A 4xx with a short plain message of our own: no class names, no traceback, no echo, no paths."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code in (status if isinstance(status, tuple) else (status,)), (r.status_code, r.text[:300])
    body = r.json()
    assert set(body) == {"detail"}, body
    detail = body["detail"]
    assert isinstance(detail, str) and 0 < len(detail) < 400, detail
    assert MARK not in r.text and "Traceback" not in detail and "/tmp" not in detail and "/work" not in detail
    assert not re.search(r"\b[A-Z][A-Za-z]*(Error|Exception)\b", detail), detail
    return detail


def test_validation_errors_name_the_field_never_the_value(client):
    d = assert_plain(client.get(f"/v1/results/x/slice/0.png?channel={MARK}"), 422)
    assert d == "channel must be an integer"
    d = assert_plain(client.get(f"/v1/results/x/slice/0.png?view={MARK}"), 422)
    assert "view must be one of" in d and "overlay" in d
    assert_plain(client.get(f"/v1/results/x/slice/{MARK}.png"), 422)
    d = assert_plain(client.post("/v1/segment", files=[("files", (None, MARK))]), 422)
    assert d.startswith("files ")
    d = assert_plain(client.post("/v1/segment", files=[("files", ("s.png", synthetic_png()))], data={"model": MARK}), 422)
    assert "unknown model" in d and "attention_unet" in d
    for field in ("threshold", "tta", "sequence"):
        d = assert_plain(client.post("/v1/segment", files=[("files", ("s.png", synthetic_png()))], data={field: MARK}), 422)
        assert d.startswith(field)
    d = assert_plain(client.post(f"/v1/segment?{MARK}=1", files=[("files", ("s.png", synthetic_png()))]), 422)
    assert "unknown form field" in d
    assert_plain(client.get(f"/v1/results/{MARK}"), 404)
    assert_plain(client.get(f"/{MARK}"), 404)


def test_many_or_large_plain_fields_are_refused_at_once_without_echo(client):
    """The issue's 190 x 1 MB plain 'files' fields: a short 400, not a 388 MiB echo."""
    big = MARK + "x" * (1 << 20)
    r = client.post("/v1/segment", files=[("files", (None, big)) for _ in range(20)])
    assert len(r.content) < 500
    assert_plain(r, 400)
    r = client.post("/v1/segment", files=[("files", ("s.png", synthetic_png()))] + [(f"f{i}", (None, MARK)) for i in range(40)])
    assert "too many form fields" in assert_plain(r, 400)
    r = client.post("/v1/segment", files=[("files", (f"{i}.png", b"x")) for i in range(30)])
    assert "too many" in assert_plain(r, 400)


def test_library_exception_text_never_reaches_the_client(client):
    cases = [
        ("t.tif", b"II*\x00" + b"\xff" * 200),  # TiffFileError in tifffile
        ("t.tif", b"MM\x00*" + b"\x00\x00\x00\x08" + b"\x00" * 30),
        ("j.jpg", b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"\x00" * 50),
        ("c.nii.gz", nifti(np.zeros((16, 16, 4), np.complex64))),  # DTypePromotionError before
        ("r.nii", nifti(np.zeros((16, 16, 4), np.dtype([("R", "u1"), ("G", "u1"), ("B", "u1")])), gz=False)),
    ]
    for name, data in cases:
        assert_plain(segment(client, (name, data)))


def test_health_and_503_show_no_server_paths(tiny_model_dir, tmp_path):
    with make_client(tiny_model_dir) as c:
        assert str(tiny_model_dir) not in c.get("/health").text and "model_dir" not in c.get("/health").json()
    with make_client(tmp_path / "nowhere") as c:
        h = c.get("/health").json()
        assert h["models_ready"] is False and str(tmp_path) not in h["problem"] and "registry" in h["problem"]
        r = segment(c, ("s.png", synthetic_png()))
        assert r.status_code == 503 and str(tmp_path) not in r.text
