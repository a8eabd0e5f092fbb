"""Operational endpoints: /health (liveness and what is loaded), /ready (readiness), /metrics
(Prometheus), /benchmark (the stage table, run as GPU jobs that yield to user requests)."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from stages.config import parse_presets

from .errors import APIError, invalid
from .jobs import QueueFull
from .schemas import ErrorResponse

router = APIRouter()
STAGES_PATTERN = r"^\s*\d(\s*-\s*\d)?(\s*,\s*\d(\s*-\s*\d)?)*\s*$"  # 0-5, 0,4, 0-2,5
StagesQuery = Annotated[
    Optional[str],
    Query(
        max_length=40, pattern=STAGES_PATTERN, description="Cumulative presets, e.g. 0-5 or 0,4 (default: the server's --benchmark-stages)."
    ),
]
TABLE_CONTENT = {"application/json": {}, "text/markdown": {"schema": {"type": "string"}}}
FormatQuery = Annotated[Optional[Literal["json", "md"]], Query(description="md: the table as markdown (also with Accept: text/markdown).")]


@router.get("/health", summary="Liveness, and everything about what is loaded")
@router.head("/health", include_in_schema=False)  # uptime probes that use HEAD
async def health(request: Request) -> dict:
    """Always 200 while the process serves HTTP; `status` says loading / warming / ready / draining / failed."""
    return request.app.state.service.health()


@router.get(
    "/ready",
    summary="Readiness: 200 once the model is loaded and warm, 503 before and while draining",
    responses={503: {"description": "not ready"}},
)
@router.head("/ready", include_in_schema=False)
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
        stages = parse_presets(text)
    except ValueError as error:
        raise invalid("stages", str(error)) from None
    outside = [stage for stage in stages if stage not in allowed]
    if outside:
        raise invalid(
            "stages",
            f"stage(s) {', '.join(map(str, outside))} are not enabled on this server "
            f"(serve --benchmark-stages {','.join(map(str, allowed))})",
        )
    return stages


def _wants_markdown(request: Request, format_: str | None) -> bool:
    if format_ is not None:
        return format_ == "md"
    accept = request.headers.get("accept", "")
    return "text/markdown" in accept and "application/json" not in accept


def _start(service, stages: list[int]) -> dict:
    if not service.settings.benchmark_runs_allowed:
        raise APIError(
            403,
            "forbidden",
            "this server does not start benchmark runs for clients (it listens beyond loopback without an API key); "
            "start it with serve --benchmark-runs on, or set an API key",
        )
    try:
        return service.benchmarks.start(stages)
    except QueueFull as full:
        raise APIError(
            429, "queue_full", f"the GPU queue is full; retry after {full.retry_after} s", headers={"Retry-After": str(full.retry_after)}
        ) from None


def _answer(request: Request, service, markdown: bool, note: str | None = None):
    """The benchmark's state: 200 with the latest table, or 202 with the progress of a run."""
    jobs = service.benchmarks
    running, latest = jobs.running, jobs.latest
    if running is None and latest is not None:
        if markdown:
            return PlainTextResponse(latest["markdown"] + "\n", media_type="text/markdown")
        return JSONResponse({"status": "done", **latest})
    if running is None:
        body = {
            "status": "not_run",
            "note": note or "no benchmark has run on this server; POST /benchmark starts one",
            "last_failure": jobs.last_failure,
        }
        if markdown:
            return PlainTextResponse(body["note"] + "\n", media_type="text/markdown")
        return JSONResponse(body)
    body = {
        "status": running["status"],
        "note": (note or "a benchmark is running") + "; poll GET /benchmark for progress, DELETE /benchmark cancels",
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


@router.get(
    "/benchmark",
    summary="The latest benchmark table, or the progress of the running one",
    responses={
        200: {"description": "the latest finished table, or how to start a run", "content": TABLE_CONTENT},
        202: {"description": "a run is queued or running: its progress, and the latest finished table if any", "content": TABLE_CONTENT},
        **{s: {"model": ErrorResponse} for s in (403, 429, 503)},
    },
)
async def benchmark(request: Request, format: FormatQuery = None):
    """Reads only. The one exception keeps the design card's `curl http://localhost:8000/benchmark`
    useful: on a server whose policy lets clients start runs (a loopback address, or an API key),
    a GET before any run has happened starts the default run. It never starts a second one."""
    service = request.app.state.service
    service.require_ready()
    jobs = service.benchmarks
    note = None
    if jobs.running is None and jobs.latest is None and jobs.last_failure is None and service.settings.benchmark_runs_allowed:
        _start(service, list(service.settings.benchmark_stages))
        note = "started the default benchmark run (the first GET on this server)"
    return _answer(request, service, _wants_markdown(request, format), note)


@router.post(
    "/benchmark",
    status_code=202,
    summary="Start a benchmark run (edits yield to user requests between them)",
    responses={
        202: {"description": "the run is queued: its progress, and the latest finished table if any", "content": TABLE_CONTENT},
        **{s: {"model": ErrorResponse} for s in (403, 409, 422, 429, 503)},
    },
)
async def start_benchmark(request: Request, stages: StagesQuery = None, format: FormatQuery = None):
    service = request.app.state.service
    service.require_ready()
    wanted = _stages(service, stages)
    running = service.benchmarks.running
    if running is not None:
        raise APIError(409, "conflict", f"a benchmark is already running (stages {running['stages']}); DELETE /benchmark cancels it")
    _start(service, wanted)
    return _answer(request, service, _wants_markdown(request, format), note=f"started a benchmark run of stages {wanted}")


@router.delete("/benchmark", summary="Cancel the queued or running benchmark", responses={404: {"model": ErrorResponse}})
async def cancel_benchmark(request: Request) -> dict:
    outcome = request.app.state.service.benchmarks.cancel()
    if outcome is None:
        raise APIError(404, "not_found", "no benchmark is queued or running")
    return outcome
