"""Probes and metrics: /health (liveness), /ready (readiness), /metrics (Prometheus)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from musetalk_service.api.errors import error_response
from musetalk_service.api.routes.common import error_docs, get_service
from musetalk_service.api.schemas import HealthResponse, ReadyResponse

router = APIRouter()


@router.api_route("/health", methods=["GET", "HEAD"], response_model=HealthResponse)
async def health(http: Request) -> dict:
    """Liveness: 200 while the process answers, loading or not. Cheap: never touches the GPU or
    waits for a job. HEAD answers the same status with no body. A watchdog restarts the service when this fails (no API key needed)."""
    pipeline = get_service(http).pipeline
    facts = pipeline.health() if pipeline is not None else {}
    return {
        "status": "ok",
        "models_loaded": pipeline is not None,
        "device": facts.get("device"),
        "weights": facts.get("weights"),
        "encoder": facts.get("encoder"),
    }


@router.api_route(
    "/ready", methods=["GET", "HEAD"], response_model=ReadyResponse, response_model_exclude_none=True, responses=error_docs(401, 503)
)
async def ready(http: Request) -> Any:
    """Readiness: 200 once the models are loaded and warmed and the GPU answers a tiny op; 503
    (with the reason) while loading, if the GPU stops answering, or once shutting down. Load
    balancers route by it; a watchdog should not restart on it (a busy GPU is still alive)."""
    service = get_service(http)
    reason = await service.not_ready_reason()
    if reason is not None:
        return error_response(503, "not_ready", reason)
    jobs = service.jobs
    body: dict[str, Any] = {"status": "ready", "queue_depth": jobs.queue_depth, "max_queue": jobs.max_queue, "jobs_running": jobs.running_count}
    replicas = service.replica_counts()
    if replicas is not None:
        body["replicas"] = {"ready": replicas.ready, "total": replicas.total}
    return body


@router.get("/metrics", responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}, **error_docs(401)})
async def metrics(http: Request) -> Response:
    """Prometheus metrics (`musetalk_*`): requests by route and outcome, queue depth, job durations,
    per-phase seconds, frames, output fps, avatar cache hits and misses, GPU memory."""
    service = get_service(http)
    service.sync_cache_metrics()
    body, content_type = service.metrics.render()
    return Response(body, media_type=content_type)
