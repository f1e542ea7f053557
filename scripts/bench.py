#!/usr/bin/env python
"""One benchmark, one run, the same inputs: networks, the API, memory, and the theoretical bound.

    python scripts/bench.py                                  # shipped models/, real data -> docs/benchmarks.md
    python scripts/bench.py --quick --model-dir DIR --out /tmp/bench.md    # smoke test (e.g. the tiny test models)

Measures, per registered model: PyTorch eager, ONNX Runtime fp32 and ONNX Runtime INT8, on the same
preprocessed LGG slices at batch 1 and 32 (network only), and one slice end to end (preprocessing,
network, resize back); FLOPs of each network at its input size against the CPU's peak. Then the API,
started as the README starts it (``uvicorn app:app --http brainseg.serving.protocol:H11WithHeaderTimeout``):
launch to /health and to the first answer; one and eight concurrent clients sending slices
(throughput, p50 / p99) with the default answer and with ``return=none`` (no PNGs), per precision;
where a slice's and a volume's milliseconds go (the server's ``timings_ms`` and HTTP); the BraTS example
volume (fp32 and INT8); resident memory idle, after 100 slices and after 20 volumes, and the peak of one
volume request. Medians over ``--repeats``; backends are interleaved within each repeat so that load
from other processes spreads over all of them. Writes the Markdown table (the targets of issue 19 with
their before values, then everything measured, then the hand-written ``docs/profiles/notes.md``) to
``--out`` and the numbers to a ``.json`` beside it.

INT8 files: the registry's ``onnx_int8`` where set; otherwise quantised here
(``export.export_int8``, calibrated on the split's training patients) into ``artifacts/bench/``.
The load generator (the clients) runs on the same cores as the server, as the header says.
(``scripts/bench_api.py`` and ``scripts/bench_inference.py`` were folded into this script.)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from brainseg import __version__  # noqa: E402
from brainseg.inference.backends import OnnxBackend, Segmenter, int8_path  # noqa: E402
from brainseg.inference.registry import ModelEntry, Registry, read, write_registry  # noqa: E402
from brainseg.io.datasets import discover, labelled, load_patient, read_split  # noqa: E402
from brainseg.io.files import write_bytes_atomic, write_json_atomic  # noqa: E402
from brainseg.preprocessing import preprocess_slice  # noqa: E402
from brainseg.serving.allocator import keep_freed, limit_arenas  # noqa: E402
from brainseg.serving.settings import Settings  # noqa: E402

SHARED = REPO / ".." / "shared" / "data"
LGG = SHARED / "lgg" / "kaggle_3m"
BENCH_PATIENT = "TCGA_CS_4941_19960909"  # slices of one patient, the same for every backend
WORK = REPO / "artifacts" / "bench"


SLICE = LGG / "TCGA_CS_4941_19960909" / "TCGA_CS_4941_19960909_15.tif"
BRATS = [SHARED / "brats-met-example" / f"BraTS-MET-00110-000-{s}.nii.gz" for s in ("t1n", "t2f", "t1c")]
# As the README starts the service for others (without --reload): the request-head timeout protocol.
SERVER_ARGS = ("--http", "brainseg.serving.protocol:H11WithHeaderTimeout")


# ---------------------------------------------------------------- the API's inputs and clients


def inputs(synthetic: bool = False) -> dict[str, list[tuple[str, bytes]]]:
    """A real LGG slice and the BraTS example (t1n, t2f, t1c); synthetic ones where those are missing."""
    from brainseg.io.synthetic import synthetic_png, synthetic_slice

    cases = {}
    if not synthetic and SLICE.is_file():
        cases["slice (LGG TIFF 256x256)"] = [(SLICE.name, SLICE.read_bytes())]
    else:
        cases["slice (synthetic PNG 256x256)"] = [("synthetic.png", synthetic_png())]
    if not synthetic and all(p.is_file() for p in BRATS):
        cases["volume (BraTS 3 x 240x240x155)"] = [(p.name, p.read_bytes()) for p in BRATS]
    else:
        import gzip

        import nibabel as nib

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
    """``uvicorn app:app ... --http brainseg.serving.protocol:H11WithHeaderTimeout`` of the checkout ``src``,
    as the README starts it; (the process, seconds from launch to /health OK)."""
    import httpx

    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "app:app", "--host", host, "--port", str(port), "--log-level", "warning", *SERVER_ARGS],
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


# ---------------------------------------------------------------- the machine


def cpu_info() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    first = text.split("\n\n")[0]
    fields = dict(line.split(":", 1) for line in first.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mhz = float(fields.get("cpu MHz", 0) or 0)
    return {
        "model": fields.get("model name", platform.processor()),
        "cores": cores,
        "mhz": mhz,
        "flags": sorted(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16") if f in flags),
    }


def peak_gflops(cpu: dict) -> dict:
    """Theoretical peak: cores x clock x operations per cycle, from the vector units the flags name.

    fp32: an FMA is 2 FLOPs per lane; AVX-512 has 16 fp32 lanes, AVX2 8; two FMA units per core
    (server cores; one on some client parts). int8: VNNI ``vpdpbusd`` does 4 multiply-adds per
    32-bit lane (8 operations), two per cycle assumed likewise. The clock is /proc/cpuinfo's
    ``cpu MHz`` (what the hypervisor reports; turbo not counted). AMX tiles are not counted:
    ONNX Runtime's CPU kernels used here do not use them.
    """
    ghz = cpu["mhz"] / 1000
    lanes = 16 if "avx512f" in cpu["flags"] else 8 if "avx2" in cpu["flags"] else 4
    fp32_per_cycle = lanes * 2 * 2
    int8_per_cycle = lanes * 8 * 2 if ({"avx512_vnni", "avx_vnni"} & set(cpu["flags"])) else lanes * 4
    return {
        "fp32": cpu["cores"] * ghz * fp32_per_cycle,
        "int8": cpu["cores"] * ghz * int8_per_cycle,
        "how": f"{cpu['cores']} cores x {ghz:.2f} GHz x {fp32_per_cycle} fp32 FLOP/cycle ({lanes} lanes, FMA, 2 units) "
        f"= {cpu['cores'] * ghz * fp32_per_cycle:.0f} GFLOP/s; int8 {int8_per_cycle} op/cycle (VNNI) = {cpu['cores'] * ghz * int8_per_cycle:.0f} GOP/s",
    }


def versions() -> dict:
    out = {"python": platform.python_version(), "brainseg": __version__, "os": platform.platform()}
    for mod in ("numpy", "onnxruntime", "onnx", "torch", "cv2", "fastapi", "uvicorn"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        out["commit"] = commit + (" (with uncommitted changes in the tree)" if dirty else "")
    except Exception:
        out["commit"] = None
    return out


def machine_load() -> dict:
    """Load average and the busiest other processes: what else ran during the benchmark. ``ps`` gives a process's CPU
    share over its lifetime, so a stopped one (state T, e.g. a training job paused with SIGSTOP) is named as paused."""
    load = os.getloadavg()
    ps = subprocess.run(["ps", "-eo", "pid,stat,pcpu,rss,args", "--sort=-pcpu"], capture_output=True, text=True).stdout.splitlines()[1:]
    mine = {os.getpid()}
    busy = []
    for line in ps:
        pid, stat, pcpu, rss, args = line.split(None, 4)
        if int(pid) not in mine and float(pcpu) >= 5.0:
            busy.append(f"{args[:90]} ({'paused (stopped), ' if stat.startswith('T') else ''}{float(pcpu):.0f}% CPU over its life)")
    return {"loadavg": [round(v, 2) for v in load], "busy": busy[:5]}


# ---------------------------------------------------------------- networks


def conv_flops(onnx_path: Path, size: int) -> float:
    """FLOPs of one (1, C, size, size) input: 2 x multiply-adds of every Conv (from ONNX shape inference).

    Element-wise operations, pooling and resizing are left out (well under 1% here)."""
    import onnx

    model = onnx.load(str(onnx_path))
    inp = model.graph.input[0].type.tensor_type.shape.dim
    inp[0].dim_value, inp[2].dim_value, inp[3].dim_value = 1, size, size
    model = onnx.shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(model.graph.value_info) + list(model.graph.output)}
    weights = {t.name: list(t.dims) for t in model.graph.initializer}
    total = 0
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        out = shapes.get(node.output[0])
        w = weights.get(node.input[1])
        if not out or not w:
            raise ValueError(f"{onnx_path}: no shape for {node.name}")
        total += 2 * int(np.prod(out)) * int(np.prod(w[1:]))  # out elements x (C_in / groups x kH x kW)
    return float(total)


def int8_file(entry: ModelEntry, reg: Registry, data: Path, quick: bool) -> Path | None:
    """The registry's INT8 file, else one quantised now (kept in artifacts/bench/ and reused while newer than the fp32 file)."""
    base = Path(reg.directory)
    if entry.onnx_int8 and (base / entry.onnx_int8).is_file():
        return base / entry.onnx_int8
    from brainseg.inference.export import export_int8

    fp32 = base / entry.onnx
    out = WORK / ("quick" if quick else "") / int8_path(fp32).name
    if out.is_file() and out.stat().st_mtime > fp32.stat().st_mtime:
        return out
    try:
        split = reg.split or read_split(base / "split.json")
        train = split["train"]
    except (OSError, KeyError, ValueError):
        train = None
    out.parent.mkdir(parents=True, exist_ok=True)
    print(f"  quantising {fp32} -> {out} (calibration on {'the split training patients' if train else 'every patient'})", flush=True)
    return export_int8(fp32, data, train[:3] if quick and train else train, n_slices=40 if quick else 300, out=out)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_networks(reg: Registry, images: list[np.ndarray], repeats: int, data: Path, quick: bool) -> tuple[list[dict], dict]:
    """Per model and backend: ms per slice at batch 1 and 32 (network), one slice end to end, agreement with fp32."""
    rows, int8_paths = [], {}
    base = Path(reg.directory)
    threads = len(os.sched_getaffinity(0))
    for name, entry in sorted(reg.models.items()):
        backends = {}
        ckpt = base / entry.checkpoint if entry.checkpoint else None
        if ckpt is not None and ckpt.is_file() and importlib.util.find_spec("torch"):
            import torch

            from brainseg.inference.backends import TorchBackend

            torch.set_num_threads(threads)
            backends["PyTorch eager (fp32)"] = TorchBackend(ckpt, device="cpu")
        backends["ONNX Runtime fp32"] = OnnxBackend(base / entry.onnx, threads)
        q = int8_file(entry, reg, data, quick)
        if q is not None:
            int8_paths[name] = q
            backends["ONNX Runtime INT8"] = OnnxBackend(q, threads)
        cfg = backends["ONNX Runtime fp32"].config.preprocess
        segs = {label: Segmenter(b, name) for label, b in backends.items()}
        x32 = np.stack([preprocess_slice(img, cfg) for img in images[:32]])  # the same inputs for every backend
        x1 = x32[:1]
        for b in backends.values():  # warm-up (first-run allocations, lazy initialisation)
            b(x1), b(x32)
        t1 = {k: [] for k in backends}
        t32 = {k: [] for k in backends}
        e2e = {k: [] for k in backends}
        for _ in range(repeats):
            for label, b in backends.items():
                t1[label].append(timed(lambda b=b, x=x1: b(x)))
                t32[label].append(timed(lambda b=b, x=x32: b(x)) / len(x32))
                e2e[label].append(timed(lambda seg=segs[label]: seg.probabilities(images[:1])))
        ref = 1 / (1 + np.exp(-backends["ONNX Runtime fp32"](x32)))
        flops = conv_flops(base / entry.onnx, cfg.input_size)
        for label, b in backends.items():
            prob = 1 / (1 + np.exp(-b(x32)))
            rows.append(
                {
                    "model": name,
                    "backend": label,
                    "batch1_ms": 1000 * statistics.median(t1[label]),
                    "batch1_ms_range": [1000 * min(t1[label]), 1000 * max(t1[label])],
                    "batch32_ms_per_slice": 1000 * statistics.median(t32[label]),
                    "end_to_end_ms": 1000 * statistics.median(e2e[label]),
                    "mean_abs_prob_diff_vs_fp32": float(np.abs(prob - ref).mean()),
                    "gflop_per_slice": flops / 1e9,
                    "input_size": cfg.input_size,
                }
            )
        print(
            f"  {name}: " + ", ".join(f"{r['backend']} {r['batch1_ms']:.1f} / {r['batch32_ms_per_slice']:.1f} ms" for r in rows if r["model"] == name),
            flush=True,
        )
    return rows, int8_paths


# ---------------------------------------------------------------- the API


def bench_model_dir(reg: Registry, int8_paths: dict[str, Path], into: Path) -> Path:
    """A model folder for the server: the registered files (linked) plus the INT8 files, registered as onnx_int8."""
    base = Path(reg.directory)
    into.mkdir(parents=True, exist_ok=True)
    for name, entry in reg.models.items():
        for key in ("checkpoint", "onnx", "card"):
            rel = getattr(entry, key)
            if rel and (base / rel).is_file():
                (into / rel).symlink_to((base / rel).resolve())
        if name in int8_paths and not (into / int8_paths[name].name).exists():
            (into / int8_paths[name].name).symlink_to(int8_paths[name].resolve())
            entry.onnx_int8 = int8_paths[name].name
    write_registry(into, reg)
    return into


def vm_hwm_reset(pid: int) -> bool:
    """Reset the peak resident memory (VmHWM) of a process we started (Linux: clear_refs 5)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def vm_hwm_mib(pid: int) -> float | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return None


def bench_server(model_dir: Path, cases: dict, repeats: int, quick: bool, precisions: list[str], src: Path = REPO) -> dict:
    """The API of the checkout ``src`` (``--src``: an older commit, for a before / after on one machine)."""
    import httpx

    slice_files = next(v for k, v in cases.items() if k.startswith("slice"))
    volume_files = next(v for k, v in cases.items() if k.startswith("volume"))
    results_dir = Path(tempfile.mkdtemp(prefix="brainseg-bench-results-"))
    env = {"BRAINSEG_MODEL_DIR": str(model_dir), "BRAINSEG_RESULT_DIR": str(results_dir), "BRAINSEG_RATE_PER_MIN": "0"}
    WORK.mkdir(parents=True, exist_ok=True)
    out: dict = {"precisions": precisions}
    proc = None
    with open(WORK / "bench_server.log", "wb") as log:
        try:
            port = free_port()
            t_launch = time.perf_counter()
            proc, out["start_to_health_s"] = start_server("127.0.0.1", port, log, src, env=env)
            url = f"http://127.0.0.1:{port}"
            out["rss_idle_mib"] = rss_mib(proc.pid)
            with httpx.Client(base_url=url, timeout=300) as c:
                r = c.post("/v1/segment", files=[("files", f) for f in slice_files])
                out["start_to_first_answer_s"] = time.perf_counter() - t_launch
                if r.status_code != 200:
                    raise SystemExit(f"first slice request failed: HTTP {r.status_code}: {r.text[:300]}")
                out["rss_after_first_answer_mib"] = rss_mib(proc.pid)
                out["tta_default"] = bool(r.json().get("tta"))  # the served default (scripts/ship_tta.py), what a request that does not say runs
                slices_sent = 1
                out["slices"] = slice_runs(c, url, slice_files, precisions, 2.0 if quick else 15.0)
                slices_sent += sum(r["answered"] + r["clients"] + 1 for r in out["slices"])
                out["slice_split_ms"] = slice_split(c, slice_files)
                while slices_sent < 100:
                    c.post("/v1/segment", files=[("files", f) for f in slice_files])
                    slices_sent += 1
                out["rss_after_100_slices_mib"] = rss_mib(proc.pid)
                out["volumes"] = []
                volumes_sent = 0
                for precision, tta in [(p, t) for p in precisions for t in TTA]:
                    times, server, peaks, skipped = [], [], [], None
                    for _ in range(repeats):
                        before = rss_mib(proc.pid)
                        reset = vm_hwm_reset(proc.pid)
                        t0 = time.perf_counter()
                        r = c.post("/v1/segment", files=[("files", f) for f in volume_files], data={"precision": precision, "tta": str(tta).lower()})
                        times.append(time.perf_counter() - t0)
                        volumes_sent += 1
                        if r.status_code != 200:
                            raise SystemExit(f"volume request failed: HTTP {r.status_code}: {r.text[:300]}")
                        body = r.json()
                        server.append(body["timings_ms"])
                        skipped = len(body.get("background_slices_skipped", []))
                        if reset:
                            peaks.append(vm_hwm_mib(proc.pid) - before)
                    row = {
                        "precision": precision,
                        "tta": tta,
                        "median_s": statistics.median(times),
                        "range_s": [min(times), max(times)],
                        "server_inference_ms": statistics.median(t["inference"] for t in server),
                        "server_decode_ms": statistics.median(t["decode"] for t in server),
                        "split_ms": split_of(server, times),
                        "peak_above_before_mib": max(peaks) if peaks else None,
                        "slices_skipped": skipped,
                        "repeats": repeats,
                    }
                    out["volumes"].append(row)
                    print(f"  API volume {precision}, TTA {tta}: {row['median_s']:.2f} s (server inference {row['server_inference_ms']:.0f} ms)", flush=True)
                while volumes_sent < 20:
                    c.post("/v1/segment", files=[("files", f) for f in volume_files])
                    volumes_sent += 1
                out["volumes_sent"] = volumes_sent
                out["rss_after_20_volumes_mib"] = rss_mib(proc.pid)
                out["load_during"] = machine_load()
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=30)
            shutil.rmtree(results_dir, ignore_errors=True)
    return out


def slice_runs(c, url: str, slice_files, precisions: list[str], duration: float) -> list[dict]:
    """Slices through the API for ``duration`` seconds each: every precision, answer (``ANSWERS``), TTA and 1 / 8 clients."""
    runs = []
    for precision in precisions:
        c.post("/v1/segment", files=[("files", f) for f in slice_files], data={"precision": precision})  # loads that precision
        answers = ANSWERS if c.post("/v1/segment", files=[("files", f) for f in slice_files], data={"return": "none"}).status_code == 200 else ANSWERS[:1]
        for answer in answers:  # a server from before return= knows only the default answer
            for tta in TTA:
                params = {"precision": precision, "tta": str(tta).lower(), **({"return": answer} if answer != "default" else {})}
                for clients in (1, 8):
                    res = concurrent_slices(url, slice_files, params, clients, duration)
                    res["precision"], res["seconds"], res["answer"], res["tta"] = precision, duration, answer, tta
                    runs.append(res)
                    print(
                        f"  API slices {precision}, return={answer}, TTA {tta}, {clients} client(s): {res['per_s']:.1f}/s, "
                        f"p50 {res['p50']:.0f} ms, p99 {res['p99']:.0f} ms",
                        flush=True,
                    )
    return runs


ANSWERS = ("default", "none")  # return= of the slice runs: the default answer (mask and overlay PNGs), and none
TTA = (False, True)  # every API run both ways: one forward pass, and flip TTA (two); the targets are one pass's


def split_of(server: list[dict], times: list[float]) -> dict:
    """Medians of the server's timings_ms (decode, inference, network, answer, store, total) and HTTP
    (the client's time less the server's total: upload, parsing, JSON, the answer's transfer)."""
    keys = [k for k in ("decode", "inference", "network", "answer", "store", "total") if all(k in t for t in server)]
    out = {k: statistics.median(t[k] for t in server) for k in keys}
    if "total" in out:
        out["http"] = statistics.median(1000 * w - t["total"] for t, w in zip(server, times, strict=True))
    return out


def slice_split(c, files, n: int = 30) -> dict:
    """Where one slice request's milliseconds go, default precision, one client, default answer."""
    server, times = [], []
    for _ in range(n):
        t0 = time.perf_counter()
        r = c.post("/v1/segment", files=[("files", f) for f in files])
        times.append(time.perf_counter() - t0)
        server.append(r.json()["timings_ms"])
    return split_of(server, times)


# ---------------------------------------------------------------- the report


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


# The targets of issue 19 (2 cores, one run), checked against what was measured; "before" is the issue's
# own measurement (the commit before its work: 57d810b, docs/benchmarks.md of 2026-11-28 for the start time).
TARGETS = (
    ("one client through the API (best precision and answer)", ">= 80 slices/s", "37.6 slices/s"),
    ("8 clients through the API: throughput / p99 (best)", ">= 100 slices/s, p99 <= 200 ms", "56.9 slices/s, p99 211 ms"),
    ("INT8 vs ONNX fp32 network, batch 32, every model", ">= 2x", "1.67x / 1.55x"),
    ("INT8 vs fp32 through the API, one client (default answer / return=none)", ">= 1.5x", "1.11x"),
    ("BraTS 240x240x155 set through the API, end to end (median, best precision)", "<= 1.0 s", "1.72 s (int8)"),
    ("server RSS after 20 volumes", "<= 600 MB", "731-767 MB"),
    ("server start: launch to /health", "<= 1.5 s", "0.87 s"),
)


def _slices(a: dict, clients: int) -> list[dict]:
    """The runs with ``clients`` clients, one forward pass (the targets predate TTA as a default)."""
    return [s for s in a["slices"] if s["clients"] == clients and not s.get("tta")]


def measured(res: dict) -> list[tuple[str, bool]]:
    """Each target's measured value (text) and whether it is met, from one run's results."""
    nets, a = res["networks"], res["api"]
    by = {(r["model"], r["backend"]): r for r in nets}
    models = sorted({r["model"] for r in nets})
    q = [
        by[(m, "ONNX Runtime fp32")]["batch32_ms_per_slice"] / by[(m, "ONNX Runtime INT8")]["batch32_ms_per_slice"]
        for m in models
        if (m, "ONNX Runtime INT8") in by
    ]
    one, eight = max(_slices(a, 1), key=lambda s: s["per_s"]), max(_slices(a, 8), key=lambda s: s["per_s"])
    per = {(s["precision"], s.get("answer", "default")): s["per_s"] for s in _slices(a, 1)}
    api_q = [per[("int8", ans)] / per[("fp32", ans)] for ans in ANSWERS if ("int8", ans) in per and ("fp32", ans) in per]
    vol = min((w for w in a["volumes"] if not w.get("tta")), key=lambda w: w["median_s"])
    rss20 = a["rss_after_20_volumes_mib"] * 1.048576

    def how(s: dict) -> str:
        return f"{s['precision']}, return={s.get('answer', 'default')}"

    return [
        (f"{one['per_s']:.1f} slices/s ({how(one)})", one["per_s"] >= 80),
        (f"{eight['per_s']:.1f} slices/s, p99 {eight['p99']:.0f} ms ({how(eight)})", eight["per_s"] >= 100 and eight["p99"] <= 200),
        (" / ".join(f"{x:.2f}x" for x in q), bool(q) and min(q) >= 2),
        (" / ".join(f"{x:.2f}x" for x in api_q) or "n/a", bool(api_q) and max(api_q) >= 1.5),
        (f"{vol['median_s']:.2f} s ({vol['precision']})", vol["median_s"] <= 1.0),
        (f"{rss20:.0f} MB", rss20 <= 600),
        (f"{a['start_to_health_s']:.2f} s", a["start_to_health_s"] <= 1.5),
    ]


def before_line(res: dict) -> str:
    b = res.get("before")
    if not b:
        return "Before: the figures of issue 19 (measured on the machine of the time; see its text)."
    return (
        f"Before: the same script on this machine on {b['date']}, the API served by `{b['api'].get('src', '?')}` "
        f"({b.get('note') or 'no note'}; load average {b['machine']['load_start']['loadavg']} at its start, {b['machine']['load_end']['loadavg']} at its end). "
        + (
            "The networks are measured in-process by the current code in both runs."
            if b["versions"].get("commit") == res["versions"].get("commit")  # --src: an older API served by this script
            else f"Each run measured the networks with its own code (before: commit {b['versions'].get('commit', '?')}, after: {res['versions'].get('commit', '?')})."
        )
    )


def target_rows(res: dict) -> list[str]:
    """One row per target: goal, before (``--before``: that run on this machine; else the issue's figures), after."""
    before = [text for text, _ in measured(res["before"])] if res.get("before") else [t[2] for t in TARGETS]
    return [
        f"| {name} | {goal} | {was} | {got} | {'met' if ok else '**not met**'} |"
        for (name, goal, _), was, (got, ok) in zip(TARGETS, before, measured(res), strict=True)
    ]


def markdown(res: dict) -> str:
    m, v, cpu, peak = res["machine"], res["versions"], res["machine"]["cpu"], res["peak"]
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python scripts/bench.py{' --quick' if res['quick'] else ''}` on {res['date']} "
        f"(models: `{res['model_dir']}`{'; QUICK smoke run: few repeats, fewer requests, not for quoting' if res['quick'] else ''}).",
        "",
        f"- **Machine**: {cpu['model']}, {cpu['cores']} cores at {cpu['mhz']:.0f} MHz ({', '.join(cpu['flags'])}); {m['os']}",
        f"- **Versions**: Python {v['python']}, brainseg {v['brainseg']} at {v['commit']}, numpy {v['numpy']}, onnxruntime {v['onnxruntime']}, "
        f"torch {v['torch']}, OpenCV {v['cv2']}, FastAPI {v['fastapi']}, uvicorn {v['uvicorn']}",
        f"- **Load**: load average {m['load_start']['loadavg']} at the start, {m['load_end']['loadavg']} at the end; "
        f"other busy processes: {'; '.join(m['load_start']['busy'] + m['load_end']['busy']) or 'none'}",
        f"- Medians of {res['repeats']} repeats (backends interleaved in each); threads: ONNX Runtime and PyTorch {cpu['cores']}. "
        "The API clients run on the same cores as the server."
        + (
            f" The networks run under the server's allocator settings (at most {res['allocator']['arenas']} malloc arenas, "
            f"freed blocks under {res['allocator']['keep_mib']} MiB kept: `serving/allocator.py`)."
            if res.get("allocator")
            else ""
        ),
        *([f"- **Note**: {res['note']}"] if res.get("note") else []),
        "",
        "## Targets",
        "",
        before_line(res),
        "",
        "| target | goal | before | after (this run) | |",
        "|---|---|---|---|---|",
        *target_rows(res),
        "",
        "## Networks (same preprocessed LGG slices, 128 x 128 x 3)",
        "",
        "| model | backend | batch 1, ms | batch 32, ms / slice | 1 slice end to end, ms | mean abs. probability difference vs ONNX fp32 |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["networks"]:
        lines.append(
            f"| {r['model']} | {r['backend']} | {r['batch1_ms']:.1f} [{r['batch1_ms_range'][0]:.1f}-{r['batch1_ms_range'][1]:.1f}] | "
            f"{r['batch32_ms_per_slice']:.1f} | {r['end_to_end_ms']:.1f} | {r['mean_abs_prob_diff_vs_fp32']:.4f} |"
        )
    lines += ["", "| model | ONNX fp32 vs PyTorch (batch 1 / 32) | INT8 vs ONNX fp32 (batch 1 / 32) |", "|---|---|---|"]
    for name in sorted({r["model"] for r in res["networks"]}):
        by = {r["backend"]: r for r in res["networks"] if r["model"] == name}
        t, f, q = by.get("PyTorch eager (fp32)"), by.get("ONNX Runtime fp32"), by.get("ONNX Runtime INT8")
        fvt = f"{ratio(t['batch1_ms'], f['batch1_ms'])} / {ratio(t['batch32_ms_per_slice'], f['batch32_ms_per_slice'])}" if t else "n/a"
        qvf = f"{ratio(f['batch1_ms'], q['batch1_ms'])} / {ratio(f['batch32_ms_per_slice'], q['batch32_ms_per_slice'])}" if q else "n/a"
        lines.append(f"| {name} | {fvt} faster | {qvf} faster |")
    lines += [
        "",
        "## How close to the hardware (batch 32)",
        "",
        f"Peak: {peak['how']}. FLOPs: 2 x the multiply-adds of every convolution at the model's input size "
        "(ONNX shape inference; element-wise operations, pooling and resizing left out).",
        "",
        "| model | GFLOP / slice | backend | achieved | share of peak |",
        "|---|---|---|---|---|",
    ]
    for r in res["networks"]:
        achieved = r["gflop_per_slice"] / (r["batch32_ms_per_slice"] / 1000)
        top = peak["int8"] if "INT8" in r["backend"] else peak["fp32"]
        unit = "GOP/s" if "INT8" in r["backend"] else "GFLOP/s"
        lines.append(f"| {r['model']} | {r['gflop_per_slice']:.2f} | {r['backend']} | {achieved:.0f} {unit} | {100 * achieved / top:.1f}% of {top:.0f} |")
    lines += api_lines(res["api"])
    if NOTES.is_file():  # hand-written: the profiles' findings and the memory worst case (kept across runs)
        lines += ["", NOTES.read_text().strip(), ""]
    return "\n".join(lines)


NOTES = REPO / "docs" / "profiles" / "notes.md"
SPLIT_KEYS = ("decode", "inference", "network", "answer", "store", "http")


def split_cells(split: dict) -> str:
    return " | ".join(f"{split[k]:.0f}" if k in split else "-" for k in SPLIT_KEYS)


def api_lines(a: dict) -> list[str]:
    lines = [
        "",
        "## API (`uvicorn app:app --http brainseg.serving.protocol:H11WithHeaderTimeout`, as the README starts it; one worker, default settings)",
        "",
        f"- Launch to `/health` OK: **{a['start_to_health_s']:.2f} s**; launch to the first slice answered: **{a['start_to_first_answer_s']:.2f} s**",
        "",
        f"- Flip TTA is {'on' if a.get('tta_default') else 'off'} by default for the default model (what a request that does not say runs); "
        "every run below says which it ran (TTA: two forward passes per slice)",
        "",
        "| slices (LGG TIFF 256 x 256) | precision | return | TTA | clients | answered | throughput, slices / s | p50, ms | p99, ms | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in a["slices"]:
        lines.append(
            f"| | {s['precision']} | {s.get('answer', 'default')} | {'on' if s.get('tta') else 'off'} | {s['clients']} | {s['answered']} in {s['seconds']:.0f} s | {s['per_s']:.1f} "
            f"| {s['p50']:.0f} | {s['p99']:.0f} | {s['failed']} |"
        )
    lines += [
        "",
        "Where the milliseconds go (medians; server `timings_ms`, HTTP = the client's time less the server's total: upload, "
        "form parsing, JSON, transfer; inference = preprocessing + network + post-processing, a slice's network time is its batch's):",
        "",
        f"| request | end to end, ms | {' | '.join(SPLIT_KEYS)} |",
        f"|---|---|{'---|' * len(SPLIT_KEYS)}",
    ]
    if a.get("slice_split_ms"):
        sp = a["slice_split_ms"]
        lines.append(f"| one slice, default model, precision and TTA, one client | {sp.get('total', 0) + sp.get('http', 0):.0f} | {split_cells(sp)} |")
    for w in a["volumes"]:
        if w.get("split_ms"):
            lines.append(
                f"| BraTS volume, {w['precision']}, TTA {'on' if w.get('tta') else 'off'} | {1000 * w['median_s']:.0f} | {split_cells(w['split_ms'])} |"
            )
    lines += [
        "",
        "| volume (BraTS 3 x 240 x 240 x 155) | precision | TTA | end to end, s (median [min-max]) | server inference, ms | server decode, ms "
        "| background slices skipped | peak memory of one request above the RSS before it |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for w in a["volumes"]:
        peak_mem = f"{w['peak_above_before_mib']:.0f} MiB" if w["peak_above_before_mib"] is not None else "n/a"
        lines.append(
            f"| | {w['precision']} | {'on' if w.get('tta') else 'off'} | {w['median_s']:.2f} [{w['range_s'][0]:.2f}-{w['range_s'][1]:.2f}] "
            f"| {w['server_inference_ms']:.0f} | {w['server_decode_ms']:.0f} | "
            f"{w['slices_skipped']} | {peak_mem} |"
        )
    lines += [
        "",
        "| server memory (VmRSS) | MiB |",
        "|---|---|",
        f"| idle (after /health) | {a['rss_idle_mib']:.0f} |",
        f"| after the first answer (model loaded) | {a['rss_after_first_answer_mib']:.0f} |",
        f"| after 100 slices | {a['rss_after_100_slices_mib']:.0f} |",
        f"| after {a['volumes_sent']} volumes | {a['rss_after_20_volumes_mib']:.0f} |",
    ]
    return lines


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", type=Path, default=REPO / "models")
    ap.add_argument("--data", type=Path, default=LGG, help="LGG data: the benchmark slices and the INT8 calibration slices")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 repeats, few requests, small calibration")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    ap.add_argument("--skip-api", action="store_true", help="networks only")
    ap.add_argument("--note", default="", help="a sentence for the header (e.g. what else ran on the machine)")
    ap.add_argument("--before", type=Path, default=None, help="the .json of a run of the commit before (--src), for the targets' before column")
    ap.add_argument("--src", type=Path, default=REPO, help="serve the API from this checkout (e.g. a git archive of an older commit) instead")
    ap.add_argument("--render", type=Path, default=None, help="only write the Markdown of an earlier run's .json (with --note, if given)")
    a = ap.parse_args()
    if a.render:
        res = json.loads(a.render.read_text())
        res["note"] = a.note or res.get("note", "")
        if a.before:
            res["before"] = json.loads(a.before.read_text())
        write_bytes_atomic(a.out, markdown(res).encode())
        print(f"wrote {a.out}")
        return 0
    repeats = 2 if a.quick else a.repeats

    res = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "quick": a.quick,
        "repeats": repeats,
        "model_dir": str(a.model_dir),
        "note": a.note,
    }
    cpu = cpu_info()
    res["machine"] = {"cpu": cpu, "os": platform.platform(), "load_start": machine_load()}
    res["versions"] = versions()
    res["peak"] = peak_gflops(cpu)
    print(f"machine: {cpu['model']}, {cpu['cores']} cores; load {res['machine']['load_start']['loadavg']}", flush=True)

    # The networks as the server runs them: its allocator settings first (they change ONNX Runtime's speed: allocator.py).
    settings = Settings.from_env()
    res["allocator"] = {"arenas": settings.malloc_arenas, "keep_mib": settings.malloc_keep_mb}
    limit_arenas(settings.malloc_arenas)
    keep_freed(settings.malloc_keep_mb)
    reg = read(a.model_dir)
    ds = labelled(discover(a.data))
    images, _ = load_patient(ds.patient(BENCH_PATIENT) if BENCH_PATIENT in {p.id for p in ds.patients} else ds.patients[0])
    images = (images * (1 + 32 // len(images)))[:32]
    print("networks:", flush=True)
    res["networks"], int8_paths = bench_networks(reg, images, repeats, a.data, a.quick)
    if not a.skip_api:
        print("API:", flush=True)
        with tempfile.TemporaryDirectory(prefix="brainseg-bench-models-") as tmp:
            model_dir = bench_model_dir(reg, int8_paths, Path(tmp) / "models")
            precisions = ["fp32", "int8"] if len(int8_paths) == len(reg.models) else ["fp32"]
            res["api"] = bench_server(model_dir, inputs(False), max(3, repeats), a.quick, precisions, a.src.resolve())
            res["api"]["src"] = str(a.src.resolve())
    res["machine"]["load_end"] = machine_load()
    if a.before:
        res["before"] = json.loads(a.before.read_text())
    write_json_atomic(a.out.with_suffix(".json"), res)
    if not a.skip_api:
        write_bytes_atomic(a.out, markdown(res).encode())
        print(f"wrote {a.out} and {a.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
