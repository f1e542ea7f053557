"""Shared test helpers: where the real data is, small synthetic datasets, API clients and upload bytes."""

from __future__ import annotations

import atexit
import contextlib
import gzip
import importlib.util
import io
import logging
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import tifffile

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO / ".." / "shared" / "data").resolve()
LGG = SHARED_DATA / "lgg" / "kaggle_3m"
BRATS = SHARED_DATA / "brats-met-example"
BRATS_FORMAT = SHARED_DATA / "brats-format"  # two LGG patients in BraTS format, with reference masks


def script(relative: str):
    """A repository script (``scripts/...py``) imported as a module, so a test can call its functions."""
    path = REPO / "scripts" / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"real data not found at {path} (the project keeps it in ../shared/data)")
    return path


@contextlib.contextmanager
def every_log_line():
    """Everything any logger says, at DEBUG and above, while the block runs: a StringIO."""
    said, handler = io.StringIO(), logging.StreamHandler()
    handler.setStream(said)
    root, level = logging.getLogger(), logging.getLogger().level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield said
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


ORTHANC_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")  # Debian's orthanc-dicomweb


def orthanc_missing() -> str | None:
    """Why Orthanc with its DICOMweb plugin cannot run here, or None when it can."""
    if shutil.which("Orthanc") is None or not ORTHANC_PLUGIN.is_file():
        return "Orthanc and its DICOMweb plugin are not installed"
    return None


@contextlib.contextmanager
def orthanc(root: Path, user: str, password: str, name: str = "brainseg-test", timeout: float = 60.0):
    """Orthanc with its DICOMweb plugin (``/dicom-web/``) on free loopback ports, authentication on, its storage, config
    and log (``orthanc.log``) under ``root``; yields its URL once DICOMweb answers, and stops it afterwards.
    For tests/test_dicomweb.py and scripts/bench_scale.py."""
    import json
    import subprocess
    import time

    import httpx
    from conftest import free_port, stop

    port = free_port()
    config = {
        "Name": name,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "storage"),
        "HttpPort": port,
        "DicomPort": free_port(),
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [str(ORTHANC_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    (root / "orthanc.json").write_text(json.dumps(config))
    log = root / "orthanc.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([shutil.which("Orthanc"), str(root / "orthanc.json")], cwd=root, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {proc.returncode}:\n{log.read_text(errors='replace')[-3000:]}")
            try:
                if httpx.get(url + "/dicom-web/studies", auth=(user, password), timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"Orthanc did not answer within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        yield url
    finally:
        stop(proc)


def synthetic_dataset(root: Path, patients: int = 4, slices: int = 6, size: int = 64, seed: int = 0, first: int = 0) -> Path:
    """kaggle_3m-style folders with bright blobs as lesions on every other slice.

    Patients are numbered from ``first`` (``TCGA_CS_0000_20000101``, ...), so two calls with
    different ``first`` give datasets with different patients.
    """
    rng = np.random.default_rng(seed)
    sites = ["CS", "DU", "HT", "FG"]
    for p in range(first, first + patients):
        pid = f"TCGA_{sites[p % len(sites)]}_{p:04d}_20000101"
        d = root / pid
        d.mkdir(parents=True)
        for i in range(1, slices + 1):
            img = rng.integers(20, 60, (size, size, 3)).astype(np.uint8)
            mask = np.zeros((size, size), np.uint8)
            if i % 2:
                r, c = rng.integers(10, size - 20, 2)
                mask[r : r + 10, c : c + 10] = 255
                img[mask > 0] = 200
            tifffile.imwrite(d / f"{pid}_{i}.tif", img)
            tifffile.imwrite(d / f"{pid}_{i}_mask.tif", mask)
    return root


def make_client(model_dir, **overrides):
    """An in-process TestClient of the API on ``model_dir`` (ONNX, one thread); ``overrides`` are Settings fields."""
    warnings.filterwarnings("ignore", message=".*httpx2.*")  # starlette's TestClient notice
    from fastapi.testclient import TestClient

    from brainseg.serving.api import create_app
    from brainseg.serving.settings import Settings

    overrides.setdefault("result_dir", _temporary_dir("brainseg-test-results-"))  # each client its own results
    settings = Settings.from_env({}, model_dir=str(model_dir), backend="onnx", onnx_threads=1, **overrides)
    return TestClient(create_app(settings))


def _temporary_dir(prefix: str) -> str:
    path = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def segment(client, files, **params):
    """POST /v1/segment with one ``(name, bytes)`` file or a list of them, and form fields."""
    if isinstance(files, tuple):
        files = [files]
    return client.post("/v1/segment", files=[("files", f) for f in files], data={k: str(v) for k, v in params.items()})


def tiff(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


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
