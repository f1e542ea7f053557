"""A corpus of malformed and hostile requests, generated here: each must get a 4xx with a plain
message of our own (no exception class names, no traceback, no echo of what was sent, no
server paths), store nothing, and leave the server answering /health.

Every case runs through TestClient; a sample runs against a real uvicorn process as well.
"""

from __future__ import annotations

import atexit
import functools
import gzip
import re
import shutil
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from dicom_series import ANONYMISED_HEADERS, NO_FRAME_OF_REFERENCE, bare, edited, monochrome1, padding, small_series, zip_bytes
from test_api_hardening import (
    IMAGE_CASES,
    MARK,
    VOLUME_CASES,
    _edit,
    assert_plain,
    make_client,
    nifti,
    png,
    small_volume,
    tiff,
)

from brainseg.io.synthetic import synthetic_png

UPLOAD_LIMIT_MB = 4  # the corpus client's BRAINSEG_MAX_UPLOAD_MB, so an oversized body is cheap


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_declaring(w: int, h: int, depth: int = 8, colour: int = 0) -> bytes:
    """A PNG with a valid IHDR (CRC right) for ``w`` x ``h`` and a few bytes of image data."""
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")


def jpeg_declaring(w: int, h: int) -> bytes:
    sof = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + sof + b"\xff\xd9"


def tiff_declaring(w: int, h: int, next_ifd: int = 0, bits: int = 8) -> bytes:
    """A little-endian TIFF whose one IFD claims ``w`` x ``h`` pixels, with almost no data."""
    entries = [(256, 4, w), (257, 4, h), (258, 3, bits), (259, 3, 1), (262, 3, 1), (273, 4, 8), (277, 3, 1), (278, 4, h), (279, 4, min(w * h, 2**32 - 1))]
    ifd = struct.pack("<H", len(entries))
    for tag, typ, val in entries:
        ifd += struct.pack("<HHII", tag, typ, 1, val) if typ == 4 else struct.pack("<HHIHH", tag, typ, 1, val, 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", next_ifd)


def _nan_tiff() -> bytes:
    img = np.ones((32, 32), np.float32)
    img[3, 3] = np.nan
    return tiff(img)


def _inf_tiff() -> bytes:
    img = np.ones((32, 32, 3), np.float32)
    img[3, 3, 1] = np.inf
    return tiff(img, photometric="rgb")


def _huge_tiff() -> bytes:
    """Finite float32 values of +-3e38: windowing them to 8 bits overflowed to a meaningless mask and a 200."""
    img = np.full((64, 64), 120.0, np.float32)
    img[10:30, 10:30], img[40:50, 40:50] = 3e38, -3e38
    return tiff(img)


def _huge_volume() -> bytes:
    v = small_volume()
    v[4:12, 4:12, 1] = 3e38
    v[0, 0, 0] = -3e38
    return nifti(v)


def _nan_volume() -> bytes:
    v = small_volume()
    v[1, 2, 3] = np.nan
    return nifti(v)


def _overflowing_volume() -> bytes:
    """int16 data whose scaling overflows float32 to inf."""
    return nifti(np.full((16, 16, 4), 1000, np.int16), edit=_edit(scl_slope=1e38, scl_inter=0.0))


def _vol(shape=(16, 16, 4)) -> bytes:
    return nifti(np.ones(shape, np.float32))


def _files(*pairs):
    return {"files": [("files", p) for p in pairs]}


def _multipart(body: bytes, boundary: str = "xyz") -> dict:
    return {"content": body, "headers": {"content-type": f"multipart/form-data; boundary={boundary}"}}


def _png_ok() -> bytes:
    return synthetic_png(size=64)


# (id, request kwargs for client.request("POST", "/v1/segment", ...) or ("GET", url), expected status or None)
CORPUS: list[tuple[str, object, object]] = []


def case(cid: str, status=None, method: str = "POST", url: str = "/v1/segment"):
    def register(make):
        CORPUS.append((cid, (method, url, make), status))
        return make

    return register


for _cid, _name, _make, _status, _ in VOLUME_CASES + IMAGE_CASES:
    case(f"file: {_cid}", _status)(lambda _n=_name, _m=_make: _files((_n, _m())))

_FILES = {
    "empty png": (("e.png", b""), 400),
    "empty tif": (("e.tif", b""), 400),
    "empty nii.gz": (("e.nii.gz", b""), 400),
    "text as png": (("t.png", b"just some text, not an image"), 422),
    "text as tif": (("t.tif", b"just some text, not an image"), 422),
    "text as jpg": (("t.jpg", b"just some text"), 422),
    "png magic only": (("m.png", b"\x89PNG\r\n\x1a\n"), 422),
    "png first 20 bytes": (("m.png", None), 422),
    "png declaring 100000x100000": (("h.png", png_declaring(100_000, 100_000)), 413),
    "png declaring 0x100": (("z.png", png_declaring(0, 100)), 422),
    "png declaring 3000x2000": (("m.png", png_declaring(3000, 2000)), 413),
    "png declaring 16-bit RGBA 4096x4096": (("r.png", png_declaring(4096, 4096, 16, 6)), 413),
    "png 8x8": (("s.png", png(np.zeros((8, 8), np.uint8))), 422),
    "jpeg magic only": (("m.jpg", b"\xff\xd8\xff"), 422),
    "jpeg declaring 65500x65500": (("h.jpg", jpeg_declaring(65500, 65500)), 413),
    "jpeg declaring 0 rows": (("z.jpg", jpeg_declaring(100, 0)), 422),
    "tiff magic only": (("m.tif", b"II*\x00"), 422),
    "bigtiff magic only": (("m.tif", b"II+\x00" + b"\0" * 12), 422),
    "tiff big-endian junk": (("j.tif", b"MM\x00*" + b"\xff" * 64), 422),
    "tiff first IFD outside the file": (("o.tif", b"II*\x00" + struct.pack("<I", 10**9)), 422),
    "tiff declaring 100000x100000": (("h.tif", tiff_declaring(100_000, 100_000)), 413),
    "tiff declaring 1x1": (("s.tif", tiff_declaring(1, 1)), 422),
    "tiff two channels": (("c.tif", tiff(np.zeros((32, 32, 2), np.uint8), photometric="minisblack", planarconfig="contig")), 422),
    "tiff NaN pixel": (("n.tif", _nan_tiff()), 422),
    "tiff inf pixel": (("i.tif", _inf_tiff()), 422),
    "tiff float +-3e38": (("h.tif", _huge_tiff()), 422),
    "gif bytes": (("g.png", b"GIF89a" + b"\0" * 64), 422),
    "bmp bytes as jpg": (("b.jpg", b"BM" + b"\0" * 64), 422),
    "pdf, no suffix": (("scan", b"%PDF-1.4 not an image"), 415),
    "exe": (("setup.exe", b"MZ" + b"\0" * 64), 415),
    "dicom without a dataset": (("i.dcm", b"\0" * 128 + b"DICM" + b"\0" * 64), 422),
    "zip of junk": (("j.zip", b"PK\x03\x04" + b"\0" * 400), 422),
    "zip named nii.gz": (("z.nii.gz", b"PK\x03\x04" + b"\0" * 400), 422),
    "gzip of text named nii.gz": (("t.nii.gz", gzip.compress(b"hello " * 200)), 422),
    "gzip magic only": (("g.nii.gz", b"\x1f\x8b"), 422),
    "garbage nii": (("g.nii", b"x" * 400), 422),
    "short nii": (("s.nii", b"\x5c\x01\x00\x00" + b"\0" * 96), 422),
    "NaN voxels": (("n.nii.gz", _nan_volume()), 422),
    "float voxels +-3e38": (("h.nii.gz", _huge_volume()), 422),
    "scaling overflows to inf": (("o.nii.gz", _overflowing_volume()), 422),
    "negative dimension": (("d.nii", nifti(small_volume(), gz=False, edit=_edit(dim=[3, -32, 32, 4, 1, 1, 1, 1]))), 422),
    "dim[0] = 9": (("d.nii", nifti(small_volume(), gz=False, edit=_edit(dim=[9, 32, 32, 4, 1, 1, 1, 1]))), 422),
    "unknown datatype": (("d.nii", nifti(small_volume(), gz=False, edit=_edit(datatype=9999))), 422),
    "NIfTI-2 declaring 2^40 voxels": (("b.nii", nifti(small_volume(), gz=False, version=2, edit=_edit(dim=[3, 2**20, 2**20, 1, 1, 1, 1, 1]))), 413),
    "file name with control characters": (("bad\x07\x1b[2Jname.png", b"junk"), 422),
    "5000-character file name": (("a" * 5000 + ".png", b"junk"), (400, 422)),  # the multipart parser may refuse the part header
    "path traversal in name": (("../../../etc/passwd.png", b"junk"), 422),
}
for _cid, ((_n, _d), _status) in _FILES.items():
    if _d is None:
        _d = png(np.zeros((64, 64), np.uint8))[:20]
    case(f"file: {_cid}", _status)(lambda _n=_n, _d=_d: _files((_n, _d)))


@case("two slices", 422)
def _():
    return _files(("a.png", _png_ok()), ("b.png", _png_ok()))


@case("slice and volume mixed", 422)
def _():
    return _files(("a.png", _png_ok()), ("v.nii.gz", _vol()))


@case("five NIfTI files", 422)
def _():
    return _files(*[(f"P-t{i}.nii.gz", _vol()) for i in range(5)])


@case("BraTS set without FLAIR", 422)
def _():
    return _files(("P-t1n.nii.gz", _vol()), ("P-t1c.nii.gz", _vol()))


@case("BraTS set with two t1n", 422)
def _():
    return _files(("P-t1n.nii.gz", _vol()), ("Q-t1n.nii.gz", _vol()), ("P-t2f.nii.gz", _vol()))


@case("BraTS set with mismatched shapes", 422)
def _():
    return _files(("P-t1n.nii.gz", _vol((16, 16, 4))), ("P-t2f.nii.gz", _vol((16, 16, 5))))


@case("BraTS set with a 4-D member", 422)
def _():
    return _files(("P-t2f.nii.gz", _vol()), ("P-t1c.nii.gz", nifti(np.ones((16, 16, 4, 3), np.float32))))


@case("two unrelated volumes", 422)
def _():
    return _files(("a.nii.gz", _vol()), ("b.nii.gz", _vol()))


for _field, _value in [
    ("model", MARK),
    ("model", "../" + MARK),
    ("threshold", MARK),
    ("threshold", "1.5"),
    ("threshold", "nan"),
    ("threshold", "inf"),
    ("threshold", "1e999"),
    ("threshold", "0"),
    ("tta", MARK),
    ("sequence", MARK),
    (MARK, "1"),
]:
    case(f"form {_field[:10]}={_value[:12]}", 422)(lambda _f=_field, _v=_value: {**_files(("s.png", _png_ok())), "data": {_f: _v}})

for _q in [f"model={MARK}", f"threshold={MARK}", f"{MARK}=1", f"sequence={MARK}&tta=1"]:
    case(f"query {_q[:20]}", 422, url=f"/v1/segment?{_q}")(lambda: _files(("s.png", _png_ok())))


@case("40 form fields", 400)
def _():
    return {"files": [("files", ("s.png", _png_ok()))] + [(f"f{i}", (None, MARK)) for i in range(40)]}


@case("30 file parts", 400)
def _():
    return {"files": [("files", (f"{i}.png", b"x")) for i in range(30)]}


@case("files as a plain field", 422)
def _():
    return {"files": [("files", (None, MARK))]}


@case("a 2 MiB plain field", 400)
def _():
    return {"files": [("files", ("s.png", _png_ok())), ("model", (None, MARK * (2 << 16)))]}


@case("no files, only a model, urlencoded", 415)
def _():
    return {"data": {"model": MARK}}


@case("no files, only a model, multipart", 422)
def _():
    return {"files": [("model", (None, MARK))]}


@case("JSON body", 415)
def _():
    return {"json": {"files": MARK}}


@case("urlencoded body", 415)
def _():
    return {"content": f"files={MARK}".encode(), "headers": {"content-type": "application/x-www-form-urlencoded"}}


@case("raw bytes, no content type", 415)
def _():
    return {"content": b"\x89PNG" + MARK.encode()}


@case("multipart without boundary", 400)
def _():
    return {"content": MARK.encode(), "headers": {"content-type": "multipart/form-data"}}


@case("multipart body cut off", (400, 422))
def _():
    return _multipart(b'--xyz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\n' + MARK.encode())


@case("multipart part without headers", (400, 422))
def _():
    return _multipart(b"--xyz\r\n\r\n" + MARK.encode() + b"\r\n--xyz--\r\n")


@case("body over the upload limit", 413)
def _():
    return _files(("big.png", b"\x89PNG" + bytes((UPLOAD_LIMIT_MB + 1) << 20)))


@case("declared content-length over the limit", 413)
def _():
    return {**_multipart(b"--xyz--\r\n"), "headers": {"content-type": "multipart/form-data; boundary=xyz", "content-length": str(10**12)}}


for _url, _status in [
    (f"/v1/results/{MARK}", 404),
    (f"/v1/results/{MARK * 200}/mask.nii.gz", 404),
    (f"/v1/results/{MARK}/slice/{MARK}.png", 422),
    (f"/v1/results/{MARK}/slice/-5.png", 404),
    (f"/v1/results/{MARK}/mask.png?z=-1", 422),
    (f"/v1/results/{MARK}/slice/0.png?alpha=nan", 422),
    (f"/v1/results/{MARK}/slice/0.png?channel={MARK}", 422),
    (f"/v1/results/{MARK}/slice/0.png?view={MARK}", 422),
    (f"/{MARK}", 404),
]:
    case(f"GET {_url[:50]}", _status, method="GET", url=_url)(lambda: {})


@functools.cache
def _series() -> tuple[Path, ...]:
    """A small DICOM series (32 x 32 x 8) written once, for the DICOM cases."""
    folder = Path(tempfile.mkdtemp(prefix="brainseg-corpus-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return tuple(small_series(folder / "s"))


def _dicom_zip(edit=None) -> dict:
    return _files(("study.zip", zip_bytes([], dict(edited(list(_series()), edit)))))


def _all_padding(ds, i):
    ds.PixelData = np.full((int(ds.Rows), int(ds.Columns)), 65535, np.uint16).tobytes()
    ds.add_new("PixelPaddingValue", "US", 65535)


def _half_monochrome1(ds, i):
    if i % 2:
        ds.PhotometricInterpretation = "MONOCHROME1"


def _bare_head() -> bytes:
    folder = Path(tempfile.mkdtemp(prefix="brainseg-corpus-"))
    try:
        return bare(list(_series())[:1], folder)[0].read_bytes()[:200]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


case("dicom: every pixel is padding", 422)(lambda: _dicom_zip(_all_padding))
case("dicom: slices mix MONOCHROME1 and MONOCHROME2", 422)(lambda: _dicom_zip(_half_monochrome1))
# An old export's file (no preamble, no .dcm name) is recognised as DICOM by its content: cut, it is a 422, not a 415.
case("dicom: IM0000 without preamble, cut after its first elements", 422)(lambda: _files(("IM0000", _bare_head())))


case("DELETE /v1/segment", 405, method="DELETE")(lambda: {})
case("PUT /health", 405, method="PUT", url="/health")(lambda: {})


def test_the_corpus_is_large_enough():
    assert len(CORPUS) >= 60 and len({c[0] for c in CORPUS}) == len(CORPUS)


@pytest.fixture(scope="module")
def corpus_client(tiny_model_dir):
    with make_client(tiny_model_dir, max_upload_mb=UPLOAD_LIMIT_MB) as c:
        yield c


@pytest.fixture(scope="module")
def openapi(corpus_client) -> dict:
    return corpus_client.get("/openapi.json").json()


def documented(spec: dict, method: str, url: str) -> set[str] | None:
    """Status codes the OpenAPI spec gives for this request's operation (None: no such operation)."""
    path = url.split("?", 1)[0]
    for template, ops in spec["paths"].items():
        pattern = "^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path) and method.lower() in ops:
            return set(ops[method.lower()]["responses"])
    return None


@pytest.mark.parametrize("spec, status", [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_hostile_request_gets_a_plain_4xx(corpus_client, openapi, spec, status):
    method, url, make = spec
    before = corpus_client.get("/health").json()["results_kept"]
    r = corpus_client.request(method, url, **make())
    assert_plain(r, status)
    codes = documented(openapi, method, url)
    if codes is not None:  # an existing operation: the spec names this status
        assert str(r.status_code) in codes, (r.status_code, sorted(codes))
    h = corpus_client.get("/health")
    assert h.status_code == 200 and h.json()["results_kept"] == before


def test_openapi_documents_every_status_with_its_error_schema(openapi):
    schemas = openapi["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and set(schemas["ErrorBody"]["required"]) == {"detail"}
    assert set(schemas["ServerErrorBody"]["required"]) == {"detail", "error_id"}
    for path, ops in openapi["paths"].items():
        for op in ops.values():
            for code, resp in op["responses"].items():
                if code.startswith(("4", "5")):
                    ref = resp["content"]["application/json"]["schema"]["$ref"]
                    if (path, code) == ("/health/ready", "503"):  # not an error: the readiness answer while the model loads
                        assert ref.endswith("/Ready"), ref
                        continue
                    assert ref.endswith("ServerErrorBody" if code == "500" else "ErrorBody"), (path, code, ref)
            assert "500" in op["responses"], path
    seg = openapi["paths"]["/v1/segment"]["post"]
    assert {"400", "401", "413", "415", "422", "503"} <= set(seg["responses"])
    assert "Retry-After" in seg["responses"]["503"]["headers"]
    body = schemas[seg["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert body["required"] == ["files"]


def _bare_zip() -> bytes:
    folder = Path(tempfile.mkdtemp(prefix="brainseg-corpus-"))
    try:
        bare(list(_series()), folder / "old")
        return zip_bytes([folder / "old"])
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# DICOM as hospitals export it: anonymised or non-standard headers, padding, MONOCHROME1, old files. Each is a 200
# with its mask, never a 5xx; a SEG that cannot be written (no FrameOfReferenceUID) is a warning in the answer.
HOSPITAL_EXPORTS = {
    **{f"headers: {cid}": (lambda e=e: _dicom_zip(e)) for cid, (e, _) in ANONYMISED_HEADERS.items()},
    "headers: no FrameOfReferenceUID": lambda: _dicom_zip(NO_FRAME_OF_REFERENCE),
    "padding: uint16 65535": lambda: _dicom_zip(padding(65535)),
    "padding: int16 -32768": lambda: _dicom_zip(padding(-32768, signed=True)),
    "MONOCHROME1": lambda: _dicom_zip(monochrome1(list(_series()))),
    "old files: no preamble, no .dcm name": lambda: _files(("old.zip", _bare_zip())),
}


@pytest.mark.parametrize("cid", list(HOSPITAL_EXPORTS))
def test_dicom_as_hospitals_export_it_is_answered(corpus_client, cid):
    r = corpus_client.post("/v1/segment", **HOSPITAL_EXPORTS[cid]())
    assert r.status_code == 200, (r.status_code, r.text[:300])
    body = r.json()
    assert body["kind"] == "volume" and body["slices"] == 8
    warned = [w for w in body["input"]["warnings"] if w.startswith("the DICOM SEG could not be written")]
    assert ("seg_dicom" in body["urls"]) != bool(warned), body["input"]["warnings"]
    assert bool(warned) == (cid == "headers: no FrameOfReferenceUID")
    assert corpus_client.get(f"/v1/results/{body['id']}/seg.dcm").status_code == (404 if warned else 200)


REAL_SAMPLE = [
    "file: text as tif",
    "file: tiff float +-3e38",
    "file: gzip CRC wrong",
    "file: gzip bomb past its header",
    "file: png declaring 100000x100000",
    "file: tiff first IFD outside the file",
    "form model=ZQXMARK",
    "40 form fields",
    "multipart body cut off",
    "body over the upload limit",
    "JSON body",
]


def test_a_sample_against_a_real_uvicorn(tiny_model_dir, tmp_path):
    import httpx
    from conftest import start_api, stop

    by_id = {c[0]: c[1:] for c in CORPUS}
    url, proc, log = start_api(tiny_model_dir, tmp_path / "uvicorn.log", BRAINSEG_MAX_UPLOAD_MB=str(UPLOAD_LIMIT_MB))
    try:
        with httpx.Client(base_url=url, timeout=60) as http:
            for cid in REAL_SAMPLE:
                (method, path, make), status = by_id[cid]
                r = http.request(method, path, **make())
                assert_plain(r, status)
                assert http.get("/health").status_code == 200, cid
            assert http.post("/v1/segment", files={"files": ("s.png", _png_ok())}).status_code == 200
    finally:
        stop(proc)
    assert proc.returncode is not None
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "internal error" not in text, text[-2000:]
