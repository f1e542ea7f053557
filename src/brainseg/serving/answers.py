"""The JSON answers of ``POST /v1/segment`` (and the result each one stores for later download)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np

from ..config import DISPLAY_NAMES, PostprocessConfig
from ..display.review import display_window, probability_u8
from ..inference.backends import Ensemble, window_for_volume
from ..inference.predict import SliceResult, VolumeResult
from ..io.volumes import Volume, display_orientation
from ..preprocessing import intensity_window
from .render import b64png, display_slice, display_volume, render
from .store import StoredResult

MAX_LESIONS_LISTED = 1000  # the count is always exact; the list is cut for garbage masks


@dataclass(frozen=True)
class Timings:
    """``time.perf_counter()`` when the work began, when the input was decoded, when inference ended."""

    started: float
    decoded: float
    inferred: float

    def as_ms(self) -> dict:
        return {"decode": round((self.decoded - self.started) * 1000, 1), "inference": round((self.inferred - self.decoded) * 1000, 1)}


@dataclass(frozen=True)
class RunInfo:
    """How one segmentation was made: what every answer reports besides its result."""

    model: dict  # ``model_block``
    post: PostprocessConfig  # as applied (the threshold may be the client's)
    tta: bool
    files: list[str]  # cleaned upload names
    timings: Timings
    read_as: dict  # how the input's channels were read (``channels.describe_*``)
    owner: str | None = None  # API key hash of the client


def model_block(model, version: str, backend: str) -> dict:
    """Name, display name, version, backend and precision of the model (and an ensemble's members)."""
    block = {
        "name": model.name,
        "display_name": DISPLAY_NAMES.get(model.name, model.name),
        "version": version,
        "backend": backend,
        "precision": model.precision,
    }
    if isinstance(model, Ensemble):
        block["members"] = [m.name for m in model.members]
    return block


def content_disposition(filename: str) -> str:
    """``attachment`` with an ASCII ``filename`` (anything else, and ``"`` ``\\`` ``;`` ``%``, as ``_``)
    and the exact name as RFC 5987 ``filename*=UTF-8''...``: no header injection, any script."""
    fallback = "".join(c if 32 <= ord(c) < 127 and c not in '"\\;%' else "_" for c in filename) or "download"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


def _common(run: RunInfo, single_slice: bool) -> dict:
    """Fields every answer has. ``min_size`` is the one applied: a slice on its own uses the slice minimum (2D)."""
    post = run.post
    use_slice_min = single_slice and post.slice_min_size is not None
    return {
        "model": run.model,
        "threshold": round(post.threshold, 4),
        "min_size": post.slice_min_size if use_slice_min else post.min_size,
        "components": "2D" if single_slice or not post.components_3d else "3D",
        "tta": run.tta,
        "files": list(run.files),
        "timings_ms": run.timings.as_ms(),
    }


def _lesions(rows: list[dict]) -> tuple[list[dict], bool]:
    return rows[:MAX_LESIONS_LISTED], len(rows) > MAX_LESIONS_LISTED


INLINE_MAX_PIXELS = 512 * 512  # BRAINSEG_INLINE_PNG_MAX_PIXELS: larger slices' answers link to their PNGs
ANSWER_IMAGES = ("mask_png", "overlay_png", "preview_png")  # the ``return`` choices: base64 PNGs in an answer
SLICE_IMAGES = frozenset({"mask_png", "overlay_png"})  # a slice answer's default
VOLUME_IMAGES = frozenset({"preview_png"})  # a volume answer's default


def slice_answer(
    run: RunInfo, image: np.ndarray, res: SliceResult, store, inline_max_pixels: int = INLINE_MAX_PIXELS, images: frozenset = SLICE_IMAGES
) -> dict:
    """The answer for one slice, with its mask and overlay as base64 PNG up to ``inline_max_pixels``
    (``images_inline``); a larger slice's answer has only their links (``urls.mask_png``,
    ``urls.overlay_png``), so it stays small. ``images``: which of them the client asked for
    (``return``); the others are neither drawn nor encoded. The result is stored."""
    display = display_slice(image)
    window = display_window(None if image.dtype == np.uint8 else intensity_window(image))  # what display_slice applied
    stored = StoredResult("slice", display[None], res.mask[None], {}, name=Path(run.files[0]).stem, owner=run.owner, prob=probability_u8(res.prob)[None])
    s = res.summary()
    lesions, cut = _lesions(s["lesions"])
    body = {
        "id": stored.id,
        "kind": "slice",
        **_common(run, single_slice=True),
        "input": {
            "height": s["height"],
            "width": s["width"],
            "dtype": str(image.dtype),
            "spacing_mm": None if res.pixel_spacing_mm is None else [res.pixel_spacing_mm[1], res.pixel_spacing_mm[0]],  # (column, row), as a volume's
            "display_window": window,
            **run.read_as,
        },
        "lesion_count": s["lesion_count"],
        "lesion_area_px": s["lesion_area_px"],
        "lesion_area_mm2": s["lesion_area_mm2"],  # None unless the client sent pixel_spacing_mm: TIFF / PNG / JPEG carry no spacing
        "lesions": lesions,
        "lesions_truncated": cut,
        "rano_bm": s["rano_bm"],
        "urls": {
            "result": f"/v1/results/{stored.id}",
            "mask_png": f"/v1/results/{stored.id}/mask.png",
            "slice_png": f"/v1/results/{stored.id}/slice/0.png",
            "overlay_png": f"/v1/results/{stored.id}/slice/0.png?view=overlay",
            "report_html": f"/v1/results/{stored.id}/report.html",
            "viewer": f"/v1/results/{stored.id}/viewer.npz",
        },
        "images_inline": s["height"] * s["width"] <= inline_max_pixels,
    }
    stored.summary = dict(body)
    if body["images_inline"] and "mask_png" in images:
        body["mask_png"] = b64png(res.mask.astype(np.uint8) * 255)
    if body["images_inline"] and "overlay_png" in images:
        body["overlay_png"] = b64png(render(display, res.mask, "overlay", 1, 0.4))
    store.put(stored)
    return body


def _volume_urls(rid: str) -> dict:
    return {
        "result": f"/v1/results/{rid}",
        "mask_nifti": f"/v1/results/{rid}/mask.nii.gz",
        "slice_png": f"/v1/results/{rid}/slice/{{z}}.png",
        "mask_png": f"/v1/results/{rid}/mask.png?z={{z}}",
        "report_html": f"/v1/results/{rid}/report.html",  # one printable page (routes.reports)
        "viewer": f"/v1/results/{rid}/viewer.npz",  # display, mask, probability, spacing and affine in one download
    }


def _dicom_urls(rid: str) -> dict:
    """A DICOM result with its SEG: the SEG, and the SR and secondary capture that reference it (``routes.reports``)."""
    return {"seg_dicom": f"/v1/results/{rid}/seg.dcm", "sr_dicom": f"/v1/results/{rid}/sr.dcm", "sc_zip": f"/v1/results/{rid}/sc.zip"}


def dicom_seg(run: RunInfo, vol: Volume, mask: np.ndarray) -> tuple[bytes | None, str | None]:
    """(the DICOM SEG, None) of a volume read from DICOM (``dicom.DicomVolume``); (None, None) for other volumes;
    (None, a plain warning) when the SEG cannot be written from its headers: the mask is answered all the same."""
    if getattr(vol, "dicom", None) is None:
        return None, None
    from ..io.dicom import write_seg

    return write_seg(vol.dicom, vol.to_stored(np.asarray(mask)), run.model["name"], run.model["version"], run.post.threshold)


def volume_answer(run: RunInfo, vol: Volume, res: VolumeResult, store, images: frozenset = VOLUME_IMAGES) -> dict:
    """The answer for a volume, with per-slice lesion areas, a preview (``preview_png`` in ``images``)
    and download links; the result is stored."""
    window = res.window if res.display is not None else window_for_volume(vol.slices)  # segment_volume windows the volume once
    display = res.display if res.display is not None else display_volume(vol.slices, window)
    seg, seg_warning = dicom_seg(run, vol, res.mask)
    read_as = {**run.read_as, "warnings": [*run.read_as.get("warnings", []), seg_warning]} if seg_warning else run.read_as
    stored = StoredResult(
        "volume",
        display,
        res.mask,
        {},
        affine=vol.affine,
        orientation=vol.stored_orientation,
        name=vol.name,
        owner=run.owner,
        prob=probability_u8(res.prob),
        seg_dicom=seg,
    )
    s = res.summary()
    areas = s["slice_lesion_area_px"]
    z = int(np.argmax(areas)) if res.mask.any() else res.mask.shape[0] // 2
    lesions, cut = _lesions(s["lesions"])
    body = {
        "id": stored.id,
        "kind": "volume",
        **_common(run, single_slice=False),
        "input": {
            "name": vol.name,
            "shape": s["shape"],
            "spacing_mm": s["spacing_mm"],
            "dtype": "float32",
            "orientation": display_orientation(vol.display_affine),
            "display_window": display_window(window),
            **read_as,
        },
        "lesion_count": s["lesion_count"],
        "lesion_voxels": s["lesion_voxels"],
        "lesion_volume_mm3": s["lesion_volume_mm3"],
        "lesions": lesions,
        "lesions_truncated": cut,
        "rano_bm": s["rano_bm"],
        "slices": s["slices"],
        "slice_lesion_area_px": areas,
        "slice_lesion_area_mm2": [round(a * vol.pixel_area_mm2, 2) for a in areas],
        "slices_with_lesion": s["slices_with_lesion"],
        "background_slices_skipped": s["background_slices_skipped"],  # no brain there: not sent to the network, probability 0
        "preview_slice": z,
        "mask_url": f"/v1/results/{stored.id}/mask.nii.gz",
        "urls": _volume_urls(stored.id) | (_dicom_urls(stored.id) if seg is not None else {}),
    }
    stored.summary = dict(body)
    if "preview_png" in images:
        body["preview_png"] = b64png(render(display[z], res.mask[z], "overlay", 1, 0.4))
    store.put(stored)
    return body
