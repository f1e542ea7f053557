"""Clients that go away or hold connections open, against a real ``uvicorn app:app`` on real sockets.

- work for a disconnected client is cancelled: volumes that are queued are dropped, the running
  one stops within a batch of slices, and the server is idle again at once;
- request heads and bodies that trickle in are cut off after BRAINSEG_HEADER_TIMEOUT_S /
  BRAINSEG_BODY_TIMEOUT_S (408, connection closed) without blocking anyone else;
- the form limits (fields, files) hold on the wire.

Tiny ONNX models (``conftest.tiny_model_dir``); timeouts shortened to 2 s for the test.
"""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import start_api, stop
from helpers import nifti

from brainseg.io.synthetic import synthetic_png

HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
CANCELLED = re.compile(r"segmentation cancelled while (queued|running)")


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``(url, log path, pid)`` of a server that works on one volume at a time."""
    log = tmp_path_factory.mktemp("slow_clients") / "uvicorn.log"
    url, proc, log = start_api(
        tiny_model_dir,
        log,
        BRAINSEG_HEADER_TIMEOUT_S=str(HEADER_TIMEOUT_S),
        BRAINSEG_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S),
        BRAINSEG_MAX_CONCURRENT_VOLUMES="1",
    )
    try:
        yield url, log, proc.pid
    finally:
        stop(proc)


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def raw_post(url: str, files: list[tuple[str, bytes]], data: dict | None = None) -> tuple[bytes, bytes]:
    """The head and body of ``POST /v1/segment`` as bytes on the wire (multipart encoded by httpx)."""
    req = httpx.Request("POST", url + "/v1/segment", files=[("files", f) for f in files], data=data)
    body = req.read()
    head = "POST /v1/segment HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in req.headers.items()) + "\r\n"
    return head.encode(), body


def read_answer(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout`` passes)."""
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (TimeoutError, ConnectionResetError):
        pass
    return b"".join(chunks)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cancelled_lines(log: Path) -> list[str]:
    return CANCELLED.findall(log.read_text(errors="replace"))


def noise_volume(z: int = 192, size: int = 192, seed: int = 0) -> bytes:
    """A volume of bright noise: no slice is background, so every slice goes to the network."""
    rng = np.random.default_rng(seed)
    return nifti(rng.integers(1, 255, (size, size, z), dtype=np.uint8), gz=False)


# ---------------------------------------------------------------- disconnected clients


def test_work_for_disconnected_clients_is_cancelled(server):
    """Four volume requests (one running, three queued for the single volume slot) whose clients
    close their sockets: all four are cancelled (the log counts them), the server's CPU goes idle
    at once, and a slice sent right after is answered without waiting for the abandoned work."""
    url, log, pid = server
    volume = noise_volume()
    with httpx.Client(base_url=url, timeout=120) as http:
        t = time.monotonic()
        r = http.post("/v1/segment", files={"files": ("v.nii", volume)})
        full = time.monotonic() - t
    assert r.status_code == 200, r.text
    assert r.json()["background_slices_skipped"] == [], "every slice must reach the network"
    before = len(cancelled_lines(log))

    head, body = raw_post(url, [("v.nii", volume)])
    socks = []
    for _ in range(4):
        s = socket.create_connection(address(url))
        s.sendall(head + body)
        socks.append(s)
    time.sleep(min(1.0, full / 3))  # the first is in the network, the others wait for the volume slot
    for s in socks:
        s.close()
    t_abort = time.monotonic()

    with httpx.Client(base_url=url, timeout=120) as http:
        t = time.monotonic()
        r = http.post("/v1/segment", files={"files": ("s.png", synthetic_png(size=64))})
        slice_s = time.monotonic() - t
    assert r.status_code == 200, r.text

    deadline = time.monotonic() + full
    while len(cancelled_lines(log)) - before < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    stages = cancelled_lines(log)[before:]
    cancel_s = time.monotonic() - t_abort
    cpu0 = cpu_seconds(pid)
    time.sleep(1.0)
    idle_cpu = cpu_seconds(pid) - cpu0
    print(
        f"full volume {full:.2f} s; slice after the aborts {slice_s:.2f} s; 4 cancellations logged {cancel_s:.2f} s after the aborts: {stages}; CPU in the next second {idle_cpu:.2f} s"
    )
    # the running one stops between batches; a queued one that got the slot before its watcher
    # saw the disconnect (polled every 0.25 s) stops after decoding, before the network
    assert len(stages) == 4 and "running" in stages and stages.count("queued") >= 2, stages
    assert cancel_s < full / 2, f"the running volume was not stopped mid-way ({cancel_s:.2f} s after the aborts, a volume takes {full:.2f} s)"
    assert idle_cpu < 0.3, f"the server still works for gone clients: {idle_cpu:.2f} s CPU in 1 s"
    assert slice_s < full, (slice_s, full)
    assert re.search(r"\(\d+ cancelled since start\)", log.read_text())


# ---------------------------------------------------------------- slow heads and bodies


def test_slow_header_connections_are_closed_and_do_not_block_others(server):
    """50 connections trickle a request head (and 10 send nothing at all): a normal request is
    answered meanwhile, and every one of them is closed within the head timeout (+1 s)."""
    url, _, _ = server
    slow = [socket.create_connection(address(url)) for _ in range(60)]
    t0 = time.monotonic()
    for s in slow[:50]:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
    closed_at: dict[int, float] = {}
    answered = None
    while len(closed_at) < len(slow) and time.monotonic() - t0 < HEADER_TIMEOUT_S + 5:
        for i, s in enumerate(slow):
            if i in closed_at:
                continue
            try:
                if i < 50:
                    s.sendall(b"X-Slow: 1\r\n")  # never the blank line that ends a head
                s.settimeout(0.001)
                s.recv(4096)  # b"" (closed), or the 408 the server sends just before closing
                closed_at[i] = time.monotonic() - t0
            except (TimeoutError, BlockingIOError):
                pass
            except (ConnectionResetError, BrokenPipeError):
                closed_at[i] = time.monotonic() - t0
        if answered is None and time.monotonic() - t0 > 0.5:
            t = time.monotonic()
            r = httpx.get(url + "/health", timeout=5)
            answered = (r.status_code, time.monotonic() - t)
        time.sleep(0.1)
    for s in slow:
        s.close()
    print(f"normal request meanwhile: {answered}; slow connections closed after {min(closed_at.values()):.2f} to {max(closed_at.values()):.2f} s")
    assert answered is not None and answered[0] == 200 and answered[1] < 1.0, answered
    assert len(closed_at) == len(slow), f"{len(slow) - len(closed_at)} slow connections still open"
    assert min(closed_at.values()) > HEADER_TIMEOUT_S - 0.5 and max(closed_at.values()) < HEADER_TIMEOUT_S + 1.0, closed_at


def test_a_trickled_head_is_told_408(server):
    url, _, _ = server
    with socket.create_connection(address(url)) as s:
        s.sendall(b"POST /v1/segment HTTP/1.1\r\nHost: x\r\n")
        answer = read_answer(s, HEADER_TIMEOUT_S + 3)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:80]


def test_a_body_slower_than_the_timeout_gets_408_and_the_server_stays_up(server):
    """A segment request whose head is complete but whose body trickles in: 408 with a plain
    message after about BRAINSEG_BODY_TIMEOUT_S, the connection closed, the server still serving."""
    url, _, _ = server
    head, body = raw_post(url, [("s.png", synthetic_png(size=64))])
    with socket.create_connection(address(url)) as s:
        s.sendall(head + body[:100])
        t0 = time.monotonic()
        s.settimeout(0.2)
        answer, sent = b"", 100
        while time.monotonic() - t0 < BODY_TIMEOUT_S + 5 and not answer:
            try:
                s.sendall(body[sent : sent + 10])  # 50 bytes a second
                sent += 10
                answer = s.recv(65536)
            except TimeoutError:
                pass
            except (ConnectionResetError, BrokenPipeError):
                break
        took = time.monotonic() - t0
        answer += read_answer(s, 3)
    print(f"408 after {took:.2f} s ({sent} of {len(body)} body bytes sent)")
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"connection: close" in answer.lower()
    assert b"did not arrive in time" in answer and b"Traceback" not in answer
    assert BODY_TIMEOUT_S - 0.5 < took < BODY_TIMEOUT_S + 2, took
    r = httpx.post(url + "/v1/segment", files={"files": ("s.png", synthetic_png(size=64))}, timeout=60)
    assert r.status_code == 200, r.text


def test_a_body_that_never_comes_gets_408(server):
    url, _, _ = server
    head, body = raw_post(url, [("s.png", synthetic_png(size=64))])
    with socket.create_connection(address(url)) as s:
        s.sendall(head)
        t0 = time.monotonic()
        answer = read_answer(s, BODY_TIMEOUT_S + 5)
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 ") and took < BODY_TIMEOUT_S + 2, (answer[:80], took)


# ---------------------------------------------------------------- form limits


def test_form_limits_on_the_wire(server):
    """More file parts than BRAINSEG_MAX_FILES (8) or plain fields than BRAINSEG_MAX_FORM_FIELDS
    (16): a short 400 in our words, before any file is looked at."""
    url, _, _ = server
    png = synthetic_png(size=32)
    with httpx.Client(base_url=url, timeout=30) as http:
        r = http.post("/v1/segment", files=[("files", (f"{i}.png", png)) for i in range(9)])
        assert r.status_code == 400 and "too many form fields or files" in r.json()["detail"], r.text
        r = http.post("/v1/segment", files=[("files", ("a.png", png))], data={f"f{i}": "1" for i in range(17)})
        assert r.status_code == 400 and "too many form fields or files" in r.json()["detail"], r.text
        r = http.post("/v1/segment", files=[("files", ("a.png", png))], data={"model": "x" * (70 << 10)})
        assert r.status_code == 400 and "too large" in r.json()["detail"] and "xxxx" not in r.text, r.text
        assert http.get("/health").status_code == 200
