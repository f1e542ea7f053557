"""``/v1/results/{rid}/report.html``, ``/sr.dcm`` and ``/sc.zip``: the reports of ``brainseg.display.report`` for a stored result.

Made on request from what the result store keeps (the answer, display slices, mask and, for DICOM input, the DICOM
SEG), with the owner check of every result download (``results.get_results``: another API key's result is a 404).
The SR and the secondary capture take the study's identifiers from the SEG, so only a DICOM result whose SEG was
written has them; any other result answers 404 with a sentence that says why and what to download instead.
"""

from __future__ import annotations

import datetime

import anyio
import numpy as np
from fastapi import APIRouter, Depends
from fastapi.responses import Response

from ...display import report
from ..answers import content_disposition
from ..deps import MemoryBudget, get_memory
from ..errors import RESPONSES, ErrorBody
from ..store import StoredResult
from ..uploads import UploadError
from .results import Results, get_results

router = APIRouter(prefix="/v1/results")
SC_BYTES_PER_VOXEL = 8  # the secondary capture's RGB slices (3 a voxel), their DICOM files and the zip of them, rounded up
_NO_SEG = {
    404: {"model": ErrorBody, "description": "no such result (or another API key's), or one without a DICOM SEG (not DICOM, or the SEG could not be written)"},
    409: {"model": ErrorBody, "description": "the report cannot be made from this result (the message says why)"},
}
_DOCS = {
    "html": {**RESPONSES["result"], 409: _NO_SEG[409], 200: {"content": {"text/html": {}}, "description": "one self-contained printable page"}},
    "dicom": {
        **RESPONSES["result"],
        **_NO_SEG,
        200: {"content": {"application/dicom": {}}, "description": "a DICOM SR (TID 1500) referencing the SEG (it carries the study's identifiers)"},
    },
    "zip": {
        **RESPONSES["result"],
        **_NO_SEG,
        200: {"content": {"application/zip": {}}, "description": "the secondary-capture series as DICOM files in a .zip"},
    },
}


def _model(res: StoredResult) -> tuple[str, str]:
    model = res.summary.get("model") or {}
    return str(model.get("name") or "unknown"), str(model.get("version") or "unknown")


def _seg(res: StoredResult, what: str) -> bytes:
    """The result's DICOM SEG, or a 404 that says why ``what`` cannot be made."""
    seg = res.dicom_seg()
    if seg is not None:
        return seg
    if (res.summary.get("input") or {}).get("dicom"):
        raise UploadError(
            404, f"this result has no {what}: it references the DICOM SEG, which could not be written from the series' headers (see the answer's warnings)"
        )
    raise UploadError(404, f"this result was not made from DICOM, so it has no {what} (it needs the source series); download /report.html instead")


def _html(res: StoredResult) -> bytes:
    info = report.report_info(res.summary)
    info.created = datetime.datetime.fromtimestamp(res.created, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")  # when it was segmented
    return report.html_report(info, report.key_images(res.display, res.mask, info.lesions)).encode()


def _sr(res: StoredResult, seg: bytes) -> bytes:
    name, version = _model(res)
    lesions, rano = res.summary.get("lesions") or [], res.summary.get("rano_bm")
    return report.sr_bytes(seg, lesions, rano, name, version, res.summary.get("lesion_count"))


def _sc(res: StoredResult, seg: bytes) -> bytes:
    name, version = _model(res)
    orientation = (res.summary.get("input") or {}).get("orientation")
    return report.zip_files(report.secondary_capture_series(seg, res.display, res.mask, name, version, orientation))


async def _made(make, *args):
    try:
        return await anyio.to_thread.run_sync(make, *args)
    except report.ReportError as exc:
        raise UploadError(409, str(exc)) from None


@router.get("/{rid}/report.html", summary="A one-page report: key images, lesion table, RANO-BM, model and warnings", responses=_DOCS["html"])
async def report_html(rid: str, results: Results = Depends(get_results)):
    res = results.find(rid)
    data = await _made(_html, res)
    return Response(data, media_type="text/html; charset=utf-8", headers={"Content-Disposition": content_disposition(f"{res.name}_report.html")})


@router.get("/{rid}/sr.dcm", summary="The lesion measurements as a DICOM SR (TID 1500) referencing the SEG (DICOM input only)", responses=_DOCS["dicom"])
async def sr_dicom(rid: str, results: Results = Depends(get_results)):
    res = results.find(rid)
    seg = await anyio.to_thread.run_sync(_seg, res, "DICOM SR")
    data = await _made(_sr, res, seg)
    return Response(data, media_type="application/dicom", headers={"Content-Disposition": content_disposition(f"{res.name}_sr.dcm")})


@router.get("/{rid}/sc.zip", summary="The lesion overlay as a secondary-capture DICOM series, zipped (DICOM input only)", responses=_DOCS["zip"])
async def sc_zip(rid: str, results: Results = Depends(get_results), memory: MemoryBudget = Depends(get_memory)):
    res = results.find(rid)
    seg = await anyio.to_thread.run_sync(_seg, res, "secondary capture")
    async with memory.hold(int(np.prod(res.mask.shape)) * SC_BYTES_PER_VOXEL):
        data = await _made(_sc, res, seg)
    return Response(data, media_type="application/zip", headers={"Content-Disposition": content_disposition(f"{res.name}_sc.zip")})
