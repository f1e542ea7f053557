"""``/v1/results/{rid}``: an earlier answer, its NIfTI mask (and DICOM SEG for DICOM input), mask and
rendered slices as PNG (image, overlay, mask or probability heat map, with window / level), the
arrays a viewer draws from in one download (``viewer.npz``), and delete."""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass
from typing import Literal

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response

from ...display.review import heatmap, window_level
from ...display.visualize import png_bytes
from ..answers import content_disposition
from ..deps import MemoryBudget, get_memory, get_owner, get_settings, get_store
from ..errors import RESPONSES
from ..render import mask_png as mask_png_bytes
from ..render import render
from ..schemas import SegmentAnswer
from ..settings import Settings
from ..store import StoredResult
from ..uploads import UploadError

router = APIRouter(prefix="/v1/results")
PNG_HEADERS = {"Cache-Control": "private, max-age=3600"}


@dataclass(frozen=True)
class Results:
    """The results the caller may read: those made with its API key (another key's are as if they did not exist)."""

    store: object
    owner: str | None
    settings: Settings

    def find(self, rid: str) -> StoredResult:
        res = self.store.get(rid)
        if res is not None and res.owner != self.owner:
            res = None
        if res is None:
            keeps = f"the server keeps the last {self.settings.max_results} results, for {self.settings.result_ttl_s:.0f} s"
            raise UploadError(404, f"result not found: it never existed, was deleted, expired or was evicted ({keeps})")
        return res


def get_results(store=Depends(get_store), owner: str | None = Depends(get_owner), settings: Settings = Depends(get_settings)) -> Results:
    return Results(store, owner, settings)


def slice_index(res: StoredResult, z: int) -> int:
    n = res.mask.shape[0]
    if not 0 <= z < n:
        raise UploadError(404, f"slice out of range: this result has slices 0..{n - 1}")
    return z


@router.get(
    "/{rid}",
    summary="The JSON answer of an earlier segmentation (without images)",
    responses={**RESPONSES["result"], 200: {"model": SegmentAnswer, "description": "the answer as it was given, less its base64 images"}},
)
async def result(rid: str, results: Results = Depends(get_results)):
    return results.find(rid).summary


@router.delete("/{rid}", status_code=204, summary="Forget a result now (it is forgotten anyway after BRAINSEG_RESULT_TTL_S)", responses=RESPONSES["result"])
async def delete_result(rid: str, results: Results = Depends(get_results)):
    results.store.delete(results.find(rid).id)
    return Response(status_code=204)


NIFTI_BYTES_PER_VOXEL = 8  # unpacked, re-oriented and written mask copies (5.2 a voxel measured with tracemalloc), rounded up


@router.get("/{rid}/mask.nii.gz", summary="Volume mask as NIfTI, on the input's grid and affine", responses=RESPONSES["nifti"])
async def mask_nifti(rid: str, results: Results = Depends(get_results), memory: MemoryBudget = Depends(get_memory)):
    res = results.find(rid)
    if res.kind != "volume":
        raise UploadError(404, "this result is a slice: download its mask as /mask.png")
    async with memory.hold(int(np.prod(res.mask.shape)) * NIFTI_BYTES_PER_VOXEL):  # a share of the memory budget, like a segmentation
        data = await anyio.to_thread.run_sync(res.nifti)
    return Response(data, media_type="application/gzip", headers={"Content-Disposition": content_disposition(f"{res.name}_mask.nii.gz")})


@router.get("/{rid}/seg.dcm", summary="The mask as a DICOM SEG referencing the source series (DICOM input only)", responses=RESPONSES["seg"])
async def seg_dicom(rid: str, results: Results = Depends(get_results)):
    res = results.find(rid)
    data = await anyio.to_thread.run_sync(res.dicom_seg)
    if data is None and (res.summary.get("input") or {}).get("dicom"):
        raise UploadError(
            404, "the DICOM SEG of this result could not be written from its series' headers (see the answer's warnings); download the mask as /mask.nii.gz"
        )
    if data is None:
        raise UploadError(404, "this result was not made from DICOM, so it has no DICOM SEG; download the mask as /mask.nii.gz or /mask.png")
    return Response(data, media_type="application/dicom", headers={"Content-Disposition": content_disposition(f"{res.name}_seg.dcm")})


VIEWER_BYTES_PER_VOXEL = 12  # display (3) + probability (1) + unpacked mask (1) read back, the deflated copy and the zip, rounded up


@router.get(
    "/{rid}/viewer.npz",
    summary="What a viewer draws from, in one download: display volume, packed mask, probability, spacing and affine",
    responses={**RESPONSES["result"], 200: {"content": {"application/octet-stream": {}}, "description": "an .npz (np.load opens it)"}},
)
async def viewer_npz(rid: str, results: Results = Depends(get_results), memory: MemoryBudget = Depends(get_memory)):
    """The arrays behind every rendered view, so that a client draws slices, other planes, zoom and overlays
    itself and asks the server nothing more while the user looks around: see ``viewer_arrays``."""
    res = results.find(rid)
    async with memory.hold(int(np.prod(res.mask.shape)) * VIEWER_BYTES_PER_VOXEL):
        data = await anyio.to_thread.run_sync(viewer_bytes, res)
    name = f"{res.name}_viewer.npz"
    return Response(data, media_type="application/octet-stream", headers={**PNG_HEADERS, "Content-Disposition": content_disposition(name)})


def viewer_arrays(res: StoredResult) -> dict[str, np.ndarray]:
    """``display`` (Z, H, W, 3) uint8 as windowed for display (channels pre-contrast, FLAIR, post-contrast),
    ``mask_bits`` (Z, H, ceil(W / 8)) the mask packed along W (``np.unpackbits(..., axis=-1, count=W)``),
    ``prob`` (Z, H, W) uint8 probability x 255 (absent when the result kept none), ``spacing_mm``
    (column, row, slice; NaN where unknown: image files), ``affine`` (4, 4) voxel (slice, row, column)
    -> world mm of the displayed arrays (a volume's ``display_affine``; for a slice the pixel grid)."""
    mask = np.asarray(res.mask, dtype=bool)
    spacing = (res.summary.get("input") or {}).get("spacing_mm")
    if res.kind == "slice":
        spacing = [*(spacing or [np.nan, np.nan]), np.nan]
    out = {
        "display": np.asarray(res.display),
        "mask_bits": np.packbits(mask, axis=-1),
        "spacing_mm": np.asarray(spacing, np.float64),
        "affine": display_affine_of(res, mask.shape),
    }
    if res.prob is not None:
        out["prob"] = np.asarray(res.prob)
    return out


def display_affine_of(res: StoredResult, shape: tuple[int, int, int]) -> np.ndarray:
    """The displayed arrays' voxel -> mm affine, rebuilt from the input's affine and orientation as
    ``Volume.display_affine`` makes it; a slice's (and an affine-less result's) is the identity."""
    if res.affine is None:
        return np.eye(4)
    from ...io.volumes import display_affine, from_display, mask_to_volume

    shape_xyz = mask_to_volume(from_display(np.empty(shape, dtype=bool), res.orientation)).shape
    return display_affine(res.affine, shape_xyz, res.orientation)


def viewer_bytes(res: StoredResult) -> bytes:
    """``viewer_arrays`` as an ``.npz`` deflated at level 1 (as the store's files: close to level 6 in size, faster)
    with ``meta.json`` (the shapes and the result id)."""
    arrays = viewer_arrays(res)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for key, arr in arrays.items():
            member = io.BytesIO()
            np.save(member, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(f"{key}.npy", member.getvalue())
        zf.writestr("meta.json", json.dumps({"id": res.id, "kind": res.kind, "mask_shape": list(res.mask.shape)}))
    return buf.getvalue()


@router.get("/{rid}/mask.png", summary="Mask of one slice as a PNG (0 / 255)", responses=RESPONSES["png"])
async def mask_png(rid: str, results: Results = Depends(get_results), z: int = Query(0, ge=0, description="slice index (volumes)")):
    res = results.find(rid)
    z = slice_index(res, z)
    return Response(mask_png_bytes(res.mask[z]), media_type="image/png", headers=PNG_HEADERS)


@router.get("/{rid}/slice/{z}.png", summary="One slice rendered: image, overlay or mask", responses=RESPONSES["png"])
async def slice_png(
    rid: str,
    z: int,
    results: Results = Depends(get_results),
    channel: int = Query(1, ge=-1, le=2, description="0 pre-contrast, 1 FLAIR, 2 post-contrast, -1 all three as RGB"),
    alpha: float = Query(0.4, ge=0.0, le=1.0, description="opacity of the lesion tint"),
    view: Literal["overlay", "image", "mask", "probability"] = Query("overlay", description="probability: the model's probabilities as a heat map"),
    wc: float | None = Query(None, allow_inf_nan=False, description="window centre, in the input's units (with ww; e.g. a DICOM WindowCenter)"),
    ww: float | None = Query(None, gt=0, allow_inf_nan=False, description="window width, in the input's units (with wc)"),
):
    res = results.find(rid)
    z = slice_index(res, z)
    if view == "probability":
        if res.prob is None:
            raise UploadError(404, "this result has no probabilities kept; segment the input again")
        img = heatmap(res.prob[z])
    else:
        img = render(windowed(res, z, channel, wc, ww), res.mask[z], view, channel, alpha)
    return Response(png_bytes(img), media_type="image/png", headers=PNG_HEADERS)


def windowed(res: StoredResult, z: int, channel: int, wc: float | None, ww: float | None):
    """Display slice ``z``, re-windowed to ``wc`` +- ``ww`` / 2 (input units) on the shown channel(s) when asked."""
    if wc is None and ww is None:
        return res.display[z]
    window = (res.summary.get("input") or {}).get("display_window")
    if wc is None or ww is None or window is None:
        raise UploadError(422, "wc and ww go together (window centre and width, in the input's units)")
    return window_level(res.display[z], window, wc, ww, (0, 1, 2) if channel < 0 else (channel,))
