"""``POST /v1/compare``: a baseline and a follow-up study of one patient, both segmented, compared (``brainseg.evaluation.compare``).

Decision support, not a diagnosis: the answer says so in ``disclaimer``. Uploads are read, limited and
decoded as ``POST /v1/segment`` reads a volume (``parsing``); the work runs in a worker thread holding a
volume slot, a worker slot and the memory both studies need (``segment.run_in_worker``), and stops before
its next batch of slices once the client has gone.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel, Field

from ...display.report import compare_html
from ...evaluation.compare import DISCLAIMER, RegistrationError, RegistrationUnavailable, compare_studies
from ...inference.registry import ENSEMBLE
from ..answers import model_block
from ..cancel import Cancelled
from ..deps import Limiters, MemoryBudget, get_engine, get_limiters, get_limits, get_memory, get_settings
from ..engine import Engine
from ..errors import RESPONSES, error
from ..parsing import SegmentOptions, check_declared_size, decode_input, parse_bool, parse_optional_bool, parse_precision, parse_threshold, read_uploads
from ..render import b64png
from ..settings import Settings
from ..uploads import Limits, UploadError
from .segment import MODEL_HELP, PRECISION_HELP, THRESHOLD_HELP, TTA_HELP, choose_model, memory_need_of, run_in_worker

log = logging.getLogger("brainseg.serving")
router = APIRouter()

COMPARE_FIELDS = ("baseline", "followup", "model", "threshold", "tta", "precision", "register")
STUDY_HELP = (
    "one NIfTI volume, the BraTS t1n, t2f and t1c files, or a DICOM MR series or study (a .zip, or .dcm files): what POST /v1/segment takes for a volume"
)
REGISTER_HELP = (
    "false: no rigid registration of the follow-up to the baseline (compare in world coordinates). Default true; it is skipped anyway, "
    "and said so, when both share a DICOM FrameOfReferenceUID or the same voxel grid and affine (one atlas space)"
)


class RegistrationBlock(BaseModel):
    applied: bool
    reason: str
    method: str | None
    matrix: list[list[float]] = Field(description="4 x 4: a baseline world point (RAS mm of the NIfTI affine) -> the follow-up's")
    rotation_deg: float
    shift_mm: list[float] = Field(description="how far the baseline's centre point moves, mm")
    centre_mm: list[float]
    metric_mattes_mi: float | None = Field(description="Mattes mutual information at the end (negative: lower is better)")
    correlation: float | None = Field(description="Pearson correlation of the two FLAIR volumes inside the baseline head, after alignment")
    seconds: float


class StudyBlock(BaseModel):
    name: str
    files: list[str]
    input: dict = Field(description="how the channels were read, as POST /v1/segment's input block")
    lesion_count: int
    lesions: list[dict] = Field(description="as POST /v1/segment's lesions (id, volume_ml, longest_diameter_mm, measurable, ...)")
    measured_on: str | None = None


class MatchBlock(BaseModel):
    baseline_ids: list[int]
    followup_ids: list[int]
    kind: Literal["same", "merged", "split", "merged and split"]
    matched_by: list[Literal["overlap", "centroid"]]
    baseline_volume_ml: float | None
    followup_volume_ml: float | None
    volume_change_ml: float | None
    volume_change_pct: float | None
    baseline_longest_diameter_mm: float | None
    followup_longest_diameter_mm: float | None
    diameter_change_mm: float | None
    diameter_change_pct: float | None


class ResponseBlock(BaseModel):
    category: Literal["CR", "PR", "SD", "PD", "NE"] = Field(description="RANO-BM: complete / partial response, stable / progressive disease, not evaluable")
    category_name: str
    reason: str
    baseline_target_ids: list[int]
    followup_target_ids: list[int]
    baseline_sum_mm: float | None
    followup_sum_mm: float | None
    change_mm: float | None
    change_pct: float | None
    new_measurable_ids: list[int]
    rule: str


class CompareAnswer(BaseModel):
    disclaimer: str = Field(description=DISCLAIMER)
    model: dict
    baseline: StudyBlock
    followup: StudyBlock
    registration: RegistrationBlock
    matches: list[MatchBlock]
    new_lesion_ids: list[int]
    vanished_lesion_ids: list[int]
    match_tolerance_mm: float
    response: ResponseBlock
    picture_slice: int
    picture_png: str = Field(description="base64 PNG: baseline | registered follow-up at picture_slice, lesions outlined and numbered")
    report_html: str = Field(description="the comparison on one self-contained HTML page (category, sums, picture, lesions, registration, rule, disclaimer)")
    seconds: float
    timings_ms: dict


@dataclass(frozen=True)
class CompareJob:
    """Both studies read, decoded and segmented in turn, then compared; run in a worker thread."""

    engine: Engine
    limits: Limits
    max_upload_bytes: int
    studies: tuple[list[UploadFile], list[UploadFile]]
    options: SegmentOptions
    model_name: str
    precision: str
    register: bool

    def study(self, role: str, files: list[UploadFile], model, gone: threading.Event):
        """(volume, result, input block, file names) of one study; its upload problems name the role."""
        try:
            uploads, kind = read_uploads(files, self.max_upload_bytes)
            if kind == "slice":
                raise UploadError(422, "a single slice cannot be followed up: send a volume (NIfTI, a BraTS set, or a DICOM series)")
            vol, read_as = decode_input(kind, uploads, self.limits, None)
        except UploadError as exc:
            raise UploadError(exc.status, f"{role}: {exc.message}") from None
        if gone.is_set():
            raise Cancelled("running")
        res, post = self.engine.run_volume(model, vol, self.options.threshold, self.options.tta, cancel=gone)
        return vol, res, read_as, [u.name for u in uploads]

    def __call__(self, gone: threading.Event) -> dict:
        if gone.is_set():
            raise Cancelled("queued")
        t0 = time.perf_counter()
        model = self.engine.get(self.model_name, self.precision)
        (bv, br, bin_, bfiles), (fv, fr, fin, ffiles) = [
            self.study(role, files, model, gone) for role, files in zip(("baseline", "followup"), self.studies, strict=False)
        ]
        t1 = time.perf_counter()
        try:
            cmp = compare_studies(bv, br.mask, fv, fr.mask, self.register, br.prob, fr.prob)
        except RegistrationError as exc:
            raise UploadError(422, str(exc)) from None
        except RegistrationUnavailable as exc:  # the server lacks SimpleITK: not the client's fault, nor a fault of the code
            raise UploadError(503, str(exc)) from None
        body = cmp.to_dict()
        body["baseline"].update(files=bfiles, input=bin_)
        body["followup"].update(files=ffiles, input=fin)
        body["model"] = model_block(model, self.engine.version(model), self.engine.backend_kind(model))
        body["picture_png"] = b64png(cmp.picture)
        body["report_html"] = compare_html(body, cmp.picture)
        body["timings_ms"] = {"segment": round((t1 - t0) * 1000, 1), "compare": round((time.perf_counter() - t1) * 1000, 1)}
        return body


async def compare_options(request: Request, fields: dict[str, str | None]) -> tuple[SegmentOptions, bool]:
    """The form fields (else the same names in the query string), parsed; unknown names are a 422."""
    q = request.query_params
    form = await request.form()
    if any(k not in COMPARE_FIELDS for k in list(q.keys()) + list(form.keys())):
        raise UploadError(422, f"unknown form field or query parameter; this route takes {', '.join(COMPARE_FIELDS)}")

    def value(name: str) -> str | None:
        return fields[name] if fields.get(name) is not None else q.get(name)

    options = SegmentOptions(
        model=value("model"),
        threshold=parse_threshold(value("threshold")),
        tta=parse_optional_bool("tta", value("tta")),
        sequence=None,
        precision=parse_precision(value("precision")),
    )
    register = value("register")
    return options, True if register is None else parse_bool("register", register)


@router.post(
    "/v1/compare",
    summary="Follow-up comparison of two studies of one patient: registration, lesions matched, RANO-BM response (decision support, not a diagnosis)",
    response_model=CompareAnswer,
    responses=RESPONSES["segment"],
)
async def compare(
    request: Request,
    baseline: list[UploadFile] = File(..., min_length=1, description="the baseline study: " + STUDY_HELP),
    followup: list[UploadFile] = File(..., min_length=1, description="the follow-up study: " + STUDY_HELP),
    model: str | None = Form(None, description=MODEL_HELP),
    threshold: str | None = Form(None, description=THRESHOLD_HELP),
    tta: str | None = Form(None, description=TTA_HELP),
    precision: str | None = Form(None, description=PRECISION_HELP),
    register_: str | None = Form(None, alias="register", description=REGISTER_HELP),  # "register" would shadow a BaseModel attribute of FastAPI's form model
    engine: Engine = Depends(get_engine),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
    limiters: Limiters = Depends(get_limiters),
    memory: MemoryBudget = Depends(get_memory),
):
    t_start = time.perf_counter()
    fields = {"model": model, "threshold": threshold, "tta": tta, "precision": precision, "register": register_}
    options, do_register = await compare_options(request, fields)
    name, chosen = choose_model(engine, options)
    check_declared_size(baseline + followup, settings.max_upload_bytes, settings.max_upload_mb)
    members = len(engine.registry().ensemble_members) if name == ENSEMBLE else 1
    need = sum([await memory_need_of(files, limits, memory, members) for files in (baseline, followup)])
    job = CompareJob(engine, limits, settings.max_upload_bytes, (baseline, followup), options, name, chosen, do_register)
    try:
        body = await run_in_worker(request, job, limiters.volume_and_worker, memory, need)
    except Cancelled as gone:
        request.app.state.cancelled += 1
        log.warning("comparison cancelled while %s: its client disconnected (%d cancelled since start)", gone.stage, request.app.state.cancelled)
        return error(499, "client closed the request")
    body["timings_ms"]["total"] = round((time.perf_counter() - t_start) * 1000, 1)
    return body
