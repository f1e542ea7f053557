"""Prometheus metrics of the service (``GET /metrics``), liveness and readiness probes, JSON log lines.

``Metrics`` holds one ``prometheus_client`` registry per app (several apps in one process, as in the
tests, keep their own counts). ``install_metrics`` adds the outermost ASGI middleware (it sees every
answer, the 500s of ``middleware.ServerErrors`` included) and times each network run through
``Engine.wrap_backend``. What is counted:

- ``brainseg_http_requests_total{route,method,status}`` and ``brainseg_http_request_seconds{route,method}``:
  ``route`` is the route's template (``/v1/results/{rid}``), ``unmatched`` for paths no route has,
  so client-chosen paths never become labels;
- ``brainseg_segment_requests_in_progress``: segment requests in the server (running, queued, or
  sending their body): the queue depth that load shedding caps (``BRAINSEG_MAX_CONCURRENT`` + ``BRAINSEG_MAX_QUEUE``);
- ``brainseg_shed_requests_total``: segment requests answered 503 with Retry-After (server busy);
- ``brainseg_network_seconds{model,precision}`` and ``brainseg_network_batch_size{model,precision}``: each
  run of a network (a micro-batch of slices, or up to 16 slices of a volume) and its rows;
- ``brainseg_results_stored`` and ``brainseg_result_store_bytes``: the result folder, read at each scrape;
  ``brainseg_models_loaded``, ``brainseg_memory_budget_held_bytes``.

Worker processes (``uvicorn --workers N``) count separately: scrape each, or run one worker per
container. Logs: ``JsonFormatter`` writes one JSON object a line (``brainseg serve --log-format json``,
or ``uvicorn --log-config deploy/logging-json.json``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

SEGMENT_PATH = "/v1/segment"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
NETWORK_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)

__all__ = ["CONTENT_TYPE_LATEST", "JsonFormatter", "Metrics", "install_metrics", "log_config"]


class _StateCollector:
    """Values read from the app's state at each scrape: the result store, loaded models, the memory budget."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        state = self.app.state
        store = getattr(state, "store", None)
        if store is not None:
            count, size = len(store), 0  # len() sweeps expired results first
            for f in store.dir.glob("*.npz"):
                with contextlib.suppress(OSError):  # removed by another worker meanwhile
                    size += f.stat().st_size
            yield GaugeMetricFamily("brainseg_results_stored", "results in the result folder", value=count)
            yield GaugeMetricFamily("brainseg_result_store_bytes", "bytes of the results in the result folder", value=size)
        engine = getattr(state, "engine", None)
        if engine is not None:
            yield GaugeMetricFamily("brainseg_models_loaded", "models loaded in this worker", value=len(engine.loaded()))
        memory = getattr(state, "memory", None)
        if memory is not None:
            yield GaugeMetricFamily("brainseg_memory_budget_held_bytes", "bytes of BRAINSEG_MEMORY_BUDGET_MB held by requests in progress", value=memory.used)


class Metrics:
    def __init__(self, app=None):
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("brainseg_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r)
        self.latency = Histogram("brainseg_http_request_seconds", "time to answer a request", ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_progress = Gauge("brainseg_segment_requests_in_progress", "segment requests in the server (running or queued)", registry=r)
        self.shed = Counter("brainseg_shed_requests", "segment requests refused with 503 because the server was busy", registry=r)
        self.network = Histogram("brainseg_network_seconds", "one run of a network", ["model", "precision"], buckets=NETWORK_BUCKETS, registry=r)
        self.batch = Histogram("brainseg_network_batch_size", "slices in one run of a network", ["model", "precision"], buckets=BATCH_BUCKETS, registry=r)
        if app is not None:
            r.register(_StateCollector(app))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def timed(self, backend, name: str, precision: str):
        return TimedBackend(backend, self.network.labels(name, precision), self.batch.labels(name, precision))


@dataclass
class TimedBackend:
    """A backend whose calls are timed into the network histograms; otherwise the wrapped one."""

    inner: object
    seconds: object
    rows: object

    def __call__(self, batch):
        t0 = time.perf_counter()
        try:
            return self.inner(batch)
        finally:
            self.seconds.observe(time.perf_counter() - t0)
            self.rows.observe(len(batch))

    def __getattr__(self, name):  # config, info, kind, precision of the wrapped backend
        return getattr(self.inner, name)


class MetricsMiddleware:
    """ASGI middleware, outermost: counts and times every HTTP answer by route template and status."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        m = self.metrics
        t0 = time.perf_counter()
        status = {"code": 500, "retry_after": False}
        segment = scope["method"] == "POST" and scope["path"] == SEGMENT_PATH

        async def watched_send(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
                status["retry_after"] = any(k.lower() == b"retry-after" for k, _ in msg.get("headers", []))
            await send(msg)

        if segment:
            m.in_progress.inc()
        try:
            await self.app(scope, receive, watched_send)
        finally:
            if segment:
                m.in_progress.dec()
                if status["code"] == 503 and status["retry_after"]:
                    m.shed.inc()
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            m.requests.labels(template, scope["method"], str(status["code"])).inc()
            m.latency.labels(template, scope["method"]).observe(time.perf_counter() - t0)


def install_metrics(app) -> Metrics:
    """``app.state.metrics``, the middleware (call after the other middleware: it must be outermost) and network timing."""
    metrics = Metrics(app)
    app.state.metrics = metrics
    engine = getattr(app.state, "engine", None)
    if engine is not None:
        engine.wrap_backend = metrics.timed
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return metrics


# ---------------------------------------------------------------- logs


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message (and the traceback, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def log_config(fmt: str = "text", level: str = "INFO") -> dict:
    """A ``logging.config.dictConfig`` for uvicorn (``log_config=``) and the service's loggers: ``text`` or ``json`` lines on stderr."""
    formatter = {"()": "brainseg.serving.metrics.JsonFormatter"} if fmt == "json" else {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}
    handler = {"class": "logging.StreamHandler", "formatter": "default", "stream": "ext://sys.stderr"}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": {
            "uvicorn": {"handlers": ["default"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": ["default"], "level": level, "propagate": False},
            "brainseg": {"handlers": ["default"], "level": level, "propagate": False},
        },
    }
