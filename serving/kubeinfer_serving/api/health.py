"""Probes and metrics: ``/health`` (liveness), ``/ready`` (readiness), ``/metrics`` (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from kubeinfer_serving.api.errors import error_body
from kubeinfer_serving.metrics import REGISTRY

router = APIRouter()


@router.get("/health", response_model=None)
async def health(request: Request) -> JSONResponse:
    """The liveness probe: 200 while the process serves HTTP and every loaded engine runs.

    503 (OpenAI body, code ``engine_dead``) once an engine loop has crashed, so the kubelet
    restarts the pod instead of leaving a model that answers every request with 503.
    Model loading does not affect it.
    """
    dead_models = getattr(request.app.state.provider, "dead_models", None)
    dead = dead_models() if dead_models is not None else []
    if dead:
        return JSONResponse(error_body(503, f"The engine of {len(dead)} model(s) stopped: {', '.join(dead)}",
                                       code="engine_dead"), status_code=503)
    return JSONResponse({"status": "ok"})


@router.get("/ready", response_model=None)
async def ready(request: Request) -> JSONResponse:
    """200 once every preloaded model is loaded (the readiness probe), else 503 in OpenAI's error body."""
    if request.app.state.provider.is_ready():
        return JSONResponse({"status": "ready"})
    return JSONResponse(error_body(503, "Preloaded models are still loading (or failed to load)",
                                   code="not_ready"), status_code=503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """The Prometheus text exposition of :data:`kubeinfer_serving.metrics.REGISTRY` followed by the
    app's own registry (``kubeinfer_model_state`` of its provider)."""
    body = generate_latest(REGISTRY)
    own = getattr(request.app.state, "metrics_registry", None)
    if own is not None:
        body += generate_latest(own)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
