"""``/docs`` (Swagger UI) and ``/redoc`` (ReDoc) served with their own assets: they work with no internet.

FastAPI's own pages load Swagger UI, ReDoc, a favicon and Google Fonts from CDNs, so on a hospital
network without internet access they stay blank. Here the same pages (``get_swagger_ui_html`` /
``get_redoc_html``) point at copies served by the app under ``/docs/assets/``: the files that the
pinned ``fastapi-offline`` package ships (Swagger UI 5 and ReDoc 2, MIT / Apache-2.0, with their
licence headers), served as plain routes rather than a folder mount, so only these four paths exist
and they stay open without an API key (``middleware.OPEN_PATHS``). ReDoc gets no Google Fonts and
Swagger UI no validator badge (which would ask validator.swagger.io about the spec). Both pages carry a
Content-Security-Policy that keeps the browser on this server: ReDoc's bundle still shows a Redocly logo
from cdn.redoc.ly, which the policy stops before any request leaves (the logo hides itself when it fails).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

ASSETS_URL = "/docs/assets"
# name -> media type: the files the pages load
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "redoc.standalone.js": "text/javascript; charset=utf-8",
    "favicon.png": "image/png",
}
ASSET_PATHS = frozenset(f"{ASSETS_URL}/{name}" for name in ASSETS)
CACHE = "public, max-age=86400"
# The pages' own inline script (Swagger UI's start-up) and ReDoc's inline styles are allowed; nothing from elsewhere.
CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; frame-ancestors 'self'"
)


def _same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CSP
    return page


def assets_dir() -> Path:
    """Where the pinned ``fastapi-offline`` package keeps the Swagger UI and ReDoc files."""
    import fastapi_offline

    return Path(fastapi_offline.__file__).resolve().parent / "static"


def install_docs(app: FastAPI, title: str) -> None:
    """``/docs``, its OAuth2 redirect page, ``/redoc`` and their assets; ``app`` is made with ``docs_url=None, redoc_url=None``."""
    folder = assets_dir()
    missing = [name for name in ASSETS if not (folder / name).is_file()]
    if missing:  # a broken install: say so at start, not as blank pages later
        raise RuntimeError(f"the API docs' assets are missing from {folder}: {', '.join(missing)} (reinstall fastapi-offline)")

    def asset_route(name: str, media_type: str):
        path = folder / name

        async def asset() -> FileResponse:
            return FileResponse(path, media_type=media_type, headers={"Cache-Control": CACHE})

        return asset

    for name, media_type in ASSETS.items():
        app.add_api_route(f"{ASSETS_URL}/{name}", asset_route(name, media_type), methods=["GET"], include_in_schema=False, name=f"docs_asset_{name}")

    def root(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        r = root(request)
        page = get_swagger_ui_html(
            openapi_url=r + app.openapi_url,
            title=f"{title} - API docs",
            swagger_js_url=f"{r}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{r}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{r}{ASSETS_URL}/favicon.png",
            oauth2_redirect_url=r + app.swagger_ui_oauth2_redirect_url,
            swagger_ui_parameters={"validatorUrl": None},
        )
        return _same_origin_only(page)

    @app.get(app.swagger_ui_oauth2_redirect_url, include_in_schema=False)
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        r = root(request)
        page = get_redoc_html(
            openapi_url=r + app.openapi_url,
            title=f"{title} - API reference",
            redoc_js_url=f"{r}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{r}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
        return _same_origin_only(page)
