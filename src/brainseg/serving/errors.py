"""Error answers: their JSON bodies, the status codes each route documents, and the handlers.

Every problem with a user's input answers 4xx with ``{"detail": "<one line>"}`` in our own words
(never a library's exception text, the values sent or a server path). Anything else is the
server's fault: ``middleware.ServerErrors`` answers 500 with ``{"detail", "error_id"}``.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from .uploads import UploadError

__all__ = ["RESPONSES", "ErrorBody", "ServerErrorBody", "UploadError", "error", "install_error_handlers", "validation_message"]


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


_RETRY_AFTER = {"Retry-After": {"description": "seconds until the next request is accepted", "schema": {"type": "integer"}}}
_COMMON = {
    401: _err("BRAINSEG_API_KEY is set and the request has no key or a wrong one (X-API-Key or Authorization: Bearer)"),
    429: _err(
        "this client sent more than BRAINSEG_AUTH_FAILURES_PER_MIN wrong API keys in the last minute; its keys are not checked until then", headers=_RETRY_AFTER
    ),
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
        408: _err("the request body did not arrive within BRAINSEG_BODY_TIMEOUT_S; the connection is closed"),
        413: _err(
            "over a limit: upload bytes, pixels, voxels, decoded bytes, or more memory to segment than the whole BRAINSEG_MEMORY_BUDGET_MB "
            "(the message names the BRAINSEG_* setting)"
        ),
        429: _err(
            "over BRAINSEG_RATE_PER_MIN segmentations in the last minute from this client, or over BRAINSEG_AUTH_FAILURES_PER_MIN wrong API keys",
            headers=_RETRY_AFTER,
        ),
        415: _err("not multipart/form-data, or a file type that is not a slice (TIFF / PNG / JPEG), NIfTI or DICOM (.zip, .dcm)"),
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
    "seg": {**_RESULT, 200: {"content": {"application/dicom": {}}, "description": "the mask as a DICOM SEG (it carries the study's identifiers)"}},
}


def error(status: int, detail: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse({"detail": detail, **extra}, status_code=status, headers=headers)


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


def _what_is_wrong(kind: str, ctx: dict) -> str:
    if kind in _VALIDATION_WORDS:
        return _VALIDATION_WORDS[kind]
    if kind in ("greater_than_equal", "greater_than") and ("ge" in ctx or "gt" in ctx):
        return f"must be at least {ctx.get('ge', ctx.get('gt'))}" if "ge" in ctx else f"must be above {ctx['gt']}"
    if kind in ("less_than_equal", "less_than") and ("le" in ctx or "lt" in ctx):
        return f"must be at most {ctx.get('le', ctx.get('lt'))}" if "le" in ctx else f"must be below {ctx['lt']}"
    if kind == "literal_error" and "expected" in ctx:
        return f"must be one of {ctx['expected']}"
    if "file" in kind or "upload" in kind:
        return "must be a file (multipart/form-data with a file name)"
    return "is not valid"


def validation_message(errors: list[dict]) -> str:
    """``field: what is wrong`` for each error, from the schema only: never the values sent."""
    parts = []
    for e in errors[:5]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header", "form") and not isinstance(x, int))
        what = _what_is_wrong(str(e.get("type", "")), e.get("ctx") or {})
        part = f"{loc[:40]} {what}" if loc else f"request {what}"
        if part not in parts:
            parts.append(part)
    return "; ".join(parts) or "invalid request"


async def _validation(request: Request, exc: RequestValidationError):
    if request.url.path == "/v1/segment" and request.method == "POST":
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return error(415, "send the file(s) as multipart/form-data in the field 'files'")
    return error(422, validation_message(exc.errors()))


async def _upload_error(request: Request, exc: UploadError):
    return error(exc.status, exc.message)


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
    if exc.status_code == 405:
        return error(405, "method not allowed", headers={"Allow": allowed_methods(request)})
    words = {404: "not found"}
    return error(exc.status_code, words.get(exc.status_code, "request not accepted"), headers=getattr(exc, "headers", None))


def allowed_methods(request: Request) -> str:
    """Every method some route takes at this path (the router's own 405 names only the first route's)."""
    methods = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    """Validation errors, ``UploadError`` (raised anywhere for a client's mistake) and the
    framework's own HTTP errors all answer ``{"detail"}`` in our words."""
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(UploadError, _upload_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
