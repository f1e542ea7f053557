"""The page's viewer: ``GET /v1/results/{id}/viewer.npz`` (what the page draws from), and in a real browser
(uvicorn API + ``streamlit run`` + Debian Chromium through Playwright) the three views of a BraTS volume,
contour and zoom, a reference mask's Dice, two models side by side, and no API request from a display control.

Screenshots go to artifacts/screenshots/ (app_viewer.png, app_reference.png, app_two_models.png); the ones in docs/
are copies of a run's, so a test run leaves the checkout as it was.
"""

from __future__ import annotations

import gzip
import io
import re
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO

CHROMIUM = "/usr/bin/chromium"
BRATS = "brats-met-example/BraTS-MET-00110-000-{}.nii.gz"
SHOTS = REPO / "artifacts" / "screenshots"


def small_volume() -> bytes:
    """A 5-slice NIfTI with a flipped, anisotropic affine (so the display affine is not the file's)."""
    import nibabel as nib

    from brainseg.io.synthetic import synthetic_slice

    img, _ = synthetic_slice(size=96)
    vol = np.stack([np.rot90(img[:, :, 1], -1).astype(np.float32) * (k > 0) for k in range(5)], axis=2)
    affine = np.array([[-1.2, 0, 0, 90], [0, 0.9, 0, -100], [0, 0, 5.0, 20], [0, 0, 0, 1]])
    return gzip.compress(nib.Nifti1Image(vol, affine).to_bytes())


def load_npz(data: bytes) -> dict:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def test_viewer_npz_holds_what_the_slice_routes_render(api_server, tmp_path):
    import cv2
    import nibabel as nib

    from brainseg.display.review import heatmap
    from brainseg.io.volumes import load_volume

    nii = tmp_path / "small.nii.gz"
    nii.write_bytes(small_volume())
    with httpx.Client(base_url=api_server, timeout=120) as http:
        body = http.post("/v1/segment", files=[("files", ("small.nii.gz", nii.read_bytes(), "application/gzip"))]).json()
        r = http.get(body["urls"]["viewer"])
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        v = load_npz(r.content)
        mask = np.unpackbits(v["mask_bits"], axis=-1, count=v["display"].shape[2]).astype(bool)
        assert v["display"].dtype == np.uint8 and v["display"].shape == (*mask.shape, 3) and v["prob"].shape == mask.shape
        for z in range(mask.shape[0]):  # the same arrays the server renders its PNGs from
            png = cv2.imdecode(np.frombuffer(http.get(f"/v1/results/{body['id']}/mask.png?z={z}").content, np.uint8), cv2.IMREAD_UNCHANGED)
            np.testing.assert_array_equal(png > 0, mask[z])
            heat = cv2.imdecode(np.frombuffer(http.get(f"/v1/results/{body['id']}/slice/{z}.png?view=probability").content, np.uint8), cv2.IMREAD_COLOR)
            np.testing.assert_array_equal(heat[..., ::-1], heatmap(v["prob"][z]))
        assert int(mask.sum()) == body["lesion_voxels"] and mask.any()
        np.testing.assert_allclose(v["spacing_mm"], body["input"]["spacing_mm"])
        np.testing.assert_allclose(v["affine"], load_volume([nii]).display_affine, atol=1e-9)
        ref = nib.load(nii)  # the display affine maps voxel (0, 0, 0) to a corner of the file's grid
        corners = {tuple(np.round(ref.affine @ [x, y, zz, 1], 6)[:3]) for x in (0, 95) for y in (0, 95) for zz in (0, 4)}
        assert tuple(np.round(v["affine"] @ [0, 0, 0, 1], 6)[:3]) in corners
        meta = zipfile.ZipFile(io.BytesIO(r.content)).read("meta.json")
        assert body["id"].encode() in meta
        assert http.get(f"/v1/results/{'0' * 32}/viewer.npz").status_code == 404


# ---------------------------------------------------------------- in a browser: one BraTS volume, a few interactions

try:  # the page's fixtures (API with the shipped models, ``streamlit run``, Chromium); they skip without /usr/bin/chromium
    from test_browser import browser, e2e_api, open_page, streamlit_url  # noqa: F401
except ImportError:  # pragma: no cover
    pytest.skip("tests/test_browser.py is needed for the browser fixtures", allow_module_level=True)

VIEWPORT = {"width": 1280, "height": 1300}


def api_requests(api: str) -> int:
    """Requests the API has answered, from its /metrics counter (the scrape itself left out)."""
    lines = httpx.get(api + "/metrics", timeout=30).text.splitlines()
    return round(sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith("brainseg_http_requests_total{") and 'route="/metrics"' not in x))


def how_to(page):
    return page.locator('[data-testid="stMain"] [data-testid="stExpander"]').filter(has_text="How to use").locator("details").first


def view(page, caption: str):
    return page.locator('[data-testid="stImage"]').filter(has_text=caption).locator("img").first


def pixels(page, caption: str) -> np.ndarray:
    """The RGB pixels of the view whose caption starts with ``caption``, as the browser received them (read again
    if a rerun replaced the picture meanwhile: Streamlit drops the old one)."""
    import cv2

    for _ in range(10):
        src = view(page, caption).get_attribute("src")
        r = page.request.get(src if src.startswith("http") else page.url.rstrip("/") + "/" + src.lstrip("/"))
        img = cv2.imdecode(np.frombuffer(r.body(), np.uint8), cv2.IMREAD_COLOR) if r.ok else None
        if img is not None:
            return img[..., ::-1]
        page.wait_for_timeout(300)
    raise AssertionError(f"the view {caption!r} could not be read")


def changed(page, caption: str, before: str) -> str:
    """Waits until the view's picture is replaced; its new source."""
    page.wait_for_function(
        """([cap, old]) => { const el = Array.from(document.querySelectorAll('[data-testid="stImage"]')).find(e => e.innerText.includes(cap));
                            const img = el && el.querySelector('img'); return img && img.complete && img.naturalWidth > 0 && img.src !== old; }""",
        arg=[caption, before],
    )
    return view(page, caption).get_attribute("src")


def red_pixels(img: np.ndarray) -> int:
    return int(((img[..., 0] > 150) & (img[..., 1] < 110) & (img[..., 2] < 110)).sum())


def shoot(page, anchor: str, name: str, height: int = 1250) -> None:
    """artifacts/screenshots/``name``: ``height`` px of the page from just above ``anchor`` (text), taken in a viewport tall enough
    for the whole page (Streamlit scrolls inside the page, so a full-page screenshot stops at the viewport)."""
    page.set_viewport_size({"width": VIEWPORT["width"], "height": 3000})
    page.wait_for_timeout(800)
    top = page.get_by_text(anchor).first.bounding_box()["y"] - 16
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / name), clip={"x": 0, "y": max(0, top), "width": VIEWPORT["width"], "height": height})
    page.set_viewport_size(VIEWPORT)
    page.wait_for_timeout(300)


@pytest.fixture(scope="module")
def volume_page(browser, streamlit_url, shared_data):
    """The page with the BraTS example volume segmented once; the tests below look at it in turn."""
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(180_000)
    page.goto(streamlit_url, wait_until="domcontentloaded")
    page.get_by_text("Connected").first.wait_for()
    assert how_to(page).get_attribute("open") is not None  # How to use, open at first
    page.set_input_files("input[type=file]", [str(shared_data / BRATS.format(s)) for s in ("t1n", "t2f", "t1c")])
    progress = page.locator('[data-testid="stProgress"]').first  # while the volume is segmented: slices from the header, time left
    progress.wait_for()
    assert re.search(r"Segmenting 155 slices · \d+ s · (about \d+ s left|taking longer than estimated)", progress.inner_text()), progress.inner_text()
    for caption in ("Axial ·", "Coronal ·", "Sagittal ·"):
        view(page, caption).wait_for()
    page.wait_for_function("""() => Array.from(document.querySelectorAll('[data-testid="stImage"] img')).filter(i => i.naturalWidth > 0).length >= 3""")
    try:
        yield page
    finally:
        page.close()


@pytest.mark.browser
def test_three_views_and_layout(volume_page):
    page = volume_page
    text = page.inner_text("body")
    assert "Sequence of a grey slice" not in text  # a BraTS set carries its sequences
    assert how_to(page).get_attribute("open") is None  # How to use, collapsed
    assert "Volume 240 × 240 × 155 voxels of 1 × 1 × 1 mm" in text
    cut = page.evaluate(
        """() => Array.from(document.querySelectorAll('[data-testid="stMetricValue"]')).filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.innerText)"""
    )
    assert cut == [], f"metric values cut off at {VIEWPORT['width']} px: {cut}"
    axial, coronal, sagittal = (pixels(page, c) for c in ("Axial ·", "Coronal ·", "Sagittal ·"))
    # true aspect: 240 x 240 voxels axially, 155 x 240 (slices x columns / rows) in the other planes, all 1 mm
    assert axial.shape[0] == axial.shape[1]
    assert abs(coronal.shape[0] / coronal.shape[1] - 155 / 240) < 0.01 and abs(sagittal.shape[0] / sagittal.shape[1] - 155 / 240) < 0.01
    assert all(red_pixels(v) > 200 for v in (axial, coronal, sagittal))  # the cursor starts in the lesion: all three show it
    shoot(page, "Volume 240 × 240 × 155 voxels", "app_viewer.png", 1000)


@pytest.mark.browser
def test_display_controls_change_the_picture_without_asking_the_api(volume_page, e2e_api):
    page = volume_page
    before = api_requests(e2e_api)
    src, fill = view(page, "Axial ·").get_attribute("src"), pixels(page, "Axial ·")
    page.locator('[data-testid="stRadio"]').filter(has_text="Overlay").get_by_text("Contour", exact=True).click()
    src = changed(page, "Axial · slice", src)
    contour = pixels(page, "Axial ·")
    assert 0 < red_pixels(contour) < red_pixels(fill) / 2, (red_pixels(contour), red_pixels(fill))  # the outline only
    zoom = page.locator('[data-testid="stSlider"]').filter(has_text="Zoom").get_by_role("slider")
    zoom.focus()
    for _ in range(4):  # 1x -> 2x
        page.keyboard.press("ArrowRight")
    page.get_by_text("2.00x").first.wait_for()
    src = changed(page, "Axial · slice", src)
    page.wait_for_timeout(1000)  # the last of the four reruns drawn
    zoomed = pixels(page, "Axial ·")
    assert red_pixels(zoomed) > 1.5 * red_pixels(contour)  # the same outline, twice as large around the cursor (in the lesion)
    opacity = page.locator('[data-testid="stSlider"]').filter(has_text="Opacity").get_by_role("slider")
    opacity.focus()
    page.keyboard.press("ArrowRight")
    page.get_by_text("0.45").first.wait_for()
    axial = page.locator('[data-testid="stSlider"]').filter(has_text="Axial slice").get_by_role("slider")
    axial.focus()
    page.wait_for_timeout(1000)  # the opacity change drawn
    src = view(page, "Axial · slice").get_attribute("src")
    t0 = __import__("time").perf_counter()
    page.keyboard.press("ArrowLeft")
    changed(page, "Axial · slice", src)
    print(f"axial slice change drawn in {__import__('time').perf_counter() - t0:.2f} s")
    page.wait_for_timeout(1500)
    assert api_requests(e2e_api) == before, "a display-only control called the API"


@pytest.mark.browser
def test_reference_mask_dice(volume_page, e2e_api, tmp_path):
    import nibabel as nib

    page = volume_page
    rid = re.search(r"result ([0-9a-f]{32})", page.inner_text("body")).group(1)
    pred_img = nib.Nifti1Image.from_bytes(gzip.decompress(httpx.get(f"{e2e_api}/v1/results/{rid}/mask.nii.gz", timeout=120).content))
    pred = np.asarray(pred_img.dataobj) > 0
    ref = np.roll(pred, 6, axis=0)  # a reader's mask 6 voxels to one side, without the lesion's lower slices
    ref[:, :, : int(np.median(np.nonzero(pred)[2])) - 5] = False
    dice = 2 * (pred & ref).sum() / (pred.sum() + ref.sum())
    difference = int(pred.sum()) - int(ref.sum())  # 1 mm voxels
    nib.save(nib.Nifti1Image(ref.astype(np.uint8), pred_img.affine), tmp_path / "reference.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)), tmp_path / "small.nii.gz")
    before = api_requests(e2e_api)
    uploader = page.locator('[data-testid="stFileUploader"]').filter(has_text="Reference mask").locator("input[type=file]")
    uploader.set_input_files(str(tmp_path / "small.nii.gz"))
    page.get_by_text("small.nii.gz: its grid is 10 × 10 × 10 voxels, the input's 240 × 240 × 155").first.wait_for()
    uploader.set_input_files(str(tmp_path / "reference.nii.gz"))
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Dice with the reference").locator('[data-testid="stMetricValue"]')
    metric.wait_for()
    assert metric.inner_text() == f"{dice:.3f}"
    value = page.locator('[data-testid="stMetric"]').filter(has_text="Predicted − reference").locator('[data-testid="stMetricValue"]')
    assert value.inner_text() == f"{difference:+,} mm³"
    src = view(page, "Axial ·").get_attribute("src")
    page.locator('[data-testid="stRadio"]').filter(has_text="Overlay").get_by_text("Difference", exact=True).click()
    changed(page, "Axial · slice", src)
    page.get_by_text("reference only (false negative)").first.wait_for()
    img = pixels(page, "Axial ·")
    blue = int(((img[..., 2] > 150) & (img[..., 0] < 120)).sum())
    assert blue > 0 and red_pixels(img) > 0  # false negatives and false positives both drawn
    page.wait_for_timeout(1000)
    assert api_requests(e2e_api) == before, "the reference mask was sent to the API"
    shoot(page, "Reference mask (optional)", "app_reference.png", 800)


@pytest.mark.browser
def test_two_models_side_by_side(volume_page, e2e_api):
    page = volume_page
    page.get_by_text("Compare with a second model").first.click()
    metric = page.locator('[data-testid="stMetric"]').filter(has_text="Dice between the two models").locator('[data-testid="stMetricValue"]')
    metric.wait_for()
    for caption in ("Attention U-Net · Axial", "Nested U-Net · Axial", "Agreement · Axial"):
        view(page, caption).wait_for()
    text = page.inner_text("body")
    ids = list(dict.fromkeys(re.findall(r"result ([0-9a-f]{32})", text)))
    assert len(ids) == 2, ids
    agreement = pixels(page, "Agreement ·")
    assert ((agreement[..., 0] > 200) & (agreement[..., 1] > 160) & (agreement[..., 2] < 120)).sum() > 100  # voxels both found (yellow)

    def mask(rid):
        v = load_npz(httpx.get(f"{e2e_api}/v1/results/{rid}/viewer.npz", timeout=120).content)
        return np.unpackbits(v["mask_bits"], axis=-1, count=v["display"].shape[2]).astype(bool)

    a, b = mask(ids[0]), mask(ids[1])
    assert metric.inner_text() == f"{2 * (a & b).sum() / (a.sum() + b.sum()):.3f}"
    src = view(page, "Attention U-Net · Axial").get_attribute("src")
    page.locator('[data-testid="stRadio"]').filter(has_text="Overlay").get_by_text("Contour", exact=True).click()
    changed(page, "Attention U-Net · Axial", src)
    shoot(page, "Dice between the two models", "app_two_models.png", 560)


@pytest.mark.browser
def test_downloads_are_fetched_when_pressed(volume_page, tmp_path):
    """The NIfTI mask (and the HTML report where the API offers one) come from the API only on a click: the
    file saved is the whole mask of the result on the page."""
    import nibabel as nib

    page = volume_page
    volume = page.locator('[data-testid="stMetric"]').filter(has_text="Lesion volume").locator('[data-testid="stMetricValue"]').inner_text()
    lesion_mm3 = int(re.match(r"([\d,]+) mm", volume).group(1).replace(",", ""))  # 1 mm voxels: the voxel count
    with page.expect_download() as got:
        page.get_by_role("button", name="NIfTI mask (.nii.gz)").click()
    saved = tmp_path / got.value.suggested_filename
    got.value.save_as(saved)
    assert saved.name == "BraTS-MET-00110-000_mask.nii.gz"
    mask = np.asarray(nib.load(saved).dataobj)
    assert mask.shape == (240, 240, 155) and int((mask > 0).sum()) == lesion_mm3
    report = page.get_by_role("button", name="Report (.html)")
    if report.count():
        with page.expect_download() as got:
            report.click()
        assert got.value.suggested_filename.endswith("_report.html")
        assert b"<html" in Path(got.value.path()).read_bytes()[:2000].lower()
