#!/usr/bin/env python
"""Throughput beyond one process: brainseg batch in-process vs on Ray (one node, two nodes on this
machine), the service on Ray Serve with 1 vs 2 replicas, and the DICOMweb round trip through Orthanc.

    python scripts/bench_scale.py batch --studies 8 --repeat 3     # BraTS example x 8: in-process, --ray local, two Ray nodes
    python scripts/bench_scale.py batch-node-loss --studies 8      # two Ray nodes, the second one killed during the run
    python scripts/bench_scale.py serve --replicas 1 2 --clients 8 --duration 15 --repeat 3
    python scripts/bench_scale.py dicomweb --studies 5             # Orthanc (Debian's orthanc + orthanc-dicomweb) on free ports

Inputs come from ../shared/data (the BraTS example, a real LGG slice); models are the shipped ones
(``models/``, or $BRAINSEG_MODEL_DIR) at the CLI's default precision (fp32) unless --precision. Every
figure is a median of --repeat runs, printed with each run. The load generator and Ray's own processes
run on the same machine as the work, so compare runs made the same way; print ``nproc`` beside them.
Everything started here (Ray nodes, Serve, Orthanc) is stopped again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"
BRATS_DIR = SHARED / "brats-met-example"
SLICE = SHARED / "lgg/kaggle_3m/TCGA_CS_4941_19960909/TCGA_CS_4941_19960909_15.tif"
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests"), str(REPO / "src")]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def brainseg(*args: str, env: dict | None = None) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "brainseg.cli", *args], capture_output=True, text=True, env=env, cwd=REPO)
    took = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"brainseg {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return took, proc.stdout + proc.stderr


def model_args(a) -> list[str]:
    return ["--precision", a.precision] + (["--model-dir", os.environ["BRAINSEG_MODEL_DIR"]] if os.environ.get("BRAINSEG_MODEL_DIR") else [])


# ---------------------------------------------------------------- batch


# Ray 2.60 starts a cluster (ray start --head) with token authentication; its other nodes and drivers on this
# machine then need RAY_AUTH_MODE=token (the token is in ~/.ray/auth_token).
RAY_TOKEN_ENV = dict(os.environ, RAY_AUTH_MODE="token")


def ray_cmd(*args: str) -> None:
    subprocess.run(["ray", *args], check=True, capture_output=True, text=True, env=RAY_TOKEN_ENV)


def bench_batch(a) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    studies = work / "in"
    studies.mkdir()
    for i in range(a.studies):
        for seq in ("t1n", "t2f", "t1c"):
            (studies / f"case{i:02d}-{seq}.nii.gz").symlink_to((BRATS_DIR / f"BraTS-MET-00110-000-{seq}.nii.gz").resolve())
    runs: dict[str, list[float]] = {}
    notes: dict[str, str] = {}

    def run(mode: str, extra: list[str], r: int, env: dict | None = None) -> None:
        out = work / f"out-{mode}-{r}"
        load = os.getloadavg()[0]
        took, text = brainseg("batch", str(studies), "--out", str(out), "--quiet", *extra, *model_args(a), env=env)
        assert f"{a.studies} ok, 0 failed; {a.studies} done now" in text, text
        nodes = re.search(r"studies per Ray node: (.*)", text)
        runs.setdefault(mode, []).append(took)
        notes[mode] = nodes.group(1) if nodes else ""
        where = f" (studies per node: {notes[mode]})" if notes[mode] else ""
        print(f"batch {mode}: run {r + 1}: {took:.1f} s{where}; load average before {load:.1f}", flush=True)
        shutil.rmtree(out)

    try:
        for r in range(a.repeat):  # the modes interleaved, so that other load on the machine falls on each alike
            run("in-process", [], r)
            run("ray-local", ["--ray", "local"], r)
            port = free_port()
            store = str(200 << 20)
            ray_cmd("start", "--head", f"--port={port}", "--num-cpus=1", f"--object-store-memory={store}", "--include-dashboard=false", "--disable-usage-stats")
            try:
                ray_cmd("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--object-store-memory={store}", "--disable-usage-stats")
                run("ray-2-nodes", ["--ray", f"127.0.0.1:{port}"], r, env=RAY_TOKEN_ENV)
            finally:
                ray_cmd("stop")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        mode: {
            "median_s": statistics.median(v),
            "runs_s": [round(x, 2) for x in v],
            "studies_per_min": a.studies / statistics.median(v) * 60,
            "nodes": notes[mode],
        }
        for mode, v in runs.items()
    }


def raylets() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "raylet"], capture_output=True, text=True).stdout
    return {int(x) for x in out.split()}


def batch_node_loss(a) -> dict:
    """Two Ray nodes on this machine; the second node's raylet is killed (SIGKILL) --kill-after seconds into the run."""
    work = Path(tempfile.mkdtemp(prefix="bench-node-loss-"))
    studies = work / "in"
    studies.mkdir()
    for i in range(a.studies):
        for seq in ("t1n", "t2f", "t1c"):
            (studies / f"case{i:02d}-{seq}.nii.gz").symlink_to((BRATS_DIR / f"BraTS-MET-00110-000-{seq}.nii.gz").resolve())
    port = free_port()
    store = str(200 << 20)
    ray_cmd("start", "--head", f"--port={port}", "--num-cpus=1", f"--object-store-memory={store}", "--include-dashboard=false", "--disable-usage-stats")
    try:
        before = raylets()
        ray_cmd("start", f"--address=127.0.0.1:{port}", "--num-cpus=1", f"--object-store-memory={store}", "--disable-usage-stats")
        (worker_raylet,) = raylets() - before
        cmd = [sys.executable, "-m", "brainseg.cli", "batch", str(studies), "--out", str(work / "out"), "--quiet", "--ray", f"127.0.0.1:{port}", *model_args(a)]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, env=RAY_TOKEN_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(a.kill_after)
        os.kill(worker_raylet, signal.SIGKILL)
        print(f"killed the second node's raylet (pid {worker_raylet}) {a.kill_after:.0f} s into the run", flush=True)
        text, _ = proc.communicate(timeout=1200)
        took = time.perf_counter() - t0
        print(text.strip())
    finally:
        ray_cmd("stop")
        shutil.rmtree(work, ignore_errors=True)
    ok = re.search(r"batch: (\d+) studies: (\d+) ok, (\d+) failed", text)
    return {"studies": a.studies, "ok": int(ok.group(2)), "failed": int(ok.group(3)), "seconds": round(took, 1), "exit": proc.returncode}


# ---------------------------------------------------------------- Ray Serve


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> float:
    import httpx

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health/ready", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def bench_serve(a) -> dict:
    from bench import concurrent_slices

    files = [(SLICE.name, SLICE.read_bytes())]
    out = {}
    for replicas in a.replicas:
        port = free_port()
        results = tempfile.mkdtemp(prefix="bench-serve-results-")
        env = dict(os.environ, BRAINSEG_RESULT_DIR=results)
        cmd = [
            sys.executable,
            "-m",
            "brainseg.cli",
            "serve",
            "--ray",
            "--replicas",
            str(replicas),
            "--cpus-per-replica",
            str(a.cpus_per_replica),
            "--port",
            str(port),
        ]
        with open(Path(results).parent / f"bench-serve-{replicas}.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}"
        try:
            ready_s = wait_ready(url, proc)
            for _ in range(replicas * 4):  # every replica warm (its first request)
                import httpx

                httpx.post(url + "/v1/segment", files=[("files", f) for f in files], timeout=120)
            rows = []
            for _ in range(a.repeat):
                load = os.getloadavg()[0]
                rows.append({**concurrent_slices(url, files, {}, a.clients, a.duration), "load": load})
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            shutil.rmtree(results, ignore_errors=True)
        for r in rows:
            print(
                f"serve {replicas} replica(s): {r['per_s']:.1f} slices/s, p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, failed {r['failed']}; "
                f"load average before {r['load']:.1f}",
                flush=True,
            )
        out[f"{replicas} replica(s)"] = {
            "slices_per_s": statistics.median(r["per_s"] for r in rows),
            "p50_ms": statistics.median(r["p50"] for r in rows),
            "p99_ms": statistics.median(r["p99"] for r in rows),
            "runs_per_s": [round(r["per_s"], 1) for r in rows],
            "failed": sum(r["failed"] for r in rows),
            "ready_after_s": round(ready_s, 1),
        }
    return out


# ---------------------------------------------------------------- DICOMweb


def bench_dicomweb(a) -> dict:
    from helpers import orthanc, orthanc_missing  # tests/helpers.py: the Orthanc start-up of tests/test_dicomweb.py

    if orthanc_missing():
        raise SystemExit("Orthanc and its DICOMweb plugin are needed: apt-get install orthanc orthanc-dicomweb")
    work = Path(tempfile.mkdtemp(prefix="bench-orthanc-"))
    auth = ("bench", "bench-password")
    try:
        with orthanc(work, *auth, name="bench") as url:
            took, per_study, slices = dicomweb_pass(a, work, url, auth)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "studies": a.studies,
        "images_per_study": slices // a.studies,
        "per_study_s": [round(x, 2) for x in per_study],
        "median_per_study_s": statistics.median(per_study),
        "pass_s_with_model_load": round(took, 1),
    }


def dicomweb_pass(a, work: Path, url: str, auth: tuple[str, str]) -> tuple[float, list[float], int]:
    """``a.studies`` studies uploaded to Orthanc, then one ``brainseg dicomweb --once`` pass: (its seconds, seconds per study, images)."""
    import httpx
    from dicom_series import write_brats_study

    slices = 0
    for i in range(a.studies):  # the BraTS example cut to 40 slices, tilted, as three DICOM series (FLAIR, T1, T1 post)
        (work / f"study{i}").mkdir()
        study = write_brats_study(work / f"study{i}", BRATS_DIR)
        for f in sorted(study["dicom"].rglob("*.dcm")):
            httpx.post(url + "/instances", content=f.read_bytes(), auth=auth, timeout=60).raise_for_status()
            slices += 1
    took, text = brainseg(
        "dicomweb", "--url", url + "/dicom-web", "--once", "--auth", f"{auth[0]}:{auth[1]}", "--state", str(work / "state.json"), *model_args(a)
    )
    per_study = [float(x) for x in re.findall(r"segmented, SEG stored \(.*?; ([0-9.]+) s\)", text)]
    assert len(per_study) == a.studies, text
    print(text.strip())
    return took, per_study, slices


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    b = sub.add_parser("batch")
    b.add_argument("--studies", type=int, default=8)
    b.add_argument("--repeat", type=int, default=3)
    s = sub.add_parser("serve")
    s.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    s.add_argument("--cpus-per-replica", type=float, default=1.0)
    s.add_argument("--clients", type=int, default=8)
    s.add_argument("--duration", type=float, default=15.0)
    s.add_argument("--repeat", type=int, default=3)
    k = sub.add_parser("batch-node-loss")
    k.add_argument("--studies", type=int, default=8)
    k.add_argument("--kill-after", type=float, default=12.0)
    d = sub.add_parser("dicomweb")
    d.add_argument("--studies", type=int, default=5)
    for p in (b, k, d):
        p.add_argument("--precision", default="fp32")
    a = ap.parse_args()
    result = {"batch": bench_batch, "batch-node-loss": batch_node_loss, "serve": bench_serve, "dicomweb": bench_dicomweb}[a.what](a)
    print(json.dumps({"what": a.what, "cpus": os.cpu_count(), **result}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
