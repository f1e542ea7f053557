"""FastAPI service: ``uvicorn app:app`` from the repository root, or ``brainseg serve``.

Routes (OpenAPI docs at ``/docs``):

- ``POST /v1/segment``: multipart field ``files`` = one slice (TIFF / PNG / JPEG, 8 or 16 bit,
  grey or 3-channel), one NIfTI volume, or a BraTS set (``*-t1n``, ``*-t2f``, ``*-t1c``);
  form or query parameters ``model``, ``threshold``, ``tta``, ``sequence`` (what a grey slice or a
  single volume is: flair (default), t1, t1c, t2). The answer's ``input`` block says how the
  channels were read (``condition``: all / pre_missing / post_missing / flair_only, ``warnings``).
- ``GET /v1/results/{id}``, ``.../mask.nii.gz``, ``.../mask.png?z=``, ``.../slice/{z}.png``;
  ``DELETE /v1/results/{id}``. Results live in memory only, for ``BRAINSEG_RESULT_TTL_S``.
- ``GET /v1/models``, ``GET /health``.

Every problem with a user's input answers 4xx with ``{"detail": "<one line>"}`` in our own words
(never a library's exception text, the values sent or a server path); a server fault answers 500
with ``{"detail", "error_id"}`` and is logged once with its traceback. Sizes are checked from the
file headers before anything is decoded (``uploads``). The model runs in a worker thread (at most
``BRAINSEG_MAX_CONCURRENT`` at once, ``BRAINSEG_MAX_QUEUE`` more waiting, beyond that 503 with
Retry-After) so the event loop keeps serving. ``BRAINSEG_API_KEY`` guards every route but
``/health`` and the docs. No torch import when the models are ONNX.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Literal
from urllib.parse import quote

import anyio
import numpy as np
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..channels import describe_slice, describe_volume, parse_sequence
from ..config import CHANNELS
from ..data import DataError
from ..inference import Ensemble
from ..preprocessing import to_uint8
from ..visualize import display_channel, overlay, png_bytes
from ..volumes import load_volume
from .engine import DISPLAY_NAMES, Engine, ModelUnavailable, display_volume
from .settings import Settings
from .store import ResultStore, StoredResult
from .uploads import Limits, Upload, UploadError, classify, clean_name, decode_slice_channels, read_volume_payloads

log = logging.getLogger("brainseg.serving")

MAX_LESIONS_LISTED = 1000  # the count is always exact; the list is cut for garbage masks
MULTIPART_SLACK = 1 << 20  # boundaries and form fields around the files
MAX_FIELD_BYTES = 64 << 10  # one plain (non-file) form field


# ---------------------------------------------------------------- helpers


def b64png(img: np.ndarray) -> str:
    return base64.b64encode(png_bytes(img)).decode("ascii")


def render(display: np.ndarray, mask: np.ndarray, view: str = "overlay", channel: int = 1, alpha: float = 0.4) -> np.ndarray:
    """One display slice (H, W, 3) uint8 as ``image``, ``overlay`` or ``mask`` (RGB / grey uint8).

    ``channel`` 0 / 1 / 2 shows pre-contrast / FLAIR / post-contrast in grey; -1 shows the three as RGB.
    """
    if view == "mask":
        return mask.astype(np.uint8) * 255
    base = display if channel < 0 else display_channel(display, channel)
    if view == "image":
        return np.ascontiguousarray(base)
    return overlay(base, mask, alpha=alpha)


def parse_threshold(raw: str | None) -> float | None:
    """The threshold parameter; messages never repeat what was sent."""
    if raw is None or str(raw).strip() == "":
        return None
    try:
        t = float(raw)
    except (ValueError, OverflowError):
        raise UploadError(422, "threshold must be a number between 0 and 1 (exclusive)") from None
    if not (0.0 < t < 1.0) or math.isnan(t):
        raise UploadError(422, "threshold must be between 0 and 1 (exclusive)")
    return t


def parse_bool(name: str, raw: str | None) -> bool:
    if raw is None:
        return False
    v = str(raw).strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("", "0", "false", "no", "off"):
        return False
    raise UploadError(422, f"{name} must be true or false")


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` (anything else, and ``"`` ``\\`` ``;`` ``%``, as ``_``)
    and the exact name as RFC 5987 ``filename*=UTF-8''...``: no header injection, any script."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;%' else "_" for c in filename) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


SEGMENT_FIELDS = ("files", "model", "threshold", "tta", "sequence")
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client of a segment request disconnected before its work began."""


def model_block(engine: Engine, model) -> dict:
    block = {
        "name": model.name,
        "display_name": DISPLAY_NAMES.get(model.name, model.name),
        "version": engine.version(model),
        "backend": engine.backend_kind(model),
    }
    if isinstance(model, Ensemble):
        block["members"] = [m.name for m in model.members]
    return block


class ErrorBody(BaseModel):
    """Every 4xx and 503 answer."""

    detail: str = Field(description="one plain line saying what is wrong and what to send instead")


class ServerErrorBody(BaseModel):
    """A 500: the server's fault, logged with its traceback under ``error_id``."""

    detail: str = Field(description="always 'internal error; ...'")
    error_id: str = Field(description="12 hex digits; quote it to the operator")


def _err(text: str, body=ErrorBody, headers: dict | None = None) -> dict:
    entry = {"model": body, "description": text}
    if headers:
        entry["headers"] = headers
    return entry


_COMMON = {
    401: _err("BRAINSEG_API_KEY is set and the request has no key or a wrong one (X-API-Key or Authorization: Bearer)"),
    500: _err("server fault: an error id, nothing else (the traceback is in the server log)", ServerErrorBody),
}
_RESULT = {
    **_COMMON,
    404: _err("no such result (never existed, evicted, or made with another API key), or slice out of range"),
    422: _err("a query or path parameter is not valid (the message names it)"),
}
RESPONSES = {
    "health": {500: _COMMON[500]},
    "models": {**_COMMON, 503: _err("no model registry, or a model file cannot be loaded")},
    "segment": {
        **_COMMON,
        400: _err("empty file, too many form fields / files, a plain field over 64 KiB, or a body that is not multipart/form-data"),
        413: _err("over a limit: upload bytes, pixels, voxels or decoded bytes (the message names the BRAINSEG_* setting)"),
        429: _err(
            "over BRAINSEG_RATE_PER_MIN segmentations in the last minute from this client",
            headers={"Retry-After": {"description": "seconds until the next request is accepted", "schema": {"type": "integer"}}},
        ),
        415: _err("not multipart/form-data, or a file type that is not a slice (TIFF / PNG / JPEG) or NIfTI"),
        422: _err("a file that cannot be read or used (corrupt, wrong shape, type or header), or a bad parameter"),
        499: _err("the client closed the connection before its segmentation ran; nothing was done"),
        503: _err(
            "too many segmentations in progress (BRAINSEG_MAX_QUEUE), or no model available",
            headers={"Retry-After": {"description": "seconds to wait before retrying (when busy)", "schema": {"type": "integer"}}},
        ),
    },
    "result": _RESULT,
    "nifti": {**_RESULT, 200: {"content": {"application/gzip": {}}, "description": "the mask as .nii.gz"}},
    "png": {**_RESULT, 200: {"content": {"image/png": {}}, "description": "a PNG"}},
}


def error(status: int, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


class ServerErrors:
    """ASGI middleware, outermost: an exception nothing else handled is a server fault.

    It is logged once, with its traceback and a short id, and the client gets a 500 with
    ``{"detail": "internal error", "error_id": ID}``: nothing of the exception itself.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracked_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, receive, tracked_send)
        except Exception:
            eid = uuid.uuid4().hex[:12]
            log.exception("internal error %s on %s %s", eid, scope.get("method"), scope.get("path"))
            if not started:
                await error(500, "internal error; quote the error id to the operator", error_id=eid)(scope, receive, send)


_VALIDATION_WORDS = {
    "missing": "is required",
    "int_parsing": "must be an integer",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be true or false",
    "string_type": "must be text",
    "list_type": "must be a list",
}


def validation_message(errors: list[dict]) -> str:
    """``field: what is wrong`` for each error, from the schema only: never the values sent."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header", "form") and not isinstance(x, int))
        kind, ctx = str(e.get("type", "")), e.get("ctx") or {}
        if kind in _VALIDATION_WORDS:
            what = _VALIDATION_WORDS[kind]
        elif kind in ("greater_than_equal", "greater_than") and ("ge" in ctx or "gt" in ctx):
            what = f"must be at least {ctx.get('ge', ctx.get('gt'))}" if "ge" in ctx else f"must be above {ctx['gt']}"
        elif kind in ("less_than_equal", "less_than") and ("le" in ctx or "lt" in ctx):
            what = f"must be at most {ctx.get('le', ctx.get('lt'))}" if "le" in ctx else f"must be below {ctx['lt']}"
        elif kind == "literal_error" and "expected" in ctx:
            what = f"must be one of {ctx['expected']}"
        elif "file" in kind or "upload" in kind:
            what = "must be a file (multipart/form-data with a file name)"
        else:
            what = "is not valid"
        part = f"{loc[:40]} {what}" if loc else f"request {what}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) or "invalid request"


class UploadLimit:
    """ASGI middleware: answers 413 to a POST whose body is larger than ``max_bytes``.

    Checks Content-Length first; a body sent without it (chunked) is counted as it arrives
    and the request is cut off once over the limit.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        limit = self.max_bytes + MULTIPART_SLACK
        message = f"upload is larger than the limit of {self.max_bytes / 2**20:.0f} MiB (BRAINSEG_MAX_UPLOAD_MB)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _drain(receive, limit)
            return await error(413, message)(scope, receive, send)
        state = {"seen": 0, "over": False, "sent": False}

        async def counted_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                if state["seen"] > limit:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if state["over"]:
                if not state["sent"]:
                    state["sent"] = True
                    await error(413, message)(scope, receive, send)
                return
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
            await guarded_send({})


OPEN_PATHS = frozenset({"/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def key_owner(key: str) -> str:
    """What a result remembers of the key that made it: a hash, never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class ApiKey:
    """ASGI middleware: with keys configured, every route but OPEN_PATHS needs one of them
    (``X-API-Key: KEY`` or ``Authorization: Bearer KEY``); otherwise 401. The matching key's
    hash goes into ``request.state.owner`` so results stay with the key that made them."""

    def __init__(self, app, keys: list[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _match(self, headers: dict) -> str | None:
        given = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if given is None and auth[:7].lower() == b"bearer ":
            given = auth[7:].strip()
        if given is None:
            return None
        found = None
        for k in self.keys:  # compare with every key, in constant time each
            if hmac.compare_digest(given, k):
                found = k
        return key_owner(found.decode()) if found is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.keys or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        owner = self._match(dict(scope["headers"]))
        if owner is None:
            await _drain(receive, 1 << 20)
            msg = "missing or wrong API key: send it in the X-API-Key header (or Authorization: Bearer)"
            return await error(401, msg, headers={"WWW-Authenticate": 'Bearer realm="brainseg"'})(scope, receive, send)
        scope.setdefault("state", {})["owner"] = owner
        await self.app(scope, receive, send)


class Shed:
    """ASGI middleware: at most ``capacity`` segment requests in the server at once (running,
    waiting for a worker, or still sending their body); the next gets 503 with Retry-After at
    once, before its body is read. One event loop: a plain counter is enough."""

    def __init__(self, app, capacity: int, retry_after_s: int):
        self.app = app
        self.capacity = capacity
        self.retry_after = str(int(retry_after_s))
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] != "/v1/segment":
            return await self.app(scope, receive, send)
        if self.active >= self.capacity:
            log.warning("shed a segment request: %d in progress", self.active)
            await _drain(receive, 1 << 20)
            msg = "the server is busy: too many segmentations queued; retry after the time in the Retry-After header"
            return await error(503, msg, headers={"Retry-After": self.retry_after})(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class RateLimit:
    """ASGI middleware: at most ``per_min`` segment requests per client in any 60 s (a sliding
    window); the client is its API key (hash) when keys are set, else its IP address."""

    WINDOW_S = 60.0

    def __init__(self, app, per_min: int):
        self.app = app
        self.per_min = per_min
        self.seen: dict[str, list[float]] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.per_min or scope["method"] != "POST" or scope["path"] != "/v1/segment":
            return await self.app(scope, receive, send)
        who = scope.get("state", {}).get("owner") or (scope.get("client") or ("?",))[0]
        now = time.monotonic()
        if len(self.seen) > 10_000:  # forget clients idle for a window
            self.seen = {k: v for k, v in self.seen.items() if v and v[-1] > now - self.WINDOW_S}
        times = [t for t in self.seen.get(who, []) if t > now - self.WINDOW_S]
        if len(times) >= self.per_min:
            self.seen[who] = times
            wait = max(1, int(times[0] + self.WINDOW_S - now + 1))
            await _drain(receive, 1 << 20)
            msg = f"rate limit: at most {self.per_min} segmentations per minute per client (BRAINSEG_RATE_PER_MIN); retry after the time in Retry-After"
            return await error(429, msg, headers={"Retry-After": str(wait)})(scope, receive, send)
        self.seen[who] = times + [now]
        await self.app(scope, receive, send)


async def _drain(receive, limit: int) -> None:
    """Read (and drop) a little of an oversized body so clients see the 413, not a reset."""
    seen = 0
    while seen < min(limit, 1 << 20):
        msg = await receive()
        if msg["type"] != "http.request":
            return
        seen += len(msg.get("body", b""))
        if not msg.get("more_body"):
            return


# ---------------------------------------------------------------- the app


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    engine = Engine(settings)
    store = ResultStore.from_settings(settings)
    limits = Limits(max_pixels=settings.max_pixels, max_voxels=settings.max_voxels, max_decoded_bytes=settings.max_decoded_bytes)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.limiter = anyio.CapacityLimiter(settings.max_concurrent)
        if settings.preload:
            try:
                await anyio.to_thread.run_sync(engine.get)
            except Exception as exc:  # the service still starts; /health says what is missing
                log.warning("no model preloaded: %s", exc)
        yield

    app = FastAPI(
        title="brainseg",
        version=__version__,
        description="Lesion segmentation in brain MRI (Nested U-Net / Attention U-Net). Research software, not for diagnosis.",
        lifespan=lifespan,
        # Counted while the body is parsed: more parts, or a plain field over 64 KiB, is a 400 at once.
        form_limits={"max_fields": settings.max_form_fields, "max_files": settings.max_files, "max_part_size": MAX_FIELD_BYTES},
    )
    app.state.engine = engine
    app.state.store = store
    app.state.settings = settings
    # Added innermost first: ServerErrors -> CORS -> ApiKey -> RateLimit -> Shed -> UploadLimit -> routes.
    app.add_middleware(UploadLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(Shed, capacity=settings.max_concurrent + settings.max_queue, retry_after_s=settings.retry_after_s)
    app.add_middleware(RateLimit, per_min=settings.rate_per_min)
    app.add_middleware(ApiKey, keys=settings.api_keys)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST", "DELETE"], allow_headers=["*"])
    app.add_middleware(ServerErrors)  # outermost: added last

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        if request.url.path == "/v1/segment" and request.method == "POST":
            ctype = request.headers.get("content-type", "")
            if not ctype.startswith("multipart/form-data"):
                return error(415, "send the file(s) as multipart/form-data in the field 'files'")
        return error(422, validation_message(exc.errors()))

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError):
        return error(exc.status, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        """Errors the framework raises (no route, wrong method, unparsable form): our own words."""
        detail = str(exc.detail)
        if exc.status_code == 400:
            if "maximum number of" in detail.lower() or "too many" in detail.lower():
                msg = "too many form fields or files in one request"
            elif "maximum size" in detail.lower():
                msg = "a form field (not a file) is too large; send files as file parts"
            else:
                msg = "the request body is not valid multipart/form-data"
            return error(400, msg)
        words = {404: "not found", 405: "method not allowed"}
        return error(exc.status_code, words.get(exc.status_code, "request not accepted"), headers=getattr(exc, "headers", None))

    @app.get("/", include_in_schema=False)
    async def root():
        return RedirectResponse("/docs")

    @app.get("/health", summary="Liveness, and whether models are available", responses=RESPONSES["health"])
    async def health():
        body = {"status": "ok", "version": __version__, "loaded_models": engine.loaded(), "results_kept": len(store)}
        try:
            body.update(models_ready=True, default_model=engine.default_name(), models=engine.names())
        except ModelUnavailable as exc:
            body.update(models_ready=False, problem=str(exc))
        return body

    @app.get("/v1/models", summary="Registered models: parameters, metrics, calibrated threshold, default", responses=RESPONSES["models"])
    async def models():
        try:
            names = engine.names()
            described = await anyio.to_thread.run_sync(lambda: [engine.describe(n) for n in names + (["ensemble"] if len(names) > 1 else [])])
            reg = engine.registry()
        except ModelUnavailable as exc:
            raise UploadError(503, str(exc)) from None
        return {"default": reg["default"], "selected_by": reg.get("selected_by"), "channels": list(CHANNELS), "models": described}

    @app.post("/v1/segment", summary="Segment one slice, one NIfTI volume or a BraTS t1n/t2f/t1c set", responses=RESPONSES["segment"])
    async def segment(
        request: Request,
        files: list[UploadFile] = File(..., description="one slice (TIFF/PNG/JPEG), one NIfTI volume, or the BraTS t1n, t2f and t1c files"),
        model: str | None = Form(None, description="unetpp, attention_unet or ensemble (default: the registry's best)"),
        threshold: str | None = Form(None, description="probability threshold in (0, 1) (default: the model's calibrated one)"),
        tta: str | None = Form(None, description="true: average with the horizontally flipped input"),
        sequence: str | None = Form(
            None,
            description="what a grey (one-channel) slice or a single NIfTI volume is: flair (default), t1 (pre-contrast T1), t1c (T1 post-contrast) or t2. "
            "It is always given to the model in all 3 channels (the FLAIR-only condition); t1, t1c and t2 get a warning (outside what the model was trained for). "
            "Ignored, and said so, for 3-channel slices and BraTS sets",
        ),
    ):
        t_start = time.perf_counter()
        q = request.query_params
        form = await request.form()  # already parsed (and limited) by FastAPI: no second read
        unknown = {k for k in list(q.keys()) + list(form.keys()) if k not in SEGMENT_FIELDS}
        if unknown:
            raise UploadError(422, f"unknown form field or query parameter; this route takes {', '.join(SEGMENT_FIELDS)}")
        model = model if model is not None else q.get("model")
        thr = parse_threshold(threshold if threshold is not None else q.get("threshold"))
        use_tta = parse_bool("tta", tta if tta is not None else q.get("tta"))
        try:
            seq = parse_sequence(sequence if sequence is not None else q.get("sequence"))
        except ValueError:
            raise UploadError(
                422,
                "sequence must be one of flair (FLAIR), t1 (pre-contrast T1), t1c (T1 post-contrast), t2 (T2); it says what a grey image or a single volume is",
            ) from None
        try:
            name = engine.resolve(model)
        except KeyError:
            choices = ", ".join(engine.names() + ["ensemble"])
            raise UploadError(422, f"unknown model; choose one of {choices}") from None
        except ModelUnavailable as exc:
            raise UploadError(503, str(exc)) from None
        declared = sum(f.size or 0 for f in files)
        if declared > settings.max_upload_bytes:
            raise UploadError(413, f"upload is {declared / 2**20:.1f} MiB, above the limit of {settings.max_upload_mb:.0f} MiB (BRAINSEG_MAX_UPLOAD_MB)")
        uploads: list[Upload] = []
        kind = ""

        def read_files() -> None:
            """Bytes into memory only once a worker is free: a queued request keeps its files where
            the form parser spooled them (on disk beyond 1 MiB), so the queue costs no memory."""
            nonlocal kind
            for f in files:
                f.file.seek(0)
                uploads.append(Upload(clean_name(f.filename), f.file.read(settings.max_upload_bytes + 1)))
            kind = classify(uploads, settings.max_upload_bytes)

        def decode():
            """The input, checked and decoded: every problem here is the upload's (4xx)."""
            if kind == "slice":
                image, stored = decode_slice_channels(uploads[0], limits)
                return image, describe_slice(image, stored, seq)
            payloads = read_volume_payloads(uploads, limits)
            try:
                vol = load_volume(payloads)
            except DataError as exc:
                msg = str(exc)
                raise UploadError(422, msg if any(u.name in msg for u in uploads) else f"{', '.join(u.name for u in uploads)}: {msg}") from None
            except MemoryError:
                raise
            except Exception as exc:
                log.debug("volume unreadable: %r", exc)
                raise UploadError(422, "the volume could not be read: a file is corrupt or not NIfTI") from None
            finally:
                del payloads
            return vol, describe_volume(vol, seq)

        owner = getattr(request.state, "owner", None)
        gone = threading.Event()  # the client disconnected: skip what is left to do

        def work() -> dict:
            if gone.is_set():
                raise ClientGone
            t0 = time.perf_counter()
            read_files()
            seg = engine.get(name)
            try:
                data, read_as = decode()
            except MemoryError:
                raise UploadError(413, "the upload is too large to decode on this server") from None
            if gone.is_set():
                raise ClientGone
            t1 = time.perf_counter()
            if kind == "slice":
                res, post = engine.run_slice(seg, data, thr, use_tta)
                t2 = time.perf_counter()
                return slice_answer(engine, store, seg, uploads, data, res, post, use_tta, (t0, t1, t2), read_as, owner=owner)
            res, post = engine.run_volume(seg, data, thr, use_tta)
            t2 = time.perf_counter()
            return volume_answer(engine, store, seg, uploads, data, res, post, use_tta, (t0, t1, t2), read_as, owner=owner)

        body, failure = None, None
        async with anyio.create_task_group() as tg:

            async def watch():
                while True:
                    if await request.is_disconnected():
                        gone.set()
                        tg.cancel_scope.cancel()  # stops a wait for a worker; a running one checks ``gone``
                        return
                    await anyio.sleep(DISCONNECT_POLL_S)

            tg.start_soon(watch)
            try:
                body = await anyio.to_thread.run_sync(work, limiter=request.app.state.limiter)
            except Exception as exc:  # raised below, outside the task group (no ExceptionGroup)
                failure = exc
            finally:
                tg.cancel_scope.cancel()
        if isinstance(failure, ModelUnavailable):
            raise UploadError(503, str(failure)) from None
        if isinstance(failure, MemoryError):
            raise UploadError(413, "the upload is too large to process on this server") from None
        if failure is not None and not isinstance(failure, ClientGone):
            raise failure
        if body is None:  # nobody is listening any more
            log.info("client went away; its segmentation was skipped")
            return error(499, "client closed the request")
        body["timings_ms"]["total"] = round((time.perf_counter() - t_start) * 1000, 1)
        return body

    def _result(rid: str, request: Request) -> StoredResult:
        res = store.get(rid)
        if res is not None and res.owner != getattr(request.state, "owner", None):
            res = None  # made with another key: as if it did not exist
        if res is None:
            keeps = f"the server keeps the last {settings.max_results} results in memory, for {settings.result_ttl_s:.0f} s"
            raise UploadError(404, f"result not found: it never existed, was deleted, expired or was evicted ({keeps})")
        return res

    def _z(res: StoredResult, z: int) -> int:
        n = res.mask.shape[0]
        if not 0 <= z < n:
            raise UploadError(404, f"slice out of range: this result has slices 0..{n - 1}")
        return z

    @app.get("/v1/results/{rid}", summary="The JSON answer of an earlier segmentation (without images)", responses=RESPONSES["result"])
    async def result(rid: str, request: Request):
        return _result(rid, request).summary

    @app.delete(
        "/v1/results/{rid}", status_code=204, summary="Forget a result now (it is forgotten anyway after BRAINSEG_RESULT_TTL_S)", responses=RESPONSES["result"]
    )
    async def delete_result(rid: str, request: Request):
        store.delete(_result(rid, request).id)
        return Response(status_code=204)

    @app.get("/v1/results/{rid}/mask.nii.gz", summary="Volume mask as NIfTI, on the input's grid and affine", responses=RESPONSES["nifti"])
    async def mask_nifti(rid: str, request: Request):
        res = _result(rid, request)
        if res.kind != "volume":
            raise UploadError(404, "this result is a slice: download its mask as /mask.png")
        data = await anyio.to_thread.run_sync(res.nifti)
        return Response(data, media_type="application/gzip", headers={"Content-Disposition": content_disposition(f"{res.name}_mask.nii.gz")})

    @app.get("/v1/results/{rid}/mask.png", summary="Mask of one slice as a PNG (0 / 255)", responses=RESPONSES["png"])
    async def mask_png(request: Request, rid: str, z: int = Query(0, ge=0, description="slice index (volumes)")):
        res = _result(rid, request)
        z = _z(res, z)
        return Response(png_bytes(res.mask[z].astype(np.uint8) * 255), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    @app.get("/v1/results/{rid}/slice/{z}.png", summary="One slice rendered: image, overlay or mask", responses=RESPONSES["png"])
    async def slice_png(
        request: Request,
        rid: str,
        z: int,
        channel: int = Query(1, ge=-1, le=2, description="0 pre-contrast, 1 FLAIR, 2 post-contrast, -1 all three as RGB"),
        alpha: float = Query(0.4, ge=0.0, le=1.0, description="opacity of the lesion tint"),
        view: Literal["overlay", "image", "mask"] = Query("overlay"),
    ):
        res = _result(rid, request)
        z = _z(res, z)
        img = render(res.display[z], res.mask[z], view, channel, alpha)
        return Response(png_bytes(img), media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    return app


# ---------------------------------------------------------------- answers


def _common(engine, seg, uploads, post, tta, t, single_slice: bool = False) -> dict:
    """Fields every answer has. ``min_size`` is the one applied: a slice on its own uses the slice minimum (2D)."""
    t0, t1, t2 = t
    use_slice_min = single_slice and post.slice_min_size is not None
    return {
        "model": model_block(engine, seg),
        "threshold": round(post.threshold, 4),
        "min_size": post.slice_min_size if use_slice_min else post.min_size,
        "components": "2D" if single_slice or not post.components_3d else "3D",
        "tta": tta,
        "files": [u.name for u in uploads],
        "timings_ms": {"decode": round((t1 - t0) * 1000, 1), "inference": round((t2 - t1) * 1000, 1)},
    }


def _lesions(rows: list[dict]) -> tuple[list[dict], bool]:
    return rows[:MAX_LESIONS_LISTED], len(rows) > MAX_LESIONS_LISTED


def slice_answer(engine, store, seg, uploads, image, res, post, tta, t, read_as: dict | None = None, owner: str | None = None) -> dict:
    display = to_uint8(image)
    stored = StoredResult("slice", display[None], res.mask[None], {}, name=Path(uploads[0].name).stem, owner=owner)
    s = res.summary()
    lesions, cut = _lesions(s["lesions"])
    body = {
        "id": stored.id,
        "kind": "slice",
        **_common(engine, seg, uploads, post, tta, t, single_slice=True),
        "input": {"height": s["height"], "width": s["width"], "dtype": str(image.dtype), "spacing_mm": None, **(read_as or {})},
        "lesion_count": s["lesion_count"],
        "lesion_area_px": s["lesion_area_px"],
        "lesion_area_mm2": None,  # pixel spacing is unknown for TIFF / PNG / JPEG slices
        "lesions": lesions,
        "lesions_truncated": cut,
        "urls": {"result": f"/v1/results/{stored.id}", "mask_png": f"/v1/results/{stored.id}/mask.png", "slice_png": f"/v1/results/{stored.id}/slice/0.png"},
    }
    stored.summary = dict(body)
    body["mask_png"] = b64png(res.mask.astype(np.uint8) * 255)
    body["overlay_png"] = b64png(render(display, res.mask, "overlay", 1, 0.4))
    store.put(stored)
    return body


_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def display_orientation(affine: np.ndarray) -> dict | None:
    """Patient directions at the edges of a displayed slice, from the affine (as the header states them).

    A displayed slice is ``rot90(data[:, :, z])``: row 0 holds the largest y index, column j
    holds x = j. So the top is where +y points, the right is where +x points.
    """
    import nibabel as nib

    try:
        x, y, _ = nib.aff2axcodes(affine)
    except Exception:
        return None
    if x is None or y is None:
        return None
    return {"top": y, "bottom": _OPPOSITE[y], "left": _OPPOSITE[x], "right": x}


def volume_answer(engine, store, seg, uploads, vol, res, post, tta, t, read_as: dict | None = None, owner: str | None = None) -> dict:
    display = display_volume(vol.slices)
    stored = StoredResult("volume", display, res.mask, {}, affine=vol.affine, name=vol.name, owner=owner)
    s = res.summary()
    areas = s["slice_lesion_area_px"]
    z = int(np.argmax(areas)) if res.mask.any() else res.mask.shape[0] // 2
    lesions, cut = _lesions(s["lesions"])
    body = {
        "id": stored.id,
        "kind": "volume",
        **_common(engine, seg, uploads, post, tta, t),
        "input": {
            "name": vol.name,
            "shape": s["shape"],
            "spacing_mm": s["spacing_mm"],
            "dtype": "float32",
            "orientation": display_orientation(vol.affine),
            **(read_as or {}),
        },
        "lesion_count": s["lesion_count"],
        "lesion_voxels": s["lesion_voxels"],
        "lesion_volume_mm3": s["lesion_volume_mm3"],
        "lesions": lesions,
        "lesions_truncated": cut,
        "slices": s["slices"],
        "slice_lesion_area_px": areas,
        "slice_lesion_area_mm2": [round(a * vol.pixel_area_mm2, 2) for a in areas],
        "slices_with_lesion": s["slices_with_lesion"],
        "preview_slice": z,
        "mask_url": f"/v1/results/{stored.id}/mask.nii.gz",
        "urls": {
            "result": f"/v1/results/{stored.id}",
            "mask_nifti": f"/v1/results/{stored.id}/mask.nii.gz",
            "slice_png": f"/v1/results/{stored.id}/slice/{{z}}.png",
            "mask_png": f"/v1/results/{stored.id}/mask.png?z={{z}}",
        },
    }
    stored.summary = dict(body)
    body["preview_png"] = b64png(render(display[z], res.mask[z], "overlay", 1, 0.4))
    store.put(stored)
    return body


app = create_app()
