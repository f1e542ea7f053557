"""``POST /v1/segment``: parse the request, run the model in a worker thread, answer.

The work runs in a worker thread (at most ``BRAINSEG_MAX_CONCURRENT`` at once, of them at most
``BRAINSEG_MAX_CONCURRENT_VOLUMES`` volumes; the rest wait, and ``middleware.Shed`` turns away
what is beyond ``BRAINSEG_MAX_QUEUE``) so the event loop keeps serving; the engine batches the
slices of concurrent requests. When the client disconnects, its work stops (``cancel``): a request
still waiting is dropped before it runs, a running one stops after decoding or before its next
batch of slices; the log says so with a count (``segmentation cancelled ...``).
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass

import anyio
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile

from ...inference.backends import Ensemble, Segmenter
from ...inference.registry import ENSEMBLE, PrecisionUnavailable
from ..allocator import trim
from ..answers import ANSWER_IMAGES, SLICE_IMAGES, VOLUME_IMAGES, RunInfo, Timings, model_block, slice_answer, volume_answer
from ..cancel import Cancelled
from ..deps import Limiters, MemoryBudget, get_engine, get_limiters, get_limits, get_memory, get_owner, get_settings, get_store
from ..engine import Engine, ModelUnavailable
from ..errors import RESPONSES, error
from ..parsing import SegmentOptions, check_declared_size, decode_input, is_volume_request, memory_of, read_uploads, segment_options
from ..schemas import SegmentAnswer
from ..settings import Settings
from ..uploads import Limits, UploadError

log = logging.getLogger("brainseg.serving")
router = APIRouter()

DISCONNECT_POLL_S = 0.25
FILES_HELP = "one slice (TIFF/PNG/JPEG), one NIfTI volume, the BraTS t1n, t2f and t1c files, or a DICOM MR series or study (a .zip, or .dcm files)"
MODEL_HELP = "unetpp, attention_unet or ensemble (default: the registry's best)"
THRESHOLD_HELP = "probability threshold in (0, 1) (default: the model's calibrated one)"
TTA_HELP = "true: average with the horizontally flipped input, at the post-processing calibrated for it; false: one pass; left out: the model's shipped default (GET /v1/models: tta.default)"
SEQUENCE_HELP = (
    "what a grey (one-channel) slice or a single NIfTI volume is: flair (default), t1 (pre-contrast T1), t1c (T1 post-contrast) or t2. "
    "It is always given to the model in all 3 channels (the FLAIR-only condition); t1, t1c and t2 get a warning (outside what the model was trained for). "
    "Ignored, and said so, for 3-channel slices and BraTS sets"
)
PIXEL_SPACING_HELP = (
    "a slice's pixel spacing in mm: one number (square pixels) or row,col (the spacing between rows, then between columns: DICOM PixelSpacing order). "
    "With it, lesion areas are in mm^2 and diameters in mm (longest_diameter_mm, RANO-BM measurable); without it, diameters are in pixels "
    "(longest_diameter_px). Volumes take their voxel size from the file's header: sending it with a volume is a 422"
)
RETURN_HELP = (
    "the base64 PNGs the answer carries, comma-separated: mask_png, overlay_png (slices), preview_png (volumes), or none. "
    "Left out: mask_png,overlay_png for a slice, preview_png for a volume. What is not asked for is not drawn or encoded; "
    "every image stays available from the result's urls"
)
PRECISION_HELP = (
    "fp32 or int8 (the quantised ONNX model, where the registry lists one). Left out: the model's default_precision in GET /v1/models, "
    "int8 where its accuracy cost was measured to be within 0.005 per-patient Dice and the server runs ONNX Runtime, else fp32"
)


@dataclass(frozen=True)
class SegmentJob:
    """One segmentation, run in a worker thread: read the files, decode, run the model, answer."""

    engine: Engine
    store: object
    limits: Limits
    max_upload_bytes: int
    files: list[UploadFile]
    options: SegmentOptions
    model_name: str
    precision: str
    owner: str | None
    inline_max_pixels: int = 512 * 512
    images: frozenset | None = None  # the ``return`` field; None: the answer kind's default

    def __call__(self, gone: threading.Event) -> dict:
        if gone.is_set():
            raise Cancelled("queued")
        t0 = time.perf_counter()
        clock = Clock()
        uploads, kind = read_uploads(self.files, self.max_upload_bytes)
        opts = self.options
        model = self.engine.get(self.model_name, self.precision)
        if kind != "slice" and opts.pixel_spacing_mm is not None:
            raise UploadError(422, "pixel_spacing_mm is for slices (TIFF / PNG / JPEG); a volume's voxel size comes from its header")
        data, read_as = decode_input(kind, uploads, self.limits, opts.sequence)
        if gone.is_set():
            raise Cancelled("running")
        t1 = time.perf_counter()
        tta = model.with_tta(opts.tta)  # not asked: the model's shipped default
        if kind == "slice":
            res, post = self.engine.run_slice(model, data, opts.threshold, tta, opts.pixel_spacing_mm)
        else:  # stops before its next batch of slices once the client has gone
            res, post = self.engine.run_volume(timed(model, clock), data, opts.threshold, tta, cancel=gone)
        block = model_block(model, self.engine.version(model), self.engine.backend_kind(model))
        t2 = time.perf_counter()
        info = RunInfo(block, post, tta, [u.name for u in uploads], Timings(t0, t1, t2), read_as, self.owner)
        store = TimedStore(self.store, clock)
        if kind == "slice":
            body = slice_answer(info, data, res, store, self.inline_max_pixels, SLICE_IMAGES if self.images is None else self.images)
            if not body["images_inline"]:  # a large slice (answers.slice_answer's size rule): its buffers are free now
                del data, res
                trim()  # (allocator.keep_freed keeps the small ones for the next request)
        else:
            body = volume_answer(info, data, res, store, VOLUME_IMAGES if self.images is None else self.images)
            del data, res
            trim()  # the volume's arrays are free now: give them back (allocator.py)
        body["timings_ms"].update(clock.as_ms(kind, time.perf_counter() - t2))
        return body


class Clock:
    """Seconds one request spent in the network (volumes: its own calls; a slice's batch runs on
    the batcher's thread, so it is not split) and in the result store."""

    def __init__(self):
        self.network = 0.0
        self.store = 0.0

    def as_ms(self, kind: str, answer_s: float) -> dict:
        """``answer``: building the answer (lesion table done, PNGs asked for, the store write) and ``store`` of it."""
        network = {} if kind == "slice" else {"network": round(self.network * 1000, 1)}
        return {**network, "answer": round(answer_s * 1000, 1), "store": round(self.store * 1000, 1)}


@dataclass
class ClockedBackend:
    inner: object
    clock: Clock

    def __call__(self, batch):
        t = time.perf_counter()
        try:
            return self.inner(batch)
        finally:
            self.clock.network += time.perf_counter() - t

    def __getattr__(self, name):  # config, info, kind, precision of the wrapped backend
        return getattr(self.inner, name)


def timed(model, clock: Clock):
    """``model`` (a Segmenter or an Ensemble) whose network calls add their time to ``clock``."""
    if isinstance(model, Ensemble):
        return Ensemble([timed(m, clock) for m in model.members])
    return Segmenter(ClockedBackend(model.backend, clock), model.name, model.path)


@dataclass
class TimedStore:
    """The result store, its ``put`` timed into ``clock`` (the answers only put)."""

    inner: object
    clock: Clock

    def put(self, result) -> str:
        t = time.perf_counter()
        try:
            return self.inner.put(result)
        finally:
            self.clock.store += time.perf_counter() - t


def parse_return(raw: str | None) -> frozenset | None:
    """The ``return`` field: None (left out: the defaults), or the set of answer images asked for; 422 for other names."""
    if raw is None:
        return None
    names = {n.strip().lower() for n in str(raw).split(",") if n.strip()}
    if names == {"none"} or not names:
        return frozenset()
    unknown = names - set(ANSWER_IMAGES)
    if unknown:
        raise UploadError(422, f"return takes a comma-separated list of {', '.join(ANSWER_IMAGES)}, or none")
    return frozenset(names)


def choose_model(engine: Engine, options: SegmentOptions) -> tuple[str, str]:
    """The registry name and precision to run; 422 for an unknown name or a precision the model lacks, 503 without models."""
    try:
        name = engine.resolve(options.model)
        precision = options.precision or engine.default_precision(name, options.tta)
        engine.require_precision(name, precision)
    except KeyError:
        raise UploadError(422, f"unknown model; choose one of {', '.join(engine.names() + ['ensemble'])}") from None
    except PrecisionUnavailable as exc:
        raise UploadError(422, str(exc)) from None
    except ModelUnavailable as exc:
        raise UploadError(503, str(exc)) from None
    return name, precision


async def run_in_worker(request: Request, job: SegmentJob, limiters: list[anyio.CapacityLimiter], memory: MemoryBudget | None = None, need: int = 0) -> dict:
    """``job`` in a worker thread holding ``need`` bytes of ``memory`` (taken first) and a token of each
    limiter; ``Cancelled`` when the client went away.

    A watcher polls for the client's disconnect: it cancels a wait for memory or a worker, and a
    running job sees ``gone`` at its next check. Failures are raised here, outside the task group.
    """
    gone = threading.Event()
    body, failure = None, None
    async with anyio.create_task_group() as tg, AsyncExitStack() as held:

        async def watch():
            while True:
                if await request.is_disconnected():
                    gone.set()
                    tg.cancel_scope.cancel()
                    return
                await anyio.sleep(DISCONNECT_POLL_S)

        tg.start_soon(watch)
        try:
            if memory is not None:
                await held.enter_async_context(memory.hold(need))
            for limiter in limiters[:-1]:
                await held.enter_async_context(limiter)
            body = await anyio.to_thread.run_sync(job, gone, limiter=limiters[-1])
        except Exception as exc:
            failure = exc
        finally:
            tg.cancel_scope.cancel()
    if isinstance(failure, ModelUnavailable):
        raise UploadError(503, str(failure)) from None
    if isinstance(failure, PrecisionUnavailable):
        raise UploadError(422, str(failure)) from None
    if isinstance(failure, MemoryError):
        raise UploadError(413, "the upload is too large to process on this server") from None
    if failure is not None:
        raise failure
    if body is None:  # the wait for a worker was cancelled by the watcher
        raise Cancelled("queued")
    return body


async def memory_need_of(files: list[UploadFile], limits: Limits, memory: MemoryBudget, members: int) -> int:
    """The bytes of the memory budget this request is charged (from its headers; the whole budget
    when they cannot tell); 413 when it alone needs more than the whole budget."""
    need = await anyio.to_thread.run_sync(memory_of, files, limits, members)
    if need is None:
        return memory.total
    if need > memory.total:
        raise UploadError(
            413,
            f"this upload needs about {need / 2**20:.0f} MiB of memory to segment, more than the server's whole budget of "
            f"{memory.total / 2**20:.0f} MiB (BRAINSEG_MEMORY_BUDGET_MB); send a smaller image or volume",
        )
    return need


@router.post(
    "/v1/segment",
    summary="Segment one slice, one NIfTI volume, a BraTS t1n/t2f/t1c set or a DICOM series or study",
    responses={**RESPONSES["segment"], 200: {"model": SegmentAnswer, "description": "the answer: a slice's or a volume's (``kind``)"}},
)
async def segment(
    request: Request,
    files: list[UploadFile] = File(..., min_length=1, description=FILES_HELP),
    model: str | None = Form(None, description=MODEL_HELP),
    threshold: str | None = Form(None, description=THRESHOLD_HELP),
    tta: str | None = Form(None, description=TTA_HELP),
    sequence: str | None = Form(None, description=SEQUENCE_HELP),
    precision: str | None = Form(None, description=PRECISION_HELP),
    pixel_spacing_mm: str | None = Form(None, description=PIXEL_SPACING_HELP),
    returns: str | None = Form(None, alias="return", description=RETURN_HELP),
    engine: Engine = Depends(get_engine),
    store=Depends(get_store),
    settings: Settings = Depends(get_settings),
    limits: Limits = Depends(get_limits),
    limiters: Limiters = Depends(get_limiters),
    memory: MemoryBudget = Depends(get_memory),
    owner: str | None = Depends(get_owner),
):
    t_start = time.perf_counter()
    fields = {"model": model, "threshold": threshold, "tta": tta, "sequence": sequence, "precision": precision, "pixel_spacing_mm": pixel_spacing_mm}
    options = await segment_options(request, fields)
    images = parse_return(returns if returns is not None else request.query_params.get("return"))
    name, precision = choose_model(engine, options)
    check_declared_size(files, settings.max_upload_bytes, settings.max_upload_mb)
    need = await memory_need_of(files, limits, memory, len(engine.registry().ensemble_members) if name == ENSEMBLE else 1)
    job = SegmentJob(engine, store, limits, settings.max_upload_bytes, files, options, name, precision, owner, settings.inline_png_max_pixels, images)
    try:
        body = await run_in_worker(request, job, limiters.volume_and_worker if is_volume_request(files) else limiters.worker_only, memory, need)
    except Cancelled as gone:  # nobody is listening any more
        request.app.state.cancelled += 1
        log.warning("segmentation cancelled while %s: its client disconnected (%d cancelled since start)", gone.stage, request.app.state.cancelled)
        return error(499, "client closed the request")
    body["timings_ms"]["total"] = round((time.perf_counter() - t_start) * 1000, 1)
    return body
