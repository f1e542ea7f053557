"""FastAPI service: ``uvicorn app:app`` from the repository root, or ``brainseg serve``.

Routes (OpenAPI docs at ``/docs``):

- ``POST /v1/segment``: multipart field ``files`` = one slice (TIFF / PNG / JPEG, 8 or 16 bit,
  grey or 3-channel), one NIfTI volume, a BraTS set (``*-t1n``, ``*-t2f``, ``*-t1c``), or a DICOM
  MR series or study (a ``.zip``, or ``.dcm`` files; see ``brainseg.dicom``);
  form or query parameters ``model``, ``threshold``, ``tta``, ``sequence`` (what a grey slice or a
  single volume is: flair (default), t1, t1c, t2) and ``precision`` (fp32 (default) or int8, where
  the model has an INT8 file). The answer's ``input`` block says how the channels were read
  (``condition``: all / pre_missing / post_missing / flair_only, ``warnings``); its ``model``
  block names the model, version, backend and precision used.
- ``GET /v1/results/{id}``, ``.../mask.nii.gz``, ``.../seg.dcm`` (DICOM input), ``.../mask.png?z=``,
  ``.../slice/{z}.png`` (``view`` image / overlay / mask / probability, ``wc`` + ``ww`` window / level);
  ``DELETE /v1/results/{id}``. Results are kept by the result store (``store``) for
  ``BRAINSEG_RESULT_TTL_S``.
- ``GET /v1/models``, ``GET /health``.

``create_app`` only wires the pieces together, each in its own module: ``routes/`` (one router per
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
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI

from .. import __version__
from .answers import content_disposition
from .deps import Limiters
from .engine import Engine
from .errors import install_error_handlers
from .middleware import install_middleware
from .routes import results, segment, system
from .settings import Settings
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


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    app = FastAPI(
        title="brainseg",
        version=__version__,
        description="Lesion segmentation in brain MRI (Nested U-Net / Attention U-Net). Research software, not for diagnosis.",
        lifespan=lifespan,
        # Counted while the body is parsed: more parts, or a plain field over 64 KiB, is a 400 at once.
        form_limits={"max_fields": settings.max_form_fields, "max_files": settings.max_files, "max_part_size": MAX_FIELD_BYTES},
    )
    app.state.settings = settings
    app.state.engine = Engine(settings)
    app.state.store = ResultStore.from_settings(settings)
    app.state.limits = limits_of(settings)
    app.state.limiters = Limiters.of(settings)
    app.state.cancelled = 0  # segmentations stopped because their client disconnected (routes.segment)
    install_middleware(app, settings)
    install_error_handlers(app)
    for module in (system, segment, results):
        app.include_router(module.router)
    return app


app = create_app()
