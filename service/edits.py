"""What every editing endpoint shares: input decoding, the server's limits, the trip through the GPU
queue (with its failure modes turned into HTTP answers), output encoding, content negotiation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from engine.lora_files import LoraError
from engine.requests import EditRequest, EditResult, LoraChoice
from engine.sizes import output_size

from .engine_calls import CheckLoras, EditCall
from .errors import APIError, from_lora_error, invalid
from .images import MEDIA_TYPES, DecodedImage, decode_image, encode_image
from .jobs import BuildLimit, ClientGone, GpuOutOfMemory, Job, JobFailed, JobTimeout, QueueFull, WorkerDied, WorkerStopped
from .optimizations import MergedConfig, merge
from .runtime import Service
from .schemas import InferenceRequest

log = logging.getLogger("flux_kontext.service")

# How the OpenAI routes name the request fields, for error messages that point at what the client sent.
OPENAI_FIELD_NAMES = {"width": "size", "height": "size", "num_images": "n"}


@dataclass
class PreparedEdit:
    edit: EditRequest
    merged: MergedConfig
    output_format: str = "png"
    quality: int = 90
    warnings: list[str] = field(default_factory=list)
    decode_s: float = 0.0


async def prepare(service: Service, body: InferenceRequest, image: bytes | None, field_names: dict[str, str] | None = None) -> PreparedEdit:
    """The one way every editing endpoint turns a validated body into an engine request: decode the
    input, merge the optimizations, apply the server's default steps, check its limits and the
    request's LoRA adapters."""
    names = {**{name: name for name in ("width", "height", "num_images")}, **(field_names or {})}
    decoded, decode_s = await decode_input(service, image)
    overrides = body.optimizations.model_dump(exclude_none=True) if body.optimizations else {}
    merged = merge(service.model.default_config, body.legacy_flags(), overrides, service.settings.per_request_variants)
    edit = EditRequest(
        prompt=body.prompt,
        image=decoded.image if decoded else None,
        negative_prompt=body.negative_prompt,
        width=body.width,
        height=body.height,
        steps=body.steps if body.steps is not None else service.settings.default_steps,
        guidance_scale=body.guidance_scale,
        true_cfg_scale=body.true_cfg_scale,
        seed=body.seed,
        num_images=body.num_images,
        loras=tuple(LoraChoice(use.name, use.scale) for use in body.loras or ()),
    )
    check_limits(service, edit, names)
    if edit.loras:  # the engine checks again when the edit runs; asked now, a wrong name is answered without waiting in the queue
        try:
            await service.worker.ask(CheckLoras(edit.loras))
        except LoraError as refused:
            raise from_lora_error(refused) from None
    warnings = (decoded.notes if decoded else []) + merged.warnings
    if body.true_cfg_scale > 1 and not body.negative_prompt:
        warnings.append("true_cfg_scale > 1 has no effect without a negative_prompt")
    return PreparedEdit(edit, merged, body.output_format, body.output_quality, warnings, decode_s)


async def decode_input(service: Service, data: bytes | None, field_name: str = "image") -> tuple[DecodedImage | None, float]:
    if data is None:
        return None, 0.0
    started = time.perf_counter()
    settings = service.settings

    def bounded_decode() -> DecodedImage:
        with service.decode_slots:  # a thread lock, not an asyncio one: apps outlive event loops in tests
            return decode_image(data, settings.max_input_pixels, settings.min_input_side, field_name)

    decoded = await run_in_threadpool(bounded_decode)
    return decoded, time.perf_counter() - started


def check_limits(service: Service, edit: EditRequest, names: dict[str, str]) -> tuple[int, int]:
    """The server's own bounds (tighter than the schema's); returns the output size."""
    settings, model = service.settings, service.model
    if (edit.width is None) != (edit.height is None):
        missing = names["width"] if edit.width is None else names["height"]
        raise invalid(
            missing,
            f"give both {names['width']} and {names['height']}, or neither (then Kontext picks the size from the input's aspect ratio)",
        )
    low, high = service.min_side(), settings.max_size
    for name, value in (("width", edit.width), ("height", edit.height)):
        if value is not None and not low <= value <= high:
            raise invalid(names[name], f"{value} is outside this server's range {low}..{high} (serve --min-size/--max-size)")
        if value is not None and value % 16:
            raise invalid(names[name], f"{value} is not a multiple of 16")
    if edit.steps is not None and edit.steps > settings.max_steps:
        raise invalid("steps", f"{edit.steps} is over this server's limit of {settings.max_steps} steps")
    if edit.num_images > settings.max_images:
        raise invalid(names["num_images"], f"{edit.num_images} is over this server's limit of {settings.max_images} images per request")
    width, height = output_size(
        edit.width, edit.height, edit.image.size if edit.image else None, edit.max_area or model.spec.default_max_area
    )
    pixels = width * height * edit.num_images
    if pixels > settings.max_pixels:
        raise invalid(
            names["width"] if edit.width else names["num_images"],
            f"{width}x{height} x {edit.num_images} image(s) is {pixels / 1e6:.1f} MP, "
            f"over this server's {settings.max_pixels / 1e6:.1f} MP per request",
        )
    return width, height


def run_warnings(result: EditResult, prepared: PreparedEdit) -> list[str]:
    """The request's warnings, plus one line per requested stage this machine did not run and the
    model's own warning (random weights)."""
    skipped = [f"{name} requested but not run: {reason}" for name, reason in result.skipped_stages.items()]
    model = [result.model["warning"]] if result.model.get("warning") else []
    return prepared.warnings + result.warnings + skipped + model


async def run_edit(service: Service, request: Request, prepared: PreparedEdit, arrived: float) -> tuple[EditResult, Job]:
    """Through the GPU queue, with the request's deadline counted from its arrival."""
    settings = service.settings
    deadline = arrived + settings.request_timeout
    client = request.client.host if request.client else ""
    call = EditCall(prepared.edit, prepared.merged.config, deadline, client)  # stops at the next step once the deadline has passed
    if service.model.lora.merges:  # requests with the adapter set an engine holds may run first (service/worker.py)
        call.affinity = (call.config, tuple((choice.name, choice.scale) for choice in prepared.edit.loras))
    edit = prepared.edit
    size = f"{edit.width or 'auto'}x{edit.height or 'auto'}, {edit.num_images} image(s)"
    with worker_errors(service, request, "edit", size, "retry, or ask for a smaller size or fewer images"):
        try:
            result, job = await service.worker.run(call, deadline, request.is_disconnected)
        except LoraError as refused:  # an adapter unloaded between this request's arrival and its turn
            raise from_lora_error(refused) from None
    service.metrics.record_edit(result)
    return result, job


@contextlib.contextmanager
def worker_errors(service: Service, request: Request, what: str, context: str, out_of_memory_advice: str):
    """The GPU queue's failure modes as HTTP answers, for a job doing `what` ("edit") on `context`."""
    settings = service.settings
    try:
        yield
    except BuildLimit as limit:
        raise APIError(429, "build_limit", str(limit), field="optimizations", headers={"Retry-After": str(limit.retry_after)}) from None
    except QueueFull as full:
        raise APIError(
            429,
            "queue_full",
            f"the server is busy: {full.waiting} requests are already waiting (serve --queue-size {settings.queue_size}); "
            f"retry after {full.retry_after} s",
            headers={"Retry-After": str(full.retry_after)},
        ) from None
    except WorkerStopped:
        raise APIError(
            503, "shutting_down", "the server is shutting down; retry on another instance", headers={"Retry-After": "5"}
        ) from None
    except JobTimeout as timeout:
        where = (
            f"while its {what} was running (stopped at the next step)"
            if timeout.was_running
            else "while waiting in the queue (it never reached the GPU)"
        )
        raise APIError(
            504,
            "timeout",
            f"no result within the {settings.request_timeout:g} s request timeout (serve --request-timeout); it timed out {where}",
        ) from None
    except ClientGone:
        raise APIError(
            499, "client_disconnected", "the client disconnected while waiting; the job was dropped before reaching the GPU"
        ) from None
    except GpuOutOfMemory as oom:
        raise APIError(
            503,
            "gpu_out_of_memory",
            f"the GPU ran out of memory on this request ({context}): {oom}. "
            f"The memory was released and the server keeps serving; {out_of_memory_advice}",
            headers={"Retry-After": "1"},
        ) from None
    except WorkerDied as died:
        raise APIError(
            503,
            "worker_died",
            f"the edit failed: {died}. The worker is being restarted and the other requests go on; "
            "the edit was not retried, in case it was the cause: retry it",
            headers={"Retry-After": "5"},
        ) from None
    except JobFailed as failed:
        request_id = getattr(request.state, "request_id", None)
        log.error("%s failed (request %s): %r", what, request_id, failed.original)
        raise APIError(
            500,
            f"{what.replace(' ', '_')}_failed",
            f"the {what} failed on the server ({type(failed.original).__name__}); it was logged under request id {request_id}",
        ) from None


async def encode_outputs(result: EditResult, output_format: str, quality: int) -> tuple[list[bytes], float]:
    """Each image in its own thread (Pillow's encoders release the GIL), off the event loop."""
    started = time.perf_counter()
    blobs = await asyncio.gather(*(run_in_threadpool(encode_image, image, output_format, quality) for image in result.images))
    return list(blobs), time.perf_counter() - started


def negotiate(accept: str | None) -> str | None:
    """The image media type the client prefers over JSON, or None for JSON (ties go to JSON)."""
    if not accept:
        return None
    ranges = []
    for part in accept.split(","):
        pieces = [piece.strip() for piece in part.split(";")]
        media = pieces[0].lower()
        if "/" not in media:
            continue
        quality = 1.0
        for parameter in pieces[1:]:
            if parameter.lower().startswith("q="):
                try:
                    quality = float(parameter[2:])
                except ValueError:
                    quality = 0.0
        ranges.append((media, quality))

    def quality_of(media_type: str) -> float:
        kind = media_type.split("/")[0]
        best, specificity = 0.0, -1  # the most specific matching range decides
        for media, quality in ranges:
            rank = 2 if media == media_type else 1 if media == f"{kind}/*" else 0 if media == "*/*" else -1
            if rank > specificity:
                best, specificity = quality, rank
        return best

    image_quality = max(quality_of(media_type) for media_type in MEDIA_TYPES.values())
    if image_quality <= quality_of("application/json"):
        return None
    named = [media for media, quality in ranges if media in MEDIA_TYPES.values() and quality == image_quality]
    return named[0] if named else "image/*"  # image/*: the request's output_format


def json_response(payload: BaseModel, headers: dict[str, str], exclude_none: bool = False) -> Response:
    """A response carrying images, rendered by pydantic's serializer (Rust): Starlette's JSONResponse
    renders through the json module, about 8x slower on megabytes of base64 (the numbers are in
    README.md, "Output encoding")."""
    return Response(payload.model_dump_json(exclude_none=exclude_none), media_type="application/json", headers=headers)


def server_timing(queue_s: float, result: EditResult, decode_s: float, encode_s: float, total_s: float) -> str:
    timings = result.timings
    parts = [
        ("queue", queue_s),
        ("decode_input", decode_s),
        ("text_encode", timings.text_encode_s),
        ("vae_encode", timings.vae_encode_s),
        ("denoise", timings.denoise_s),
        ("vae_decode", timings.vae_decode_s),
        ("engine", timings.total_s),
        ("encode_output", encode_s),
        ("total", total_s),
    ]
    return ", ".join(f"{name};dur={seconds * 1000:.1f}" for name, seconds in parts)
