"""``/`` (to the docs), ``/health`` and ``/v1/models``."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends
from fastapi.responses import RedirectResponse

from ... import __version__
from ...config import CHANNELS
from ...inference.registry import ENSEMBLE
from ..deps import MemoryBudget, get_engine, get_memory, get_store
from ..engine import Engine, ModelUnavailable
from ..errors import RESPONSES
from ..schemas import HealthAnswer, ModelsAnswer
from ..uploads import UploadError

router = APIRouter()


@router.get("/", include_in_schema=False)
async def root():
    return RedirectResponse("/docs")


@router.get("/health", summary="Liveness, and whether models are available", responses={**RESPONSES["health"], 200: {"model": HealthAnswer}})
async def health(engine: Engine = Depends(get_engine), store=Depends(get_store), memory: MemoryBudget = Depends(get_memory)):
    body = {"status": "ok", "version": __version__, "loaded_models": engine.loaded(), "results_kept": len(store)}
    # BRAINSEG_MEMORY_BUDGET_MB, what the segmentations in progress hold of it, and how many requests waited for it since start
    body["memory"] = {"budget_mb": round(memory.total / 2**20), "held_mb": round(memory.used / 2**20, 1), "waited": memory.waited}
    if engine.batcher is not None:  # network runs for slices since start, and the slices (rows) they held
        body["slice_batches"] = {"runs": engine.batcher.batches, "rows": engine.batcher.rows}
    try:
        body.update(models_ready=True, default_model=engine.default_name(), models=engine.names())
    except ModelUnavailable as exc:
        body.update(models_ready=False, problem=str(exc))
    return body


@router.get(
    "/v1/models",
    summary="Registered models: parameters, metrics, calibrated threshold, default",
    responses={**RESPONSES["models"], 200: {"model": ModelsAnswer}},
)
async def models(engine: Engine = Depends(get_engine)):
    try:
        names = engine.names()
        described = await anyio.to_thread.run_sync(lambda: [engine.describe(n) for n in names + ([ENSEMBLE] if len(names) > 1 else [])])
        reg = engine.registry()
    except ModelUnavailable as exc:
        raise UploadError(503, str(exc)) from None
    return {"default": reg.default, "selected_by": reg.selected_by, "channels": list(CHANNELS), "models": described}
