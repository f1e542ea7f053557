"""``/health/live``, ``/health/ready`` (probes for a load balancer, Kubernetes or Ray Serve) and ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from ..engine import ModelUnavailable
from ..errors import RESPONSES
from ..metrics import CONTENT_TYPE_LATEST

router = APIRouter()


class Live(BaseModel):
    status: str = Field(description="always 'alive'")


class Ready(BaseModel):
    ready: bool
    default_model: str | None = Field(None, description="the registry's default model")
    loaded_models: list[str] = Field(description="models loaded in this worker")
    problem: str | None = Field(None, description="why it is not ready")


@router.get("/health/live", summary="Liveness: the process answers (restart it if not)", response_model=Live, responses=RESPONSES["health"])
async def live():
    return {"status": "alive"}


@router.get(
    "/health/ready",
    summary="Readiness: the default model is loaded in this worker (send traffic only then)",
    response_model=Ready,
    response_model_exclude_none=True,
    responses={**RESPONSES["health"], 503: {"model": Ready, "description": "not ready: the default model is not loaded (yet), or cannot be"}},
)
async def ready(request: Request):
    engine = request.app.state.engine
    loaded = engine.loaded()
    try:
        default = engine.default_name()
    except ModelUnavailable as exc:
        return JSONResponse({"ready": False, "default_model": None, "loaded_models": loaded, "problem": str(exc)}, status_code=503)
    if default not in loaded:
        body = {"ready": False, "default_model": default, "loaded_models": loaded, "problem": "the default model is not loaded yet"}
        return JSONResponse(body, status_code=503)
    return {"ready": True, "default_model": default, "loaded_models": loaded}


@router.get(
    "/metrics",
    summary="Prometheus metrics of this worker (requests, latency, queue, shed requests, network time and batch sizes, result store)",
    response_class=Response,
    responses={**RESPONSES["models"], 200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "the Prometheus text format"}},
)
async def metrics(request: Request):
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
