"""FastAPI service: ``uvicorn app:app`` from the repository root, or ``brainseg serve``.

Routes (OpenAPI docs at ``/docs``):

- ``POST /v1/segment``: multipart field ``files`` = one slice (TIFF / PNG / JPEG, 8 or 16 bit,
  grey or 3-channel), one NIfTI volume, a BraTS set (``*-t1n``, ``*-t2f``, ``*-t1c``), or a DICOM
  MR series or study (a ``.zip``, or ``.dcm`` files; see ``brainseg.io.dicom``);
  form or query parameters ``model``, ``threshold``, ``tta``, ``sequence`` (what a grey slice or a
  single volume is: flair (default), t1, t1c, t2), ``precision`` (fp32 (default) or int8, where
  the model has an INT8 file) and ``pixel_spacing_mm`` (a slice's pixel size: lesion diameters in mm).
  Each lesion carries its RANO-BM measurements (``measure``), the answer ``rano_bm``. The answer's ``input`` block says how the channels were read
  (``condition``: all / pre_missing / post_missing / flair_only, ``warnings``); its ``model``
  block names the model, version, backend and precision used.
- ``GET /v1/results/{id}``, ``.../mask.nii.gz``, ``.../seg.dcm`` (DICOM input), ``.../mask.png?z=``,
  ``.../slice/{z}.png`` (``view`` image / overlay / mask / probability, ``wc`` + ``ww`` window / level);
  ``DELETE /v1/results/{id}``. Results are kept by the result store (``store``) for
  ``BRAINSEG_RESULT_TTL_S``.
- ``GET /v1/models``, ``GET /health``; ``GET /health/live``, ``GET /health/ready`` (probes) and ``GET /metrics``
  (Prometheus; ``metrics``).

``create_app`` only wires the pieces together (and refuses to build a service it cannot run safely:
``settings.StartupError``, then ``app`` exits with a plain message), each in its own module: ``routes/`` (one router per
concern; shared objects reach them as dependencies, ``deps``), ``parsing`` (request parameters
and files), ``answers`` (the JSON answers), ``render`` (PNG), ``middleware`` (API key, rate limit,
load shedding, upload limit, body timeout, server faults), ``errors`` (error bodies, documented
status codes, handlers), ``engine`` (the models), ``cancel`` (stopping the work of a client that has
gone), ``protocol`` (uvicorn's HTTP protocol with a request-head timeout). Every problem with a
user's input is a 4xx with a plain message; a server fault is a 500 with an error id. No torch
import when the models are ONNX.
"""

from __future__ import annotations

import logging
import sys
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from .. import __version__
from .answers import content_disposition
from .deps import Limiters, MemoryBudget
from .docs import install_docs
from .engine import Engine
from .errors import install_error_handlers
from .metrics import install_metrics
from .middleware import OPEN_PATHS, install_middleware, key_owner
from .routes import compare, probes, reports, results, segment, system
from .settings import Settings, StartupError
from .store import ResultStore
from .uploads import Limits

log = logging.getLogger("brainseg.serving")

__all__ = ["app", "content_disposition", "create_app"]

MAX_FIELD_BYTES = 64 << 10  # one plain (non-file) form field


def limits_of(settings: Settings) -> Limits:
    return Limits(max_pixels=settings.max_pixels, max_voxels=settings.max_voxels, max_decoded_bytes=settings.max_decoded_bytes)


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Loads the default model at start-up (``BRAINSEG_PRELOAD``); the service starts without one."""
    if app.state.settings.preload:
        try:
            await anyio.to_thread.run_sync(app.state.engine.get)
        except Exception as exc:  # /health says what is missing
            log.warning("no model preloaded: %s", exc)
    yield


def key_owners(settings: Settings, store: ResultStore) -> dict[str, str]:
    """Each API key and the owner its results are kept under; {} without keys (``StartupError`` for unusable ones)."""
    keys = settings.load_api_keys()
    if not keys:
        return {}
    secret = settings.owner_secret.encode() if settings.owner_secret else store.owner_secret()
    return {k: key_owner(k, secret) for k in keys}


SECURITY_SCHEMES = {
    "APIKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "a key of BRAINSEG_API_KEY / BRAINSEG_API_KEY_FILE"},
    "HTTPBearer": {"type": "http", "scheme": "bearer", "description": "the same key as Authorization: Bearer KEY"},
}


def declare_security(app: FastAPI) -> None:
    """The OpenAPI spec names the two ways to send a key on every route that needs one (all but
    ``middleware.OPEN_PATHS``), so /docs has an Authorize button that sends it. Only with keys set."""
    make = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = make()
            spec.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            for path, operations in spec.get("paths", {}).items():
                if path not in OPEN_PATHS:
                    for op in operations.values():
                        op["security"] = [{name: []} for name in SECURITY_SCHEMES]  # either one
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings | None = None) -> FastAPI:
    """The service; ``StartupError`` (a ``ValueError``) for settings it cannot run with safely."""
    settings = settings or Settings.from_env()
    app = FastAPI(
        title="brainseg",
        version=__version__,
        description="Lesion segmentation in brain MRI (Nested U-Net / Attention U-Net). Research software, not for diagnosis.",
        lifespan=lifespan,
        docs_url=None,  # served by install_docs with the app's own copies of the Swagger UI / ReDoc assets (no CDN)
        redoc_url=None,
        # Counted while the body is parsed: more parts, or a plain field over 64 KiB, is a 400 at once.
        form_limits={"max_fields": settings.max_form_fields, "max_files": settings.max_files, "max_part_size": MAX_FIELD_BYTES},
    )
    store = ResultStore.from_settings(settings)
    owners = key_owners(settings, store)
    app.state.settings = settings
    app.state.engine = Engine(settings)
    app.state.store = store
    app.state.limits = limits_of(settings)
    app.state.limiters = Limiters.of(settings)
    app.state.memory = MemoryBudget(settings.memory_budget_bytes)
    app.state.cancelled = 0  # segmentations stopped because their client disconnected (routes.segment)
    install_middleware(app, settings, owners)
    install_metrics(app)  # after the others: its middleware is outermost and sees every answer
    install_error_handlers(app)
    for module in (system, probes, segment, results, reports, compare):
        app.include_router(module.router)
    install_docs(app, app.title)
    if owners:
        declare_security(app)
    return app


STARTUP_FAILURE = 3  # uvicorn's exit status for an app that cannot start: its --workers supervisor then stops instead of restarting


def app_or_exit() -> FastAPI:
    """``create_app()``, or a plain message on stderr and exit status 3: a service that cannot run
    safely (an unusable API key setting, a result folder others can read, ...) does not serve."""
    try:
        return create_app()
    except StartupError as exc:
        print(f"brainseg: cannot start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(STARTUP_FAILURE) from None


app = app_or_exit()
