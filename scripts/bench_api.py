#!/usr/bin/env python
"""API latency for one slice and one volume, server start time and memory.

    python scripts/bench_api.py                      # starts `uvicorn app:app` itself (models/ or $BRAINSEG_MODEL_DIR)
    python scripts/bench_api.py --url http://127.0.0.1:8000   # an already running server (no start time / RSS)
    python scripts/bench_api.py --in-process         # FastAPI TestClient, no HTTP

Inputs default to a real LGG slice and the BraTS example (t1n, t2f, t1c) under ../shared/data;
with --synthetic (or if those are missing) a synthetic slice and a synthetic 64x64x32 volume.
Prints the median (and min / max) of N requests per case, the time from process launch to
/health OK, and the server's resident memory (VmRSS) after a warm-up request.
"""

from __future__ import annotations

import argparse
import gzip
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
SLICE = SHARED / "lgg/kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_15.tif"
BRATS = [SHARED / f"brats-met-example/BraTS-MET-00110-000-{s}.nii.gz" for s in ("t1n", "t2f", "t1c")]


def inputs(synthetic: bool) -> dict[str, list[tuple[str, bytes]]]:
    sys.path.insert(0, str(REPO / "src"))
    from brainseg.synthetic import synthetic_png, synthetic_slice

    cases = {}
    if not synthetic and SLICE.is_file():
        cases["slice (LGG TIFF 256x256)"] = [(SLICE.name, SLICE.read_bytes())]
    else:
        cases["slice (synthetic PNG 256x256)"] = [("synthetic.png", synthetic_png())]
    if not synthetic and all(p.is_file() for p in BRATS):
        cases["volume (BraTS 3 x 240x240x155)"] = [(p.name, p.read_bytes()) for p in BRATS]
    else:
        import nibabel as nib
        import numpy as np

        img, _ = synthetic_slice(size=64)
        vol = np.stack([np.rot90(img[:, :, 1], -1).astype(np.float32)] * 32, axis=2)
        cases["volume (synthetic NIfTI 64x64x32)"] = [("synthetic.nii.gz", gzip.compress(nib.Nifti1Image(vol, np.eye(4)).to_bytes()))]
    return cases


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    """Resident memory (VmRSS) of one process, in MiB; None if it cannot be read."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_server(host: str, port: int, log) -> tuple[subprocess.Popen, float]:
    import httpx

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", host, "--port", str(port), "--log-level", "warning"],
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://{host}:{port}/health"
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see its log")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return proc, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        if time.perf_counter() - t0 > 120:
            proc.terminate()
            raise SystemExit("server did not answer /health within 120 s")
        time.sleep(0.05)


def measure(post, files, n: int, params: dict) -> tuple[list[float], dict]:
    times, body = [], {}
    for _ in range(n):
        t0 = time.perf_counter()
        r = post(files, params)
        times.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise SystemExit(f"request failed: HTTP {r.status_code}: {r.text[:300]}")
        body = r.json()
    return times, body


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--url", help="benchmark a running server at this URL")
    mode.add_argument("--in-process", action="store_true", help="use FastAPI's TestClient (no HTTP, no start time)")
    ap.add_argument("-n", type=int, default=5, help="requests per case (default 5)")
    ap.add_argument("--model", default=None, help="unetpp, attention_unet or ensemble (default: the registry's)")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--synthetic", action="store_true", help="synthetic inputs instead of ../shared/data")
    a = ap.parse_args()

    params = {"tta": str(a.tta).lower(), **({"model": a.model} if a.model else {})}
    cases = inputs(a.synthetic)
    proc, start_s, log = None, None, None
    if a.in_process:
        import warnings

        warnings.simplefilter("ignore")
        sys.path.insert(0, str(REPO))
        from fastapi.testclient import TestClient

        from app import app

        client = TestClient(app).__enter__()
        where = "in-process TestClient"
    else:
        import httpx

        if a.url:
            base = a.url.rstrip("/")
        else:
            port = free_port()
            (REPO / "artifacts").mkdir(exist_ok=True)
            log = open(REPO / "artifacts" / "bench_server.log", "wb")
            proc, start_s = start_server("127.0.0.1", port, log)
            base = f"http://127.0.0.1:{port}"
        client = httpx.Client(base_url=base, timeout=600)
        where = base
    try:
        health = client.get("/health").json()

        def post(files, p):
            return client.post("/v1/segment", files=[("files", f) for f in files], data=p)

        rss_cold = rss_mib(proc.pid) if proc else None
        post(next(iter(cases.values())), params)  # warm-up: loads the model if not preloaded
        rss_warm = rss_mib(proc.pid) if proc else None
        rows = []
        for name, files in cases.items():
            times, body = measure(post, files, a.n, params)
            rows.append((name, statistics.median(times), min(times), max(times), body["timings_ms"]["inference"], body["model"]["name"]))
        rss_after = rss_mib(proc.pid) if proc else None
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=30)
        if log:
            log.close()

    print(f"server: {where} · default model {health.get('default_model')} · brainseg {health.get('version')} · {os.cpu_count()} CPUs")
    print(f"{'case':34s} {'median ms':>10s} {'min ms':>9s} {'max ms':>9s} {'inference ms':>13s}  model")
    for name, med, lo, hi, inf, model in rows:
        print(f"{name:34s} {med:10.1f} {lo:9.1f} {hi:9.1f} {inf:13.1f}  {model}")
    print(f"(median of {a.n} requests each, after one warm-up request; inference = server-side model time of the last request)")
    if start_s is not None:
        print(f"server start (launch -> /health OK): {start_s:.2f} s")
    if rss_warm is not None:
        print(f"server memory (VmRSS): {rss_cold:.0f} MiB at start, {rss_warm:.0f} MiB after a warm-up request, {rss_after:.0f} MiB after the benchmark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
