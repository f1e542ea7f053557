"""`evaluate`, `predict`, the API and the Streamlit page run with torch (and the rest of the ``train`` extra) absent.

torch, onnx, albumentations and matplotlib are the ``train`` extra; everything but preprocess,
train and export must work from the base install. A subprocess makes them unimportable (``sys.modules[name] = None``, which is
what Python does for a module that is not installed, plus a ``sys.meta_path`` finder that
refuses their submodules), then runs the commands with the ONNX files of the tiny models.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import REPO, free_port
from helpers import synthetic_dataset


def run_blocked(code: str, cwd) -> subprocess.CompletedProcess:
    """``python -c code`` with this checkout's ``src/`` first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


BLOCK = """
import sys

BLOCKED = ("torch", "onnx", "albumentations", "matplotlib")  # the `train` extra; onnxruntime is a base dependency


class NoTrainExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None


for _name in BLOCKED:
    sys.modules[_name] = None  # `import torch` fails; importlib.util.find_spec("torch") is None
sys.meta_path.insert(0, NoTrainExtra())


def assert_not_imported():
    loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in BLOCKED)
    assert not loaded, loaded
"""

SCRIPT = """
import json
import warnings
from pathlib import Path

import brainseg
from brainseg.cli import main
from brainseg.config import EVERY_CONDITION

assert Path(brainseg.__file__).is_relative_to(Path(SRC)), brainseg.__file__  # this checkout, not another install
data, models, out, page, port = Path(DATA), Path(MODELS), Path(OUT), PAGE, PORT

assert main(["data", "stats", str(data)]) == 0
assert main(["split", "--data", str(data), "--out", str(out / "split.json")]) == 0

# evaluate: every labelled patient of the folder, every input condition (channels and other hospitals' data), ONNX models
assert main(["evaluate", "--data", str(data), "--model-dir", str(models), "--model", "ensemble", "--conditions", "every", "--out", str(out / "rep.json")]) == 0
rep = json.loads((out / "rep.json").read_text())
assert rep["patients"] == 2 and set(rep["conditions"]) == set(EVERY_CONDITION), rep.keys()

# evaluate on BraTS-format volumes (whole tumour per case)
assert main(["evaluate", "--data", str(Path(BRATS_ROOT)), "--model-dir", str(models), "--out", str(out / "brats.json")]) == 0
assert json.loads((out / "brats.json").read_text())["cases"] == 1

# predict: a patient folder
assert main(["predict", str(next(data.iterdir())), "--model-dir", str(models), "--out", str(out / "pred")]) == 0
assert len(list((out / "pred").glob("*_mask.png"))) == 3

# the API: default backend (auto), one real segment request
warnings.filterwarnings("ignore", message=".*httpx2.*")
from fastapi.testclient import TestClient

from brainseg.serving.api import create_app
from brainseg.serving.settings import Settings
from brainseg.io.synthetic import synthetic_png

with TestClient(create_app(Settings.from_env({}, model_dir=str(models), onnx_threads=1))) as client:
    assert client.get("/health").status_code == 200
    r = client.post("/v1/segment", files=[("files", ("synthetic.png", synthetic_png(), "image/png"))])
    assert r.status_code == 200, r.text
    assert r.json()["model"]["backend"] == "onnx", r.json()["model"]

# the Streamlit page renders (its API is down here; the page says so rather than crashing)
import os

from streamlit.testing.v1 import AppTest

os.environ["BRAINSEG_API_URL"] = f"http://127.0.0.1:{port}"
at = AppTest.from_file(page, default_timeout=120)
at.run()
assert not at.exception, [e.value for e in at.exception]
assert any("Cannot reach the API" in e.value for e in at.error)

assert_not_imported()
print("TORCH-FREE OK")
"""


def _brats_case(root: Path) -> Path:
    """One BraTS 2023-style case (t1n / t2f / t1c and -seg) of random volumes with a bright cube as the label."""
    import nibabel as nib
    import numpy as np

    case = root / "BraTS-GLI-00000-000"
    case.mkdir(parents=True)
    rng = np.random.default_rng(0)
    label = np.zeros((40, 40, 5), np.uint8)
    label[10:20, 12:22, 1:4] = 1
    for s in ("t1n", "t2f", "t1c"):
        nib.save(nib.Nifti1Image((rng.random(label.shape) * 100 + 300.0 * label).astype(np.float32), np.eye(4)), str(case / f"{case.name}-{s}.nii.gz"))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(case / f"{case.name}-seg.nii.gz"))
    return root


def test_evaluate_predict_api_and_page_run_without_torch(tiny_model_dir, tmp_path):
    data = synthetic_dataset(tmp_path / "data", patients=2, slices=3)
    brats = _brats_case(tmp_path / "brats")
    paths = ", ".join(repr(str(p)) for p in (data, tiny_model_dir, tmp_path, REPO / "streamlit_app.py"))
    consts = f"SRC = {str(REPO / 'src')!r}\nDATA, MODELS, OUT, PAGE, PORT = {paths}, {free_port()}\nBRATS_ROOT = {str(brats)!r}\n"
    code = textwrap.dedent(BLOCK) + consts + textwrap.dedent(SCRIPT)
    r = run_blocked(code, tmp_path)
    assert r.returncode == 0 and "TORCH-FREE OK" in r.stdout, (r.stdout[-3000:], r.stderr[-5000:])


def test_the_blocker_really_blocks(tmp_path):
    """The block above is real: importing torch or a submodule fails, and find_spec says absent."""
    code = textwrap.dedent(BLOCK) + textwrap.dedent("""
        import importlib.util
        for name in ("torch", "torch.nn", "onnx", "albumentations", "matplotlib.pyplot"):
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{name} imported")
        assert importlib.util.find_spec("torch") is None
        from brainseg.inference.backends import gpu_present
        assert not gpu_present()
        print("BLOCKED")
    """)
    r = run_blocked(code, tmp_path)
    assert r.returncode == 0 and "BLOCKED" in r.stdout, r.stderr[-3000:]
