"""``/metrics`` (Prometheus text format) moves with requests; ``/health/live`` and ``/health/ready`` (ready only
once the default model is loaded, open without an API key); shed requests are counted; JSON log lines.

Models are the tiny ones of ``conftest.tiny_model_dir``.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from helpers import make_client, segment
from prometheus_client.parser import text_string_to_metric_families

from brainseg.io.synthetic import synthetic_png


def scrape(client) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of GET /metrics."""
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_after_a_segmentation(tiny_model_dir):
    client = make_client(tiny_model_dir)
    before = scrape(client)
    assert value(before, "brainseg_results_stored") == 0
    r = segment(client, ("s.png", synthetic_png(size=64)))
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    assert client.get(f"/v1/results/{rid}").status_code == 200
    assert client.get("/v1/results/0123456789abcdef0123456789abcdef").status_code == 404
    after = scrape(client)

    ok = {"route": "/v1/segment", "method": "POST", "status": "200"}
    assert value(after, "brainseg_http_requests_total", **ok) == value(before, "brainseg_http_requests_total", **ok) + 1
    assert value(after, "brainseg_http_request_seconds_count", route="/v1/segment", method="POST") == 1
    assert value(after, "brainseg_http_request_seconds_sum", route="/v1/segment", method="POST") > 0
    # the route's template, not the id: ids never become labels
    assert value(after, "brainseg_http_requests_total", route="/v1/results/{rid}", method="GET", status="200") == 1
    assert value(after, "brainseg_http_requests_total", route="/v1/results/{rid}", method="GET", status="404") == 1
    assert not any(rid in str(labels) for _, labels in after)
    model = {"model": "attention_unet", "precision": r.json()["model"]["precision"]}
    assert value(after, "brainseg_network_seconds_count", **model) >= 1
    assert value(after, "brainseg_network_batch_size_count", **model) >= 1
    assert value(after, "brainseg_network_batch_size_sum", **model) >= 1  # rows
    assert value(after, "brainseg_results_stored") == 1 and value(after, "brainseg_result_store_bytes") > 0
    assert value(after, "brainseg_models_loaded") == 1
    assert value(after, "brainseg_segment_requests_in_progress") == 0
    assert value(after, "brainseg_http_requests_total", route="unmatched", method="GET", status="404") == 0
    client.get("/no/such/path")
    assert value(scrape(client), "brainseg_http_requests_total", route="unmatched", method="GET", status="404") == 1


def test_ready_only_once_the_default_model_is_loaded(tiny_model_dir, tmp_path):
    client = make_client(tiny_model_dir, api_key="k" * 20)  # not started: the lifespan has not preloaded the model
    assert client.get("/health/live").json() == {"status": "alive"}
    r = client.get("/health/ready")
    assert r.status_code == 503 and r.json()["ready"] is False and r.json()["loaded_models"] == []
    assert client.get("/metrics").status_code == 401  # behind the key, like the API; the probes are not
    with client:  # the lifespan preloads the default model
        r = client.get("/health/ready")
        assert r.status_code == 200 and r.json() == {"ready": True, "default_model": "attention_unet", "loaded_models": ["attention_unet"]}
        assert client.get("/metrics", headers={"X-API-Key": "k" * 20}).status_code == 200
    broken = make_client(tmp_path / "no-models")
    r = broken.get("/health/ready")
    assert r.status_code == 503 and r.json()["problem"], r.json()
    assert broken.get("/health/live").status_code == 200


def test_shed_requests_and_queue_depth_are_counted():
    """The middleware alone, around an app that answers a segment request 503 + Retry-After (what load
    shedding sends) and another one 503 without it (no model): only the first is shed."""
    from brainseg.serving.metrics import Metrics, MetricsMiddleware

    metrics = Metrics()
    seen_in_progress = []

    async def app(scope, receive, send):
        seen_in_progress.append(metrics.in_progress._value.get())
        headers = [(b"retry-after", b"1")] if scope["headers"] else []
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    async def send(msg):
        pass

    async def receive():
        return {"type": "http.request", "body": b""}

    mw = MetricsMiddleware(app, metrics)
    for headers in ([(b"x", b"1")], [], [(b"x", b"1")]):
        asyncio.run(mw({"type": "http", "method": "POST", "path": "/v1/segment", "headers": headers}, receive, send))
    assert seen_in_progress == [1, 1, 1]
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for fam in text_string_to_metric_families(metrics.exposition().decode()) for s in fam.samples}
    assert value(samples, "brainseg_shed_requests_total") == 2
    assert value(samples, "brainseg_segment_requests_in_progress") == 0
    assert value(samples, "brainseg_http_requests_total", route="unmatched", method="POST", status="503") == 3


def test_json_log_lines():
    from brainseg.serving.metrics import JsonFormatter

    record = logging.LogRecord("brainseg.serving", logging.WARNING, __file__, 1, "shed a segment request: %d in progress", (16,), None)
    line = json.loads(JsonFormatter().format(record))
    assert line["level"] == "WARNING" and line["logger"] == "brainseg.serving" and line["message"] == "shed a segment request: 16 in progress"
    assert line["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord("brainseg", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    assert "ValueError: boom" in json.loads(JsonFormatter().format(record))["exception"]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_serve_log_config_is_valid(fmt):
    import logging.config

    from brainseg.serving.metrics import log_config

    names = ("uvicorn", "uvicorn.error", "uvicorn.access", "brainseg")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate) for n in names}
    try:
        logging.config.dictConfig(log_config(fmt))
        handler = logging.getLogger("brainseg").handlers[0]
        assert type(handler.formatter).__name__ == ("JsonFormatter" if fmt == "json" else "Formatter")
    finally:
        for n, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(n)
            logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def test_deploy_logging_json_is_the_json_config():
    from conftest import REPO

    from brainseg.serving.metrics import log_config

    assert json.loads((REPO / "deploy" / "logging-json.json").read_text()) == log_config("json")


def test_brainseg_serve_writes_json_lines(tiny_model_dir, tmp_path):
    import sys

    import httpx
    from conftest import free_port, server_env, start_process, stop

    port = free_port()
    log = tmp_path / "serve.log"
    env = server_env(tiny_model_dir, BRAINSEG_RESULT_DIR=str(tmp_path / "results"))
    cmd = [sys.executable, "-m", "brainseg.cli", "serve", "--port", str(port), "--log-format", "json"]
    proc = start_process(cmd, env, log, f"http://127.0.0.1:{port}/health/live")
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/health/ready", timeout=10).status_code == 200
    finally:
        stop(proc)
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    assert any(x["logger"] == "uvicorn.access" and "/health/ready" in x["message"] for x in lines), lines
    assert any(x["logger"].startswith("brainseg") for x in lines), lines  # the model preloaded: "loaded attention_unet ..."
