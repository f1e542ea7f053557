#!/usr/bin/env python
"""Peak resident memory of a real ``uvicorn app:app`` under a saturated worst case, on 127.0.0.1 only.

    python scripts/bench_memory.py                          # both scenarios, shipped models (models/)
    python scripts/bench_memory.py --scenario slices        # 16 clients at once, each a 2048x2048 float32 TIFF slice
    python scripts/bench_memory.py --scenario mix           # 8 of those slices and 8 DICOM study zips at once
    python scripts/bench_memory.py --src /tmp/before        # the same, served by another checkout (before / after)
    python scripts/bench_memory.py --server-env BRAINSEG_MEMORY_BUDGET_MB=512

Each scenario starts its own server the way ``tests/conftest.py`` does (``python -m uvicorn app:app
--host 127.0.0.1 --http brainseg.serving.protocol:H11WithHeaderTimeout``, ONNX, one ONNX thread, a
fresh result folder), waits for ``/health`` (the default model preloaded), notes its VmRSS, then
runs ``--clients`` threads that each send their request ``--rounds`` times back to back (a 503 or
429 is retried after its Retry-After, at most ``--retries`` times) and reads the server's peak
resident memory (VmHWM from /proc) at the end. Bounded: every request has a timeout, the whole
scenario a deadline, and the server is stopped afterwards. Linux only (/proc).

The DICOM study is three MR series (FLAIR, T1, T1 post-contrast) of ``--dicom-shape`` voxels, from
the BraTS example under ../shared/data when it is there (synthetic otherwise), written with
tests/dicom_series.py and zipped.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BRATS = REPO / ".." / "shared" / "data" / "brats-met-example"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status(pid: int, field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of a process in MiB; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def slice_file(size: int, dtype: str = "float32", seed: int = 0) -> tuple[str, bytes]:
    """A brain-like grey slice (the synthetic FLAIR channel): float32 in scanner-like units as TIFF, or uint8 as PNG."""
    import tifffile

    sys.path.insert(0, str(REPO / "src"))
    from brainseg.io.synthetic import synthetic_slice

    img, _ = synthetic_slice(size=size, seed=seed)
    if dtype == "uint8":
        import cv2

        return "slice.png", cv2.imencode(".png", np.ascontiguousarray(img[:, :, 1]))[1].tobytes()
    data = img[:, :, 1].astype(np.float32) * 7.3 + np.random.default_rng(seed).normal(0, 2, img.shape[:2]).astype(np.float32)
    buf = io.BytesIO()
    tifffile.imwrite(buf, data)
    return "slice.tif", buf.getvalue()


def dicom_zip(shape: tuple[int, int, int], work: Path) -> bytes:
    """A zip of three DICOM MR series (t2f, t1n, t1c) of ``shape`` (X, Y, Z) voxels."""
    sys.path.insert(0, str(REPO / "tests"))
    from dicom_series import BRATS_SERIES, study_ids, write_series, zip_bytes

    ids = study_ids()
    folders = []
    for seq, number, desc in BRATS_SERIES:
        path = BRATS / f"BraTS-MET-00110-000-{seq}.nii.gz"
        if path.is_file():
            import nibabel as nib

            img = nib.load(path)
            data = np.asarray(img.dataobj, dtype=np.float64)
            x, y, z = (min(a, b) for a, b in zip(shape, data.shape, strict=False))
            data = np.round(data[:x, :y, :z])
            affine = img.affine
        else:
            rng = np.random.default_rng(number)
            data = np.round(rng.uniform(0, 900, shape))
            affine = np.diag([1.0, 1.0, 1.0, 1.0])
        data = np.clip(data, 0, 30000)
        folder = work / "study" / f"series{number}"
        write_series(folder, data, affine, ids, number=number, description=desc, slope=1.0, intercept=0.0, shuffle=False)
        folders.append(folder)
    return zip_bytes(folders)


def start_server(src: Path, model_dir: Path, result_dir: Path, log: Path, extra_env: dict) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    env.update(
        BRAINSEG_MODEL_DIR=str(model_dir),
        BRAINSEG_BACKEND="onnx",
        BRAINSEG_ONNX_THREADS="1",
        BRAINSEG_RESULT_DIR=str(result_dir),
        PYTHONPATH=os.pathsep.join([str(src / "src"), str(src), env.get("PYTHONPATH", "")]),
        **extra_env,
    )
    cmd = [sys.executable, "-m", "uvicorn", "app:app", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    cmd += ["--http", "brainseg.serving.protocol:H11WithHeaderTimeout"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    stop(proc)
    raise SystemExit("server did not answer /health within 180 s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def post_with_retries(c, files, a, deadline: float, record) -> bool:
    """One request, sent again after a 429 / 503 with Retry-After (``a.retries`` times at most); each answer's status
    goes to ``record``. False once the deadline has passed."""
    import httpx

    for _attempt in range(a.retries + 1):
        if time.monotonic() > deadline:
            return False
        try:
            r = c.post("/v1/segment", files=files, data=dict(kv.split("=", 1) for kv in a.form))
            status = str(r.status_code)
        except httpx.HTTPError as exc:
            r, status = None, type(exc).__name__
        record(r, status)
        if r is None or r.status_code not in (429, 503) or "retry-after" not in r.headers:
            break
        time.sleep(min(float(r.headers["retry-after"]), 5.0))
    return True


def run_scenario(name: str, requests: list, a, work: Path) -> dict:
    """Every request (one (name, bytes) file, or a list of them) in its own client thread, all at once,
    ``a.rounds`` times each; the server's memory."""
    import httpx

    log = work / f"uvicorn-{name}.log"
    proc, url = start_server(a.src, a.model_dir, Path(tempfile.mkdtemp(prefix="results-", dir=work)), log, dict(kv.split("=", 1) for kv in a.server_env))
    if a.warm_up:  # one small slice first: the model's served precision is loaded on first use
        sys.path.insert(0, str(REPO / "src"))
        from brainseg.io.synthetic import synthetic_png

        httpx.post(url + "/v1/segment", files={"files": ("warm.png", synthetic_png(size=64))}, timeout=a.timeout).raise_for_status()
    rss_start = proc_status(proc.pid, "VmRSS")
    codes: dict[str, int] = {}
    sizes: list[int] = []
    lock = threading.Lock()
    deadline = time.monotonic() + a.deadline
    gate = threading.Barrier(len(requests))

    def client(*req) -> None:
        files = [("files", f) for f in (req[0] if len(req) == 1 else [req])]
        with httpx.Client(base_url=url, timeout=a.timeout) as c:
            gate.wait()
            for _ in range(a.rounds):
                if not post_with_retries(c, files, a, deadline, record):
                    return

    def record(r, status: str) -> None:
        with lock:
            codes[status] = codes.get(status, 0) + 1
            if r is not None and r.status_code == 200:
                sizes.append(len(r.content))

    peak_sampled = [0.0]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak_sampled[0] = max(peak_sampled[0], proc_status(proc.pid, "VmRSS") or 0.0)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=req if isinstance(req, tuple) else (req,), daemon=True) for req in requests]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(1.0, deadline - time.monotonic() + a.timeout))
        wall = time.monotonic() - t0
        peak, rss_end = proc_status(proc.pid, "VmHWM"), proc_status(proc.pid, "VmRSS")
    finally:
        done.set()
        stop(proc)
    faults = [line for line in log.read_text(errors="replace").splitlines() if "Traceback" in line or "internal error" in line]
    return {
        "scenario": name,
        "requests": len(requests) * a.rounds,
        "codes": dict(sorted(codes.items())),
        "answer_bytes_max": max(sizes) if sizes else None,
        "rss_start_mib": round(rss_start or 0),  # after the warm-up slice, unless --no-warm-up
        "peak_rss_mib": round(peak or 0),
        "rss_end_mib": round(rss_end or 0),  # what the server keeps once every answer is out (model sessions' arenas, allocator)
        "wall_s": round(wall, 1),
        "server_faults_in_log": len(faults),
        "server_env": a.server_env,
        "form": a.form,
        "slice": f"{a.slice_size}x{a.slice_size} {a.slice_dtype}",
        "src": str(a.src),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--scenario", choices=["slices", "mix", "both", "dicom", "nifti"], default="both", help="both: slices, then mix; dicom / nifti: only studies"
    )
    ap.add_argument("--clients", type=int, default=16, help="requests sent at once (mix: half slices, half DICOM zips)")
    ap.add_argument("--rounds", type=int, default=1, help="requests each client sends back to back")
    ap.add_argument("--slice-size", type=int, default=2048)
    ap.add_argument("--slice-dtype", choices=["float32", "uint8"], default="float32", help="float32: a TIFF; uint8: a PNG")
    ap.add_argument("--no-warm-up", dest="warm_up", action="store_false", help="measure from the idle server (no small slice first)")
    ap.add_argument("--dicom-shape", default="240,240,155", help="X,Y,Z voxels of each DICOM series")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    ap.add_argument("--deadline", type=float, default=900.0, help="seconds per scenario; clients stop sending after it")
    ap.add_argument("--retries", type=int, default=3, help="times a 503 / 429 is retried after its Retry-After")
    ap.add_argument("--src", type=Path, default=REPO, help="serve this checkout (its app.py and src/)")
    ap.add_argument("--model-dir", type=Path, default=REPO / "models")
    ap.add_argument("--server-env", nargs="*", default=[], metavar="NAME=VALUE")
    ap.add_argument("--form", nargs="*", default=[], metavar="NAME=VALUE", help="form fields of every request (e.g. model=ensemble tta=true)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    a = ap.parse_args()
    a.src, a.model_dir = a.src.resolve(), a.model_dir.resolve()

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        slice_name, slice_bytes = slice_file(a.slice_size, a.slice_dtype)
        suffix = slice_name.rsplit(".", 1)[1]
        if a.scenario in ("slices", "both"):
            reqs = [(f"slice{i}.{suffix}", slice_bytes) for i in range(a.clients)]
            results.append(run_scenario("slices", reqs, a, work))
            print(json.dumps(results[-1]), flush=True)
        if a.scenario in ("mix", "both"):
            study = dicom_zip(tuple(int(v) for v in a.dicom_shape.split(",")), work)
            half = a.clients // 2
            reqs = [(f"slice{i}.{suffix}", slice_bytes) for i in range(a.clients - half)] + [(f"study{i}.zip", study) for i in range(half)]
            res = run_scenario("mix", reqs, a, work)
            res["dicom_zip_mib"] = round(len(study) / 2**20, 1)
            results.append(res)
            print(json.dumps(results[-1]), flush=True)
        if a.scenario == "dicom":
            study = dicom_zip(tuple(int(v) for v in a.dicom_shape.split(",")), work)
            results.append(run_scenario("dicom", [(f"study{i}.zip", study) for i in range(a.clients)], a, work))
            print(json.dumps(results[-1]), flush=True)
        if a.scenario == "nifti":
            files = [
                (p.name, p.read_bytes()) for p in sorted(BRATS.glob("BraTS-MET-00110-000-t*.nii.gz")) if p.name.split("-")[-1][:3] in ("t1n", "t2f", "t1c")
            ]
            if len(files) != 3:
                raise SystemExit(f"the BraTS example is not in {BRATS}")
            results.append(run_scenario("nifti", [files] * a.clients, a, work))
            print(json.dumps(results[-1]), flush=True)
    if a.json:
        a.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
