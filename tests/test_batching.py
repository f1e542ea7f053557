"""Micro-batching: concurrent slice requests share network runs and get the masks they get alone."""

from __future__ import annotations

import base64
import threading
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import pytest
from conftest import start_api, stop
from helpers import make_client, segment

from brainseg.io.synthetic import synthetic_png
from brainseg.serving.batching import MicroBatcher

SEEDS = range(8)
PARAMS = [{}, {"model": "unetpp"}, {"tta": "true"}, {"model": "ensemble"}]  # four batch keys (and an ensemble's two)


def answer_of(r) -> tuple:
    assert r.status_code == 200, r.text
    body = r.json()
    mask = cv2.imdecode(np.frombuffer(base64.b64decode(body["mask_png"]), np.uint8), cv2.IMREAD_UNCHANGED)
    return body["model"]["name"], body["tta"], body["lesion_area_px"], mask.tobytes()


def run_all(post, jobs: list[tuple[int, dict]], threads: int) -> list[tuple]:
    def one(job):
        seed, params = job
        return answer_of(post(synthetic_png(seed=seed), params))

    if threads == 1:
        return [one(j) for j in jobs]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(one, jobs))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    url, proc, _ = start_api(tiny_model_dir, tmp_path_factory.mktemp("batching") / "uvicorn.log", BRAINSEG_MAX_CONCURRENT="8", BRAINSEG_BATCH_WAIT_MS="20")
    try:
        yield url
    finally:
        stop(proc)


def test_concurrent_requests_over_http_get_the_masks_of_sequential_ones(server):
    import httpx

    jobs = [(seed, params) for params in PARAMS for seed in SEEDS]
    with httpx.Client(base_url=server, timeout=120) as client:

        def post(data, params):
            return client.post("/v1/segment", files=[("files", ("s.png", data))], data=params)

        alone = run_all(post, jobs, threads=1)
        together = run_all(post, jobs, threads=8)
        counts = client.get("/health").json()["slice_batches"]
    assert together == alone
    assert counts["rows"] >= len(jobs) and 0 < counts["runs"] <= counts["rows"], counts
    assert any(a[2] > 0 for a in alone), "the tiny models find the blobs: the comparison is not of empty masks"
    assert len({a[3] for a in alone}) > 1, "different slices give different masks"


def test_requests_share_network_runs_in_process(tiny_model_dir):
    with make_client(tiny_model_dir, max_concurrent=8, batch_wait_ms=50) as c:
        batcher = c.app.state.engine.batcher

        def post(data, params):
            return segment(c, ("s.png", data), **params)

        jobs = [(seed, {}) for seed in SEEDS] * 2
        alone = run_all(post, jobs, threads=1)
        runs_alone = batcher.batches
        assert runs_alone == len(jobs) and batcher.rows == len(jobs), "a lone client never waits for a batch"
        together = run_all(post, jobs, threads=8)
        assert c.get("/health").json()["slice_batches"] == {"runs": batcher.batches, "rows": batcher.rows}
    assert together == alone
    assert batcher.batches - runs_alone < len(jobs), "concurrent slices were batched together"


def test_no_batching_when_batch_size_is_1(tiny_model_dir):
    with make_client(tiny_model_dir, batch_size=1) as c:
        assert c.app.state.engine.batcher is None
        assert segment(c, ("s.png", synthetic_png())).status_code == 200


# ---------------------------------------------------------------- the batcher alone


def test_batcher_keeps_keys_apart_and_rows_in_order():
    calls = []

    def backend(tag):
        def run(x):
            calls.append((tag, len(x)))
            return x[:, 0] * 10 + (1 if tag == "a" else 2)

        return run

    batcher = MicroBatcher(max_rows=4, wait_s=0.2)
    runs = {"a": backend("a"), "b": backend("b")}
    results = {}
    start = threading.Barrier(6)

    def client(i):
        key = "a" if i % 2 else "b"
        with batcher.expecting():
            start.wait()
            x = np.full((1, 3, 2, 2), float(i), np.float32)
            results[i] = (key, batcher.submit((key,), runs[key], x))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    batcher.close()
    for i, (key, out) in results.items():
        assert out.shape == (1, 2, 2) and np.all(out == i * 10 + (1 if key == "a" else 2))
    assert sorted(calls) == [("a", 3), ("b", 3)], calls  # one run per key, no key mixed with another


def test_a_lone_submitter_runs_its_input_itself_and_batches_never_overlap():
    """Nothing queued, running or announced: the submitter's own thread runs it (no hand-off to the dispatcher).
    With company, inputs go to the dispatcher; inline or not, one batch runs at a time."""
    running, most, threads_seen, lock = [0], [0], [], threading.Lock()

    def run(x):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            threads_seen.append(threading.current_thread().name)
        threading.Event().wait(0.02)
        with lock:
            running[0] -= 1
        return x[:, 0] + 1

    batcher = MicroBatcher(max_rows=4, wait_s=0.005)
    with batcher.expecting():
        out = batcher.submit(("k",), run, np.zeros((1, 3, 2, 2), np.float32))
    assert out[0, 0, 0] == 1 and threads_seen == [threading.current_thread().name] and batcher.inline == 1

    def client(i):
        x = np.full((1, 3, 2, 2), float(i), np.float32)
        with batcher.expecting():
            return batcher.submit(("k",), run, x)  # no barrier: some run alone, some are batched

    with ThreadPoolExecutor(6) as pool:
        outs = list(pool.map(client, range(24)))
    batcher.close()
    assert all(o.shape == (1, 2, 2) and np.all(o == i + 1) for i, o in enumerate(outs))
    assert most[0] == 1, "two batches ran at once"
    assert "brainseg-batcher" in threads_seen, "concurrent inputs were handed to the dispatcher"
    assert batcher.rows == 25 and batcher.batches < 25


def test_batcher_splits_at_max_rows_and_passes_errors_to_every_waiter():
    batcher = MicroBatcher(max_rows=2, wait_s=0.0)
    out = batcher.submit(("k",), lambda x: x[:, 0], np.zeros((3, 3, 2, 2), np.float32))  # one request above max_rows still runs
    assert out.shape == (3, 2, 2)

    def broken(x):
        raise RuntimeError("backend fault")

    with pytest.raises(RuntimeError, match="backend fault"):
        batcher.submit(("k",), broken, np.zeros((1, 3, 2, 2), np.float32))
    assert batcher.submit(("k",), lambda x: x[:, 0] + 1, np.zeros((1, 3, 2, 2), np.float32))[0, 0, 0] == 1  # still serving
    batcher.close()


def test_volumes_wait_for_a_volume_slot_while_slices_go_on(tiny_model_dir):
    """BRAINSEG_MAX_CONCURRENT_VOLUMES=1: two volumes run one after the other; a slice sent meanwhile is not held up."""
    import time

    from helpers import nifti

    with make_client(tiny_model_dir, max_concurrent=4, max_concurrent_volumes=1) as c:
        engine, lock, state = c.app.state.engine, threading.Lock(), {"now": 0, "peak": 0}
        run = engine.run_volume

        def slow(*a, **k):
            with lock:
                state["now"] += 1
                state["peak"] = max(state["peak"], state["now"])
            time.sleep(1.0)
            with lock:
                state["now"] -= 1
            return run(*a, **k)

        engine.run_volume = slow
        vol = nifti(np.random.default_rng(0).random((32, 32, 4)).astype(np.float32))
        done = {}

        def volume(i):
            done[i] = segment(c, (f"v{i}.nii.gz", vol)).status_code

        threads = [threading.Thread(target=volume, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        time.sleep(0.3)
        t0 = time.monotonic()
        assert segment(c, ("s.png", synthetic_png())).status_code == 200
        slice_s = time.monotonic() - t0
        for t in threads:
            t.join(30)
    assert done == {0: 200, 1: 200} and state["peak"] == 1
    assert slice_s < 1.0, f"the slice waited {slice_s:.2f} s behind the volumes"
