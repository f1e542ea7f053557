#!/usr/bin/env python
"""API latency for one slice and one volume, server start time and memory; slices under concurrent clients.

    python scripts/bench_api.py                      # starts `uvicorn app:app` itself (models/ or $BRAINSEG_MODEL_DIR)
    python scripts/bench_api.py --url http://127.0.0.1:8000   # an already running server (no start time / RSS)
    python scripts/bench_api.py --in-process         # FastAPI TestClient, no HTTP
    python scripts/bench_api.py --clients 1 8 --duration 20 --no-volume   # slices/s, p50 / p99 at 1 and 8 clients
    python scripts/bench_api.py --src /path/to/other/checkout --clients 1 8   # the same, served by another checkout

With ``--clients``, each count C runs C client threads that send the slice case back to back for
``--duration`` seconds (after a warm-up); it prints the throughput (slices answered per second)
and the median and 99th percentile of the request latency. The load generator runs on the same
machine as the server, so it takes CPU from it: compare runs made the same way.

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


def start_server(host: str, port: int, log, src: Path = REPO, env: dict | None = None) -> tuple[subprocess.Popen, float]:
    """``uvicorn app:app`` of the checkout ``src`` (its app.py and src/ first on the path)."""
    import httpx

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", host, "--port", str(port), "--log-level", "warning"],
        cwd=src,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(src / "src"), os.environ.get("PYTHONPATH", "")]), **(env or {})},
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


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``."""
    ranked = sorted(values)
    return ranked[min(len(ranked) - 1, max(0, int(round(q / 100 * len(ranked) + 0.5)) - 1))]


def concurrent_slices(base: str, files, params: dict, clients: int, duration_s: float) -> dict:
    """``clients`` threads, each with its own connection, sending ``files`` back to back for ``duration_s``."""
    import threading

    import httpx

    latencies: list[float] = []
    failures: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client():
        with httpx.Client(base_url=base, timeout=600) as c:
            c.post("/v1/segment", files=[("files", f) for f in files], data=params)  # warm-up of this connection
            start.wait()
            while time.perf_counter() < stop_at[0]:
                t0 = time.perf_counter()
                r = c.post("/v1/segment", files=[("files", f) for f in files], data=params)
                took = time.perf_counter() - t0
                with lock:
                    (latencies if r.status_code == 200 else failures).append(took if r.status_code == 200 else r.status_code)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    stop_at[0] = time.perf_counter() + 3600
    start.wait()
    t0 = time.perf_counter()
    stop_at[0] = t0 + duration_s
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ms = [x * 1000 for x in latencies]
    return {"clients": clients, "answered": len(ms), "failed": len(failures), "per_s": len(ms) / wall, "p50": percentile(ms, 50), "p99": percentile(ms, 99)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--url", help="benchmark a running server at this URL")
    mode.add_argument("--in-process", action="store_true", help="use FastAPI's TestClient (no HTTP, no start time)")
    ap.add_argument("-n", type=int, default=5, help="requests per case (default 5)")
    ap.add_argument("--model", default=None, help="unetpp, attention_unet or ensemble (default: the registry's)")
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--precision", default=None, help="fp32 or int8 (default: the server's default for the model)")
    ap.add_argument("--synthetic", action="store_true", help="synthetic inputs instead of ../shared/data")
    ap.add_argument("--clients", type=int, nargs="*", default=[], help="also measure slices under this many concurrent clients (e.g. 1 8)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per --clients count (default 20)")
    ap.add_argument("--no-volume", action="store_true", help="skip the volume case")
    ap.add_argument("--src", type=Path, default=REPO, help="start the server from this checkout (default: this one)")
    ap.add_argument("--server-env", nargs="*", default=[], metavar="NAME=VALUE", help="environment of the started server (e.g. BRAINSEG_BATCH_SIZE=1)")
    a = ap.parse_args()
    if a.clients and a.in_process:
        ap.error("--clients needs HTTP (a started server or --url)")

    params = {"tta": str(a.tta).lower(), **({"model": a.model} if a.model else {}), **({"precision": a.precision} if a.precision else {})}
    cases = inputs(a.synthetic)
    if a.no_volume:
        cases = {k: v for k, v in cases.items() if k.startswith("slice")}
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
            proc, start_s = start_server("127.0.0.1", port, log, a.src.resolve(), dict(kv.split("=", 1) for kv in a.server_env))
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
            rows.append(
                (
                    name,
                    statistics.median(times),
                    min(times),
                    max(times),
                    body["timings_ms"]["inference"],
                    f"{body['model']['name']} {body['model'].get('precision', '')}",
                )
            )
        load = [concurrent_slices(base, next(iter(cases.values())), params, n, a.duration) for n in a.clients]
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
    if load:
        print(f"\n{next(iter(cases))} under concurrent clients ({a.duration:.0f} s each, after one warm-up request per client):")
        print(f"{'clients':>8s} {'slices/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'answered':>9s} {'failed':>7s}")
        for r in load:
            print(f"{r['clients']:8d} {r['per_s']:9.1f} {r['p50']:8.1f} {r['p99']:8.1f} {r['answered']:9d} {r['failed']:7d}")
    if start_s is not None:
        print(f"server start (launch -> /health OK): {start_s:.2f} s")
    if rss_warm is not None:
        print(f"server memory (VmRSS): {rss_cold:.0f} MiB at start, {rss_warm:.0f} MiB after a warm-up request, {rss_after:.0f} MiB after the benchmark")
    return 0


if __name__ == "__main__":
    sys.exit(main())
