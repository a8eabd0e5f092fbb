"""Operational endpoints: /health (liveness and what is loaded), /ready (readiness), /metrics
(Prometheus), /benchmark (the stage table, run as a GPU job)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from benchmarks.stage_benchmark import parse_stage_list

from .errors import APIError, invalid
from .queue import QueueFull
from .schemas import ErrorResponse

router = APIRouter()
STAGES_PATTERN = r"^\s*\d(\s*-\s*\d)?(\s*,\s*\d(\s*-\s*\d)?)*\s*$"  # 0-5, 0,4, 0-2,5


@router.get("/health", summary="Liveness, and everything about what is loaded")
async def health(request: Request) -> dict:
    """Always 200 while the process serves HTTP; `status` says loading / warming / ready / draining / failed."""
    return request.app.state.service.health()


@router.get("/ready", summary="Readiness: 200 once the model is loaded and warm, 503 before and while draining", responses={503: {"description": "not ready"}})
async def ready(request: Request) -> JSONResponse:
    service = request.app.state.service
    body = {"ready": service.ready, "status": service.status, "error": service.error}
    return JSONResponse(body, status_code=200 if service.ready else 503, headers=None if service.ready else {"Retry-After": "5"})


@router.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
async def metrics(request: Request) -> Response:
    service = request.app.state.service
    return Response(service.metrics.render(), media_type=service.metrics.content_type)


def _stages(service, text: str | None) -> list[int]:
    allowed = list(service.settings.benchmark_stages)
    if text is None or not text.strip():
        return allowed
    try:
        stages = parse_stage_list(text)
    except ValueError as error:
        raise invalid("stages", f"{text!r}: {error}; write e.g. 0-5 or 0,4") from None
    outside = [stage for stage in stages if stage not in allowed]
    if outside:
        raise invalid("stages", f"stage(s) {', '.join(map(str, outside))} are not enabled on this server (serve --benchmark-stages {','.join(map(str, allowed))})")
    return stages


def _wants_markdown(request: Request, format_: str | None) -> bool:
    if format_ is not None:
        return format_ == "md"
    accept = request.headers.get("accept", "")
    return "text/markdown" in accept and "application/json" not in accept


@router.get(
    "/benchmark",
    summary="Stage-by-stage benchmark table (starts a run when there is none)",
    responses={
        202: {"description": "a run is queued or running: progress, and the latest finished table if any"},
        **{status: {"model": ErrorResponse} for status in (422, 429, 503)},
    },
)
async def benchmark(
    request: Request,
    stages: Annotated[Optional[str], Query(max_length=40, pattern=STAGES_PATTERN, description="Cumulative stages, e.g. 0-5 or 0,4 (default: the server's --benchmark-stages).")] = None,
    force: Annotated[bool, Query(description="Start a new run even if a table for these stages exists.")] = False,
    format: Annotated[Optional[Literal["json", "md"]], Query(description="md: the table as markdown (also with Accept: text/markdown).")] = None,
):
    service = request.app.state.service
    service.require_ready()
    wanted = _stages(service, stages)
    jobs = service.benchmarks
    markdown = _wants_markdown(request, format)
    running = jobs.running
    finished = jobs.latest_for(wanted)
    if running is None and finished is not None and not force:
        if markdown:
            return PlainTextResponse(finished["markdown"] + "\n", media_type="text/markdown")
        return JSONResponse({"status": "done", **finished})
    if running is None:
        try:
            running = jobs.start(wanted)
        except QueueFull as full:
            raise APIError(429, "queue_full", f"the GPU queue is full; retry after {full.retry_after} s", headers={"Retry-After": str(full.retry_after)}) from None
        note = "started a benchmark run"
    else:
        note = "a benchmark is already running" + ("" if running["stages"] == wanted else f" (stages {running['stages']}); ask again when it finishes")
    latest = jobs.latest
    body = {
        "status": running["status"],
        "note": note + "; poll GET /benchmark for progress, DELETE /benchmark cancels",
        "progress": running,
        "latest": latest,
        "last_failure": jobs.last_failure,
    }
    if markdown:
        text = f"benchmark {running['status']}: {running['message']} ({running['fraction']:.0%})\n"
        if latest:
            text += "\nlatest finished table:\n\n" + latest["markdown"] + "\n"
        return PlainTextResponse(text, status_code=202, media_type="text/markdown")
    return JSONResponse(body, status_code=202, headers={"Retry-After": "10"})


@router.delete("/benchmark", summary="Cancel the queued or running benchmark", responses={404: {"model": ErrorResponse}})
async def cancel_benchmark(request: Request) -> dict:
    outcome = request.app.state.service.benchmarks.cancel()
    if outcome is None:
        raise APIError(404, "not_found", "no benchmark is queued or running")
    return outcome
