"""Shared fixtures: the real data folder, tiny models in a registry, a running API server.

``tiny_model_dir`` builds both registered architectures at width (4, 8, 16), fits them for a
few seconds to synthetic bright blobs (so masks are small and non-empty rather than noise;
they are not trained on real data and their numbers mean nothing), saves checkpoints, exports
ONNX and writes a registry: the same files a real training run produces, in a temporary folder.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).parents[1] / "../shared/data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 90.0, log: Path | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early (with the process's log) if it dies."""
    import httpx

    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            out = log.read_text(errors="replace") if log and log.is_file() else ""
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before {url} answered:\n{out[-3000:]}")
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f} s (last: {last})")


def stop(proc: subprocess.Popen) -> None:
    """Terminate one process we started, then kill it if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def server_env(model_dir: Path, **extra: str) -> dict:
    env = dict(os.environ)
    env.update(
        BRAINSEG_MODEL_DIR=str(model_dir),
        BRAINSEG_BACKEND="onnx",
        BRAINSEG_ONNX_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")]),
        **extra,
    )
    return env


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository (real LGG slices and the BraTS example), or skip."""
    path = SHARED_DATA.resolve()
    if not (path / "lgg" / "kaggle_3m").is_dir():
        pytest.skip(f"real data not found at {path} (the project keeps it in ../shared/data beside the repository)")
    return path


def _fit_to_blobs(model, cfg, steps: int = 40) -> None:
    """A few optimiser steps on synthetic slices so the tiny model marks bright FLAIR blobs."""
    import torch

    from brainseg.io.synthetic import synthetic_slice
    from brainseg.preprocessing import preprocess_slice, resize_mask

    xs, ys = [], []
    for seed in range(5):
        img, mask = synthetic_slice(seed=seed)
        xs.append(preprocess_slice(img, cfg.preprocess))
        ys.append(resize_mask(mask, cfg.preprocess.input_size)[None].astype(np.float32))
    x, y = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, pos_weight=torch.tensor(5.0))
        loss.backward()
        opt.step()
    model.eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A model folder like the shipped ``models/``: registry.json, <name>.pt, <name>.onnx, <name>.md."""
    import torch

    from brainseg.config import ExperimentConfig, ModelConfig, PostprocessConfig
    from brainseg.inference.export import export_onnx
    from brainseg.inference.registry import write_registry
    from brainseg.models import build_model, count_parameters
    from brainseg.models.checkpoint import save_checkpoint

    out = tmp_path_factory.mktemp("tiny_models")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two shared cores; one thread is as fast for models this small
    entries = {}
    try:
        for name in ("unetpp", "attention_unet"):
            torch.manual_seed(0)
            cfg = ExperimentConfig(model=ModelConfig(name=name, features=(4, 8, 16)), postprocess=PostprocessConfig(threshold=0.5, min_size=10))
            model = build_model(cfg.model)
            _fit_to_blobs(model, cfg)
            info = {"parameters": count_parameters(model), "note": "tiny test model fitted to synthetic blobs; not a real model"}
            save_checkpoint(out / f"{name}.pt", {"config": cfg.to_dict(), "model": model.state_dict(), "info": info})
            export_onnx(out / f"{name}.pt", out / f"{name}.onnx")
            (out / f"{name}.md").write_text(f"# {name} (test model)\n\nTiny, fitted to synthetic blobs for tests only.\n")
            entries[name] = {
                "checkpoint": f"{name}.pt",
                "onnx": f"{name}.onnx",
                "metrics": {"per_patient_dice": None, "lesion_sensitivity": None, "fp_slice_rate": None},
            }
    finally:
        torch.set_num_threads(threads)
    write_registry(out, {"default": "attention_unet", "selected_by": "test fixture", "models": entries})
    return out


@pytest.fixture(scope="session")
def api_server(tiny_model_dir, tmp_path_factory) -> str:
    """A real ``uvicorn app:app`` process on a free loopback port (from the repo root); yields its URL."""
    url, proc, log = start_api(tiny_model_dir, tmp_path_factory.mktemp("api") / "uvicorn.log")
    try:
        yield url
    finally:
        stop(proc)


def start_api(model_dir: Path, log: Path, **env: str) -> tuple[str, subprocess.Popen, Path]:
    """Start ``uvicorn app:app`` as the README says (with the request-head timeout protocol) and wait for /health."""
    env.setdefault("BRAINSEG_RESULT_DIR", str(log.parent / "results"))  # not the user's shared default folder
    url, proc = start_uvicorn("app:app", server_env(model_dir, **env), log, "--http", "brainseg.serving.protocol:H11WithHeaderTimeout")
    return url, proc, log


def start_uvicorn(app: str, env: dict, log: Path, *args: str) -> tuple[str, subprocess.Popen]:
    """``uvicorn APP ARGS`` from the repository root on a free loopback port; its URL once /health answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args]
    return url, start_process(cmd, env, log, url + "/health")


def start_process(cmd: list[str], env: dict, log: Path, health_url: str) -> subprocess.Popen:
    """Start ``cmd`` from the repository root, its output appended to ``log`` (never an unread pipe),
    and wait until ``health_url`` answers 200; the process is stopped again if it never does."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(health_url, proc, log=log)
    except BaseException:
        stop(proc)
        raise
    return proc


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A training cache of 4 synthetic patients (6 slices, 48 px -> 32 px) with a 2/1/1 split; read-only."""
    from helpers import synthetic_dataset

    from brainseg.config import PreprocessConfig
    from brainseg.io.datasets import discover, split_patients
    from brainseg.io.files import write_json_atomic
    from brainseg.training.cache import build_cache

    root = synthetic_dataset(tmp_path_factory.mktemp("data"), patients=4, slices=6, size=48)
    cache = tmp_path_factory.mktemp("cache") / "c"
    ds = discover(root)
    build_cache(ds, PreprocessConfig(input_size=32), cache, progress=False)
    write_json_atomic(cache / "split.json", split_patients([p.id for p in ds.patients], 1, 1, seed=0))
    return cache


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for a test module: the machine's 2 CPUs, a 200 MB object store, no dashboard."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[scale]' or -r requirements-dev.txt); the Ray tests are skipped")
    ray.init(num_cpus=2, object_store_memory=200 << 20, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray
    finally:
        ray.shutdown()
