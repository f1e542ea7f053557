"""Offline and honest (issue 20): the API docs and the page make no request beyond the two services, and a
server fault's error id reaches the page.

The browser tests block every request that is not for 127.0.0.1 / localhost (``page.route``), record what
was blocked, and check that the pages render anyway and that nothing was blocked at all. They need Debian's
chromium (``/usr/bin/chromium``) and skip without it, as ``test_browser`` does.
"""

from __future__ import annotations

import os
import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from conftest import REPO, server_env, start_uvicorn, stop
from helpers import make_client
from test_browser import BRATS, CHROMIUM, SHOTS, browser, e2e_api, open_page, streamlit_url, wait_for_images  # noqa: F401 (fixtures)

from brainseg.serving.docs import ASSETS, ASSETS_URL

LOCAL_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}


class _Refs(HTMLParser):
    """Every src / href of a page's tags."""

    def __init__(self):
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


def page_refs(html: str) -> list[str]:
    p = _Refs()
    p.feed(html)
    return p.refs + re.findall(r"url:\s*'([^']+)'", html) + re.findall(r'spec-url="([^"]+)"', html)


# ---------------------------------------------------------------- the docs pages, in process


@pytest.mark.parametrize("route", ["/docs", "/redoc"])
def test_docs_pages_load_only_their_own_assets(tiny_model_dir, route):
    with make_client(tiny_model_dir, api_key="secret-key-1") as c:  # with a key: the pages and their assets stay open
        assert c.get("/v1/models").status_code == 401, "the key is on"
        r = c.get(route)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        refs = page_refs(r.text)
        assert refs, "the page loads no script at all?"
        assert not any(urlsplit(u).scheme or urlsplit(u).netloc or u.startswith("//") for u in refs), refs
        assert "googleapis" not in r.text and "cdn." not in r.text and "validator.swagger.io" not in r.text
        csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
        assert all("http" not in v and "*" not in v for v in csp.values()), csp  # nothing from other hosts, whatever the page holds
        assert csp["default-src"] == "'self'" and csp["img-src"] == "'self' data:"
        scripts = [u for u in refs if u.endswith(".js")]
        assert scripts and all(u.startswith(ASSETS_URL + "/") for u in scripts)
        for u in refs:
            got = c.get(u)
            assert got.status_code == 200, u
            if u.startswith(ASSETS_URL):
                assert got.headers["content-type"] == ASSETS[u.rsplit("/", 1)[1]], u
                assert len(got.content) > (1000 if u.endswith(".png") else 100_000), u
        assert c.get(f"{ASSETS_URL}/../openapi.json").status_code in (401, 404), "no path tricks"
        assert c.get(f"{ASSETS_URL}/swagger-ui-bundle.js.map").status_code in (401, 404), "only the named files are served"


def test_docs_assets_are_real_swagger_ui_and_redoc(tiny_model_dir):
    with make_client(tiny_model_dir) as c:
        js = c.get(f"{ASSETS_URL}/swagger-ui-bundle.js").text
        assert "SwaggerUIBundle" in js and "license" in js[:200].lower()
        assert "Redoc" in c.get(f"{ASSETS_URL}/redoc.standalone.js").text[:2000]
        assert ".swagger-ui" in c.get(f"{ASSETS_URL}/swagger-ui.css").text
        assert c.get(f"{ASSETS_URL}/favicon.png").content[:8] == b"\x89PNG\r\n\x1a\n"
        assert c.get(f"{ASSETS_URL}/swagger-ui-bundle.js").headers["cache-control"].startswith("public")


# ---------------------------------------------------------------- the error id of a server fault, on the page


@pytest.fixture(scope="module")
def faulty_api(tiny_model_dir, tmp_path_factory):
    """A real API whose segmentations fail (tests/faulty_app.py); yields (url, its log)."""
    log = tmp_path_factory.mktemp("faulty") / "uvicorn.log"
    env = server_env(tiny_model_dir, BRAINSEG_RESULT_DIR=str(log.parent / "results"))
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env["PYTHONPATH"]])
    url, proc = start_uvicorn("faulty_app:app", env, log)
    try:
        yield url, log
    finally:
        stop(proc)


def test_page_shows_the_error_id_of_a_server_fault(monkeypatch, faulty_api):
    from test_streamlit import no_page_crash, run_app, texts

    from brainseg.io.synthetic import synthetic_png

    url, log = faulty_api
    at = run_app(monkeypatch, url)
    at.file_uploader(key="uploads").upload("drawn.png", synthetic_png(), "image/png").run()
    no_page_crash(at)
    (shown,) = [e for e in texts(at.error) if "HTTP 500" in e]
    found = re.search(r"error id: ([0-9a-f]{12})\)", shown)
    assert found, shown
    assert "failed" in shown and "refused" not in shown
    assert found.group(1) in log.read_text(), "the id on the page is the one the server logged the traceback under"
    assert "RuntimeError" not in shown and "planted" not in shown


# ---------------------------------------------------------------- in a browser with the internet cut off


def cut_off(page) -> list[str]:
    """Abort every request of ``page`` that is not for this machine; returns the (growing) list of those aborted."""
    blocked: list[str] = []

    def route(r):
        host = urlsplit(r.request.url).hostname or ""
        if r.request.url.startswith(("data:", "blob:")) or host in LOCAL_HOSTS:
            return r.continue_()
        blocked.append(r.request.url)
        return r.abort("internetdisconnected")

    page.route("**/*", route)
    return blocked


@pytest.mark.browser
def test_docs_and_redoc_render_without_internet(browser, e2e_api):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    blocked = cut_off(page)
    failed: list[str] = []
    page.on("requestfailed", lambda req: failed.append(req.url))
    refused: list[str] = []  # what the pages' Content-Security-Policy stopped in the browser (ReDoc's Redocly logo)
    page.on("console", lambda m: refused.append(m.text) if "Content Security Policy" in m.text else None)
    try:
        page.goto(e2e_api + "/docs", wait_until="networkidle")
        page.locator(".swagger-ui .opblock-summary-path", has_text="/v1/segment").first.wait_for()
        page.get_by_text("Lesion segmentation in brain MRI").first.wait_for()
        assert page.locator(".swagger-ui .opblock").count() >= 8
        page.goto(e2e_api + "/redoc", wait_until="networkidle")
        page.get_by_text("Segment one slice, one NIfTI volume").first.wait_for()
        assert page.locator("redoc .api-content").count() == 1
        assert blocked == [], f"the docs asked the internet for {blocked}"
        assert not [u for u in failed if "cdn.redoc.ly" not in u], failed
        assert all("cdn.redoc.ly" in m for m in refused), refused  # the policy stopped only the logo: nothing the pages need
    finally:
        page.close()


@pytest.mark.browser
def test_page_renders_without_internet_and_shows_lesion_diameters(browser, streamlit_url, shared_data):  # noqa: F811
    """The page with the internet cut off: it renders, runs the BraTS example and shows the lesion table with
    RANO-BM diameters; nothing outside this machine was asked for (fonts, icons, favicon, telemetry).
    Saves ``SHOTS/app_lesions.png``."""
    page = browser.new_page(viewport={"width": 1600, "height": 1400})
    page.set_default_timeout(180_000)
    blocked = cut_off(page)
    try:
        page.goto(streamlit_url, wait_until="domcontentloaded")
        page.get_by_text("Brain MRI lesion segmentation").first.wait_for()
        page.get_by_text("Connected").first.wait_for()
        page.set_input_files("input[type=file]", [str(shared_data / BRATS.format(s)) for s in ("t1n", "t2f", "t1c")])
        page.get_by_text("Result · BraTS-MET-00110-000").first.wait_for()
        wait_for_images(page, 3)
        page.get_by_text("RANO-BM:").first.wait_for()
        table = page.locator('[data-testid="stDataFrame"]').last
        table.wait_for()
        page.wait_for_timeout(800)
        text = page.inner_text("body")
        assert "sum of longest diameters" in text and "Traceback" not in text
        assert "Longest diameter (mm)" in page.content(), "the lesion table's column (the data grid keeps an accessible copy in the DOM)"
        fonts = page.evaluate("() => Array.from(document.fonts).filter(f => f.status === 'loaded').map(f => f.family)")
        assert any("Source Sans" in f for f in fonts), fonts
        table.scroll_into_view_if_needed()
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "app_lesions.png"), full_page=True)
        assert blocked == [], f"the page asked the internet for {blocked}"
    finally:
        page.close()
