"""LoRA adapters over HTTP: GET /v1/loras (available and loaded), POST /v1/loras (load),
DELETE /v1/loras/{name} (unload), and the original API's POST /lora {path, name, action, scale}.

Adapters are files in the server's LoRA directory (serve --lora-dir) and are always named, never
given as paths: the original API's `path` is accepted only when it resolves to a file directly in
that directory. Loading and unloading run on every engine (each worker process of `serve --gpus`),
in turn with edits, so they never race one; loading changes no model (engine/loras.py), and a
refused file leaves everything as it was. A request runs adapters by naming them in its `loras`
field; nothing carries over to the next one.
"""

from __future__ import annotations

import os
import time
from typing import Annotated, Union

from fastapi import APIRouter, Depends, Path, Request

from engine.lora_files import SUFFIX, LoraError, file_in_directory

from .edits import worker_errors
from .engine_calls import ListLoras, LoadLora, UnloadLora
from .errors import from_lora_error, invalid
from .openai_images import require_json
from .schemas import ErrorResponse, LoraLibraryState, LoraLoaded, LoraLoadRequest, LoraUnloaded, SeedLoraRequest

router = APIRouter(tags=["LoRA adapters"])

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 408, 409, 413, 415, 422, 429, 503, 504)}


@router.get(
    "/v1/loras",
    summary="Adapter files in the LoRA directory, and the loaded adapters",
    response_model=LoraLibraryState,
    responses={status: {"model": ErrorResponse} for status in (401, 503)},
)
async def list_loras(request: Request) -> dict:
    service = request.app.state.service
    service.require_ready()
    with worker_errors(service, request, "adapter list", "listing adapters", "retry"):
        return await service.worker.ask(ListLoras())


@router.post("/v1/loras", summary="Load an adapter from the LoRA directory, by name", response_model=LoraLoaded, responses=_ERRORS)
async def load_lora(request: Request, body: LoraLoadRequest, _json: None = Depends(require_json)) -> dict:
    return await _load(request, body.name, None, body.scale)


@router.delete("/v1/loras/{name}", summary="Unload an adapter", response_model=LoraUnloaded, responses=_ERRORS)
async def unload_lora(request: Request, name: Annotated[str, Path(min_length=1, max_length=200)]) -> dict:
    return await _unload(request, name)


@router.post(
    "/lora",
    summary="The original API: load or unload an adapter by its file in the LoRA directory",
    response_model=Union[LoraLoaded, LoraUnloaded],
    responses=_ERRORS,
)
async def seed_lora(request: Request, body: SeedLoraRequest, _json: None = Depends(require_json)) -> dict:
    lora = request.app.state.service.require_ready().lora
    file = None
    if body.path is not None:
        try:
            file = file_in_directory(lora.resolved_directory, body.path)
        except LoraError as refused:
            refused.field = "path"
            raise from_lora_error(refused) from None
    name = body.name or (file[: -len(SUFFIX)] if file else None)
    if name is None:
        raise invalid("name", f"name the adapter to {body.action}, or give the file as path")
    if body.action == "unload":
        return await _unload(request, name)
    return await _load(request, name, file, body.scale)


async def _load(request: Request, name: str, file: str | None, scale: float) -> dict:
    service = request.app.state.service
    service.require_ready()
    deadline = time.monotonic() + service.settings.request_timeout
    call = LoadLora(name, file, scale, deadline)
    advice = "unload an adapter (DELETE /v1/loras/NAME) or retry"
    with worker_errors(service, request, "adapter load", f"loading adapter {name!r}", advice):
        try:
            loaded = (await service.worker.run_everywhere(call, deadline, request.is_disconnected))[0]  # every engine has it now
        except LoraError as refused:
            service.metrics.lora_loads.labels("refused").inc()
            raise from_lora_error(_naming(refused, "name" if file is None else "path")) from None
    service.metrics.lora_loads.labels("ok").inc()
    service.metrics.lora_load_seconds.observe(loaded["summary"]["load_s"])
    warnings = []
    ignored = loaded["ignored_keys"]
    if ignored:
        warnings.append(f"{len(ignored)} keys left aside (e.g. {ignored[0]}): only the transformer is adapted")
    if os.path.splitext(loaded["file"])[0] != name:
        warnings.append(f"loaded from {loaded['file']} under the name {name!r}")
    return {"loaded": loaded["summary"], "replaced": loaded["replaced"], "warnings": warnings}


async def _unload(request: Request, name: str) -> dict:
    service = request.app.state.service
    service.require_ready()
    deadline = time.monotonic() + service.settings.request_timeout
    with worker_errors(service, request, "adapter unload", f"unloading adapter {name!r}", "retry"):
        try:
            await service.worker.run_everywhere(UnloadLora(name, deadline), deadline, request.is_disconnected)
        except LoraError as refused:
            raise from_lora_error(_naming(refused, "name")) from None
    return {"name": name, "unloaded": True}


def _naming(refused: LoraError, field: str) -> LoraError:
    """A refusal about the adapter as a whole is about the field that named it."""
    if refused.field is None:
        refused.field = field
    return refused
