"""End to end in a real browser: uvicorn API + ``streamlit run`` + headless Chromium (Playwright).

Uploads a real lesion-positive LGG slice through the page's file input, waits for the three
images (original, overlay, probability) and the lesion table, saves ``artifacts/screenshots/app_slice.png``; then the BraTS
example volume (``app_volume.png``). Needs /usr/bin/chromium (Debian package ``chromium``);
Playwright's own browser download is not used.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest
from conftest import REPO, free_port, start_api, start_process, stop

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
SHOTS = REPO / "artifacts" / "screenshots"
LESION_SLICE = (
    "lgg/kaggle_3m/TCGA_HT_7473_19970826/TCGA_HT_7473_19970826_14.tif"  # a test patient of the shipped models (models/split.json); mask: 4621 lesion pixels
)
BRATS = "brats-met-example/BraTS-MET-00110-000-{}.nii.gz"
TIMEOUT_MS = 90_000


SHIPPED = REPO / "models"


@pytest.fixture(scope="module")
def e2e_api(tiny_model_dir, tmp_path_factory):
    """The API with the shipped models (the app as users get it); the tiny test models only
    where the checkout has no shipped models."""
    model_dir = SHIPPED if (SHIPPED / "registry.json").is_file() else tiny_model_dir
    url, proc, _ = start_api(model_dir, tmp_path_factory.mktemp("e2e_api") / "uvicorn.log")
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def streamlit_url(e2e_api, tmp_path_factory):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run the browser tests")
    port = free_port()
    log = tmp_path_factory.mktemp("streamlit") / "streamlit.log"
    env = dict(
        os.environ,
        BRAINSEG_API_URL=e2e_api,
        STREAMLIT_BROWSER_GATHER_USAGE_STATS="false",
        PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]),
    )
    cmd = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        "streamlit_app.py",
        "--server.headless",
        "true",
        "--server.port",
        str(port),
        "--server.address",
        "127.0.0.1",
        "--server.fileWatcherType",
        "none",
    ]
    url = f"http://127.0.0.1:{port}"
    proc = start_process(cmd, env, log, url + "/_stcore/health")
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) to run the browser tests")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield b
        finally:
            b.close()


def wait_for_images(page, n: int) -> None:
    """Until ``n`` Streamlit images are in the page and decoded."""
    page.wait_for_function(
        """n => { const imgs = Array.from(document.querySelectorAll('[data-testid="stImage"] img'));
                  return imgs.length >= n && imgs.every(i => i.complete && i.naturalWidth > 0); }""",
        arg=n,
        timeout=TIMEOUT_MS,
    )


def open_page(browser, url):
    page = browser.new_page(viewport={"width": 1600, "height": 1250})
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url, wait_until="domcontentloaded")
    page.get_by_text("Brain MRI lesion segmentation").first.wait_for()
    page.get_by_text("Connected").first.wait_for()  # the sidebar reached the API
    return page


def upload(page, files, headings: tuple[str, ...], images: int, ready, shot: str) -> str:
    """Upload ``files``; wait for each of ``headings``, ``images`` decoded images, then ``ready`` (a
    locator); save a full-page screenshot as ``SHOTS/shot``; return the page's text."""
    page.set_input_files("input[type=file]", files)
    for heading in headings:
        page.get_by_text(heading).first.wait_for()
    wait_for_images(page, images)
    ready.wait_for(state="visible")
    page.wait_for_timeout(500)  # let the data grid and the images paint
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / shot), full_page=True)
    return page.inner_text("body")


def test_landing_page_and_synthetic_example(browser, streamlit_url):
    page = open_page(browser, streamlit_url)
    try:
        page.get_by_role("button", name="Try the synthetic example").wait_for()
        page.locator('[data-testid="stFileUploaderDropzone"]').first.wait_for()
        page.get_by_text("How to use").first.wait_for()
        page.wait_for_timeout(300)
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / "app_start.png"))
        assert "Upload one slice" in page.inner_text("body")
        page.get_by_role("button", name="Try the synthetic example").click()
        page.get_by_text("Synthetic example — not a real MRI").first.wait_for()
        wait_for_images(page, 3)
        page.wait_for_timeout(300)
        page.screenshot(path=str(SHOTS / "app_synthetic.png"))
        assert "Result · Synthetic example" in page.inner_text("body")
    finally:
        page.close()


def test_upload_real_slice(browser, streamlit_url, shared_data):
    path = shared_data / LESION_SLICE
    page = open_page(browser, streamlit_url)
    try:
        table = page.locator('[data-testid="stDataFrame"]').first
        text = upload(page, str(path), (f"Result · {path.name}", "Fill (lesion in red"), 3, table, "app_slice.png")
        for words in (
            "Research software",
            "not for diagnosis",
            "Attention U-Net",
            "Lesions",
            "Original (FLAIR)",
            "Probability (inferno, fixed scale 0 → 1)",
            "Mask PNG",
            "Overlay PNG",
            "Per-patient Dice",
        ):
            assert words in text, f"{words!r} missing from the page"
        assert re.search(r"min\. size \d+ px \(2D\)", text), "a lone slice's minimum size is in pixels"
        assert "Traceback" not in text and "Cannot reach" not in text
    finally:
        page.close()


def test_upload_brats_volume(browser, streamlit_url, shared_data):
    files = [str(shared_data / BRATS.format(s)) for s in ("t1n", "t2f", "t1c")]
    page = open_page(browser, streamlit_url)
    try:
        download = page.get_by_text("NIfTI mask (.nii.gz)").first
        text = upload(page, files, ("Result · BraTS-MET-00110-000", "Axial slice (0–154)"), 3, download, "app_volume.png")
        for words in ("Lesion volume", "mm³", "Axial · slice", "Coronal · row", "Sagittal · column", "NIfTI mask"):
            assert words in text, f"{words!r} missing from the page"
        assert re.search(r"min\. size \d+ voxels \(3D\)", text), "a volume's minimum size is in voxels of 3D components"
        assert "Traceback" not in text
    finally:
        page.close()


def test_upload_zipped_dicom_study(browser, streamlit_url, shared_data, tmp_path):
    """A zipped DICOM study (the BraTS example as three oblique MR series): result, channel sources,
    probability view, window / level presets from the header, and the DICOM SEG download."""
    from dicom_series import write_brats_study, zip_bytes

    study = write_brats_study(tmp_path, shared_data / "brats-met-example")
    zipped = tmp_path / "study.zip"
    zipped.write_bytes(zip_bytes([study["dicom"]]))
    page = open_page(browser, streamlit_url)
    try:
        download = page.get_by_text("DICOM SEG (.dcm)").first
        text = upload(page, str(zipped), ("Result · study (DICOM: 3 series)", "Axial slice (0–39)"), 3, download, "app_dicom.png")
        for words in ("Axial · slice", "Window / level of the displayed sequence", "NIfTI mask", "DICOM SEG", "Lesion volume"):
            assert words in text, f"{words!r} missing from the page"
        assert "Traceback" not in text and "Zzyzx" not in text
    finally:
        page.close()
